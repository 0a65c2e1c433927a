"""Influence of training examples on test examples: every ``gj.influence`` method against
the exact inverse (time, memory, accuracy), TracIn, and kronfluence's EK-FAC as the PyTorch
peer on the same data and weights.

Usage:
    python benchmarks/influence.py [--quick] [--out benchmarks/results/influence.json]
        [--models mlp,transformer] [--methods cg,arnoldi,lissa,kfac,ekfac,tracin]
        [--repeats 3] [--slow-s 120] [--lissa-maxiter N] [--dense-max-params 8000]
        [--in-process | --isolate] [--no-peer]

Full run (the stated case): ``python benchmarks/influence.py`` (1,000 training and 100 test
examples for each model; writes ``benchmarks/results/influence.json``). ``--quick``
shrinks everything (a smoke test; ``influence_quick.json``).

Cases (both trained briefly, so the Hessian is that of a trained model): optax Adam, full
batch, on the objective ``mean CE + wd / 2 ||theta||^2`` (weight decay as an L2 term, so
the curvature is the objective's Hessian, as in Koh & Liang 2017):

* ``mlp``: ``gradience_jax.models.MLP([32, 64, 64, 10])`` (6,922 parameters) on
  ``gj.data.classification`` (10 overlapping Gaussian classes, separation 0.5), wd 1e-2,
  300 steps at learning rate 3e-3.
* ``transformer``: ``TinyTransformerLM`` (vocab 16, d_model 8, 2 heads, 1 layer, d_ff 16;
  952 parameters) on ``gj.data.token_sequences`` (arithmetic progressions, T = 8) with 10%
  of the tokens replaced at random: the influence of a training sequence on a test
  sequence's (token-mean) loss; wd 1e-3, 300 steps. Every CG / LiSSA iteration is
  ``n_test`` HVPs on all 8,000 training tokens (~4.6 s on the 2 shared cores here), which
  is what sets this size and caps LiSSA at 200 iterations for this case (the library
  default 1,000 would take over an hour; at ``damping="auto"`` it needs ~12,000 to
  converge, and the residuals say how far it got).

Scores ``S[t, i] = -g_test_t^T (H + d I)^{-1} g_train_i`` (positive = harmful) with
per-example gradients of the plain cross-entropy (as kronfluence, whose damping stands in
for the L2 term) and ``H`` the Hessian of the objective (``operator=gj.hessian(objective,
...)``, built inside the timed call). Methods: ``gj.influence(method=...)`` with ``"cg"``,
``"arnoldi"`` (rank 50), ``"lissa"``, ``"kfac"``, ``"ekfac"`` (type-2 K-FAC of the
cross-entropy GGN: the L2 term is not in the factors), all with ``damping="auto"``; the
damping used, its rule, the measured extreme eigenvalues and every solve's true residual
``||(H + d I) x - g|| / ||g||`` are in the JSON. ``gj.tracin`` over 5 training checkpoints
is the cheap baseline (no inverse; its sign is flipped for the comparison, and it is
another quantity, so it has no relative error).

Reference, the exact inverse: a dense float64 Hessian (``jvp``-of-``grad`` columns of the
float64 model at the float32-trained weights), float64 per-example gradients and
``numpy.linalg.solve`` at each method's damping; above ``--dense-max-params`` parameters a
float64 CG at tol 1e-10 instead. Accuracy: Pearson and Spearman correlation of the whole
``(n_test, n_train)`` score matrices, the mean per-test-row Spearman, the relative
Frobenius error, and the overlap of each test example's top-10 most harmful training
examples.

Timing: wall time of the whole call (spectrum, factors, eigenpairs, gradients, solves),
median of ``--repeats`` (3; 1 with ``--quick``) calls after a first call; "first call"
includes jax compilation and "compile s" is first call - median. A method whose first
call exceeds ``--slow-s`` is not repeated (``repeats`` 0: its wall time and peak RSS are
the first call's, compilation included), as CG on the transformer and LiSSA are on the
full case. Memory: ``gj.influence`` is a host
loop over jitted chunks, so no single XLA ``memory_analysis()`` covers it; each method runs
in a fresh subprocess (``--isolate``, the default of the full run) and reports the peak RSS
above the RSS before its timed calls ("peak RSS MiB", sampled every 2 ms) and the
process's peak RSS above its RSS after setup ("process peak MiB", compilation included;
for the peer, after importing torch and kronfluence). ``--in-process`` (the default of
``--quick``) runs everything in one process: its RSS deltas are indicative only.

PyTorch peer (MLP only, one run): kronfluence 1.0.1 (EK-FAC influence, Grosse et al.
2023), installed without its torchvision / einconv requirements (only ``nn.Linear`` is
used here) and without touching the pinned CPU torch:

    pip install --no-deps kronfluence==1.0.1 accelerate

(accelerate's own requirements psutil, pyyaml, safetensors, numpy and packaging are
present; its huggingface_hub is not imported on this path). The trained MLP is ported by
``gradience_jax.torch_bridge.to_torch`` (an ``nn.Sequential``; its logits are checked
against ours to 1e-5 first), EK-FAC factors are fitted on the training examples
(kronfluence's true Fisher: one sampled label per example; ours is the exact type-2
Fisher) and pairwise scores computed with ``damping_factor`` = our EK-FAC's damping.
kronfluence's score is ``g_test^T (F + d I)^{-1} g_train`` (positive = helpful), the
negative of ours, so its sign is flipped for the comparison. If the peer cannot run, the
output and the JSON say why.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import gradience_jax as gj  # noqa: E402
from benchmarks import peers  # noqa: E402
from gradience_jax.models import MLP, TinyTransformerLM, from_nnx  # noqa: E402

METHODS = ("cg", "arnoldi", "lissa", "kfac", "ekfac")
BASELINE = "tracin"
PEER = "kronfluence EK-FAC"
MODELS = ("mlp", "transformer")
#: the exact reference is a dense float64 Hessian up to this many parameters, CG above
DENSE_MAX_PARAMS = 8000
TOP_K = 10

#: full-size cases (the stated benchmark) and their --quick versions
SPECS = {
    "mlp": dict(sizes=[32, 64, 64, 10], separation=0.5, n_train=1000, n_test=100,
                steps=300, lr=3e-3, wd=1e-2, rank=50, checkpoints=5),
    "transformer": dict(vocab=16, d_model=8, heads=2, layers=1, d_ff=16, seq_len=8,
                        noise=0.1, n_train=1000, n_test=100, steps=300, lr=3e-3, wd=1e-3,
                        rank=50, checkpoints=5, lissa_maxiter=200),
}
QUICK = {
    "mlp": dict(sizes=[8, 16, 16, 4], n_train=64, n_test=8, steps=60, rank=8, checkpoints=3),
    "transformer": dict(vocab=6, d_model=4, d_ff=8, seq_len=3, n_train=32, n_test=4,
                        steps=60, rank=8, checkpoints=3),
}


def spec_of(name: str, quick: bool, lissa_maxiter: int | None = None) -> dict:
    """The case's sizes; ``lissa_maxiter`` overrides the case's LiSSA cap (0: the library
    default, 1,000)."""
    if name not in SPECS:
        raise SystemExit(f"unknown model {name!r}; choose from {MODELS}")
    spec = {"lissa_maxiter": None, **SPECS[name], **(QUICK[name] if quick else {})}
    if lissa_maxiter is not None:
        spec["lissa_maxiter"] = lissa_maxiter or None
    return spec


# -- the cases ------------------------------------------------------------------------------


class Case(NamedTuple):
    """A trained model, its data and the functions every method uses."""

    name: str
    spec: dict
    model: Any
    adapted: Any
    ce: Any  # mean cross-entropy: per-example gradients and the test measurement
    objective: Any  # ce + wd / 2 ||p||^2: the Hessian's function
    params: Any
    checkpoints: list
    train: dict
    test: dict
    history: dict


def make_model(name: str, spec: dict, dtype=jnp.float32):
    if name == "mlp":
        return MLP(spec["sizes"], param_dtype=dtype, rngs=nnx.Rngs(0))
    return TinyTransformerLM(vocab_size=spec["vocab"], d_model=spec["d_model"],
                             num_heads=spec["heads"], num_layers=spec["layers"],
                             d_ff=spec["d_ff"], max_len=spec["seq_len"], param_dtype=dtype,
                             rngs=nnx.Rngs(0))


def _take(batch: dict, lo: int, hi: int) -> dict:
    return jax.tree_util.tree_map(lambda x: x[lo:hi], batch)


def make_data(name: str, spec: dict) -> tuple[dict, dict]:
    n = spec["n_train"] + spec["n_test"]
    key = jax.random.key(1)
    if name == "mlp":
        d = gj.data.classification(key, n=n, dim=spec["sizes"][0],
                                   num_classes=spec["sizes"][-1],
                                   separation=spec["separation"])
    else:
        t, v = spec["seq_len"], spec["vocab"]
        b = gj.data.token_sequences(key, n=n, seq_len=t, vocab_size=v)
        full = jnp.concatenate([b["inputs"], b["labels"][:, -1:]], axis=1)
        kn, kt = jax.random.split(jax.random.key(2))
        noisy = jax.random.bernoulli(kn, spec["noise"], full.shape)
        full = jnp.where(noisy, jax.random.randint(kt, full.shape, 0, v), full)
        d = {"inputs": full[:, :-1].astype(jnp.int32), "labels": full[:, 1:].astype(jnp.int32)}
    return _take(d, 0, spec["n_train"]), _take(d, spec["n_train"], n)


def _l2(params) -> jax.Array:
    return sum(jnp.sum(x ** 2) for x in jax.tree_util.tree_leaves(params))


def make_objective(ce, wd: float):
    def objective(p, batch):
        return ce(p, batch) + 0.5 * wd * _l2(p)

    return objective


def _accuracy(adapted, params, batch) -> float:
    logits = adapted.model_fn(params, batch)
    return float(jnp.mean(jnp.argmax(logits, -1) == batch["labels"]))


def train_model(adapted, objective, train: dict, spec: dict) -> tuple[Any, list, list]:
    """Full-batch Adam on the objective; checkpoints evenly spaced (the last = the result)."""
    import optax

    opt = optax.adam(spec["lr"])

    @jax.jit
    def step(p, state):
        loss, g = jax.value_and_grad(objective)(p, train)
        updates, state = opt.update(g, state, p)
        return optax.apply_updates(p, updates), state, loss

    p, state = adapted.params, opt.init(adapted.params)
    marks = {round(spec["steps"] * (j + 1) / spec["checkpoints"]) for j in
             range(spec["checkpoints"])}
    checkpoints, losses = [], []
    for i in range(1, spec["steps"] + 1):
        p, state, loss = step(p, state)
        if i in marks:
            checkpoints.append(p)
            losses.append(float(loss))
    return p, checkpoints, losses


def build_case(name: str, quick: bool, weights: str | None = None,
               lissa_maxiter: int | None = None) -> Case:
    """The trained case; with ``weights`` (an ``.npz`` from :func:`save_weights`) the
    trained parameters and checkpoints are loaded instead of retrained."""
    spec = spec_of(name, quick, lissa_maxiter)
    model = make_model(name, spec)
    head = gj.heads.softmax_cross_entropy()
    adapted = from_nnx(model, head)
    objective = make_objective(adapted.loss_fn, spec["wd"])
    train, test = make_data(name, spec)
    if weights is None:
        t0 = time.perf_counter()
        params, checkpoints, losses = train_model(adapted, objective, train, spec)
        train_s = time.perf_counter() - t0
    else:
        params, checkpoints = load_weights(weights, adapted.params)
        losses, train_s = [], None
    history = {"objective_at_checkpoints": losses, "train_s": train_s,
               "train_loss": float(adapted.loss_fn(params, train)),
               "test_loss": float(adapted.loss_fn(params, test)),
               "train_accuracy": _accuracy(adapted, params, train),
               "test_accuracy": _accuracy(adapted, params, test),
               "grad_max_abs": float(ravel_pytree(jax.grad(objective)(params, train))[0]
                                  .__abs__().max())}
    return Case(name, spec, model, adapted, adapted.loss_fn, objective, params, checkpoints,
                train, test, history)


def save_weights(path: Path, case: Case) -> None:
    arrays = {f"p{i}": np.asarray(x) for i, x in enumerate(jax.tree_util.tree_leaves(
        case.params))}
    for j, ck in enumerate(case.checkpoints):
        arrays.update({f"c{j}_{i}": np.asarray(x)
                       for i, x in enumerate(jax.tree_util.tree_leaves(ck))})
    np.savez(path, n_checkpoints=len(case.checkpoints), **arrays)


def load_weights(path: str, like) -> tuple[Any, list]:
    data = np.load(path)
    leaves, treedef = jax.tree_util.tree_flatten(like)

    def tree(prefix):
        return jax.tree_util.tree_unflatten(
            treedef, [jnp.asarray(data[f"{prefix}{i}"]) for i in range(len(leaves))])

    return tree("p"), [tree(f"c{j}_") for j in range(int(data["n_checkpoints"]))]


# -- the exact reference ------------------------------------------------------------------


def _f64(tree):
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(x, jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x,
        tree)


class Reference:
    """Exact influence scores ``-G_test (H + d I)^{-1} G_train^T`` in float64, per damping."""

    def __init__(self, case: Case, dense_max_params: int = DENSE_MAX_PARAMS):
        t0 = time.perf_counter()
        self.case = case
        self._cache: dict[float, np.ndarray] = {}
        with jax.enable_x64(True):
            model64 = make_model(case.name, case.spec, jnp.float64)
            ad64 = from_nnx(model64, case.adapted.head)
            self.ce64 = ad64.loss_fn
            self.obj64 = make_objective(ad64.loss_fn, case.spec["wd"])
            self.p64 = _f64(case.params)
            self.train64, self.test64 = _f64(case.train), _f64(case.test)
            flat, unravel = ravel_pytree(self.p64)
            self.n_params = int(flat.size)
            self.dense = self.n_params <= dense_max_params
            self.g_train = self._grads(self.train64, unravel)
            self.g_test = self._grads(self.test64, unravel)
            if self.dense:
                self.hessian = self._dense_hessian(flat, unravel)
                eig = np.linalg.eigvalsh(self.hessian)
                self.lambda_min, self.lambda_max = float(eig[0]), float(eig[-1])
                self.n_negative = int(np.sum(eig < 0))
            else:
                b = gj.solvers.spectral_bounds(gj.hessian(self.obj64, self.p64, self.train64))
                self.lambda_min, self.lambda_max = b.lambda_min, b.lambda_max
                self.n_negative = None
        self.kind = ("dense float64 Hessian + numpy.linalg.solve" if self.dense
                     else "float64 CG, tol 1e-10")
        self.seconds = time.perf_counter() - t0
        self.cg_residuals: dict[float, float] = {}

    def _grads(self, batch, unravel) -> np.ndarray:
        def one(ex):
            g = jax.grad(self.ce64)(self.p64, jax.tree_util.tree_map(lambda x: x[None], ex))
            return ravel_pytree(g)[0]

        fn = jax.jit(jax.vmap(one))
        n = jax.tree_util.tree_leaves(batch)[0].shape[0]
        return np.concatenate([np.asarray(fn(_take(batch, s, min(s + 250, n))))
                               for s in range(0, n, 250)])

    def _dense_hessian(self, flat, unravel, chunk: int = 128) -> np.ndarray:
        def grad_flat(f):
            return ravel_pytree(jax.grad(self.obj64)(unravel(f), self.train64))[0]

        cols = jax.jit(jax.vmap(lambda v: jax.jvp(grad_flat, (flat,), (v,))[1]))
        p = self.n_params
        blocks = []
        for s in range(0, p, chunk):
            idx = np.arange(s, min(s + chunk, p))
            e = np.zeros((len(idx), p))
            e[np.arange(len(idx)), idx] = 1.0
            blocks.append(np.asarray(cols(jnp.asarray(e))))
        h = np.concatenate(blocks)
        return 0.5 * (h + h.T)

    def scores(self, damping: float) -> np.ndarray:
        d = float(damping)
        if d not in self._cache:
            if self.dense:
                x = np.linalg.solve(self.hessian + d * np.eye(self.n_params), self.g_test.T)
                self._cache[d] = -(x.T @ self.g_train.T)
            else:
                with jax.enable_x64(True):
                    res = gj.influence(self.ce64, self.p64, self.train64, self.test64,
                                       method="cg", damping=d, tol=1e-10, warn=False,
                                       operator=gj.hessian(self.obj64, self.p64, self.train64))
                self._cache[d] = res.scores
                self.cg_residuals[d] = res.record.max_residual
        return self._cache[d]

    def summary(self) -> dict:
        return {"kind": self.kind, "n_params": self.n_params, "seconds": self.seconds,
                "lambda_min": self.lambda_min, "lambda_max": self.lambda_max,
                "n_negative_eigenvalues": self.n_negative,
                "cg_max_residuals": {str(k): v for k, v in self.cg_residuals.items()}}


def accuracy(scores: np.ndarray, ref: np.ndarray, *, relative: bool = True) -> dict:
    """Agreement of ``scores`` with the reference score matrix ``ref`` (same sign)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(scores, np.float64), np.asarray(ref, np.float64)
    k = min(TOP_K, b.shape[1])
    rows = [spearmanr(x, y).statistic for x, y in zip(a, b)]
    overlap = [len(set(np.argsort(-x)[:k]) & set(np.argsort(-y)[:k])) / k for x, y in zip(a, b)]
    return {"pearson": float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
            "spearman": float(spearmanr(a.ravel(), b.ravel()).statistic),
            "row_spearman_mean": float(np.nanmean(rows)),
            "top10_harmful_overlap": float(np.mean(overlap)),
            "rel_error": (float(np.linalg.norm(a - b) / np.linalg.norm(b)) if relative
                          else None)}


