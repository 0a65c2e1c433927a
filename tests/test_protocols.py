"""Protocols A-D as functions: edge of stability (sharpness hovers at 2/lr under full-batch
GD), grokking in fast mode (train accuracy saturates long before test accuracy), the
summaries' definitions, divergent runs kept alive by the probes, and logs that fail at
start on an unwritable path."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from gradience_jax import protocols, telemetry


def test_edge_of_stability_summary_definition():
    steps = np.arange(0, 100, 5)
    sharp = np.r_[np.linspace(5, 13.5, 8), [14.0, 12.0, 13.0, 13.5, 13.2, 13.4, 13.3, 13.1,
                                           13.6, 13.2, 13.4, 13.3]]
    s = protocols.edge_of_stability_summary(steps, sharp, lr=0.15)
    assert math.isclose(s.threshold, 2 / 0.15)
    first = int(np.flatnonzero(sharp >= 0.9 * 2 / 0.15)[0])
    assert s.first_cross == steps[first]
    assert math.isclose(s.median_after, float(np.median(sharp[first + 1:])))
    never = protocols.edge_of_stability_summary(steps, sharp, lr=0.01)
    assert never.first_cross is None and math.isnan(never.ratio)
    with pytest.raises(ValueError, match="lr"):
        protocols.edge_of_stability_summary(steps, sharp, lr=0.0)


def test_grokking_summary_definition():
    steps = np.arange(6)
    s = protocols.grokking_summary(steps, [0.5, 0.995, 1, 1, 1, 1],
                                   [0.0, np.nan, 0.2, 0.6, 0.95, 1.0])
    assert (s.fit_step, s.transition_step, s.generalization_step, s.delay) == (1, 3, 4, 3)
    assert s.grokked
    with pytest.raises(ValueError, match="shape"):
        protocols.grokking_summary(steps, [1.0], [1.0])


def test_edge_of_stability_scaled_down(tmp_path):
    """512 Gaussian points in 20-D, sin targets, tanh 20-64-64-1, MSE, full-batch GD: after
    the sharpness first exceeds 0.9 * 2/lr its median over the rest of the run lies in
    [0.85, 1.3] * 2/lr, at two learning rates; a third, divergent rate blows up within a
    few steps while the probes log NaN with their flag and the run completes."""
    config = protocols.ProtocolAConfig(
        learning_rates=(0.15, 0.25, 0.8), labels=("a", "b", "divergent"), steps=400,
        probe_every=5, num_iters=6, weights_every=0, trace_every=0, alpha=False, chunk=100,
    )
    result = protocols.run_protocol_a(config, fast=True, log_dir=tmp_path, figure_dir=None)
    for run in result.runs[:2]:
        s = run.summary
        assert s.first_cross is not None, run.label
        assert 0.85 <= s.ratio <= 1.3, (run.lr, s)
        assert s.first_cross < config.steps - 100  # a real window follows the crossing
    div = result.runs[2]
    assert len(div.columns["step"]) == config.steps
    loss = div.columns["loss"]
    assert np.isfinite(loss[0]) and np.isnan(loss[-1])
    _, records = telemetry.load_telemetry(div.log_path)
    flagged = [r for r in records if r.metrics.get("sharpness/nonfinite")]
    assert flagged and records[-1].step == config.steps - 1


def test_grokking_fast_mode(tmp_path):
    """Fast mode (p = 31): train accuracy >= 0.99 is reached well before test accuracy
    >= 0.9, and test accuracy does reach 0.9 within the budget. (The notebook runs the
    same settings with all probes on; here only the accuracies are measured.)"""
    config = protocols.FAST_B._replace(weights_every=0, sharpness_every=0)
    result = protocols.run_protocol_b(config, fast=True, log_dir=tmp_path, figure_dir=None)
    s = result.summary
    assert s.fit_step is not None and s.generalization_step is not None, s
    assert s.fit_step < s.generalization_step, s
    assert s.generalization_step - s.fit_step >= 30, s  # a real delay, not simultaneous
    assert s.grokked
    acc = result.columns["test/accuracy"]
    assert acc[s.fit_step] < 0.2  # memorised, not generalised, when the train set is fit


def test_unwritable_log_dir_fails_at_start(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("x")
    t0 = time.perf_counter()
    with pytest.raises(OSError):
        protocols.run_protocol_b(fast=True, log_dir=blocker / "sub", figure_dir=None)
    assert time.perf_counter() - t0 < 5.0  # before any model is built or compiled
    with pytest.raises(ValueError, match="steps"):
        protocols.run_protocol_a(protocols.FAST_A._replace(steps=150, chunk=100),
                                 log_dir=tmp_path, figure_dir=None)


def test_fast_mode_reads_environment(monkeypatch):
    monkeypatch.setenv("GRADIENCE_FAST", "1")
    assert protocols.fast_mode() is True
    assert protocols.fast_mode(False) is False
    monkeypatch.setenv("GRADIENCE_FAST", "0")
    assert protocols.fast_mode() is False
