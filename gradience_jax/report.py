"""The analysis job behind ``gradience-jax analyze``: measure a model, write a report folder.

:func:`analyze` trains a small model on generated data (or loads a checkpoint), then measures

* the top-``k`` eigenvalues of the Hessian and the GGN (or the operators asked for:
  ``hessian``, ``ggn``, ``ef``, ``kfac``) with every diagnostic of
  :class:`~gradience_jax.spectrum.SpectrumResult`,
* their traces (Hutchinson) and the Hessian's spectral density (stochastic Lanczos
  quadrature),
* the spectra of the weight matrices (:func:`~gradience_jax.weights.weight_spectra`),
* a 2-D loss-landscape slice along filter-normalised random directions,

runs consistency checks between them (Hutchinson vs SLQ trace, top-k sum vs trace, PSD-ness
of the GGN, ...) and writes ``report.json`` (every number with its diagnostics, versions,
seed, wall times), PNG figures, ``report.md`` embedding them and ``params.msgpack`` (the
analysed parameters) into the output folder.

It also holds the checkpoint helpers the CLI uses: :func:`save_checkpoint` /
:func:`load_checkpoint` (flax msgpack file or orbax directory of the pure parameter dict)
and :func:`restore_model`, which rebuilds one of the built-in models (MLP, CNN, tiny
transformer) from a checkpoint, inferring its sizes from the stored shapes.

Example::

    from gradience_jax.report import AnalysisConfig, analyze
    report = analyze(AnalysisConfig(seed=0), out="gradience_report")
    report["curvature"]["hessian"]["top_k"]["eigenvalues"]
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import math
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gradience_jax._json import jsonable

PyTree = Any
Progress = Callable[[str, str], None]

SCHEMA = "gradience_jax.report/1"
MODELS = ("mlp", "cnn", "transformer")
OPERATORS = ("hessian", "ggn", "ef", "kfac")
REORTH = ("full", "window", "none")
FAST_ENV = "GRADIENCE_FAST"

__all__ = [
    "AnalysisConfig",
    "CheckpointError",
    "FAST_ENV",
    "MODELS",
    "OPERATORS",
    "Restored",
    "analyze",
    "build_model",
    "dataset",
    "default_spec",
    "fast_mode",
    "evaluate",
    "infer_model",
    "init_model",
    "load_checkpoint",
    "plan",
    "restore_model",
    "save_checkpoint",
    "split",
    "to_pure_dict",
    "train",
    "write_weights_report",
]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not match the requested model."""


def fast_mode() -> bool:
    """True when the environment asks for the quick settings (``GRADIENCE_FAST=1``)."""
    return os.environ.get(FAST_ENV, "").strip().lower() in ("1", "true", "yes", "on")