# -- one method: timing, memory, scores ---------------------------------------------------------


def method_call(case: Case, method: str):
    """A zero-argument function computing the method's scores (an ``InfluenceResult``)."""
    if method == BASELINE:
        return lambda: gj.tracin(case.ce, case.checkpoints, case.train, case.test,
                                 learning_rates=case.spec["lr"])
    extra = {"rank": case.spec["rank"]} if method == "arnoldi" else {}
    if method == "lissa" and case.spec.get("lissa_maxiter"):
        extra["maxiter"] = case.spec["lissa_maxiter"]
    if method in ("kfac", "ekfac"):
        extra.update(model_fn=case.adapted.model_fn, head=case.adapted.head)

    def call():
        op = gj.hessian(case.objective, case.params, case.train)
        return gj.influence(case.ce, case.params, case.train, case.test, method=method,
                            damping="auto", operator=op, key=jax.random.key(0), warn=False,
                            **extra)

    return call


def _short(msg: str, n: int = 240) -> str:
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= n else msg[:n] + "..."


def measure(case: Case, method: str, repeats: int, slow_s: float) -> dict:
    """First call (compile included), then the median of ``repeats`` warm calls, with the
    peak RSS above the RSS before them. A first call slower than ``slow_s`` is not repeated
    (``repeats`` 0: wall time and peak RSS are the first call's). Returns timings, memory,
    the record and the scores."""
    call = method_call(case, method)
    with warnings.catch_warnings(record=True) as caught, \
            peers.PeakRSS(interval=0.002) as first_meter:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        res = call()
        first = time.perf_counter() - t0
    if first > slow_s:
        repeats = 0
    times = []
    with peers.PeakRSS(interval=0.002) as meter:
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = call()
            times.append(time.perf_counter() - t0)
    wall = statistics.median(times) if times else first
    peak = meter.peak_delta if times else first_meter.peak_delta
    rec = res.record
    out = {"method": method, "first_call_s": first, "wall_s": wall, "times_s": times,
           "repeats": repeats, "compile_s": max(0.0, first - wall) if times else None,
           "peak_rss_MiB": peak / 2 ** 20,
           "peak_rss_first_call_MiB": first_meter.peak_delta / 2 ** 20,
           "call_warnings": sorted({_short(w.message) for w in caught}),
           "record": rec.to_dict()}
    if method != BASELINE:
        r = np.asarray(rec.residuals)
        out.update(damping=rec.damping, damping_rule=rec.info.get("damping_rule"),
                   lambda_max_measured=rec.info.get("lambda_max"),
                   lambda_min_measured=rec.info.get("lambda_min"),
                   max_residual=float(r.max()), median_residual=float(np.median(r)),
                   iterations_median=float(np.median(rec.iterations)),
                   iterations_max=int(np.max(rec.iterations)), converged=rec.converged,
                   warnings=[_short(w) for w in rec.warnings])
    out["scores"] = res.scores
    return out


