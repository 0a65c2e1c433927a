"""Top-10 Hessian eigenvalues of an MLP at init (a clustered top spectrum): our ``eigsh`` with
its defaults against ARPACK on the same jitted HVP, matfree's ``tridiag_sym``, curvlinops +
ARPACK and PyHessian, in one run; plus the Lanczos memory of a 20M-parameter MLP.

Usage:
    python benchmarks/eigsh_clustered.py [--quick] [--skip-memory] [--out benchmarks/results/eigsh_clustered.json]

The case (issue "Krylov engine"): MLP 784-256-256-10, tanh, softmax CE, Flax default init
(zero biases), B=512 Gaussian-blob inputs. The top-10 come in near pairs (13.25, 12.85,
11.98, 11.95, 11.82, ...). Reference: ARPACK in float64 on a float64 copy of the same
weights to tol 1e-13, in a subprocess (x64 on), cross-checked with our float64 ``eigsh``.

For every method: matvecs, warm wall time (median of ``--repeats`` runs after a warm-up),
first-call time (compilation included, from a fresh program: ``jax.clear_caches()`` in this
process), and the max relative error of the top-10. The first-call target compares ours
(defaults) with ARPACK (tol=0) each as the first solve of a new process (median of 3,
interleaved): in one process the later method inherits the earlier one's warm-up. "Equal accuracy" rows use, for each method, the loosest setting (tol or number
of matvecs) whose error is <= ``--target``; our "defaults" row is ``eigsh(op, k=10)`` as a
new user calls it.

Memory (``--skip-memory`` to skip): XLA temporary bytes of the compiled ``eigsh`` program
(``memory_analysis()``, deterministic) minus those of the compiled standalone HVP, in
parameter-sized float32 vectors, for ``eigsh(k=3, num_iters=30)`` on an MLP
784-4096-4096-10 (20M parameters) with each ``reorth``; and the peak RSS of a subprocess
running it. Targets (in peak RSS, as the issue states them; the XLA column is the
deterministic part): ``"window"`` <= window + 6, ``"none"`` <= 7 vectors.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import gradience_jax as gj  # noqa: E402
from benchmarks import peers  # noqa: E402
from benchmarks.peers import NOT_INSTALLED  # noqa: E402
from gradience_jax.models import MLP, from_nnx  # noqa: E402
from gradience_jax.spectrum.engine import _FlatOperator  # noqa: E402

K = 10
CASE = ([784, 256, 256, 10], 512)
QUICK = ([64, 96, 96, 10], 256)


def build(quick: bool):
    sizes, n = QUICK if quick else CASE
    model = MLP(sizes, activation=jnp.tanh, rngs=nnx.Rngs(0))
    adapted = from_nnx(model, gj.heads.softmax_cross_entropy())
    batch = gj.data.classification(jax.random.key(1), n=n, dim=sizes[0], num_classes=sizes[-1])
    return model, adapted, batch, sizes


def flat_hvp(op):
    """``v -> H v`` on flat float vectors: one jitted program, the operator as an argument.

    Flattened the way our engine does it inside its program (in-place writes; on XLA:CPU
    ``ravel_pytree``'s concatenate made each ARPACK matvec ~1 ms slower here), so ARPACK
    drives the fastest flat HVP we have.
    """

    @jax.jit
    def mv(o, v):
        return _FlatOperator(o).bind()(v)

    return mv, int(op.n_params)


def rel_err(vals, ref) -> float:
    vals = np.sort(np.asarray(vals, np.float64))[::-1]
    if len(vals) < len(ref):
        return float("inf")
    return float(np.max(np.abs(vals[: len(ref)] - ref) / np.abs(ref)))


def timed_runs(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls (after the caller's warm-up) and the last output."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


# -- reference (subprocess, x64 on) ---------------------------------------------------------


def _reference_main(quick: bool, out: str) -> None:
    # build with x64 off (random draws depend on the flag), then switch it on for float64
    model, adapted, batch, _ = build(quick)
    adapted, batch = jax.device_get((adapted, batch))
    jax.config.update("jax_enable_x64", True)
    p64 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float64), adapted.params)
    b64 = dict(batch, inputs=jnp.asarray(batch["inputs"], jnp.float64))
    op = gj.hessian(adapted.loss_fn, p64, b64)
    import scipy.sparse.linalg as sla

    mv, n = flat_hvp(op)
    lin = sla.LinearOperator((n, n), matvec=lambda v: np.asarray(mv(op, jnp.asarray(v))),
                             dtype=np.float64)
    v0 = np.random.default_rng(0).standard_normal(n)
    arpack = np.sort(sla.eigsh(lin, k=K, which="LA", tol=1e-13, v0=v0,
                               return_eigenvectors=False))[::-1]
    ours = gj.eigsh(op, k=K, tol=1e-13)
    Path(out).write_text(json.dumps({"arpack": arpack.tolist(),
                                     "ours": np.asarray(ours.eigenvalues).tolist()}))


def reference(quick: bool) -> np.ndarray:
    out = peers.RESULTS_DIR / ".eigsh_clustered_reference.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--reference-only", str(out)] + (["--quick"] if quick else [])
    subprocess.run(cmd, check=True)
    d = json.loads(out.read_text())
    out.unlink()
    ref, ours = np.asarray(d["arpack"]), np.asarray(d["ours"])
    agree = float(np.max(np.abs(ref - ours) / np.abs(ref)))
    print(f"reference top-{K} (float64 ARPACK): {np.array2string(ref, precision=5)}; our float64 "
          f"eigsh agrees to {agree:.1e}", flush=True)
    if agree > 1e-6:  # the float64 HVP itself is symmetric to ~1e-8 only
        raise SystemExit(f"float64 references disagree ({agree:.1e}): not benchmarking")
    return ref


# -- methods ---------------------------------------------------------------------------------


def ours_rows(adapted, batch, ref, target, repeats) -> list[dict]:
    op = gj.hessian(adapted.loss_fn, adapted.params, batch)
    rows = []
    for label, kwargs in (("defaults", {}), ("tol=1e-4", {"tol": 1e-4}),
                          ("tol=1e-3", {"tol": 1e-3}), ("tol=1e-2", {"tol": 1e-2})):
        jax.clear_caches()
        t0 = time.perf_counter()
        res = gj.eigsh(op, k=K, **kwargs)
        first = time.perf_counter() - t0
        warm, res = timed_runs(lambda: gj.eigsh(op, k=K, **kwargs), repeats)
        err = rel_err(res.eigenvalues, ref)
        rows.append(dict(method=f"gradience_jax eigsh ({label})", setting=label,
                         matvecs=res.operator_calls, warm_s=warm, first_call_s=first,
                         compile_s=max(first - warm, 0.0), max_rel_error=err,
                         converged=res.converged, restarts=res.restarts,
                         warnings=list(res.warnings)))
        print(f"  ours {label:<10} {res.operator_calls:4d} matvecs, warm {warm:.2f} s, first "
              f"{first:.2f} s, err {err:.1e}, converged={res.converged}", flush=True)
    return rows


def arpack_solver(op, tol: float):
    """``(solve, count)``: scipy ARPACK's top-``K`` on our jitted flat HVP, and its matvec count."""
    import scipy.sparse.linalg as sla

    mv, n = flat_hvp(op)
    count = [0]

    def matvec(v):
        count[0] += 1
        return np.asarray(mv(op, jnp.asarray(v, jnp.float32)))

    lin = sla.LinearOperator((n, n), matvec=matvec, dtype=np.float32)
    v0 = np.random.default_rng(0).standard_normal(n).astype(np.float32)

    def solve():
        count[0] = 0
        return sla.eigsh(lin, k=K, which="LA", tol=tol, v0=v0, return_eigenvectors=False)

    return solve, count


def arpack_rows(adapted, batch, ref, target, repeats) -> list[dict]:
    """scipy ARPACK on our jitted HVP (the same matvec program a user would hand it)."""
    op = gj.hessian(adapted.loss_fn, adapted.params, batch)
    rows = []
    for tol in (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2):
        jax.clear_caches()
        solve, count = arpack_solver(op, tol)
        t0 = time.perf_counter()
        solve()
        first = time.perf_counter() - t0
        warm, vals = timed_runs(solve, repeats)
        err = rel_err(vals, ref)
        rows.append(dict(method=f"scipy ARPACK on our jitted HVP (tol={tol:g})", setting=tol,
                         matvecs=count[0], warm_s=warm, first_call_s=first,
                         compile_s=max(first - warm, 0.0), max_rel_error=err))
        print(f"  ARPACK tol={tol:<6g} {count[0]:4d} matvecs, warm {warm:.2f} s, first "
              f"{first:.2f} s, err {err:.1e}", flush=True)
    return rows


def matfree_rows(adapted, batch, ref, target, repeats) -> list[dict]:
    mf = peers.peer("matfree")
    if mf is None:
        return [dict(method="matfree tridiag_sym (full reortho)", reached=NOT_INSTALLED)]
    from matfree import decomp

    op = gj.hessian(adapted.loss_fn, adapted.params, batch)
    v0 = jnp.asarray(np.random.default_rng(0).standard_normal(op.n_params), jnp.float32)
    rows = []
    for steps in (40, 60, 80, 100, 120, 160, 200, 250, 300):
        tri = decomp.tridiag_sym(steps, reortho="full")

        @jax.jit
        def top(o, v):
            res = tri(_FlatOperator(o).bind(), v)  # the flat HVP ARPACK gets
            return jnp.linalg.eigvalsh(res.J_small)[-K:]

        t0 = time.perf_counter()
        jax.block_until_ready(top(op, v0))
        first = time.perf_counter() - t0
        warm, vals = timed_runs(lambda: jax.block_until_ready(top(op, v0)), repeats)
        err = rel_err(np.asarray(vals), ref)
        rows.append(dict(method=f"matfree tridiag_sym full reortho ({steps} matvecs)",
                         setting=steps, matvecs=steps, warm_s=warm, first_call_s=first,
                         compile_s=max(first - warm, 0.0), max_rel_error=err))
        print(f"  matfree {steps:4d} matvecs, warm {warm:.2f} s, first {first:.2f} s, "
              f"err {err:.1e}", flush=True)
        if err <= target:
            break
    return rows


def torch_rows(model, adapted, batch, ref, target, quick: bool = False,
               repeats: int = 3) -> list[dict]:
    torch = peers.peer("torch")
    if torch is None:
        return [dict(method="curvlinops + scipy ARPACK", reached=NOT_INSTALLED),
                dict(method="PyHessian", reached=NOT_INSTALLED)]
    from gradience_jax import torch_bridge as tb

    tm = tb.to_torch(model, adapted.params)
    x, y = tm.batch(batch)
    rows = []
    cl = peers.peer("curvlinops")
    if cl is None:
        rows.append(dict(method="curvlinops + scipy ARPACK", reached=NOT_INSTALLED))
    else:
        for tol in (1e-4, 1e-5, 0.0):
            # timed like the JAX rows: the first call, then the median of `repeats` more
            t0 = time.perf_counter()
            peers.curvlinops_arpack(cl, tm, x, y, K, "LA", tol)
            first = time.perf_counter() - t0
            secs, (vals, matvecs) = timed_runs(
                lambda tol=tol: peers.curvlinops_arpack(cl, tm, x, y, K, "LA", tol), repeats)
            err = rel_err(vals, ref)
            rows.append(dict(method=f"curvlinops + scipy ARPACK (tol={tol:g})", setting=tol,
                             matvecs=matvecs, warm_s=secs, first_call_s=first, compile_s=0.0,
                             max_rel_error=err))
            print(f"  curvlinops+ARPACK tol={tol:<6g} {matvecs:4d} matvecs, warm {secs:.2f} s, "
                  f"first {first:.2f} s, err {err:.1e}", flush=True)
            if err <= target:
                break
    pyh = peers.peer("pyhessian")
    if pyh is None:
        rows.append(dict(method="PyHessian", reached=NOT_INSTALLED))
    else:
        ph_mod = sys.modules["pyhessian.hessian"]
        orig = ph_mod.hessian_vector_product
        count = [0]

        def counting(*a, **kw):
            count[0] += 1
            return orig(*a, **kw)

        ph_mod.hessian_vector_product = counting
        try:
            # quick (CI): one setting, the row shows it runs; the full run tabulates three
            for tol in (1e-4,) if quick else (1e-4, 1e-5, 1e-6):
                count[0] = 0
                torch.manual_seed(0)
                t0 = time.perf_counter()
                comp = pyh.hessian(tm.module, tm.criterion(), data=(x, y), cuda=False)
                vals, _ = comp.eigenvalues(maxIter=1000, tol=tol, top_n=K)
                secs = time.perf_counter() - t0
                tm.module.zero_grad(set_to_none=True)
                err = rel_err(vals, ref)
                rows.append(dict(method=f"PyHessian power iteration + deflation (tol={tol:g})",
                                 setting=tol, matvecs=count[0], warm_s=secs, first_call_s=secs,
                                 compile_s=0.0, max_rel_error=err))
                print(f"  PyHessian tol={tol:<6g} {count[0]:5d} matvecs, {secs:.2f} s, "
                      f"err {err:.1e}", flush=True)
                if err <= target:
                    break
        finally:
            ph_mod.hessian_vector_product = orig
    return rows


# -- first calls in fresh processes -----------------------------------------------------------


def _first_call_main(method: str, quick: bool) -> None:
    """One first call in this (fresh) process: ours with defaults or ARPACK at tol=0."""
    _, adapted, batch, _ = build(quick)
    op = gj.hessian(adapted.loss_fn, adapted.params, batch)
    jax.block_until_ready(op.operands)
    if method == "ours":
        t0 = time.perf_counter()
        res = gj.eigsh(op, k=K)
        jax.block_until_ready(res.eigenvalues)
        secs, matvecs = time.perf_counter() - t0, res.operator_calls
    else:
        solve, count = arpack_solver(op, 0.0)
        t0 = time.perf_counter()
        solve()
        secs, matvecs = time.perf_counter() - t0, count[0]
    print(json.dumps({"method": method, "first_call_s": secs, "matvecs": matvecs}))


def fresh_first_calls(quick: bool, repeats: int) -> dict:
    """Median first-call seconds of ours (defaults) and ARPACK (tol=0), each the first
    eigen-solve of a new process (what a user's script pays), runs interleaved."""
    times = {"ours": [], "arpack": []}
    for _ in range(repeats):
        for method in times:
            cmd = [sys.executable, __file__, "--first-call-only", method]
            out = subprocess.run(cmd + (["--quick"] if quick else []), check=True,
                                 capture_output=True, text=True).stdout
            times[method].append(json.loads(out.strip().splitlines()[-1])["first_call_s"])
    for method, ts in times.items():
        print(f"  first call in a fresh process, {method:<6}: median {statistics.median(ts):.2f} s "
              f"of {[round(t, 2) for t in ts]}", flush=True)
    return {m: statistics.median(ts) for m, ts in times.items()}


# -- memory ----------------------------------------------------------------------------------


def _memory_case(quick: bool):
    sizes = [784, 512, 512, 10] if quick else [784, 4096, 4096, 10]
    adapted = from_nnx(MLP(sizes, rngs=nnx.Rngs(0)), gj.heads.softmax_cross_entropy())
    batch = gj.data.classification(jax.random.key(1), n=32, dim=784, num_classes=10)
    return adapted, batch


def _engine_program(op, reorth: str):
    from gradience_jax.spectrum.eigsh import start_vector
    from gradience_jax.spectrum.engine import run_engine
    from gradience_jax.spectrum.plan import flat_layout, make_plan

    plan, cap = make_plan(op, k=3, num_iters=30, which="LA", reorth=reorth,
                          window=8 if reorth == "window" else None, tol=1e-10, max_iters=None,
                          memory_budget_bytes=None, filter_ghosts=None, vectors=False,
                          true_residuals=False, chunk=None, basis_size=None, basis_dtype=None,
                          flat=flat_layout(op))
    v0, key = start_vector(op, None, jax.random.key(0))
    return run_engine.lower(op, v0, key, 1e-10, cap, plan=plan).compile()


def _rss_main(reorth: str, quick: bool) -> None:
    adapted, batch = _memory_case(quick)
    op = gj.hessian(adapted.loss_fn, adapted.params, batch)
    v = jax.tree_util.tree_map(jnp.ones_like, adapted.params)
    jax.block_until_ready(op @ v)  # the operator's own working set, once
    kw = dict(k=3, num_iters=30, reorth=reorth, window=8 if reorth == "window" else None)
    gj.eigsh(op, **kw)  # compile outside the measurement
    with peers.PeakRSS(interval=0.005) as m:
        gj.eigsh(op, **kw)
    print(json.dumps({"peak_delta": m.peak_delta}))


def memory_rows(quick: bool) -> list[dict]:
    adapted, batch = _memory_case(quick)
    op = gj.hessian(adapted.loss_fn, adapted.params, batch)
    p = op.n_params
    vec = 4 * p
    v = jax.tree_util.tree_map(jnp.ones_like, adapted.params)
    hvp_temp = jax.jit(lambda o, x: o.bind()(x)).lower(op, v).compile().memory_analysis()
    hvp_temp = hvp_temp.temp_size_in_bytes
    rows = []
    for reorth in ("none", "window", "full"):
        ma = _engine_program(op, reorth).memory_analysis()
        extra = (ma.temp_size_in_bytes - hvp_temp) / vec
        proc = subprocess.run([sys.executable, __file__, "--rss-only", reorth]
                              + (["--quick"] if quick else []),
                              capture_output=True, text=True, check=True)
        peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_delta"] / vec
        target = {"none": 7, "window": 8 + 6, "full": None}[reorth]
        rows.append(dict(reorth=reorth, n_params=p, stored_rows={"none": 0, "window": 8,
                                                                  "full": 31}[reorth],
                         extra_vectors_xla=extra, peak_rss_delta_vectors=peak, target=target,
                         # the issue states the target in peak RSS: judge that, not XLA temps
                         met=None if target is None else peak <= target))
        print(f"  memory {reorth:<6} P={p:,}: XLA temp beyond the HVP's = {extra:.1f} vectors, "
              f"peak RSS delta {peak:.1f} vectors (target {target})", flush=True)
    return rows


# -- main ------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small model (CI)")
    ap.add_argument("--target", type=float, default=1e-5)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--reference-only", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rss-only", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--first-call-only", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.reference_only:
        return _reference_main(args.quick, args.reference_only)
    if args.rss_only:
        return _rss_main(args.rss_only, args.quick)
    if args.first_call_only:
        return _first_call_main(args.first_call_only, args.quick)
    info = peers.machine()
    model, adapted, batch, sizes = build(args.quick)
    n_params = gj.tree.size(adapted.params)
    ref = reference(args.quick)
    print(f"MLP {sizes} tanh, B={batch['inputs'].shape[0]}, P={n_params:,}", flush=True)
    rows = ours_rows(adapted, batch, ref, args.target, args.repeats)
    rows += arpack_rows(adapted, batch, ref, args.target, args.repeats)
    rows += matfree_rows(adapted, batch, ref, args.target, args.repeats)
    fresh = fresh_first_calls(args.quick, 1 if args.quick else 3)
    if not args.skip_torch:
        rows += torch_rows(model, adapted, batch, ref, args.target, args.quick,
                           1 if args.quick else args.repeats)
    mem = [] if args.skip_memory else memory_rows(args.quick)

    def best(prefix):
        cands = [r for r in rows if r["method"].startswith(prefix) and "warm_s" in r
                 and r["max_rel_error"] <= args.target]
        return min(cands, key=lambda r: r["warm_s"]) if cands else None

    ours_def = rows[0]
    ours_eq, arp, cl = best("gradience_jax"), best("scipy ARPACK"), best("curvlinops")
    arp_def = next(r for r in rows if r["method"].startswith("scipy ARPACK"))  # tol=0
    targets = {"converged_by_default": bool(ours_def["converged"])}
    if ours_eq and arp:
        targets["matvecs_vs_arpack_equal_accuracy"] = ours_eq["matvecs"] / arp["matvecs"]
        targets["matvecs_le_1.1x_arpack"] = ours_eq["matvecs"] <= 1.1 * arp["matvecs"]
        targets["warm_speedup_vs_arpack_equal_accuracy"] = arp["warm_s"] / ours_eq["warm_s"]
        targets["warm_ge_1.25x_faster_than_arpack"] = arp["warm_s"] / ours_eq["warm_s"] >= 1.25
        # the first call a user's script pays: each method's first solve in a new process
        # (in this process ARPACK's "first call" follows ours and inherits its warm-up)
        targets["first_call_defaults_vs_arpack_default"] = fresh["arpack"] / fresh["ours"]
        targets["first_call_no_slower_than_arpack"] = fresh["ours"] <= fresh["arpack"]
        targets["first_call_in_this_process_vs_arpack"] = (
            arp_def["first_call_s"] / ours_def["first_call_s"])
    if ours_eq and cl:
        targets["speedup_vs_curvlinops_arpack"] = cl["warm_s"] / ours_eq["warm_s"]
        targets["ge_5x_faster_than_curvlinops_arpack"] = cl["warm_s"] / ours_eq["warm_s"] >= 5
    for r in mem:
        if r["target"] is not None:
            targets[f"memory_{r['reorth']}_le_target"] = r["met"]
    table = [{"method": r["method"], "matvecs": r.get("matvecs", ""),
              "warm s": r.get("warm_s", ""), "first call s": r.get("first_call_s", ""),
              "compile s": r.get("compile_s", ""), "max rel err": r.get("max_rel_error", ""),
              "note": r.get("reached", "")} for r in rows]
    peers.print_table(f"Top-{K} Hessian eigenvalues, MLP {sizes} tanh at init, P={n_params:,}, "
                      f"B={batch['inputs'].shape[0]} (target {args.target:g})", table)
    if mem:
        peers.print_table("Lanczos memory, eigsh(k=3, num_iters=30)", mem)
    print("targets:", targets)
    info["loadavg_end"] = peers.machine()["loadavg"]
    result = {"suite": "eigsh_clustered", "quick": args.quick, "machine": info,
              "sizes": sizes, "n_params": n_params, "batch": int(batch["inputs"].shape[0]),
              "reference": ref.tolist(), "target_rel_error": args.target, "rows": rows,
              "memory": mem, "first_call_fresh_process_s": fresh, "targets": targets}
    out = args.out or str(peers.RESULTS_DIR / ("eigsh_clustered_quick.json" if args.quick
                                               else "eigsh_clustered.json"))
    peers.write_json(out, result)
    return result


if __name__ == "__main__":
    main()
