"""Tests of gradience_jax.weights against closed forms and independent references.

References: numpy.linalg (norms, ranks, SVD), scipy (quadrature of the MP density,
entropy, KS test), a brute-force loop implementation of the Clauset et al. fit, the BBP
spike-location formula, Monte-Carlo Wishart samples, ground-truth exponents of Pareto
samples and, with the torch extra, the WeightWatcher package on the same matrices.
Host reports (``layer_spectrum``) are float64 whatever the x64 setting; the jittable paths
(``matrix_metrics``, ``spectral_truncate``, ``matricize``) take their tolerances from the
run's dtype (``helpers.tol``).
"""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.stats
from helpers import FLOAT, tol

from gradience_jax import weights as gw
from gradience_jax._validate import ArgumentTypeError
from gradience_jax.weights import layer as gw_layer

# ----------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------


def _orthonormal(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((n, k)))[0]


def _dct_basis(n: int, k: int) -> np.ndarray:
    """First k columns of the orthonormal DCT-II basis of size n (cheap exact orthonormal)."""
    i = np.arange(n)[:, None] + 0.5
    j = np.arange(k)[None, :]
    b = np.sqrt(2.0 / n) * np.cos(np.pi * i * j / n)
    b[:, 0] = 1.0 / np.sqrt(n)
    return b


def _with_singular_values(rng, s, n_rows, n_cols):
    k = len(s)
    return _orthonormal(rng, n_rows, k) @ np.diag(s) @ _orthonormal(rng, n_cols, k).T


def _pareto(rng, alpha, n, xmin=1.0):
    """Samples of the density p(x) = (alpha - 1) / xmin (x / xmin)^-alpha, x >= xmin."""
    return xmin * (1.0 - rng.random(n)) ** (-1.0 / (alpha - 1.0))


def _mp_density(x, gamma, sigma2=1.0):
    lo, hi = sigma2 * (1 - math.sqrt(gamma)) ** 2, sigma2 * (1 + math.sqrt(gamma)) ** 2
    if x <= lo or x >= hi:
        return 0.0
    return math.sqrt((hi - x) * (x - lo)) / (2 * math.pi * sigma2 * gamma * x)


def _mp_cdf_quad(x, gamma, sigma2=1.0):
    lo, hi = sigma2 * (1 - math.sqrt(gamma)) ** 2, sigma2 * (1 + math.sqrt(gamma)) ** 2
    if x <= lo:
        return 0.0
    return scipy.integrate.quad(
        _mp_density, lo, min(x, hi), args=(gamma, sigma2), epsabs=1e-12, epsrel=1e-10, limit=200
    )[0]


