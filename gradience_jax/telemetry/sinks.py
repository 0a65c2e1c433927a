"""Metric writers for the loggers JAX training loops use: clu, TensorBoard, W&B, MLflow.

Every writer takes the records :class:`~gradience_jax.telemetry.TelemetryWriter` takes,
``write(step, metrics)``, so one loop logs to any of them, or to several through
:func:`tee`; :func:`replay` sends a finished JSON Lines log (``load_telemetry(path)[1]``)
to any of them. Host side; each backend is an optional extra, imported when its writer is
built (a missing one raises :class:`MissingExtraError`, an ``ImportError`` naming the
``pip install`` to run; nothing is skipped silently):

* :class:`TensorBoardSink`: event files through ``tensorboardX`` (no TensorFlow, no
  torch; ``torch.utils.tensorboard`` when only that is installed); extra ``[tensorboard]``.
* :class:`WandbSink`: a Weights & Biases run (``wandb.init(**kwargs)``, or a run you pass);
  ``mode="offline"`` writes the run under ``dir`` without a network; extra ``[wandb]``.
* :class:`MLflowSink`: an MLflow run through ``MlflowClient`` (any tracking URI: a local
  ``file:`` store, ``sqlite:``, a server); extra ``[mlflow]``. Recent MLflow 3 releases
  refuse the ``file:`` store unless ``MLFLOW_ALLOW_FILE_STORE=true`` is set (their message
  says so).
* :class:`CluSink` forwards records to any ``clu.metric_writers`` writer
  (``write_scalars`` / ``write_texts``); :func:`as_clu_writer` goes the other way: it makes
  any of these writers (or a ``TelemetryWriter``) a ``clu`` ``MetricWriter`` for loops
  that log through clu (a subclass of clu's ``MetricWriter`` when ``clu.metric_writers``
  imports, which in clu 0.0.12 needs TensorFlow; the same duck-typed object otherwise).

What a record becomes (:func:`split_metrics`): nested dicts are flattened to
``"outer/inner"`` names (as ``TelemetryWriter`` does); numbers, NumPy / JAX scalars and
0-d arrays become floats, NaN and Inf included (a diverging run shows as such); a numeric
array of up to ``max_array_size`` elements becomes one scalar per element, ``name/0``,
``name/1``, ... (``name/0_1`` for 2-D); a larger array is dropped with a
:class:`~gradience_jax.telemetry.TelemetryWarning`; strings are text (TensorBoard text,
W&B history, MLflow tags); ``None`` (missing) is left out.

Supported names: ``MetricSink``, ``TensorBoardSink``, ``WandbSink``, ``MLflowSink``,
``CluSink``, ``CluMetricWriter``, ``as_clu_writer``, ``MultiSink``, ``tee``, ``replay``,
``split_metrics``, ``summary_writer_class``, ``MissingExtraError``.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import re
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from gradience_jax.errors import ArgumentTypeError
from gradience_jax.telemetry.io import (
    TelemetryRecord,
    TelemetryWarning,
    _check_int,
    _check_path,
    _flatten_metrics,
    _short,
)

__all__ = [
    "CluMetricWriter",
    "CluSink",
    "MLflowSink",
    "MetricSink",
    "MissingExtraError",
    "MultiSink",
    "TensorBoardSink",
    "WandbSink",
    "as_clu_writer",
    "replay",
    "split_metrics",
    "summary_writer_class",
    "tee",
]

_MLFLOW_BATCH = 1000  # MLflow's limit on metrics per log_batch
_MLFLOW_TAGS = 100  # ... on tags / params per log_batch
_MLFLOW_BAD = re.compile(r"[^A-Za-z0-9_\-. :/]")


class MissingExtraError(ImportError):
    """An optional dependency is missing; the message names the ``pip install`` to run.

    Attributes:
        extra: the ``gradience-jax[...]`` extra that installs it.
        package: the PyPI package.
    """

    def __init__(self, what: str, package: str, extra: str, module: str | None = None):
        super().__init__(
            f"{what} needs the {package!r} package, which is not installed: "
            f"pip install 'gradience-jax[{extra}]' (or pip install {package})",
            name=module or package,
        )
        self.extra = extra
        self.package = package


def _require(module: str, what: str, package: str, extra: str) -> Any:
    """``importlib.import_module(module)``, or :class:`MissingExtraError`."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(what, package, extra, module) from exc


