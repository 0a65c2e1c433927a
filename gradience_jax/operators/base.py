"""Matrix-free linear operators on parameter pytrees.

A :class:`LinearOperator` is a pytree: its *operands* (params, batch, keys, matrices, ...)
are the children and its *prepare* function, vector template, PSD flag and name are static
aux data. So an operator can be passed as an argument to ``jax.jit`` (large arrays are never
baked into the program as constants) and the compiled program is reused for new params of
the same shapes.

``prepare(operands)`` runs inside a trace and returns the matvec closure; linearising
operators do their one-off work there (``jax.linearize``), so algorithms that apply the
operator many times in one compiled program (Lanczos, SLQ, CG) call :meth:`LinearOperator.bind`
once and reuse the closure.

Supported names: ``LinearOperator``, ``add``, ``apply``, ``damped``, ``from_dense``,
``from_matvec``, ``identity``, ``scale`` (the ``__all__`` list), and ``Matvec`` /
``DEFAULT_MAX_DENSE_PARAMS``, ``check_operator``. ``_apply`` is the old private name of
``apply``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax import tree as tu
from gradience_jax._validate import (
    ArgumentTypeError,
    check_int,
    check_like,
    check_params,
    check_real,
    is_traced,
)

PyTree = Any
Matvec = Callable[[PyTree], PyTree]

DEFAULT_MAX_DENSE_PARAMS = 5000


def _spec_of(like: PyTree) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(like)
    return treedef, tuple((tuple(np.shape(x)), jnp.dtype(jnp.result_type(x))) for x in leaves)


def _like_of(spec: tuple) -> PyTree:
    treedef, leaves = spec
    return jax.tree_util.tree_unflatten(
        treedef, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in leaves]
    )


@jax.tree_util.register_pytree_node_class
class LinearOperator:
    """A symmetric linear map on parameter pytrees, applied matrix-free.

    Attributes:
        operands: the arrays the map depends on (a pytree; traced under ``jit``).
        prepare: static, hashable ``prepare(operands) -> matvec``.
        params_like: pytree of ``jax.ShapeDtypeStruct``: the vectors' structure.
        is_psd: whether the operator is positive semi-definite by construction.
        name: a short label (``"hessian"``, ``"ggn"``, ...).

    ``op @ v`` / ``op.matvec(v)`` applies the operator (jitted, compiled once per
    operator kind and shapes). Operators add, subtract and scale: ``op1 + op2``, ``2.0 * op``.
    """

    def __init__(
        self,
        prepare: Callable[[PyTree], Matvec],
        operands: PyTree,
        params_like: PyTree,
        *,
        is_psd: bool = False,
        name: str = "operator",
        _spec: tuple | None = None,
    ):
        self.prepare = prepare
        self.operands = operands
        self._spec = _spec if _spec is not None else _spec_of(params_like)
        self.is_psd = bool(is_psd)
        self.name = str(name)

    # -- pytree protocol ------------------------------------------------------------------
    def tree_flatten(self):
        """Pytree protocol: the operands are the children, the rest is static aux data.

        Returns:
            ``((operands,), (prepare, spec, is_psd, name))``.
        """
        return (self.operands,), (self.prepare, self._spec, self.is_psd, self.name)

    @classmethod
    def tree_unflatten(cls, aux, children):
        """Pytree protocol: rebuild the operator from :meth:`tree_flatten`'s output.

        Args:
            aux: ``(prepare, spec, is_psd, name)``.
            children: ``(operands,)``.

        Returns:
            A :class:`LinearOperator` (or the subclass) with these operands.
        """
        prepare, spec, is_psd, name = aux
        return cls(prepare, children[0], None, is_psd=is_psd, name=name, _spec=spec)

    # -- shape information ----------------------------------------------------------------
    @property
    def params_like(self) -> PyTree:
        """The vectors' template: a pytree of ``jax.ShapeDtypeStruct``."""
        return _like_of(self._spec)

    @property
    def n_params(self) -> int:
        """Dimension of the operator (number of scalar parameters)."""
        return int(sum(int(np.prod(shape)) for shape, _ in self._spec[1]))

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_params, n_params)``, the shape of the dense matrix."""
        return (self.n_params, self.n_params)

    @property
    def dtype(self) -> jnp.dtype:
        """Common dtype of the vectors' leaves."""
        return tu.promote_dtypes(*[dtype for _, dtype in self._spec[1]])

    # -- application ----------------------------------------------------------------------
    def bind(self) -> Matvec:
        """The matvec closure; call inside a trace and reuse it for many products."""
        return self.prepare(self.operands)

    def linearized(self) -> LinearOperator:
        """The same operator with its point-dependent work done once, now.

        ``jax.linearize`` of the matvec at ``v = 0`` partially evaluates it: everything that
        does not depend on ``v`` (the forward pass, the gradient, a GGN's Jacobian
        linearisation) runs once and is stored as residuals, the operands of the returned
        operator (a ``jax.tree_util.Partial``, so it passes through ``jit``); each later
        product pays only the tangent work. Use it when you apply the operator many times
        from your own loop (scipy ARPACK, CG, a custom solver); algorithms of this package
        already bind an operator once per compiled program. Memory: the residuals (about a
        forward pass's activations plus a few parameter-sized vectors).

        Linearising the operator for new params of the same shapes reuses the compiled
        programs.

        Returns:
            A :class:`LinearOperator` with the same ``params_like``, ``is_psd`` and ``name``.
        """
        return LinearOperator(_linearized_prepare, _linearize(self), self.params_like,
                              is_psd=self.is_psd, name=self.name, _spec=self._spec)

    def matvec(self, v: PyTree) -> PyTree:
        """``A v`` for a pytree ``v`` shaped like ``params_like``.

        Args:
            v: a vector like ``params_like`` (checked unless traced).

        Returns:
            ``A v``, a pytree like ``v``. Cost: one product (jitted, compiled once per
            operator kind and shapes).

        Raises:
            ValueError: ``v`` has another structure or leaf shapes.
            TypeError: ``v`` has other leaf dtypes.
        """
        if not is_traced(v):
            check_like(v, self.params_like, "v", f"the {self.name} operator's params")
        return apply(self, v)

    def __matmul__(self, v: PyTree) -> PyTree:
        return self.matvec(v)

    def __call__(self, v: PyTree) -> PyTree:
        """``A v``, the same as :meth:`matvec`.

        Args:
            v: a vector like ``params_like``.

        Returns:
            ``A v``, a pytree like ``v``.
        """
        return self.matvec(v)

    def __add__(self, other: LinearOperator) -> LinearOperator:
        return add(self, other)

    def __sub__(self, other: LinearOperator) -> LinearOperator:
        return add(self, scale(other, -1.0))

    def __mul__(self, alpha: Any) -> LinearOperator:
        return scale(self, alpha)

    __rmul__ = __mul__

    def __neg__(self) -> LinearOperator:
        return scale(self, -1.0)

    def __repr__(self) -> str:
        return (
            f"LinearOperator(name={self.name!r}, n_params={self.n_params}, "
            f"is_psd={self.is_psd}, dtype={self.dtype})"
        )

    def to_dense(self, max_params: int = DEFAULT_MAX_DENSE_PARAMS) -> jax.Array:
        """The dense ``(n, n)`` matrix in ``tree.ravel`` order (tests and small models only).

        Args:
            max_params: the largest ``n`` allowed.

        Returns:
            ``(n, n)`` array in the promoted dtype of the leaves. Cost: ``n`` products
            (vectorised), ``n^2`` memory.

        Raises:
            ValueError: if ``n_params > max_params`` (the matrix would need
                ``n^2`` entries; raise ``max_params`` explicitly if you mean it).
            ArgumentTypeError: ``max_params`` is not an integer.
        """
        max_params = check_int(max_params, "max_params", lo=0)
        n = self.n_params
        if n > max_params:
            raise ValueError(
                f"to_dense() refuses an operator with n_params={n} > max_params={max_params}: "
                f"the dense matrix would hold {n * n:,} entries. Pass max_params={n} to force it."
            )
        return _to_dense(self)


