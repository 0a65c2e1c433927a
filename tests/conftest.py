"""Test configuration: float64 on by default (references are dense float64).

``GRADIENCE_X64=0`` runs the suite in the configuration users get by default (x64 off:
float32 defaults, a float32 tridiagonal in the jittable path); the core modules are run that
way too by ``tests/test_x32.py``. Tests take their tolerances from ``helpers.X64``.
"""

import gc
import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Small dense eigendecompositions are much faster single-threaded on a busy 2-core machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import jax
import pytest

X64 = os.environ.get("GRADIENCE_X64", "1") != "0"
jax.config.update("jax_enable_x64", X64)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled programs after each test module.

    Every compiled XLA:CPU executable holds about three memory mappings. One pytest process
    running the whole suite (as ``.ci/run`` does) compiles well over 20,000 programs, which
    passes Linux's ``vm.max_map_count`` (65,530) and makes the next compilation segfault
    inside XLA. Clearing the caches between modules keeps the count at one module's worth.
    """
    yield
    jax.clear_caches()
    gc.collect()
