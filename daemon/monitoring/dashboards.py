"""Renders edgechat's Grafana dashboards from Python, so the committed JSON stays linted and reviewable."""

import json
import re
import sys
from pathlib import Path

from daemon.monitoring import dashboard_fleet, dashboard_memory, dashboard_turns

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "grafana" / "dashboards"
ANNOTATION_PREFIX = "annotation: "

# Panels (and annotations) that legitimately return no data in a short healthy run, each with its reason.
EMPTY_WHEN_HEALTHY = frozenset({
    "Firing edgechat alerts",  # no alert fires when healthy (and none without the rules loaded)
    ANNOTATION_PREFIX + "Firing edgechat alerts",  # same series, drawn as annotations
    "Python heap traced by tracemalloc",  # tracemalloc is off by default
    "Latency creep (p95 turn 11+ / turn 1)",  # needs conversations that reached turn 11
    "History truncations and session evictions",  # nothing trimmed or evicted until a limit is hit
    "Rejected requests by reason",  # nothing rejected while the queue has room
    "Waits to join the batch",  # nobody waits while the batch has room
    "HTTP errors by status",  # no 4xx/5xx while every request succeeds
})

_BUILDERS = {dashboard_memory.UID: dashboard_memory.build, dashboard_turns.UID: dashboard_turns.build}
_HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")


def dashboards():
    """Return {uid: dashboard dict} for every device dashboard (a device's own Prometheus)."""
    return {uid: build() for uid, build in _BUILDERS.items()}


def render():
    """Return {file name: JSON text} (sorted keys, indent 2, trailing newline) for every dashboard: the
    device dashboards and the fleet one (which reads the central store, docs/fleet.md)."""
    boards = {**dashboards(), dashboard_fleet.UID: dashboard_fleet.build()}
    return {f"{uid}.json": json.dumps(d, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
            for uid, d in boards.items()}


def write(directory=DEFAULT_DIR):
    """Write every rendered dashboard into `directory` and return the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in render().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        paths.append(path)
    return paths


def panel_queries():
    """Return (dashboard uid, panel title, expr) for every target and annotation, as Grafana will send them."""
    queries = []
    for uid, d in dashboards().items():
        for panel in d["panels"]:
            queries += [(uid, panel["title"], t["expr"]) for t in panel.get("targets", [])]
        queries += [(uid, ANNOTATION_PREFIX + a["name"], a["expr"]) for a in d["annotations"]["list"] if "expr" in a]
    return queries


def metric_families_used():
    """Return the edgechat metric families the dashboards query (histogram suffixes stripped, `_total` kept)."""
    names = set()
    for _, _, expr in panel_queries():
        names.update(_HISTOGRAM_SUFFIX.sub("", m) for m in re.findall(r"\bedgechat_[a-z0-9_]+", expr))
    return names


if __name__ == "__main__":
    for written in write(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_DIR):
        print(written)