def check_operator(op: Any, name: str = "op") -> LinearOperator:
    """``op`` must be a :class:`LinearOperator` (the one check every algorithm uses).

    Args:
        op: the value to check.
        name: the argument's name, for the error message.

    Returns:
        ``op``.

    Raises:
        ArgumentTypeError: ``op`` is not a ``LinearOperator`` (a ``TypeError`` that is also a
            ``ValueError``).
    """
    if not isinstance(op, LinearOperator):
        hint = ""
        if hasattr(op, "shape") and len(getattr(op, "shape", ())) == 2:
            hint = " (wrap a dense matrix with gj.from_dense(matrix))"
        elif callable(op):
            hint = " (wrap a matvec with gj.from_matvec(fn, params_like))"
        raise ArgumentTypeError(
            f"{name} must be a gradience_jax.LinearOperator, got {type(op).__name__}{hint}")
    return op


@jax.jit
def apply(op: LinearOperator, v: PyTree) -> PyTree:
    """``op @ v`` as one jitted program without the argument checks (benchmarks, loops).

    Args:
        op: the operator (a pytree: new params of the same shapes reuse the program).
        v: a vector like ``op.params_like``.

    Returns:
        ``A v``, a pytree like ``v``. Cost: one product.
    """
    return op.bind()(v)


