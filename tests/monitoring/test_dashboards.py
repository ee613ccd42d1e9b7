"""Lints the Grafana dashboards with dashboard-linter's rules and parses every query with a real Prometheus."""

import json
import os
import re
import shutil
import subprocess
import time

import pytest
import requests
import yaml

from daemon.monitoring import dashboards
from daemon.monitoring.grafana import DATASOURCE
from support import REPO_ROOT
from support.processes import track
from support.servers import free_port

ROOT = REPO_ROOT
DASHBOARD_DIR = ROOT / "grafana" / "dashboards"
PROVISIONING = ROOT / "grafana" / "provisioning"
DOC = ROOT / "docs" / "dashboards.md"
MOUNT_PATH = "/var/lib/grafana/dashboards/edgechat"

BOARDS = dashboards.dashboards()
PANELS = [(uid, p) for uid, d in BOARDS.items() for p in d["panels"] if p["type"] != "row"]
QUERIES = dashboards.panel_queries()
# Grafana unit ids (a subset of dashboard-linter's list, the ones a dashboard like ours could need)
VALID_UNITS = {"none", "short", "percent", "percentunit", "bytes", "decbytes", "bits", "Bps", "binBps", "s", "ms",
               "µs", "ns", "ops", "reqps", "rps", "cps", "wps", "iops", "dtdurations", "dateTimeAsIso", "bool"}
# The metric families docs/metrics.md makes the contract; each must be shown somewhere.
CONTRACT = {
    "edgechat_process_resident_memory_bytes", "edgechat_process_unique_memory_bytes",
    "edgechat_process_virtual_memory_bytes", "edgechat_process_open_fds", "edgechat_process_threads",
    "edgechat_process_cpu_seconds_total", "edgechat_process_start_time_seconds",
    "edgechat_host_memory_available_bytes", "edgechat_host_memory_total_bytes", "edgechat_memory_limit_bytes",
    "edgechat_service_memory_bytes", "edgechat_sessions", "edgechat_history_messages",
    "edgechat_history_messages_max", "edgechat_history_tokens_max", "edgechat_history_max_turns",
    "edgechat_turn_history_messages", "edgechat_turn_prompt_tokens", "edgechat_history_truncations_total",
    "edgechat_sessions_evicted_total", "edgechat_gc_collections_total", "edgechat_gc_collected_objects_total",
    "edgechat_gc_uncollectable_objects_total", "edgechat_gc_pause_seconds", "edgechat_gc_tracked_objects",
    "edgechat_turn_duration_seconds", "edgechat_time_to_first_token_seconds",
    "edgechat_time_per_output_token_seconds", "edgechat_queue_wait_seconds", "edgechat_prompt_tokens_total",
    "edgechat_completion_tokens_total", "edgechat_turns_total", "edgechat_generations_in_progress",
    "edgechat_queue_depth", "edgechat_http_requests_total", "edgechat_http_request_duration_seconds",
    "edgechat_requests_rejected_total", "edgechat_build_info", "edgechat_model_info", "edgechat_model_load_seconds",
    "edgechat_tracemalloc_traced_bytes", "edgechat_tracemalloc_peak_bytes",
}