def summary_writer_class() -> tuple[type, str]:
    """The TensorBoard ``SummaryWriter`` class to use and its backend's name.

    ``tensorboardX`` first (it needs neither TensorFlow nor torch), then
    ``torch.utils.tensorboard``.

    Returns:
        ``(SummaryWriter, "tensorboardX" | "torch.utils.tensorboard")``.

    Raises:
        MissingExtraError: neither is installed (``pip install 'gradience-jax[tensorboard]'``).
    """
    try:
        from tensorboardX import SummaryWriter  # noqa: PLC0415 - optional extra

        return SummaryWriter, "tensorboardX"
    except ImportError:
        pass
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415 - optional extra

        return SummaryWriter, "torch.utils.tensorboard"
    except ImportError as exc:
        raise MissingExtraError("writing TensorBoard event files", "tensorboardX",
                                "tensorboard", "tensorboardX") from exc


# --------------------------------------------------------------------------------------
# Records -> scalars and texts
# --------------------------------------------------------------------------------------


def _check_mapping(value: Any, name: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise ArgumentTypeError(f"{name} must be a dict (a Mapping) of name -> value, got "
                                f"{type(value).__name__}")
    return value


def _to_host(key: str, value: Any) -> np.ndarray:
    try:
        return np.asarray(value)
    except Exception as exc:  # e.g. a jax tracer inside jit
        raise TypeError(
            f"metric {key!r} ({type(value).__name__}) cannot be converted to a host array; "
            "metrics are written on the host: return them from the jitted step instead of "
            "writing from inside jit"
        ) from exc


def split_metrics(
    metrics: Mapping[str, Any], *, max_array_size: int = 64
) -> tuple[dict[str, float], dict[str, str]]:
    """One record's metrics as ``(scalars, texts)`` for a logger (rules in the module doc).

    Args:
        metrics: ``{name: value}`` as given to ``TelemetryWriter.write`` (nested dicts
            allowed).
        max_array_size: largest array expanded into per-element scalars (``>= 0``).

    Returns:
        ``({name: float}, {name: str})``.

    Raises:
        ArgumentTypeError: ``metrics`` is not a mapping or a name is not a string.
        ValueError: an empty or (after flattening) duplicated name.
        TypeError: a value of an unsupported type (complex, an object, a jax tracer).
    """
    flat = _flatten_metrics(_check_mapping(metrics, "metrics"))
    scalars: dict[str, float] = {}
    texts: dict[str, str] = {}
    for key, value in flat.items():
        if value is None:
            continue
        if isinstance(value, str):
            texts[key] = value
            continue
        if isinstance(value, (complex, np.complexfloating)):
            raise TypeError(f"metric {key!r} is complex; log its real and imaginary parts")
        if isinstance(value, (bool, int, float, np.number, np.bool_)):
            scalars[key] = float(value)
            continue
        if not (isinstance(value, (list, tuple)) or hasattr(value, "__array__")):
            raise TypeError(f"metric {key!r} has unsupported type {type(value).__name__}; "
                            "use numbers, strings or (small) numeric arrays")
        arr = _to_host(key, value)
        if arr.dtype.kind in "US":
            if arr.ndim == 0:
                texts[key] = str(arr)
                continue
            raise TypeError(f"metric {key!r} is an array of strings; log one string")
        if arr.dtype == object:  # lists holding None (a replayed log): None -> NaN
            obj = arr
            arr = np.full(obj.shape, np.nan)
            for idx in np.ndindex(obj.shape):
                arr[idx] = np.nan if obj[idx] is None else float(obj[idx])
        if arr.dtype.kind == "c":
            raise TypeError(f"metric {key!r} is complex; log its real and imaginary parts")
        try:
            arr = arr.astype(np.float64)  # also ml_dtypes (bfloat16)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"metric {key!r} has unsupported dtype {arr.dtype}") from exc
        if arr.ndim == 0:
            scalars[key] = float(arr)
        elif arr.size > max_array_size:
            warnings.warn(
                f"metric {key!r} has {arr.size} elements > max_array_size={max_array_size}: "
                "not sent to the logger (log a summary, or raise max_array_size)",
                TelemetryWarning,
                stacklevel=3,
            )
        else:
            for idx in np.ndindex(arr.shape):
                scalars[f"{key}/{'_'.join(map(str, idx))}"] = float(arr[idx])
    return scalars, texts


# --------------------------------------------------------------------------------------
# The writers
# --------------------------------------------------------------------------------------


class MetricSink:
    """Base of the writers: ``write(step, metrics)``, ``write_hparams``, ``flush``, ``close``.

    Subclasses implement ``_write(step, scalars, texts)`` and optionally ``_hparams``,
    ``_flush`` and ``_close``. A closed writer refuses ``write``; ``close`` is idempotent;
    a ``with`` block closes it (an exception inside the block marks MLflow runs FAILED and
    W&B runs exit code 1).

    Args:
        max_array_size: largest array metric expanded into per-element scalars.
    """

    def __init__(self, *, max_array_size: int = 64) -> None:
        self.max_array_size = _check_int(max_array_size, "max_array_size", lo=0)
        self._closed = False

    def write(self, step: Any, metrics: Mapping[str, Any]) -> None:
        """Send one record.

        Args:
            step: the training step (an integer; NumPy / 0-d JAX integers too).
            metrics: ``{name: value}`` (see :func:`split_metrics`).

        Raises:
            RuntimeError: the writer is closed.
            ArgumentTypeError: ``step`` is not an integer, ``metrics`` not a mapping.
            ValueError, TypeError: as :func:`split_metrics`.
        """
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        step = _check_int(step, "step")
        scalars, texts = split_metrics(metrics, max_array_size=self.max_array_size)
        if scalars or texts:
            self._write(step, scalars, texts)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Record the run's hyperparameters (nested dicts flattened to ``"a/b"``).

        Args:
            hparams: ``{name: value}``.

        Raises:
            RuntimeError: the writer is closed.
            ArgumentTypeError: ``hparams`` is not a mapping.
        """
        if self._closed:
            raise RuntimeError(f"{type(self).__name__} is closed")
        self._hparams(_flatten_metrics(_check_mapping(hparams, "hparams")))

    def flush(self) -> None:
        """Push buffered records to the backend (no-op once closed)."""
        if not self._closed:
            self._flush()

    def close(self) -> None:
        """Flush and close (idempotent)."""
        self._finish(failed=False)

    def _finish(self, failed: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._close(failed)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    def __enter__(self) -> MetricSink:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self._finish(failed=exc_type is not None)

    # hooks
    def _write(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        raise NotImplementedError

    def _hparams(self, hparams: dict[str, Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not record hyperparameters")

    def _flush(self) -> None:
        pass

    def _close(self, failed: bool) -> None:
        pass


class TensorBoardSink(MetricSink):
    """TensorBoard event files: scalars (``add_scalar``), texts (``add_text``).

    Hyperparameters are written as a Markdown table under the text tag ``"hparams"``.

    Args:
        logdir: the directory of the event files (created if missing).
        max_array_size: see :class:`MetricSink`.
        **writer_kwargs: passed to the ``SummaryWriter`` (e.g. ``flush_secs``).

    Attributes:
        writer: the ``SummaryWriter``.
        backend: ``"tensorboardX"`` or ``"torch.utils.tensorboard"``.

    Raises:
        MissingExtraError: neither tensorboardX nor torch's tensorboard is installed.
        ArgumentTypeError: ``logdir`` is not a path.
    """

    def __init__(self, logdir: str | os.PathLike, *, max_array_size: int = 64,
                 **writer_kwargs: Any) -> None:
        super().__init__(max_array_size=max_array_size)
        self.logdir = _check_path(logdir, "logdir")
        cls, self.backend = summary_writer_class()
        self.writer = cls(str(self.logdir), **writer_kwargs)

    def _write(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, global_step=step)
        for key, value in texts.items():
            self.writer.add_text(key, value, global_step=step)

    def _hparams(self, hparams: dict[str, Any]) -> None:
        rows = "\n".join(f"| {k} | {v} |" for k, v in hparams.items())
        self.writer.add_text("hparams", "| name | value |\n|---|---|\n" + rows, global_step=0)

    def _flush(self) -> None:
        self.writer.flush()

    def _close(self, failed: bool) -> None:
        self.writer.close()

    def __repr__(self) -> str:
        return f"TensorBoardSink({str(self.logdir)!r}, backend={self.backend!r})"


class WandbSink(MetricSink):
    """A Weights & Biases run: every record is one ``run.log(values, step=step)``.

    W&B keeps steps monotonically increasing: it drops (with its own warning) a record
    whose step is below the last one logged, e.g. when replaying a resumed log without
    ``to_columns(deduplicate=True)``-style deduplication.

    Args:
        run: an existing ``wandb`` run to log into (not finished on close); default: a new
            one from ``wandb.init(project=project, **init_kwargs)``, finished on close.
        project: the W&B project of a new run.
        max_array_size: see :class:`MetricSink`.
        **init_kwargs: for ``wandb.init``, e.g. ``mode="offline", dir=...`` (no network:
            the run is written under ``dir/wandb/offline-run-*``; ``wandb sync`` uploads
            it later), ``config``, ``name``, ``reinit``.

    Attributes:
        run: the W&B run.

    Raises:
        MissingExtraError: wandb is not installed (``pip install 'gradience-jax[wandb]'``).
    """

    def __init__(self, run: Any = None, *, project: str | None = None,
                 max_array_size: int = 64, **init_kwargs: Any) -> None:
        super().__init__(max_array_size=max_array_size)
        if run is None:
            wandb = _require("wandb", "WandbSink", "wandb", "wandb")
            if "dir" in init_kwargs and init_kwargs["dir"] is not None:
                init_kwargs["dir"] = str(_check_path(init_kwargs["dir"], "dir"))
            run = wandb.init(project=project, **init_kwargs)
            self._owns = True
        else:
            if not callable(getattr(run, "log", None)):
                raise ArgumentTypeError(f"run must be a wandb run (with .log), got "
                                        f"{type(run).__name__}")
            self._owns = False
        self.run = run

    def _write(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        self.run.log({**scalars, **texts}, step=step)

    def _hparams(self, hparams: dict[str, Any]) -> None:
        self.run.config.update(hparams, allow_val_change=True)

    def _close(self, failed: bool) -> None:
        if self._owns:
            self.run.finish(exit_code=1 if failed else 0)

    def __repr__(self) -> str:
        return f"WandbSink(run={getattr(self.run, 'id', None)!r})"


def _mlflow_key(key: str) -> str:
    """A metric name MLflow accepts (``[A-Za-z0-9_-. :/]``, no empty / ``.`` / ``..`` parts)."""
    parts = [p for p in _MLFLOW_BAD.sub("_", key).split("/") if p not in ("", ".", "..")]
    return "/".join(parts) or "_"


class MLflowSink(MetricSink):
    """An MLflow run: scalars are metrics (``log_batch``), texts are tags (last value wins).

    Names are made MLflow-safe: characters outside ``[A-Za-z0-9_-. :/]`` become ``_``.

    Args:
        tracking_uri: MLflow tracking URI (``"file:/path/mlruns"``, ``"sqlite:///m.db"``, a
            server); default: MLflow's (``MLFLOW_TRACKING_URI``).
        experiment: experiment name of a new run (created if missing).
        run_name: name of a new run.
        run_id: log into this existing run instead (not terminated on close).
        tags: tags of a new run.
        max_array_size: see :class:`MetricSink`.

    Attributes:
        client: the ``MlflowClient``.
        run_id: the run's id.

    Raises:
        MissingExtraError: mlflow is not installed (``pip install 'gradience-jax[mlflow]'``).
    """

    def __init__(self, *, tracking_uri: str | os.PathLike | None = None,
                 experiment: str = "gradience-jax", run_name: str | None = None,
                 run_id: str | None = None, tags: Mapping[str, Any] | None = None,
                 max_array_size: int = 64) -> None:
        super().__init__(max_array_size=max_array_size)
        _require("mlflow", "MLflowSink", "mlflow", "mlflow")
        from mlflow.entities import Metric, Param, RunTag  # noqa: PLC0415 - optional extra
        from mlflow.tracking import MlflowClient  # noqa: PLC0415 - optional extra

        self._entities = (Metric, Param, RunTag)
        uri = None if tracking_uri is None else os.fspath(tracking_uri)
        self.client = MlflowClient(tracking_uri=uri)
        if run_id is not None:
            self.run_id = str(run_id)
            self.client.get_run(self.run_id)  # fails early for an unknown run
            self._owns = False
        else:
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = (exp.experiment_id if exp is not None
                      else self.client.create_experiment(experiment))
            run = self.client.create_run(
                exp_id, run_name=run_name,
                tags={str(k): str(v) for k, v in (tags or {}).items()})
            self.run_id = run.info.run_id
            self._owns = True

    def _write(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        metric, _, tag = self._entities
        now = int(time.time() * 1000)
        ms = [metric(_mlflow_key(k), v, now, step) for k, v in scalars.items()]
        for i in range(0, len(ms), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=ms[i:i + _MLFLOW_BATCH])
        ts = [tag(_mlflow_key(k), v) for k, v in texts.items()]
        for i in range(0, len(ts), _MLFLOW_TAGS):
            self.client.log_batch(self.run_id, tags=ts[i:i + _MLFLOW_TAGS])

    def _hparams(self, hparams: dict[str, Any]) -> None:
        param = self._entities[1]
        ps = [param(_mlflow_key(k), str(v)) for k, v in hparams.items()]
        for i in range(0, len(ps), _MLFLOW_TAGS):
            self.client.log_batch(self.run_id, params=ps[i:i + _MLFLOW_TAGS])

    def _close(self, failed: bool) -> None:
        if self._owns:
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")

    def __repr__(self) -> str:
        return f"MLflowSink(run_id={self.run_id!r})"


class CluSink(MetricSink):
    """Forward records to a ``clu.metric_writers`` writer (``write_scalars``, ``write_texts``).

    Args:
        writer: any object with clu's ``write_scalars(step, scalars)`` (``write_texts``,
            ``write_hparams``, ``flush``, ``close`` used when present), e.g.
            ``clu.metric_writers.create_default_writer(logdir)``.
        close_writer: close ``writer`` when this sink closes.
        max_array_size: see :class:`MetricSink`.

    Raises:
        ArgumentTypeError: ``writer`` has no ``write_scalars``.
    """

    def __init__(self, writer: Any, *, close_writer: bool = True,
                 max_array_size: int = 64) -> None:
        super().__init__(max_array_size=max_array_size)
        if not callable(getattr(writer, "write_scalars", None)):
            raise ArgumentTypeError(f"writer must be a clu MetricWriter (with write_scalars), "
                                    f"got {type(writer).__name__}")
        self.writer = writer
        self._close_writer = bool(close_writer)

    def _write(self, step: int, scalars: dict[str, float], texts: dict[str, str]) -> None:
        if scalars:
            self.writer.write_scalars(step, scalars)
        if texts:
            if not callable(getattr(self.writer, "write_texts", None)):
                raise TypeError(f"{type(self.writer).__name__} has no write_texts for the "
                                f"text metrics {sorted(texts)}")
            self.writer.write_texts(step, texts)

    def _hparams(self, hparams: dict[str, Any]) -> None:
        self.writer.write_hparams(hparams)

    def _flush(self) -> None:
        if callable(getattr(self.writer, "flush", None)):
            self.writer.flush()

    def _close(self, failed: bool) -> None:
        if self._close_writer and callable(getattr(self.writer, "close", None)):
            self.writer.close()
        elif callable(getattr(self.writer, "flush", None)):
            self.writer.flush()


class CluMetricWriter:
    """A ``clu.metric_writers.MetricWriter`` that writes into one of our writers.

    For training loops that log through clu: ``write_scalars(step, scalars)``,
    ``write_summaries`` and ``write_texts`` become ``sink.write(step, ...)``;
    ``write_hparams`` goes to ``sink.write_hparams`` when the sink has one. Images, videos,
    audio and histograms go to the sink's method of the same name when it has one;
    otherwise they are dropped with one :class:`TelemetryWarning` per kind. Build it with
    :func:`as_clu_writer`, which also makes it a subclass of clu's ``MetricWriter``.

    Args:
        sink: a :class:`MetricSink`, a ``TelemetryWriter``, or anything with
            ``write(step, metrics)``.
    """

    def __init__(self, sink: Any) -> None:
        if not callable(getattr(sink, "write", None)):
            raise ArgumentTypeError(f"sink must have a write(step, metrics) method, got "
                                    f"{type(sink).__name__}")
        self.sink = sink
        self._warned: set[str] = set()

    def _forward(self, kind: str, *args: Any, **kwargs: Any) -> None:
        method = getattr(self.sink, f"write_{kind}", None)
        if callable(method):
            method(*args, **kwargs)
        elif kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"{type(self.sink).__name__} has no write_{kind}: clu "
                          f"write_{kind} calls are dropped", TelemetryWarning, stacklevel=3)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        """``sink.write(step, scalars)``."""
        self.sink.write(step, dict(scalars))

    def write_summaries(self, step: int, values: Mapping[str, Any],
                        metadata: Mapping[str, Any] | None = None) -> None:
        """``sink.write(step, values)`` (``metadata`` is not recorded)."""
        self.sink.write(step, dict(values))

    def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
        """``sink.write(step, texts)``."""
        self.sink.write(step, dict(texts))

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """``sink.write_hparams(hparams)``, or one warning when the sink has none."""
        self._forward("hparams", dict(hparams))

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Forwarded to ``sink.write_images`` if present, else dropped (one warning)."""
        self._forward("images", step, images)

    def write_videos(self, step: int, videos: Mapping[str, Any]) -> None:
        """Forwarded to ``sink.write_videos`` if present, else dropped (one warning)."""
        self._forward("videos", step, videos)

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int) -> None:
        """Forwarded to ``sink.write_audios`` if present, else dropped (one warning)."""
        self._forward("audios", step, audios, sample_rate=sample_rate)

    def write_histograms(self, step: int, arrays: Mapping[str, Any],
                         num_buckets: Mapping[str, int] | None = None) -> None:
        """Forwarded to ``sink.write_histograms`` if present, else dropped (one warning)."""
        self._forward("histograms", step, arrays, num_buckets)

    def flush(self) -> None:
        """``sink.flush()`` when it has one (a ``TelemetryWriter`` flushes every record)."""
        if callable(getattr(self.sink, "flush", None)):
            self.sink.flush()

    def close(self) -> None:
        """``sink.close()``."""
        if callable(getattr(self.sink, "close", None)):
            self.sink.close()


