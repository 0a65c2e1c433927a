"""Lanczos benchmark: eigsh overhead over bare HVPs, and time-to-accuracy vs scipy/ARPACK.

Usage:
    python benchmarks/lanczos.py [--quick] [--out benchmarks/results/lanczos.json]

Part 1 (overhead): wall time of ``eigsh(k=10, num_iters=m)`` for each reorth mode against
``m x`` the time of one HVP, on MLP Hessians at P ~ 0.1M, 1M, 10M parameters. Two HVP
references: a standalone ``op @ v`` call (what a user times; it re-linearises per call) and
the per-product cost inside a compiled scan of bare products (one linearisation, the
stricter reference). Target (DESIGN.md s.6): <= 1.15x at >= 1M params with window reorth.

Part 2 (accuracy): top-10 Hessian eigenvalues of an MLP 784-256-256-10 at init (B=512,
softmax CE; a clustered top spectrum). Reference: float64 full-reorth Lanczos to tol 1e-12,
cross-checked with ARPACK. For each reorth mode, the fewest iterations whose max relative
error on the top-10 is <= 1e-4 and the wall time of that run (cold = with compilation, warm);
against ``scipy.sparse.linalg.eigsh`` (ARPACK, ncv = 2k+1) on the same jitted matvec wrapped
as a scipy ``LinearOperator``, at the loosest ``tol`` that reaches 1e-4.

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
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

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


def _flat_matvec(op):
    like = op.params_like
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), like)
    _, unravel = ravel_pytree(zeros)

    @jax.jit
    def mv(op, flat):
        return ravel_pytree(op.bind()(unravel(flat)))[0]

    return mv


def scipy_eigsh(op, tol: float):
    """ARPACK on the jitted matvec (float64 on the scipy side). Returns (vals desc, calls, s)."""
    import scipy.sparse.linalg as sla

    mv = _flat_matvec(op)
    n = op.n_params
    dtype = np.dtype(op.dtype)
    calls = [0]

    def matvec(x):
        calls[0] += 1
        return np.asarray(mv(op, jnp.asarray(np.ravel(x), dtype)), np.float64)

    lin = sla.LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(n)
    matvec(v0)  # compile outside the timing
    calls[0] = 0
    t0 = time.perf_counter()
    vals = sla.eigsh(lin, k=K, which="LA", tol=tol, v0=v0, return_eigenvectors=False)
    return np.sort(vals)[::-1], calls[0], time.perf_counter() - t0


def first_accurate_iteration(op, mode, rel_err, target, max_iters, step):
    """Fewest iterations (multiple of ``step``) whose top-k meets ``target``: one run, the
    Ritz values of every prefix of ``T`` (a prefix equals a shorter run from the same
    start vector), so a single compiled chunk serves all iteration counts."""
    from gradience_jax.spectrum import _host, _init_jit, _run_jit, _select, _start, ritz_values

    eps = float(jnp.finfo(jnp.float32).eps)
    v0, key_r = _start(op, None, jax.random.key(42))
    cap = min(max_iters, op.n_params)
    state = _init_jit(op, v0, key_r, cap, mode, 8 if mode == "window" else None,
                      cap if mode == "full" else None)
    for m in range(step, cap + 1, step):
        state = _run_jit(op, state, step, mode)
        h = _host(state)
        rv = ritz_values(h.alphas[:m], h.betas[:m], filter_ghosts=mode != "full", eps_work=eps,
                         anorm=h.anorm, dropped=h.dropped)
        idx = _select(rv.values, K, "LA")
        if m >= K and len(idx) == K and rel_err(rv.values[idx]) <= target:
            return m
    return None


def accuracy_part(quick: bool) -> dict:
    width, b = (64, 128) if quick else (256, 512)
    op, adapted, batch = mlp_case(width, b)
    with jax.enable_x64(True):
        p64 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), adapted.params)
        b64 = dict(batch, inputs=jnp.asarray(batch["inputs"], jnp.float64))
        op64 = gj.hessian(adapted.loss_fn, p64, b64)
        ref = eigsh(op64, k=K, reorth="full", tol=1e-12, max_iters=min(300, op.n_params))
        ref_vals = np.asarray(ref.eigenvalues)
    print(f"\nMLP 784-{width}-{width}-10, B={b}, P={op.n_params:,}: reference top-{K} "
          f"[{ref_vals[-1]:.4f}, {ref_vals[0]:.4f}] (float64, {ref.iterations} it, "
          f"converged={ref.converged})", flush=True)
    target = 1e-4

    def rel_err(vals):
        return float(np.max(np.abs(np.asarray(vals) - ref_vals) / np.abs(ref_vals)))

    ours = {}
    for mode in MODES:
        found = first_accurate_iteration(op, mode, rel_err, target, max_iters=200, step=5)
        if found is None:
            ours[mode] = dict(iterations=None)
            print(f"  ours {mode:<6}: did not reach {target:g} within 200 iterations")
            continue
        # cold = what one call costs a user, compilation included
        cold, warm, res = eigsh_time(op, found, mode, repeats=2)
        ours[mode] = dict(iterations=found, matvecs=res.operator_calls, cold_s=cold, warm_s=warm,
                          max_rel_error=rel_err(res.eigenvalues), warnings=list(res.warnings))
        print(f"  ours {mode:<6}: {found:3d} matvecs, max rel err {rel_err(res.eigenvalues):.1e}, "
              f"cold {cold:.3f} s, warm {warm:.3f} s", flush=True)
    arpack = {}
    for tol in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6):
        vals, calls, secs = scipy_eigsh(op, tol)
        arpack[f"{tol:g}"] = dict(matvecs=calls, wall_s=secs, max_rel_error=rel_err(vals))
        print(f"  scipy eigsh tol={tol:g}: {calls} matvecs, {secs:.3f} s, max rel err "
              f"{rel_err(vals):.1e}", flush=True)
        if rel_err(vals) <= target:
            arpack["reached"] = dict(tol=tol, matvecs=calls, wall_s=secs)
            break
    out = dict(n_params=op.n_params, width=width, batch=b, reference=ref_vals.tolist(),
               target_rel_error=target, ours=ours, scipy_arpack=arpack)
    if "reached" in arpack and ours.get("window", {}).get("iterations"):
        arpack_s = arpack["reached"]["wall_s"]
        out["speedup_window_cold_vs_arpack"] = arpack_s / ours["window"]["cold_s"]
        out["speedup_window_warm_vs_arpack"] = arpack_s / ours["window"]["warm_s"]
        print(f"  window vs ARPACK: {out['speedup_window_cold_vs_arpack']:.1f}x (cold), "
              f"{out['speedup_window_warm_vs_arpack']:.1f}x (warm) less wall time", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, < 1 min (CI)")
    ap.add_argument("--out", default="benchmarks/results/lanczos.json")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--skip-accuracy", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    result = dict(
        quick=args.quick, jax=jax.__version__, platform=platform.platform(),
        devices=[str(d) for d in jax.devices()], k=K,
    )
    if not args.skip_overhead:
        print("== eigsh overhead over iterations x HVP ==")
        result["overhead"] = overhead_part(args.quick)
    if not args.skip_accuracy:
        print("== time to 1e-4 relative accuracy on the top-10 ==")
        result["accuracy"] = accuracy_part(args.quick)
    result["total_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out} ({result['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
