"""Real Prometheus + Alertmanager for end-to-end tests, started the way daemon.cli.stack starts them."""
from __future__ import annotations

import os
import time

import requests

from daemon.cli.stack import alertmanager_proc, binary, prometheus_config, prometheus_proc
from daemon.monitoring import alertmanager, rules
from support.processes import track
from support.servers import free_port

PROMETHEUS = binary("prometheus")
ALERTMANAGER = binary("prometheus-alertmanager", "alertmanager")


class Monitoring:
    """Prometheus scraping `targets` with the rules rendered at `time_scale`, alerting a real
    Alertmanager that loads the shipped config rendered with `webhook_url`; all on loopback."""

    def __init__(self, workdir, targets: list[str], webhook_url: str, time_scale: float,
                 interval_s: float = 1.0):
        self.workdir = str(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.am_port, self.prom_port = free_port(), free_port()
        self.am_url = f"http://127.0.0.1:{self.am_port}"
        self.prom_url = f"http://127.0.0.1:{self.prom_port}"
        rule_files = rules.write(os.path.join(self.workdir, "rules"), time_scale)
        self.am = alertmanager_proc(self.workdir, alertmanager.render(webhook_url), self.am_port)
        self.prom = prometheus_proc(self.workdir, prometheus_config(
            targets, f"127.0.0.1:{self.am_port}", rule_files, interval_s, interval_s), self.prom_port)

    def start(self) -> "Monitoring":
        """Start Alertmanager, then Prometheus; wait until both say ready. Starts once (raises after)."""
        if self.am.popen is not None:
            raise RuntimeError("this Monitoring was started already")
        try:
            track(self.am.start().popen)
            self.am.wait_http(self.am_url + "/-/ready", 60)
            track(self.prom.start().popen)
            self.prom.wait_http(self.prom_url + "/-/ready", 60)
        except Exception:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop both, Prometheus first (it would otherwise keep sending to a gone Alertmanager)."""
        self.prom.stop()
        self.am.stop()

    def alerts(self) -> list[dict]:
        """Prometheus's pending and firing alerts."""
        resp = requests.get(self.prom_url + "/api/v1/alerts", timeout=10)
        resp.raise_for_status()
        return resp.json()["data"]["alerts"]

    def rule_health(self) -> dict[str, str]:
        """Every rule's name -> health ("ok", "err", "unknown"), with lastError appended when err."""
        resp = requests.get(self.prom_url + "/api/v1/rules", timeout=10)
        resp.raise_for_status()
        out = {}
        for group in resp.json()["data"]["groups"]:
            for rule in group["rules"]:
                key = f"{group['name']}/{rule['name']}"
                out[key] = rule["health"] + (f": {rule.get('lastError')}" if rule["health"] == "err" else "")
        return out

    def targets_up(self) -> dict[str, bool]:
        """Scrape target instance -> last scrape succeeded."""
        resp = requests.get(self.prom_url + "/api/v1/targets", timeout=10)
        resp.raise_for_status()
        return {t["labels"]["instance"]: t["health"] == "up" for t in resp.json()["data"]["activeTargets"]}

    def wait_targets_up(self, instances: list[str], timeout: float = 60.0) -> None:
        """Block until every instance has been scraped successfully."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            up = self.targets_up()
            if all(up.get(i) for i in instances):
                return
            time.sleep(0.5)
        raise TimeoutError(f"targets not up within {timeout}s: {self.targets_up()}\n{self.prom.log_tail()}")

    def __enter__(self) -> "Monitoring":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
