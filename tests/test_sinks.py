"""Logger writers (gradience_jax.telemetry.sinks), read back with each library's own reader.

TensorBoard event files are read with TensorBoard's ``EventAccumulator``; MLflow runs with
``MlflowClient.get_metric_history`` on a temporary file store; W&B offline runs by decoding
the run's ``.wandb`` transaction log (LevelDB log framing) into wandb's own protobuf
``Record`` messages; clu through clu's ``MultiWriter`` / ``AsyncWriter`` / ``write_values``
(in a child process: ``clu.metric_writers`` imports TensorFlow for its ``SummaryWriter``,
which is stubbed there). Each test skips when its library is missing; missing extras are
also simulated to check the error message.
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from gradience_jax import telemetry as tm
from gradience_jax.errors import ArgumentTypeError
from gradience_jax.telemetry import sinks

ROOT = Path(__file__).resolve().parents[1]

RECORDS = [
    (0, {"loss": 2.0, "hessian": {"lambda_max": 10.5}, "top_eigs": [3.0, 2.0], "note": "start"}),
    (5, {"loss": np.float32(1.25), "hessian": {"lambda_max": float("nan")},
         "top_eigs": np.array([4.0, 1.5]), "lr": None}),
    (10, {"loss": 0.5, "hessian": {"lambda_max": float("inf")}, "top_eigs": (5.0, 0.5)}),
]
#: what every logger must hold: name -> [(step, value)]
EXPECTED = {
    "loss": [(0, 2.0), (5, 1.25), (10, 0.5)],
    "hessian/lambda_max": [(0, 10.5), (5, math.nan), (10, math.inf)],
    "top_eigs/0": [(0, 3.0), (5, 4.0), (10, 5.0)],
    "top_eigs/1": [(0, 2.0), (5, 1.5), (10, 0.5)],
}


def _same(got, want, rel=0.0):
    assert [s for s, _ in got] == [s for s, _ in want]
    for (_, g), (_, w) in zip(got, want):
        if math.isnan(w):
            assert math.isnan(g)
        else:
            assert g == pytest.approx(w, rel=rel)


class Recorder:
    """A writer that records calls (duck-typed sink / clu writer)."""

    def __init__(self):
        self.calls = []

    def write(self, step, metrics):
        self.calls.append(("write", step, dict(metrics)))

    def write_scalars(self, step, scalars):
        self.calls.append(("scalars", step, dict(scalars)))

    def write_texts(self, step, texts):
        self.calls.append(("texts", step, dict(texts)))

    def write_hparams(self, hparams):
        self.calls.append(("hparams", dict(hparams)))

    def flush(self):
        self.calls.append(("flush",))

    def close(self):
        self.calls.append(("close",))


# ----------------------------------------------------------------------------------------
# records -> scalars
# ----------------------------------------------------------------------------------------


def test_split_metrics_flattens_expands_and_keeps_nonfinite():
    jnp = pytest.importorskip("jax.numpy")
    scalars, texts = sinks.split_metrics(
        {"a": 1, "b": {"c": np.float32(0.5), "d": jnp.asarray(2.0)}, "e": [[1.0, 2.0], [3.0, 4.0]],
         "f": float("nan"), "g": None, "h": "text", "i": True, "j": np.array(7)})
    assert scalars == pytest.approx({"a": 1.0, "b/c": 0.5, "b/d": 2.0, "e/0_0": 1.0,
                                     "e/0_1": 2.0, "e/1_0": 3.0, "e/1_1": 4.0, "f": math.nan,
                                     "i": 1.0, "j": 7.0}, nan_ok=True)
    assert texts == {"h": "text"}
    with pytest.warns(tm.TelemetryWarning, match="'big' has 100 elements > max_array_size=64"):
        assert sinks.split_metrics({"big": np.zeros(100)}) == ({}, {})
    assert sinks.split_metrics({"v": [1.0, None]})[0] == pytest.approx(
        {"v/0": 1.0, "v/1": math.nan}, nan_ok=True)
    with pytest.raises(TypeError, match="'z' is complex"):
        sinks.split_metrics({"z": 1j})
    with pytest.raises(TypeError, match="unsupported type object"):
        sinks.split_metrics({"o": object()})
    with pytest.raises(ArgumentTypeError, match="metrics must be a dict"):
        sinks.split_metrics([1.0])
    with pytest.raises(ArgumentTypeError, match="metrics keys"):
        sinks.split_metrics({1: 2.0})


# ----------------------------------------------------------------------------------------
# TensorBoard
# ----------------------------------------------------------------------------------------


def _tb_read(logdir):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
    acc.Reload()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    texts = {t: [(e.step, e.tensor_proto.string_val[0].decode()) for e in acc.Tensors(t)]
             for t in acc.Tags()["tensors"]}
    return scalars, texts


def test_tensorboard_event_files_read_back(tmp_path):
    pytest.importorskip("tensorboardX")
    with sinks.TensorBoardSink(tmp_path / "tb") as tb:
        assert tb.backend == "tensorboardX"
        for step, metrics in RECORDS:
            tb.write(step, metrics)
        tb.write_hparams({"lr": 0.1, "opt": {"name": "adam"}})
    scalars, texts = _tb_read(tmp_path / "tb")
    assert set(scalars) == set(EXPECTED)
    for k, want in EXPECTED.items():
        _same(scalars[k], want, rel=1e-7)  # TensorBoard stores float32
    assert texts["note/text_summary"] == [(0, "start")]
    assert "| opt/name | adam |" in texts["hparams/text_summary"][0][1]
    with pytest.raises(RuntimeError, match="TensorBoardSink is closed"):
        tb.write(11, {"loss": 1.0})


def test_telemetry_writer_tensorboard_mirror_reads_back(tmp_path):
    pytest.importorskip("tensorboardX")
    with tm.TelemetryWriter(tmp_path / "run.jsonl", tensorboard_dir=tmp_path / "tb") as log:
        log.write(0, {"loss": 1.0, "eigs": [1.0, 2.0]})
        log.write(1, {"loss": 0.25})
    scalars, _ = _tb_read(tmp_path / "tb")
    assert scalars == {"loss": [(0, 1.0), (1, 0.25)]}  # the mirror writes finite scalars
    assert tm.load_telemetry(tmp_path / "run.jsonl")[0]["tensorboard"] == "tensorboardX"


def test_missing_tensorboard_raises_and_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(sinks.MissingExtraError,
                       match=r"pip install 'gradience-jax\[tensorboard\]'") as info:
        sinks.TensorBoardSink(tmp_path / "tb")
    assert isinstance(info.value, ImportError) and info.value.extra == "tensorboard"
    # TelemetryWriter's mirror: no silent skip, and the log is not even created
    with pytest.raises(ImportError, match=r"gradience-jax\[tensorboard\]"):
        tm.TelemetryWriter(tmp_path / "run.jsonl", tensorboard_dir=tmp_path / "tb")
    assert not (tmp_path / "run.jsonl").exists() and not (tmp_path / "tb").exists()


# ----------------------------------------------------------------------------------------
# MLflow
# ----------------------------------------------------------------------------------------


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # recent MLflow 3 refuses it otherwise
    return f"file:{tmp_path / 'mlruns'}"


def test_mlflow_file_store_reads_back(mlflow_store):
    from mlflow.tracking import MlflowClient

    with sinks.MLflowSink(tracking_uri=mlflow_store, experiment="exp", run_name="r1") as ml:
        for step, metrics in RECORDS:
            ml.write(step, metrics)
        ml.write(11, {"bad(name)": 1.0})
        ml.write_hparams({"lr": 0.1, "opt": {"name": "adam"}})
    client = MlflowClient(tracking_uri=mlflow_store)
    for k, want in EXPECTED.items():
        hist = sorted(client.get_metric_history(ml.run_id, k), key=lambda m: m.step)
        _same([(m.step, m.value) for m in hist], want)
    assert [m.value for m in client.get_metric_history(ml.run_id, "bad_name_")] == [1.0]
    run = client.get_run(ml.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.params == {"lr": "0.1", "opt/name": "adam"}
    assert run.data.tags["note"] == "start"
    assert client.get_experiment(run.info.experiment_id).name == "exp"
    # log into an existing run, which then stays open; an error inside `with` marks FAILED
    with sinks.MLflowSink(tracking_uri=mlflow_store, run_id=ml.run_id) as again:
        again.write(20, {"loss": 0.125})
    assert client.get_metric_history(ml.run_id, "loss")[-1].value == 0.125
    with pytest.raises(ZeroDivisionError), sinks.MLflowSink(tracking_uri=mlflow_store) as bad:
        bad.write(0, {"loss": 1.0})
        1 / 0  # noqa: B018
    assert client.get_run(bad.run_id).info.status == "FAILED"


# ----------------------------------------------------------------------------------------
# Weights & Biases (offline)
# ----------------------------------------------------------------------------------------


def _leveldb_records(path: Path):
    """Payloads of a W&B transaction log: ':W&B' header, then LevelDB log framing."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, partial = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block trailer too short for a record header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:  # FULL
            yield chunk
        elif kind == 2:  # FIRST
            partial = chunk
        elif kind == 3:  # MIDDLE
            partial += chunk
        elif kind == 4:  # LAST
            yield partial + chunk
            partial = b""


