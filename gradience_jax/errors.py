"""The toolkit's exception classes (no jax import: the telemetry host side uses them too).

Supported names: ``ArgumentTypeError``, ``NonFiniteError``.
"""

from __future__ import annotations


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong kind (a string where a number belongs, a bool for a count).

    It is a ``TypeError`` and, for code written against the earlier checks, a ``ValueError``.
    """


class NonFiniteError(FloatingPointError, ValueError):
    """A numeric result (an estimate, a Ritz value, a matvec inside a Krylov run) is NaN / Inf.

    A ``FloatingPointError`` (the exception of a non-finite result) that is also a
    ``ValueError``, for code written against the earlier checks of ``eigsh``.
    """
