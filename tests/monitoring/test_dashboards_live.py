"""Dashboards against real data: a real daemon scraped every second by a real Prometheus.

Every panel query must return data (except the ones listed as legitimately empty in a healthy run),
every metric family the daemon exports must be shown by a panel or used by a rule (or be listed
below with the reason it is not), and every metric docs/metrics.md documents must exist.
"""
from __future__ import annotations

import re
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from daemon.monitoring import dashboards, rules
from support.servers import Daemon, free_port
from support.stack import Monitoring
from support import REPO_ROOT

pytestmark = pytest.mark.e2e
ROOT = REPO_ROOT

# exported families that no panel or rule uses, each with its reason
NOT_SHOWN = {
    "edgechat_service_memory_charged_bytes":
        "raw cgroup usage incl. reclaimable page cache, for ad-hoc diagnosis; panels and alerts "
        "use edgechat_service_memory_bytes (the working set), the value that counts",
}
_SUFFIX = re.compile(r"_(bucket|sum|count|total|info)$")


def family(name: str) -> str:
    """A metric name reduced to its family (no _total/_bucket/_sum/_count/_info)."""
    return _SUFFIX.sub("", name)


@pytest.fixture(scope="module")
def live(tmp_path_factory, cache_dir):
    """A daemon (tracemalloc on, so its gauges exist) with traffic, scraped by Prometheus."""
    tmp = tmp_path_factory.mktemp("live")
    daemon = Daemon(tmp, cache_dir, "--tracemalloc", "--max-history-turns", "1")
    with daemon:
        target = daemon.url.removeprefix("http://")
        with Monitoring(tmp / "monitoring", [target], f"http://127.0.0.1:{free_port()}/hook",
                        time_scale=1.0) as mon:
            mon.wait_targets_up([target])
            sid = requests.post(daemon.url + "/v1/sessions", json={}).json()["id"]
            for n in range(3):  # the third turn trims (max_history_turns 1)
                assert requests.post(f"{daemon.url}/v1/sessions/{sid}/messages", json={
                    "content": f"hello {n}", "max_tokens": 4}).status_code == 200
            assert requests.post(daemon.url + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            ).status_code == 200
            requests.get(daemon.url + "/v1/sessions/unknown")  # one 404 for the error panels
            time.sleep(6)  # several scrapes after the traffic
            yield daemon, mon


def substitute(expr: str) -> str:
    """Replace Grafana's variables as Grafana would, with windows that fit this short run."""
    for var, value in (("$job", ".*"), ("$instance", ".*"), ("$__rate_interval", "20s"),
                       ("$__range", "5m"), ("$__interval", "1s")):
        expr = expr.replace(var, value)
    assert "$" not in expr, expr
    return expr


QUERIES = dashboards.panel_queries()


@pytest.mark.parametrize("uid,title,expr", QUERIES,
                         ids=[f"{u}:{t}:{i}" for i, (u, t, _) in enumerate(QUERIES)])
def test_every_panel_returns_data(live, uid, title, expr):
    _, mon = live
    answer = requests.get(mon.prom_url + "/api/v1/query", params={"query": substitute(expr)},
                          timeout=10).json()
    assert answer["status"] == "success", answer
    if title not in dashboards.EMPTY_WHEN_HEALTHY:
        assert answer["data"]["result"], f"{uid} / {title}: no data for {substitute(expr)}"


def scraped_families(url: str) -> set[str]:
    text = requests.get(url + "/metrics", timeout=10).text
    return {family(f.name) for f in text_string_to_metric_families(text)
            if f.name.startswith("edgechat_")}


def test_every_exported_family_is_shown_or_alerted(live):
    daemon, _ = live
    rule_text = "\n".join(rules.render().values())
    used = {family(m) for m in dashboards.metric_families_used()}
    used |= {family(m) for m in re.findall(r"\bedgechat_[a-z0-9_]+", rule_text)}
    scraped = scraped_families(daemon.url)
    unexplained = sorted(scraped - used - {family(n) for n in NOT_SHOWN})
    assert unexplained == [], "exported but neither on a dashboard, in a rule, nor in NOT_SHOWN"
    stale = sorted(family(n) for n in NOT_SHOWN if family(n) not in scraped or family(n) in used)
    assert stale == [], "NOT_SHOWN lists families that are no longer exported or are now used"


def test_every_documented_metric_is_exported(live):
    daemon, _ = live
    documented = set(re.findall(r"^\| `(edgechat_[a-z0-9_]+)`",
                                (ROOT / "docs" / "metrics.md").read_text(), re.M))
    assert len(documented) > 30
    missing = sorted(n for n in documented if family(n) not in scraped_families(daemon.url))
    assert missing == []