@functools.cache
def _clu_writer_class() -> type:
    """``CluMetricWriter`` made a subclass of clu's ``MetricWriter`` when clu imports."""
    try:
        from clu.metric_writers import interface  # noqa: PLC0415 - optional extra
    except ImportError:  # no clu, or clu.metric_writers without its TensorFlow
        return CluMetricWriter
    return type("CluMetricWriter", (CluMetricWriter, interface.MetricWriter),
                {"__doc__": CluMetricWriter.__doc__, "__module__": __name__})


def as_clu_writer(sink: Any) -> CluMetricWriter:
    """Wrap a writer (or a ``TelemetryWriter``) as a ``clu.metric_writers.MetricWriter``.

    Args:
        sink: anything with ``write(step, metrics)``.

    Returns:
        A :class:`CluMetricWriter`; also an instance of clu's ``MetricWriter`` when
        ``clu.metric_writers`` can be imported (so clu's ``MultiWriter`` / ``AsyncWriter``
        accept it).

    Raises:
        ArgumentTypeError: ``sink`` has no ``write`` method.
    """
    return _clu_writer_class()(sink)


# --------------------------------------------------------------------------------------
# Fan-out and replay
# --------------------------------------------------------------------------------------


class MultiSink:
    """Send every record to several writers (see :func:`tee`).

    Each call reaches every writer even when one fails; the first error is raised after
    all were tried. ``write_hparams`` / ``flush`` go to the writers that have them.

    Args:
        sinks: writers with ``write(step, metrics)`` (``MetricSink`` s, ``TelemetryWriter``
            s, other ``MultiSink`` s).
    """

    def __init__(self, sinks: Iterable[Any]) -> None:
        if isinstance(sinks, (str, bytes)) or not isinstance(sinks, Iterable):
            raise ArgumentTypeError(f"sinks must be an iterable of writers, got "
                                    f"{type(sinks).__name__}")
        self.sinks = tuple(sinks)
        for i, s in enumerate(self.sinks):
            if not callable(getattr(s, "write", None)):
                raise ArgumentTypeError(f"sinks[{i}] must have a write(step, metrics) method, "
                                        f"got {_short(s)} ({type(s).__name__})")

    def _each(self, method: str, *args: Any) -> None:
        errors = []
        for s in self.sinks:
            fn = getattr(s, method, None)
            if callable(fn):
                try:
                    fn(*args)
                except Exception as exc:  # noqa: BLE001 - re-raised below
                    errors.append(exc)
        if errors:
            raise errors[0]

    def write(self, step: Any, metrics: Mapping[str, Any]) -> None:
        """``write(step, metrics)`` on every writer."""
        self._each("write", step, metrics)

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """``write_hparams(hparams)`` on every writer that has it."""
        self._each("write_hparams", hparams)

    def flush(self) -> None:
        """``flush()`` on every writer that has it."""
        self._each("flush")

    def close(self) -> None:
        """``close()`` on every writer."""
        self._each("close")

    def __enter__(self) -> MultiSink:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        errors = []
        for s in self.sinks:
            try:
                if hasattr(s, "__exit__"):
                    s.__exit__(exc_type, exc, tb)
                elif callable(getattr(s, "close", None)):
                    s.close()
            except Exception as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
        if errors and exc_type is None:
            raise errors[0]

    def __repr__(self) -> str:
        return f"MultiSink({list(self.sinks)!r})"