_apply = apply  # the old private name


@jax.jit
def _linearize(op: LinearOperator) -> jax.tree_util.Partial:
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), op.params_like)
    return jax.linearize(op.bind(), zeros)[1]


def _linearized_prepare(tangent_map: jax.tree_util.Partial) -> Matvec:
    """``prepare`` of :meth:`LinearOperator.linearized`: the stored linear map itself."""
    return tangent_map


@jax.jit
def _to_dense(op: LinearOperator) -> jax.Array:
    like = op.params_like
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), like)
    flat0 = tu.ravel(zeros)
    basis = jnp.eye(flat0.size, dtype=flat0.dtype)
    mv = op.bind()
    cols = jax.vmap(lambda e: tu.ravel(mv(tu.unravel_like(e, like))))(basis)
    return cols.T


# -- constructors ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _DensePrepare:
    def __call__(self, matrix: jax.Array) -> Matvec:
        def matvec(v):
            dt = tu.promote_dtypes(matrix, v)
            return (jnp.asarray(matrix, dt) @ jnp.asarray(v, dt)).astype(v.dtype)

        return matvec


def from_dense(matrix: Any, *, is_psd: bool | None = None, name: str = "dense") -> LinearOperator:
    """A ``LinearOperator`` on 1-D vectors from a symmetric ``(n, n)`` matrix.

    Args:
        matrix: symmetric ``(n, n)`` array (an operand: new values reuse the program).
        is_psd: PSD flag; ``None`` decides by the smallest eigenvalue (eager matrices only:
            one float64 ``eigvalsh`` on the host, ``O(n^3)``; eigenvalues down to
            ``-max(1e-12, 10 n eps) * max(1, |lambda_max|)`` count as zero, ``eps`` of the
            matrix's dtype).
        name: the operator's label.

    Returns:
        A :class:`LinearOperator` on ``(n,)`` vectors; a product costs ``O(n^2)``.

    Raises:
        ArgumentTypeError: ``matrix`` is not a floating-point array.
        ValueError: ``matrix`` is not square 2-D, is traced while ``is_psd`` is ``None``, or
            holds NaN or Inf (eager matrices only).
    """
    dtype = getattr(matrix, "dtype", None)
    if dtype is None:
        dtype = np.asarray(matrix).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ArgumentTypeError(f"matrix must be a floating-point array, got dtype {dtype}")
    matrix = jnp.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be square 2-D, got shape {matrix.shape}")
    if not is_traced(matrix) and not np.all(np.isfinite(np.asarray(matrix))):
        raise ValueError("matrix must be finite: it holds NaN or Inf")
    if is_psd is None and is_traced(matrix):
        raise ValueError("from_dense(matrix) inside jit cannot inspect the matrix: pass "
                         "is_psd=True or is_psd=False")
    if is_psd is None:
        evals = np.linalg.eigvalsh(np.asarray(matrix, dtype=np.float64))
        # the matrix's own rounding (e.g. a float32 A A^T) may leave eigenvalues ~ -n eps |A|
        slack = max(1e-12, 10 * matrix.shape[0] * float(jnp.finfo(matrix.dtype).eps))
        is_psd = bool(evals[0] >= -slack * max(1.0, abs(evals[-1])))
    like = jax.ShapeDtypeStruct((matrix.shape[0],), matrix.dtype)
    return LinearOperator(_DensePrepare(), matrix, like, is_psd=is_psd, name=name)