# -- the PyTorch peer ---------------------------------------------------------------------------


def kronfluence_peer(case: Case, damping: float) -> dict:
    """kronfluence 1.0.1 EK-FAC pairwise scores on the ported MLP (one run)."""
    torch = peers.peer("torch")
    if torch is None:
        return {"status": "torch not installed"}
    try:
        import kronfluence
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments, ScoreArguments
        from kronfluence.task import Task
    except Exception as e:  # noqa: BLE001 - report why the peer is missing
        return {"status": f"kronfluence not installed ({type(e).__name__}: {_short(e, 160)}); "
                          "pip install --no-deps kronfluence==1.0.1 accelerate"}
    from gradience_jax import torch_bridge as tb

    f = torch.nn.functional
    tm = tb.to_torch(case.model, case.params)
    x, y = tm.batch(case.train)
    xt, yt = tm.batch(case.test)
    with torch.no_grad():
        theirs = tm.module(xt).numpy()
    ours = np.asarray(case.adapted.model_fn(case.params, case.test))
    forward_diff = float(np.max(np.abs(theirs - ours)))
    info = {"version": kronfluence.__version__, "forward_max_abs_diff": forward_diff,
            "damping_factor": damping, "fisher": "true Fisher, 1 sampled label per example "
            "(ours: exact type-2 Fisher)", "sign": "kronfluence = -ours (positive = helpful)"}
    if not forward_diff <= 1e-5:
        return {**info, "status": f"ported forward differs by {forward_diff:.2e} > 1e-5"}

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            inputs, labels = batch
            logits = model(inputs)
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).flatten()
            return f.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):
            inputs, labels = batch
            return f.cross_entropy(model(inputs), labels, reduction="sum")

    torch.manual_seed(0)
    task = Classification()
    model = prepare_model(tm.module, task)
    train_ds = torch.utils.data.TensorDataset(x, y)
    test_ds = torch.utils.data.TensorDataset(xt, yt)
    n_train, n_test = len(train_ds), len(test_ds)
    import logging

    with (tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(),
          peers.PeakRSS(interval=0.002) as meter):
        warnings.simplefilter("ignore", FutureWarning)  # torch.cuda.amp deprecations
        analyzer = Analyzer("influence_bench", model, task, cpu=True, disable_tqdm=True,
                            output_dir=tmp, log_level=logging.WARNING)
        t0 = time.perf_counter()
        analyzer.fit_all_factors("ekfac", train_ds, per_device_batch_size=n_train,
                                 factor_args=FactorArguments(strategy="ekfac"),
                                 overwrite_output_dir=True)
        t1 = time.perf_counter()
        analyzer.compute_pairwise_scores(
            "scores", "ekfac", query_dataset=test_ds, train_dataset=train_ds,
            per_device_query_batch_size=n_test, per_device_train_batch_size=n_train,
            score_args=ScoreArguments(damping_factor=damping), overwrite_output_dir=True)
        t2 = time.perf_counter()
        scores = analyzer.load_pairwise_scores("scores")["all_modules"].double().numpy()
    return {**info, "status": "ok", "factors_s": t1 - t0, "scores_s": t2 - t1,
            "wall_s": t2 - t0, "peak_rss_MiB": meter.peak_delta / 2 ** 20,
            "scores": -scores}


