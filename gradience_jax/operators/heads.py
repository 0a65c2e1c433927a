"""Loss heads: ``head(outputs, batch) -> scalar`` with an analytic output-space Hessian.

A head splits the loss as ``loss_fn(params, batch) = head(model_fn(params, batch), batch)``.
Outputs have shape ``(*lead, C)``: ``lead`` indexes examples or tokens (``(B,)``,
``(B, T)``), ``C`` is the number of classes / output features. Each position ("token")
contributes an unnormalised loss ``l_t``; the head returns ``sum_t w_t l_t / Z`` with
weights ``w_t`` (a padding mask, or ones) and normaliser ``Z`` (``sum_t w_t``, times ``C``
for MSE so that it matches ``torch.nn.MSELoss(reduction="mean")``).

Built-ins:
    softmax_cross_entropy(labels_key, mask_key): integer labels ``(*lead,)`` or one-hot /
        soft targets ``(*lead, C)``; per-token Hessian ``s (diag(p) - p p^T)`` with
        ``s = sum_c y_c`` (1 for proper distributions).
    mse(targets_key, mask_key): per-token loss ``sum_c (f_c - y_c)^2``; Hessian ``2 I``.

Integer labels must lie in ``[0, C)`` wherever the token weight is non-zero (padding tokens
of weight 0 may carry any label, e.g. ``-1`` or ``-100``). Operators check concrete labels on
the host when they are built (:meth:`Head.check_targets`, a ``ValueError`` naming
``batch['labels']``); under ``jit`` (traced labels) a weighted token with an out-of-range
label makes the loss, its gradient and the head's Hessian products NaN, so the probes flag it
(``"<name>/nonfinite"``) instead of scoring ``-1`` as the last class.

``token_sample_grad`` draws labels from the model's predictive distribution and returns
the per-token gradient of the unnormalised loss w.r.t. outputs, whose outer product has
expectation equal to the per-token Hessian (the Fisher identity used by ``mc_fisher``).

Supported names (the ``__all__`` list): :class:`Head` (base class of the built-ins; subclass
it for a new head with an analytic Hessian), :func:`compose` (``loss_fn`` from ``model_fn``
and a head), :class:`SoftmaxCrossEntropy`, :class:`MeanSquaredError`,
:func:`softmax_cross_entropy`, :func:`mse`, :func:`output_hvp`, :func:`likelihood_head`,
:func:`check_targets`, :func:`check_loss_targets` and :data:`LIKELIHOODS`.
``_Head`` is a deprecated alias of :class:`Head`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax._validate import check_choice, check_labels, is_traced

PyTree = Any

#: the likelihoods :func:`likelihood_head` (and ``mc_fisher``) knows
LIKELIHOODS = ("categorical", "gaussian")


def _lead_shape(outputs: jax.Array) -> tuple[int, ...]:
    if outputs.ndim < 2:
        raise ValueError(
            f"head outputs must have shape (*lead, C) with a trailing class / feature axis, "
            f"got shape {outputs.shape}"
        )
    return outputs.shape[:-1]


@dataclasses.dataclass(frozen=True)
class Head:
    """Base class of the built-in loss heads: ``head(outputs, batch) -> scalar``.

    A head is a frozen (hashable) dataclass, so operators built from it reuse compiled
    programs. Subclasses define the per-token pieces (:meth:`token_loss`, :meth:`token_hvp`,
    :meth:`token_sample_grad`, optionally :meth:`scale_per_token`); the base class adds the
    token weights (``batch[mask_key]`` or ones), the normaliser and the reductions. An
    instance of a ``Head`` subclass is treated as convex: ``ggn`` marks its operator PSD,
    ``ggn(vocab_chunk=...)``, ``mc_fisher`` and ``kfac`` accept it.

    Attributes:
        targets_key: key of the targets in ``batch`` (``None``: the head needs none, e.g.
            the likelihood of ``mc_fisher``).
        mask_key: key of a ``(*lead,)`` token-weight / padding mask in ``batch``, or ``None``.
    """

    targets_key: str | None
    mask_key: str | None = None

    # -- per-token pieces, overridden by concrete heads -----------------------------------
    def token_loss(self, outputs: jax.Array, targets: Any) -> jax.Array:
        """Unnormalised per-token losses ``l_t``.

        Args:
            outputs: ``(*lead, C)``.
            targets: ``batch[targets_key]`` (or ``None``).

        Returns:
            ``(*lead,)`` losses in the outputs' dtype.
        """
        raise NotImplementedError

    def token_hvp(self, outputs: jax.Array, targets: Any, u: jax.Array) -> jax.Array:
        """Per-token Hessian of ``l_t`` w.r.t. the outputs applied to ``u``.

        Args:
            outputs: ``(*lead, C)``.
            targets: ``batch[targets_key]`` (or ``None``).
            u: ``(*lead, C)`` output-space direction.

        Returns:
            ``(*lead, C)``, unweighted and unnormalised. Cost ``O(|outputs|)``.
        """
        raise NotImplementedError

    def token_sample_grad(self, outputs: jax.Array, key: jax.Array) -> jax.Array:
        """Gradient of ``l_t`` w.r.t. the outputs for targets sampled from the model.

        Args:
            outputs: ``(*lead, C)``.
            key: ``jax.random`` key.

        Returns:
            ``(*lead, C)`` whose outer product has expectation :meth:`token_hvp`'s matrix.
        """
        raise NotImplementedError

    def scale_per_token(self, num_classes: int) -> int:
        """Normaliser factor per unit of token weight (1; ``C`` for MSE).

        Args:
            num_classes: ``C``, the size of the outputs' last axis.

        Returns:
            The factor (1 here).
        """
        return 1

    def token_valid(self, outputs: jax.Array, targets: Any) -> jax.Array | None:
        """Whether each token's target is valid (e.g. an integer label in ``[0, C)``).

        Args:
            outputs: ``(*lead, C)``.
            targets: ``batch[targets_key]`` (or ``None``).

        Returns:
            ``(*lead,)`` booleans, or ``None`` when every target is valid (the default).
        """
        return None

    def check_targets(self, batch: PyTree, num_classes: int | Callable[[], int]) -> None:
        """Host check of the targets in ``batch`` (nothing to check in the base class).

        Args:
            batch: the batch (concrete or traced; traced targets are not checked).
            num_classes: ``C``, or a function returning it (called only when needed).
        """

    def target_factor(
        self, outputs: jax.Array, targets: Any, weights: jax.Array
    ) -> jax.Array | None:
        """Per-token factor: 1, or NaN for a weighted token with an invalid target.

        Multiplying the per-token loss (and Hessian products) by it leaves valid batches
        unchanged and makes an out-of-range label visible as NaN inside ``jit``.

        Args:
            outputs: ``(*lead, C)``.
            targets: the targets (or ``None``).
            weights: ``(*lead,)`` token weights (tokens of weight 0 are never flagged).

        Returns:
            ``(*lead,)`` factor in the outputs' dtype, or ``None`` (every target valid).
        """
        valid = self.token_valid(outputs, targets)
        if valid is None:
            return None
        ok = jnp.logical_or(valid, weights == 0)
        return jnp.where(ok, 1.0, jnp.nan).astype(outputs.dtype)

    # -- shared reductions ----------------------------------------------------------------
    def targets(self, batch: PyTree) -> Any:
        """``batch[targets_key]`` (``None`` when ``targets_key`` is ``None``).

        Args:
            batch: the batch.

        Returns:
            The targets, as stored in the batch.

        Raises:
            ValueError: the batch has no such key (the message lists the batch's keys).
        """
        if self.targets_key is None:
            return None
        try:
            return batch[self.targets_key]
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(
                f"{type(self).__name__} head expects batch[{self.targets_key!r}]; "
                f"the batch has {_keys(batch)}"
            ) from exc

    def weights(self, batch: PyTree, lead: tuple[int, ...], dtype: Any) -> jax.Array:
        """Token weights ``w_t``: ``batch[mask_key]`` cast to ``dtype``, or ones.

        Args:
            batch: the batch.
            lead: the outputs' leading shape ``(*lead,)``.
            dtype: dtype of the weights (the outputs').

        Returns:
            ``(*lead,)`` weights.

        Raises:
            ValueError: the batch has no ``mask_key`` entry, or the mask's shape is not
                ``lead``.
        """
        if self.mask_key is None:
            return jnp.ones(lead, dtype)
        try:
            mask = jnp.asarray(batch[self.mask_key])
        except (KeyError, TypeError, IndexError) as exc:
            raise ValueError(
                f"{type(self).__name__} head expects a token mask batch[{self.mask_key!r}] "
                f"(mask_key); the batch has {_keys(batch)}"
            ) from exc
        if mask.shape != tuple(lead):
            raise ValueError(
                f"mask batch[{self.mask_key!r}] has shape {mask.shape}, outputs have leading "
                f"shape {tuple(lead)}"
            )
        return mask.astype(dtype)

    def normalizer(self, weights: jax.Array, num_classes: int) -> jax.Array:
        """``Z = max(sum_t w_t, 1) * scale_per_token(C)`` (a scalar in the weights' dtype).

        Args:
            weights: ``(*lead,)`` token weights.
            num_classes: ``C``.

        Returns:
            The scalar normaliser ``Z``.
        """
        return jnp.maximum(weights.sum(), 1.0) * self.scale_per_token(num_classes)

    def __call__(self, outputs: jax.Array, batch: PyTree) -> jax.Array:
        """The loss ``sum_t w_t l_t / Z`` (a scalar in the outputs' dtype).

        Args:
            outputs: ``(*lead, C)`` model outputs.
            batch: the batch (targets, mask).

        Returns:
            The scalar loss.

        Raises:
            ValueError: outputs without a trailing class axis, missing / misshaped targets
                or mask.
        """
        lead = _lead_shape(outputs)
        w = self.weights(batch, lead, outputs.dtype)
        targets = self.targets(batch)
        losses = self.token_loss(outputs, targets)
        factor = self.target_factor(outputs, targets, w)
        if factor is not None:
            losses = losses * factor
        return (w * losses).sum() / self.normalizer(w, outputs.shape[-1])

    def hvp(self, outputs: jax.Array, batch: PyTree, u: jax.Array) -> jax.Array:
        """Hessian of ``head(., batch)`` at ``outputs`` applied to ``u`` (shape of outputs).

        Args:
            outputs: ``(*lead, C)`` model outputs.
            batch: the batch (targets, mask).
            u: ``(*lead, C)`` output-space direction.

        Returns:
            ``H u`` in ``u``'s dtype: the weighted, normalised :meth:`token_hvp`. Cost
            ``O(|outputs|)``.

        Raises:
            ValueError: as :meth:`__call__`.
        """
        lead = _lead_shape(outputs)
        w = self.weights(batch, lead, outputs.dtype)
        targets = self.targets(batch)
        hu = self.token_hvp(outputs, targets, u)
        factor = self.target_factor(outputs, targets, w)
        if factor is not None:
            hu = hu * factor[..., None]
        return (w[..., None] * hu / self.normalizer(w, outputs.shape[-1])).astype(u.dtype)


def _keys(batch: PyTree) -> str:
    if isinstance(batch, dict):
        return f"keys {sorted(map(str, batch))}"
    return f"type {type(batch).__name__}"


def _is_integer_labels(outputs: jax.Array, targets: jax.Array) -> bool:
    return jnp.issubdtype(jnp.result_type(targets), jnp.integer)


@dataclasses.dataclass(frozen=True)
class SoftmaxCrossEntropy(Head):
    """Softmax cross-entropy on logits ``(*lead, C)``."""

    def token_loss(self, outputs, targets):
        """Per-token cross-entropy ``-log p_label`` (or ``-sum_c y_c log p_c`` for soft targets).

        Args:
            outputs: ``(*lead, C)`` logits.
            targets: integer labels ``(*lead,)`` or one-hot / soft targets ``(*lead, C)``.

        Returns:
            ``(*lead,)`` losses.

        Raises:
            ValueError: targets of another shape.
        """
        logp = jax.nn.log_softmax(outputs, axis=-1)
        if _is_integer_labels(outputs, targets):
            if targets.shape != outputs.shape[:-1]:
                raise ValueError(
                    f"integer labels batch[{self.targets_key!r}] have shape {targets.shape}, "
                    f"expected {outputs.shape[:-1]} (the outputs' leading shape)"
                )
            # out-of-range labels read class 0 here; target_factor turns them into NaN
            safe = jnp.where(self.token_valid(outputs, targets), targets, 0)
            return -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
        if targets.shape != outputs.shape:
            raise ValueError(
                f"soft / one-hot targets batch[{self.targets_key!r}] (dtype "
                f"{jnp.result_type(targets)}) have shape {targets.shape}, expected "
                f"{outputs.shape}; integer class labels of shape {outputs.shape[:-1]} work too"
            )
        return -(targets * logp).sum(-1)

    def token_valid(self, outputs, targets):
        """Integer labels: ``0 <= label < C`` per token; soft targets / none: ``None``.

        Args:
            outputs: ``(*lead, C)`` logits.
            targets: the targets, or ``None``.

        Returns:
            ``(*lead,)`` booleans for integer labels, else ``None``.
        """
        if targets is None or not _is_integer_labels(outputs, targets):
            return None
        return (targets >= 0) & (targets < outputs.shape[-1])

    def check_targets(self, batch, num_classes):
        """Integer labels must lie in ``[0, C)`` where the token weight is non-zero.

        Args:
            batch: the batch; traced or soft targets are not checked.
            num_classes: ``C``, or a function returning it (called only for concrete integer
                labels).

        Raises:
            ValueError: a weighted label is negative or ``>= C`` (the message names
                ``batch[labels_key]``, the count and the first offending labels).
        """
        if self.targets_key is None:
            return
        labels = self.targets(batch)
        if is_traced(labels) or not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
            return
        labels = np.asarray(labels)
        if self.mask_key is not None:
            mask = batch[self.mask_key]
            if is_traced(mask):
                return
            mask = np.asarray(mask)
            if mask.shape == labels.shape:  # else the loss reports the mismatch
                labels = np.where(mask != 0, labels, 0)  # padding may carry any label
        c = num_classes() if callable(num_classes) else num_classes
        check_labels(labels, int(c), name=f"batch[{self.targets_key!r}]")

    def token_hvp(self, outputs, targets, u):
        """Per-token ``s (diag(p) - p p^T) u`` with ``s = sum_c y_c`` (1 for integer labels).

        Args:
            outputs: ``(*lead, C)`` logits.
            targets: the targets (only their sums are read, for soft targets), or ``None``.
            u: ``(*lead, C)`` output-space direction.

        Returns:
            ``(*lead, C)``. Cost ``O(|outputs|)``.
        """
        p = jax.nn.softmax(outputs, axis=-1)
        hu = p * u - p * (p * u).sum(-1, keepdims=True)
        if targets is not None and not _is_integer_labels(outputs, targets):
            hu = hu * targets.sum(-1, keepdims=True)
        return hu

    def token_sample_grad(self, outputs, key):
        """``p - e_y`` per token for labels ``y`` sampled from ``softmax(outputs)``.

        Args:
            outputs: ``(*lead, C)`` logits.
            key: ``jax.random`` key.

        Returns:
            ``(*lead, C)`` gradients of the sampled labels' losses w.r.t. the logits.
        """
        p = jax.nn.softmax(outputs, axis=-1)
        labels = jax.random.categorical(key, outputs, axis=-1)
        return p - jax.nn.one_hot(labels, outputs.shape[-1], dtype=outputs.dtype)


@dataclasses.dataclass(frozen=True)
class MeanSquaredError(Head):
    """Mean squared error over all output elements (``torch.nn.MSELoss`` convention)."""

    def token_loss(self, outputs, targets):
        """Per-token squared error ``sum_c (f_c - y_c)^2``.

        Args:
            outputs: ``(*lead, C)`` predictions.
            targets: ``(*lead, C)`` targets.

        Returns:
            ``(*lead,)`` losses.

        Raises:
            ValueError: targets of another shape.
        """
        if targets.shape != outputs.shape:
            raise ValueError(f"targets batch[{self.targets_key!r}] have shape {targets.shape}, "
                             f"outputs {outputs.shape}")
        return ((outputs - targets) ** 2).sum(-1)

    def token_hvp(self, outputs, targets, u):
        """Per-token Hessian ``2 I`` applied to ``u``.

        Args:
            outputs: ``(*lead, C)`` predictions (unused: the Hessian is constant).
            targets: the targets (unused).
            u: ``(*lead, C)`` output-space direction.

        Returns:
            ``2 u``.
        """
        return 2.0 * u

    def token_sample_grad(self, outputs, key):
        """``-sqrt(2) eps`` per output, ``eps ~ N(0, 1)``: the gradient for ``y ~ N(f, 1/2)``.

        Args:
            outputs: ``(*lead, C)`` predictions.
            key: ``jax.random`` key.

        Returns:
            ``(*lead, C)`` in the outputs' dtype.
        """
        # y ~ N(f, 1/2) is the likelihood whose NLL is (f - y)^2 + const; grad = -sqrt(2) eps.
        eps = jax.random.normal(key, outputs.shape, outputs.dtype)
        return -jnp.sqrt(2.0).astype(outputs.dtype) * eps

    def scale_per_token(self, num_classes: int) -> int:
        """``C``: the mean runs over all output elements (``torch.nn.MSELoss``).

        Args:
            num_classes: ``C``, the number of output features.

        Returns:
            ``num_classes``.
        """
        return num_classes


def softmax_cross_entropy(
    labels_key: str | None = "labels", mask_key: str | None = None
) -> SoftmaxCrossEntropy:
    """Softmax cross-entropy head reading ``batch[labels_key]`` (and an optional mask).

    Args:
        labels_key: key of the integer labels ``(*lead,)`` or soft targets ``(*lead, C)``
            (``None``: no targets, e.g. for ``mc_fisher``).
        mask_key: key of a ``(*lead,)`` token-weight mask, or ``None``.

    Returns:
        A :class:`SoftmaxCrossEntropy` head.
    """
    return SoftmaxCrossEntropy(labels_key, mask_key)


def mse(targets_key: str | None = "targets", mask_key: str | None = None) -> MeanSquaredError:
    """Mean-squared-error head reading ``batch[targets_key]`` (and an optional mask).

    Args:
        targets_key: key of the ``(*lead, C)`` targets (``None``: no targets).
        mask_key: key of a ``(*lead,)`` token-weight mask, or ``None``.

    Returns:
        A :class:`MeanSquaredError` head.
    """
    return MeanSquaredError(targets_key, mask_key)


@dataclasses.dataclass(frozen=True)
class _ComposedLoss:
    """``loss_fn(params, batch) = head(model_fn(params, batch), batch)`` (hashable)."""

    model_fn: Callable
    head: Callable

    def __call__(self, params: PyTree, batch: PyTree) -> jax.Array:
        return self.head(self.model_fn(params, batch), batch)


def compose(
    model_fn: Callable[[PyTree, PyTree], jax.Array],
    head: Callable[[jax.Array, PyTree], jax.Array],
) -> Callable[[PyTree, PyTree], jax.Array]:
    """The loss ``loss_fn(params, batch) = head(model_fn(params, batch), batch)``.

    The result is a frozen dataclass that compares (and hashes) equal for equal
    ``(model_fn, head)``, so operators and jitted functions built from two calls of
    ``compose`` share compiled programs.

    Args:
        model_fn: ``model_fn(params, batch) -> outputs`` of shape ``(*lead, C)``.
        head: a :class:`Head` or any ``head(outputs, batch) -> scalar``.

    Returns:
        ``loss_fn(params, batch) -> scalar``, usable by ``hessian``, ``empirical_fisher``
        and the analyses.

    Example:
        >>> import jax.numpy as jnp
        >>> from gradience_jax.operators.heads import compose, mse
        >>> loss_fn = compose(lambda p, b: b["inputs"] * p, mse())
        >>> float(loss_fn(2.0, {"inputs": jnp.ones((3, 1)), "targets": jnp.zeros((3, 1))}))
        4.0
    """
    return _ComposedLoss(model_fn, head)


def check_targets(
    head: Any, model_fn: Callable | None, params: PyTree, batch: PyTree
) -> None:
    """Host check of a built-in head's targets at ``(params, batch)`` (labels in range).

    ``C`` is read from ``jax.eval_shape(model_fn, params, batch)`` only when the head has
    concrete integer labels to check. Other heads, and traced batches, are not checked.

    Args:
        head: the head (only :class:`Head` instances are checked).
        model_fn: ``model_fn(params, batch) -> (*lead, C)`` outputs.
        params: the parameters.
        batch: the batch.

    Raises:
        ValueError: an integer label out of ``[0, C)`` on a token of non-zero weight.
    """
    if not isinstance(head, Head) or model_fn is None:
        return
    head.check_targets(batch, lambda: jax.eval_shape(model_fn, params, batch).shape[-1])


def check_loss_targets(loss_fn: Callable, params: PyTree, batch: PyTree) -> None:
    """:func:`check_targets` for a ``loss_fn`` made by :func:`compose` (others: nothing).

    Args:
        loss_fn: a loss; when it is ``compose(model_fn, head)`` its head's targets are checked.
        params: the parameters.
        batch: the batch.

    Raises:
        ValueError: as :func:`check_targets`.
    """
    if isinstance(loss_fn, _ComposedLoss):
        check_targets(loss_fn.head, loss_fn.model_fn, params, batch)


def output_hvp(head: Any, outputs: jax.Array, batch: PyTree, u: jax.Array) -> jax.Array:
    """Head Hessian-vector product: analytic for built-ins, jvp-of-grad for user heads.

    Args:
        head: a head; its ``hvp`` method is used when it has one.
        outputs: ``(*lead, C)`` outputs at which the Hessian is taken.
        batch: the batch (targets, mask).
        u: output-space direction shaped like ``outputs``.

    Returns:
        ``H_head u`` shaped like ``u``.
    """
    if hasattr(head, "hvp"):
        return head.hvp(outputs, batch, u)
    grad = jax.grad(lambda o: head(o, batch))
    return jax.jvp(grad, (outputs,), (u,))[1]


def likelihood_head(likelihood: str, mask_key: str | None = None) -> Head:
    """The head whose Fisher ``mc_fisher`` samples.

    Args:
        likelihood: ``"categorical"`` (softmax cross-entropy) or ``"gaussian"`` (MSE).
        mask_key: optional token-mask key.

    Returns:
        A :class:`Head` without targets.

    Raises:
        ValueError: unknown ``likelihood``.
    """
    check_choice(likelihood, "likelihood", LIKELIHOODS)
    if likelihood == "categorical":
        return SoftmaxCrossEntropy(None, mask_key)
    return MeanSquaredError(None, mask_key)


#: Deprecated alias of :class:`Head` (the base class was private before).
_Head = Head

__all__ = [
    "LIKELIHOODS",
    "Head",
    "MeanSquaredError",
    "SoftmaxCrossEntropy",
    "compose",
    "check_loss_targets",
    "check_targets",
    "likelihood_head",
    "mse",
    "output_hvp",
    "softmax_cross_entropy",
]
