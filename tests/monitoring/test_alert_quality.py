"""Alert quality on a small seeded run, evaluated by a real Prometheus (bench/alert_quality.py holds the
10,000 device-day benchmark and docs/alerts-quality.md its numbers): no false page, every leak found,
each leak shape's lead at or above its goal; and the replay agrees with promtool's rule manager."""
from __future__ import annotations

import dataclasses
import os
import statistics
import sys

import numpy as np
import pytest
import yaml

from bench import alert_quality, alert_scores, rule_replay
from daemon.monitoring import rules
from daemon.monitoring.thresholds import Thresholds
from support import REPO_ROOT
from support.processes import track
from support.promtool import promtool

sys.path.insert(0, os.path.join(str(REPO_ROOT), "prometheus", "tests"))
import trace_io  # noqa: E402
import traces  # noqa: E402
from shapes import LEAKS  # noqa: E402

RULES = os.path.join(str(REPO_ROOT), "prometheus", "rules")
RULE_FILES = [os.path.join(RULES, f) for f in alert_quality.RULE_FILES]
SEED = 7
HOUR, DAY = 3600, 86400

pytestmark = pytest.mark.e2e


def small_plan() -> list[alert_quality.Spec]:
    """Every leak shape once (its length follows from the leak) and every healthy archetype twice
    (2 days each): ~90 device-days."""
    specs = []
    for i, shape in enumerate(LEAKS):
        seed = SEED * 1000 + i
        specs.append(alert_quality.Spec(f"l{i:03d}", shape, seed, traces.leak_days(shape, seed), "1.3.2"))
    for i, shape in enumerate(traces.HEALTHY * 2):
        specs.append(alert_quality.Spec(f"h{i:03d}", shape, SEED * 2000 + i, 2, "1.3.2"))
    return specs


@dataclasses.dataclass
class Run:
    report: alert_scores.Report
    episodes: list
    truths: dict
    offsets: dict


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    workdir = str(tmp_path_factory.mktemp("alert-quality"))
    specs = small_plan()
    truths, offsets, ranges = alert_quality.store(specs, workdir, batch_days=200)
    prom = rule_replay.Replayer(os.path.join(workdir, "data"), os.path.join(workdir, "replay.log"))
    try:
        prom.start()
        track(prom.proc.popen)
        found = [e for a, b in ranges for e in prom.replay(rule_replay.alert_rules(RULE_FILES, alert_quality.GROUPS), a, b)]
    finally:
        prom.stop()
    report = alert_scores.score(list(truths.values()), offsets, found, Thresholds().leak_min_uptime)
    return Run(report, found, truths, offsets)


def test_no_false_alert_on_healthy_devices(run):
    assert run.report.healthy_days >= 30
    assert run.report.false_alerts == {}, run.report.false_alerts


def test_every_leak_that_reaches_the_limit_is_found_before_it(run):
    reaching = [r for r in run.report.leaks if r.to_limit is not None]
    assert len(reaching) >= 8
    assert [r.device for r in reaching if not r.detected] == []


def test_leads_meet_their_goals(run):
    slow, fast = run.report.slow(), run.report.fast()
    assert len(slow) >= 5 and len(fast) >= 3
    leads = {r.device: (r.shape, round(r.lead, 2)) for r in slow}
    assert statistics.median(v for _, v in leads.values()) >= alert_scores.GOALS["lead_median"], leads
    for shape in {r.shape for r in slow}:     # every shape at or above the p10 goal
        mine = [r.lead for r in slow if r.shape == shape]
        assert statistics.median(mine) >= alert_scores.GOALS["lead_p10"], (shape, leads)
    ahead = {r.device: r.critical_ahead for r in fast}
    assert all(a is not None and a >= alert_scores.GOALS["fast_critical_min"] * 60 for a in ahead.values()), ahead


def test_no_alert_flaps_more_than_once_a_week(run):
    assert run.report.flap_worst_week <= alert_scores.GOALS["flaps_per_device_week"]