# -- isolation: one fresh process per measurement ---------------------------------------------


def worker(args) -> None:
    """``--worker``: one measurement on a saved case; prints ``WORKER {json}``."""
    case = build_case(args.model, args.quick, weights=args.weights,
                      lissa_maxiter=args.lissa_maxiter)
    jax.block_until_ready(case.params)
    if args.worker == PEER:  # the libraries' own footprint is not the peer's working set
        peers.peer("torch")
        with contextlib.suppress(Exception):
            import kronfluence.analyzer  # noqa: F401
    base = peers.rss_bytes()
    if args.worker == PEER:
        out = kronfluence_peer(case, args.damping)
    else:
        out = measure(case, args.worker, args.repeats, args.slow_s)
    out["process_peak_MiB"] = max(
        0.0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / 2 ** 20
    scores = out.pop("scores", None)
    if scores is not None:
        np.save(args.scores, scores)
    print("WORKER" + json.dumps(out, default=lambda o: (o.tolist() if hasattr(o, "tolist")
                                                         else str(o))), flush=True)


def run_one(case: Case, what: str, *, isolate: bool, weights: Path | None, quick: bool,
            repeats: int, slow_s: float, damping: float | None = None) -> dict:
    if not isolate:
        try:
            if what == PEER:
                return kronfluence_peer(case, damping)
            return measure(case, what, repeats, slow_s)
        except Exception as e:  # noqa: BLE001 - a failing method is reported, the rest run
            print(f"  {what}: failed: {type(e).__name__}: {_short(e, 600)}", flush=True)
            return {"status": f"failed: {type(e).__name__}: {_short(e)}"}
    with tempfile.TemporaryDirectory() as tmp:
        scores = Path(tmp) / "scores.npy"
        cmd = [sys.executable, __file__, "--worker", what, "--model", case.name,
               "--weights", str(weights), "--scores", str(scores), "--repeats", str(repeats),
               "--slow-s", str(slow_s)]
        cmd += ["--quick"] if quick else []
        cmd += ["--lissa-maxiter", str(case.spec.get("lissa_maxiter") or 0)]
        cmd += ["--damping", repr(float(damping))] if damping is not None else []
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=4 * 3600)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("WORKER")]
        if proc.returncode != 0 or not line:
            tail = _short(proc.stderr[-1500:], 1500)
            print(f"  {what}: worker failed (exit {proc.returncode}): {tail}", flush=True)
            return {"status": f"failed (exit {proc.returncode}): {_short(proc.stderr[-300:])}"}
        out = json.loads(line[-1][len("WORKER"):])
        if scores.exists():
            out["scores"] = np.load(scores)
        return out


