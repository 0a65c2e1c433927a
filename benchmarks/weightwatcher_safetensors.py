"""Per-layer alpha from .safetensors files: gradience_jax vs WeightWatcher on the same matrices.

Writes a small Hugging Face-style checkpoint with the ``safetensors`` package (``(out, in)``
Linear weights with planted power-law spectra, fp32 and bf16, sharded in two files with a
``model.safetensors.index.json``) and a PEFT LoRA adapter (``adapter_model.safetensors``),
then analyses both with

* ``gj.weights.weight_spectra_from_file`` (the NumPy safetensors API, no torch), and
* WeightWatcher 0.7.7 (``WeightWatcher(model=<directory>)``, its own safetensors reader;
  ``analyze(peft=True)`` for the adapter, whose ``lora_BA`` layers are ``B @ A`` unscaled,
  so gradience_jax runs with ``lora_scale=1``). When WeightWatcher cannot read the directory
  it is given a torch ``nn.Sequential`` of ``nn.Linear`` built from the same arrays.

ESD conventions (the reason ``lambda_max`` differs and ``alpha`` does not):

* gradience_jax: the ESD is the eigenvalues of ``W^T W / N`` (``N = max(shape)``,
  Martin & Mahoney's normalisation, the Marchenko-Pastur scale): ``lambda = sigma^2 / N``;
* WeightWatcher: the eigenvalues of ``W^T W`` unnormalised: ``lambda = sigma^2``.

A power-law exponent is scale invariant, so ``alpha`` agrees up to the fit's numerics;
``weighted_alpha = alpha * log10(sigma_1^2)`` is WeightWatcher's ``alpha_weighted`` (the
``W^T W / N`` version is ``weighted_alpha_normalized``). Both fit the Clauset et al.
power law with the KS-optimal ``xmin``; where the alphas differ by more than rounding the
two scans picked different ``xmin`` (the ``tail`` columns: eigenvalues in the fit; the
JSON has ``xmin`` on one scale: ours times ``N``). The table prints both sides; the JSON
goes to ``benchmarks/results/weightwatcher_safetensors.json``.

Run: ``python benchmarks/weightwatcher_safetensors.py`` (about 20 s on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE.parent) not in sys.path:
    sys.path.insert(0, str(_HERE.parent))

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.peers import RESULTS_DIR, machine, print_table, write_json  # noqa: E402
from gradience_jax import weights as gw  # noqa: E402

ALPHA_TOL = 0.05  # |alpha_gj - alpha_ww| counted as agreement (fit noise on bf16 layers)

#: name -> (out, in, planted alpha, scale, dtype)
LAYERS = {
    "model.layers.0.self_attn.q_proj.weight": (256, 256, 2.5, 1.0, "F32"),
    "model.layers.0.mlp.up_proj.weight": (512, 256, 3.0, 0.05, "F32"),
    "model.layers.0.mlp.down_proj.weight": (256, 512, 4.0, 10.0, "BF16"),
    "model.layers.1.self_attn.q_proj.weight": (256, 256, 3.5, 1.0, "BF16"),
    "model.layers.1.mlp.up_proj.weight": (600, 300, 2.2, 1.0, "F32"),
    "model.layers.1.mlp.down_proj.weight": (300, 600, 5.0, 0.5, "F32"),
}
LORA_RANK = 48


def planted(rng, n_out, n_in, alpha, scale):
    """(out, in) matrix whose squared singular values are Pareto(alpha) samples."""
    m = min(n_out, n_in)
    lam = scale * (1.0 - rng.random(m)) ** (-1.0 / (alpha - 1.0))
    u = np.linalg.qr(rng.standard_normal((n_out, m)))[0]
    v = np.linalg.qr(rng.standard_normal((n_in, m)))[0]
    return (u * np.sqrt(lam)) @ v.T


def write_checkpoint(folder: Path, rng) -> dict[str, np.ndarray]:
    """Two shards plus index, as transformers writes them; returns the arrays written."""
    from safetensors.numpy import save_file

    tensors = {}
    for name, (n_out, n_in, alpha, scale, dtype) in LAYERS.items():
        w = planted(rng, n_out, n_in, alpha, scale)
        tensors[name] = w.astype(ml_dtypes.bfloat16 if dtype == "BF16" else np.float32)
        tensors[name.replace(".weight", ".bias")] = np.zeros(n_out, np.float32)
    tensors["model.norm.weight"] = np.ones(256, np.float32)
    names = sorted(tensors)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(shards, 1):
        shard = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
         "weight_map": weight_map}))
    return tensors


def write_adapter(folder: Path, rng) -> dict[str, np.ndarray]:
    """A PEFT adapter: B (out, r) with a power-law spectrum, A (r, in) Gaussian."""
    from safetensors.numpy import save_file

    tensors = {}
    for name, (n_out, n_in, alpha, _, _) in list(LAYERS.items())[:3]:
        module = "base_model.model." + name[: -len(".weight")]
        tensors[f"{module}.lora_A.weight"] = (rng.standard_normal((LORA_RANK, n_in))
                                              / math.sqrt(n_in)).astype(np.float32)
        tensors[f"{module}.lora_B.weight"] = planted(rng, n_out, LORA_RANK, alpha,
                                                     1.0).astype(np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": LORA_RANK, "lora_alpha": LORA_RANK}))  # scale 1
    return tensors


def torch_model(matrices: dict[str, np.ndarray]):
    """nn.Sequential of bias-free nn.Linear holding the (out, in) matrices."""
    import torch

    layers = []
    for w in matrices.values():
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.asarray(w, np.float32)))
        layers.append(lin)
    return torch.nn.Sequential(*layers)


def ww_details(ww, source, matrices, **kw):
    """WeightWatcher's per-layer table: from the directory, else from a torch model."""
    try:
        details = ww.WeightWatcher(model=str(source)).analyze(
            randomize=False, mp_fit=False, plot=False, **kw)
        if len(details) == len(matrices):
            return details, "safetensors directory"
        how = f"directory gave {len(details)} layers"
    except Exception as exc:  # noqa: BLE001 - reported in the JSON, fall back below
        how = f"directory failed: {type(exc).__name__}: {exc}"
    details = ww.WeightWatcher(model=torch_model(matrices)).analyze(
        randomize=False, mp_fit=False, plot=False)
    return details, f"torch nn.Linear from the same arrays ({how})"


