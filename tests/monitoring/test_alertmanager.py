"""Alertmanager config: rendered with the deploy-time webhook URL, valid for amtool, routed and inhibited as designed."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time

import pytest
import requests
import yaml

from daemon.monitoring import alertmanager
from support.processes import track
from support.servers import free_port, wait_http

URL = "https://hooks.example.org/e/T0K3N?c=edge&x=a:%20b,{c}[d]#f'g"  # YAML-hostile characters


def tool(name: str, *alternatives: str) -> str:
    """Path of a Debian prometheus-alertmanager binary; missing fails the test (CI installs it)."""
    for candidate in (name, *alternatives):
        path = shutil.which(candidate)
        if path:
            return path
    pytest.fail(f"{name} not found on PATH: install Debian's `prometheus-alertmanager` package (.ci/run does)")


def amtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("amtool"), *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def clean_env(monkeypatch):
    """No webhook settings leak in from the caller's environment."""
    for name in (alertmanager.URL_ENV, alertmanager.URL_FILE_ENV, alertmanager.HEARTBEAT_URL_ENV):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def rendered(tmp_path) -> str:
    path = tmp_path / "alertmanager.yml"
    path.write_text(alertmanager.render("http://127.0.0.1:9/unused"), encoding="utf-8")
    return str(path)