# -- the benchmark ------------------------------------------------------------------------------


def _model_label(case: Case, n_params: int) -> str:
    s = case.spec
    if case.name == "mlp":
        arch = "MLP " + "-".join(map(str, s["sizes"]))
    else:
        arch = (f"TinyTransformerLM V={s['vocab']} d={s['d_model']} L={s['layers']} "
                f"T={s['seq_len']}")
    return f"{arch} (P={n_params:,}; {s['n_test']} test x {s['n_train']} train)"


def run_case(name: str, args, tmpdir: Path) -> dict:
    case = build_case(name, args.quick, lissa_maxiter=args.lissa_maxiter)
    h = case.history
    print(f"\n{name}: trained {case.spec['steps']} Adam steps in {h['train_s']:.1f} s; train "
          f"loss {h['train_loss']:.4f} (acc {h['train_accuracy']:.3f}), test loss "
          f"{h['test_loss']:.4f} (acc {h['test_accuracy']:.3f}), max |grad| {h['grad_max_abs']:.2e}",
          flush=True)
    weights = None
    if args.isolate:
        weights = tmpdir / f"{name}.npz"
        save_weights(weights, case)
    ref = Reference(case, args.dense_max_params)
    print(f"  reference ({ref.kind}, P={ref.n_params:,}) in {ref.seconds:.1f} s: lambda in "
          f"[{ref.lambda_min:.4g}, {ref.lambda_max:.4g}]"
          + (f", {ref.n_negative} negative eigenvalues" if ref.n_negative is not None else ""),
          flush=True)
    opts = dict(isolate=args.isolate, weights=weights, quick=args.quick,
                repeats=args.repeats, slow_s=args.slow_s)
    methods: dict[str, dict] = {}
    kept: dict[str, np.ndarray] = {}
    for method in args.methods:
        r = run_one(case, method, **opts)
        scores = r.pop("scores", None)
        if scores is not None:
            kept[method] = scores
            if method == BASELINE:
                d = next((m["damping"] for m in methods.values() if "damping" in m), None)
                r["accuracy"] = (accuracy(-scores, ref.scores(d), relative=False)
                                 if d is not None else None)
                r["compared_at_damping"] = d
            else:
                r["accuracy"] = accuracy(scores, ref.scores(r["damping"]))
                r["exact_lambda_min_plus_damping"] = ref.lambda_min + r["damping"]
        methods[method] = r
        acc = r.get("accuracy") or {}
        print(f"  {method:<8} wall {r.get('wall_s', float('nan')):.3g} s (first "
              f"{r.get('first_call_s', float('nan')):.3g} s), peak "
              f"{r.get('peak_rss_MiB', float('nan')):.0f} MiB, damping {r.get('damping', '-')}, "
              f"max residual {r.get('max_residual', '-')}, Pearson "
              f"{acc.get('pearson', float('nan')):.4f}, Spearman "
              f"{acc.get('spearman', float('nan')):.4f}", flush=True)
    out = {"spec": case.spec, "n_params": ref.n_params, "label": _model_label(case, ref.n_params),
           "history": h, "reference": ref.summary(), "methods": methods}
    if name == "mlp" and args.peer:
        d = methods.get("ekfac", {}).get("damping")
        if d is None or "ekfac" not in kept:
            out["peer"] = {"status": "not run: no EK-FAC result of ours (its damping is the "
                                     "peer's; include ekfac in --methods)"}
        else:
            r = run_one(case, PEER, **opts, damping=d)
            scores = r.pop("scores", None)
            if scores is not None:
                r["accuracy_vs_exact"] = accuracy(scores, ref.scores(d))
                r["accuracy_vs_ours_ekfac"] = accuracy(scores, kept["ekfac"])
            out["peer"] = r
            print(f"  {PEER}: {r.get('status')} " + (
                f"wall {r['wall_s']:.3g} s (factors {r['factors_s']:.3g} s), Pearson vs exact "
                f"{r['accuracy_vs_exact']['pearson']:.4f}" if r.get("status") == "ok" else ""),
                flush=True)
    return out


