"""Extreme eigenvalues of curvature operators: one Krylov engine, ``eigsh``, quality checks.

Files follow the phases of a run:

* :mod:`.plan` -- arguments checked at the boundary, one static plan;
* :mod:`.engine` -- the device engine: thick-restart Lanczos (``reorth="full"``) or the
  plain recurrence with on-device stopping (``"window"`` / ``"none"``), one compiled
  program per configuration;
* :mod:`.ritz` -- float64 Ritz analysis: the projected eigenproblem, Cullum-Willoughby
  ghost filtering, selection by ``which``;
* :mod:`.result` -- :class:`SpectrumResult` and its quality warnings;
* :mod:`.eigsh` -- ``eigsh`` (plan -> run -> finish), the jittable ``eigsh_fast`` and
  ``top_eigenpairs`` (the one dense fallback for tiny operators);
* :mod:`.compute` -- ``compute_spectrum`` and :class:`LanczosConfig`.

Supported names (the ``__all__`` list): ``DENSE_LIMIT``, ``Eigenpairs``, ``FastEigshResult``,
``LanczosConfig``, ``OPERATORS``, ``RitzValues``, ``SpectrumResult``, ``WHICH``,
``compute_spectrum``, ``default_memory_budget``, ``eigsh``, ``eigsh_fast``, ``ritz_values``,
``top_eigenpairs``.
"""

from gradience_jax.spectrum.compute import OPERATORS, LanczosConfig, compute_spectrum
from gradience_jax.spectrum.eigsh import (
    DENSE_LIMIT,
    Eigenpairs,
    FastEigshResult,
    eigsh,
    eigsh_fast,
    top_eigenpairs,
)
from gradience_jax.spectrum.plan import default_memory_budget
from gradience_jax.spectrum.result import SpectrumResult
from gradience_jax.spectrum.ritz import WHICH, RitzValues, ritz_values

__all__ = [
    "DENSE_LIMIT",
    "Eigenpairs",
    "FastEigshResult",
    "LanczosConfig",
    "OPERATORS",
    "RitzValues",
    "SpectrumResult",
    "WHICH",
    "compute_spectrum",
    "default_memory_budget",
    "eigsh",
    "eigsh_fast",
    "ritz_values",
    "top_eigenpairs",
]
