"""Scale: a GPT-2-small-shaped Flax transformer (V = 50257, d = 768, 12 heads, 12 layers,
T = 256, random weights) on CPU: top Hessian eigenvalue and GGN top-3 with windowed
re-orthogonalisation and ``vocab_chunk``; wall time and peak memory.

Usage:
    python benchmarks/scale_gpt2.py [--small] [--batch 1] [--seq 256] [--reorth window|none]
                                    [--window 4]
                                    [--out benchmarks/results/scale_gpt2.json]

``TinyTransformerLM(vocab_size=50257, d_model=768, num_heads=12, num_layers=12,
max_len=256)`` has untied input / output embeddings, so it holds ~163M parameters (GPT-2
small ties them: 124M). ``--small`` runs a scaled-down model (d = 128, 2 layers, 4 heads,
T = 128, same vocabulary) in about a minute. Memory: peak RSS of the process
(``ru_maxrss``) and per phase the peak RSS sampled during the phase. Targets (issue 10):
< 10 min and peak <= 8 GB for the full-size run on a 2-core CPU.

Lanczos here is convergence-driven (``tol`` relative residual, checked every ``--chunk``
iterations, at most ``--max-iters``); the Hessian run uses ``which="LA"``; windowed
re-orthogonalisation keeps ``window + O(1)`` parameter-sized vectors.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import gradience_jax as gj  # noqa: E402
from benchmarks import peers  # noqa: E402
from gradience_jax.models import TinyTransformerLM, from_nnx  # noqa: E402


def _eigsh():
    return getattr(gj, "eigsh", None) or __import__("gradience_jax.spectrum").spectrum.eigsh


def max_rss_GiB() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="scaled-down model (~1 min)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (256; small 128)")
    p.add_argument("--reorth", choices=("window", "none"), default="window",
                   help="Lanczos re-orthogonalisation: a ring buffer of --window rows, or none "
                        "(ghosts removed by the Cullum-Willoughby filter)")
    p.add_argument("--window", type=int, default=4, help="Lanczos re-orthogonalisation window")
    p.add_argument("--vocab-chunk", type=int, default=128, help="tokens per GGN readout chunk")
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--max-iters", type=int, default=40)
    p.add_argument("--chunk", type=int, default=10, help="iterations between convergence checks")
    p.add_argument("--skip-hessian", action="store_true")
    p.add_argument("--skip-ggn", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cfg = (dict(vocab_size=50257, d_model=128, num_heads=4, num_layers=2, max_len=128)
           if args.small else
           dict(vocab_size=50257, d_model=768, num_heads=12, num_layers=12, max_len=256))
    seq = args.seq or cfg["max_len"]
    info = peers.machine()
    t_start = time.perf_counter()
    model = TinyTransformerLM(**cfg, rngs=nnx.Rngs(0))
    adapted = from_nnx(model, gj.heads.softmax_cross_entropy())
    loss_fn, model_fn, params, head = adapted
    del model
    batch = gj.data.token_sequences(jax.random.key(0), n=args.batch, seq_len=seq,
                                    vocab_size=cfg["vocab_size"])
    n_params = gj.tree.size(params)
    print(f"model {cfg}, P={n_params:,}, batch {args.batch} x {seq} tokens", flush=True)
    eigsh = _eigsh()
    phases = {}
    with peers.PeakRSS(interval=0.01) as m:
        t0 = time.perf_counter()
        loss = float(jax.jit(loss_fn)(params, batch))
        phases["loss"] = {"wall_s": time.perf_counter() - t0, "value": loss}
    phases["loss"]["peak_rss_delta_GiB"] = m.peak_delta / 2**30
    print(f"loss {loss:.4f} ({phases['loss']['wall_s']:.1f} s incl. compile)", flush=True)

    common = dict(reorth=args.reorth, window=args.window if args.reorth == "window" else None,
                  tol=args.tol, max_iters=args.max_iters,
                  chunk=args.chunk, key=jax.random.key(0))
    def phase(name: str, make_op, k: int, **extra) -> None:
        """Build the operator and run eigsh(k) inside one timed, memory-sampled phase."""
        with peers.PeakRSS(interval=0.01) as m:
            t0 = time.perf_counter()
            res = eigsh(make_op(), k=k, which="LA", **common)
            wall = time.perf_counter() - t0
        phases[name] = {
            "wall_s": wall, "eigenvalues": np.asarray(res.eigenvalues).tolist(),
            "iterations": res.iterations, "matvecs": res.operator_calls,
            "converged": bool(res.converged),
            "ritz_residuals": np.asarray(res.ritz_residuals).tolist(),
            "warnings": list(res.warnings), "peak_rss_delta_GiB": m.peak_delta / 2**30,
            "max_rss_GiB": max_rss_GiB(), **extra,
        }
        print(f"{name}: {phases[name]['eigenvalues']} in {wall:.1f} s, {res.operator_calls} "
              f"matvecs, converged={res.converged}, peak RSS {max_rss_GiB():.2f} GiB", flush=True)

    if not args.skip_hessian:
        phase("hessian_top1", lambda: gj.hessian(loss_fn, params, batch, check=False), 1)
    if not args.skip_ggn:
        phase("ggn_top3", lambda: gj.ggn(model_fn, head, params, batch,
                                         vocab_chunk=args.vocab_chunk, check=False), 3,
              vocab_chunk=args.vocab_chunk)
    total = time.perf_counter() - t_start
    info["loadavg_end"] = peers.machine()["loadavg"]
    peak = max_rss_GiB()
    result = {
        "suite": "scale_gpt2", "small": args.small, "config": cfg, "n_params": n_params,
        "batch": args.batch, "seq_len": seq, "reorth": args.reorth, "window": args.window,
        "tol": args.tol,
        "max_iters": args.max_iters, "phases": phases, "total_wall_s": total,
        "peak_rss_GiB": peak, "machine": info,
        "targets": {"total_lt_10_min": total < 600, "peak_le_8_GB": peak * 2**30 <= 8e9},
    }
    rows = [{"phase": k, "wall s": v["wall_s"], "matvecs": v.get("matvecs", ""),
             "eigenvalues": ", ".join(f"{e:.4g}" for e in v.get("eigenvalues", [])) or "",
             "converged": v.get("converged", ""), "peak RSS during (GiB)": v["peak_rss_delta_GiB"]}
            for k, v in phases.items()]
    peers.print_table(
        f"{'GPT-2-small-shaped' if not args.small else 'scaled-down'} LM, P={n_params:,}, "
        f"B*T={args.batch * seq}: total {total:.0f} s, peak RSS {peak:.2f} GiB", rows)
    print("targets:", result["targets"])
    out = args.out or str(peers.RESULTS_DIR / ("scale_gpt2_small.json" if args.small
                                               else "scale_gpt2.json"))
    peers.write_json(out, result)
    return result


if __name__ == "__main__":
    main()
