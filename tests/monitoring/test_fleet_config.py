"""Fleet monitoring as code: central rules current and promtool-tested, the device config valid and within
the series budget, the fleet Alertmanager config, the fleet dashboard reading only what devices ship."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml

from daemon.fleet.central import expected_devices_text
from daemon.monitoring import alertmanager, dashboard_fleet, fleet_rules, rules, shipping
from daemon.monitoring.thresholds import Thresholds
from support import REPO_ROOT

FLEET = REPO_ROOT / "prometheus" / "fleet"
EXAMPLE = REPO_ROOT / "deploy" / "fleet" / "device-prometheus.example.yml"


def tool(name: str, *args: str, cwd=REPO_ROOT) -> subprocess.CompletedProcess:
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
    if path is None:
        pytest.fail(f"{name} not found: `make test-deps` installs Debian's packages")
    return subprocess.run([path, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def _fleet_alerts() -> list[dict]:
    t = Thresholds()
    return [r.body for g in fleet_rules.fleet_groups(t) + fleet_rules.central_groups(t) for r in g.rules
            if "alert" in r.body]


def test_committed_fleet_rule_files_are_current():
    for name, text in fleet_rules.render().items():
        assert (FLEET / name).read_text(encoding="utf-8") == text, f"prometheus/fleet/{name}: run edgechat render-rules"


def test_promtool_checks_and_unit_tests_the_fleet_rules():
    result = tool("promtool", "check", "rules", *(str(FLEET / n) for n in fleet_rules.render()))
    assert result.returncode == 0, result.stdout + result.stderr
    result = tool("promtool", "test", "rules", "fleet_test.yml", cwd=FLEET / "tests")
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
    tested = (FLEET / "tests" / "fleet_test.yml").read_text(encoding="utf-8")
    for alert in _fleet_alerts():
        assert f"alertname: {alert['alert']}" in tested, f"no unit test of {alert['alert']}"


def test_vmalert_accepts_the_fleet_rules():
    result = tool("vmalert", f"-rule={FLEET / fleet_rules.FLEET_FILE}", "-dryRun")
    assert result.returncode == 0, result.stdout + result.stderr


def test_fleet_alerts_follow_the_alert_contract_and_have_runbooks():
    runbooks = (REPO_ROOT / "docs" / "runbooks.md").read_text(encoding="utf-8")
    for alert in _fleet_alerts():
        assert alert["labels"]["severity"] in ("critical", "warning") and alert["for"]
        assert "$value" in alert["annotations"]["description"]
        section = runbooks.split(f"## {alert['alert']}\n", 1)
        assert len(section) == 2, f"docs/runbooks.md has no section for {alert['alert']}"
        body = section[1].split("\n## ", 1)[0]
        assert all(part in body for part in ("**What it means.**", "**Confirm.**", "**Fix.**")), alert["alert"]


def test_device_config_example_is_current_and_valid(runner, tmp_path):
    args = ["render-device-prometheus", "--device", "shop-0042", "--site", "lyon", "--model", "qwen2.5-0.5b-instruct",
            "--version", "1.4.0", "--alertmanager", "alertmanager-1.example.net:9093",
            "--alertmanager", "alertmanager-2.example.net:9093", "--ca-file", "/etc/edgechat/fleet-ca.pem",
            "--username", "edge", "--password-file", "/etc/edgechat/alertmanager-password",
            "--metrics-key-file", "/etc/edgechat/metrics-key"]
    code, out, err = runner(*args)
    assert code == 0, err
    assert out == EXAMPLE.read_text(encoding="utf-8"), "deploy/fleet/device-prometheus.example.yml is stale"
    config = yaml.safe_load(out)
    assert config["global"]["external_labels"] == {"device": "shop-0042", "site": "lyon", "version": "1.4.0",
                                                   "model": "qwen2.5-0.5b-instruct"}
    [job] = config["scrape_configs"]
    assert job["authorization"] == {"type": "Bearer", "credentials_file": "/etc/edgechat/metrics-key"}
    # promtool resolves every file the config names: point them at real ones
    for name in ("fleet-ca.pem", "alertmanager-password", "metrics-key"):
        (tmp_path / name).write_text("x\n")
    rules.write(str(tmp_path / "rules"))
    text = out.replace("/etc/edgechat/", f"{tmp_path}/").replace("/etc/prometheus/rules", str(tmp_path / "rules"))
    (tmp_path / "prometheus.yml").write_text(text)
    result = tool("promtool", "check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    code, _, err = runner(*args[:-2], "--username", "edge", "--password-file", "")
    assert code == 2 and "password_file" in err


def test_ships_every_recording_rule_and_only_budgeted_raw_series():
    keep = re.compile(f"^(?:{shipping.keep_regex()})$")
    recorded = [r.body["record"] for g in rules.groups()[0] for r in g.rules]
    assert all(keep.match(name) for name in recorded)
    for name in ("edgechat_http_requests_total", "edgechat_turn_duration_seconds_bucket", "ALERTS_FOR_STATE",
                 "edgechat_gc_pause_seconds_bucket", "go_goroutines"):
        assert not keep.match(name), f"{name} would blow the series budget"
    from prometheus_client import CollectorRegistry
    from daemon.telemetry.metrics import Metrics
    families = list(Metrics(CollectorRegistry(), multiprocess=False).registry.collect())
    exported = {f.name + ("_total" if f.type == "counter" else "") for f in families}
    assert set(shipping.SHIPPED_RAW) - {"up", "ALERTS"} <= exported


def test_fleet_dashboard_reads_only_what_devices_ship_and_vmalert_records():
    keep = re.compile(f"^(?:{shipping.keep_regex()})$")
    central = {fleet_rules.DEVICES, fleet_rules.LEAKING, fleet_rules.LEAKING_RATIO}
    keywords = {"by", "max", "avg", "count", "topk", "changes", "time", "timestamp", "max_over_time", "and",
                "or", "unless", "on", "sum", "min"}
    for title, expr in dashboard_fleet.queries():
        names = set(re.findall(r"(?<![\w:\"$])([A-Za-z_][\w:]*)\s*\{", expr)) - keywords
        assert names, title
        assert all(keep.match(n) or n in central for n in names), (title, names)
        assert "$device" in expr or "$version" in expr, f"{title}: not filtered by the fleet's variables"


def test_fleet_alertmanager_example_is_current_and_valid():
    rendered = alertmanager.render(alertmanager.EXAMPLE_URL, template=alertmanager.FLEET_TEMPLATE)
    assert open(alertmanager.FLEET_EXAMPLE, encoding="utf-8").read() == rendered
    result = tool("amtool", "check-config", alertmanager.FLEET_EXAMPLE)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(rendered)
    inhibits = {(r["source_matchers"][0], tuple(r.get("equal", []))) for r in config["inhibit_rules"]}
    assert ('alertname="EdgechatCohortLeaking"', ("version",)) in inhibits
    assert ('alertname="EdgechatCentralStoreDown"', ()) in inhibits
    # per device: instance alone (127.0.0.1:8000 on every box) names no device
    assert all("device" in r["equal"] for r in config["inhibit_rules"] if "instance" in r.get("equal", []))


def test_expected_devices_file_is_valid_exposition():
    text = expected_devices_text([("shop-0042", "lyon"), ("shop-0007", "nantes")])
    result = subprocess.run([shutil.which("promtool") or "promtool", "check", "metrics"], input=text,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'edgechat_fleet_expected_device{device="shop-0007",site="nantes"} 1' in text
