"""Test configuration: float64 on by default (references are dense float64).

``GRADIENCE_X64=0`` runs the suite in the configuration users get by default (x64 off:
float32 defaults, a float32 tridiagonal in the jittable path); the core modules are run that
way too by ``tests/test_x32.py``. Tests take their tolerances from ``helpers.X64``.
"""
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Small dense eigendecompositions are much faster single-threaded on a busy 2-core machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import jax

X64 = os.environ.get("GRADIENCE_X64", "1") != "0"
jax.config.update("jax_enable_x64", X64)
