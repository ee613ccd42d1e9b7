"""Prometheus config, rules and promtool tests: current, valid, complete, and time-scalable for e2e."""
from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import os
import re
import sys

import pytest
import yaml

from daemon.monitoring import fleet_rules, rules
from daemon.monitoring.thresholds import Thresholds, scaled_field_names
from support import REPO_ROOT
from support.promtool import promtool

ROOT = str(REPO_ROOT)
PROM = os.path.join(ROOT, "prometheus")
TESTS = os.path.join(PROM, "tests")
ALERT_NAMES = {
    "EdgechatMemoryLeakSuspected", "EdgechatMemoryNearLimit", "EdgechatHistoryUnbounded",
    "EdgechatHistoryLimitDisabled", "EdgechatGCUncollectableGrowing", "EdgechatGCPausesHigh",
    "EdgechatTurnLatencyCreep", "EdgechatTurnLatencyHigh", "EdgechatRestarted", "EdgechatOOMKilled",
    "EdgechatDown", "EdgechatHighErrorRate", "EdgechatSaturated", "EdgechatSessionStoreUnwritable",
    "EdgechatSessionStoreFailing", "EdgechatMetricsWritesFailing", "EdgechatDecodeSlowPath", "EdgechatHeartbeat",
    "EdgechatInfoInhibitor"}
META = {"EdgechatHeartbeat", "EdgechatInfoInhibitor"}
UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


