#!/usr/bin/env python
"""Regenerate the seed figures in docs/figures/ (one call; about a minute per figure on a
laptop CPU at most).

    python scripts/make_figures.py [--out docs/figures] [--only NAME ...]

Every figure runs its experiment (``gradience_jax.experiments``) with the default settings
and a fixed key, then draws the result with ``gradience_jax.plots``, so the PNGs are
reproducible.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# One BLAS thread: dense eigensolvers are much slower with oversubscribed thread pools.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from gradience_jax import plots  # noqa: E402
from gradience_jax.experiments import attention as attention_experiments  # noqa: E402
from gradience_jax.experiments import seed  # noqa: E402

FIGURES = {
    "pseudo_spectral_analysis": lambda path: plots.pseudo_spectral_analysis(
        seed.pseudo_spectral_experiment(key=jax.random.key(42)), path=path),
    "sharp_vs_flat_minima": lambda path: plots.sharp_vs_flat_minima(
        seed.sharp_vs_flat_experiment(key=jax.random.key(0)), path=path),
    "attention_geometry": lambda path: plots.plot_attention_geometry(
        attention_experiments.attention_geometry_experiment(key=jax.random.key(7)), path=path),
    "attention_training_dynamics": lambda path: plots.attention_training_dynamics(
        attention_experiments.attention_dynamics_experiment(key=jax.random.key(11)), path=path),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--out", default=os.path.join(root, "docs", "figures"))
    parser.add_argument("--only", nargs="*", choices=sorted(FIGURES), default=None)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name in args.only or FIGURES:
        path = os.path.join(args.out, f"{name}.png")
        start, cpu = time.perf_counter(), time.process_time()
        FIGURES[name](path)
        print(f"{path}  ({time.perf_counter() - start:.1f} s wall, "
              f"{time.process_time() - cpu:.1f} s CPU, {os.path.getsize(path) // 1024} KiB)",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