def compare(rep, details, names_gj):
    """Rows pairing our layers (in file order) with WeightWatcher's (same order)."""
    rows = []
    ww_rows = sorted(details.itertuples(), key=lambda r: r.layer_id)
    by_name = {str(r.name): r for r in ww_rows}
    for i, name in enumerate(names_gj):
        ls = rep[name]
        key = name[: -len(".weight")] if name.endswith(".weight") else name
        key = key.replace(".lora_delta", ".lora_BA")
        row = by_name.get(key, ww_rows[i] if i < len(ww_rows) else None)
        n = ls.n_rows
        gj_alpha = ls.alpha if ls.alpha is not None else math.nan
        ww_alpha = float(row.alpha) if row is not None else math.nan
        rows.append({
            "layer": name,
            "shape": f"{ls.shape[0]}x{ls.shape[1]}",
            "alpha gj": gj_alpha,
            "alpha ww": ww_alpha,
            "|d alpha|": abs(gj_alpha - ww_alpha),
            "w.alpha gj": ls.weighted_alpha if ls.weighted_alpha is not None else math.nan,
            "w.alpha ww": float(row.alpha_weighted) if row is not None else math.nan,
            "lambda_max gj (s1^2/N)": ls.lambda_max,
            "lambda_max ww (s1^2)": float(row.lambda_max) if row is not None else math.nan,
            "tail gj": ls.num_tail,
            "tail ww": int(row.num_pl_spikes) if row is not None else None,
            "xmin gj (x N)": ls.xmin * n if ls.xmin is not None else math.nan,
            "xmin ww": float(row.xmin) if row is not None else math.nan,
            "s1^2 gj": float(ls.singular_values[0]) ** 2,
            "N": n,
            "ww layer": str(row.name) if row is not None else None,
        })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    parser.add_argument("--quick", action="store_true", help="accepted for run_all (same size)")
    args = parser.parse_args(argv)
    try:
        import weightwatcher as ww
    except ImportError:
        print("weightwatcher is not installed (pip install -e '.[torch]'); nothing to compare")
        return 0
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.WARNING)
    rng = np.random.default_rng(0)
    result = {"machine": machine(), "alpha_tolerance": ALPHA_TOL, "conventions": {
        "gradience_jax": "ESD = eig(W^T W / N), N = max(shape): lambda = sigma^2 / N; "
                         "weighted_alpha = alpha * log10(sigma_1^2)",
        "weightwatcher": "ESD = eig(W^T W): lambda = sigma^2; alpha_weighted = "
                         "alpha * log10(lambda_max) = alpha * log10(sigma_1^2)",
        "alpha": "scale invariant: the same on both ESDs up to the fit's numerics",
    }}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, adapter = Path(tmp) / "model", Path(tmp) / "adapter"
        ckpt.mkdir()
        adapter.mkdir()
        tensors = write_checkpoint(ckpt, rng)
        lora = write_adapter(adapter, rng)
        t0 = time.perf_counter()
        rep = gw.weight_spectra_from_file(ckpt)
        t_gj = time.perf_counter() - t0
        matrices = {k: np.asarray(v, np.float32) for k, v in tensors.items()
                    if k in rep.layers}
        t0 = time.perf_counter()
        details, how = ww_details(ww, ckpt, matrices)
        t_ww = time.perf_counter() - t0
        rows = compare(rep, details, list(rep.layers))
        t0 = time.perf_counter()
        rep_lora = gw.weight_spectra_from_file(adapter, lora_scale=1.0)
        t_gj_lora = time.perf_counter() - t0
        deltas = gw.lora_deltas(lora, scale=1.0)
        t0 = time.perf_counter()
        lora_details, lora_how = ww_details(ww, adapter, deltas, peft=True)
        t_ww_lora = time.perf_counter() - t0
        lora_rows = compare(rep_lora, lora_details, list(rep_lora.layers))
    cols = ["layer", "shape", "alpha gj", "alpha ww", "|d alpha|", "tail gj", "tail ww",
            "w.alpha gj", "w.alpha ww", "lambda_max gj (s1^2/N)", "lambda_max ww (s1^2)"]
    print_table(f"checkpoint (2 shards, fp32 + bf16): WeightWatcher read the {how}", rows, cols)
    print_table(f"LoRA delta B @ A (r={LORA_RANK}): WeightWatcher read the {lora_how}",
                lora_rows, cols)
    agree = [abs(r["|d alpha|"]) <= ALPHA_TOL for r in rows + lora_rows
             if math.isfinite(r["|d alpha|"])]
    result.update({
        "checkpoint": {"rows": rows, "weightwatcher_source": how, "seconds_gj": t_gj,
                       "seconds_ww": t_ww},
        "lora": {"rank": LORA_RANK, "rows": lora_rows, "weightwatcher_source": lora_how,
                 "seconds_gj": t_gj_lora, "seconds_ww": t_ww_lora},
        "layers_compared": len(agree),
        "layers_agreeing": int(sum(agree)),
        "max_abs_alpha_difference": max((r["|d alpha|"] for r in rows + lora_rows
                                         if math.isfinite(r["|d alpha|"])), default=None),
    })
    print(f"alpha agrees within {ALPHA_TOL} on {sum(agree)}/{len(agree)} layers; "
          f"gradience_jax {t_gj + t_gj_lora:.2f} s, WeightWatcher {t_ww + t_ww_lora:.2f} s")
    write_json(args.results / "weightwatcher_safetensors.json", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