# =========================================================================================
# configuration
# =========================================================================================


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
    """Settings of :func:`analyze` (defaults: the full job, about a minute on a laptop CPU).

    Attributes:
        model: ``"mlp"``, ``"cnn"`` or ``"transformer"`` (``None`` with a checkpoint: infer).
        checkpoint: path of a flax msgpack file or orbax directory; ``None``: train.
        operators: curvature operators measured (``hessian``, ``ggn``, ``ef``, ``kfac``).
        k: eigenvalues per operator; iters: Lanczos iteration cap; reorth: ``full`` /
            ``window`` / ``none``; tol: relative residual tolerance.
        seed: one integer for data, initialisation, training and every probe.
        train_steps: full-batch Adam steps (learning rate ``learning_rate``).
        trace_samples: Hutchinson probes per operator.
        density_probes, density_iters: stochastic Lanczos quadrature settings.
        grid: points per axis of the 2-D landscape slice; span: its half-width.
        weights_only: skip everything that needs data (weight spectra only).
        figures: draw the PNG figures.
        fast: the quick settings were applied (recorded in the report).
    """

    model: str | None = None
    checkpoint: str | None = None
    operators: tuple[str, ...] = ("hessian", "ggn")
    k: int = 10
    iters: int = 60
    reorth: str = "full"
    tol: float = 1e-6
    seed: int = 0
    train_steps: int = 200
    learning_rate: float = 3e-3
    trace_samples: int = 64
    density_probes: int = 4
    density_iters: int = 48
    grid: int = 25
    span: float = 1.0
    weights_only: bool = False
    figures: bool = True
    fast: bool = False

    def __post_init__(self):
        if self.model is not None and self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        bad = [o for o in self.operators if o not in OPERATORS]
        if bad or not self.operators:
            raise ValueError(f"operators must be a non-empty subset of {OPERATORS}, got {list(self.operators)}")
        if self.reorth not in REORTH:
            raise ValueError(f"reorth must be one of {REORTH}, got {self.reorth!r}")
        for name in ("k", "iters", "trace_samples", "density_probes", "density_iters", "grid"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.grid < 3:
            raise ValueError(f"grid must be >= 3, got {self.grid}")
        if self.train_steps < 0:
            raise ValueError(f"train_steps must be >= 0, got {self.train_steps}")
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0, got {self.tol!r}")

    def quick(self) -> "AnalysisConfig":
        """The same job with the quick settings (tests, CI): fewer steps, probes, points."""
        return dataclasses.replace(
            self, k=min(self.k, 5), iters=min(self.iters, 30), train_steps=min(self.train_steps, 60),
            trace_samples=min(self.trace_samples, 8), density_probes=min(self.density_probes, 2),
            density_iters=min(self.density_iters, 20), grid=min(self.grid, 9), fast=True,
        )


# =========================================================================================
# models: built-in families, their data, and specs inferred from checkpoint shapes
# =========================================================================================


def default_spec(model: str) -> dict[str, Any]:
    """The default hyper-parameters of a built-in model family."""
    specs = {
        "mlp": {"sizes": [16, 64, 64, 4]},
        "cnn": {"in_channels": 1, "channels": [4, 8], "image_size": 8, "num_classes": 4},
        "transformer": {"vocab_size": 16, "d_model": 16, "num_heads": 2, "num_layers": 1,
                        "d_ff": 32, "max_len": 16},
    }
    if model not in specs:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    return dict(specs[model])


def build_model(model: str, spec: Mapping[str, Any], rngs: Any, param_dtype: Any = jnp.float32) -> Any:
    """An NNX module of family ``model`` with hyper-parameters ``spec``."""
    from gradience_jax.models import CNN, MLP, TinyTransformerLM

    if model == "mlp":
        return MLP(list(spec["sizes"]), param_dtype=param_dtype, rngs=rngs)
    if model == "cnn":
        return CNN(in_channels=spec["in_channels"], channels=tuple(spec["channels"]),
                   image_size=spec["image_size"], num_classes=spec["num_classes"],
                   param_dtype=param_dtype, rngs=rngs)
    if model == "transformer":
        return TinyTransformerLM(vocab_size=spec["vocab_size"], d_model=spec["d_model"],
                                 num_heads=spec["num_heads"], num_layers=spec["num_layers"],
                                 d_ff=spec["d_ff"], max_len=spec["max_len"],
                                 param_dtype=param_dtype, rngs=rngs)
    raise ValueError(f"model must be one of {MODELS}, got {model!r}")


def _x32() -> Any:
    """Context with ``jax_enable_x64`` off (the generated data do not depend on the flag)."""
    ctx = getattr(jax, "enable_x64", None)
    if ctx is not None:
        return ctx(False)
    from jax.experimental import disable_x64  # jax < 0.5

    return disable_x64()


def dataset(model: str, spec: Mapping[str, Any], key: jax.Array) -> tuple[dict, str]:
    """``(batch of train + test examples, description)`` matching a built-in model's inputs.

    Generated with ``jax_enable_x64`` off, so the same key gives the same data either way.
    """
    from gradience_jax import data

    with _x32():
        if model == "mlp":
            batch = data.classification(key, n=1024, dim=spec["sizes"][0],
                                        num_classes=spec["sizes"][-1], separation=0.75)
            desc = f"Gaussian blobs, dim {spec['sizes'][0]}, {spec['sizes'][-1]} classes"
        elif model == "cnn":
            batch = data.images(key, n=256, size=spec["image_size"], channels=spec["in_channels"],
                                num_classes=spec["num_classes"])
            desc = f"{spec['image_size']}x{spec['image_size']} template images, {spec['num_classes']} classes"
        else:
            seq_len = min(12, spec["max_len"])
            batch = data.token_sequences(key, n=64, seq_len=seq_len, vocab_size=spec["vocab_size"])
            desc = f"arithmetic progressions mod {spec['vocab_size']}, length {seq_len}"
        return jax.device_get(batch), desc


def split(batch: dict) -> tuple[dict, dict]:
    """First half (train) and second half (test) of a batch."""
    n = len(jax.tree_util.tree_leaves(batch)[0])
    half = n // 2
    return (jax.tree_util.tree_map(lambda x: x[:half], batch),
            jax.tree_util.tree_map(lambda x: x[half:], batch))


def _shape_dict(pure: Mapping) -> dict[str, tuple[int, ...]]:
    from gradience_jax.tree import path_str

    flat = jax.tree_util.tree_flatten_with_path(pure)[0]
    return {path_str(p): tuple(np.shape(x)) for p, x in flat}


def _infer_mlp(shapes: Mapping[str, tuple]) -> dict[str, Any]:
    n = 0
    while f"layers/{n}/kernel" in shapes:
        n += 1
    if n == 0:
        raise KeyError("layers/0/kernel")
    kernels = [shapes[f"layers/{i}/kernel"] for i in range(n)]
    if any(len(k) != 2 for k in kernels):
        raise ValueError("MLP kernels must be 2-D")
    return {"sizes": [kernels[0][0]] + [k[1] for k in kernels]}


def _infer_cnn(shapes: Mapping[str, tuple]) -> dict[str, Any]:
    n = 0
    while f"convs/{n}/kernel" in shapes:
        n += 1
    if n == 0:
        raise KeyError("convs/0/kernel")
    kernels = [shapes[f"convs/{i}/kernel"] for i in range(n)]
    if any(len(k) != 4 for k in kernels):
        raise ValueError("CNN conv kernels must be 4-D")
    head = shapes["head/kernel"]
    side = math.isqrt(max(head[0] // kernels[-1][3], 0))
    return {"in_channels": kernels[0][2], "channels": [k[3] for k in kernels],
            "image_size": side * 2**n, "num_classes": head[1]}


def _infer_transformer(shapes: Mapping[str, tuple]) -> dict[str, Any]:
    vocab, d_model = shapes["embed/embedding"]
    n = 0
    while f"blocks/{n}/attention/query/kernel" in shapes:
        n += 1
    if n == 0:
        raise KeyError("blocks/0/attention/query/kernel")
    return {"vocab_size": vocab, "d_model": d_model,
            "num_heads": shapes["blocks/0/attention/query/kernel"][1], "num_layers": n,
            "d_ff": shapes["blocks/0/fc1/kernel"][1], "max_len": shapes["pos_embed/embedding"][0]}


_INFER = {"mlp": _infer_mlp, "cnn": _infer_cnn, "transformer": _infer_transformer}


def _abstract_shapes(model: str, spec: Mapping[str, Any]) -> dict[str, tuple]:
    from flax import nnx

    abstract = nnx.eval_shape(lambda: build_model(model, spec, nnx.Rngs(0)))
    return _shape_dict(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))


def _diff(expected: Mapping[str, tuple], got: Mapping[str, tuple]) -> list[str]:
    out = [f"missing {p}" for p in expected if p not in got]
    out += [f"unexpected {p}" for p in got if p not in expected]
    out += [f"{p} has shape {got[p]}, expected {expected[p]}"
            for p in expected if p in got and tuple(got[p]) != tuple(expected[p])]
    return out


def match_spec(model: str, pure: Mapping) -> dict[str, Any]:
    """The spec of family ``model`` that reproduces the checkpoint's tree exactly.

    Raises:
        CheckpointError: the tree is not one of ``model``'s (names the first differences).
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    got = _shape_dict(pure)
    try:
        spec = _INFER[model](got)
    except (KeyError, ValueError, IndexError, TypeError) as exc:
        spec = default_spec(model)
        hint = f" (no {exc.args[0]})" if isinstance(exc, KeyError) else ""
        diffs = _diff(_abstract_shapes(model, spec), got)
        raise CheckpointError(
            f"checkpoint tree does not match --model {model}{hint}: {_summarise(diffs)}"
        ) from None
    diffs = _diff(_abstract_shapes(model, spec), got)
    if diffs:
        raise CheckpointError(f"checkpoint tree does not match --model {model}: {_summarise(diffs)}")
    return spec


def _summarise(items: Sequence[str], n: int = 3) -> str:
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return "; ".join(items[:n]) + more


def infer_model(pure: Mapping) -> tuple[str, dict[str, Any]]:
    """``(family, spec)`` of the first built-in family whose tree the checkpoint matches.

    Raises:
        CheckpointError: no family matches.
    """
    for model in MODELS:
        try:
            return model, match_spec(model, pure)
        except CheckpointError:
            continue
    keys = sorted(_shape_dict(pure))
    raise CheckpointError(
        f"checkpoint tree matches none of the built-in models {MODELS} "
        f"(it has {len(keys)} arrays: {_summarise(keys)}); pass --model or use "
        "`gradience-jax weights PATH` for a weights-only report"
    )


# =========================================================================================
# checkpoints
# =========================================================================================


def to_pure_dict(params: Any) -> dict:
    """Nested dict of numpy arrays from an ``nnx.Module``, ``nnx.State`` or a dict."""
    from flax import nnx

    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be an nnx.Module, nnx.State or a dict, got {type(params).__name__}")
    return jax.tree_util.tree_map(np.asarray, _plain(params))


def _plain(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def _int_keys(tree: Any) -> Any:
    """Digit-string keys (orbax) back to ints (``nnx.List`` indices)."""
    if isinstance(tree, Mapping):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v)
                for k, v in tree.items()}
    return tree


def _checkpoint_format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in ("msgpack", "orbax"):
            raise ValueError(f"format must be 'msgpack' or 'orbax', got {fmt!r}")
        return fmt
    return "msgpack" if path.suffix in (".msgpack", ".mpk", ".bin") else "orbax"


def save_checkpoint(params: Any, path: str | os.PathLike, format: str | None = None) -> Path:  # noqa: A002
    """Save parameters as a flax msgpack file (``*.msgpack``) or an orbax directory.

    Args:
        params: ``nnx.Module``, ``nnx.State`` or nested dict of arrays.
        path: file (msgpack) or directory (orbax; replaced if it exists).
        format: ``"msgpack"`` | ``"orbax"``; default from the suffix (``.msgpack`` or not).

    Returns:
        The absolute path written.
    """
    from flax import serialization

    path = Path(path).expanduser().resolve()
    pure = to_pure_dict(params)
    if _checkpoint_format(path, format) == "msgpack":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(serialization.msgpack_serialize(pure))
        return path
    import orbax.checkpoint as ocp

    path.parent.mkdir(parents=True, exist_ok=True)
    ckpt = ocp.PyTreeCheckpointer()
    ckpt.save(path, jax.tree_util.tree_map(np.asarray, _str_keys(pure)), force=True)
    return path


def _str_keys(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The pure parameter dict stored at ``path`` (msgpack file or orbax directory).

    Raises:
        CheckpointError: missing path, unreadable / corrupt data, or not a dict of arrays.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        tree = _load_orbax(path)
    else:
        tree = _load_msgpack(path)
    if not isinstance(tree, Mapping) or not jax.tree_util.tree_leaves(tree):
        raise CheckpointError(f"checkpoint {path} does not hold a dict of parameter arrays")
    leaves = jax.tree_util.tree_leaves(tree)
    if not all(isinstance(x, (np.ndarray, jax.Array, np.generic)) for x in leaves):
        raise CheckpointError(f"checkpoint {path} holds non-array leaves")
    return _int_keys(jax.tree_util.tree_map(np.asarray, _plain(tree)))


def _load_msgpack(path: Path) -> Any:
    from flax import serialization

    data = path.read_bytes()
    if not data:
        raise CheckpointError(f"checkpoint {path} is empty")
    try:
        return serialization.msgpack_restore(data)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means a corrupt file
        raise CheckpointError(f"cannot read checkpoint {path} as flax msgpack ({_first_line(exc)})") from None


def _load_orbax(path: Path) -> Any:
    import logging

    import orbax.checkpoint as ocp

    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ocp.PyTreeCheckpointer().restore(path.resolve())
    except Exception as exc:  # noqa: BLE001 - any restore failure means a bad directory
        raise CheckpointError(f"cannot read orbax checkpoint {path} ({_first_line(exc)})") from None
    finally:
        absl.setLevel(level)


class Restored(NamedTuple):
    """A built-in model with parameters: family, spec, NNX module and the adapter
    (``loss_fn``, ``model_fn``, ``params``, ``head``) the operators take."""

    model: str
    spec: dict
    module: Any
    adapted: Any


def _float_dtype(pure: Mapping) -> Any:
    for x in jax.tree_util.tree_leaves(pure):
        if np.issubdtype(np.asarray(x).dtype, np.floating):
            return jnp.dtype(np.asarray(x).dtype)
    return jnp.dtype(jnp.float32)


@functools.lru_cache(maxsize=32)
def _family(model: str, spec_key: str, dtype: str) -> tuple[Any, Any]:
    """``(graphdef, adapter with abstract params)``, cached: the same family and sizes give
    the same ``loss_fn`` / ``model_fn`` objects, so compiled programs are reused."""
    from flax import nnx

    from gradience_jax.models import from_nnx
    from gradience_jax.operators import heads

    spec = json.loads(spec_key)
    abstract = nnx.eval_shape(lambda: build_model(model, spec, nnx.Rngs(0), jnp.dtype(dtype)))
    return nnx.graphdef(abstract), from_nnx(abstract, heads.softmax_cross_entropy())


def _with_params(model: str, spec: Mapping[str, Any], pure: Mapping) -> Restored:
    from flax import nnx

    graphdef, adapted = _family(model, json.dumps(dict(spec), sort_keys=True), str(_float_dtype(pure)))
    state = jax.tree_util.tree_map(lambda x: x, adapted.params)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jnp.asarray, pure))
    module = nnx.merge(graphdef, state)
    return Restored(model, dict(spec), module, adapted._replace(params=state))


def restore_model(pure: Mapping, model: str | None = None) -> Restored:
    """Rebuild a built-in model from a pure parameter dict (sizes inferred from shapes).

    Args:
        pure: parameter dict (from :func:`load_checkpoint`).
        model: family to match (``None``: the first that fits).

    Raises:
        CheckpointError: the tree does not match ``model`` (or any family).
    """
    if model is None:
        model, spec = infer_model(pure)
    else:
        spec = match_spec(model, pure)
    return _with_params(model, spec, pure)


@functools.partial(jax.jit, static_argnames=("model", "spec_key", "seed"))
def _init_pure(model: str, spec_key: str, seed: int) -> dict:
    from flax import nnx

    module = build_model(model, json.loads(spec_key), nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def init_model(model: str, spec: Mapping[str, Any] | None = None, seed: int = 0) -> Restored:
    """A freshly initialised built-in model (``nnx.Rngs(seed)``), in one compiled program."""
    spec = default_spec(model) if spec is None else dict(spec)
    return _with_params(model, spec, _init_pure(model, json.dumps(spec, sort_keys=True), seed))


# =========================================================================================
# the measurements (each returns JSON-safe data plus what the figures need)
# =========================================================================================


@functools.partial(jax.jit, static_argnames=("model_fn", "head"))
def _metrics_jit(model_fn: Callable, head: Callable, params: PyTree, batch: dict) -> tuple:
    logits = model_fn(params, batch)
    return head(logits, batch), jnp.mean(jnp.argmax(logits, -1) == batch["labels"])


def evaluate(adapted: Any, params: PyTree, batch: dict) -> dict[str, float]:
    """``{"loss", "accuracy"}`` of a classifier / language model on ``batch``."""
    loss, acc = _metrics_jit(adapted.model_fn, adapted.head, params, batch)
    return {"loss": float(loss), "accuracy": float(acc)}


@functools.partial(jax.jit, static_argnames=("loss_fn", "steps", "learning_rate"))
def _fit(loss_fn: Callable, params: PyTree, batch: dict, steps: int, learning_rate: float):
    import optax

    opt = optax.adam(learning_rate)

    def step(carry, _):
        p, s = carry
        value, g = jax.value_and_grad(loss_fn)(p, batch)
        upd, s = opt.update(g, s, p)
        return (optax.apply_updates(p, upd), s), value

    (p, _), values = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
    return p, values


def train(adapted: Any, batch: dict, steps: int, learning_rate: float) -> tuple[PyTree, np.ndarray]:
    """Full-batch Adam for ``steps`` steps in one compiled ``lax.scan``.

    Returns:
        ``(trained params, (steps,) loss before each step)``.
    """
    params, curve = _fit(adapted.loss_fn, adapted.params, batch, int(steps), float(learning_rate))
    return params, np.asarray(curve, np.float64)


def _operator(name: str, adapted: Any, params: PyTree, batch: dict) -> Any:
    import gradience_jax as gj

    if name == "hessian":
        return gj.hessian(adapted.loss_fn, params, batch)
    if name == "ggn":
        return gj.ggn(adapted.model_fn, adapted.head, params, batch)
    if name == "ef":
        return gj.empirical_fisher(adapted.loss_fn, params, batch)
    from gradience_jax.operators.kfac import kfac

    return kfac(adapted.model_fn, adapted.head, params, batch)


def _top_k(op: Any, cfg: AnalysisConfig) -> Any:
    from gradience_jax.spectrum import eigsh

    k = min(cfg.k, op.n_params)
    iters = min(max(cfg.iters, k), op.n_params) if cfg.reorth == "full" else max(cfg.iters, k)
    return eigsh(op, k=k, which="LA", reorth=cfg.reorth, key=jax.random.key(cfg.seed),
                 tol=cfg.tol, max_iters=iters, seed=cfg.seed)


def _trace(op: Any, cfg: AnalysisConfig) -> dict[str, Any]:
    from gradience_jax.estimators import hutchinson_trace

    t = hutchinson_trace(op, jax.random.fold_in(jax.random.key(cfg.seed), 1), cfg.trace_samples)
    return {"estimate": float(t.estimate), "stderr": float(t.stderr),
            "num_samples": cfg.trace_samples, "estimator": "hutchinson (rademacher)"}


def _density(op: Any, cfg: AnalysisConfig) -> dict[str, Any]:
    from gradience_jax.estimators import spectral_density

    iters = min(cfg.density_iters, op.n_params)
    dens = spectral_density(op, jax.random.fold_in(jax.random.key(cfg.seed), 2),
                            num_probes=cfg.density_probes, num_iters=iters)
    nodes = np.asarray(dens.nodes, np.float64)
    weights = np.asarray(dens.weights, np.float64)
    lo, hi = float(nodes.min()), float(nodes.max())
    width = max(hi - lo, 1e-12 * max(abs(hi), 1.0), 1e-30)
    sigma = 0.01 * width
    grid = np.linspace(lo - 0.05 * width, hi + 0.05 * width, 400)
    values = np.asarray(dens.evaluate(jnp.asarray(grid), sigma), np.float64)
    per_probe = op.n_params * np.sum(weights * nodes, axis=1)
    stderr = float(np.std(per_probe, ddof=1) / math.sqrt(len(per_probe))) if len(per_probe) > 1 else None
    return {
        "operator": op.name, "num_probes": cfg.density_probes, "num_iters": iters,
        "sigma": sigma, "grid": grid, "density": values, "support": [lo, hi],
        "nodes": nodes, "weights": weights,
        "trace": {"estimate": float(np.mean(per_probe)), "stderr": stderr,
                  "estimator": "stochastic Lanczos quadrature"},
    }


def _landscape(adapted: Any, params: PyTree, batch: dict, cfg: AnalysisConfig) -> dict[str, Any]:
    from gradience_jax import landscape

    key = jax.random.fold_in(jax.random.key(cfg.seed), 3)
    d1 = landscape.random_direction(jax.random.fold_in(key, 1), params)
    d2 = landscape.random_direction(jax.random.fold_in(key, 2), params)
    axis = np.linspace(-cfg.span, cfg.span, cfg.grid)
    sl = landscape.slice_2d(adapted.loss_fn, params, batch, d1, d2, axis, axis)
    loss = np.asarray(sl.loss, np.float64)
    i, j = int(np.argmin(np.abs(sl.alphas))), int(np.argmin(np.abs(sl.betas)))
    return {
        "directions": "filter-normalised Gaussian (Li et al. 2018)", "alphas": sl.alphas,
        "betas": sl.betas, "loss": loss, "center_loss": float(loss[i, j]),
        "min_loss": float(np.nanmin(loss)), "max_loss": float(np.nanmax(loss)),
        "nonfinite_fraction": float(sl.nonfinite_fraction),
    }


def _losses(adapted: Any, params: PyTree, train_batch: dict, test_batch: dict) -> dict[str, float]:
    tr, te = evaluate(adapted, params, train_batch), evaluate(adapted, params, test_batch)
    return {"train": tr["loss"], "test": te["loss"], "train_accuracy": tr["accuracy"],
            "test_accuracy": te["accuracy"]}


def _weights(params: PyTree) -> tuple[dict[str, Any], Any]:
    from gradience_jax.weights import weight_spectra

    rep = weight_spectra(params)
    return rep.to_dict(), rep


# =========================================================================================
# consistency checks
# =========================================================================================


def _check(name: str, passed: bool, detail: str) -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "detail": detail}


def _checks(curv: Mapping[str, dict], density: dict | None) -> list[dict[str, Any]]:
    out = []
    for name, c in curv.items():
        top = c["top_k"]
        lam = np.asarray(top["eigenvalues"], np.float64)
        out.append(_check(f"{name}_converged", top["converged"],
                          f"{top['iterations']} Lanczos iterations, max Ritz residual "
                          f"{max(top['ritz_residuals']):.2e}"))
        tr = c["trace"]
        if top["is_psd"]:
            slack = 3.0 * tr["stderr"] + 1e-6 * abs(tr["estimate"])
            out.append(_check(f"{name}_topk_below_trace", lam.sum() <= tr["estimate"] + slack,
                              f"sum of top-{len(lam)} = {lam.sum():.6g} <= trace {tr['estimate']:.6g} "
                              f"+ 3 stderr"))
            out.append(_check(f"{name}_psd", lam.min() >= -1e-5 * abs(lam.max()),
                              f"smallest computed eigenvalue {lam.min():.3g}"))
    if density is not None and density["operator"] in curv:
        c = curv[density["operator"]]
        h, s = c["trace"], density["trace"]
        err = math.sqrt(h["stderr"] ** 2 + (s["stderr"] or 0.0) ** 2)
        diff = abs(h["estimate"] - s["estimate"])
        out.append(_check("trace_hutchinson_vs_slq", diff <= 4.0 * err + 1e-6 * abs(h["estimate"]),
                          f"|{h['estimate']:.6g} - {s['estimate']:.6g}| = {diff:.3g} vs 4 x "
                          f"combined stderr {err:.3g}"))
        lam_max = max(c["top_k"]["eigenvalues"])
        hi = density["support"][1]
        out.append(_check("density_support_vs_lambda_max", hi <= lam_max * (1 + 1e-3) + 1e-9 * abs(lam_max),
                          f"largest SLQ node {hi:.6g} vs Lanczos lambda_max {lam_max:.6g}"))
    return out


# =========================================================================================
# figures (matplotlib on an Agg canvas; pyplot state untouched)
# =========================================================================================


def _figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _fig_training(curve: np.ndarray, path: Path) -> None:
    fig = _figure((5.5, 3.5))
    ax = fig.add_subplot()
    ax.semilogy(np.arange(1, len(curve) + 1), curve)
    ax.set(xlabel="step", ylabel="training loss", title="training (full-batch Adam)")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)


def _fig_top_k(curv: Mapping[str, dict], path: Path) -> None:
    from matplotlib.ticker import MaxNLocator

    fig = _figure((10.0, 3.8))
    ax1, ax2 = fig.subplots(1, 2)
    for name, c in curv.items():
        lam = np.asarray(c["top_k"]["eigenvalues"], np.float64)
        res = np.asarray(c["top_k"]["ritz_residuals"], np.float64)
        idx = np.arange(1, len(lam) + 1)
        ax1.plot(idx, lam, "o-", label=name)
        ax2.semilogy(idx, np.maximum(res, 1e-300), "s-", label=name)
    ax1.set(xlabel="index i", ylabel="lambda_i", title="top-k eigenvalues (Lanczos)")
    ax2.set(xlabel="index i", ylabel="Ritz residual bound", title="convergence")
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(path, dpi=110)


def _fig_density(density: dict, lam: Sequence[float], path: Path) -> None:
    fig = _figure((6.0, 3.8))
    ax = fig.add_subplot()
    dens = np.asarray(density["density"], np.float64)
    floor = 1e-7 * max(float(np.max(dens)), 1e-300)
    ax.semilogy(density["grid"], np.maximum(dens, floor), color="C0")
    for v in lam:
        ax.axvline(v, color="C3", alpha=0.35, lw=0.8)
    ax.set(xlabel="eigenvalue", ylabel="density (log)",
           title=f"{density['operator']} spectral density (SLQ); red: top-k")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)


def _fig_landscape(land: dict, path: Path) -> None:
    fig = _figure((5.5, 4.5))
    ax = fig.add_subplot()
    loss = np.asarray(land["loss"], np.float64)
    cs = ax.contourf(land["alphas"], land["betas"], loss.T, levels=25, cmap="viridis")
    ax.contour(land["alphas"], land["betas"], loss.T, levels=12, colors="k", linewidths=0.4)
    fig.colorbar(cs, ax=ax, label="loss")
    ax.plot([0], [0], "r*", ms=12)
    ax.set(xlabel="alpha (direction 1)", ylabel="beta (direction 2)",
           title="loss landscape, filter-normalised directions")
    fig.savefig(path, dpi=110)


def _fig_weights(rep: Any, path: Path) -> None:
    from gradience_jax.plots_weights import plot_layer_metrics

    plot_layer_metrics(rep, path=str(path))


def _draw_figures(out: Path, results: dict, rep: Any, curve: np.ndarray | None) -> dict[str, str]:
    files = {}
    if curve is not None and len(curve):
        _fig_training(curve, out / "training.png")
        files["training"] = "training.png"
    if results.get("curvature"):
        _fig_top_k(results["curvature"], out / "curvature_top_k.png")
        files["curvature_top_k"] = "curvature_top_k.png"
    if results.get("density"):
        dens = results["density"]
        lam = results["curvature"][dens["operator"]]["top_k"]["eigenvalues"]
        _fig_density(dens, lam, out / "spectral_density.png")
        files["spectral_density"] = "spectral_density.png"
    if results.get("landscape"):
        _fig_landscape(results["landscape"], out / "landscape_2d.png")
        files["landscape_2d"] = "landscape_2d.png"
    if rep is not None and len(rep):
        _fig_weights(rep, out / "weight_spectra.png")
        files["weight_spectra"] = "weight_spectra.png"
    return files


# =========================================================================================
# report.md
# =========================================================================================


def _fmt(v: Any, d: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.{d}g}"
    return str(v)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return lines + [""]


def summary_rows(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(quantity, value)`` rows of the headline numbers (for the CLI and report.md)."""
    rows = [("model", f"{report['model']['name']} ({report['model']['n_params']:,} params, "
                      f"{report['model']['source']})")]
    if report.get("loss") is not None:
        rows.append(("loss / accuracy", f"{_fmt(report['loss']['train'])} / "
                                        f"{_fmt(report['loss']['train_accuracy'])}"))
    for name, c in (report.get("curvature") or {}).items():
        top = c["top_k"]
        lam = top["eigenvalues"]
        rows.append((f"{name} lambda_max", f"{_fmt(lam[0], 6)} ({'converged' if top['converged'] else 'NOT converged'}, "
                                           f"{top['iterations']} it.)"))
        rows.append((f"{name} top-{len(lam)}", ", ".join(_fmt(v, 3) for v in lam)))
        rows.append((f"{name} trace", f"{_fmt(c['trace']['estimate'], 6)} +- {_fmt(c['trace']['stderr'], 2)}"))
    if report.get("density"):
        lo, hi = report["density"]["support"]
        rows.append(("density support", f"[{_fmt(lo)}, {_fmt(hi)}]"))
    ws = report["weights"]["summary"]
    rows.append(("weights", f"{ws['num_layers']} layers, mean alpha {_fmt(ws['mean_alpha'], 3)}, "
                            f"mean eff. rank {_fmt(ws['mean_effective_rank'], 3)}"))
    if report.get("landscape"):
        land = report["landscape"]
        rows.append(("landscape", f"loss {_fmt(land['min_loss'])} .. {_fmt(land['max_loss'])} "
                                  f"on the {len(land['alphas'])}x{len(land['betas'])} slice"))
    checks = report.get("checks") or []
    rows.append(("checks", f"{sum(c['passed'] for c in checks)}/{len(checks)} passed"))
    rows.append(("wall time", f"{report['wall_times']['total']:.1f} s"))
    return rows


def _markdown(report: Mapping[str, Any]) -> str:
    m = report["model"]
    lines = ["# gradience_jax analysis report", "",
             f"Model `{m['name']}` ({m['n_params']:,} parameters, {m['source']}), seed "
             f"{report['seed']}, created {report['created']}.", ""]
    lines += _md_table(["quantity", "value"], summary_rows(report))
    figs = report.get("figures") or {}
    if "training" in figs:
        lines += ["## Training", "", f"![training]({figs['training']})", ""]
    if report.get("curvature"):
        lines += ["## Curvature", ""]
        rows = []
        for name, c in report["curvature"].items():
            t = c["top_k"]
            rows.append([name, t["eigenvalues"][0], t["eigenvalues"][-1], c["trace"]["estimate"],
                         c["trace"]["stderr"], t["converged"], t["iterations"], t["operator_calls"],
                         t["wall_time_s"]])
        lines += _md_table(["operator", "lambda_1", "lambda_k", "trace", "stderr", "converged",
                            "iterations", "matvecs", "time (s)"], rows)
        for name, c in report["curvature"].items():
            for w in c["top_k"]["warnings"] + c.get("warnings", []):
                lines.append(f"- {name}: {w}")
        lines.append("")
        if "curvature_top_k" in figs:
            lines += [f"![top-k]({figs['curvature_top_k']})", ""]
    if "spectral_density" in figs:
        lines += ["## Spectral density", "", f"![density]({figs['spectral_density']})", ""]
    lines += ["## Weight spectra", ""]
    layer_rows = [[p, "x".join(map(str, x["shape"])), x.get("alpha"), x.get("stable_rank"),
                   x.get("effective_rank"), x.get("num_spikes"), str(x.get("verdict", "")).split(" (")[0]]
                  for p, x in report["weights"]["layers"].items()]
    lines += _md_table(["layer", "shape", "alpha", "stable rank", "eff. rank", "spikes", "verdict"],
                       layer_rows)
    if "weight_spectra" in figs:
        lines += [f"![weights]({figs['weight_spectra']})", ""]
    if "landscape_2d" in figs:
        lines += ["## Loss landscape", "", f"![landscape]({figs['landscape_2d']})", ""]
    if report.get("checks"):
        lines += ["## Consistency checks", ""]
        lines += [f"- [{'x' if c['passed'] else ' '}] `{c['name']}`: {c['detail']}" for c in report["checks"]]
        lines.append("")
    lines += ["## Reproducibility", ""]
    lines += _md_table(["package", "version"], list(report["versions"].items()))
    lines += ["Configuration: `" + json.dumps(report["config"]) + "`", ""]
    return "\n".join(lines)


# =========================================================================================
# the job
# =========================================================================================


def plan(cfg: AnalysisConfig) -> list[tuple[str, str]]:
    """``(stage key, description)`` of every stage :func:`analyze` will run, in order."""
    stages = [("setup", "building model and data")]
    if cfg.checkpoint is None:
        stages.append(("train", f"training {cfg.train_steps} steps"))
    if not cfg.weights_only:
        for op in cfg.operators:
            stages.append((f"top_k:{op}", f"{op}: top-{cfg.k} eigenvalues (Lanczos)"))
            stages.append((f"trace:{op}", f"{op}: trace (Hutchinson, {cfg.trace_samples} probes)"))
        stages.append(("density", "spectral density (SLQ)"))
        stages.append(("landscape", f"2-D landscape slice ({cfg.grid}x{cfg.grid})"))
    stages.append(("weights", "weight spectra"))
    if cfg.figures:
        stages.append(("figures", "figures"))
    stages.append(("write", "writing report"))
    return stages


def versions() -> dict[str, str]:
    """Versions of Python, the platform, jax, flax, optax, numpy and this package."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("gradience-jax", "jax", "jaxlib", "flax", "optax", "numpy", "orbax-checkpoint",
                "matplotlib"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    out["device"] = str(jax.devices()[0].device_kind)
    out["x64"] = str(bool(jax.config.jax_enable_x64))
    return out


def check_writable(out: str | os.PathLike) -> Path:
    """Create ``out`` (a directory) and verify a file can be written in it.

    Raises:
        OSError: with a one-line reason when the folder cannot be created or written.
    """
    path = Path(out).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".gradience_write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise OSError(f"cannot write to output folder {path}: {reason}") from None
    return path


class _Run:
    """Bookkeeping of one job: stage timing, captured warnings, progress callbacks."""

    def __init__(self, progress: Progress | None):
        self.progress = progress
        self.wall: dict[str, float] = {}
        self.warnings: dict[str, list[str]] = {}

    def stage(self, key: str, description: str, fn: Callable[[], Any]) -> Any:
        if self.progress is not None:
            self.progress(key, description)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = fn()
        self.wall[key] = time.perf_counter() - t0
        msgs = list(dict.fromkeys(str(w.message).splitlines()[0] for w in caught))
        if msgs:
            self.warnings[key] = msgs
        return value


def _setup(cfg: AnalysisConfig) -> tuple[Restored, str]:
    if cfg.checkpoint is not None:
        restored = restore_model(load_checkpoint(cfg.checkpoint), cfg.model)
        return restored, f"checkpoint {cfg.checkpoint}"
    model = cfg.model or "mlp"
    return init_model(model, seed=cfg.seed), "trained here"


def _curvature(run: _Run, name: str, adapted: Any, params: PyTree, batch: dict,
               cfg: AnalysisConfig) -> tuple[dict[str, Any], Any]:
    def top_k() -> tuple[Any, Any]:
        op = _operator(name, adapted, params, batch)
        return op, _top_k(op, cfg)

    op, res = run.stage(f"top_k:{name}", f"{name}: top-{cfg.k} eigenvalues (Lanczos)", top_k)
    tr = run.stage(f"trace:{name}", f"{name}: trace (Hutchinson, {cfg.trace_samples} probes)",
                   lambda: _trace(op, cfg))
    entry = {"top_k": res.to_dict(), "trace": tr,
             "warnings": run.warnings.get(f"top_k:{name}", []) + run.warnings.get(f"trace:{name}", []),
             "wall_time_s": run.wall[f"top_k:{name}"] + run.wall[f"trace:{name}"]}
    coverage = getattr(op, "coverage", None)
    if coverage is not None:
        entry["coverage"] = jsonable(getattr(coverage, "to_dict", lambda: str(coverage))())
    return entry, op


def analyze(cfg: AnalysisConfig | None = None, out: str | os.PathLike | None = "gradience_report",
            progress: Progress | None = None, save_params_to: str | os.PathLike | None = None
            ) -> dict[str, Any]:
    """Run the analysis job and write the report folder.

    Args:
        cfg: :class:`AnalysisConfig` (default: ``AnalysisConfig()``, quick settings when
            ``GRADIENCE_FAST=1``).
        out: output folder (created); ``None``: return the report without writing files.
        progress: ``progress(stage_key, description)`` called as each stage starts.
        save_params_to: also save the analysed parameters there (msgpack file or orbax dir).

    Returns:
        The report dict (JSON-safe; the same content as ``report.json``).

    Raises:
        CheckpointError: missing / corrupt / mismatched checkpoint.
        OSError: ``out`` cannot be written.
        ValueError: bad settings.
    """
    cfg = AnalysisConfig() if cfg is None else cfg
    if fast_mode() and not cfg.fast:
        cfg = cfg.quick()
    t_start = time.perf_counter()
    out_path = check_writable(out) if out is not None else None
    run = _Run(progress)
    restored, source = run.stage("setup", "building model and data", lambda: _setup(cfg))
    adapted = restored.adapted
    key = jax.random.key(cfg.seed)
    data_all, data_desc = dataset(restored.model, restored.spec, jax.random.fold_in(key, 0))
    train_batch, test_batch = split(data_all)
    params, curve = adapted.params, None
    if cfg.checkpoint is None:
        params, curve = run.stage("train", f"training {cfg.train_steps} steps",
                                  lambda: train(adapted, train_batch, cfg.train_steps,
                                                                cfg.learning_rate))
    results: dict[str, Any] = {"curvature": {}, "density": None, "landscape": None}
    ops = {}
    if not cfg.weights_only:
        for name in cfg.operators:
            results["curvature"][name], ops[name] = _curvature(run, name, adapted, params, train_batch, cfg)
        dens_op = "hessian" if "hessian" in ops else cfg.operators[0]
        results["density"] = run.stage("density", "spectral density (SLQ)", lambda: _density(ops[dens_op], cfg))
        results["density"]["operator"] = dens_op
        results["landscape"] = run.stage("landscape", f"2-D landscape slice ({cfg.grid}x{cfg.grid})",
                                         lambda: _landscape(adapted, params, train_batch, cfg))
    weights_dict, rep = run.stage("weights", "weight spectra", lambda: _weights(params))
    from gradience_jax.tree import size

    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "seed": cfg.seed,
        "config": jsonable(dataclasses.asdict(cfg)),
        "model": {"name": restored.model, "spec": restored.spec, "n_params": size(params),
                  "source": source},
        "data": None if cfg.weights_only else {
            "description": data_desc, "train_examples": len(train_batch["labels"]),
            "test_examples": len(test_batch["labels"]),
            "shapes": {k: list(v.shape) for k, v in train_batch.items()}},
        "training": None if curve is None else {
            "steps": cfg.train_steps, "optimizer": f"adam({cfg.learning_rate:g}), full batch",
            "loss_initial": curve[0] if len(curve) else None,
            "loss_final": curve[-1] if len(curve) else None, "loss_curve": curve},
        "loss": None if cfg.weights_only else _losses(adapted, params, train_batch, test_batch),
        "curvature": results["curvature"] or None,
        "density": results["density"],
        "weights": weights_dict,
        "landscape": results["landscape"],
        "checks": [] if cfg.weights_only else _checks(results["curvature"], results["density"]),
        "warnings": run.warnings,
        "figures": {},
        "files": {},
        "wall_times": {},
    }
    report = jsonable(report)
    if out_path is not None and cfg.figures:
        report["figures"] = run.stage("figures", "figures",
                                      lambda: _draw_figures(out_path, report, rep, curve))
    if save_params_to is not None:
        save_checkpoint(params, save_params_to)
    if out_path is not None:
        run.stage("write", "writing report", lambda: _write(out_path, report, params, run, t_start))
    else:
        report["wall_times"] = {**run.wall, "total": time.perf_counter() - t_start}
    return report


def _write(out: Path, report: dict, params: PyTree, run: _Run, t_start: float) -> None:
    save_checkpoint(params, out / "params.msgpack")
    report["files"] = {"json": "report.json", "markdown": "report.md", "params": "params.msgpack",
                       "figures": sorted(report["figures"].values())}
    report["wall_times"] = jsonable({**run.wall, "total": time.perf_counter() - t_start})
    report["warnings"] = jsonable(run.warnings)
    (out / "report.md").write_text(_markdown(report))
    (out / "report.json").write_text(json.dumps(report, indent=1, allow_nan=False))


def write_weights_report(pure: Mapping, out: str | os.PathLike | None = None) -> tuple[dict, Any]:
    """Weight spectra of any parameter tree; writes ``weights.json`` / ``weights.md`` to ``out``.

    Returns:
        ``(JSON-safe dict, WeightSpectraReport)``.
    """
    from gradience_jax.weights import weight_spectra

    rep = weight_spectra(pure)
    data = jsonable(rep.to_dict())
    if out is not None:
        path = check_writable(out)
        (path / "weights.json").write_text(json.dumps(data, indent=1, allow_nan=False))
        (path / "weights.md").write_text("```\n" + rep.to_text() + "\n```\n")
    return data, rep