def _wandb_history(run_dir: Path, timeout: float = 30.0):
    """History rows and config of an offline run, once its log holds the exit record
    (wandb-core may still be writing the file when ``run.finish()`` returns)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (log,) = run_dir.glob("run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        history, config, done = [], {}, False
        for payload in _leveldb_records(log):
            rec = pb.Record()
            try:
                rec.ParseFromString(payload)
            except Exception:  # a record still being written: read again
                break
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                history.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                                for i in rec.history.item})
            elif kind in ("config", "run"):
                cfg = rec.config if kind == "config" else rec.run.config
                for item in cfg.update:
                    config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            elif kind == "exit":
                done = True
        if done:
            return history, config
        assert time.monotonic() < deadline, f"{log}: no exit record after {timeout} s"
        time.sleep(0.1)


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    pytest.importorskip("wandb.proto.wandb_internal_pb2")
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                 "WANDB_DIR": str(tmp_path), "WANDB_CONFIG_DIR": str(tmp_path / "cfg"),
                 "WANDB_CACHE_DIR": str(tmp_path / "cache"),
                 "WANDB_DATA_DIR": str(tmp_path / "data")}.items():
        monkeypatch.setenv(k, v)
    return wandb


def _nan_json(x):
    return "NaN" if math.isnan(x) else ("Infinity" if x == math.inf else x)


def test_wandb_offline_run_files_read_back(wandb_env, tmp_path):
    with sinks.WandbSink(project="gj-test", mode="offline", dir=tmp_path,
                         config={"seed": 3}) as wb:
        for step, metrics in RECORDS:
            wb.write(step, metrics)
        wb.write_hparams({"lr": 0.1})
        run_dir = Path(wb.run.dir).parent
    assert run_dir.name.startswith("offline-run-")
    history, config = _wandb_history(run_dir)
    assert [h["_step"] for h in history] == [0, 5, 10]
    for k, want in EXPECTED.items():
        got = [(h["_step"], h[k]) for h in history]
        # wandb stores non-finite floats as the JSON tokens NaN / Infinity
        _same(got, want)
    assert history[0]["note"] == "start" and "lr" not in history[1]
    assert config["seed"] == 3 and config["lr"] == 0.1


def test_wandb_existing_run_is_not_finished(wandb_env, tmp_path):
    run = wandb_env.init(project="gj-test", mode="offline", dir=str(tmp_path))
    try:
        with sinks.WandbSink(run=run) as wb:
            wb.write(1, {"x": 2.0})
        run.log({"x": 3.0}, step=2)  # still open
    finally:
        run.finish()
    history, _ = _wandb_history(Path(run.dir).parent)
    assert [(h["_step"], h["x"]) for h in history] == [(1, 2.0), (2, 3.0)]
    with pytest.raises(ArgumentTypeError, match="run must be a wandb run"):
        sinks.WandbSink(run=object())


@pytest.mark.parametrize("cls, module, extra", [
    (sinks.WandbSink, "wandb", "wandb"), (sinks.MLflowSink, "mlflow", "mlflow")])
def test_missing_wandb_or_mlflow_names_the_extra(monkeypatch, cls, module, extra):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(sinks.MissingExtraError, match=rf"pip install 'gradience-jax\[{extra}\]'"):
        cls()


# ----------------------------------------------------------------------------------------
# clu
# ----------------------------------------------------------------------------------------


def test_clu_adapter_writes_into_a_telemetry_log(tmp_path):
    path = tmp_path / "run.jsonl"
    with tm.TelemetryWriter(path) as log:
        w = sinks.as_clu_writer(log)
        assert isinstance(w, sinks.CluMetricWriter)
        w.write_scalars(0, {"loss": np.float32(2.0), "acc": 0.5})
        w.write_summaries(0, {"eigs": np.array([3.0, 1.0])})
        w.write_texts(1, {"note": "hi"})
        with pytest.warns(tm.TelemetryWarning, match="no write_images"):
            w.write_images(1, {"img": np.zeros((2, 2, 1))})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            w.write_images(2, {"img": np.zeros((2, 2, 1))})  # warned once per kind
        with pytest.warns(tm.TelemetryWarning, match="no write_hparams"):
            w.write_hparams({"lr": 0.1})
        w.flush()
    _, records = tm.load_telemetry(path)
    assert [(r.step, r.metrics) for r in records] == [
        (0, {"loss": 2.0, "acc": 0.5}), (0, {"eigs": [3.0, 1.0]}), (1, {"note": "hi"})]


def test_clu_sink_forwards_records():
    rec = Recorder()
    with sinks.CluSink(rec) as s:
        s.write(3, {"loss": 1.0, "v": [1.0, 2.0], "note": "x"})
        s.write_hparams({"a": {"b": 1}})
        s.flush()
    assert rec.calls == [("scalars", 3, {"loss": 1.0, "v/0": 1.0, "v/1": 2.0}),
                         ("texts", 3, {"note": "x"}), ("hparams", {"a/b": 1}), ("flush",),
                         ("close",)]
    with pytest.raises(ArgumentTypeError, match="writer must be a clu MetricWriter"):
        sinks.CluSink(object())


CLU_CHILD = """
import sys, types, json
# clu.metric_writers imports TensorFlow only for its SummaryWriter: stub that one module
stub = types.ModuleType("clu.metric_writers.summary_writer")
stub.SummaryWriter = None
sys.modules["clu.metric_writers.summary_writer"] = stub
from clu import metric_writers
from gradience_jax import telemetry as tm
path = sys.argv[1]