def _brute_force_fit(x, min_tail):
    """Clauset et al. by a plain loop over xmin candidates (reference implementation)."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    best = None
    for k in range(0, x.size - min_tail + 1):
        if k > 0 and x[k] == x[k - 1]:
            continue
        tail = x[k:]
        n = tail.size
        alpha = 1.0 + n / np.sum(np.log(tail / x[k]))
        model = 1.0 - (tail / x[k]) ** (1.0 - alpha)
        emp_hi = np.arange(1, n + 1) / n
        emp_lo = np.arange(0, n) / n
        d = max(np.max(np.abs(emp_hi - model)), np.max(np.abs(emp_lo - model)))
        if best is None or d < best[2]:
            best = (alpha, x[k], d, n)
    return best


@pytest.fixture(scope="module")
def gaussian():
    rng = np.random.default_rng(1234)
    w = rng.standard_normal((1000, 500))
    return w, gw.layer_spectrum(w)


@pytest.fixture(scope="module")
def spiked():
    """1000 x 500 Gaussian plus three rank-one signals above the BBP threshold."""
    rng = np.random.default_rng(7)
    n, m = 1000, 500
    theta = np.array([1.5, 2.5, 4.0])  # BBP threshold: sqrt(m / n) = 0.707
    u, v = _orthonormal(rng, n, 3), _orthonormal(rng, m, 3)
    w = rng.standard_normal((n, m)) + math.sqrt(n) * (u * np.sqrt(theta)) @ v.T
    return w, theta, gw.layer_spectrum(w)


# ----------------------------------------------------------------------------------------
# closed forms
# ----------------------------------------------------------------------------------------


def test_identity_closed_forms():
    n = 8
    ls = gw.layer_spectrum(np.eye(n))
    np.testing.assert_allclose(ls.singular_values, np.ones(n), atol=1e-14)
    assert ls.spectral_norm == pytest.approx(1.0)
    assert ls.frobenius_norm == pytest.approx(math.sqrt(n))
    assert ls.nuclear_norm == pytest.approx(n)
    assert ls.condition_number == pytest.approx(1.0)
    assert ls.stable_rank == pytest.approx(n)
    assert ls.effective_rank == pytest.approx(n)
    assert ls.numerical_rank == n
    assert ls.decay_exponent == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(ls.esd, np.full(n, 1.0 / n))


def test_chosen_singular_values_closed_forms():
    rng = np.random.default_rng(0)
    s = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.1])
    w = _with_singular_values(rng, s, 10, 6)
    ls = gw.layer_spectrum(w)
    np.testing.assert_allclose(ls.singular_values, s, rtol=1e-12)
    assert ls.spectral_norm == pytest.approx(5.0, rel=1e-12)
    assert ls.frobenius_norm == pytest.approx(math.sqrt(np.sum(s**2)), rel=1e-12)
    assert ls.nuclear_norm == pytest.approx(np.sum(s), rel=1e-12)
    assert ls.condition_number == pytest.approx(50.0, rel=1e-10)
    assert ls.stable_rank == pytest.approx(np.sum(s**2) / 25.0, rel=1e-12)
    assert ls.effective_rank == pytest.approx(math.exp(scipy.stats.entropy(s)), rel=1e-12)
    assert ls.numerical_rank == 6
    assert ls.lambda_max == pytest.approx(25.0 / 10, rel=1e-12)
    np.testing.assert_allclose(ls.esd, s**2 / 10, rtol=1e-12)
    # independent numpy references on the same matrix
    assert ls.spectral_norm == pytest.approx(np.linalg.norm(w, 2), rel=1e-12)
    assert ls.frobenius_norm == pytest.approx(np.linalg.norm(w, "fro"), rel=1e-12)
    assert ls.nuclear_norm == pytest.approx(np.linalg.norm(w, "nuc"), rel=1e-12)
    assert ls.condition_number == pytest.approx(np.linalg.cond(w), rel=1e-10)
    # a tolerance between 0.5 and 0.1 relative to sigma_1 = 5 drops the last value
    assert gw.layer_spectrum(w, rtol=0.05).numerical_rank == 5


def test_low_rank_closed_forms():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((30, 3)) @ rng.standard_normal((3, 20))
    ls = gw.layer_spectrum(w)
    assert ls.numerical_rank == 3 == np.linalg.matrix_rank(w)
    s_ref = np.linalg.svd(w, compute_uv=False)
    assert ls.stable_rank == pytest.approx(np.sum(s_ref**2) / s_ref[0] ** 2, rel=1e-10)
    assert ls.effective_rank == pytest.approx(math.exp(scipy.stats.entropy(s_ref[:3])), rel=1e-6)
    assert ls.condition_number > 1e12  # singular (sigma_min is round-off)
    assert ls.num_spikes == 3  # median-based MP scale is ~0: the three directions stand out


def test_orientation_invariance():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((40, 25))
    a, b = gw.layer_spectrum(w), gw.layer_spectrum(w.T)
    for f in (
        "spectral_norm",
        "nuclear_norm",
        "effective_rank",
        "stable_rank",
        "mp_sigma2",
        "mp_edge",
        "lambda_max",
    ):
        assert getattr(a, f) == pytest.approx(getattr(b, f), rel=1e-12)
    assert (a.n_rows, a.n_cols) == (b.n_rows, b.n_cols) == (40, 25)


def test_decay_exponent_of_power_law_singular_values():
    rng = np.random.default_rng(3)
    s = 5.0 * np.arange(1, 21, dtype=np.float64) ** -0.7
    ls = gw.layer_spectrum(_with_singular_values(rng, s, 30, 20))
    assert ls.decay_exponent == pytest.approx(0.7, abs=1e-8)


# ----------------------------------------------------------------------------------------
# jittable core
# ----------------------------------------------------------------------------------------


def test_matrix_metrics_jit_equals_eager_and_host():
    rng = np.random.default_rng(4)
    w = jnp.asarray(rng.standard_normal((60, 35)))
    with jax.disable_jit():  # op-by-op
        eager = gw.matrix_metrics(w, k_top=4)
    jitted = jax.jit(functools.partial(gw.matrix_metrics, k_top=4))(w)
    for name, e, j in zip(eager._fields, eager, jitted, strict=True):
        np.testing.assert_allclose(np.asarray(j), np.asarray(e), rtol=tol(1e-12, 1e-5),
                                   err_msg=name)
    host = gw.layer_spectrum(np.asarray(w))
    for name in (
        "spectral_norm",
        "frobenius_norm",
        "nuclear_norm",
        "condition_number",
        "stable_rank",
        "effective_rank",
        "numerical_rank",
        "lambda_max",
        "mp_sigma2",
        "mp_edge",
        "mp_edge_tw",
        "num_spikes",
    ):
        assert float(getattr(eager, name)) == pytest.approx(getattr(host, name),
                                                            rel=tol(1e-10, 1e-4)), name
    np.testing.assert_allclose(eager.top_singular_values, host.singular_values[:4],
                               rtol=tol(1e-12, 1e-5))


def test_matrix_metrics_pads_top_values_and_keeps_float32():
    w = jnp.asarray(np.diag([3.0, 2.0]), dtype=jnp.float32)
    mm = jax.jit(functools.partial(gw.matrix_metrics, k_top=4))(w)
    assert mm.spectral_norm.dtype == jnp.float32
    np.testing.assert_allclose(mm.top_singular_values, [3.0, 2.0, 0.0, 0.0])


def test_matrix_metrics_zero_matrix_under_jit():
    mm = jax.jit(gw.matrix_metrics)(jnp.zeros((5, 4)))
    assert float(mm.spectral_norm) == 0.0
    assert int(mm.numerical_rank) == 0
    assert float(mm.effective_rank) == 0.0 and float(mm.stable_rank) == 0.0
    assert np.isnan(float(mm.condition_number))


def test_matrix_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="2-D"):
        gw.matrix_metrics(jnp.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="k_top"):
        gw.matrix_metrics(jnp.ones((2, 3)), k_top=0)


# ----------------------------------------------------------------------------------------
# Marchenko-Pastur and Tracy-Widom
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [0.25, 0.5, 1.0])
def test_mp_cdf_and_median_match_quadrature(gamma):
    hi = (1 + math.sqrt(gamma)) ** 2
    xs = np.linspace(0.01, hi * 1.05, 25)
    ref = np.array([_mp_cdf_quad(x, gamma) for x in xs])
    np.testing.assert_allclose(gw.marchenko_pastur_cdf(xs, gamma), ref, atol=2e-6)
    med = gw.mp_median(gamma)
    assert _mp_cdf_quad(med, gamma) == pytest.approx(0.5, abs=2e-6)
    # the pdf integrates to one and scales with sigma2
    assert scipy.integrate.quad(
        lambda x: gw.marchenko_pastur_pdf(x, gamma, 2.0), 0, 2.0 * hi, limit=200
    )[0] == pytest.approx(1.0, abs=1e-6)


def test_tracy_widom_edge_monte_carlo():
    """The TW-corrected edge at level q is exceeded by white Wishart samples ~(1 - q)."""
    rng = np.random.default_rng(5)
    n, m, reps = 60, 30, 2000
    lmax = np.linalg.svd(rng.standard_normal((reps, n, m)), compute_uv=False)[:, 0] ** 2 / n
    edge95, _ = gw.tracy_widom_edge(n, m, 1.0, 0.95)
    edge99, _ = gw.tracy_widom_edge(n, m, 1.0, 0.99)
    assert 0.03 < np.mean(lmax > edge95) < 0.07
    assert np.mean(lmax > edge99) < 0.02
    with pytest.raises(ValueError, match="tw_level"):
        gw.tracy_widom_edge(n, m, 1.0, 0.975)


def test_gaussian_matches_marchenko_pastur(gaussian):
    w, ls = gaussian
    gamma = 500 / 1000
    # the bulk scale and edges (entries have variance 1)
    assert ls.mp_sigma2 == pytest.approx(1.0, rel=0.02)
    assert ls.mp_edge == pytest.approx((1 + math.sqrt(gamma)) ** 2, rel=0.02)
    # KS distance against the true MP law (scipy's KS statistic, our CDF checked above)
    ks_true = scipy.stats.kstest(ls.esd, lambda x: gw.marchenko_pastur_cdf(x, gamma)).statistic
    assert ks_true < 0.03
    ks_fit = scipy.stats.kstest(
        ls.esd, lambda x: gw.marchenko_pastur_cdf(x, gamma, ls.mp_sigma2)
    ).statistic
    assert ls.mp_ks_distance == pytest.approx(ks_fit, abs=1e-12)
    # top eigenvalue within the TW-corrected edge, no spikes, random-like
    assert ls.lambda_max <= ls.mp_edge_tw
    assert ls.num_spikes == 0 and ls.tail_mass_fraction == 0.0
    assert ls.verdict.startswith("random-like")
    assert ls.alpha is not None  # a fit exists, but the MP check overrides its verdict


def test_planted_spikes_are_counted_and_located(spiked):
    w, theta, ls = spiked
    gamma = 0.5
    assert ls.num_spikes == 3
    # BBP: a signal of strength theta above sqrt(gamma) sits at (1 + theta)(gamma + theta) / theta
    expected = np.sort((1 + theta) * (gamma + theta) / theta)[::-1]
    np.testing.assert_allclose(ls.esd[:3], expected, rtol=0.05)
    assert ls.esd[3] <= ls.mp_edge_tw
    assert ls.tail_mass_fraction == pytest.approx(np.sum(ls.esd[:3]) / np.sum(ls.esd), rel=1e-12)


# ----------------------------------------------------------------------------------------
# power-law fits
# ----------------------------------------------------------------------------------------


def test_vectorised_fit_equals_brute_force_loop():
    rng = np.random.default_rng(6)
    x = np.concatenate([rng.lognormal(0.0, 0.4, 200), _pareto(rng, 3.0, 120, xmin=2.0)])
    ref_alpha, ref_xmin, ref_ks, ref_n = _brute_force_fit(x, min_tail=10)
    fit = gw.fit_power_law(x, min_tail=10, block_elements=1000)  # several blocks
    assert fit.alpha == pytest.approx(ref_alpha, rel=1e-10)
    assert fit.xmin == pytest.approx(ref_xmin, rel=1e-12)
    assert fit.ks_distance == pytest.approx(ref_ks, abs=1e-10)
    assert fit.num_tail == ref_n
    assert fit.alpha_stderr == pytest.approx((ref_alpha - 1) / math.sqrt(ref_n))


def test_fixed_xmin_is_the_closed_form_mle():
    rng = np.random.default_rng(8)
    x = _pareto(rng, 2.8, 400)
    fit = gw.fit_power_law(x, xmin=1.5)
    tail = x[x >= 1.5]
    assert fit.num_tail == tail.size
    assert fit.alpha == pytest.approx(1 + tail.size / np.sum(np.log(tail / 1.5)), rel=1e-12)


@pytest.mark.parametrize("alpha", [2.5, 3.5])
def test_pareto_samples_recover_alpha(alpha):
    rng = np.random.default_rng(int(alpha * 10))
    fit = gw.fit_power_law(_pareto(rng, alpha, 5000))
    assert abs(fit.alpha - alpha) < 0.1


@pytest.mark.parametrize("alpha", [pytest.param(2.5, marks=pytest.mark.slow), 3.5])
def test_heavy_tailed_matrix_recovers_alpha(alpha):
    """W = U diag(sqrt(N lambda)) V^T: the ESD of W^T W / N is exactly lambda ~ Pareto.

    U and V are permuted orthonormal DCT bases (cheap, exactly orthonormal); the ESD does
    not depend on them. N = M keeps the SVD as cheap as M = 1500 allows.
    """
    rng = np.random.default_rng(100 + int(alpha * 10))
    n, m = 1500, 1500
    lam = _pareto(rng, alpha, m)
    u = _dct_basis(n, m)[:, rng.permutation(m)]
    v = _dct_basis(m, m)[rng.permutation(m)]
    w = (u * np.sqrt(n * lam)) @ v.T
    ls = gw.layer_spectrum(w)
    np.testing.assert_allclose(np.sort(ls.esd), np.sort(lam), rtol=1e-8)
    assert abs(ls.alpha - alpha) < 0.25
    # WeightWatcher's convention: the ESD of W^T W is n * lam, so lambda_max = n * max(lam)
    assert ls.weighted_alpha == pytest.approx(ls.alpha * math.log10(n * lam.max()), rel=1e-8)
    assert ls.weighted_alpha_normalized == pytest.approx(ls.alpha * math.log10(lam.max()),
                                                         rel=1e-8)
    assert ls.verdict.startswith("typical trained")
    assert ls.num_spikes > 0


def _planted_kernel(rng, n_in, n_out, alpha, scale):
    """(n_in, n_out) kernel whose W^T W has eigenvalues scale * Pareto(alpha) samples."""
    m = min(n_in, n_out)
    lam = scale * _pareto(rng, alpha, m)
    u, v = _orthonormal(rng, n_in, m), _orthonormal(rng, n_out, m)
    return (u * np.sqrt(lam)) @ v.T


@pytest.mark.torch
@pytest.mark.filterwarnings("ignore:Passing a dict to DataFrame.from_records")
def test_alpha_and_weighted_alpha_match_weightwatcher():
    """Per-layer alpha and alpha_weighted (and the model's mean alpha_weighted) agree with
    the WeightWatcher package on the same matrices: a torch nn.Linear model with planted
    heavy-tailed spectra, lambda_max of W^T W below and above 1 (so the sign of
    log10 lambda_max differs between layers). The ``W^T W / N`` quantity differs from
    WeightWatcher's by alpha * log10(N), far outside the tolerance."""
    import logging

    torch = pytest.importorskip("torch")
    ww = pytest.importorskip("weightwatcher")
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    rng = np.random.default_rng(20)
    specs = [(400, 200, 2.5, 1.0), (150, 300, 3.5, 0.01), (500, 250, 4.5, 20.0)]
    kernels, linears = [], []
    for n_in, n_out, alpha, scale in specs:
        kernel = _planted_kernel(rng, n_in, n_out, alpha, scale).astype(np.float32)
        lin = torch.nn.Linear(n_in, n_out, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(kernel.T.copy()))  # torch stores (out, in)
        kernels.append(kernel)
        linears.append(lin)
    model = torch.nn.Sequential(*linears)
    watcher = ww.WeightWatcher(model=model)
    details = watcher.analyze(randomize=False, mp_fit=False, plot=False)
    assert len(details) == len(specs)
    rep = gw.weight_spectra({f"layer_{i}": {"kernel": k} for i, k in enumerate(kernels)})
    for i, (row, kernel) in enumerate(zip(details.itertuples(), kernels, strict=True)):
        ls = rep[f"layer_{i}/kernel"]
        n = max(kernel.shape)
        assert row.N == n and row.M == min(kernel.shape)
        assert ls.singular_values[0] ** 2 == pytest.approx(row.lambda_max, rel=1e-6)
        assert ls.alpha == pytest.approx(row.alpha, abs=0.01)
        tol_w = 0.01 * abs(math.log10(row.lambda_max)) + 1e-6  # from the alpha tolerance
        assert ls.weighted_alpha == pytest.approx(row.alpha_weighted, abs=tol_w)
        assert ls.weighted_alpha_normalized == pytest.approx(
            row.alpha_weighted - row.alpha * math.log10(n), abs=tol_w + 0.01 * math.log10(n))
        assert abs(ls.weighted_alpha_normalized - row.alpha_weighted) > 10 * tol_w
    summary = watcher.get_summary(details)
    assert rep.summary.weighted_alpha == pytest.approx(summary["alpha_weighted"], abs=0.03)
    assert rep.summary.mean_alpha == pytest.approx(summary["alpha"], abs=0.01)


def test_verdict_ranges_are_heuristics_on_alpha():
    assert gw_layer._verdict(1.5, None, 5, 0.5, 100).startswith("very heavy-tailed")
    assert gw_layer._verdict(4.0, None, 5, 0.5, 100).startswith("typical trained")
    assert gw_layer._verdict(7.0, None, 5, 0.5, 100).startswith("random-like")
    assert gw_layer._verdict(None, "why", 0, None, 100) == "undetermined (why)"


# ----------------------------------------------------------------------------------------
# bad and degenerate input
# ----------------------------------------------------------------------------------------


def test_all_zero_matrix_is_defined():
    ls = gw.layer_spectrum(np.zeros((20, 12)))
    assert ls.spectral_norm == ls.frobenius_norm == ls.nuclear_norm == 0.0
    assert ls.numerical_rank == 0 and ls.effective_rank == 0.0 and ls.stable_rank == 0.0
    assert ls.alpha is None and "zero" in ls.alpha_missing_reason
    assert ls.verdict.startswith("undetermined")
    d = json.loads(ls.to_json())
    assert d["condition_number"] is None and d["alpha"] is None


def test_too_small_for_a_tail_fit():
    ls = gw.layer_spectrum(np.random.default_rng(9).standard_normal((3, 2)))
    assert ls.alpha is None and ls.weighted_alpha is None and ls.weighted_alpha_normalized is None
    assert "min_tail" in ls.alpha_missing_reason
    assert ls.numerical_rank == 2


def test_bad_inputs_raise_clearly():
    with pytest.raises(ValueError, match="at least 2 axes"):
        gw.layer_spectrum(np.ones(5))
    with pytest.raises(ValueError, match="reshape"):
        gw.layer_spectrum(np.ones((2, 3, 4)))
    bad = np.ones((4, 4))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="1 NaN"):
        gw.layer_spectrum(bad)
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="1 Inf"):
        gw.layer_spectrum(bad)
    with pytest.raises(ValueError, match="real"):
        gw.layer_spectrum(np.ones((3, 3), dtype=np.complex64))
    with pytest.raises(ValueError, match="tw_level"):
        gw.layer_spectrum(np.eye(3), tw_level=0.5)
    with pytest.raises(ValueError, match="min_tail"):
        gw.fit_power_law(np.ones(10), min_tail=1)
    with pytest.raises(ValueError, match="reshape rule"):
        gw.matricize(np.ones((2, 3)), rule="flatten")


