"""Alerts sent to a real Alertmanager as their senders would, in compressed time, and the pages
counted at its webhook (the fleet stage of bench.alert_quality, bench/fleet_replay.py)."""
from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import os
import re
import time
import urllib.request

import numpy as np
import yaml

from daemon.cli.alertsink import AlertSink
from daemon.fleet.procs import Proc, binary, free_port
from daemon.monitoring import alertmanager
from daemon.monitoring.promql import duration

RESEND = 60                 # Prometheus's and vmalert's resend delay (1 min)
RETENTION = 15 * 60         # Prometheus keeps sending a resolved alert this long
AM_DURATIONS = ("group_wait", "group_interval", "repeat_interval")
UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclasses.dataclass
class Alert:
    """One alert as its sender reports it (seconds from the fleet's start)."""

    labels: dict
    fired: float
    resolved: float | None
    interval: float            # the sender's evaluation interval


def iso(t: float) -> str:
    """RFC 3339, as Alertmanager's API and vmalert's flags take times."""
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def post(url: str, body: bytes) -> None:
    """POST a JSON body; raise on any HTTP error."""
    req = urllib.request.Request(url, body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:  # noqa: S310 - loopback
        resp.read()


def _seconds(text: str) -> float:
    return sum(int(n) * UNITS[u] for n, u in re.findall(r"(\d+)(ms|s|m|h|d)", text))


def scaled_am_config(text: str, compress: float) -> str:
    """An Alertmanager config with every duration shrunk `compress` times."""
    config = yaml.safe_load(text)
    config["global"]["resolve_timeout"] = duration(_seconds(config["global"]["resolve_timeout"]) / compress)

    def walk(route: dict) -> None:
        for key in AM_DURATIONS:
            if key in route:
                route[key] = duration(max(_seconds(route[key]) / compress, 0.001))
        for child in route.get("routes", []):
            walk(child)
    walk(config["route"])
    return yaml.safe_dump(config, sort_keys=False)


class Pager:
    """One real Alertmanager with the fleet's config (compressed) and a webhook sink."""

    def __init__(self, workdir: str, compress: float):
        self.sink = AlertSink().start()
        self.port, self.compress = free_port(), compress
        self.url = f"http://127.0.0.1:{self.port}"
        os.makedirs(workdir, exist_ok=True)
        config = os.path.join(workdir, "alertmanager.yml")
        text = alertmanager.render(self.sink.url, template=alertmanager.FLEET_TEMPLATE)
        with open(config, "w", encoding="utf-8") as handle:
            handle.write(scaled_am_config(text, compress))
        self.proc = Proc("alertmanager", [
            binary("prometheus-alertmanager", "alertmanager"), f"--config.file={config}",
            f"--storage.path={os.path.join(workdir, 'am-data')}", f"--web.listen-address=127.0.0.1:{self.port}",
            "--cluster.listen-address=", "--log.level=warn"], os.path.join(workdir, "alertmanager.log"),
            ports=(self.port,))

    def run(self, alerts: list[Alert], window: float) -> list[dict]:
        """Send `alerts` over `window` fleet seconds as their senders would; the notifications."""
        self.proc.start()
        try:
            self.proc.wait_http(f"{self.url}/-/ready", 60)
            wall0 = time.time() + 1
            wall = lambda t: wall0 + t / self.compress  # noqa: E731
            for tick in np.arange(0, window + 10 * RESEND, RESEND):
                batch = []
                for a in alerts:
                    if a.fired > tick or (a.resolved is not None and tick - a.resolved > RETENTION):
                        continue
                    if a.resolved is None or a.resolved > tick:
                        ends = wall(tick + 4 * max(a.interval, RESEND))
                    else:
                        ends = wall(a.resolved)
                    batch.append({"labels": a.labels, "annotations": {"summary": a.labels["alertname"]},
                                  "startsAt": iso(wall(a.fired)), "endsAt": iso(ends)})
                delay = wall(tick) - time.time()
                if delay > 0:
                    time.sleep(delay)
                if batch:
                    post(f"{self.url}/api/v2/alerts", json.dumps(batch).encode())
            time.sleep(2)
            return list(self.sink.notifications)
        finally:
            self.proc.stop()
            self.sink.stop()


def pages(notifications: list[dict], healthy_devices: set) -> dict[str, tuple[int, int]]:
    """Firing notifications of the critical receiver by what raised them: (pages, notifications). A
    page is an alert that had not fired before (labels and start); the rest repeat it (reminders at
    repeat_interval, or the group's notice that another alert joined)."""
    count, seen = collections.Counter(), collections.defaultdict(set)
    for n in notifications:
        if n.get("receiver") != "webhook-critical" or n.get("status") != "firing":
            continue
        for a in n["alerts"]:
            if a["status"] != "firing":
                continue
            labels = a["labels"]
            if labels["alertname"] == "EdgechatCohortLeaking":
                kind = f"cohort {labels.get('version')}"
            elif labels.get("device") in healthy_devices:
                kind = "healthy devices"
            else:
                kind = f"leaking devices ({labels.get('version')})"
            count[kind] += 1
            seen[kind].add((tuple(sorted(labels.items())), a["startsAt"]))
    return {kind: (len(seen[kind]), count[kind]) for kind in sorted(count)}
