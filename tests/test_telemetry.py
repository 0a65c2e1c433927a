"""Tests for gradience_jax.telemetry: crash-safe logging and dynamics statistics.

References: naive loops, closed forms (AR(1) autocorrelation time), scipy.stats and planted
structure (lags, change points, exponents) in synthetic data with fixed seeds.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import signal as sps
from scipy import stats

from gradience_jax import telemetry as tm
from gradience_jax.telemetry import dynamics, io, lock

REPO = Path(__file__).resolve().parents[1]


def ar1(phi: float, n: int, rng: np.random.Generator, burn: int = 1000) -> np.ndarray:
    """AR(1) ``x[t] = phi x[t-1] + e[t]`` via scipy's IIR filter (independent of the module)."""
    e = rng.standard_normal(n + burn)
    return sps.lfilter([1.0], [1.0, -phi], e)[burn:]


def strict_json_lines(path: Path) -> list[dict]:
    """Parse every complete line with NaN / Infinity tokens forbidden."""

    def reject(token: str) -> None:
        raise AssertionError(f"non-strict JSON token {token}")

    text = path.read_text(encoding="utf-8")
    return [json.loads(ln, parse_constant=reject) for ln in text.splitlines() if ln.strip()]


# The children import the telemetry package under a stub parent package (the real
# gradience_jax/__init__.py imports jax): fast, and a check that the host-side telemetry
# package (io, dynamics, environment) stands alone without jax.
CHILD_PRELUDE = f"""
import sys, types
_pkg = types.ModuleType("gradience_jax")
_pkg.__path__ = [{str(Path(tm.__file__).resolve().parents[1])!r}]
sys.modules["gradience_jax"] = _pkg
import gradience_jax.telemetry as tm
assert "jax" not in sys.modules
TelemetryWriter = tm.TelemetryWriter
"""


