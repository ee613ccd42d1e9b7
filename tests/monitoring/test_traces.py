"""The simulated device traces behind bench.alert_quality and the replay's rewriting of rules: what each
trace claims about itself holds in its series, and an inlined rule reads what the recorded one would."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from bench import rule_replay
from support import REPO_ROOT

sys.path.insert(0, os.path.join(str(REPO_ROOT), "prometheus", "tests"))
import trace_io  # noqa: E402
import traces  # noqa: E402
from shapes import LEAKS  # noqa: E402

STEP = traces.STEP


def _series(trace, name: str) -> np.ndarray:
    """A metric summed over its series (pids), NaN where none has a sample."""
    out = np.full(trace.steps, np.nan)
    for s in trace.series:
        if s.name == name:
            part = np.full(trace.steps, np.nan)
            part[s.at:s.at + len(s.values)] = s.values
            out = np.where(np.isnan(out), part, np.where(np.isnan(part), out, out + part))
    return out


def test_a_trace_is_its_seed():
    a, b = traces.build("d", "per_token", 11), traces.build("d", "per_token", 11)
    assert a.truth.limit_at == b.truth.limit_at and len(a.series) == len(b.series)
    assert all(np.array_equal(x.values, y.values, equal_nan=True) for x, y in zip(a.series, b.series))
    assert not np.array_equal(a.series[0].values, traces.build("d", "per_token", 12).series[0].values)


@pytest.mark.parametrize("shape", sorted(set(LEAKS) - {"recycled", "history"}))
def test_a_leak_reaches_the_limit_where_its_truth_says(shape):
    for seed in range(3):
        trace = traces.build("d", shape, seed)
        truth = trace.truth
        if truth.limit_at is None:
            continue
        k = int(truth.limit_at // STEP)
        ram, swap = _series(trace, "edgechat_service_memory_bytes"), _series(trace, "edgechat_process_swap_bytes")
        committed = ram + np.nan_to_num(swap)
        limit = _series(trace, "edgechat_memory_limit_bytes")
        assert committed[k] >= limit[k], (shape, seed)
        start = int(truth.leak_start // STEP)
        assert np.nanmax((committed - limit)[start:k]) < 0, (shape, seed)    # not before
        assert truth.boots[-1] > truth.limit_at or len(truth.boots) > 1      # the OOM restarted it
        return
    pytest.fail(f"no {shape} trace of 3 reached the limit")


@pytest.mark.parametrize("shape", traces.HEALTHY)
def test_healthy_devices_stay_below_the_warning_level_and_trim_history(shape):
    for seed in range(4):
        trace = traces.build("d", shape, seed, days=2)
        assert trace.truth.leak_start is None and trace.truth.limit_at is None
        ratio = _series(trace, "edgechat_service_memory_bytes") / _series(trace, "edgechat_memory_limit_bytes")
        assert np.nanmax(ratio) < 0.8, (shape, seed)
        allowed = 2 * _series(trace, "edgechat_history_max_turns") + 1
        assert np.nanmax(_series(trace, "edgechat_history_messages_max") - allowed) <= 0, (shape, seed)


def test_the_history_bug_outgrows_the_limit_and_swap_hidden_keeps_ram_flat():
    bug = traces.build("d", "history", 3)
    allowed = 2 * _series(bug, "edgechat_history_max_turns") + 1
    assert np.nanmax(_series(bug, "edgechat_history_messages_max") - allowed) > 0
    hidden = traces.build("d", "swap_hidden", 3)
    start, end = int(hidden.truth.leak_start // STEP) + 120, int(hidden.truth.limit_at // STEP)   # past start-up
    swap = _series(hidden, "edgechat_process_swap_bytes")[start:end]
    ram = _series(hidden, "edgechat_service_memory_bytes")[start:end]
    assert np.nanmax(swap) - np.nanmin(swap) > 2 * (np.nanmax(ram) - np.nanmin(ram))


def test_usage_triggered_leaks_begin_while_the_device_is_in_use():
    for seed in range(6):
        b = traces._Builder("d", "per_request", None, seed)
        if b.truth.leak_start:
            assert b.rate[int(b.truth.leak_start // STEP)] >= 0.5 * b.rate.mean()


def test_written_traces_carry_their_gaps():
    trace = traces.build("d", "offline", 5, days=2)
    assert trace.truth.offline
    lines = "".join(trace_io.openmetrics(trace, 1_000_000_020)).splitlines()
    name, labels_value_ts = lines[0].split("{", 1)
    assert name.startswith("edgechat_") and 'device="d"' in labels_value_ts
    assert int(lines[0].rsplit(" ", 1)[1]) % STEP == 0
    service = next(s for s in trace_io.promtool_series(trace) if s["series"].startswith("edgechat_service_memory"))
    assert "stale" in service["values"] and "_x" in service["values"]   # a scrape gap, then hours offline


RECORDED = {"a:sum": ("sum by (job) (x)", 30.0), "a:deriv1h": ("deriv(a:sum[1h])", 30.0),
            "a:delta": ("sum by (job) (delta(y[10m]))", 30.0), "a:avg5m": ("avg_over_time(a:sum[5m])", 300.0)}


@pytest.mark.parametrize("expr, interval, expected", [
    ("a:sum > 1", 30, "(\nsum by (job) (x)\n) > 1"),
    # a range over a recorded series: a subquery at the recording's interval
    ("a:deriv1h", 30, "(\nderiv((\nsum by (job) (x)\n)[1h:30s])\n)"),
    # offset: the sample recorded exactly then
    ("a:delta offset 2h", 30, "last_over_time((\nsum by (job) (delta(y[10m]))\n)[29s:30s] offset 2h)"),
    # read from a group with another interval: the newest recorded sample within one interval
    ("a:sum", 300, "last_over_time((\nsum by (job) (x)\n)[29s:30s])"),
    ("a:avg5m", 30, "last_over_time((\navg_over_time((\nsum by (job) (x)\n)[5m:30s])\n)[299s:5m])"),
    # a name that only starts like a recorded one is left alone
    ("a:sum_other", 30, "a:sum_other"),
])
def test_recorded_series_are_inlined_as_the_rule_manager_reads_them(expr, interval, expected):
    assert rule_replay.inline(expr, RECORDED, interval) == expected


def test_stored_recordings_are_read_as_stored():
    assert rule_replay.inline("a:deriv1h > 0", RECORDED, 30, {"a:sum": "replay:a:sum"}) == \
        "(\nderiv(replay:a:sum[1h])\n) > 0"
    with pytest.raises(NotImplementedError):
        rule_replay.inline('a:sum{job="x"}', RECORDED, 30)
