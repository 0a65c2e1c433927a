"""Attention geometry: SVD metrics, maps, capture, restricted Hessian (float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import dense_hessian
from jax.flatten_util import ravel_pytree

import gradience_jax as gj
from gradience_jax import attention as ga
from gradience_jax.models import TinyTransformerLM, from_nnx

D_MODEL, HEADS, SEQ = 8, 2, 4  # the seed's attention layer


def _np_erank(s):
    p = s / s.sum()
    p = p[p > 0]
    return np.exp(-np.sum(p * np.log(p)))


@pytest.fixture(scope="module")
def lm():
    model = TinyTransformerLM(vocab_size=6, d_model=D_MODEL, num_heads=HEADS, num_layers=1,
                              d_ff=8, max_len=SEQ, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    batch = gj.data.token_sequences(jax.random.key(1), n=3, seq_len=SEQ, vocab_size=6)
    return model, batch


def test_entropy_of_uniform_map_is_log_seq():
    for s in (1, 4):
        w = jnp.full((3, HEADS, 5, s), 1.0 / s)
        np.testing.assert_allclose(ga.attention_entropy(w), np.full(HEADS, np.log(s)), atol=1e-12)
    w = jnp.full((HEADS, 5, 4), 0.25)
    np.testing.assert_allclose(ga.attention_entropy(w, normalized=True), np.ones(HEADS), rtol=1e-12)
    # causal uniform: row t sees t + 1 keys; normalised entropy is 1 on rows with > 1 key
    causal = np.tril(np.ones((4, 4))) / np.arange(1, 5)[:, None]
    np.testing.assert_allclose(ga.attention_entropy(causal[None], normalized=True), [1.0], rtol=1e-12)
    np.testing.assert_allclose(ga.attention_entropy(causal[None]), [np.mean(np.log(np.arange(1, 5)))],
                               rtol=1e-12)
    one_hot = jnp.eye(4)[None, None]
    np.testing.assert_allclose(ga.attention_entropy(one_hot), [0.0], atol=1e-12)
    with pytest.raises(ValueError, match="weights"):
        ga.attention_entropy(jnp.ones((4, 4)))


def test_effective_rank_of_maps():
    eye = jnp.broadcast_to(jnp.eye(5), (2, 3, 5, 5))
    np.testing.assert_allclose(ga.attention_effective_rank(eye), np.full(3, 5.0), rtol=1e-10)
    uniform = jnp.full((1, 2, 5, 5), 0.2)  # rank one
    np.testing.assert_allclose(ga.attention_effective_rank(uniform), np.ones(2), rtol=1e-6)
    s = np.array([3.0, 1.0, 0.5, 0.0])
    assert float(ga.effective_rank(s)) == pytest.approx(_np_erank(s), rel=1e-12)
    assert float(ga.effective_rank(np.zeros(3))) == 0.0


def test_svd_metrics_equal_numpy():
    rng = np.random.default_rng(0)
    d_in, dh, d_out = 6, 3, 5
    params = {
        "query": {"kernel": jnp.asarray(rng.normal(size=(d_in, HEADS, dh)))},
        "key": {"kernel": jnp.asarray(rng.normal(size=(d_in, HEADS, dh)))},
        "value": {"kernel": jnp.asarray(rng.normal(size=(d_in, HEADS, dh)))},
        "out": {"kernel": jnp.asarray(rng.normal(size=(HEADS, dh, d_out)))},
    }
    res = ga.attention_svd(params)
    wq, wk, wv, wo = (np.asarray(params[n]["kernel"]) for n in ("query", "key", "value", "out"))
    for h in range(HEADS):
        mats = {"query": wq[:, h], "key": wk[:, h], "value": wv[:, h], "out": wo[h],
                "qk": wq[:, h] @ wk[:, h].T, "ov": wv[:, h] @ wo[h]}
        for name, m in mats.items():
            s = np.linalg.svd(m, compute_uv=False)[:dh]
            np.testing.assert_allclose(res.singular_values[name][h], s, rtol=1e-10, atol=1e-12,
                                       err_msg=name)
            assert res.effective_rank[name][h] == pytest.approx(_np_erank(s), rel=1e-10)
            assert res.stable_rank[name][h] == pytest.approx(np.sum(s**2) / s[0] ** 2, rel=1e-10)
            assert res.condition_number[name][h] == pytest.approx(s[0] / s[-1], rel=1e-8)


def test_attention_params_sources(lm):
    model, _ = lm
    layer = "blocks/0/attention"
    a = ga.attention_params(model.blocks[0].attention)
    b = ga.attention_params(nnx.split(model, nnx.Param, ...)[1], layer)
    c = ga.attention_params(model, layer)
    for x, y, z in zip(a, b, c):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)
    assert a.num_heads == HEADS and a.head_dim == D_MODEL // HEADS
    with pytest.raises(ValueError, match="blocks/0/attention"):
        ga.attention_params(model, "blocks/1/attention")


def test_capture_matches_a_manual_computation(lm):
    model, batch = lm
    before = model(batch["inputs"])
    caps = ga.capture_attention(model, batch["inputs"])
    assert list(caps) == ["blocks/0/attention"]
    cap = caps["blocks/0/attention"]
    w = np.asarray(cap.weights)
    assert w.shape == (3, HEADS, SEQ, SEQ)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-12)
    assert np.all(np.triu(w, k=1) == 0)  # causal
    q, k = np.asarray(cap.query), np.asarray(cap.key)
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(np.tril(np.ones((SEQ, SEQ), bool)), logits, -np.inf)
    ref = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(w, ref / ref.sum(-1, keepdims=True), rtol=1e-10)
    # the model is unchanged afterwards
    np.testing.assert_array_equal(model(batch["inputs"]), before)
    assert model.blocks[0].attention.attention_fn.__name__ == "dot_product_attention"


def test_value_norms_and_correlations_equal_numpy():
    rng = np.random.default_rng(3)
    q, k, v = (rng.normal(size=(4, SEQ, HEADS, 3)) for _ in range(3))
    np.testing.assert_allclose(ga.value_norms(v), np.linalg.norm(v, axis=-1).mean(0).T, rtol=1e-12)
    qc = np.asarray(ga.query_correlation(q))
    np.testing.assert_allclose(qc, np.corrcoef(q.reshape(-1, HEADS * 3), rowvar=False), atol=1e-12)
    qk = np.asarray(ga.query_key_correlation(q, k))
    for h in range(HEADS):
        full = np.corrcoef(q[:, :, h].reshape(-1, 3), k[:, :, h].reshape(-1, 3), rowvar=False)
        np.testing.assert_allclose(qk[h], full[:3, 3:], atol=1e-12)


def test_hessian_restricted_to_attention_equals_dense_sub_block():
    d = 4  # a smaller block than the seed's: the reference is a dense jax.hessian
    model = TinyTransformerLM(vocab_size=5, d_model=d, num_heads=HEADS, num_layers=1, d_ff=4,
                              max_len=3, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    batch = gj.data.token_sequences(jax.random.key(1), n=2, seq_len=3, vocab_size=5)
    adapted = from_nnx(model, gj.heads.softmax_cross_entropy())
    ev = ga.attention_hessian_eigenvalues(adapted.loss_fn, adapted.params, batch,
                                          layer="blocks/0/attention")
    mask = gj.tree.map_with_path(lambda p, x: jnp.full(x.shape, p.startswith("blocks/0/attention/")),
                                 adapted.params)
    idx = np.flatnonzero(np.asarray(ravel_pytree(mask)[0]))
    h = dense_hessian(adapted.loss_fn, adapted.params, batch)[np.ix_(idx, idx)]
    ref = np.sort(np.linalg.eigvalsh(h))[::-1]
    assert ev.shape == (4 * d * d + 3 * d + d,)
    np.testing.assert_allclose(ev, ref, rtol=1e-8, atol=1e-10)


def test_attention_geometry_of_the_seed_layer():
    """The seed's single attention layer: d_model 8, 2 heads, sequences of 4."""
    mha = nnx.MultiHeadAttention(HEADS, D_MODEL, decode=False, param_dtype=jnp.float64,
                                 rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (5, SEQ, D_MODEL), jnp.float64)
    batch = {"inputs": x, "targets": jnp.roll(x, 1, axis=1)}
    adapted = from_nnx(mha, gj.heads.mse())
    geo = ga.attention_geometry(mha, x, loss_fn=adapted.loss_fn, batch=batch)
    assert geo.layer == "" and geo.weights.shape == (5, HEADS, SEQ, SEQ)
    assert geo.entropy.shape == (HEADS,) and np.all(geo.entropy <= np.log(SEQ) + 1e-12)
    assert np.all((geo.normalized_entropy > 0) & (geo.normalized_entropy <= 1 + 1e-12))
    assert geo.value_norms.shape == (HEADS, SEQ)
    assert geo.query_correlation.shape == (D_MODEL, D_MODEL)
    assert geo.query_key_correlation.shape == (HEADS, D_MODEL // HEADS, D_MODEL // HEADS)
    n_attn = gj.tree.size(adapted.params)
    assert geo.hessian_eigenvalues.shape == (n_attn,)
    assert np.all(np.diff(geo.hessian_eigenvalues) <= 0)
    assert set(geo.summary()) >= {"entropy", "map_effective_rank", "hessian_lambda_max"}


def test_old_import_paths_and_numerics_only():
    """The experiments moved to ``experiments.attention``; ``attention.<name>`` still works."""
    from gradience_jax.experiments import attention as ea
    from gradience_jax.weights import effective_rank

    for name in ("attention_geometry_experiment", "attention_dynamics_experiment",
                 "AttentionGeometryResult", "AttentionDynamicsResult", "TASKS"):
        assert getattr(ga, name) is getattr(ea, name), name
        assert ga._MOVED[name] == "gradience_jax.experiments.attention"
    assert ga.effective_rank is effective_rank
    assert set(ga._MOVED) <= set(dir(ga))
    with pytest.raises(AttributeError, match="no_such_name"):
        ga.no_such_name  # noqa: B018


def test_qk_effective_rank_matches_the_svd_metrics(lm):
    model, _ = lm
    p = ga.attention_params(model, "blocks/0/attention")
    svd = ga.attention_svd(model, "blocks/0/attention")
    np.testing.assert_allclose(ga.qk_effective_rank(p), svd.effective_rank["qk"], rtol=1e-12)