def rows_of(cases: dict) -> tuple[list[dict], list[dict]]:
    rows, peer_rows = [], []
    for name, c in cases.items():
        for method, r in c["methods"].items():
            acc = r.get("accuracy") or {}
            rows.append({
                "model": name, "method": method if method != BASELINE else "tracin (baseline)",
                "damping": r.get("damping", "-"),
                "wall s": r.get("wall_s", r.get("status", "-")),
                "first call s": r.get("first_call_s", "-"),
                "compile s": r.get("compile_s") if r.get("compile_s") is not None else "-",
                "repeats": r.get("repeats", "-"),
                "peak RSS MiB": r.get("peak_rss_MiB", "-"),
                "process peak MiB": r.get("process_peak_MiB", "-"),
                "Pearson": acc.get("pearson", "-"), "Spearman": acc.get("spearman", "-"),
                "row Spearman": acc.get("row_spearman_mean", "-"),
                "top-10 overlap": acc.get("top10_harmful_overlap", "-"),
                "rel err": acc.get("rel_error") if acc.get("rel_error") is not None else "n/a",
                "max residual": r.get("max_residual", "-"),
                "iterations": r.get("iterations_max", "-"),
                "converged": r.get("converged", "-"),
            })
        p = c.get("peer")
        if p is not None:
            if p.get("status") != "ok":
                peer_rows.append({"model": name, "peer": PEER, "status": p.get("status")})
                continue
            ex, ek = p["accuracy_vs_exact"], p.get("accuracy_vs_ours_ekfac") or {}
            ours = c["methods"]["ekfac"]
            peer_rows.append({
                "model": name, "peer": f"kronfluence {p['version']} EK-FAC", "status": "ok",
                "damping": p["damping_factor"], "wall s": p["wall_s"],
                "factors s": p["factors_s"], "scores s": p["scores_s"],
                "ours EK-FAC wall s": ours.get("wall_s", "-"),
                "ours EK-FAC first call s": ours.get("first_call_s", "-"),
                "time / ours": (p["wall_s"] / ours["wall_s"] if "wall_s" in ours else "-"),
                "peak RSS MiB": p["peak_rss_MiB"],
                "process peak MiB": p.get("process_peak_MiB", "-"),
                "Pearson vs exact": ex["pearson"], "Spearman vs exact": ex["spearman"],
                "rel err vs exact": ex["rel_error"],
                "ours EK-FAC Pearson vs exact": (ours.get("accuracy") or {}).get("pearson", "-"),
                "Pearson vs ours EK-FAC": ek.get("pearson", "-"),
                "Spearman vs ours EK-FAC": ek.get("spearman", "-"),
            })
    return rows, peer_rows