class Recorder(metric_writers.MetricWriter):
    def __init__(self): self.calls = []
    def write_summaries(self, step, values, metadata=None): pass
    def write_scalars(self, step, scalars): self.calls.append([step, dict(scalars)])
    def write_images(self, step, images): pass
    def write_videos(self, step, videos): pass
    def write_audios(self, step, audios, *, sample_rate): pass
    def write_texts(self, step, texts): self.calls.append([step, dict(texts)])
    def write_histograms(self, step, arrays, num_buckets=None): pass
    def write_hparams(self, hparams): self.calls.append(dict(hparams))
    def flush(self): pass
    def close(self): pass

with tm.TelemetryWriter(path) as log:
    w = tm.as_clu_writer(log)
    assert isinstance(w, metric_writers.MetricWriter), type(w).__mro__
    multi = metric_writers.MultiWriter([w, metric_writers.LoggingWriter()])
    multi.write_scalars(1, {"loss": 0.5})
    aw = metric_writers.AsyncWriter(w)
    aw.write_scalars(2, {"loss": 0.25})
    aw.flush()
    from clu import values
    metric_writers.write_values(w, 3, {"loss": 0.125, "note": values.Text("txt")})
rec = Recorder()
sink = tm.CluSink(metric_writers.MultiWriter([rec]))
sink.write(7, {"a": 1.0, "b": {"c": [2.0, 3.0]}, "t": "x"})
sink.write_hparams({"lr": 0.1})
sink.close()
print(json.dumps(rec.calls))
"""


def test_real_clu_writers_accept_the_adapter(tmp_path):
    pytest.importorskip("clu")
    path = tmp_path / "run.jsonl"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(CLU_CHILD), str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, records = tm.load_telemetry(path)
    got = [(r.step, r.metrics) for r in records]
    assert got[:2] == [(1, {"loss": 0.5}), (2, {"loss": 0.25})]
    assert sorted(got[2:], key=str) == sorted([(3, {"loss": 0.125}), (3, {"note": "txt"})],
                                              key=str)
    calls = json.loads(proc.stdout.strip().splitlines()[-1])
    assert calls == [[7, {"a": 1.0, "b/c/0": 2.0, "b/c/1": 3.0}], [7, {"t": "x"}], {"lr": 0.1}]


# ----------------------------------------------------------------------------------------
# fan-out, replay, bad input
# ----------------------------------------------------------------------------------------


class Failing(Recorder):
    def write(self, step, metrics):
        raise OSError("disk full")


def test_tee_reaches_every_writer_and_raises_the_first_error(tmp_path):
    a, b = Recorder(), Recorder()
    with tm.TelemetryWriter(tmp_path / "run.jsonl") as log:
        t = sinks.tee(a, Failing(), log, b)
        with pytest.raises(OSError, match="disk full"):
            t.write(1, {"x": 1.0})
        t.write_hparams({"lr": 1})
        t.flush()
    assert a.calls[0] == b.calls[0] == ("write", 1, {"x": 1.0})
    assert ("hparams", {"lr": 1}) in a.calls and ("flush",) in b.calls
    assert [r.step for r in tm.load_telemetry(tmp_path / "run.jsonl")[1]] == [1]
    with sinks.tee(a, b) as t2:
        t2.write(2, {"y": 2.0})
    assert a.calls[-1] == ("close",) and b.calls[-2] == ("write", 2, {"y": 2.0})
    with pytest.raises(ArgumentTypeError, match=r"sinks\[1\] must have a write"):
        sinks.tee(a, 5)


def test_replay_a_log_into_a_writer(tmp_path):
    path = tmp_path / "run.jsonl"
    with tm.TelemetryWriter(path) as log:
        returned = [log.write(step, metrics) for step, metrics in RECORDS]
    _, records = tm.load_telemetry(path)
    rec = Recorder()
    assert sinks.replay(records, rec) == 3
    steps = [c[1] for c in rec.calls]
    assert steps == [0, 5, 10]
    # non-finite values were stored as null; replay sends them as NaN
    assert math.isnan(rec.calls[1][2]["hessian/lambda_max"])
    assert math.isnan(rec.calls[2][2]["hessian/lambda_max"])
    assert rec.calls[0][2]["top_eigs"] == [3.0, 2.0]
    rec2 = Recorder()
    assert sinks.replay(returned + [{"kind": "end"}], rec2) == 3
    assert sinks.replay([(1, {"a": 1.0})], rec2) == 1
    with pytest.raises(ArgumentTypeError, match="records must be an iterable"):
        sinks.replay("run.jsonl", rec)
    with pytest.raises(ArgumentTypeError, match=r"records\[0\] must be a TelemetryRecord"):
        sinks.replay([5], rec)
    with pytest.raises(ArgumentTypeError, match="sink must have a write"):
        sinks.replay(records, object())


def test_bad_input_to_writers(tmp_path):
    pytest.importorskip("tensorboardX")
    tb = sinks.TensorBoardSink(tmp_path / "tb")
    with pytest.raises(ArgumentTypeError, match="step must be an integer"):
        tb.write("a", {"x": 1.0})
    with pytest.raises(ArgumentTypeError, match="metrics must be a dict"):
        tb.write(0, [1.0])
    with pytest.raises(ArgumentTypeError, match="hparams must be a dict"):
        tb.write_hparams(3)
    with pytest.raises(ArgumentTypeError, match="max_array_size must be an integer"):
        sinks.TensorBoardSink(tmp_path / "tb2", max_array_size=1.5)
    with pytest.raises(ArgumentTypeError, match="logdir must be a str or os.PathLike"):
        sinks.TensorBoardSink(3)
    with pytest.raises(ArgumentTypeError, match="sink must have a write"):
        sinks.as_clu_writer(object())
    tb.close()
    tb.close()  # idempotent
    assert tb.closed
    with pytest.raises(RuntimeError, match="closed"):
        tb.write_hparams({"a": 1})