def tee(*sinks: Any) -> MultiSink:
    """One writer that fans each record out to ``sinks``.

    Args:
        *sinks: writers with ``write(step, metrics)``.

    Returns:
        A :class:`MultiSink`.

    Example::

        with tee(TelemetryWriter("run.jsonl"), TensorBoardSink("tb"),
                 WandbSink(project="p", mode="offline", dir="wb")) as log:
            log.write(step, {"loss": loss, "hessian/lambda_max": lam})
    """
    return MultiSink(sinks)


def _record_parts(i: int, rec: Any) -> tuple[int, Mapping[str, Any]] | None:
    if isinstance(rec, TelemetryRecord):
        metrics = dict(rec.metrics)
        for k in rec.nonfinite:  # written as null: it was NaN or Inf
            if k in metrics and metrics[k] is None:
                metrics[k] = math.nan
        return rec.step, metrics
    if isinstance(rec, Mapping):
        if "kind" in rec:  # header / resume / end markers
            return None
        if "step" in rec and "metrics" in rec:
            return rec["step"], rec["metrics"]
    elif isinstance(rec, tuple) and len(rec) == 2:
        return rec
    raise ArgumentTypeError(f"records[{i}] must be a TelemetryRecord, a {{'step', 'metrics'}} "
                            f"dict or a (step, metrics) pair, got {type(rec).__name__}")


def replay(records: Iterable[Any], sink: Any) -> int:
    """Send logged records to a writer, e.g. a JSON Lines log to TensorBoard.

    Args:
        records: ``load_telemetry(path)[1]``, the dicts ``TelemetryWriter.write`` returned,
            or ``(step, metrics)`` pairs. A record's non-finite metrics (stored as
            ``null``) are sent as NaN.
        sink: a writer with ``write(step, metrics)``.

    Returns:
        The number of records sent.

    Raises:
        ArgumentTypeError: ``records`` is not an iterable of records, ``sink`` has no
            ``write``.
    """
    if isinstance(records, (str, bytes, Mapping)) or not isinstance(records, Iterable):
        raise ArgumentTypeError(f"records must be an iterable of records (load_telemetry"
                                f"(path)[1]), got {type(records).__name__}")
    if not callable(getattr(sink, "write", None)):
        raise ArgumentTypeError(f"sink must have a write(step, metrics) method, got "
                                f"{type(sink).__name__}")
    n = 0
    for i, rec in enumerate(records):
        parts = _record_parts(i, rec)
        if parts is not None:
            sink.write(*parts)
            n += 1
    return n
