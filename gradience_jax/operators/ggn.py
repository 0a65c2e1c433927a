"""The generalised Gauss-Newton matrix ``G = J^T H_head J`` (Schraudolph 2002).

``J`` is the Jacobian of ``model_fn`` w.r.t. params and ``H_head`` the Hessian of the loss
head w.r.t. the outputs. A matvec is ``jvp`` (``J v``) -> analytic head Hessian -> ``vjp``
(``J^T u``); no Jacobian and no ``(B*T, V, V)`` tensor is ever formed, only tensors shaped
like the logits the forward pass makes anyway.

With ``vocab_chunk`` the model must be a :class:`SplitModel` (``features`` up to the last
hidden state ``(*lead, D)`` and a per-token ``readout`` to ``(*lead, V)``, e.g. a language
model's output projection). Then the readout and the head run over chunks of
``vocab_chunk`` tokens in a ``lax.scan``, so the ``(tokens, V)`` temporaries are bounded by
``(vocab_chunk, V)`` whatever ``B * T`` is. Supported shapes: any model whose outputs are a
position-wise function of its last hidden state (Dense / DenseGeneral readout, tied or untied
embeddings); the head must be a built-in head (per-token Hessian).

Supported names (the module has no ``__all__``): ``ggn``, ``SplitModel``. ``_composed_loss``
is a deprecated alias of :func:`gradience_jax.operators.heads.compose`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from gradience_jax import tree as tu
from gradience_jax._validate import (
    check_batch,
    check_int,
    check_loss_at_point,
    check_params,
    check_scalar_fn,
)
from gradience_jax.operators._common import check_callable, jtmj_matvec, resolve_linearize
from gradience_jax.operators.base import LinearOperator
from gradience_jax.operators.heads import Head, check_targets, compose, output_hvp

PyTree = Any


@dataclasses.dataclass(frozen=True)
class SplitModel:
    """``model_fn(params, batch) = readout(params, features(params, batch))``.

    Attributes:
        features: ``(params, batch) -> hidden`` of shape ``(*lead, D)``.
        readout: ``(params, hidden) -> outputs`` of shape ``(*lead, V)``, position-wise.
    """

    features: Callable[[PyTree, PyTree], jax.Array]
    readout: Callable[[PyTree, jax.Array], jax.Array]

    def __call__(self, params: PyTree, batch: PyTree) -> jax.Array:
        """The model's outputs ``readout(params, features(params, batch))``.

        Args:
            params: parameter pytree.
            batch: the batch.

        Returns:
            ``(*lead, V)`` outputs.
        """
        return self.readout(params, self.features(params, batch))


@dataclasses.dataclass(frozen=True)
class _GGNPrepare:
    model_fn: Callable
    head: Any
    linearize: bool

    def __call__(self, operands):
        params, batch = operands
        fn = lambda p: self.model_fn(p, batch)  # noqa: E731
        out_map = lambda out: (lambda u: output_hvp(self.head, out, batch, u))  # noqa: E731
        return jtmj_matvec(fn, params, out_map, self.linearize)


def _pad_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """``(n, ...) -> (ceil(n / chunk), chunk, ...)`` with zero padding."""
    n = x.shape[0]
    pad = (-n) % chunk
    x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((-1, chunk) + x.shape[1:])


@dataclasses.dataclass(frozen=True)
class _ChunkedGGNPrepare:
    model: SplitModel
    head: Head
    chunk: int
    linearize: bool

    def __call__(self, operands):
        params, batch = operands
        model, head, chunk = self.model, self.head, self.chunk
        feat = lambda p: model.features(p, batch)  # noqa: E731
        if self.linearize:
            hidden, feat_jvp = jax.linearize(feat, params)
            feat_vjp = jax.linear_transpose(feat_jvp, params)
        else:
            hidden = feat(params)
            feat_jvp = lambda v: jax.jvp(feat, (params,), (v,))[1]  # noqa: E731
            feat_vjp = lambda g: jax.vjp(feat, params)[1](g)  # noqa: E731
        lead, d = hidden.shape[:-1], hidden.shape[-1]
        n = math.prod(lead)
        targets = head.targets(batch)
        weights = head.weights(batch, lead, hidden.dtype).reshape(n)
        num_classes = jax.eval_shape(model.readout, params, hidden[..., :1, :]).shape[-1]
        norm = head.normalizer(weights, num_classes)
        h_chunks = _pad_chunks(hidden.reshape(n, d), chunk)
        w_chunks = _pad_chunks(weights, chunk)
        t_chunks = None
        if targets is not None:
            t_chunks = _pad_chunks(targets.reshape((n,) + targets.shape[len(lead):]), chunk)

        def matvec(v):
            hdot = feat_jvp(v)
            hdot_chunks = _pad_chunks(hdot.reshape(n, d), chunk)

            def step(acc, xs):
                h_c, hd_c, w_c, t_c = xs
                logits, ldot = jax.jvp(model.readout, (params, h_c), (v, hd_c))
                u = head.token_hvp(logits, t_c, ldot) * (w_c / norm)[:, None]
                factor = head.target_factor(logits, t_c, w_c)
                if factor is not None:  # NaN for an out-of-range label (traced batches)
                    u = u * factor[:, None]
                _, vjp = jax.vjp(model.readout, params, h_c)
                g_params, g_hidden = vjp(u.astype(logits.dtype))
                return tu.add(acc, g_params), g_hidden

            acc, g_hidden = jax.lax.scan(
                step, tu.zeros_like(v), (h_chunks, hdot_chunks, w_chunks, t_chunks)
            )
            g_hidden = g_hidden.reshape(-1, d)[:n].reshape(hidden.shape)
            return tu.add(acc, feat_vjp(g_hidden.astype(hidden.dtype))[0])

        return matvec


def ggn(
    model_fn: Callable[[PyTree, PyTree], jax.Array],
    head: Callable[[jax.Array, PyTree], jax.Array],
    params: PyTree,
    batch: PyTree,
    vocab_chunk: int | None = None,
    *,
    linearize: bool | str = "auto",
    check: bool = True,
) -> LinearOperator:
    """The GGN ``G = J^T H_head J`` of ``loss = head(model_fn(params, batch), batch)``.

    Matvec cost: one forward-mode and one reverse-mode pass through ``model_fn`` plus the
    head's analytic Hessian (softmax CE: ``p*u - p*sum(p*u)`` per token). For softmax
    cross-entropy ``G`` equals the true Fisher information. With ``vocab_chunk`` the
    readout's temporaries are ``(vocab_chunk, V)`` instead of ``(tokens, V)``.

    Args:
        model_fn: ``model_fn(params, batch) -> outputs`` of shape ``(*lead, C)``.
        head: a head from :mod:`gradience_jax.heads`, or any ``head(outputs, batch) ->
            scalar`` (its Hessian is then taken by jvp-of-grad in output space).
        params: parameter pytree.
        batch: pytree with a shared leading batch axis.
        vocab_chunk: tokens per chunk for the readout + head (needs a :class:`SplitModel`
            and a built-in head); ``None`` processes all tokens at once.
        linearize: ``True``, ``False`` or ``"auto"`` (see :func:`gradience_jax.hessian`).
        check: evaluate the loss and its gradient once and raise on non-finite values.

    Returns:
        A symmetric PSD :class:`LinearOperator` named ``"ggn"`` (PSD whenever the head is
        convex: a built-in head, or one with ``is_convex = True``).

    Raises:
        ValueError: non-scalar loss, inconsistent batch axes, a bad ``linearize``, integer
            labels out of ``[0, C)`` (built-in heads, concrete batches); with
            ``vocab_chunk``: a ``model_fn`` that is not a :class:`SplitModel`, a head that is
            not built in, or ``vocab_chunk < 1``.
        TypeError: integer / non-array parameter leaves, non-float loss, a ``model_fn`` /
            ``head`` that is not callable, a ``vocab_chunk`` that is not an integer
            (``ArgumentTypeError``).
        FloatingPointError: non-finite loss or gradient at the point (``check=True``).

    References:
        N. Schraudolph (2002), "Fast Curvature Matrix-Vector Products for Second-Order
        Gradient Descent".
    """
    check_callable(model_fn, "model_fn")
    check_callable(head, "head")
    check_params(params)
    check_batch(batch)
    if vocab_chunk is not None:
        vocab_chunk = check_int(vocab_chunk, "vocab_chunk")
    loss_fn = compose(model_fn, head)
    check_scalar_fn(loss_fn, (params, batch), "head(model_fn(params, batch), batch)")
    check_targets(head, model_fn, params, batch)
    if check:
        check_loss_at_point(loss_fn, params, batch, "the loss head(model_fn(params, batch))")
    is_psd = isinstance(head, Head) or bool(getattr(head, "is_convex", False))
    if vocab_chunk is None:
        lin = resolve_linearize(linearize, lambda p: model_fn(p, batch), params)
        prep = _GGNPrepare(model_fn, head, lin)
        return LinearOperator(prep, (params, batch), params, is_psd=is_psd, name="ggn")
    if not isinstance(model_fn, SplitModel):
        raise ValueError(
            "vocab_chunk needs model_fn to be a gradience_jax.SplitModel(features, readout) "
            f"so the readout can run chunk by chunk; got {type(model_fn).__name__}"
        )
    if not isinstance(head, Head):
        raise ValueError("vocab_chunk needs a built-in head (gj.heads.softmax_cross_entropy / mse)")
    lin = resolve_linearize(linearize, lambda p: model_fn.features(p, batch), params)
    prep = _ChunkedGGNPrepare(model_fn, head, vocab_chunk, lin)
    return LinearOperator(prep, (params, batch), params, is_psd=True, name="ggn")


#: Deprecated alias of :func:`gradience_jax.operators.heads.compose` (its old private home).
_composed_loss = compose
