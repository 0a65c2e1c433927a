"""Lanczos benchmark: eigsh overhead over bare HVPs.

Usage:
    python benchmarks/lanczos.py [--quick] [--out benchmarks/results/lanczos.json]

Part 1 (overhead): wall time of ``eigsh(k=10, num_iters=m)`` for each reorth mode against
``m x`` the time of one HVP, on MLP Hessians at P ~ 0.1M, 1M, 10M parameters. Two HVP
references: a standalone ``op @ v`` call (what a user times; it re-linearises per call) and
the per-product cost inside a compiled scan of bare products (one linearisation, the
stricter reference). Target (DESIGN.md s.6): <= 1.15x at >= 1M params with window reorth.

The clustered top-10 case against ARPACK, matfree, curvlinops and PyHessian is
``eigsh_clustered.py``.

Wall times are single runs after warm-up unless marked cold; the machine may be shared, so
compare ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

import gradience_jax as gj
from gradience_jax.models import MLP, from_nnx
from gradience_jax.spectrum import eigsh

K = 10
MODES = ("window", "full", "none")


def timed(fn, *args, repeats: int = 3) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def mlp_case(width: int, batch_size: int, seed: int = 0):
    adapted = from_nnx(
        MLP([784, width, width, 10], rngs=nnx.Rngs(seed)), gj.heads.softmax_cross_entropy()
    )
    batch = gj.data.classification(jax.random.key(seed + 1), n=batch_size, dim=784,
                                   num_classes=10)
    op = gj.hessian(adapted.loss_fn, adapted.params, batch)
    return op, adapted, batch


@jax.jit
def _scan_products(op, v):
    mv = op.bind()

    def body(c, _):
        return mv(c), None

    return jax.lax.scan(body, v, None, length=10)[0]


def hvp_times(op, params) -> tuple[float, float]:
    """(standalone ``op @ v`` seconds, per-product seconds inside a compiled scan)."""
    v = jax.tree_util.tree_map(lambda x: jnp.ones_like(x) * 1e-3, params)
    standalone = timed(lambda x: op @ x, v)
    in_scan = timed(_scan_products, op, v, repeats=2) / 10
    return standalone, in_scan


def eigsh_time(op, m: int, reorth: str, repeats: int = 2) -> tuple[float, float, object]:
    """(cold seconds incl. compilation, warm seconds, result)."""
    t0 = time.perf_counter()
    res = eigsh(op, k=K, num_iters=m, reorth=reorth, window=8 if reorth == "window" else None)
    cold = time.perf_counter() - t0
    warm = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = eigsh(op, k=K, num_iters=m, reorth=reorth,
                    window=8 if reorth == "window" else None)
        warm = min(warm, time.perf_counter() - t0)
    return cold, warm, res


def overhead_part(quick: bool) -> list[dict]:
    if quick:
        sizes = [(110, 128, (30,))]
    else:
        sizes = [(110, 512, (30, 80)), (650, 512, (30, 80)), (2800, 128, (30,))]
    rows = []
    for width, b, iters in sizes:
        op, adapted, _ = mlp_case(width, b)
        hvp, hvp_scan = hvp_times(op, adapted.params)
        for m in iters:
            for mode in MODES:
                cold, warm, res = eigsh_time(op, m, mode, repeats=1 if op.n_params > 5e6 else 2)
                rows.append(dict(
                    n_params=op.n_params, batch=b, iterations=m, reorth=mode,
                    hvp_s=hvp, hvp_in_scan_s=hvp_scan, eigsh_cold_s=cold, eigsh_warm_s=warm,
                    ratio_vs_hvp=warm / (m * hvp), ratio_vs_scan_hvp=warm / (m * hvp_scan),
                    top_eigenvalue=float(res.eigenvalues[0]),
                ))
                r = rows[-1]
                print(f"P={r['n_params']:>10,} B={b:<4} m={m:<3} {mode:<6} hvp {hvp*1e3:8.2f} ms "
                      f"(in scan {hvp_scan*1e3:8.2f}) eigsh warm {warm:7.3f} s cold {cold:7.3f} s "
                      f"ratio {r['ratio_vs_hvp']:.3f} (vs scan {r['ratio_vs_scan_hvp']:.3f})",
                      flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, < 1 min (CI)")
    ap.add_argument("--out", default="benchmarks/results/lanczos.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    result = dict(
        quick=args.quick, jax=jax.__version__, platform=platform.platform(),
        devices=[str(d) for d in jax.devices()], k=K,
    )
    print("== eigsh overhead over iterations x HVP ==")
    result["overhead"] = overhead_part(args.quick)
    result["total_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out} ({result['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
