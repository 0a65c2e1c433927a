"""Memory of GGN-vector products on a language model with V = 32k as B*T grows:
gradience_jax (XLA ``memory_analysis()`` and measured peak RSS) vs PyTorch peers (measured
peak RSS): torch.func, curvlinops, BackPACK hessianfree, double-backprop HVP, plain grad.

Usage:
    python benchmarks/peers_memory.py [--quick] [--out benchmarks/results/peers_memory.json]

Model: ``TinyTransformerLM(vocab_size=32768, d_model=64, num_heads=2, num_layers=1)``,
sequences of 128 tokens, B*T in {512, 2048(, 4096)}. Each implementation runs in its own
subprocess (fresh allocator state); for every B*T, increasing, it prepares inputs (and, for
ours, compiles), then samples the process RSS every 0.5 ms during one product: "peak MiB" is
the peak above the RSS just before the call (temporaries and outputs; params, batch and
compiled code excluded). For ours the compiled program's ``temp_size_in_bytes`` is listed
as well (deterministic). Targets (DESIGN.md s.6): GGN temp <= grad temp; with
``vocab_chunk`` flat in B*T.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VOCAB, D_MODEL, SEQ = 32768, 64, 128
OURS = ("ours grad", "ours HVP", "ours GGN-vp", "ours GGN-vp vocab_chunk=512")
THEIRS = ("torch grad", "torch double-backprop HVP", "torch.func GGN-vp", "curvlinops GGN-vp",
          "BackPACK GGN-vp")
QUICK_IMPLS = ("ours grad", "ours GGN-vp", "ours GGN-vp vocab_chunk=512", "torch grad",
               "torch.func GGN-vp", "curvlinops GGN-vp")


def worker(impl: str, sizes: list[int]) -> list[dict]:
    import jax
    from flax import nnx

    import gradience_jax as gj
    from benchmarks import peers
    from gradience_jax.models import TinyTransformerLM, from_nnx
    from gradience_jax.operators.base import apply

    model = TinyTransformerLM(vocab_size=VOCAB, d_model=D_MODEL, num_heads=2, num_layers=1,
                              max_len=512, rngs=nnx.Rngs(0))
    adapted = from_nnx(model, gj.heads.softmax_cross_entropy())
    loss_fn, model_fn, params, head = adapted
    v = gj.tree.random_like(jax.random.key(1), params)
    out = []
    torch = None
    if not impl.startswith("ours"):
        torch = peers.peer("torch")
        if torch is None:
            return [{"B*T": bt, "peak_MiB": peers.NOT_INSTALLED} for bt in sizes]
        from gradience_jax import torch_bridge as tb

        tm = tb.to_torch(model, params)
        vt = tm.to_torch(v)
    for bt in sizes:
        batch = gj.data.token_sequences(jax.random.key(0), n=bt // SEQ, seq_len=SEQ,
                                        vocab_size=VOCAB)
        row = {"B*T": bt}
        if impl.startswith("ours"):
            if impl == "ours grad":
                fn = jax.jit(jax.grad(loss_fn)).lower(params, batch).compile()
                call = lambda fn=fn: fn(params, batch)  # noqa: E731
            else:
                if impl == "ours HVP":
                    op = gj.hessian(loss_fn, params, batch, linearize=False, check=False)
                elif impl == "ours GGN-vp":
                    op = gj.ggn(model_fn, head, params, batch, linearize=False, check=False)
                else:
                    op = gj.ggn(model_fn, head, params, batch, vocab_chunk=512, linearize=False,
                                check=False)
                fn = apply.lower(op, v).compile()
                call = lambda fn=fn, op=op: fn(op, v)  # noqa: E731
            row["xla_temp_MiB"] = peers.temp_bytes(fn) / 2**20
            block = jax.block_until_ready
        else:
            x, y = tm.batch(batch)
            crit = tm.criterion()
            prm = tm.parameters
            if impl == "torch grad":
                call = lambda: torch.autograd.grad(crit(tm.module(x), y), prm)  # noqa: E731
            elif impl == "torch double-backprop HVP":
                prods = tm.products(batch, head)
                call = lambda: prods.hvp_double_backprop(vt)  # noqa: E731
            elif impl == "torch.func GGN-vp":
                prods = tm.products(batch, head)
                call = lambda: prods.ggn_func(vt)  # noqa: E731
            elif impl == "curvlinops GGN-vp":
                cl = peers.peer("curvlinops")
                if cl is None:
                    out.append({"B*T": bt, "peak_MiB": peers.NOT_INSTALLED})
                    continue
                op = cl.GGNLinearOperator(tm.module, crit, prm, [(x, y)],
                                          check_deterministic=False, num_data=int(x.shape[0]))
                call = lambda op=op: op @ vt  # noqa: E731
            elif impl == "BackPACK GGN-vp":
                if peers.peer("backpack") is None:
                    out.append({"B*T": bt, "peak_MiB": peers.NOT_INSTALLED})
                    continue
                from backpack.hessianfree.ggnvp import ggn_vector_product_from_plist

                def call():
                    o = tm.module(x)
                    return ggn_vector_product_from_plist(crit(o, y), o, prm, vt)
            else:
                raise ValueError(impl)
            block = lambda r: r  # noqa: E731
        gc.collect()
        with peers.PeakRSS() as meter:
            res = block(call())
        del res
        gc.collect()
        row["peak_MiB"] = meter.peak_delta / 2**20
        out.append(row)
    return out


def run(quick: bool) -> dict:

    sizes = [512, 2048] if quick else [512, 2048, 4096]
    impls = QUICK_IMPLS if quick else OURS + THEIRS
    results = {}
    for impl in impls:
        env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", impl, "--sizes", ",".join(map(str, sizes))],
            capture_output=True, text=True, env=env, timeout=1800,
        )
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("WORKER")]
        if proc.returncode != 0 or not line:
            results[impl] = [{"B*T": bt, "peak_MiB": "failed"} for bt in sizes]
            print(f"  {impl}: failed\n{proc.stderr[-2000:]}", flush=True)
            continue
        results[impl] = json.loads(line[-1][len("WORKER"):])
        print(f"  {impl}: {results[impl]}", flush=True)
    rows = []
    for impl, rs in results.items():
        row = {"implementation": impl}
        for r in rs:
            row[f"B*T={r['B*T']} peak MiB"] = r["peak_MiB"]
            if "xla_temp_MiB" in r:
                row[f"B*T={r['B*T']} XLA temp MiB"] = r["xla_temp_MiB"]
        rows.append(row)
    cols = ["implementation"] + [f"B*T={bt} peak MiB" for bt in sizes] + \
        [f"B*T={bt} XLA temp MiB" for bt in sizes]
    checks = {}

    def temps(impl):
        return [r.get("xla_temp_MiB") for r in results.get(impl, [])]

    g, gg, gc_ = temps("ours grad"), temps("ours GGN-vp"), temps("ours GGN-vp vocab_chunk=512")
    if g and gg and None not in g + gg:
        checks["ggn_temp_le_grad_temp"] = all(a <= b for a, b in zip(gg, g))
    if gc_ and None not in gc_:
        checks["chunked_ggn_temp_flat_in_BT"] = max(gc_) <= 1.25 * min(gc_) + 8
    peak = {impl: [r["peak_MiB"] for r in rs] for impl, rs in results.items()}
    ours_c = peak.get("ours GGN-vp vocab_chunk=512")
    for impl in ("torch.func GGN-vp", "curvlinops GGN-vp", "BackPACK GGN-vp"):
        theirs = peak.get(impl)
        if ours_c and theirs and all(isinstance(a, float) for a in ours_c + theirs):
            checks[f"chunked_ggn_peak_below_{impl}_at_largest_BT"] = ours_c[-1] < theirs[-1]
    return {"vocab": VOCAB, "d_model": D_MODEL, "seq_len": SEQ, "sizes": sizes,
            "results": results, "rows": rows, "columns": cols, "targets": checks}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sizes", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        rows = worker(args.worker, [int(s) for s in args.sizes.split(",")])
        print("WORKER" + json.dumps(rows))
        return {}
    from benchmarks import peers

    info = peers.machine()
    res = run(args.quick)
    info["loadavg_end"] = peers.machine()["loadavg"]
    peers.print_table(
        f"Peak memory above baseline (MiB), transformer LM V={VOCAB}, d={D_MODEL}, T={SEQ}",
        res["rows"], res["columns"])
    print("targets:", res["targets"])
    result = {"suite": "peers_memory", "quick": args.quick, "machine": info, **res}
    peers.write_json(args.out or str(peers.RESULTS_DIR / "peers_memory.json"), result)
    return result


if __name__ == "__main__":
    main()