_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2"}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_RANGED_CALL = re.compile(r"\b(rate|irate|increase)\(\s*[^\[]*?\[([^\]]*)\]")


def _selectors(expr):
    """Return (metric name, matchers or None) for every vector selector in a PromQL expression."""
    blocks = []

    def stash(match):
        blocks.append(_MATCHER.findall(match.group(0)))
        return f"{{#{len(blocks) - 1}}}"

    text = re.sub(r"\{[^{}]*\}", stash, expr)
    text = _GROUPING.sub(" ", re.sub(r"\[[^\]]*\]", " ", text))
    found = []
    for name, index, call in re.findall(r"(?<![\w.#])([A-Za-z_:][\w:]*)\s*(?:\{#(\d+)\})?\s*(\(?)", text):
        if not call and name not in _KEYWORDS:
            found.append((name, blocks[int(index)] if index else None))
    assert sum(m is not None for _, m in found) == len(blocks), f"selector without a metric name in {expr}"
    return found


def expr_violations(expr):
    """Return what in `expr` breaks the linter's target rules (job/instance, counters, rate interval)."""
    problems = []
    for name, matchers in _selectors(expr):
        if ":" in name:
            problems.append(f"{name}: recording rule (dashboards must work without the rules loaded)")
        for label in ("job", "instance"):
            if (label, "=~", f"${label}") not in (matchers or []):
                problems.append(f'{name}: no {label}=~"${label}" matcher')
        wrapped = rf"\b(?:rate|irate|increase)\(\s*{re.escape(name)}\{{[^{{}}]*\}}\["
        if name.endswith("_total") and len(re.findall(wrapped, expr)) != expr.count(name + "{"):
            problems.append(f"{name}: counter outside rate/increase")
    for fn, window in _RANGED_CALL.findall(_STRING.sub('""', expr)):
        if window != "$__rate_interval":
            problems.append(f"{fn} over [{window}] instead of $__rate_interval")
    return problems


def _variable(board, name):
    """Return the templating variable `name` of a dashboard, or None."""
    return next((v for v in board["templating"]["list"] if v["name"] == name), None)


def test_committed_json_matches_generator():
    rendered = dashboards.render()
    assert sorted(p.name for p in DASHBOARD_DIR.glob("*.json")) == sorted(rendered)
    for name, text in rendered.items():
        assert (DASHBOARD_DIR / name).read_text(encoding="utf-8") == text, \
            f"{name} is stale: run python -m daemon.monitoring.dashboards"
        assert json.loads(text)["uid"] == name.removesuffix(".json")


@pytest.mark.parametrize("uid", sorted(BOARDS))
def test_dashboard_settings(uid):
    board = BOARDS[uid]
    assert uid in {"edgechat-memory", "edgechat-turns"}
    assert board["editable"] is False
    assert board["schemaVersion"] >= 39
    assert "edgechat" in board["tags"]
    assert board["title"] and board["description"]
    titles = [p["title"] for p in board["panels"] if p["type"] != "row"]
    assert len(titles) == len(set(titles)), "panel titles must be unique (queries are keyed by them)"


@pytest.mark.parametrize("uid", sorted(BOARDS))
def test_links_to_every_other_dashboard(uid):
    urls = {link["url"] for link in BOARDS[uid]["links"] if link["keepTime"] and link["includeVars"]}
    assert urls == {f"/d/{other}" for other in BOARDS if other != uid}


@pytest.mark.parametrize("uid", sorted(BOARDS))
def test_one_datasource_variable(uid):
    sources = [v for v in BOARDS[uid]["templating"]["list"] if v["type"] == "datasource"]
    assert [(v["name"], v["query"], v["label"]) for v in sources] == [("datasource", "prometheus", "Data source")]


@pytest.mark.parametrize("uid", sorted(BOARDS))
@pytest.mark.parametrize("name", ["job", "instance"])
def test_job_and_instance_variables(uid, name):
    var = _variable(BOARDS[uid], name)
    assert var is not None, f"{uid} lacks the {name} variable"
    assert var["type"] == "query" and var["datasource"] == DATASOURCE
    assert var["refresh"] == 2, "must refresh on time range change"
    assert var["multi"] and var["includeAll"] and var["allValue"] == ".+"
    assert var["label"] == name.title()
    assert re.fullmatch(rf"label_values\(edgechat_build_info(\{{[^}}]*\}})?, {name}\)", var["query"])


@pytest.mark.parametrize("uid,panel", PANELS, ids=[f"{u}:{p['title']}" for u, p in PANELS])
def test_panel_conventions(uid, panel):
    assert panel["title"].strip() and panel["description"].strip()
    assert panel["fieldConfig"]["defaults"].get("unit") in VALID_UNITS
    assert panel["datasource"] == DATASOURCE
    assert panel["targets"], "panel has no query"
    assert all(t["datasource"] == DATASOURCE for t in panel["targets"])
    refs = [t["refId"] for t in panel["targets"]]
    assert len(refs) == len(set(refs))


@pytest.mark.parametrize("uid,title,expr", QUERIES, ids=[f"{u}:{t}:{i}" for i, (u, t, _) in enumerate(QUERIES)])
def test_query_follows_lint_rules(uid, title, expr):
    assert expr_violations(expr) == []


@pytest.mark.parametrize("expr", [
    "edgechat_sessions",
    'edgechat_sessions{job=~"$job"}',
    'rate(edgechat_turns_total{job=~"$job", instance=~"$instance"}[5m])',
    'edgechat_turns_total{job=~"$job", instance=~"$instance"}',
    'instance:edgechat_memory_usage:ratio{job=~"$job", instance=~"$instance"}',
    'sum by (instance) (edgechat_sessions{job="x", instance=~"$instance"})',
])
def test_lint_rules_reject_bad_queries(expr):
    assert expr_violations(expr), f"lint accepted {expr}"


def test_every_contract_metric_is_shown():
    assert CONTRACT - dashboards.metric_families_used() == set()


def test_empty_when_healthy_names_real_panels():
    assert dashboards.EMPTY_WHEN_HEALTHY <= {title for _, title, _ in QUERIES}


def test_datasource_provisioning():
    config = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    assert config["apiVersion"] == 1
    [source] = config["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy" and source["isDefault"] is True
    assert source["url"] == "${PROMETHEUS_URL}"


def test_dashboard_provisioning_points_at_the_dashboards():
    text = (PROVISIONING / "dashboards" / "edgechat.yml").read_text()
    [provider] = yaml.safe_load(text)["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == MOUNT_PATH
    assert f"grafana/dashboards:{MOUNT_PATH}" in text, "the comment must show the volume mount"


def test_doc_covers_every_panel_and_the_setup():
    doc = DOC.read_text(encoding="utf-8")
    missing = sorted({title for _, title, _ in QUERIES if title.removeprefix(dashboards.ANNOTATION_PREFIX) not in doc})
    assert missing == []
    assert MOUNT_PATH in doc and "PROMETHEUS_URL" in doc


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory):
    """Start a real, empty Prometheus on a free local port; stop it at the end, even on failure."""
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("prometheus is not installed (.ci/run installs Debian's prometheus)")
        pytest.skip("prometheus is not installed")
    workdir = tmp_path_factory.mktemp("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 1m\nscrape_configs: []\n")
    url = f"http://127.0.0.1:{free_port()}"
    with open(workdir / "prometheus.log", "wb") as log:
        proc = track(subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
                                       f"--web.listen-address={url.removeprefix('http://')}"],
                                      stdout=log, stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (workdir / "prometheus.log").read_text()
            try:
                if requests.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:  # not listening yet
                pass
            assert time.monotonic() < deadline, "prometheus never became ready"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _substitute(expr):
    """Replace Grafana's variables the way Grafana would before sending a query."""
    for var, value in (("$job", ".*"), ("$instance", ".*"), ("$__rate_interval", "1m"),
                       ("$__range", "1h"), ("$__interval", "1m")):
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def _query(url, expr):
    """Return Prometheus' JSON answer to an instant query."""
    return requests.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()


@pytest.mark.e2e
def test_prometheus_rejects_invalid_promql(prometheus):
    answer = _query(prometheus, 'rate(edgechat_turns_total{job=~".*"}[1m]')
    assert answer["status"] == "error" and answer["errorType"] == "bad_data"


@pytest.mark.e2e
@pytest.mark.parametrize("uid,title,expr", QUERIES, ids=[f"{u}:{t}:{i}" for i, (u, t, _) in enumerate(QUERIES)])
def test_query_parses_in_prometheus(prometheus, uid, title, expr):
    answer = _query(prometheus, _substitute(expr))
    assert answer["status"] == "success", answer


@pytest.mark.e2e
@pytest.mark.parametrize("uid", sorted(BOARDS))
def test_variable_queries_run_in_prometheus(prometheus, uid):
    for name in ("job", "instance"):
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", _variable(BOARDS[uid], name)["query"])
        selector, label = _substitute(match.group(1)), match.group(2)
        answer = requests.get(f"{prometheus}/api/v1/label/{label}/values", params={"match[]": selector},
                              timeout=10).json()
        assert answer["status"] == "success", answer