@dataclasses.dataclass(frozen=True, eq=False)
class _CallablePrepare:
    fn: Callable[[PyTree], PyTree]

    def __call__(self, operands: PyTree) -> Matvec:
        return self.fn


def from_matvec(
    matvec: Callable[[PyTree], PyTree],
    params_like: PyTree,
    *,
    is_psd: bool = False,
    name: str = "custom",
) -> LinearOperator:
    """Wrap a user matvec ``v -> A v`` (arrays it closes over become compile-time constants).

    Args:
        matvec: ``v -> A v`` on pytrees like ``params_like`` (symmetric ``A``).
        params_like: template pytree (arrays or ``jax.ShapeDtypeStruct``).
        is_psd: whether ``A`` is positive semi-definite.
        name: the operator's label.

    Returns:
        A :class:`LinearOperator` whose products cost one call of ``matvec``.

    Raises:
        ArgumentTypeError: ``matvec`` is not callable.
        ValueError: ``params_like`` is an empty pytree.
        TypeError: a ``params_like`` leaf is not a floating-point array / struct.
    """
    if not callable(matvec):
        raise ArgumentTypeError(f"matvec must be a callable v -> A v, got {type(matvec).__name__}")
    check_params(params_like, "params_like")
    return LinearOperator(_CallablePrepare(matvec), (), params_like, is_psd=is_psd, name=name)


# -- algebra -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _SumPrepare:
    def __call__(self, operands: PyTree) -> Matvec:
        first, second = operands
        mv1, mv2 = first.bind(), second.bind()
        return lambda v: tu.add(mv1(v), mv2(v))


def add(a: LinearOperator, b: LinearOperator) -> LinearOperator:
    """The operator ``a + b`` (vectors must have the same structure).

    Args:
        a: a :class:`LinearOperator`.
        b: a :class:`LinearOperator` over the same parameter tree.

    Returns:
        A :class:`LinearOperator`, PSD when both are; a product costs one of each.

    Raises:
        ArgumentTypeError: an argument is not a :class:`LinearOperator` (a ``TypeError``).
        ValueError: the operators act on different parameter trees.
    """
    check_operator(a, "a")
    check_operator(b, "b")
    if a._spec != b._spec:
        raise ValueError(
            f"cannot add operators over different parameter trees ({a.name} and {b.name})"
        )
    return LinearOperator(
        _SumPrepare(),
        (a, b),
        None,
        is_psd=a.is_psd and b.is_psd,
        name=f"({a.name} + {b.name})",
        _spec=a._spec,
    )


@dataclasses.dataclass(frozen=True)
class _ScalePrepare:
    def __call__(self, operands: PyTree) -> Matvec:
        op, alpha = operands
        mv = op.bind()
        return lambda v: tu.scale(alpha, mv(v))