# -- the replay is Prometheus's rule manager ---------------------------------------------------------

@pytest.mark.parametrize("times, for_s, keep_s, end, expected", [
    # pending 2 steps, fires at the 3rd (for 60 s), resolved at the first step without a sample
    ([0, 30, 60, 90], 60, 0, 600, [(0, 60, 120)]),
    # a pending alert missing one evaluation starts over
    ([0, 30, 90, 120, 150], 60, 0, 600, [(90, 150, 180)]),
    # keep_firing_for 60 s bridges a 30 s gap: resolved 60 s after the last sample's next step
    ([0, 30, 60, 120, 150], 30, 60, 600, [(0, 30, 240)]),
    # ... but not a 90 s one: resolved at 60 + 30 + 60 = 150, a new pending alert from 180
    ([0, 30, 60, 180, 210, 240], 30, 60, 600, [(0, 30, 150), (180, 210, 330)]),
    # still firing when the replay ends
    ([0, 30, 60, 90, 120], 30, 0, 120, [(0, 30, None)]),
])
def test_episodes_follow_the_rule_manager(times, for_s, keep_s, end, expected):
    assert rule_replay.episodes(np.array(times, float), 30, for_s, keep_s, end) == expected


def test_replay_agrees_with_promtool(run, tmp_path):
    """The same traces through promtool's rule tests (the rule manager itself, staleness markers for
    missing scrapes): at every checkpoint the firing alerts are the ones the replay found. promtool
    evaluates every group at one interval, so the 5 min trend group is left out of the comparison."""
    devices = ["l005", "l010"]   # a fast leak (OOM kills and restarts), the history bug
    trend = {"6h", "1d"}
    names = "|".join(sorted({r.alertname for r in rule_replay.alert_rules(RULE_FILES, alert_quality.GROUPS)}))
    docs = []
    for device in devices:
        spec = next(s for s in small_plan() if s.name == device)
        trace = traces.build(spec.name, spec.shape, spec.seed, spec.days, spec.deploy_at)
        span = min(trace.steps, DAY // traces.STEP)
        mine = [e for e in run.episodes if dict(e.labels)["device"] == device
                and dict(e.labels).get("window") not in trend and e.severity in ("warning", "critical")]
        t0 = run.offsets[device]
        moments = sorted({x - t0 for e in mine for x in (e.fired_at, e.resolved_at) if x is not None})
        checks = [c for c in range(HOUR // 2, span * traces.STEP, HOUR // 2) if all(abs(c - m) > 120 for m in moments)]
        expr_tests = []
        for c in checks:
            firing = [e for e in mine if e.fired_at - t0 <= c and (e.resolved_at is None or c < e.resolved_at - t0)]
            samples = [{"labels": "ALERTS{" + ", ".join(f'{k}="{v}"' for k, v in sorted(
                {**dict(e.labels), "alertname": e.alertname, "alertstate": "firing"}.items())) + "}", "value": 1}
                for e in firing]
            expr_tests.append({"expr": f'ALERTS{{alertstate="firing", alertname=~"{names}", '
                                       'severity=~"warning|critical", window!~"6h|1d"}',
                               "eval_time": f"{c}s", "exp_samples": samples})
        docs.append({"name": device, "interval": "30s", "input_series": trace_io.promtool_series(trace, span),
                     "promql_expr_test": expr_tests})
    recording, alerts = rules.groups()
    doc = {"rule_files": RULE_FILES, "evaluation_interval": "30s",
           "group_eval_order": [g.name for g in recording + alerts], "tests": docs}
    path = tmp_path / "replay_test.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False, width=4096))
    result = promtool("test", "rules", str(path), cwd=str(tmp_path))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sum(len(d["promql_expr_test"]) for d in docs) >= 60
    assert sum(len(t["exp_samples"]) for d in docs for t in d["promql_expr_test"]) >= 10, "nothing fired to compare"
