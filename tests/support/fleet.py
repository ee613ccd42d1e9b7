"""One simulated fleet for a test module: the fleet, its webhook sink, a driver for the leaking daemon,
and the waiting and notification counting the fleet tests share."""
from __future__ import annotations

import time
from typing import Callable

import requests

from daemon.cli.alertsink import AlertSink
from daemon.cli.fleet import missing_binaries
from daemon.fleet.topology import Fleet, default_layout

MISSING = missing_binaries()
TIME_SCALE = 0.05      # nominal 30 s scrapes at a 1.5 s interval; 10 min `for` -> 30 s
INTERVAL_S = 1.5
LEAKER = "real-1"      # leak_mode=history


def wait_until(check: Callable[[], object], timeout: float, what: str, every: float = 1.0):
    """Poll check() until it returns something truthy; fail with `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(every)


class FleetRun:
    """The fleet of one test module, started once, with what the tests observed along the way."""

    def __init__(self, workdir, cache_dir: str):
        self.sink = AlertSink().start()
        self.layout = default_layout(real=3, sims=50, time_scale=TIME_SCALE)
        self.fleet = Fleet(str(workdir), self.layout, self.sink.url, TIME_SCALE, INTERVAL_S,
                           tls=True, cache_dir=cache_dir)
        self.marks: dict[str, float] = {}   # wall-clock moments the tests share (store stopped, ...)
        self._session: str | None = None
        self.turns = 0

    def start(self) -> "FleetRun":
        try:
            self.fleet.start()
        except BaseException:
            self.sink.stop()
            raise
        return self

    def stop(self) -> None:
        self.fleet.stop()
        self.sink.stop()

    def station(self, device: str):
        return self.fleet.station_of(device)

    def leak_turn(self) -> dict:
        """One turn on the history-leaking daemon, in one long conversation."""
        url = self.station(LEAKER).url
        if self._session is None:
            resp = requests.post(f"{url}/v1/sessions", json={"system": "You are terse."}, timeout=30)
            assert resp.status_code == 201, resp.text
            self._session = resp.json()["id"]
        resp = requests.post(f"{url}/v1/sessions/{self._session}/messages",
                             json={"content": f"Tell me something, number {self.turns}.", "max_tokens": 8},
                             timeout=60)
        assert resp.status_code == 200, resp.text
        self.turns += 1
        return resp.json()

    def notifications(self, alertname: str, status: str = "firing", **labels) -> list[dict]:
        """Webhook notifications (not alerts) carrying at least one matching alert."""
        def matches(alert: dict) -> bool:
            return (alert["labels"].get("alertname") == alertname and alert["status"] == status
                    and all(alert["labels"].get(k) == v for k, v in labels.items()))
        return [n for n in list(self.sink.notifications) if any(matches(a) for a in n.get("alerts", []))]

    def local_alerts(self, device: str, alertname: str, state: str = "firing") -> list[dict]:
        """Alerts of that name on the device's own Prometheus (device label: external or target)."""
        station = self.station(device)
        expr = f'ALERTS{{alertname="{alertname}", alertstate="{state}"}}'
        found = self.fleet.device_query(station, expr)
        external = getattr(station, "spec", None)
        return [r for r in found if (external is not None or r["metric"].get("device") == device)]