def receiver_urls(path) -> dict[str, list[str]]:
    with open(path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    return {r["name"]: [c["url"] for c in r.get("webhook_configs", [])] for r in config["receivers"]}


def test_render_from_env(runner, clean_env, tmp_path):
    clean_env.setenv(alertmanager.URL_ENV, URL)
    out = tmp_path / "am.yml"
    code, stdout, err = runner("render-alertmanager", "--out", str(out))
    assert code == 0, err
    urls = receiver_urls(out)
    assert {name: urls[name] for name in alertmanager.WEBHOOK_RECEIVERS} == \
        {name: [URL] for name in alertmanager.WEBHOOK_RECEIVERS}
    assert urls["heartbeat"] == [] and urls["null"] == []
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o640   # the URL may carry a token
    result = amtool("check-config", str(out))
    assert result.returncode == 0, result.stdout + result.stderr


def test_render_from_file_flag_and_file_env(runner, clean_env, tmp_path):
    url_file = tmp_path / "webhook-url"
    url_file.write_text("http://10.0.0.5:9095/hook\n", encoding="utf-8")
    code, stdout, err = runner("render-alertmanager", "--webhook-url-file", str(url_file))
    assert code == 0, err
    assert yaml.safe_load(stdout)["receivers"][0]["webhook_configs"][0]["url"] == "http://10.0.0.5:9095/hook"
    clean_env.setenv(alertmanager.URL_FILE_ENV, str(url_file))
    clean_env.setenv(alertmanager.HEARTBEAT_URL_ENV, "https://hc-ping.example/abc")
    out = tmp_path / "am.yml"
    code, _, err = runner("render-alertmanager", "--out", str(out))
    assert code == 0, err
    urls = receiver_urls(out)
    assert urls["webhook-critical"] == ["http://10.0.0.5:9095/hook"]
    assert urls["heartbeat"] == ["https://hc-ping.example/abc"]
    result = amtool("check-config", str(out))
    assert result.returncode == 0, result.stdout + result.stderr


def test_flag_wins_over_env(runner, clean_env):
    clean_env.setenv(alertmanager.URL_ENV, "http://from-env/hook")
    code, stdout, err = runner("render-alertmanager", "--webhook-url", "http://from-flag/hook")
    assert code == 0, err
    assert "http://from-flag/hook" in stdout and "from-env" not in stdout


@pytest.mark.parametrize("args, message", [
    ((), alertmanager.URL_ENV),                                   # nothing given at all
    (("--webhook-url", "ftp://host/x"), "not an http(s) URL"),
    (("--webhook-url", "http://host/a b"), "not an http(s) URL"),
    (("--webhook-url-file", "/nonexistent/url"), "cannot read the webhook URL file"),
])
def test_missing_or_bad_url_is_a_clear_error(runner, clean_env, tmp_path, args, message):
    out = tmp_path / "am.yml"
    code, stdout, err = runner("render-alertmanager", *args, "--out", str(out))
    assert code == 2
    assert message in err and stdout == ""
    assert not out.exists()


def test_empty_url_file_is_an_error(clean_env, tmp_path):
    empty = tmp_path / "url"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(alertmanager.WebhookURLError, match="is empty"):
        alertmanager.resolve_url(url_file=str(empty))


def test_committed_example_is_current_and_valid():
    with open(alertmanager.EXAMPLE, encoding="utf-8") as handle:
        assert handle.read() == alertmanager.render(alertmanager.EXAMPLE_URL), \
            "deploy/alertmanager/alertmanager.example.yml is stale: re-render it"
    result = amtool("check-config", alertmanager.EXAMPLE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_route_tree_shape(rendered):
    with open(rendered, encoding="utf-8") as handle:
        route = yaml.safe_load(handle)["route"]
    assert route["group_by"] == ["alertname", "instance"]
    assert {k: route[k] for k in ("group_wait", "group_interval", "repeat_interval")} == \
        {"group_wait": "30s", "group_interval": "5m", "repeat_interval": "4h"}


@pytest.mark.parametrize("labels, receiver", [
    ({"alertname": "EdgechatMemoryNearLimit", "severity": "critical", "instance": "127.0.0.1:8000"}, "webhook-critical"),
    ({"alertname": "EdgechatMemoryLeakSuspected", "severity": "warning", "instance": "127.0.0.1:8000"}, "webhook-warning"),
    ({"alertname": "EdgechatHistoryLimitDisabled", "severity": "info", "instance": "127.0.0.1:8000"}, "webhook-info"),
    ({"alertname": "EdgechatHeartbeat", "severity": "none"}, "heartbeat"),
    ({"alertname": "EdgechatInfoInhibitor", "severity": "none", "instance": "127.0.0.1:8000"}, "null"),
    ({"alertname": "SomethingNew", "severity": "page"}, "webhook-warning"),   # unclassified still notifies
])
def test_amtool_routes(rendered, labels, receiver):
    pairs = [f"{k}={v}" for k, v in labels.items()]
    result = amtool("config", "routes", "test", f"--config.file={rendered}", f"--verify.receivers={receiver}", *pairs)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == receiver


@pytest.mark.e2e
def test_inhibition_in_a_real_alertmanager(tmp_path, rendered):
    """Critical inhibits warning/info of the same alert and instance; EdgechatInfoInhibitor mutes lone info alerts."""
    binary = tool("prometheus-alertmanager", "alertmanager")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "alertmanager.log", "wb")
    proc = track(subprocess.Popen([binary, f"--config.file={rendered}", f"--storage.path={tmp_path / 'data'}",
                                   f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
                                  stdout=log, stderr=subprocess.STDOUT))
    try:
        wait_http(f"{base}/-/ready", timeout=30, proc=proc)
        alerts = {
            "crit": {"alertname": "EdgechatMemoryNearLimit", "severity": "critical", "instance": "a"},
            "warn": {"alertname": "EdgechatMemoryNearLimit", "severity": "warning", "instance": "a"},
            "other_alert": {"alertname": "EdgechatMemoryLeakSuspected", "severity": "warning", "instance": "a"},
            "other_instance": {"alertname": "EdgechatMemoryNearLimit", "severity": "warning", "instance": "b"},
            "inhibitor": {"alertname": "EdgechatInfoInhibitor", "severity": "none", "instance": "c"},
            "lone_info": {"alertname": "EdgechatRestarted", "severity": "info", "instance": "c"},
            "info_with_context": {"alertname": "EdgechatRestarted", "severity": "info", "instance": "d"},
            "its_warning": {"alertname": "EdgechatRestarted", "severity": "warning", "instance": "d"},
            "free_info": {"alertname": "EdgechatHistoryLimitDisabled", "severity": "info", "instance": "e"},
        }
        posted = requests.post(f"{base}/api/v2/alerts", timeout=10, json=[
            {"labels": {**labels, "job": "edgechat", "case": case}, "annotations": {"summary": case}}
            for case, labels in alerts.items()])
        assert posted.status_code == 200, posted.text
        expected = {"crit": "active", "warn": "suppressed", "other_alert": "active", "other_instance": "active",
                    "inhibitor": "active", "lone_info": "suppressed", "info_with_context": "suppressed",
                    "its_warning": "active", "free_info": "active"}
        deadline = time.monotonic() + 20   # the inhibitor picks new alerts up asynchronously
        while True:
            got = {a["labels"]["case"]: a["status"]["state"]
                   for a in requests.get(f"{base}/api/v2/alerts", timeout=10).json()}
            if got == expected or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert got == expected
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