def _nonnegative(alpha: Any) -> bool:
    if is_traced(alpha):
        return False
    return bool(np.all(np.asarray(alpha) >= 0))


def _scalar_operand(value: Any, name: str) -> jax.Array:
    """A real scalar operand: checked (finite, real, 0-d) when concrete, as given when traced."""
    if is_traced(value):
        value = jnp.asarray(value)
        if value.ndim != 0:
            raise ValueError(f"{name} must be a scalar, got shape {value.shape}")
        if not jnp.issubdtype(value.dtype, jnp.floating) and not jnp.issubdtype(
                value.dtype, jnp.integer):
            raise ArgumentTypeError(f"{name} must be a real scalar, got dtype {value.dtype}")
        return value
    check_real(value, name)
    return jnp.asarray(value)


def scale(op: LinearOperator, alpha: Any) -> LinearOperator:
    """The operator ``alpha * op`` (``alpha`` is an operand: new values reuse the program).

    Args:
        op: a :class:`LinearOperator`.
        alpha: a real scalar (finite when concrete; a traced value is taken as it is).

    Returns:
        A :class:`LinearOperator`, PSD when ``op`` is and ``alpha >= 0`` (eager ``alpha``);
        a product costs one product of ``op``.

    Raises:
        ArgumentTypeError: ``op`` is not a :class:`LinearOperator`, or ``alpha`` is not a
            real scalar (a string, a complex number, an array of shape ``(n,)``).
        ValueError: ``alpha`` is NaN or infinite.
    """
    check_operator(op, "op")
    alpha = _scalar_operand(alpha, "alpha")
    return LinearOperator(
        _ScalePrepare(),
        (op, alpha),
        None,
        is_psd=op.is_psd and _nonnegative(alpha),
        name=f"scaled({op.name})",
        _spec=op._spec,
    )


@dataclasses.dataclass(frozen=True)
class _DampedPrepare:
    def __call__(self, operands: PyTree) -> Matvec:
        op, lam = operands
        mv = op.bind()
        return lambda v: tu.axpy(lam, v, mv(v))


def damped(op: LinearOperator, lam: Any) -> LinearOperator:
    """The operator ``op + lam * I`` (Tikhonov damping).

    Args:
        op: a :class:`LinearOperator`.
        lam: real scalar damping (an operand: new values reuse the program; finite when
            concrete, a traced value is taken as it is).

    Returns:
        A :class:`LinearOperator` named ``"damped(<name>)"``, PSD when ``op`` is and
        ``lam >= 0`` (eager ``lam``); a product costs one product of ``op`` plus ``O(P)``.

    Raises:
        ArgumentTypeError: ``op`` is not a :class:`LinearOperator`, or ``lam`` is not a real
            scalar (e.g. the string ``"1e-3"``).
        ValueError: ``lam`` is NaN or infinite.
    """
    check_operator(op, "op")
    lam = _scalar_operand(lam, "lam")
    return LinearOperator(
        _DampedPrepare(),
        (op, lam),
        None,
        is_psd=op.is_psd and _nonnegative(lam),
        name=f"damped({op.name})",
        _spec=op._spec,
    )


def identity(params_like: PyTree) -> LinearOperator:
    """The identity on vectors shaped like ``params_like``.

    Args:
        params_like: template pytree (arrays or ``jax.ShapeDtypeStruct``).

    Returns:
        A PSD :class:`LinearOperator` named ``"identity"``.

    Raises:
        ValueError: ``params_like`` is an empty pytree.
        TypeError: a leaf is not a floating-point array / struct.
    """
    return from_matvec(lambda v: v, params_like, is_psd=True, name="identity")


__all__ = [
    "LinearOperator",
    "add",
    "apply",
    "damped",
    "from_dense",
    "from_matvec",
    "identity",
    "scale",
]