W_BAD = np.random.default_rng(17).standard_normal((12, 8))


@pytest.mark.parametrize("call, exc, fragment", [
    (lambda: gw.layer_spectrum(W_BAD, rtol=-1.0), ValueError, "rtol must be >= 0"),
    (lambda: gw.layer_spectrum(W_BAD, rtol=1.0), ValueError, "rtol must be < 1"),
    (lambda: gw.layer_spectrum(W_BAD, rtol=float("nan")), ValueError, "rtol must be finite"),
    (lambda: gw.layer_spectrum(W_BAD, rtol="1e-3"), ArgumentTypeError, "rtol must be a real"),
    (lambda: gw.layer_spectrum(W_BAD, min_tail=1), ValueError, "min_tail must be >= 2"),
    (lambda: gw.layer_spectrum(W_BAD, min_tail=2.5), ArgumentTypeError, "min_tail must be an"),
    (lambda: gw.layer_spectrum(W_BAD, tw_level="0.99"), ArgumentTypeError, "tw_level"),
    (lambda: gw.layer_spectrum(W_BAD, key=0), TypeError, "key must be a PRNG key"),
    (lambda: gw.layer_spectrum(W_BAD, path=3), ArgumentTypeError, "path must be a string"),
    (lambda: gw.layer_spectrum(np.ones((0, 3))), ValueError, "positive dimensions"),
    (lambda: gw.layer_spectrum("abc"), ArgumentTypeError, "matrix must be real"),
    (lambda: gw.matrix_metrics(W_BAD, rtol=-1.0), ValueError, "rtol must be >= 0"),
    (lambda: gw.matrix_metrics(W_BAD, k_top=2.0), ArgumentTypeError, "k_top"),
    (lambda: gw.matrix_metrics(np.where(W_BAD > 1, np.inf, W_BAD)), ValueError, "Inf"),
    (lambda: gw.fit_power_law(np.arange(1.0, 40.0), xmin=0.0), ValueError, "xmin must be > 0"),
    (lambda: gw.fit_power_law([1.0, np.nan] * 10), ValueError, "10 NaN"),
    (lambda: gw.fit_power_law(np.arange(1.0, 40.0), block_elements=0), ValueError,
     "block_elements"),
    (lambda: gw.spectral_truncate(W_BAD, rank=9), ValueError, "rank must be <= 8"),
    (lambda: gw.spectral_truncate(W_BAD, rank=-1), ValueError, "rank must be >= 0"),
    (lambda: gw.spectral_truncate(W_BAD, energy=0.0), ValueError, "energy must be > 0"),
    (lambda: gw.spectral_truncate(np.where(W_BAD > 1, np.nan, W_BAD)), ValueError, "NaN"),
    (lambda: gw.spectral_merge(W_BAD, W_BAD, t=float("nan")), ValueError, "t must be finite"),
    (lambda: gw.spectral_merge(W_BAD, W_BAD, t="half"), ArgumentTypeError, "t must be a real"),
    (lambda: gw.randomization_baseline(W_BAD, None), ValueError, "key is required"),
    (lambda: gw.randomization_baseline(W_BAD, jax.random.key(0), singular_values=np.ones(3)),
     ValueError, "singular_values must have shape (8,)"),
    (lambda: gw.weight_spectra({"a": {"kernel": W_BAD}}, rtol=-1.0), ValueError, "rtol"),
    (lambda: gw.weight_spectra({"a": {"kernel": W_BAD}}, min_tail=0), ValueError, "min_tail"),
    (lambda: gw.weight_spectra({"a": {"kernel": W_BAD}}, filter="a"), ArgumentTypeError,
     "filter must be a callable"),
    (lambda: gw.mp_median(0.0), ValueError, "ratio must be > 0"),
    (lambda: gw.marchenko_pastur_cdf(1.0, 1.5), ValueError, "ratio must be <= 1"),
    (lambda: gw.marchenko_pastur_pdf(1.0, 0.5, -1.0), ValueError, "sigma2 must be > 0"),
    (lambda: gw.tracy_widom_edge(0, 3), ValueError, "n_rows must be >= 1"),
    (lambda: gw.mp_ks_threshold(0), ValueError, "num_eigs must be >= 1"),
])
def test_bad_arguments_name_the_argument(call, exc, fragment):
    with pytest.raises(exc) as info:
        call()
    assert fragment in str(info.value)