def checks_of(cases: dict) -> dict:
    out = {}
    for name, c in cases.items():
        ms = c["methods"]
        margins = [r["exact_lambda_min_plus_damping"] for r in ms.values()
                   if "exact_lambda_min_plus_damping" in r]
        cg = (ms.get("cg", {}).get("accuracy") or {}).get("pearson")
        out[name] = {
            "auto_damping_positive_definite": (min(margins) > 0) if margins else None,
            "exact_lambda_min_plus_damping_min": min(margins) if margins else None,
            "cg_converged": ms.get("cg", {}).get("converged"),
            "cg_pearson_vs_exact": cg,
            "cg_matches_exact_pearson_ge_0.999": (cg >= 0.999) if cg is not None else None,
        }
        p = c.get("peer") or {}
        if p.get("status") == "ok" and p.get("accuracy_vs_ours_ekfac"):
            out[name]["kronfluence_vs_ours_ekfac_pearson"] = p["accuracy_vs_ours_ekfac"][
                "pearson"]
    return out


COLUMNS = ["model", "method", "damping", "wall s", "first call s", "compile s", "repeats",
           "peak RSS MiB", "process peak MiB", "Pearson", "Spearman", "row Spearman",
           "top-10 overlap", "rel err", "max residual", "iterations", "converged"]


