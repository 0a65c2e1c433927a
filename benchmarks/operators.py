"""Operator benchmark: time of grad, HVP, GGN-vp, EF-vp (ratios to grad) and XLA temp memory.

Usage:
    python benchmarks/operators.py [--quick] [--out benchmarks/results/operators.json]

Times are medians of repeated runs after warm-up (compile excluded). Memory is the
compiled program's ``memory_analysis().temp_size_in_bytes`` (deterministic, no execution).
Targets (DESIGN.md s.6): HVP <= 2.0 x grad; GGN-vp temp <= grad temp; chunked GGN-vp temp
flat in B*T.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
from flax import nnx

import gradience_jax as gj
from gradience_jax.models import CNN, MLP, TinyTransformerLM, from_nnx
from gradience_jax.operators.base import apply


def median_time(fn, *args, repeats: int = 10) -> float:
    jax.block_until_ready(fn(*args))  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def temp_bytes(compiled) -> int:
    return int(compiled.memory_analysis().temp_size_in_bytes)


def cases(quick: bool):
    key = jax.random.key(0)
    b = 128 if quick else 512
    mlp = from_nnx(MLP([784, 256, 256, 10], rngs=nnx.Rngs(0)), gj.heads.softmax_cross_entropy())
    mlp_batch = gj.data.classification(key, n=b, dim=784, num_classes=10)
    cnn = from_nnx(
        CNN(in_channels=3, channels=(16, 32), image_size=16, num_classes=10, rngs=nnx.Rngs(0)),
        gj.heads.softmax_cross_entropy(),
    )
    cnn_batch = gj.data.images(key, n=b // 4, size=16, channels=3)
    lm = from_nnx(
        TinyTransformerLM(vocab_size=512, d_model=128, num_heads=4, num_layers=2, max_len=64,
                          rngs=nnx.Rngs(0)),
        gj.heads.softmax_cross_entropy(),
    )
    lm_batch = gj.data.token_sequences(key, n=8 if quick else 16, seq_len=64, vocab_size=512)
    return {"mlp": (mlp, mlp_batch), "cnn": (cnn, cnn_batch), "transformer": (lm, lm_batch)}


def time_operators(quick: bool) -> list[dict]:
    rows = []
    repeats = 5 if quick else 20
    for name, (adapted, batch) in cases(quick).items():
        loss_fn, model_fn, params, head = adapted
        v = gj.tree.random_like(jax.random.key(1), params)
        grad = jax.jit(jax.grad(loss_fn))
        t_grad = median_time(grad, params, batch, repeats=repeats)
        row = {"model": name, "n_params": gj.tree.size(params), "grad_ms": 1e3 * t_grad}
        ops = {
            "hvp": gj.hessian(loss_fn, params, batch, linearize=False),
            "hvp_linearized": gj.hessian(loss_fn, params, batch, linearize=True),
            "ggn": gj.ggn(model_fn, head, params, batch, linearize=False),
            "ef_streaming": gj.empirical_fisher(loss_fn, params, batch, mode="streaming",
                                                linearize=False),
        }
        for label, op in ops.items():
            t = median_time(apply, op, v, repeats=repeats)
            row[f"{label}_ms"] = 1e3 * t
            row[f"{label}_ratio"] = t / t_grad
        # linearised: bind once, many products (how Lanczos uses it)
        lin = ops["hvp_linearized"]

        @jax.jit
        def ten_products(op, v):
            mv = op.bind()
            return jax.lax.fori_loop(0, 10, lambda i, x: mv(x), v)

        t10 = median_time(ten_products, lin, v, repeats=max(2, repeats // 4))
        row["hvp_linearized_per_product_ms"] = 1e3 * t10 / 10
        row["hvp_linearized_per_product_ratio"] = (t10 / 10) / t_grad
        # op.linearized(): one linearisation at this point, then standalone products
        lin_op = ops["hvp"].linearized()
        t_lin = median_time(apply, lin_op, v, repeats=repeats)
        row["hvp_linearized_op_ms"] = 1e3 * t_lin
        row["hvp_linearized_op_ratio"] = t_lin / t_grad
        rows.append(row)
    return rows


def memory_rows(quick: bool) -> list[dict]:
    vocab = 32768
    rows = []
    sizes = (512, 2048) if quick else (512, 2048, 8192)
    model = TinyTransformerLM(vocab_size=vocab, d_model=64, num_heads=2, num_layers=1,
                              max_len=512, rngs=nnx.Rngs(0))
    adapted = from_nnx(model, gj.heads.softmax_cross_entropy())
    loss_fn, model_fn, params, head = adapted
    seq = 128
    for bt in sizes:
        batch = gj.data.token_sequences(jax.random.key(0), n=bt // seq, seq_len=seq,
                                        vocab_size=vocab)
        v = gj.tree.random_like(jax.random.key(1), params)
        shape = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), v)
        grad = jax.jit(jax.grad(loss_fn)).lower(params, batch).compile()
        row = {"B*T": bt, "vocab": vocab, "grad_temp_MiB": temp_bytes(grad) / 2**20}
        ops = {
            "hvp": gj.hessian(loss_fn, params, batch, linearize=False, check=False),
            "ggn": gj.ggn(model_fn, head, params, batch, linearize=False, check=False),
            "ggn_chunk512": gj.ggn(model_fn, head, params, batch, vocab_chunk=512,
                                   linearize=False, check=False),
        }
        for label, op in ops.items():
            compiled = apply.lower(op, shape).compile()
            row[f"{label}_temp_MiB"] = temp_bytes(compiled) / 2**20
        rows.append(row)
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    keys = list(rows[0])
    for k in keys:
        table.add_column(k, justify="right")
    for r in rows:
        table.add_row(*[f"{r[k]:.3g}" if isinstance(r[k], float) else str(r[k]) for k in keys])
    Console().print(table)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (CI)")
    parser.add_argument("--out", default="benchmarks/results/operators.json")
    args = parser.parse_args(argv)
    timing = time_operators(args.quick)
    memory = memory_rows(args.quick)
    print_table("Operator products (median ms; ratio = product / grad)", timing)
    print_table("XLA temp memory (MiB), transformer LM, V=32768", memory)
    checks = {
        "hvp_le_2x_grad": all(r["hvp_ratio"] <= 2.0 for r in timing),
        "ggn_temp_le_grad_temp": all(r["ggn_temp_MiB"] <= r["grad_temp_MiB"] for r in memory),
        "chunked_ggn_temp_flat": max(r["ggn_chunk512_temp_MiB"] for r in memory)
        <= 1.25 * min(r["ggn_chunk512_temp_MiB"] for r in memory) + 8,
    }
    print("targets:", checks)
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "devices": [str(d) for d in jax.devices()], "jax": jax.__version__},
        "quick": args.quick,
        "load_average": os.getloadavg(),
        "timing": timing,
        "memory": memory,
        "targets_met": checks,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