def test_rtol_is_honoured_at_its_bounds():
    """rtol = 0 counts every positive singular value; a tolerance just under one of the
    ratios sigma_i / sigma_1 keeps it (the numpy.linalg.matrix_rank rule)."""
    rng = np.random.default_rng(18)
    s = np.array([4.0, 2.0, 1.0, 1e-3])
    w = _with_singular_values(rng, s, 9, 4)
    assert gw.layer_spectrum(w, rtol=0.0).numerical_rank == 4
    assert gw.layer_spectrum(w, rtol=0.24).numerical_rank == 3  # 1 / 4 = 0.25 > 0.24
    assert gw.layer_spectrum(w, rtol=0.26).numerical_rank == 2
    for r in (0.0, 0.24, 0.26):
        assert gw.layer_spectrum(w, rtol=r).numerical_rank == np.linalg.matrix_rank(
            w, tol=r * np.linalg.norm(w, 2))


def test_weight_spectra_failures_are_reported_not_skipped():
    """A reshape callable returning a non-matrix, an empty kernel and an Inf kernel are
    failures (visible), a bias is skipped; the good layer is still analysed."""
    rng = np.random.default_rng(19)
    good = rng.standard_normal((16, 8))
    inf = good.copy()
    inf[2, 3] = -np.inf
    params = {"good": {"kernel": good, "bias": np.zeros(8)}, "inf": {"kernel": inf},
              "empty": {"kernel": np.zeros((0, 4))}, "odd": {"kernel": good}}
    rep = gw.weight_spectra(params, reshape=lambda p, x: np.ravel(x) if p == "odd/kernel"
                            else None)
    assert list(rep) == ["good/kernel"]
    assert set(rep.failed) == {"inf/kernel", "empty/kernel", "odd/kernel"}
    assert "1 Inf" in rep.failed["inf/kernel"]
    assert "positive dimensions" in rep.failed["empty/kernel"]
    assert "not a 2-D matrix" in rep.failed["odd/kernel"]
    assert set(rep.skipped) == {"good/bias"}
    assert rep["good/kernel"].spectral_norm == pytest.approx(np.linalg.norm(good, 2), rel=1e-12)


