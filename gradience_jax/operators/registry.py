"""The one vocabulary of curvature operators: ``build(name, ...)`` and ``names()``.

Every caller that picks an operator by name (``compute_spectrum(operator=...)``, the report,
the command line) builds it here, so the names, their aliases and their requirements are
defined once.

Names (canonical, as returned by :func:`names`) and what each needs:

- ``"hessian"``: :func:`~gradience_jax.operators.hessian.hessian`; ``loss_fn`` (or
  ``model_fn`` and ``head``, composed as ``head(model_fn(params, batch), batch)``).
- ``"ggn"``: :func:`~gradience_jax.operators.ggn.ggn`; ``model_fn`` and ``head``.
- ``"empirical_fisher"``: :func:`~gradience_jax.operators.fisher.empirical_fisher`;
  ``loss_fn`` (or ``model_fn`` and ``head``).
- ``"mc_fisher"``: :func:`~gradience_jax.operators.fisher.mc_fisher`; ``model_fn`` and
  ``key``.
- ``"kfac"``: :func:`~gradience_jax.operators.kfac.kfac`; ``model_fn`` and ``head``.

Aliases (:data:`ALIASES`): ``"ef"`` -> ``"empirical_fisher"``. The alias exists because the
report, the command line and older notebooks use it; the operator it builds is named
``"empirical_fisher"`` like the canonical one, and :func:`names` lists canonical names only.

``mc_fisher`` takes ``head`` optionally: a built-in :class:`~gradience_jax.operators.heads.Head`
whose likelihood is sampled (it overrides the ``likelihood`` option; its targets are not
read). ``kfac`` uses ``key`` for ``fisher_type="mc"``. Deterministic operators ignore ``key``,
so one call site can pass the same arguments for every name.

Supported names (the ``__all__`` list): :func:`build`, :func:`names`, :func:`canonical_name`,
:func:`options`, :data:`ALIASES`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from gradience_jax._validate import check_key
from gradience_jax.operators.base import LinearOperator
from gradience_jax.operators.fisher import empirical_fisher, mc_fisher
from gradience_jax.operators.ggn import ggn
from gradience_jax.operators.heads import Head, compose
from gradience_jax.operators.hessian import hessian
from gradience_jax.operators.kfac import kfac

PyTree = Any

#: Alternative spellings accepted by :func:`build` -> their canonical names.
ALIASES: dict[str, str] = {"ef": "empirical_fisher"}


class _Entry(NamedTuple):
    factory: Callable[..., LinearOperator]
    needs: tuple[str, ...]  # "loss" (loss_fn, or model_fn + head), "model_fn", "head", "key"
    core: tuple[str, ...]  # the factory's arguments that build() fills itself


_LOSS_CORE = ("loss_fn", "params", "batch")
_MODEL_CORE = ("model_fn", "head", "params", "batch")

_TABLE: dict[str, _Entry] = {
    "hessian": _Entry(hessian, ("loss",), _LOSS_CORE),
    "ggn": _Entry(ggn, ("model_fn", "head"), _MODEL_CORE),
    "empirical_fisher": _Entry(empirical_fisher, ("loss",), _LOSS_CORE),
    "mc_fisher": _Entry(mc_fisher, ("model_fn", "key"), _MODEL_CORE + ("key",)),
    "kfac": _Entry(kfac, ("model_fn", "head"), _MODEL_CORE + ("key",)),
}


def names() -> tuple[str, ...]:
    """The canonical operator names :func:`build` accepts (aliases excluded).

    Returns:
        ``("hessian", "ggn", "empirical_fisher", "mc_fisher", "kfac")``.
    """
    return tuple(_TABLE)


def canonical_name(name: str) -> str:
    """The canonical name of ``name`` (an alias is resolved, e.g. ``"ef"``).

    Args:
        name: an operator name or alias.

    Returns:
        A member of :func:`names`.

    Raises:
        ValueError: unknown name (the message lists the names and aliases).
    """
    if isinstance(name, str):
        name = ALIASES.get(name, name)
        if name in _TABLE:
            return name
    raise ValueError(
        f"name must be one of {names()} (aliases: {ALIASES}), got {name!r}"
    )


def options(name: str) -> tuple[str, ...]:
    """The keyword options ``build(name, ...)`` forwards to the operator's factory.

    Args:
        name: an operator name or alias.

    Returns:
        The option names, e.g. ``("vocab_chunk", "linearize", "check")`` for ``"ggn"``.

    Raises:
        ValueError: unknown name.
    """
    entry = _TABLE[canonical_name(name)]
    params = inspect.signature(entry.factory).parameters
    return tuple(p for p in params if p not in entry.core)


def build(
    name: str,
    *,
    loss_fn: Callable[[PyTree, PyTree], jax.Array] | None = None,
    model_fn: Callable[[PyTree, PyTree], jax.Array] | None = None,
    head: Callable[[jax.Array, PyTree], jax.Array] | None = None,
    params: PyTree,
    batch: PyTree,
    key: jax.Array | None = None,
    **opts: Any,
) -> LinearOperator:
    """The curvature operator called ``name`` at ``(params, batch)``.

    Construction cost is the factory's (checks: one loss and gradient evaluation;
    ``"empirical_fisher"`` in cached mode: the per-example gradients; ``"kfac"``: the
    factors and their eigendecompositions). See the module docstring for the names.

    Args:
        name: a member of :func:`names` or an alias (``"ef"``).
        loss_fn: ``loss_fn(params, batch) -> scalar`` (``"hessian"``,
            ``"empirical_fisher"``); when ``None`` these compose ``model_fn`` and ``head``.
        model_fn: ``model_fn(params, batch) -> outputs (*lead, C)`` (``"ggn"``,
            ``"mc_fisher"``, ``"kfac"``).
        head: ``head(outputs, batch) -> scalar`` (``"ggn"``, ``"kfac"``; optional built-in
            head for ``"mc_fisher"``).
        params: parameter pytree.
        batch: pytree with a shared leading batch axis.
        key: ``jax.random`` key (``"mc_fisher"``; ``"kfac"`` with ``fisher_type="mc"``);
            ignored by deterministic operators.
        **opts: the factory's keyword options (:func:`options`), e.g. ``linearize``,
            ``vocab_chunk``, ``mode``, ``num_samples``, ``fisher_type``.

    Returns:
        The :class:`LinearOperator` (a ``KFACOperator`` for ``"kfac"``).

    Raises:
        ValueError: unknown ``name``, a missing ``loss_fn`` / ``model_fn`` / ``head`` /
            ``key`` (the message names it), a batch of keys, or an option the factory does
            not take (the message lists the valid ones). The factory's own errors pass
            through.
        TypeError: a ``key`` that is not a PRNG key (e.g. the int ``42``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from gradience_jax.operators.registry import build
        >>> loss_fn = lambda p, b: jnp.mean((b["x"] @ p) ** 2)
        >>> op = build("hessian", loss_fn=loss_fn, params=jnp.ones(2),
        ...            batch={"x": jnp.eye(2)})
        >>> op.name, op.n_params
        ('hessian', 2)
    """
    canon = canonical_name(name)
    entry = _TABLE[canon]
    valid = options(canon)
    bad = sorted(set(opts) - set(valid))
    if bad:
        raise ValueError(f"build({name!r}) got unknown option(s) {bad}; valid options: {valid}")
    if "loss" in entry.needs and loss_fn is None:
        if model_fn is None or head is None:
            raise ValueError(
                f"build({name!r}) needs loss_fn (or model_fn and head, composed as "
                "head(model_fn(params, batch), batch))"
            )
        loss_fn = compose(model_fn, head)
    missing = [
        arg for arg, value in (("model_fn", model_fn), ("head", head), ("key", key))
        if arg in entry.needs and value is None
    ]
    if missing:
        why = {
            "model_fn": "model_fn and head (loss = head(model_fn(params, batch), batch))",
            "head": "model_fn and head (loss = head(model_fn(params, batch), batch))",
            "key": "key (a jax.random key: it samples labels)",
        }
        needs = "; ".join(dict.fromkeys(why[m] for m in missing))
        raise ValueError(f"build({name!r}) needs {needs}; missing: {', '.join(missing)}")
    if key is not None:
        key = check_key(key, "key")  # also for operators that ignore it: a typo is a bug
    if canon in ("hessian", "empirical_fisher"):
        return entry.factory(loss_fn, params, batch, **opts)
    if canon == "ggn":
        return ggn(model_fn, head, params, batch, **opts)
    if canon == "mc_fisher":
        if head is not None and not isinstance(head, Head):
            raise ValueError(
                "build('mc_fisher') takes head=None or a built-in head "
                f"(gj.heads.softmax_cross_entropy / mse) whose likelihood it samples; got "
                f"{type(head).__name__}"
            )
        if head is not None:
            opts = dict(opts, head=head)
        return mc_fisher(model_fn, params, batch, key, **opts)
    return kfac(model_fn, head, params, batch, key=key, **opts)


__all__ = ["ALIASES", "build", "canonical_name", "names", "options"]
