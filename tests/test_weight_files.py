"""Weight spectra from .safetensors files (gradience_jax.weights.files).

Files are written with the ``safetensors`` package itself (single files, sharded checkpoints
with a ``model.safetensors.index.json`` as Hugging Face writes them, fp32 and bf16); the
references are the arrays that were written: NumPy float64 SVDs of them, and
``weight_spectra`` on the same arrays in Flax orientation (transposed), which must agree
because every metric depends only on the singular values. LoRA deltas are checked against
``B @ A`` formed in float64.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

pytest.importorskip("safetensors")
import ml_dtypes  # noqa: E402 - ships with jax
from safetensors.numpy import save_file  # noqa: E402

from gradience_jax import weights as gw  # noqa: E402
from gradience_jax._validate import ArgumentTypeError  # noqa: E402
from gradience_jax.weights import files as gwf  # noqa: E402

RTOL = 1e-10  # host reports are float64 whatever the x64 setting


def _heavy(rng, n_out, n_in, alpha=2.5):
    """(out, in) matrix with a planted power-law spectrum (Pareto eigenvalues)."""
    m = min(n_out, n_in)
    lam = (1.0 - rng.random(m)) ** (-1.0 / (alpha - 1.0))
    u = np.linalg.qr(rng.standard_normal((n_out, m)))[0]
    v = np.linalg.qr(rng.standard_normal((n_in, m)))[0]
    return (u * np.sqrt(lam)) @ v.T


def _hf_tensors(rng, dtype=np.float32):
    """A small HF-style state dict: (out, in) Linear weights, biases, a norm, an embedding."""
    return {
        "model.embed_tokens.weight": rng.standard_normal((64, 24)).astype(dtype),
        "model.layers.0.self_attn.q_proj.weight": _heavy(rng, 24, 24).astype(dtype),
        "model.layers.0.mlp.up_proj.weight": _heavy(rng, 96, 24).astype(dtype),
        "model.layers.0.mlp.up_proj.bias": rng.standard_normal(96).astype(dtype),
        "model.layers.0.mlp.down_proj.weight": _heavy(rng, 24, 96).astype(dtype),
        "model.layers.1.mlp.down_proj.weight": _heavy(rng, 24, 96, 3.5).astype(dtype),
        "model.norm.weight": np.ones(24, dtype),
    }


def _write_sharded(folder, tensors, groups, index=True):
    """Shards ``model-0000i-of-0000n.safetensors`` (+ index) as transformers writes them."""
    n = len(groups)
    weight_map = {}
    for i, names in enumerate(groups, 1):
        shard = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: tensors[k] for k in names}, str(folder / shard), metadata={"format": "np"})
        weight_map.update({k: shard for k in names})
    if index:
        doc = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
               "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(doc))
    return folder


def _assert_same_metrics(a, b):
    """Two LayerSpectrum reports of the same singular values (possibly transposed input)."""
    np.testing.assert_allclose(a.singular_values, b.singular_values, rtol=RTOL)
    for f in ("stable_rank", "effective_rank", "spectral_norm", "frobenius_norm"):
        assert getattr(a, f) == pytest.approx(getattr(b, f), rel=RTOL), f
    assert a.numerical_rank == b.numerical_rank and a.num_spikes == b.num_spikes
    assert (a.alpha is None) == (b.alpha is None)
    if a.alpha is not None:
        assert a.alpha == pytest.approx(b.alpha, rel=1e-9)
        assert a.weighted_alpha == pytest.approx(b.weighted_alpha, rel=1e-9)


# ----------------------------------------------------------------------------------------
# single files
# ----------------------------------------------------------------------------------------


def test_single_file_round_trip_and_metrics_equal_the_arrays(tmp_path):
    rng = np.random.default_rng(0)
    tensors = _hf_tensors(rng)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    for where in (tmp_path / "model.safetensors", tmp_path, str(tmp_path)):
        loaded = gw.load_safetensors(where)
        assert list(loaded) == sorted(tensors, key=gwf._natural_key)
        for k, v in tensors.items():
            assert loaded[k].dtype == v.dtype and np.array_equal(loaded[k], v), k
    rep = gw.weight_spectra_from_file(tmp_path / "model.safetensors")
    matrices = {k for k, v in tensors.items() if v.ndim == 2}
    assert set(rep) == matrices and not rep.failed
    assert set(rep.skipped) == set(tensors) - matrices
    # the report equals weight_spectra on the arrays, and on the Flax (in, out) transposes
    direct = gw.weight_spectra(tensors)
    flax = gw.weight_spectra({k: {"kernel": tensors[k].T} for k in matrices})
    for k in matrices:
        w = tensors[k].astype(np.float64)
        assert rep[k].shape == w.shape  # the file's orientation is kept
        np.testing.assert_allclose(rep[k].singular_values, np.linalg.svd(w, compute_uv=False),
                                   rtol=1e-6)  # float32 data, float64 SVD: LAPACK noise only
        s = np.linalg.svd(w, compute_uv=False)
        assert rep[k].stable_rank == pytest.approx(np.sum(s**2) / s[0] ** 2, rel=1e-6)
        n = max(w.shape)
        np.testing.assert_allclose(rep[k].esd, s**2 / n, rtol=1e-6)  # ESD of W^T W / N
        _assert_same_metrics(rep[k], direct[k])
        _assert_same_metrics(rep[k], flax[f"{k}/kernel"])
    assert rep.summary.mean_alpha == pytest.approx(direct.summary.mean_alpha, rel=1e-12)


def test_bf16_file_reads_as_bfloat16_and_matches_the_upcast_arrays(tmp_path):
    rng = np.random.default_rng(1)
    tensors = _hf_tensors(rng, ml_dtypes.bfloat16)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    loaded = gw.load_safetensors(tmp_path)
    for k, v in tensors.items():
        assert loaded[k].dtype == ml_dtypes.bfloat16
        assert np.array_equal(loaded[k].view(np.uint16), v.view(np.uint16)), k
    rep = gw.weight_spectra_from_file(tmp_path)
    for k in rep:
        w = tensors[k].astype(np.float64)
        np.testing.assert_allclose(rep[k].singular_values, np.linalg.svd(w, compute_uv=False),
                                   rtol=1e-9)
        # analysed as the float32 array it exactly is (bf16's own eps would make the default
        # rank tolerance exceed sigma_1 at this size: no eigenvalue left to fit)
        _assert_same_metrics(rep[k], gw.weight_spectra({k: tensors[k].astype(np.float32)})[k])
    big = rep["model.layers.0.mlp.up_proj.weight"]  # 96 x 24 ... and a 200 x 150 one:
    wide = _heavy(rng, 200, 150).astype(ml_dtypes.bfloat16)
    save_file({"wide.weight": wide}, str(tmp_path / "wide.safetensors"))
    ls = gw.weight_spectra_from_file(tmp_path / "wide.safetensors")["wide.weight"]
    assert ls.alpha is not None and ls.numerical_rank == 150, ls.alpha_missing_reason
    assert big.alpha is not None


def test_raw_byte_reader_equals_the_numpy_api(tmp_path, monkeypatch):
    """The fallback for dtypes an older safetensors refuses for NumPy (BF16) reads the same
    bits; forced here by making the NumPy API refuse every tensor."""
    rng = np.random.default_rng(2)
    tensors = {"w_bf16": rng.standard_normal((5, 7)).astype(ml_dtypes.bfloat16),
               "w_f16": rng.standard_normal((3, 4)).astype(np.float16),
               "w_f64": rng.standard_normal((4, 2)), "ids": np.arange(6, dtype=np.int64),
               "mask": np.array([True, False, True]), "scalar": np.array(3.5, np.float32)}
    file = tmp_path / "m.safetensors"
    save_file(tensors, str(file))
    import safetensors

    real = safetensors.safe_open

    class Refusing:
        def __init__(self, *args, **kw):
            self._h = real(*args, **kw)

        def __enter__(self):
            self._inner = self._h.__enter__()
            return self

        def __exit__(self, *exc):
            return self._h.__exit__(*exc)

        def keys(self):
            return self._inner.keys()

        def get_tensor(self, name):
            raise TypeError(f"data type of {name} not understood")

    monkeypatch.setattr(safetensors, "safe_open", Refusing)
    loaded = gw.load_safetensors(file)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and loaded[k].shape == v.shape, k
        assert loaded[k].tobytes() == np.asarray(v).tobytes(), k


def test_torch_conv_weights_match_the_flax_leading_rule(tmp_path):
    """(out, in, kh, kw) -> (out, in*kh*kw) has the singular values of the Flax kernel
    (kh, kw, in, out) under the "leading" rule."""
    rng = np.random.default_rng(3)
    conv = rng.standard_normal((16, 4, 3, 3)).astype(np.float32)
    save_file({"features.0.weight": conv}, str(tmp_path / "model.safetensors"))
    rep = gw.weight_spectra_from_file(tmp_path)
    flax = gw.weight_spectra({"Conv_0": {"kernel": conv.transpose(2, 3, 1, 0)}})
    assert rep["features.0.weight"].shape == (16, 36)
    assert rep["features.0.weight"].reshape_rule == "custom"
    _assert_same_metrics(rep["features.0.weight"], flax["Conv_0/kernel"])
    # without the file rule, weight_spectra cannot guess a torch layout and says so
    plain = gw.weight_spectra(gw.load_safetensors(tmp_path))
    assert "no reshape rule" in plain.skipped["features.0.weight"]


# ----------------------------------------------------------------------------------------
# sharded checkpoints
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_sharded_checkpoint_by_index_directory_or_shard(tmp_path, dtype):
    rng = np.random.default_rng(4)
    tensors = _hf_tensors(rng, dtype)
    names = sorted(tensors)
    _write_sharded(tmp_path, tensors, [names[:3], names[3:5], names[5:]])
    index = tmp_path / "model.safetensors.index.json"
    shard2 = tmp_path / "model-00002-of-00003.safetensors"
    assert gw.safetensors_files(index) == [tmp_path / f"model-0000{i}-of-00003.safetensors"
                                           for i in (1, 2, 3)]
    for where in (index, tmp_path, shard2):
        loaded = gw.load_safetensors(where)
        assert set(loaded) == set(tensors)
        for k, v in tensors.items():
            assert np.array_equal(loaded[k].astype(np.float64), v.astype(np.float64)), k
    only = gw.load_safetensors(shard2, shard_only=True)
    assert set(only) == set(names[3:5])
    rep = gw.weight_spectra_from_file(index)
    single = tmp_path / "single"
    single.mkdir()
    save_file(tensors, str(single / "model.safetensors"))
    ref = gw.weight_spectra_from_file(single)
    assert list(rep) == list(ref)
    for k in rep:
        _assert_same_metrics(rep[k], ref[k])
        w = tensors[k].astype(np.float64)
        np.testing.assert_allclose(rep[k].singular_values,
                                   np.linalg.svd(w, compute_uv=False), rtol=1e-6)
    # select opens only the shards it needs
    sel = gw.load_safetensors(index, select=[names[0], names[-1]])
    assert set(sel) == {names[0], names[-1]}
    assert set(gw.load_safetensors(index, select=lambda n: n.endswith(".bias"))) == {
        "model.layers.0.mlp.up_proj.bias"}


def test_shard_set_without_index(tmp_path):
    rng = np.random.default_rng(5)
    tensors = _hf_tensors(rng)
    names = sorted(tensors)
    _write_sharded(tmp_path, tensors, [names[:4], names[4:]], index=False)
    assert set(gw.load_safetensors(tmp_path)) == set(tensors)
    assert set(gw.load_safetensors(tmp_path / "model-00001-of-00002.safetensors")) == set(tensors)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        gw.load_safetensors(tmp_path / "model-00001-of-00002.safetensors")


# ----------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------


def _lora_tensors(rng, r=4):
    pre = "base_model.model.model.layers"
    t = {}
    shapes = {"0.self_attn.q_proj": (24, 32), "0.mlp.down_proj": (32, 48),
              "1.self_attn.q_proj": (24, 32)}
    for mod, (n_out, n_in) in shapes.items():
        t[f"{pre}.{mod}.lora_A.weight"] = rng.standard_normal((r, n_in)).astype(np.float32)
        t[f"{pre}.{mod}.lora_B.weight"] = rng.standard_normal((n_out, r)).astype(np.float32)
    return t, [f"{pre}.{m}" for m in shapes]


def test_lora_pairs_and_deltas_equal_b_times_a(tmp_path):
    rng = np.random.default_rng(6)
    t, modules = _lora_tensors(rng)
    pairs = gw.lora_pairs(t)
    assert list(pairs) == sorted(modules, key=gwf._natural_key)
    for m in modules:
        assert pairs[m] == (f"{m}.lora_A.weight", f"{m}.lora_B.weight")

    def ref(m, s):
        b = t[f"{m}.lora_B.weight"].astype(np.float64)
        return s * b @ t[f"{m}.lora_A.weight"].astype(np.float64)

    for kw, s in (({}, 1.0), ({"scale": 0.5}, 0.5), ({"alpha": 16.0}, 16.0 / 4),
                  ({"config": {"lora_alpha": 8, "r": 4, "use_rslora": True}}, 8 / 2.0)):
        deltas = gw.lora_deltas(t, **kw)
        assert set(deltas) == {f"{m}.lora_delta" for m in modules}
        for m in modules:
            d = deltas[f"{m}.lora_delta"]
            assert d.shape == t[f"{m}.lora_B.weight"].shape[:1] + t[f"{m}.lora_A.weight"].shape[1:]
            np.testing.assert_allclose(d, ref(m, s), rtol=1e-5, atol=1e-5 * np.abs(ref(m, s)).max())
    # alpha_pattern: a per-module alpha (PEFT matches the key as a suffix of the module name)
    cfg = {"lora_alpha": 8, "alpha_pattern": {"down_proj": 32}}
    d = gw.lora_deltas(t, config=cfg)
    for m, s in ((modules[1], 8.0), (modules[0], 2.0)):
        r = ref(m, s)
        np.testing.assert_allclose(d[f"{m}.lora_delta"], r, rtol=1e-5, atol=1e-5 * np.abs(r).max())
    assert gw.lora_pairs({"fc.weight": np.ones((2, 2))}) == {}


def test_lora_file_analysed_as_delta_with_the_adapter_config(tmp_path):
    rng = np.random.default_rng(7)
    t, modules = _lora_tensors(rng, r=12)
    save_file(t, str(tmp_path / "adapter_model.safetensors"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_alpha": 24, "r": 12}))
    rep = gw.weight_spectra_from_file(tmp_path / "adapter_model.safetensors")
    assert set(rep) == {f"{m}.lora_delta" for m in modules}
    for m in modules:
        delta = 2.0 * t[f"{m}.lora_B.weight"].astype(np.float64) @ t[f"{m}.lora_A.weight"]
        s = np.linalg.svd(delta, compute_uv=False)
        np.testing.assert_allclose(rep[f"{m}.lora_delta"].singular_values[:12], s[:12], rtol=1e-5)
        assert rep[f"{m}.lora_delta"].numerical_rank == 12
    both = gw.weight_spectra_from_file(tmp_path, lora="both", lora_scale=1.0)
    assert set(both) == set(rep) | set(t)
    factors = gw.weight_spectra_from_file(tmp_path, lora="factors")
    assert set(factors) == set(t)


def test_lora_errors(tmp_path):
    rng = np.random.default_rng(8)
    t, modules = _lora_tensors(rng)
    lone = {k: v for k, v in t.items() if not k.startswith(modules[0]) or "lora_A" in k}
    with pytest.raises(ValueError, match="has no lora_B partner"):
        gw.lora_pairs(lone)
    bad = dict(t)
    bad[f"{modules[0]}.lora_B.weight"] = np.ones((24, 5), np.float32)
    with pytest.raises(ValueError, match="LoRA factors do not match"):
        gw.lora_deltas(bad)
    with pytest.raises(ValueError, match="at most one of scale, alpha and config"):
        gw.lora_deltas(t, scale=1.0, alpha=2.0)
    with pytest.raises(ValueError, match="no 'lora_alpha'"):
        gw.lora_deltas(t, config={"r": 4})
    with pytest.raises(ValueError, match="scale must be finite"):
        gw.lora_deltas(t, scale=float("nan"))
    with pytest.raises(ArgumentTypeError, match="tensors must be a mapping"):
        gw.lora_pairs([1, 2])


# ----------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------


def test_missing_and_corrupt_files_raise_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such safetensors"):
        gw.load_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="no .safetensors file"):
        gw.load_safetensors(tmp_path)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="shorter than its 8-byte header"):
        gw.load_safetensors(junk)
    junk.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="corrupt header: it claims 1000000000 header bytes"):
        gw.load_safetensors(junk)
    junk.write_bytes((5).to_bytes(8, "little") + b"{nope")
    with pytest.raises(ValueError, match="corrupt header"):
        gw.load_safetensors(junk)
    good = tmp_path / "good.safetensors"
    save_file({"w": np.ones((64, 64), np.float32)}, str(good))
    truncated = tmp_path / "trunc.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError, match="trunc.safetensors"):
        gw.load_safetensors(truncated)
    with pytest.raises(ArgumentTypeError, match="path must be a str or os.PathLike"):
        gw.load_safetensors(3)
    with pytest.raises(KeyError, match="not_there"):
        gw.load_safetensors(good, select=["w", "not_there"])
    with pytest.raises(ArgumentTypeError, match="select must be None"):
        gw.load_safetensors(good, select="w")
    with pytest.raises(ValueError, match="lora must be one of"):
        gw.weight_spectra_from_file(good, lora="product")
    with pytest.raises(ValueError, match="no tensor selected"):
        gw.weight_spectra_from_file(good, select=lambda n: False)
    other = tmp_path / "other.safetensors"
    save_file({"v": np.ones((3, 3), np.float32)}, str(other))
    junk.unlink()
    truncated.unlink()
    with pytest.raises(ValueError, match="several .safetensors files"):
        gw.load_safetensors(tmp_path)


def test_index_errors(tmp_path):
    rng = np.random.default_rng(9)
    tensors = _hf_tensors(rng)
    names = sorted(tensors)
    _write_sharded(tmp_path, tensors, [names[:3], names[3:]])
    index = tmp_path / "model.safetensors.index.json"
    (tmp_path / "model-00002-of-00002.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(FileNotFoundError, match=r"to shard 'model-00002-of-00002.safetensors', "
                       "which is missing"):
        gw.load_safetensors(tmp_path)
    (tmp_path / "moved.safetensors").rename(tmp_path / "model-00002-of-00002.safetensors")
    doc = json.loads(index.read_text())
    doc["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"maps tensor\(s\) \['ghost.weight'\] to "
                       "model-00001-of-00002.safetensors, which does not hold them"):
        gw.load_safetensors(index)
    index.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        gw.load_safetensors(index)
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="needs a non-empty 'weight_map'"):
        gw.load_safetensors(index)


def test_nonfinite_tensors_are_named(tmp_path):
    rng = np.random.default_rng(10)
    tensors = _hf_tensors(rng)
    tensors["model.layers.0.mlp.up_proj.weight"][3, :2] = np.nan
    tensors["model.layers.0.mlp.up_proj.weight"][4, 0] = np.inf
    tensors["model.layers.0.mlp.up_proj.bias"][0] = -np.inf
    save_file(tensors, str(tmp_path / "model.safetensors"))
    msg = (r"non-finite values in 2 tensor\(s\): model.layers.0.mlp.up_proj.bias \(0 NaN, "
           r"1 Inf\), model.layers.0.mlp.up_proj.weight \(2 NaN, 1 Inf\)")
    with pytest.raises(FloatingPointError, match=msg):
        gw.load_safetensors(tmp_path)
    with pytest.raises(FloatingPointError, match=msg):
        gw.weight_spectra_from_file(tmp_path)
    loaded = gw.load_safetensors(tmp_path, check_finite=False)
    assert np.isnan(loaded["model.layers.0.mlp.up_proj.weight"][3, 0])
    rep = gw.weight_spectra_from_file(tmp_path, check_finite=False)
    assert "2 NaN" in rep.failed["model.layers.0.mlp.up_proj.weight"]
    assert len(rep) == 4


def test_missing_safetensors_package_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(ImportError, match=r"pip install 'gradience-jax\[files\]'"):
        gw.load_safetensors(tmp_path)


def test_weight_spectra_kwargs_pass_through(tmp_path):
    rng = np.random.default_rng(11)
    tensors = _hf_tensors(rng)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    rep = gw.weight_spectra_from_file(tmp_path, min_tail=5, filter=lambda p, x: "mlp" in p)
    assert set(rep) == {k for k, v in tensors.items() if "mlp" in k and v.ndim == 2}
    ref = gw.weight_spectra({k: v for k, v in tensors.items() if "mlp" in k}, min_tail=5)
    for k in rep:
        _assert_same_metrics(rep[k], ref[k])
    with pytest.raises(ValueError, match="min_tail must be >= 2"):
        gw.weight_spectra_from_file(tmp_path, min_tail=1)
    assert math.isfinite(rep.summary.mean_effective_rank)


def test_weight_spectra_reads_a_safetensors_path(tmp_path):
    """``gj.weight_spectra(path)`` is ``weight_spectra_from_file(path)`` (the issue's API)."""
    import gradience_jax as gj

    st = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(3)
    tensors = {"layer.weight": rng.standard_normal((40, 30)).astype(np.float32)}
    st.save_file(tensors, str(tmp_path / "model.safetensors"))
    via_path = gj.weight_spectra(tmp_path / "model.safetensors")
    direct = gj.weight_spectra_from_file(tmp_path / "model.safetensors")
    assert via_path["layer.weight"].alpha == direct["layer.weight"].alpha
    np.testing.assert_allclose(via_path["layer.weight"].spectral_norm,
                               np.linalg.svd(tensors["layer.weight"].astype(np.float64),
                                             compute_uv=False)[0], rtol=1e-5)
    with pytest.raises(ValueError, match="filter"):
        gj.weight_spectra(tmp_path / "model.safetensors", filter=lambda p, x: True)