@functools.lru_cache(maxsize=1)
def _generator():
    """prometheus/tests/generate.py, imported from its path (it is a script, not a package module)."""
    spec = importlib.util.spec_from_file_location("edgechat_rule_scenarios", os.path.join(TESTS, "generate.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _alerts(time_scale: float = 1.0) -> list[dict]:
    return [r.body for g in rules.groups(time_scale)[1] for r in g.rules]


def _recordings(time_scale: float = 1.0) -> list[dict]:
    return [r.body for g in rules.groups(time_scale)[0] for r in g.rules]


def seconds(text: str) -> float:
    """Parse a Prometheus duration such as 1h30m or 600ms."""
    parts = re.findall(r"(\d+)(ms|s|m|h|d)", text)
    assert "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(int(n) * UNITS[u] for n, u in parts)


def test_committed_rule_files_are_current():
    for name, text in rules.render().items():
        with open(os.path.join(PROM, "rules", name), encoding="utf-8") as handle:
            assert handle.read() == text, f"prometheus/rules/{name} is stale: run `edgechat render-rules`"


def test_promtool_check_config_and_rules():
    result = promtool("check", "config", "prometheus/prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout
    result = promtool("check", "rules", *sorted(glob.glob(os.path.join(PROM, "rules", "*.yml"))))
    assert result.returncode == 0, result.stdout + result.stderr
    found = sum(int(n) for n in re.findall(r"SUCCESS: (\d+) rules found", result.stdout))
    assert found == len(_alerts()) + len(_recordings())


def test_prometheus_config_targets_the_device():
    with open(os.path.join(PROM, "prometheus.yml"), encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == Thresholds().job]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"] == [{"targets": ["127.0.0.1:8000"]}]
    assert config["alerting"]["alertmanagers"] == [{"static_configs": [{"targets": ["127.0.0.1:9093"]}]}]
    assert config["rule_files"] == [f"rules/{rules.RECORDING_FILE}", f"rules/{rules.ALERTS_FILE}"]
    interval = seconds(config["global"]["scrape_interval"])
    # every rate window must span at least 4 scrapes, the shortest `for` at least one evaluation
    windows = [seconds(w) for body in _alerts() + _recordings() for w in re.findall(r"\[(\w+)\]", body["expr"])]
    assert min(windows) >= 4 * interval
    assert min(seconds(body["for"]) for body in _alerts()) >= seconds(config["global"]["evaluation_interval"])


def test_promtool_unit_tests_pass():
    files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(TESTS, "*.yml")))
    assert {"alerts_test.yml", "recording_test.yml"} <= set(files)
    assert len([f for f in files if f.startswith("scenario-")]) == len(_generator().SCENARIOS)
    result = promtool("test", "rules", *files, cwd=TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(files)


def test_generated_scenarios_are_current():
    generated = _generator().build()
    committed = {os.path.basename(p) for p in glob.glob(os.path.join(TESTS, "scenario-*.yml"))}
    assert committed == set(generated), "stale or missing scenario files: run prometheus/tests/generate.py"
    for name, text in generated.items():
        with open(os.path.join(TESTS, name), encoding="utf-8") as handle:
            assert handle.read() == text, f"{name} is stale: run prometheus/tests/generate.py"


def test_scenario_matrix_covers_leaks_and_healthy_runs():
    gen = _generator()
    by_name = {s.name: s for s in gen.SCENARIOS}
    assert set(by_name) == {"history_unbounded", "slow_rss_leak", "fast_tensor_leak", "latency_creep",
                            "healthy_sawtooth", "startup_spike", "restart", "memory_high_flat",
                            "swap_hidden_leak", "swap_settled"}
    last = {name: {a[0] for a in s.checks[-1][1]} for name, s in by_name.items()}
    assert "EdgechatHistoryUnbounded" in last["history_unbounded"]
    assert not {"EdgechatMemoryLeakSuspected", "EdgechatMemoryNearLimit"} & last["history_unbounded"]
    assert "EdgechatMemoryLeakSuspected" in last["slow_rss_leak"] and "EdgechatMemoryLeakSuspected" in last["fast_tensor_leak"]
    assert "EdgechatTurnLatencyCreep" in last["latency_creep"]
    # a leak the kernel hides in swap is caught by the slope, and RAM alone never looks full
    swap_hidden = {a[0] for _, firing in by_name["swap_hidden_leak"].checks for a in firing}
    assert "EdgechatMemoryLeakSuspected" in swap_hidden and "EdgechatMemoryNearLimit" not in swap_hidden
    for s in gen.SCENARIOS:
        assert len(s.checks) >= 3, s.name
        if s.kind == "healthy":
            severities = {a[1] for _, firing in s.checks for a in firing}
            assert severities <= {"none", "info"}, s.name
        else:
            assert s.checks[0][1] == {gen.W}, f"{s.name}: the first check is the 'not yet' one"
    # every alert name other than the expected ones is listed with exp_alerts: [] at every check
    with open(os.path.join(TESTS, "scenario-healthy_sawtooth.yml"), encoding="utf-8") as handle:
        doc = yaml.safe_load(handle)["tests"][0]
    listed = {(t["eval_time"], t["alertname"]) for t in doc["alert_rule_test"] if t["exp_alerts"] == []}
    for t in {t["eval_time"] for t in doc["alert_rule_test"]}:
        assert {name for time, name in listed if time == t} == ALERT_NAMES - {"EdgechatHeartbeat"}


def test_alert_names_and_contract():
    rendered = rules.render()[rules.ALERTS_FILE]
    alerts = _alerts()
    assert {a["alert"] for a in alerts} == ALERT_NAMES
    for alert in alerts:
        name = alert["alert"]
        assert seconds(alert["for"]) > 0, name
        assert alert["labels"]["severity"] in ({"none"} if name in META else {"critical", "warning", "info"})
        notes = alert["annotations"]
        assert set(notes) == {"summary", "description", "runbook_url"}, name
        assert "$value" in notes["description"], f"{name}: the description must show the value"
        assert notes["runbook_url"] == f"{Thresholds().runbook_base}#{name.lower()}"
    # each alert carries a one-line comment saying what it detects (or does, for the meta alerts)
    for match in re.finditer(r"\n( *)- alert: (\w+)", rendered):
        comment = rendered[:match.start()].rsplit("\n", 1)[1]
        assert comment.strip().startswith("# ") and len(comment.strip()) > 20, match.group(2)
    # same-name rules differ by severity (so Alertmanager's critical-inhibits-warning applies), the
    # leak rules' warnings by the window they look at as well
    for name in ("EdgechatMemoryNearLimit", "EdgechatRestarted"):
        assert sorted(a["labels"]["severity"] for a in alerts if a["alert"] == name) == ["critical", "warning"] \
            if name != "EdgechatRestarted" else ["info", "warning"]
    leaks = [(a["labels"]["severity"], a["labels"]["window"]) for a in alerts if a["alert"] == "EdgechatMemoryLeakSuspected"]
    assert sorted(leaks) == [("critical", "30m"), ("warning", "1d"), ("warning", "1h"), ("warning", "6h")]


def _hand_written(kind: str) -> list[dict]:
    """The tests of every hand-written promtool file of that kind (alerts*_test.yml, recording*_test.yml)."""
    tests = []
    for path in sorted(glob.glob(os.path.join(TESTS, f"{kind}*_test.yml"))):
        with open(path, encoding="utf-8") as handle:
            tests += yaml.safe_load(handle)["tests"]
    return tests


def test_every_alert_rule_has_not_yet_and_firing_unit_cases():
    cases = [case for test in _hand_written("alerts") for case in test.get("alert_rule_test", [])]
    # a rule is its name and severity, and window for the leak rules (which share a name)
    firing = {(c["alertname"], a["exp_labels"]["severity"], a["exp_labels"].get("window"))
              for c in cases for a in c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert firing == {(a["alert"], a["labels"]["severity"], a["labels"].get("window")) for a in _alerts()}
    assert quiet == ALERT_NAMES
    for c in cases:
        for expected in c["exp_alerts"]:
            assert set(expected["exp_annotations"]) == {"summary", "description", "runbook_url"}


def test_every_recording_rule_has_an_expression_test():
    tested = " ".join(case["expr"] for test in _hand_written("recording") for case in test["promql_expr_test"])
    for body in _recordings():
        assert re.search(re.escape(body["record"]) + r"(?![\w:])", tested), f"no promql_expr_test for {body['record']}"


def test_unit_tests_evaluate_groups_in_dependency_order():
    recording, alerts = rules.groups()
    order = [g.name for g in recording + alerts]
    assert order[-1] == "edgechat.meta.alerts"
    with open(os.path.join(TESTS, "alerts_test.yml"), encoding="utf-8") as handle:
        assert yaml.safe_load(handle)["group_eval_order"] == order


def test_info_inhibitor_fires_before_any_info_alert():
    alerts = _alerts()
    [inhibitor] = [a for a in alerts if a["alert"] == "EdgechatInfoInhibitor"]
    infos = [a for a in alerts if a["labels"]["severity"] == "info"]
    assert infos and all(seconds(inhibitor["for"]) < seconds(a["for"]) for a in infos)


def test_thresholds_scale_only_durations():
    base, half = Thresholds(), Thresholds().scaled(0.5)
    for field in dataclasses.fields(Thresholds):
        expected = getattr(base, field.name) * (0.5 if field.name in scaled_field_names() else 1)
        assert getattr(half, field.name) == expected, field.name
    assert "near_limit_warning_ratio" not in scaled_field_names() and "leak_slow_window" in scaled_field_names()
    with pytest.raises(ValueError):
        Thresholds().scaled(0)
    with pytest.raises(ValueError, match="1 ms"):
        rules.render(time_scale=1e-7)


def _durations(time_scale: float) -> list[float]:
    """Every time quantity of the rules, in order: ranges, offsets, for, keep_firing_for, horizons, guards."""
    found = []
    for body in _recordings(time_scale) + _alerts(time_scale):
        expr = body["expr"]
        found += [seconds(d) for d in re.findall(r"\[(\w+)\]|offset (\w+)", expr) for d in d if d]
        if ":projected" in body.get("record", ""):  # the horizon the slope is carried over
            found += [float(h) for h in re.findall(r":deriv\w+ \* ([\d.e+-]+)$", expr)]
        found += [float(g) for g in re.findall(r"uptime_seconds:max > ([\d.e+-]+)", expr)]
        found += [seconds(body[k]) for k in ("for", "keep_firing_for") if k in body]
    return found


def test_time_scale_shrinks_every_window_for_and_guard(tmp_path):
    nominal, scaled = _durations(1.0), _durations(0.01)
    assert len(nominal) == len(scaled) > 40
    assert scaled == pytest.approx([d * 0.01 for d in nominal], abs=0.0005)
    # names and everything that is not a duration stay the same
    assert [r["record"] for r in _recordings(0.01)] == [r["record"] for r in _recordings()]
    # and, numbers aside, the rule files are the same text (header comment aside)
    def shape(text: str) -> str:
        return re.sub(r"\d[\w.]*", "N", text.split("groups:", 1)[1])
    for name, text in rules.render(0.01).items():
        assert shape(text) == shape(rules.render()[name])
    rules.write(str(tmp_path), 0.01)
    result = promtool("check", "rules", *sorted(glob.glob(str(tmp_path / "*.yml"))))
    assert result.returncode == 0, result.stdout + result.stderr


def test_scaled_rules_fire_on_compressed_scenarios_as_at_full_scale(tmp_path):
    """The end-to-end test's premise: rules and time shrunk alike give the same alerts at the same moments."""
    gen = _generator()
    rules.write(str(tmp_path / "rules"), 0.01)
    out = tmp_path / "tests"
    out.mkdir()
    assert gen.main(["--time-scale", "0.01", "--out", str(out), "--rules-dir", "../rules"]) == 0
    result = promtool("test", "rules", *sorted(os.listdir(out)), cwd=str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    # and the comparison has teeth: full-scale rules on compressed time miss the slow leak
    rules.write(str(tmp_path / "rules"), 1.0)
    result = promtool("test", "rules", "scenario-slow_rss_leak.yml", cwd=str(out))
    assert result.returncode != 0


def test_cli_render_rules(runner, tmp_path):
    code, out, err = runner("render-rules", "--time-scale", "0.05", "--out", str(tmp_path),
                            "--fleet-out", str(tmp_path / "fleet"))
    assert code == 0, err
    for name, text in rules.render(0.05).items():
        assert (tmp_path / name).read_text(encoding="utf-8") == text
        assert str(tmp_path / name) in out
    for name, text in fleet_rules.render(0.05).items():
        assert (tmp_path / "fleet" / name).read_text(encoding="utf-8") == text
    code, out, err = runner("render-rules", "--time-scale", "0", "--out", str(tmp_path / "x"),
                            "--fleet-out", str(tmp_path / "y"))
    assert code == 2 and "time_scale" in err


def test_rules_use_only_metrics_the_daemon_exports(client):
    """Contract check against a real scrape: every edgechat_ series a rule reads exists, with its labels."""
    from prometheus_client.parser import text_string_to_metric_families
    from daemon.telemetry.metrics import REJECT_REASONS, TURN_INDEX_BUCKETS
    client.get("/healthz")
    text = client.get("/metrics").get_data(as_text=True)
    samples = [s for family in text_string_to_metric_families(text) for s in family.samples]
    exported = {s.name: set(s.labels) for s in samples}
    for s in samples:
        exported[s.name] |= set(s.labels)
    exprs = " ".join(body["expr"] for body in _recordings() + _alerts())
    used = set(re.findall(r"(?<![:\w])(edgechat_[a-z_]+)(?![:\w])", exprs))
    assert used and used <= set(exported), f"rules read series the daemon does not export: {used - set(exported)}"
    for name, label in [("edgechat_turn_duration_seconds_bucket", "turn_index"),
                        ("edgechat_http_requests_total", "route"), ("edgechat_http_requests_total", "status"),
                        ("edgechat_requests_rejected_total", "reason"),
                        ("edgechat_gc_pause_seconds_sum", "generation")]:
        assert label in exported[name], (name, label)
    # the label values the rules spell out are the daemon's own
    from daemon.monitoring.recording import EARLY_TURNS, NOT_LATE_TURNS
    assert set(NOT_LATE_TURNS.split("|")) < set(TURN_INDEX_BUCKETS) and set(EARLY_TURNS.split("|")) < set(TURN_INDEX_BUCKETS)
    assert set(Thresholds().saturation_reasons_regex.split("|")) <= set(REJECT_REASONS)


def _runbook_sections() -> dict[str, str]:
    with open(os.path.join(ROOT, "docs", "runbooks.md"), encoding="utf-8") as handle:
        text = handle.read()
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_runbooks_have_a_section_per_alert():
    sections = _runbook_sections()
    for alert in _alerts():
        anchor = alert["annotations"]["runbook_url"].split("#", 1)[1]
        # GitHub's heading anchor: lower case, spaces to dashes, punctuation dropped
        [title] = [t for t in sections if re.sub(r"[^\w\- ]", "", t.lower()).replace(" ", "-") == anchor]
        body = sections[title]
        for part in ("**What it means.**", "**Confirm.**", "**Fix.**"):
            assert part in body, f"runbook {title}: missing {part}"


def test_runbooks_name_real_dashboard_panels():
    """A runbook that sends people to a panel must name one that exists on edgechat-memory/-turns."""
    titles = set()
    for path in glob.glob(os.path.join(ROOT, "grafana", "dashboards", "*.json")):
        with open(path, encoding="utf-8") as handle:
            titles |= {panel["title"] for panel in yaml.safe_load(handle)["panels"]}
    assert titles, "no dashboards in grafana/dashboards"
    named = {bold for name, body in _runbook_sections().items() if name in ALERT_NAMES
             for bold in (" ".join(b.split()) for b in re.findall(r"\*\*([^*]+)\*\*", body))}
    named -= {"What it means.", "Confirm.", "Fix.", "critical", "warning", "info"}
    assert named and named <= titles, f"panels not on any dashboard: {sorted(named - titles)}"