def run_child(code: str, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-c", CHILD_PRELUDE + textwrap.dedent(code), *args],
        env=env,
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def simulate_crash(log: tm.TelemetryWriter) -> None:
    """What a crash leaves: the log closed and unlocked without its footer."""
    log._closed = True
    log._release()


# --------------------------------------------------------------------------------------
# Writer / reader
# --------------------------------------------------------------------------------------


class TestWriterReader:
    def test_metadata_round_trip(self, tmp_path):
        path = tmp_path / "run.jsonl"
        config = {"lr": 0.1, "layers": [784, 256, 10], "opt": {"name": "sgd", "momentum": 0.9}}
        meta = {"experiment": "protocol-B", "tags": ["grokking"], "n": np.int64(3)}
        with tm.TelemetryWriter(path, metadata=meta, config=config, seed=1234) as log:
            log.write(0, {"loss": 1.0})
        md, recs = tm.load_telemetry(path)
        assert md["kind"] == "header" and md["format"] == tm.FORMAT_NAME
        assert md["config"] == config
        assert md["seed"] == 1234
        assert md["metadata"] == {"experiment": "protocol-B", "tags": ["grokking"], "n": 3}
        assert md["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
        import flax
        import jax

        assert md["versions"]["jax"] == jax.__version__
        assert md["versions"]["flax"] == flax.__version__
        assert md["versions"]["numpy"] == np.__version__
        assert md["versions"]["gradience_jax"] is not None
        assert md["versions"]["platform"]  # from gradience_jax.environment.versions
        assert md["hostname"] == socket.gethostname()
        assert md["start_time"].endswith("Z") and md["start_unix"] > 0
        assert md["end"]["status"] == "ok" and md["end"]["num_records"] == 1
        assert md["resumes"] == []
        assert len(recs) == 1 and recs[0].step == 0 and recs[0].metrics == {"loss": 1.0}

    def test_value_conversion_and_columns(self, tmp_path):
        import jax.numpy as jnp

        path = tmp_path / "run.jsonl"
        with tm.TelemetryWriter(path) as log:
            for step in range(0, 50, 10):
                v = {
                    "py": 0.5 * step,
                    "np32": np.float32(step) / 3,
                    "jax": jnp.asarray(step, dtype=jnp.float32) ** 2,
                    "bf16": jnp.asarray(step, dtype=jnp.bfloat16),
                    "i": np.int32(step),
                    "flag": bool(step % 20 == 0),
                    "eigs": jnp.arange(3.0) + step,
                    "layer": {"rank": step + 1},
                }
                if step == 20:
                    del v["py"]  # missing probe
                log.write(jnp.asarray(step), v)
        _, recs = tm.load_telemetry(path)
        cols = tm.to_columns(recs)
        np.testing.assert_array_equal(cols["step"], np.arange(0, 50, 10))
        ref_py = np.array([0.0, 5.0, np.nan, 15.0, 20.0])
        np.testing.assert_array_equal(cols["py"], ref_py)
        ref_np32 = [float(np.float32(s) / 3) for s in range(0, 50, 10)]
        np.testing.assert_array_equal(cols["np32"], ref_np32)
        np.testing.assert_array_equal(cols["jax"], [float(s) ** 2 for s in range(0, 50, 10)])
        np.testing.assert_array_equal(cols["bf16"], np.arange(0, 50, 10, dtype=float))
        np.testing.assert_array_equal(cols["flag"], [1.0, 0.0, 1.0, 0.0, 1.0])
        assert cols["eigs"].shape == (5, 3)
        np.testing.assert_array_equal(cols["eigs"], np.arange(3.0)[None] + cols["step"][:, None])
        np.testing.assert_array_equal(cols["layer/rank"], cols["step"] + 1)
        assert isinstance(recs[0].metrics["i"], int)
        sub = tm.to_columns(recs, keys=["py"])
        assert set(sub) == {"step", "py"}
        with pytest.raises(ValueError, match="nope"):
            tm.to_columns(recs, keys=["nope"])

    def test_nonfinite_flagged_and_run_continues(self, tmp_path):
        path = tmp_path / "run.jsonl"
        with tm.TelemetryWriter(path) as log:
            log.write(0, {"loss": 1.0, "eigs": [1.0, 2.0]})
            rec = log.write(1, {"loss": float("nan"), "g": np.float32("inf"),
                                "eigs": np.array([1.0, -np.inf]), "ok": 2.0})
            assert rec["nonfinite"] == ["loss", "g", "eigs"]
            log.write(2, {"loss": 0.5, "eigs": [3.0, 4.0]})
        lines = strict_json_lines(path)  # no NaN / Infinity tokens anywhere
        assert lines[2]["metrics"]["loss"] is None and lines[2]["metrics"]["eigs"] == [1.0, None]
        assert "nonfinite" not in lines[1] and "nonfinite" not in lines[3]
        _, recs = tm.load_telemetry(path)
        assert [r.step for r in recs] == [0, 1, 2]
        assert recs[1].nonfinite == ("loss", "g", "eigs") and recs[0].nonfinite == ()
        cols = tm.to_columns(recs)
        np.testing.assert_array_equal(cols["loss"], [1.0, np.nan, 0.5])
        np.testing.assert_array_equal(cols["eigs"], [[1.0, 2.0], [1.0, np.nan], [3.0, 4.0]])
        np.testing.assert_array_equal(cols["ok"], [np.nan, 2.0, np.nan])

    def test_ragged_arrays_padded(self, tmp_path):
        path = tmp_path / "run.jsonl"
        with tm.TelemetryWriter(path) as log:
            log.write(0, {"ritz": [3.0, 2.0]})
            log.write(1, {"ritz": [3.0, 2.0, 1.0]})
        cols = tm.to_columns(tm.load_telemetry(path)[1])
        np.testing.assert_array_equal(cols["ritz"], [[3.0, 2.0, np.nan], [3.0, 2.0, 1.0]])

    def test_bad_metric_inputs(self, tmp_path):
        with tm.TelemetryWriter(tmp_path / "run.jsonl", max_array_size=4) as log:
            with pytest.raises(ValueError, match="step"):
                log.write(1.5, {"a": 1.0})
            with pytest.raises(ValueError, match="reserved"):
                log.write(0, {"step": 1})
            with pytest.raises(ValueError, match="'big'.*max_array_size"):
                log.write(0, {"big": np.zeros(5)})
            with pytest.raises(TypeError, match="'c'"):
                log.write(0, {"c": 1 + 2j})
            with pytest.raises(TypeError, match="'obj'"):
                log.write(0, {"obj": object()})
            log.write(0, {"a": 1.0})  # still usable
        with pytest.raises(RuntimeError, match="closed"):
            log.write(1, {"a": 1.0})
        assert len(tm.load_telemetry(tmp_path / "run.jsonl")[1]) == 1

    def test_tracer_metric_gives_clear_error(self, tmp_path):
        import jax

        with tm.TelemetryWriter(tmp_path / "run.jsonl") as log:

            @jax.jit
            def step(x):
                log.write(0, {"x": x})
                return x

            with pytest.raises(TypeError, match="host"):
                step(1.0)

    @pytest.mark.parametrize("kind", ["parent_is_file", "is_directory"])
    def test_unwritable_path_fails_at_construction(self, tmp_path, kind):
        blocker = tmp_path / "blocker"
        if kind == "parent_is_file":
            blocker.write_text("x")
            path = blocker / "sub" / "run.jsonl"
        else:
            blocker.mkdir()
            path = blocker
        with pytest.raises(OSError) as info:
            tm.TelemetryWriter(path)
        assert str(path) in str(info.value)

    @pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores modes")
    def test_permission_denied_names_path(self, tmp_path):
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(PermissionError, match=str(ro)):
                tm.TelemetryWriter(ro / "run.jsonl")
        finally:
            ro.chmod(0o700)

    def test_makedirs(self, tmp_path):
        path = tmp_path / "a" / "b" / "run.jsonl"
        with tm.TelemetryWriter(path) as log:
            log.write(0, {"x": 1})
        assert path.exists()
        with pytest.raises(FileNotFoundError, match="nothere"):
            tm.TelemetryWriter(tmp_path / "nothere" / "run.jsonl", makedirs=False)

    def test_truncated_last_line_tolerated(self, tmp_path):
        path = tmp_path / "run.jsonl"
        log = tm.TelemetryWriter(path)
        for s in range(5):
            log.write(s, {"loss": 1.0 / (s + 1)})
        full = json.dumps({"step": 5, "time": 0.0, "metrics": {"loss": 0.1}})
        with open(path, "a", encoding="utf-8") as fh:  # torn write, no newline
            fh.write(full[: len(full) // 2])
        with pytest.warns(tm.TelemetryWarning, match="last line"):
            md, recs = tm.load_telemetry(path)
        assert [r.step for r in recs] == list(range(5))
        assert md["end"] is None  # never closed

    def test_corrupt_middle_line_raises_with_line_number(self, tmp_path):
        path = tmp_path / "run.jsonl"
        with tm.TelemetryWriter(path) as log:
            for s in range(4):
                log.write(s, {"loss": float(s)})
        lines = path.read_text().splitlines(keepends=True)
        lines[2] = lines[2][:10] + "\n"  # line 3 (record of step 1) corrupted
        path.write_text("".join(lines))
        with pytest.raises(ValueError, match="line 3"):
            tm.load_telemetry(path, strict=True)
        with pytest.warns(tm.TelemetryWarning, match=r"corrupt line\(s\) 3\b"):
            md, recs = tm.load_telemetry(path)  # default: keep the intact records
        assert [r.step for r in recs] == [0, 2, 3] and md["skipped_lines"] == [3]
        assert md["end"]["status"] == "ok"

    def test_not_a_log(self, tmp_path):
        path = tmp_path / "x.jsonl"
        path.write_text('{"step": 0, "metrics": {}}\n{"step": 1, "metrics": {}}\n')
        with pytest.raises(ValueError, match="header"):
            tm.load_telemetry(path)
        with pytest.raises(ValueError, match="not a telemetry log"):
            tm.TelemetryWriter(path, mode="a")

    def test_append_resume_cuts_torn_line(self, tmp_path):
        path = tmp_path / "run.jsonl"
        log = tm.TelemetryWriter(path, seed=7)
        for s in range(3):
            log.write(s, {"loss": float(s)})
        simulate_crash(log)
        with open(path, "a") as fh:
            fh.write('{"step": 3, "met')
        with pytest.warns(tm.TelemetryWarning, match="torn"):
            log2 = tm.TelemetryWriter(path, mode="a")
        with log2:
            for s in range(2, 5):  # replay from a checkpoint at step 2
                log2.write(s, {"loss": 10.0 + s})
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            md, recs = tm.load_telemetry(path)
        assert md["seed"] == 7 and len(md["resumes"]) == 1 and md["end"]["status"] == "ok"
        assert [r.step for r in recs] == [0, 1, 2, 2, 3, 4]
        cols = tm.to_columns(recs, deduplicate=True)
        np.testing.assert_array_equal(cols["step"], [0, 1, 2, 3, 4])
        np.testing.assert_array_equal(cols["loss"], [0.0, 1.0, 12.0, 13.0, 14.0])

    def test_exception_in_context_records_error(self, tmp_path):
        path = tmp_path / "run.jsonl"
        with pytest.raises(KeyError):
            with tm.TelemetryWriter(path) as log:
                log.write(0, {"a": 1.0})
                raise KeyError("boom")
        md, recs = tm.load_telemetry(path)
        assert md["end"]["status"] == "error" and "KeyError" in md["end"]["error"]
        assert len(recs) == 1

    def test_fsync_flag(self, tmp_path):
        path = tmp_path / "run.jsonl"
        with tm.TelemetryWriter(path, fsync=True) as log:
            log.write(0, {"a": 1.0})
        assert tm.load_telemetry(path)[1][0].metrics == {"a": 1.0}

    def test_sigkill_mid_run_keeps_records(self, tmp_path):
        path = tmp_path / "run.jsonl"
        code = """
            import sys, numpy as np
            log = TelemetryWriter(sys.argv[1], config={"child": True})
            step = 0
            while True:   # never exits on its own
                log.write(step, {"loss": 1.0 / (step + 1), "eigs": np.arange(50.0) + step})
                print(step, flush=True)
                step += 1
        """
        child = run_child(code, str(path))
        try:
            acknowledged = -1
            for line in child.stdout:
                acknowledged = int(line)
                if acknowledged >= 200:
                    break
            assert acknowledged >= 200, child.stderr.read()
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL
        with warnings.catch_warnings():  # the kill may or may not tear the last line
            warnings.simplefilter("ignore", tm.TelemetryWarning)
            md, recs = tm.load_telemetry(path)
        assert md["config"] == {"child": True} and md["end"] is None
        steps = [r.step for r in recs]
        assert len(steps) >= acknowledged + 1  # everything acknowledged is on disk
        assert steps == list(range(len(steps)))
        cols = tm.to_columns(recs)
        np.testing.assert_allclose(cols["loss"], 1.0 / (cols["step"] + 1.0))

    def test_hard_exit_with_half_line(self, tmp_path):
        path = tmp_path / "run.jsonl"
        code = """
            import os, sys
            log = TelemetryWriter(sys.argv[1])
            for step in range(10):
                log.write(step, {"loss": float(step)})
            log._fh.write('{"step": 10, "time": 1.0, "metrics": {"lo')  # torn record
            log._fh.flush()
            os._exit(3)   # no close, no finalizers
        """
        child = run_child(code, str(path))
        _, err = child.communicate(timeout=60)
        assert child.returncode == 3, err
        with pytest.warns(tm.TelemetryWarning):
            md, recs = tm.load_telemetry(path)
        assert [r.step for r in recs] == list(range(10)) and md["end"] is None

    def test_tensorboard_mirror_if_installed(self, tmp_path):
        try:
            import tensorboardX  # noqa: F401
        except ImportError:
            pytest.importorskip("torch.utils.tensorboard")
        tb = tmp_path / "tb"
        with tm.TelemetryWriter(tmp_path / "run.jsonl", tensorboard_dir=tb) as log:
            log.write(0, {"loss": 1.0, "eigs": [1.0, 2.0]})
        md, _ = tm.load_telemetry(tmp_path / "run.jsonl")
        assert md["tensorboard"] is not None
        assert any(p.name.startswith("events.out.tfevents") for p in tb.rglob("*"))


# --------------------------------------------------------------------------------------
# One writer per file, header validation, resume, handles, bad input (issue 16)
# --------------------------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


needs_proc_fd = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
needs_flock = pytest.mark.skipif(lock.fcntl is None, reason="needs fcntl.flock (POSIX)")

HOLDER_CODE = """
    import sys
    log = TelemetryWriter(sys.argv[1], config={"child": True})
    for step in range(3):
        log.write(step, {"loss": float(step)})
    print("ready", flush=True)
    sys.stdin.readline()          # hold the lock until the parent says go
    for step in range(3, 5):
        log.write(step, {"loss": float(step)})
    log.close()
"""


def wait_ready(child: subprocess.Popen) -> None:
    line = child.stdout.readline()
    assert line.strip() == "ready", child.stderr.read()


class TestOneWriterPerFile:
    def test_second_writer_same_process_refused_and_file_untouched(self, tmp_path):
        path = tmp_path / "run.jsonl"
        alias = tmp_path / "alias.jsonl"
        alias.symlink_to(path.name)
        with tm.TelemetryWriter(path, seed=1) as first:
            first.write(0, {"loss": 1.0})
            before = path.read_bytes()
            header = json.loads(before.splitlines()[0])
            for target, mode in [(path, "w"), (path, "a"), (alias, "w"), (str(path), "w")]:
                with pytest.raises(tm.TelemetryLockError) as info:
                    tm.TelemetryWriter(target, mode=mode)
                err = info.value
                msg = str(err)
                assert str(target) in msg and f"pid {os.getpid()}" in msg, msg
                assert socket.gethostname() in msg and header["start_time"] in msg
                assert "this process" in msg
                assert isinstance(err, OSError) and err.filename == str(target)
                assert err.holder == {"pid": os.getpid(), "hostname": socket.gethostname(),
                                      "start_time": header["start_time"]}
                assert path.read_bytes() == before  # nothing destroyed
            first.write(1, {"loss": 0.5})
        raw = path.read_bytes()
        assert b"\x00" not in raw
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            md, recs = tm.load_telemetry(path)
        assert md["seed"] == 1 and md["end"]["status"] == "ok" and md["skipped_lines"] == []
        assert [r.step for r in recs] == [0, 1]
        with tm.TelemetryWriter(path, mode="a") as again:  # released on close
            again.write(2, {"loss": 0.25})
        assert [r.step for r in tm.load_telemetry(path)[1]] == [0, 1, 2]

    def test_lock_released_on_error_exit_and_dropped_writer(self, tmp_path):
        import gc

        path = tmp_path / "run.jsonl"
        with pytest.raises(KeyError):
            with tm.TelemetryWriter(path) as log:
                raise KeyError("boom")
        assert log.closed
        tm.TelemetryWriter(path).close()
        dropped = tm.TelemetryWriter(path)
        dropped.write(0, {"a": 1.0})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            del dropped
            gc.collect()
        with tm.TelemetryWriter(path, mode="a") as log:  # the dropped writer held nothing
            log.write(1, {"a": 2.0})
        assert [r.step for r in tm.load_telemetry(path)[1]] == [0, 1]

    def test_concurrent_constructors_one_wins(self, tmp_path):
        import threading

        path = tmp_path / "run.jsonl"
        barrier = threading.Barrier(6)
        won, lost, other = [], [], []

        def attempt():
            barrier.wait()
            try:
                won.append(tm.TelemetryWriter(path))
            except tm.TelemetryLockError as exc:
                lost.append(exc)
            except Exception as exc:  # noqa: BLE001 - reported below
                other.append(exc)

        threads = [threading.Thread(target=attempt) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not other and len(won) == 1 and len(lost) == 5
        won[0].write(0, {"a": 1.0})
        won[0].close()
        md, recs = tm.load_telemetry(path)
        assert [r.step for r in recs] == [0] and md["end"]["status"] == "ok"

    @needs_flock
    def test_second_writer_other_process_refused(self, tmp_path):
        path = tmp_path / "run.jsonl"
        child = run_child(HOLDER_CODE, str(path), stdin=subprocess.PIPE)
        try:
            wait_ready(child)
            before = path.read_bytes()
            for mode in ("w", "a"):
                with pytest.raises(tm.TelemetryLockError) as info:
                    tm.TelemetryWriter(path, mode=mode)
                msg = str(info.value)
                assert str(path) in msg and f"pid {child.pid}" in msg, msg
                assert "this process" not in msg and info.value.holder["pid"] == child.pid
                assert path.read_bytes() == before
            child.stdin.write("go\n")
            child.stdin.flush()
            _, err = child.communicate(timeout=60)
            assert child.returncode == 0, err
        finally:
            child.kill()
            child.wait(timeout=30)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            md, recs = tm.load_telemetry(path)
        assert md["config"] == {"child": True} and md["end"]["status"] == "ok"
        assert [r.step for r in recs] == list(range(5))
        tm.TelemetryWriter(path, mode="a").close()  # free again after the child closed

    @needs_flock
    def test_child_sees_parent_as_holder(self, tmp_path):
        path = tmp_path / "run.jsonl"
        code = """
            import sys
            try:
                TelemetryWriter(sys.argv[1], mode=sys.argv[2])
            except tm.TelemetryLockError as exc:
                print(exc.holder["pid"], "|", exc)
            else:
                print("NOT LOCKED")
        """
        with tm.TelemetryWriter(path) as log:
            log.write(0, {"a": 1.0})
            for mode in ("w", "a"):
                out, err = run_child(code, str(path), mode).communicate(timeout=60)
                assert out.startswith(f"{os.getpid()} |"), (out, err)
                assert str(path) in out
        assert [r.step for r in tm.load_telemetry(path)[1]] == [0]

    @needs_flock
    def test_lock_released_when_holder_is_killed(self, tmp_path):
        path = tmp_path / "run.jsonl"
        child = run_child(HOLDER_CODE, str(path), stdin=subprocess.PIPE)
        try:
            wait_ready(child)
            with pytest.raises(tm.TelemetryLockError, match=f"pid {child.pid}"):
                tm.TelemetryWriter(path, mode="a")
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
        finally:
            child.kill()
            child.wait(timeout=30)
        assert child.returncode == -signal.SIGKILL
        with tm.TelemetryWriter(path, mode="a") as log:  # the kernel dropped the lock
            log.write(3, {"loss": 3.0})
        md, recs = tm.load_telemetry(path)
        assert [r.step for r in recs] == [0, 1, 2, 3]
        assert len(md["resumes"]) == 1 and md["resumes"][0]["pid"] == os.getpid()
        assert md["end"]["status"] == "ok"

    def test_without_fcntl_same_process_still_refused(self, tmp_path, monkeypatch):
        monkeypatch.setattr(lock, "fcntl", None)
        path = tmp_path / "run.jsonl"
        with tm.TelemetryWriter(path) as log:
            with pytest.raises(tm.TelemetryLockError, match="this process"):
                tm.TelemetryWriter(path, mode="a")
            log.write(0, {"a": 1.0})
        with tm.TelemetryWriter(path, mode="a"):
            pass
        assert len(tm.load_telemetry(path)[0]["resumes"]) == 1

    def test_filesystem_without_locks_warns_and_works(self, tmp_path, monkeypatch):
        import errno

        class NoLocks:
            LOCK_EX, LOCK_NB, LOCK_UN = 2, 4, 8

            @staticmethod
            def flock(fd, op):
                raise OSError(errno.ENOLCK, "No locks available")

        monkeypatch.setattr(lock, "fcntl", NoLocks)
        path = tmp_path / "run.jsonl"
        with pytest.warns(tm.TelemetryWarning, match="cannot lock.*No locks available"):
            log = tm.TelemetryWriter(path)
        with log:
            log.write(0, {"a": 1.0})
            with pytest.raises(tm.TelemetryLockError):  # still one writer per process
                tm.TelemetryWriter(path)
        assert [r.step for r in tm.load_telemetry(path)[1]] == [0]

    def test_dev_null_is_not_locked(self):
        if not os.path.exists("/dev/null"):
            pytest.skip("no /dev/null")
        with tm.TelemetryWriter("/dev/null") as a, tm.TelemetryWriter("/dev/null") as b:
            a.write(0, {"x": 1.0})
            b.write(0, {"x": 1.0})


class TestLoaderValidation:
    @pytest.mark.parametrize("content, match", [
        (b"", r"empty \(0 bytes"),
        (b"\n\n", "line 1 is blank"),
        (b"hello world\n", "line 1 is not JSON"),
        (b"just one line without newline", "line 1 is not JSON"),
        (b'{"a": 1}\n', "not a telemetry header"),
        (b'{"kind": "header", "format": "other"}\n{"step": 0, "metrics": {}}\n',
         "not a telemetry header"),
        (b"[1, 2, 3]\n", "JSON list"),
        (b'"text"\n', "JSON str"),
        (b"\x00" * 336 + b'\n{"step": 0, "time": 1.0, "metrics": {}}\n', "line 1 is not JSON"),
        (b'{"kind":"header","format":"gradience_jax.telemetry","format_version":"1"}\n',
         "format_version"),
    ])
    def test_not_a_telemetry_log_refused(self, tmp_path, content, match):
        path = tmp_path / "x.jsonl"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=match) as info:
            tm.load_telemetry(path)
        assert str(path) in str(info.value) and "not a telemetry log" in str(info.value)
        if content:  # resuming refuses it too, and leaves it as it was
            with pytest.raises(ValueError, match=match):
                tm.TelemetryWriter(path, mode="a")
            assert path.read_bytes() == content

    def test_dev_null_refused(self):
        if not os.path.exists("/dev/null"):
            pytest.skip("no /dev/null")
        with pytest.raises(ValueError, match=r"/dev/null.*empty"):
            tm.load_telemetry("/dev/null")

    def test_missing_file_and_directory(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="nothere"):
            tm.load_telemetry(tmp_path / "nothere.jsonl")
        with pytest.raises(IsADirectoryError):
            tm.load_telemetry(tmp_path)

    def test_newer_format_version_warns_on_read_refused_on_append(self, tmp_path):
        path = tmp_path / "run.jsonl"
        with tm.TelemetryWriter(path) as log:
            log.write(0, {"a": 1.0})
        lines = path.read_text().splitlines(keepends=True)
        head = json.loads(lines[0])
        head["format_version"] = tm.FORMAT_VERSION + 1
        lines[0] = json.dumps(head) + "\n"
        path.write_text("".join(lines))
        with pytest.warns(tm.TelemetryWarning, match="newer"):
            _, recs = tm.load_telemetry(path)
        assert [r.step for r in recs] == [0]
        before = path.read_bytes()
        with pytest.raises(ValueError, match="newer"):
            tm.TelemetryWriter(path, mode="a")
        assert path.read_bytes() == before

    def test_header_only_log_has_no_records(self, tmp_path):
        path = tmp_path / "run.jsonl"
        tm.TelemetryWriter(path, seed=3).close()
        md, recs = tm.load_telemetry(path)
        assert recs == [] and md["seed"] == 3 and md["end"]["num_records"] == 0

    def test_second_header_refused(self, tmp_path):
        a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
        for p in (a, b):
            with tm.TelemetryWriter(p) as log:
                log.write(0, {"x": 1.0})
        cat = tmp_path / "cat.jsonl"
        cat.write_bytes(a.read_bytes() + b.read_bytes())
        with pytest.raises(ValueError, match="line 4 is a second header"):
            tm.load_telemetry(cat)


def record_line(step: int, loss: float) -> bytes:
    return json.dumps({"step": step, "time": 1.0, "metrics": {"loss": loss}},
                      separators=(",", ":")).encode() + b"\n"


class TestDamagedLogRecovery:
    def test_nul_corrupted_middle_recovered(self, tmp_path):
        path = tmp_path / "run.jsonl"
        tm.TelemetryWriter(path, seed=5).close()
        header = path.read_bytes().splitlines(keepends=True)[0]
        data = (header + record_line(0, 0.0) + b"\x00" * 336 + record_line(1, 1.0)
                + b'{"step": 2, "tim\x00\x00\x00' + record_line(3, 3.0)
                + b"\x00" * 40 + b"\n" + b"garbage line\n" + record_line(4, 4.0)
                + b'{"step": 5, "ti')  # torn last line
        path.write_bytes(data)
        with pytest.warns(tm.TelemetryWarning) as caught:
            md, recs = tm.load_telemetry(path)
        text = " ".join(str(w.message) for w in caught)
        assert "NUL bytes on line(s) 3, 4, 5" in text and "corrupt line(s) 6" in text
        assert "last line 8" in text
        assert [(r.step, r.metrics["loss"]) for r in recs] == [(0, 0.0), (1, 1.0), (3, 3.0),
                                                               (4, 4.0)]
        assert md["seed"] == 5 and md["skipped_lines"] == [3, 4, 5, 6, 8]
        with pytest.raises(ValueError, match="line 3 holds NUL bytes"):
            tm.load_telemetry(path, strict=True)

    def test_old_two_writer_damage_recovered(self, tmp_path):
        """Replays what two writers without the lock did: both open with truncation."""
        path = tmp_path / "run.jsonl"
        tm.TelemetryWriter(path, config={"who": "A"}).close()
        header_a = path.read_bytes().splitlines(keepends=True)[0]
        header_b = header_a.replace(b'"who":"A"', b'"who":"B"')
        a = open(path, "wb", buffering=0)  # noqa: SIM115 - interleaved on purpose
        a.write(header_a)
        for s in range(5):
            a.write(record_line(s, float(s)))
        b = open(path, "wb", buffering=0)  # noqa: SIM115 - truncates A's work
        b.write(header_b)
        a.write(record_line(5, 5.0))  # lands past B's end: a hole of NUL bytes before it
        a.write(record_line(6, 6.0))
        a.close()
        b.close()
        raw = path.read_bytes()
        assert raw.count(b"\x00") > 100
        with pytest.warns(tm.TelemetryWarning, match="NUL bytes"):
            md, recs = tm.load_telemetry(path)
        assert md["config"] == {"who": "B"}
        assert [(r.step, r.metrics["loss"]) for r in recs] == [(5, 5.0), (6, 6.0)]
        # resuming such a file works and keeps what was recovered
        with pytest.warns(tm.TelemetryWarning):
            with tm.TelemetryWriter(path, mode="a") as log:
                log.write(7, {"loss": 7.0})
            _, recs = tm.load_telemetry(path)
        assert [r.step for r in recs] == [5, 6, 7]


class TestResume:
    @pytest.mark.parametrize("last", ["record", "footer", "header"])
    def test_complete_last_line_without_newline_kept(self, tmp_path, last):
        path = tmp_path / "run.jsonl"
        log = tm.TelemetryWriter(path, seed=2)
        steps = [0, 1] if last != "header" else []
        for s in steps:
            log.write(s, {"loss": float(s)})
        if last == "footer":
            log.close()
        else:  # a crash; the last record's newline is missing
            simulate_crash(log)
        if last == "record":
            with open(path, "ab") as fh:
                fh.write(record_line(2, 2.0).rstrip(b"\n"))
            steps = [0, 1, 2]
        else:
            path.write_bytes(path.read_bytes().rstrip(b"\n"))
        assert not path.read_bytes().endswith(b"\n")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing torn, nothing to warn about
            if last == "record":  # the reader keeps it as well
                assert [r.step for r in tm.load_telemetry(path)[1]] == steps
            with tm.TelemetryWriter(path, mode="a") as log2:
                log2.write(10, {"loss": 10.0})
            md, recs = tm.load_telemetry(path)
        assert [r.step for r in recs] == steps + [10]
        assert md["seed"] == 2 and len(md["resumes"]) == 1 and md["end"]["status"] == "ok"
        assert md["skipped_lines"] == []

    def test_torn_last_line_dropped_with_warning(self, tmp_path):
        path = tmp_path / "run.jsonl"
        with tm.TelemetryWriter(path) as log:
            log.write(0, {"loss": 0.0})
        with open(path, "ab") as fh:
            fh.write(record_line(1, 1.0)[:-9])  # torn mid-record
        size = path.stat().st_size
        with pytest.warns(tm.TelemetryWarning, match=r"dropping a torn last line \(\d+ bytes"):
            log = tm.TelemetryWriter(path, mode="a")
        log.close()
        md, recs = tm.load_telemetry(path)
        assert [r.step for r in recs] == [0] and md["skipped_lines"] == []
        assert b'{"step":1' not in path.read_bytes() and path.stat().st_size > size - 40


@needs_proc_fd
class TestNoLeakedHandles:
    def check_no_leak(self, fn, exc_type, match):
        import gc

        gc.collect()
        before = open_fds()
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            for _ in range(3):
                with pytest.raises(exc_type, match=match):
                    fn()
            gc.collect()
        assert open_fds() == before

    def test_dev_full(self):
        if not os.path.exists("/dev/full"):
            pytest.skip("no /dev/full")
        self.check_no_leak(lambda: tm.TelemetryWriter("/dev/full"), OSError,
                           r"/dev/full|No space")
        with pytest.raises(OSError) as info:
            tm.TelemetryWriter("/dev/full")
        assert info.value.filename == "/dev/full"

    def test_constructor_failures(self, tmp_path):
        text = tmp_path / "notes.txt"
        text.write_text("hello\n")
        self.check_no_leak(lambda: tm.TelemetryWriter(text, mode="a"), ValueError,
                           "not a telemetry log")
        self.check_no_leak(lambda: tm.TelemetryWriter(tmp_path), IsADirectoryError,
                           str(tmp_path))
        with tm.TelemetryWriter(tmp_path / "run.jsonl"):
            self.check_no_leak(lambda: tm.TelemetryWriter(tmp_path / "run.jsonl"),
                               tm.TelemetryLockError, "already open")

    def test_close_releases_descriptor(self, tmp_path):
        before = open_fds()
        log = tm.TelemetryWriter(tmp_path / "run.jsonl")
        assert open_fds() == before + 1
        log.close()
        assert open_fds() == before


ATE = io.ArgumentTypeError


class TestBadInput:
    @pytest.mark.parametrize("kwargs, exc, match", [
        ({"path": 123}, ATE, "path must be a str or os.PathLike"),
        ({"path": b"run.jsonl"}, ATE, "path must be a str or os.PathLike"),
        ({"path": None}, ATE, "path must be a str or os.PathLike"),
        ({"path": ""}, ValueError, "path must not be empty"),
        ({"mode": "x"}, ValueError, r"mode must be one of \('w', 'a'\), got 'x'"),
        ({"mode": "r"}, ValueError, "mode must be one of"),
        ({"mode": None}, ValueError, "mode must be one of"),
        ({"max_array_size": -1}, ValueError, "max_array_size must be >= 1, got -1"),
        ({"max_array_size": 0}, ValueError, "max_array_size must be >= 1, got 0"),
        ({"max_array_size": 2.5}, ATE, "max_array_size must be an integer, got 2.5"),
        ({"max_array_size": "10"}, ATE, "max_array_size must be an integer"),
        ({"max_array_size": True}, ATE, "max_array_size must be an integer, got the bool"),
        ({"seed": "0"}, ATE, "seed must be an integer"),
        ({"seed": 1.5}, ATE, "seed must be an integer"),
        ({"config": [1, 2]}, ATE, "config must be a dict"),
        ({"metadata": "notes"}, ATE, "metadata must be a dict"),
        ({"fsync": "yes"}, ATE, "fsync must be True or False"),
        ({"makedirs": 1}, ATE, "makedirs must be True or False"),
        ({"tensorboard_dir": 5}, ATE, "tensorboard_dir must be a str or os.PathLike"),
    ])
    def test_writer_arguments(self, tmp_path, kwargs, exc, match):
        kwargs = {"path": tmp_path / "run.jsonl", **kwargs}
        with pytest.raises(exc, match=match) as info:
            tm.TelemetryWriter(**kwargs)
        assert isinstance(info.value, ValueError)  # ArgumentTypeError is both
        assert not (tmp_path / "run.jsonl").exists()  # checked before anything is opened

    def test_numpy_and_jax_integers_accepted(self, tmp_path):
        import jax.numpy as jnp

        with tm.TelemetryWriter(tmp_path / "run.jsonl", seed=np.int64(3),
                                max_array_size=np.int32(5), fsync=np.bool_(False)) as log:
            log.write(jnp.asarray(7), {"a": 1.0})
            log.write(np.uint8(8), {"a": 2.0})
        md, recs = tm.load_telemetry(tmp_path / "run.jsonl")
        assert md["seed"] == 3 and [r.step for r in recs] == [7, 8]

    @pytest.mark.parametrize("step, metrics, exc, match", [
        (1.5, {"a": 1.0}, ATE, "step must be an integer, got 1.5"),
        ("3", {"a": 1.0}, ATE, "step must be an integer, got '3'"),
        (True, {"a": 1.0}, ATE, "step must be an integer, got the bool"),
        (np.array([1, 2]), {"a": 1.0}, ATE, "step must be an integer"),
        (None, {"a": 1.0}, ATE, "step must be an integer"),
        (0, [("a", 1.0)], ATE, "metrics must be a dict"),
        (0, None, ATE, "metrics must be a dict"),
        (0, 1.0, ATE, "metrics must be a dict"),
        (0, {1: 2.0}, ATE, r"metric names\) must be strings, got 1 \(int\)"),
        (0, {"a": {2: 1.0}}, ATE, "must be strings, got 2 .* under 'a'"),
        (0, {"": 1.0}, ValueError, "non-empty"),
        (0, {"a/b": 1.0, "a": {"b": 2.0}}, ValueError, "'a/b' appears twice"),
        (0, {"step": 1}, ValueError, "reserved"),
    ])
    def test_write_arguments(self, tmp_path, step, metrics, exc, match):
        path = tmp_path / "run.jsonl"
        with tm.TelemetryWriter(path) as log:
            with pytest.raises(exc, match=match):
                log.write(step, metrics)
            log.write(0, {"ok": 1.0})  # still usable
        assert [r.metrics for r in tm.load_telemetry(path)[1]] == [{"ok": 1.0}]

    def test_close_arguments(self, tmp_path):
        log = tm.TelemetryWriter(tmp_path / "run.jsonl")
        with pytest.raises(ATE, match="status must be a non-empty str"):
            log.close(status=3)
        with pytest.raises(ATE, match="error must be a str or None"):
            log.close(status="error", error=ValueError("x"))
        assert not log.closed
        log.close(status="error", error="x")
        assert tm.load_telemetry(tmp_path / "run.jsonl")[0]["end"]["error"] == "x"

    def test_reader_arguments(self, tmp_path):
        path = tmp_path / "run.jsonl"
        with tm.TelemetryWriter(path) as log:
            log.write(0, {"loss": 1.0})
        pair = tm.load_telemetry(path)
        cases = [
            (lambda: tm.load_telemetry(123), "path must be a str or os.PathLike"),
            (lambda: tm.load_telemetry(path, strict="yes"), "strict must be True or False"),
            (lambda: tm.to_columns(pair), r"records\[0\] must be a TelemetryRecord, got dict "
                                          r"\(pass load_telemetry\(path\)\[1\]"),
            (lambda: tm.to_columns(5), "records must be a sequence of TelemetryRecord"),
            (lambda: tm.to_columns("loss"), "records must be a sequence of TelemetryRecord"),
            (lambda: tm.to_columns(pair[1], keys="loss"),
             r"keys must be an iterable of metric names \(e.g. \['loss'\]\)"),
            (lambda: tm.to_columns(pair[1], keys=[1]), "keys must hold metric names"),
            (lambda: tm.to_columns(pair[1], deduplicate="yes"),
             "deduplicate must be True or False"),
        ]
        for fn, match in cases:
            with pytest.raises(ATE, match=match):
                fn()
        assert issubclass(ATE, TypeError) and issubclass(ATE, ValueError)


# --------------------------------------------------------------------------------------
# Autocorrelation
# --------------------------------------------------------------------------------------


class TestAutocorrelation:
    @pytest.mark.parametrize("phi", [0.5, 0.8])
    def test_ar1_integrated_time(self, phi):
        x = ar1(phi, 200_000, np.random.default_rng(0))
        res = tm.autocorrelation_time(x)
        exact = (1 + phi) / (1 - phi)
        assert abs(res.tau - exact) / exact < 0.10
        assert res.reliable and res.window >= 5 * res.tau - 1
        assert res.effective_sample_size == pytest.approx(res.n / res.tau)

    def test_white_noise_tau_one(self):
        res = tm.autocorrelation_time(np.random.default_rng(1).standard_normal(50_000))
        assert abs(res.tau - 1.0) < 0.1

    def test_acf_matches_naive_and_ar1(self):
        x = ar1(0.7, 3000, np.random.default_rng(2))
        rho = tm.autocorrelation_function(x, max_lag=10)
        xc = x - x.mean()
        naive = np.array([xc[: len(x) - k] @ xc[k:] for k in range(11)]) / (xc @ xc)
        np.testing.assert_allclose(rho, naive, rtol=1e-10, atol=1e-12)

    def test_short_series_not_reliable(self):
        res = tm.autocorrelation_time(ar1(0.95, 200, np.random.default_rng(3)))
        assert not res.reliable

    def test_gaps_interpolated(self):
        x = ar1(0.5, 20_000, np.random.default_rng(4))
        y = x.copy()
        y[:3] = np.nan  # leading gap trimmed
        y[1000] = np.inf  # interior gap interpolated
        ref = x[3:].copy()
        ref[997] = 0.5 * (ref[996] + ref[998])
        assert tm.autocorrelation_time(y).tau == pytest.approx(tm.autocorrelation_time(ref).tau)

    def test_bad_inputs(self):
        with pytest.raises(ValueError, match="x is constant"):
            tm.autocorrelation_time(np.ones(100))
        with pytest.raises(ValueError, match="x is too short"):
            tm.autocorrelation_time([1.0, 2.0])
        with pytest.raises(ValueError, match="x must be 1-D"):
            tm.autocorrelation_time(np.ones((10, 2)))
        with pytest.raises(ValueError, match="c must"):
            tm.autocorrelation_time(np.arange(10.0), c=0)
        with pytest.raises(ValueError, match="max_lag"):
            tm.autocorrelation_function(np.arange(10.0), max_lag=10)


# --------------------------------------------------------------------------------------
# Rolling statistics and precursors
# --------------------------------------------------------------------------------------


def naive_rolling(x, window, fn, min_periods):
    out = np.full(len(x), np.nan)
    for t in range(len(x)):
        seg = x[max(0, t - window + 1) : t + 1]
        val = fn(seg)
        if val is not None and val[1] >= min_periods:
            out[t] = val[0]
    return out


class TestRolling:
    @pytest.mark.parametrize("ddof", [0, 1])
    def test_rolling_variance_equals_loop(self, ddof):
        rng = np.random.default_rng(5)
        x = rng.standard_normal(300) * np.linspace(1, 3, 300) + 100.0
        x[[17, 50, 51, 200]] = np.nan
        for window, minp in [(20, None), (20, 10), (7, 2)]:
            mp = window if minp is None else minp

            def fn(seg):
                f = seg[np.isfinite(seg)]
                return (np.var(f, ddof=ddof) if f.size > ddof else np.nan), f.size

            ref = naive_rolling(x, window, fn, mp)
            got = tm.rolling_variance(x, window, min_periods=minp, ddof=ddof)
            assert got.shape == x.shape
            np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12, equal_nan=True)

    def test_rolling_variance_chunking(self):
        x = np.random.default_rng(6).standard_normal(500)
        a = tm.rolling_variance(x, 30)
        b = dynamics._rolling_apply(
            x, 30, lambda w: np.where(np.isfinite(w).all(1), np.var(w, axis=1, ddof=1), np.nan),
            chunk_elems=64,
        )
        np.testing.assert_allclose(a, b, rtol=1e-12, equal_nan=True)

    def test_rolling_autocorrelation_equals_loop(self):
        rng = np.random.default_rng(7)
        x = ar1(0.6, 400, rng)
        x[[30, 31, 250]] = np.nan
        window, lag = 25, 2

        def fn(seg):
            a, b = seg[:-lag], seg[lag:]
            ok = np.isfinite(a) & np.isfinite(b)
            if ok.sum() < 3:
                return None
            return stats.pearsonr(a[ok], b[ok])[0], ok.sum()

        ref = naive_rolling(x, window, fn, 15)
        got = tm.rolling_autocorrelation(x, window, lag=lag, min_periods=15)
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12, equal_nan=True)

    def test_rolling_bad_inputs(self):
        with pytest.raises(ValueError, match="window"):
            tm.rolling_variance(np.arange(10.0), 11)
        with pytest.raises(ValueError, match="window"):
            tm.rolling_variance(np.arange(10.0), 1)
        with pytest.raises(ValueError, match="min_periods"):
            tm.rolling_variance(np.arange(10.0), 5, min_periods=1)
        with pytest.raises(ValueError, match="x is too short"):
            tm.rolling_variance([1.0], 1)

    def test_kendall_matches_scipy(self):
        rng = np.random.default_rng(8)
        a = rng.integers(0, 10, 300).astype(float)  # ties
        b = a + rng.integers(0, 5, 300)
        assert dynamics._kendall_tau(a, b, chunk_elems=1000) == pytest.approx(
            stats.kendalltau(a, b).statistic, rel=1e-12
        )

    def test_precursor_rising_variance(self):
        rng = np.random.default_rng(9)
        n_pre, n_post = 600, 200
        amp = np.concatenate([np.linspace(0.5, 2.0, n_pre), np.full(n_post, 0.2)])
        x = 3.0 - 0.001 * np.arange(n_pre + n_post) + amp * ar1(0.3, n_pre + n_post, rng)
        steps = 10 * np.arange(x.size)
        res = tm.precursor_trend(x, transition=10 * n_pre, steps=steps, window=50,
                                 num_surrogates=99, seed=0)
        assert res.stop == n_pre and res.indicator.shape == (n_pre,)
        # Reference: scipy's Kendall tau of the module's rolling variance vs time.
        ref_ind = tm.rolling_variance(x[:n_pre], 50)
        np.testing.assert_allclose(res.indicator, ref_ind, equal_nan=True)
        ok = np.isfinite(ref_ind)
        ref_tau = stats.kendalltau(np.flatnonzero(ok), ref_ind[ok]).statistic
        assert res.kendall_tau == pytest.approx(ref_tau, rel=1e-12)
        assert res.kendall_tau > 0.5
        assert res.p_value <= 0.02 and res.null_taus.shape == (99,)

    def test_precursor_stationary_not_significant(self):
        rng = np.random.default_rng(10)
        x = ar1(0.3, 800, rng)
        res = tm.precursor_trend(x, transition=600, window=50, num_surrogates=99, seed=1,
                                 detrend_bandwidth=30.0)
        assert res.p_value > 0.05

    def test_precursor_with_missing_probes_and_detrending(self):
        rng = np.random.default_rng(12)
        n = 600
        x = 5.0 * np.exp(-np.arange(n) / 300.0) + np.linspace(0.2, 1.0, n) * ar1(0.3, n, rng)
        x[[0, 100, 101, 350]] = np.nan
        res = tm.precursor_trend(x, transition=n, window=60, detrend_bandwidth=20.0,
                                 num_surrogates=49, seed=2)
        assert res.kendall_tau > 0.5 and res.p_value <= 0.04
        # default min_periods = window: a window is defined iff it holds no missing probe
        full = np.array([t >= 59 and np.isfinite(x[t - 59 : t + 1]).all() for t in range(n)])
        np.testing.assert_array_equal(np.isfinite(res.indicator), full)

    def test_precursor_autocorrelation_indicator(self):
        rng = np.random.default_rng(11)
        n = 1500
        phi = np.linspace(0.1, 0.9, n)  # slowing down: AR coefficient rises
        e = rng.standard_normal(n)
        x = np.zeros(n)
        for t in range(1, n):
            x[t] = phi[t] * x[t - 1] + e[t]
        res = tm.precursor_trend(x, transition=n, window=150, indicator="autocorrelation")
        assert res.kendall_tau > 0.5 and math.isnan(res.p_value)

    def test_precursor_bad_inputs(self):
        x = np.random.default_rng(12).standard_normal(100)
        with pytest.raises(ValueError, match="transition"):
            tm.precursor_trend(x, transition=200, window=10)
        with pytest.raises(ValueError, match="window"):
            tm.precursor_trend(x, transition=20, window=30)
        with pytest.raises(ValueError, match="steps"):
            tm.precursor_trend(x, transition=20, window=5, steps=np.arange(50))
        with pytest.raises(ValueError, match="indicator"):
            tm.precursor_trend(x, transition=50, window=5, indicator="skew")
        with pytest.raises(ValueError, match="constant"):
            tm.precursor_trend(np.ones(100), transition=50, window=5)


# --------------------------------------------------------------------------------------
# Change points and power laws
# --------------------------------------------------------------------------------------


class TestChangePoints:
    def test_step_signal(self):
        rng = np.random.default_rng(13)
        x = np.concatenate([np.zeros(300), np.full(200, 1.5), np.full(250, -0.5)])
        x = x + 0.5 * rng.standard_normal(x.size)
        res = tm.change_points(x)
        assert len(res.indices) == 2
        assert abs(res.indices[0] - 300) <= 2 and abs(res.indices[1] - 500) <= 2
        np.testing.assert_allclose(res.means, [x[: res.indices[0]].mean(),
                                               x[res.indices[0]: res.indices[1]].mean(),
                                               x[res.indices[1]:].mean()])
        assert res.noise_scale == pytest.approx(0.5, rel=0.15)

    def test_matches_brute_force_single_change(self):
        # With a huge penalty for a 2nd change, PELT's one change must be the SSE argmin.
        rng = np.random.default_rng(14)
        x = np.concatenate([np.zeros(60), np.ones(40)]) + 0.3 * rng.standard_normal(100)
        sse = [np.var(x[:k]) * k + np.var(x[k:]) * (100 - k) for k in range(2, 99)]
        ref = 2 + int(np.argmin(sse))
        res = tm.change_points(x, penalty=15.0)
        assert list(res.indices) == [ref]

    def test_noise_only_no_changes(self):
        x = np.random.default_rng(15).standard_normal(1000)
        assert len(tm.change_points(x).indices) == 0

    def test_nan_dropped_indices_in_original_frame(self):
        rng = np.random.default_rng(16)
        x = np.concatenate([np.zeros(100), np.full(100, 2.0)]) + 0.3 * rng.standard_normal(200)
        x[[10, 20, 30, 150]] = np.nan
        res = tm.change_points(x)
        assert len(res.indices) == 1 and abs(res.indices[0] - 100) <= 2

    def test_constant_and_bad(self):
        res = tm.change_points(np.full(50, 3.0))
        assert len(res.indices) == 0 and res.means.tolist() == [3.0]
        with pytest.raises(ValueError, match="min_size"):
            tm.change_points(np.arange(10.0), min_size=0)
        with pytest.raises(ValueError, match="penalty"):
            tm.change_points(np.arange(10.0), penalty=-1.0)
        with pytest.raises(ValueError, match="x"):
            tm.change_points(np.arange(3.0), min_size=2)


class TestPowerLaw:
    def test_recovers_exponent(self):
        rng = np.random.default_rng(17)
        steps = np.arange(1, 5001)
        y = 2.5 * steps ** -0.6 * np.exp(0.1 * rng.standard_normal(steps.size))
        fit = tm.fit_power_law_series(steps, y)
        ref = stats.linregress(np.log(steps), np.log(y))
        assert fit.exponent == pytest.approx(ref.slope, rel=1e-10)
        assert fit.exponent_stderr == pytest.approx(ref.stderr, rel=1e-8)
        assert fit.r_squared == pytest.approx(ref.rvalue**2, rel=1e-10)
        assert fit.prefactor == pytest.approx(math.exp(ref.intercept), rel=1e-10)
        assert abs(fit.exponent - (-0.6)) < 4 * fit.exponent_stderr
        assert fit.residual_std == pytest.approx(0.1, rel=0.1)

    def test_range_and_nan(self):
        steps = np.arange(0, 100, dtype=float)
        y = 3.0 * np.maximum(steps, 1) ** 1.5
        y[50] = np.nan
        with pytest.raises(ValueError, match="x must be > 0"):
            tm.fit_power_law_series(steps, y)
        fit = tm.fit_power_law_series(steps, y, x_min=1)
        assert fit.exponent == pytest.approx(1.5, rel=1e-12) and fit.n == 98

    def test_bad_inputs(self):
        with pytest.raises(ValueError, match="y has length"):
            tm.fit_power_law_series(np.arange(1, 10), np.arange(1, 9))
        with pytest.raises(ValueError, match="y must be > 0"):
            tm.fit_power_law_series(np.arange(1, 10), -np.arange(1, 10))
        with pytest.raises(ValueError, match="y is constant"):
            tm.fit_power_law_series(np.arange(1, 10), np.ones(9))
        with pytest.raises(ValueError, match="x is constant"):
            tm.fit_power_law_series(np.ones(9), np.arange(1, 10))


# --------------------------------------------------------------------------------------
# Cross-correlation and lead/lag
# --------------------------------------------------------------------------------------


class TestLeadLag:
    def test_lagged_pearson_matches_naive(self):
        rng = np.random.default_rng(18)
        x, y = rng.standard_normal(97), rng.standard_normal(97) + 5.0
        res = tm.cross_correlation(x, y, max_lag=12, detrend="none")
        for lag, r in zip(res.lags, res.correlation):
            a, b = (x[: len(x) - lag], y[lag:]) if lag >= 0 else (x[-lag:], y[: len(y) + lag])
            assert r == pytest.approx(stats.pearsonr(a, b)[0], abs=1e-10)

    @pytest.mark.parametrize("lag", [7, -4])
    def test_recovers_planted_lag(self, lag):
        rng = np.random.default_rng(19)
        n = 2000
        base = ar1(0.5, n + 50, rng)
        x = base[25 : 25 + n]
        y = base[25 - lag : 25 - lag + n] + 0.5 * rng.standard_normal(n)  # y[t] = x[t - lag]
        res = tm.lead_lag(x, y, max_lag=20, num_surrogates=99, seed=0)
        assert res.best_lag == lag  # positive: x leads y
        assert res.best_correlation > 0.8
        assert res.p_value == pytest.approx(1 / 100)
        swapped = tm.cross_correlation(y, x, max_lag=20)
        assert swapped.best_lag == -lag

    def test_detrend_modes(self):
        rng = np.random.default_rng(20)
        n = 1500
        walk = np.cumsum(rng.standard_normal(n + 10))
        x = walk[10:] + 0.01 * np.arange(n)
        y = walk[7 : 7 + n]  # y[t] = walk[t+7] = x[t-3] (up to the trend): x leads by 3
        assert tm.cross_correlation(x, y, max_lag=10, detrend="difference").best_lag == 3
        with pytest.raises(ValueError, match="detrend"):
            tm.cross_correlation(x, y, max_lag=10, detrend="quadratic")

    def test_anticorrelation_sign_kept(self):
        rng = np.random.default_rng(21)
        x = rng.standard_normal(500)
        res = tm.cross_correlation(x, -np.roll(x, 2), max_lag=5)
        assert res.best_lag == 2 and res.best_correlation < -0.9

    def test_independent_noise_calibrated(self):
        # Smooth independent series: surrogate p-values must be ~uniform (the false
        # positive rate at 0.05 is a Binomial(trials, 0.05) count).
        rng = np.random.default_rng(22)
        trials, alpha = 40, 0.05
        ps = np.array([
            tm.lead_lag(ar1(0.9, 256, rng), ar1(0.9, 256, rng), max_lag=10,
                        num_surrogates=99, seed=rng).p_value
            for _ in range(trials)
        ])
        bound = stats.binom.ppf(0.999, trials, alpha)
        assert np.sum(ps <= alpha) <= bound
        assert np.median(ps) > 0.2

    def test_independent_noise_single_pair_not_small(self):
        rng = np.random.default_rng(23)
        res = tm.lead_lag(rng.standard_normal(1000), rng.standard_normal(1000), max_lag=20,
                          num_surrogates=199, seed=1)
        assert res.p_value > 0.05

    def test_seed_reproducible_and_chunking(self):
        rng = np.random.default_rng(24)
        x, y = rng.standard_normal(300), rng.standard_normal(300)
        a = tm.lead_lag(x, y, max_lag=5, num_surrogates=50, seed=3)
        b = tm.lead_lag(x, y, max_lag=5, num_surrogates=50, seed=3)
        np.testing.assert_array_equal(a.null_max, b.null_max)
        assert a.p_value == b.p_value

    def test_surrogates_preserve_spectrum(self):
        x = ar1(0.8, 512, np.random.default_rng(25)) + 4.0
        s = tm.phase_randomized_surrogates(x, 5, seed=0)
        assert s.shape == (5, 512)
        np.testing.assert_allclose(np.abs(np.fft.rfft(s, axis=1)),
                                   np.broadcast_to(np.abs(np.fft.rfft(x)), (5, 257)),
                                   rtol=1e-8, atol=1e-8)
        assert not np.allclose(s[0], x)

    def test_nan_pairs_trimmed_and_interpolated(self):
        rng = np.random.default_rng(26)
        base = ar1(0.5, 600, rng)
        x, y = base[5:], base[:-5]  # y[t] = x[t-5]
        x, y = x.copy(), y.copy()
        x[:4] = np.nan
        y[-2:] = np.nan
        y[300] = np.nan
        res = tm.cross_correlation(x, y, max_lag=10)
        assert res.best_lag == 5 and res.n == x.size - 6

    def test_bad_inputs(self):
        x = np.random.default_rng(27).standard_normal(50)
        with pytest.raises(ValueError, match="y has length"):
            tm.lead_lag(x, x[:-1], max_lag=3)
        with pytest.raises(ValueError, match="y is constant"):
            tm.lead_lag(x, np.ones(50), max_lag=3)
        with pytest.raises(ValueError, match="max_lag"):
            tm.cross_correlation(x, x, max_lag=48)
        with pytest.raises(ValueError, match="x is too short"):
            tm.cross_correlation(x[:3], x[:3], max_lag=0)
        with pytest.raises(ValueError, match="seed"):
            tm.lead_lag(x, x, max_lag=3, seed=1.5)
        with pytest.raises(ValueError, match="num_surrogates"):
            tm.phase_randomized_surrogates(x, 0)


# --------------------------------------------------------------------------------------
# Package layout
# --------------------------------------------------------------------------------------

OLD_NAMES = (  # the public names of the old single-module telemetry.py
    "TelemetryWriter", "TelemetryRecord", "TelemetryWarning", "load_telemetry", "to_columns",
    "AutocorrelationTime", "autocorrelation_function", "autocorrelation_time",
    "rolling_variance", "rolling_autocorrelation", "PrecursorTrend", "precursor_trend",
    "ChangePoints", "change_points", "PowerLawFit", "fit_power_law", "CrossCorrelation",
    "cross_correlation", "LeadLag", "lead_lag", "phase_randomized_surrogates",
    "FORMAT_NAME", "FORMAT_VERSION",
)


class TestLayout:
    def test_old_import_paths(self):
        import gradience_jax

        for name in OLD_NAMES:
            assert getattr(gradience_jax.telemetry, name) is getattr(tm, name)
        assert set(tm.__all__) >= set(OLD_NAMES)
        from gradience_jax.telemetry import PowerLawFit, fit_power_law

        assert fit_power_law is dynamics.fit_power_law_series
        assert PowerLawFit is dynamics.SeriesPowerLawFit
        assert tm.TelemetryWriter is io.TelemetryWriter and tm.lead_lag is dynamics.lead_lag

    def test_modules_import_no_jax_and_nothing_above(self):
        """Host side: numpy and the standard library; from the package only environment."""
        import ast

        for path in sorted(Path(tm.__file__).parent.glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    mods = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    mods = [node.module]
                else:
                    continue
                for mod in mods:
                    root = mod.split(".")[0]
                    assert root not in {"jax", "jaxlib", "flax", "optax", "matplotlib"}, path
                    if root == "gradience_jax":
                        assert mod.startswith(("gradience_jax.telemetry",
                                               "gradience_jax.environment",
                                               "gradience_jax.errors")), (path, mod)