def test_degenerate_tail_reports_reason():
    fit = gw.fit_power_law(np.ones(50))
    assert fit.alpha is None and "equal" in fit.missing_reason


# ----------------------------------------------------------------------------------------
# reshape conventions
# ----------------------------------------------------------------------------------------


def test_matricize_conventions():
    rng = np.random.default_rng(10)
    conv = rng.standard_normal((3, 3, 4, 8)).astype(FLOAT)  # exact: a reshape, no arithmetic
    np.testing.assert_array_equal(gw.matricize(conv, path="net/conv/kernel"), conv.reshape(36, 8))
    q = rng.standard_normal((16, 2, 8)).astype(FLOAT)
    np.testing.assert_array_equal(gw.matricize(q, path="att/query/kernel"), q.reshape(16, 16))
    out = rng.standard_normal((2, 8, 16)).astype(FLOAT)
    np.testing.assert_array_equal(gw.matricize(out, path="att/out/kernel"), out.reshape(16, 16))
    np.testing.assert_array_equal(gw.matricize(q, rule="leading"), q.reshape(32, 8))
    with pytest.raises(ValueError, match="reshape='leading'"):
        gw.matricize(q)
    with pytest.raises(ValueError, match="no reshape rule"):
        gw.matricize(q, path="net/weird")
    heads = gw.head_matrices(q, kind="in")
    assert heads.shape == (2, 16, 8)
    np.testing.assert_array_equal(heads[1], q[:, 1, :])
    assert gw.head_matrices(out, kind="out").shape == (2, 8, 16)
    with pytest.raises(ValueError, match="kind"):
        gw.head_matrices(q, kind="both")


# ----------------------------------------------------------------------------------------
# whole models
# ----------------------------------------------------------------------------------------