def run(args) -> dict:
    cases = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            cases[name] = run_case(name, args, Path(tmp))
    rows, peer_rows = rows_of(cases)
    return {"cases": cases, "rows": rows, "columns": COLUMNS, "peer_rows": peer_rows,
            "targets": checks_of(cases)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--methods", default=",".join((*METHODS, BASELINE)),
                        help="comma-separated subset of " + ",".join((*METHODS, BASELINE)))
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls after the first (default 3; 1 with --quick)")
    parser.add_argument("--slow-s", type=float, default=120.0,
                        help="a first call slower than this gets one timed call")
    iso = parser.add_mutually_exclusive_group()
    iso.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                     help="each method in a fresh subprocess (default of the full run)")
    iso.add_argument("--in-process", dest="isolate", action="store_false",
                     help="everything in this process (default of --quick)")
    parser.add_argument("--lissa-maxiter", type=int, default=None,
                        help="LiSSA's iteration cap for every case (0: the library default, "
                             "1000; default: 1000 for the MLP, 200 for the transformer)")
    parser.add_argument("--dense-max-params", type=int, default=DENSE_MAX_PARAMS,
                        help="largest model with a dense reference (CG at tol 1e-10 above)")
    parser.add_argument("--no-peer", dest="peer", action="store_false")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scores", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--damping", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return {}
    args.models = [m for m in args.models.split(",") if m]
    for m in args.models:
        spec_of(m, args.quick)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - {*METHODS, BASELINE})
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {(*METHODS, BASELINE)}")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    if args.isolate is None:
        args.isolate = not args.quick
    info = peers.machine()
    t0 = time.perf_counter()
    res = run(args)
    info["loadavg_end"] = peers.machine()["loadavg"]
    peers.print_table("Influence (n_test x n_train scores) vs the exact inverse", res["rows"],
                      res["columns"])
    peers.print_table("PyTorch peer (MLP, same data and weights, one run)", res["peer_rows"])
    print("checks:", json.dumps(res["targets"], indent=1))
    result = {"suite": "influence", "quick": args.quick, "machine": info,
              "isolated": args.isolate, "repeats": args.repeats,
              "total_wall_s": time.perf_counter() - t0, **res}
    out = args.out or str(peers.RESULTS_DIR / ("influence_quick.json" if args.quick
                                               else "influence.json"))
    peers.write_json(out, result)
    return result


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
