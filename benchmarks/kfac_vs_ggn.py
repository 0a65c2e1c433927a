"""How well does K-FAC approximate the GGN? MLP, CNN and tiny transformer, float64.

Usage:
    python benchmarks/kfac_vs_ggn.py [--quick] [--steps 100] [--out benchmarks/results/kfac_vs_ggn.json]

For each model, at initialisation and after ``--steps`` SGD steps, and for K-FAC's
``type-2`` (exact head-Hessian square root) and ``mc`` (one sampled label per token)
variants, the table reports (via :func:`gradience_jax.geometry.compare_curvature`, dense):

* ``cov``: fraction of parameters K-FAC covers (the rest get a zero block);
* ``l1 K/G``: ratio of the largest eigenvalues;
* ``ovl@5``: overlap ``||U_K^T U_G||_F^2 / 5`` of the top-5 eigenvector subspaces;
* ``relF``: ``||K - G||_F / ||G||_F``; ``relF blk``: the same against the GGN's
  block-diagonal part on K-FAC's blocks (what K-FAC actually approximates);
* ``build``: K-FAC construction (factors + eigendecompositions, compiled, median);
* ``K-mv`` / ``G-mv``: one product with K-FAC / with the GGN (compiled, median).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import warnings
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import gradience_jax as gj  # noqa: E402
from gradience_jax.geometry import compare_curvature  # noqa: E402
from gradience_jax.models import CNN, MLP, TinyTransformerLM, from_nnx  # noqa: E402
from gradience_jax.operators.base import apply  # noqa: E402
from gradience_jax.operators.kfac import KFACCoverageWarning, kfac  # noqa: E402

F64 = jnp.float64


def median_time(fn, repeats: int = 5) -> float:
    jax.block_until_ready(fn())  # warm-up / compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cases(quick: bool) -> dict:
    key = jax.random.key(0)
    ce = gj.heads.softmax_cross_entropy()
    width, n = (16, 32) if quick else (32, 64)
    mlp = from_nnx(MLP([16, width, width, 4], activation=jnp.tanh, param_dtype=F64,
                       rngs=nnx.Rngs(0)), ce)
    mlp_batch = gj.data.classification(key, n=n, dim=16, num_classes=4)
    cnn = from_nnx(CNN(channels=(4, 8), image_size=8, num_classes=4, param_dtype=F64,
                       rngs=nnx.Rngs(0)), ce)
    cnn_batch = gj.data.images(key, n=n // 2, size=8, num_classes=4)
    d = 8 if quick else 16
    lm = from_nnx(TinyTransformerLM(vocab_size=16, d_model=d, num_heads=2, num_layers=1,
                                    d_ff=2 * d, max_len=8, param_dtype=F64, rngs=nnx.Rngs(0)), ce)
    lm_batch = gj.data.token_sequences(key, n=8, seq_len=8, vocab_size=16)
    out = {"mlp": (mlp, mlp_batch), "cnn": (cnn, cnn_batch), "transformer": (lm, lm_batch)}
    for _, batch in out.values():
        if "inputs" in batch and jnp.issubdtype(batch["inputs"].dtype, jnp.floating):
            batch["inputs"] = batch["inputs"].astype(F64)
    return out


def train(loss_fn, params, batch, steps: int, lr: float):
    step = jax.jit(lambda p: jax.tree_util.tree_map(
        lambda x, g: x - lr * g, p, jax.grad(loss_fn)(p, batch)))
    for _ in range(steps):
        params = step(params)
    return params, float(loss_fn(params, batch))


def measure(name: str, ad, params, batch, point: str, fisher_type: str) -> dict:
    G = gj.ggn(ad.model_fn, ad.head, params, batch, check=False)
    kw = dict(fisher_type=fisher_type, check=False)
    if fisher_type == "mc":
        kw["key"] = jax.random.key(1)
    K = kfac(ad.model_fn, ad.head, params, batch, **kw)
    build = median_time(
        lambda: kfac(ad.model_fn, ad.head, params, batch, warn=False, **kw).operands, repeats=3
    )
    v = gj.tree.random_like(jax.random.key(2), params)
    k_mv = median_time(lambda: apply(K, v))
    g_mv = median_time(lambda: apply(G, v))
    cmp = compare_curvature(K, G, k=5, method="exact", dense_limit=K.n_params)
    return {
        "model": name,
        "point": point,
        "fisher_type": fisher_type,
        "n_params": K.n_params,
        "coverage": K.coverage.fraction,
        "uncovered": list(K.coverage.uncovered_paths),
        "top_eigenvalue_ratio": cmp.top_eigenvalue_ratio,
        "top_kfac": [float(x) for x in cmp.top_approx],
        "top_ggn": [float(x) for x in cmp.top_reference],
        "subspace_overlap_5": cmp.subspace_overlap,
        "rel_frobenius": cmp.rel_frobenius_error,
        "rel_frobenius_blocks": cmp.rel_frobenius_error_blocks,
        "build_s": build,
        "kfac_matvec_s": k_mv,
        "ggn_matvec_s": g_mv,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller models (CI)")
    parser.add_argument("--steps", type=int, default=100, help="SGD steps for the 'trained' point")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--out", default="benchmarks/results/kfac_vs_ggn.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore", KFACCoverageWarning)

    rows = []
    header = (f"{'model':<12} {'point':<8} {'fisher':<7} {'n':>5} {'cov':>6} {'l1 K/G':>7} "
              f"{'ovl@5':>6} {'relF':>6} {'relF blk':>8} {'build ms':>9} {'K-mv ms':>8} "
              f"{'G-mv ms':>8}")
    print(header)
    print("-" * len(header))
    for name, (ad, batch) in cases(args.quick).items():
        points = [("init", ad.params)]
        if args.steps > 0:
            trained, loss = train(ad.loss_fn, ad.params, batch, args.steps, args.lr)
            points.append((f"sgd{args.steps}", trained))
        for point, params in points:
            for fisher_type in ("type-2", "mc"):
                r = measure(name, ad, params, batch, point, fisher_type)
                rows.append(r)
                print(f"{name:<12} {point:<8} {fisher_type:<7} {r['n_params']:>5} "
                      f"{r['coverage']:>6.3f} {r['top_eigenvalue_ratio']:>7.3f} "
                      f"{r['subspace_overlap_5']:>6.3f} {r['rel_frobenius']:>6.3f} "
                      f"{r['rel_frobenius_blocks']:>8.3f} {1e3 * r['build_s']:>9.2f} "
                      f"{1e3 * r['kfac_matvec_s']:>8.3f} {1e3 * r['ggn_matvec_s']:>8.3f}",
                      flush=True)
    result = {
        "benchmark": "kfac_vs_ggn",
        "quick": args.quick,
        "steps": args.steps,
        "platform": platform.platform(),
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