def _filled(shapes, seed=0):
    """Replace abstract leaves by random values (no XLA compiles: keeps the tests fast)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray((0.3 * rng.standard_normal(s.shape)).astype(s.dtype)), shapes
    )


@pytest.fixture(scope="module")
def nnx_model():
    """A real nnx model (Embed, Conv, MultiHeadAttention, LayerNorm, Linear), random values.

    Built abstractly with nnx.eval_shape and filled with numpy draws: the real initialisers
    cost seconds of XLA compilation on a 2-core machine.
    """
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(50, 16, rngs=rngs)
            self.conv = nnx.Conv(3, 8, kernel_size=(3, 3), rngs=rngs)
            self.attn = nnx.MultiHeadAttention(
                num_heads=2, in_features=16, qkv_features=16, decode=False, rngs=rngs
            )
            self.norm = nnx.LayerNorm(16, rngs=rngs)
            self.head = nnx.Linear(16, 40, rngs=rngs)

    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: Net(nnx.Rngs(0))), nnx.Param, ...)
    assert not jax.tree_util.tree_leaves(rest)
    return nnx.merge(graphdef, _filled(params))


def test_weight_spectra_nnx_model(nnx_model):
    from flax import nnx

    model = nnx_model
    state = nnx.state(model, nnx.Param)
    rep = gw.weight_spectra(state)
    expected = {
        "attn/key/kernel": (16, 16),
        "attn/out/kernel": (16, 16),
        "attn/query/kernel": (16, 16),
        "attn/value/kernel": (16, 16),
        "conv/kernel": (27, 8),
        "embed/embedding": (50, 16),
        "head/kernel": (16, 40),
    }
    assert {p: rep[p].shape for p in rep} == expected
    assert rep["conv/kernel"].original_shape == (3, 3, 3, 8)
    assert rep["attn/query/kernel"].reshape_rule == "trailing"
    assert rep["attn/out/kernel"].reshape_rule == "leading"
    assert set(rep.skipped) == {
        "attn/key/bias",
        "attn/out/bias",
        "attn/query/bias",
        "attn/value/bias",
        "conv/bias",
        "head/bias",
        "norm/bias",
        "norm/scale",
    }
    # values agree with layer_spectrum on the independently reshaped kernel
    k = np.asarray(model.conv.kernel[...], dtype=np.float64).reshape(27, 8)
    assert rep["conv/kernel"].nuclear_norm == pytest.approx(np.linalg.norm(k, "nuc"), rel=1e-12)
    q = np.asarray(model.attn.query.kernel[...], dtype=np.float64).reshape(16, 16)
    assert rep["attn/query/kernel"].spectral_norm == pytest.approx(np.linalg.norm(q, 2), rel=1e-12)
    # nnx.split state and the module itself give the same report
    _, split_state = nnx.split(model, nnx.Param)
    assert list(gw.weight_spectra(split_state)) == list(rep)
    assert list(gw.weight_spectra(model)) == list(rep)


def test_weight_spectra_per_head_filter_and_reshape_override(nnx_model):
    model = nnx_model
    rep = gw.weight_spectra(model, filter=lambda p, leaf: p.startswith("attn"), per_head=True)
    assert all(p.startswith("attn") for p in rep)
    q = np.asarray(model.attn.query.kernel[...], dtype=np.float64)
    h1 = rep["attn/query/kernel/head_1"]
    assert h1.shape == (16, 8)
    assert h1.frobenius_norm == pytest.approx(np.linalg.norm(q[:, 1, :]), rel=1e-12)
    assert rep["attn/out/kernel/head_0"].shape == (8, 16)
    assert rep.summary.num_layers == 4  # the per-head views are not counted as layers
    rep2 = gw.weight_spectra(
        model,
        filter=lambda p, leaf: p == "conv/kernel",
        reshape=lambda p, leaf: np.asarray(leaf).reshape(-1, leaf.shape[-1] * leaf.shape[-2]),
    )
    assert rep2["conv/kernel"].shape == (9, 24) and rep2["conv/kernel"].reshape_rule == "custom"


def test_weight_spectra_linen_model():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3))(x).reshape(x.shape[0], -1)
            x = nn.Dense(32)(x)
            x = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x[:, None, :])
            return nn.Dense(10)(x)

    shapes = jax.eval_shape(Net().init, jax.random.key(0), jnp.ones((1, 6, 6, 2)))
    params = _filled(shapes)
    rep = gw.weight_spectra(params)
    assert {p: rep[p].shape for p in rep} == {
        "params/Conv_0/kernel": (18, 4),
        "params/Dense_0/kernel": (144, 32),
        "params/Dense_1/kernel": (32, 10),
        "params/MultiHeadDotProductAttention_0/key/kernel": (32, 8),
        "params/MultiHeadDotProductAttention_0/out/kernel": (8, 32),
        "params/MultiHeadDotProductAttention_0/query/kernel": (32, 8),
        "params/MultiHeadDotProductAttention_0/value/kernel": (32, 8),
    }
    w = np.asarray(params["params"]["Dense_0"]["kernel"], dtype=np.float64)
    assert rep["params/Dense_0/kernel"].stable_rank == pytest.approx(
        np.linalg.norm(w, "fro") ** 2 / np.linalg.norm(w, 2) ** 2, rel=1e-12
    )


def test_weight_spectra_reports_bad_leaves_and_summaries():
    rng = np.random.default_rng(11)
    g = rng.standard_normal((48, 24))
    nan = g.copy()
    nan[0, 0] = np.nan
    params = {f"layer_{i}": {"kernel": g * 10 ** (i / 2)} for i in (1, 2, 10)}
    params.update(
        {
            "nan": {"kernel": nan},
            "zero": {"kernel": np.zeros((6, 5))},
            "odd": {"w": np.ones((2, 2, 2, 2, 2))},
            "ints": {"kernel": np.ones((3, 3), int)},
            "vec": np.ones(4),
        }
    )
    rep = gw.weight_spectra(params)
    assert list(rep) == ["layer_1/kernel", "layer_2/kernel", "layer_10/kernel", "zero/kernel"]
    # a weight matrix that cannot be analysed is a failure, not a skipped leaf
    assert set(rep.failed) == {"nan/kernel"} and "nan/kernel" not in rep.skipped
    assert "non-finite" in rep.failed["nan/kernel"] and "1 NaN" in rep.failed["nan/kernel"]
    assert "no reshape rule" in rep.skipped["odd/w"]
    assert "floating" in rep.skipped["ints/kernel"]
    assert "1-D" in rep.skipped["vec"]
    s = rep.summary
    alphas = [rep[p].alpha for p in rep if rep[p].alpha is not None]
    assert s.num_layers == 4 and s.num_skipped == 3 and s.num_alpha_missing == 1
    assert s.num_failed == 1
    assert s.mean_alpha == pytest.approx(np.mean(alphas))
    weighted = [rep[p].alpha * math.log10(rep[p].singular_values[0] ** 2) for p in rep
                if rep[p].alpha is not None]
    assert s.weighted_alpha == pytest.approx(np.mean(weighted), rel=1e-12)
    normalized = [rep[p].alpha * math.log10(rep[p].lambda_max) for p in rep
                  if rep[p].alpha is not None]
    assert s.weighted_alpha_normalized == pytest.approx(np.mean(normalized), rel=1e-12)
    # lambda_max scales by 10^i / 10^... : log10 lambda_max of layers 1, 2, 10 at positions 0,1,2
    ys = [rep[p].log10_lambda_max for p in list(rep)[:3]]
    np.testing.assert_allclose(np.diff(ys), [1.0, 8.0], rtol=1e-10)
    assert s.trends["log10_lambda_max"] == pytest.approx(np.polyfit([0, 1, 2], ys, 1)[0])
    # JSON round trip, non-finite values as null
    d = json.loads(rep.to_json())
    assert set(d) == {"layers", "skipped", "failed", "summary"}
    assert d["failed"] == rep.failed and d["summary"]["num_failed"] == 1
    assert d["layers"]["zero/kernel"]["condition_number"] is None
    assert d["summary"]["num_layers"] == 4
    assert "singular_values" not in d["layers"]["layer_1/kernel"]
    full = json.loads(rep.to_json(include_arrays=True))
    np.testing.assert_allclose(
        full["layers"]["layer_1/kernel"]["singular_values"], rep["layer_1/kernel"].singular_values
    )
    text = rep.to_table(plain=True)
    assert "layer_10/kernel" in text and "odd/w" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("nan/kernel"))
    assert "FAILED: " in row and "1 NaN" in row
    assert "1 FAILED" in text.splitlines()[-1]
    from rich.table import Table

    assert isinstance(rep.to_table(), Table)
    with pytest.raises(ValueError, match="empty"):
        gw.weight_spectra({})


# ----------------------------------------------------------------------------------------
# randomisation baseline, truncation, merging
# ----------------------------------------------------------------------------------------


def test_randomization_baseline():
    key = jax.random.key(0)
    rng = np.random.default_rng(16)
    n, m = 300, 150
    g = rng.standard_normal((n, m))
    ls_g = gw.layer_spectrum(g)
    rb = gw.randomization_baseline(g, key)
    assert rb.lambda_max == pytest.approx(ls_g.lambda_max, rel=1e-12)
    assert abs(rb.delta) < 10 * ls_g.tw_scale and not rb.correlation_trap
    assert gw.randomization_baseline(g, key) == rb  # same key, same numbers
    u, v = _orthonormal(rng, n, 2), _orthonormal(rng, m, 2)
    w = g + math.sqrt(n) * (u * np.sqrt([3.0, 4.0])) @ v.T
    rs = gw.randomization_baseline(w, key)
    assert rs.delta > 1.0 and not rs.correlation_trap
    # one huge entry survives shuffling: a correlation trap
    trap = np.random.default_rng(12).standard_normal((200, 100))
    trap[3, 4] = 10 * math.sqrt(200)
    rt = gw.randomization_baseline(trap, key)
    assert rt.correlation_trap and abs(rt.delta) < 1.0
    ls = gw.layer_spectrum(trap, key=key)
    assert ls.correlation_trap and ls.lambda_max_shuffled == pytest.approx(rt.lambda_max_shuffled)


def test_spectral_truncate_at_mp_edge():
    rng = np.random.default_rng(13)
    n, m = 400, 200
    u, v = _orthonormal(rng, n, 3), _orthonormal(rng, m, 3)
    w = rng.standard_normal((n, m)) + math.sqrt(n) * (u * np.sqrt([2.0, 3.0, 5.0])) @ v.T
    res = gw.spectral_truncate(w)
    U, s, Vt = np.linalg.svd(w, full_matrices=False)
    assert int(res.rank) == 3
    np.testing.assert_allclose(res.matrix, (U[:, :3] * s[:3]) @ Vt[:3], atol=tol(1e-9, 2e-5))
    assert float(res.retained_energy) == pytest.approx(np.sum(s[:3] ** 2) / np.sum(s**2),
                                                       rel=tol(1e-9, 1e-5))
    assert float(res.retained_nuclear) == pytest.approx(np.sum(s[:3]) / np.sum(s),
                                                        rel=tol(1e-9, 1e-5))
    assert s[3] < float(res.threshold) < s[2]
    assert int(gw.matrix_metrics(jnp.asarray(w)).num_spikes) == 3
    assert gw.layer_spectrum(w).num_spikes == 3


def test_spectral_truncate_rank_energy_rescale_and_jit():
    rng = np.random.default_rng(14)
    w = rng.standard_normal((30, 20))
    s = np.linalg.svd(w, compute_uv=False)
    res = gw.spectral_truncate(w, rank=5)
    # Eckart-Young: the error is the discarded energy
    err2 = np.linalg.norm(w - np.asarray(res.matrix, np.float64)) ** 2
    assert err2 == pytest.approx(np.sum(s[5:] ** 2), rel=tol(1e-9, 1e-4))
    np.testing.assert_allclose(np.linalg.svd(np.asarray(res.matrix), compute_uv=False)[:5], s[:5],
                               rtol=tol(1e-9, 1e-5))
    cum = np.cumsum(s**2) / np.sum(s**2)
    res_e = gw.spectral_truncate(w, energy=0.5)
    assert int(res_e.rank) == int(np.searchsorted(cum, 0.5) + 1)
    assert float(res_e.retained_energy) >= 0.5
    res_r = gw.spectral_truncate(w, rank=5, rescale=True)
    assert np.linalg.norm(np.asarray(res_r.matrix, np.float64), "nuc") == pytest.approx(
        np.sum(s), rel=tol(1e-10, 1e-5))
    jitted = jax.jit(functools.partial(gw.spectral_truncate, rank=5))(jnp.asarray(w))
    np.testing.assert_allclose(jitted.matrix, res.matrix, atol=tol(1e-12, 1e-5))
    jitted_mp = jax.jit(gw.spectral_truncate)(jnp.asarray(w))
    assert int(jitted_mp.rank) == int(gw.spectral_truncate(w).rank)
    with pytest.raises(ValueError, match="at most one"):
        gw.spectral_truncate(w, rank=2, energy=0.5)
    with pytest.raises(ValueError, match="energy"):
        gw.spectral_truncate(w, energy=1.5)
    with pytest.raises(ValueError, match="2-D"):
        gw.spectral_truncate(np.ones(4))


def test_spectral_merge_rules():
    rng = np.random.default_rng(15)
    u, v = _orthonormal(rng, 12, 8), _orthonormal(rng, 8, 8)
    sa, sb = np.linspace(5, 1, 8), np.linspace(3, 0.5, 8)
    a, b = (u * sa) @ v.T, (u * sb) @ v.T
    # shared singular vectors: equals the linear interpolation
    atol = tol(1e-10, 1e-5)  # the merged matrix has the dtype of a (float32 with x64 off)
    np.testing.assert_allclose(gw.spectral_merge(a, b, t=0.3).matrix, 0.7 * a + 0.3 * b, atol=atol)
    # misaligned layers: the merged spectrum is the interpolated spectrum
    c, d = rng.standard_normal((12, 8)), rng.standard_normal((12, 8))
    sc, sd = np.linalg.svd(c, compute_uv=False), np.linalg.svd(d, compute_uv=False)
    res = gw.spectral_merge(c, d, t=0.5)
    np.testing.assert_allclose(
        np.linalg.svd(np.asarray(res.matrix), compute_uv=False), 0.5 * sc + 0.5 * sd,
        rtol=tol(1e-10, 1e-5)
    )
    assert np.linalg.norm(0.5 * c + 0.5 * d) < np.linalg.norm(np.asarray(res.matrix))
    assert res.rule == "spectrum_interpolation" and 0 <= res.subspace_overlap <= 1
    np.testing.assert_allclose(gw.spectral_merge(c, d, t=0.0).matrix, c, atol=atol)
    assert gw.spectral_merge(c, c).subspace_overlap == pytest.approx(1.0)
    # task vectors: with all energy kept it is the interpolation of the task vectors
    base = rng.standard_normal((12, 8))
    tv = gw.spectral_merge(c, d, t=0.25, base=base, energy=1.0)
    np.testing.assert_allclose(tv.matrix, base + 0.75 * (c - base) + 0.25 * (d - base), atol=atol)
    assert tv.rule == "task_vectors" and tv.retained_energy_a == pytest.approx(1.0)
    low = gw.spectral_merge(c, d, base=base, rank=2)
    sv = np.linalg.svd(np.asarray(low.matrix, np.float64) - base, compute_uv=False)
    assert np.sum(sv > tol(1e-10, 1e-4) * sv[0]) == 4  # rank 2 per task vector
    with pytest.raises(ValueError, match="same shape"):
        gw.spectral_merge(c, d[:, :4])
    with pytest.raises(ValueError, match="t must"):
        gw.spectral_merge(c, d, t=1.5)


# ----------------------------------------------------------------------------------------
# package layout: one idea per module, old import paths, one effective-rank implementation
# ----------------------------------------------------------------------------------------

OLD_NAMES = (  # the names of the old single-module weights.py that others import
    "LayerSpectrum", "MatrixMetrics", "MergeResult", "ModelSummary", "PowerLawFit",
    "RandomizationBaseline", "TruncationResult", "WeightSpectraReport", "apply_reshape_rule",
    "fit_power_law", "head_matrices", "layer_spectrum", "marchenko_pastur_cdf",
    "marchenko_pastur_pdf", "matricize", "matrix_metrics", "mp_ks_threshold", "mp_median",
    "randomization_baseline", "reshape_rule_for", "spectral_merge", "spectral_truncate",
    "tracy_widom_edge", "weight_spectra", "effective_rank", "ALPHA_HEAVY", "ALPHA_RANDOM",
    "MP_KS_RANDOM", "RULES", "TW1_QUANTILES",
)


def test_old_import_paths():
    import gradience_jax
    from gradience_jax.weights import (
        layer,
        metrics,
        power_law,
        random_matrix,
        randomization,
        report,
        reshape,
        surgery,
    )

    for name in OLD_NAMES:
        assert getattr(gradience_jax.weights, name) is getattr(gw, name), name
    assert set(gw.__all__) >= set(OLD_NAMES) - {"ALPHA_HEAVY", "ALPHA_RANDOM"}
    assert gw.effective_rank is metrics.effective_rank
    assert gw.layer_spectrum is layer.layer_spectrum and gw.fit_power_law is power_law.fit_power_law
    assert gw.tracy_widom_edge is random_matrix.tracy_widom_edge
    assert gw.weight_spectra is report.weight_spectra and gw.matricize is reshape.matricize
    assert gw.spectral_truncate is surgery.spectral_truncate
    assert gw.randomization_baseline is randomization.randomization_baseline
    assert gradience_jax.weight_spectra is gw.weight_spectra


def test_weights_package_stays_numerics_only():
    """Every module of weights/: numpy / jax only, no figures, no training, nothing above."""
    import ast
    from pathlib import Path

    allowed = ("gradience_jax.weights", "gradience_jax._json", "gradience_jax.tree",
               "gradience_jax._validate")
    files = sorted(Path(gw.__file__).parent.glob("*.py"))
    assert len(files) >= 9
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                root = mod.split(".")[0]
                assert root not in {"matplotlib", "scipy", "optax"}, (path.name, mod)
                if root == "gradience_jax":
                    assert mod.startswith(allowed), (path.name, mod)


def test_effective_rank_one_implementation_numpy_and_jax():
    from gradience_jax.weights import metrics

    rng = np.random.default_rng(30)
    s = np.sort(rng.random((3, 7)), axis=1)[:, ::-1]
    s[1, 4:] = 0.0
    s[2] = 0.0
    ref = [math.exp(scipy.stats.entropy(r)) if r.sum() > 0 else 0.0 for r in s]
    host = gw.effective_rank(s, xp=np)
    assert isinstance(host, np.ndarray) and host.dtype == np.float64
    np.testing.assert_allclose(host, ref, rtol=1e-13)
    np.testing.assert_allclose(np.asarray(gw.effective_rank(jnp.asarray(s))), ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gw.effective_rank(s.T, axis=0)), ref, rtol=1e-5)
    c = metrics.core_metrics(s[0], 9, 7, 1e-6, 0.99, np)
    assert float(c["effective_rank"]) == float(host[0])


def test_head_kind_and_randomization_reuses_singular_values():
    from gradience_jax.weights import reshape

    assert reshape.head_kind("blocks/0/attn/query/kernel", (8, 2, 4)) == "in"
    assert reshape.head_kind("blocks/0/attn/out/kernel", (2, 4, 8)) == "out"
    assert reshape.head_kind("blocks/0/attn/query/kernel", (8, 8)) is None
    assert reshape.head_kind("blocks/0/mlp/kernel", (8, 2, 4)) is None
    assert reshape.head_kind("kernel", (8, 2, 4)) is None
    w = np.random.default_rng(31).standard_normal((20, 12))
    key = jax.random.key(0)
    s = np.linalg.svd(w, compute_uv=False)
    assert gw.randomization_baseline(w, key, singular_values=s) == gw.randomization_baseline(
        w, key
    )


def test_bfloat16_layers_keep_their_rank_and_alpha():
    """A wide bfloat16 matrix: the default rank tolerance is float32's, not bfloat16's."""
    w = np.random.default_rng(0).standard_normal((300, 200)).astype(np.float32)
    w16 = jnp.asarray(w, jnp.bfloat16)
    ref = gw.layer_spectrum(np.asarray(w16.astype(jnp.float32)))
    got = gw.layer_spectrum(w16)
    assert got.numerical_rank == ref.numerical_rank == 200
    assert np.isfinite(got.alpha) and abs(got.alpha - ref.alpha) < 1e-6 * max(1, abs(ref.alpha))
