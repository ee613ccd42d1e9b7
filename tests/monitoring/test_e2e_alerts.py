"""End to end: a real history leak under gunicorn fires EdgechatHistoryUnbounded in a real Prometheus and
its notification reaches a webhook receiver through a real Alertmanager; a bounded daemon stays quiet.

Both daemons run side by side (one Prometheus scrapes both, every 1 s), so the bounded run is exactly
as long and as busy as the leaking one. The rules are the shipped ones with every window, `for` and
guard multiplied by TIME_SCALE; Alertmanager loads the shipped config unchanged except the webhook URL.
"""
from __future__ import annotations

import time

import pytest
import requests

from daemon.cli.alertsink import AlertSink
from daemon.monitoring.thresholds import Thresholds
from support.servers import Daemon
from support.stack import ALERTMANAGER, PROMETHEUS, Monitoring

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(PROMETHEUS is None or ALERTMANAGER is None,
                       reason="needs Debian's prometheus and prometheus-alertmanager"),
]

TIME_SCALE = 0.01       # 10 min `for` -> 6 s, 2 h growth span -> 72 s
# On builtin:tiny only EdgechatHistoryUnbounded can tell the two daemons apart: the memory rule needs
# usage above half the limit and the creep rule late turns above 1 s (unscaled guards), which a
# few-hundred-KB model never reaches. They are asserted quiet all the same, as the shipped rules.
LEAK_ALERTS = ("EdgechatHistoryUnbounded", "EdgechatMemoryLeakSuspected", "EdgechatTurnLatencyCreep")
SESSIONS = 2            # per daemon; turns alternate between them
FIRE_DEADLINE_S = 150   # from the first turn to the alert firing in Prometheus
NOTIFY_DEADLINE_S = 90  # from firing to the webhook (the shipped group_wait is 30 s)


class Driver:
    """Round-robin turns over a few sessions of one daemon."""

    def __init__(self, daemon: Daemon):
        self.url = daemon.url
        self.instance = f"127.0.0.1:{daemon.port}"
        self.sessions = [self._post("/v1/sessions", {"system": "You are terse."})["id"] for _ in range(SESSIONS)]
        self.turns = 0
        self.history_max = 0

    def _post(self, path: str, body: dict) -> dict:
        resp = requests.post(self.url + path, json=body, timeout=60)
        assert resp.status_code in (200, 201), resp.text
        return resp.json()

    def turn(self) -> None:
        """One short turn; remembers the longest history the daemon reported."""
        sid = self.sessions[self.turns % SESSIONS]
        answer = self._post(f"/v1/sessions/{sid}/messages",
                            {"content": f"Tell me something, number {self.turns}.", "max_tokens": 8})
        self.turns += 1
        self.history_max = max(self.history_max, answer["history"]["messages"])


def _matching(alerts: list[dict], name: str, instance: str) -> list[dict]:
    return [a for a in alerts if a["labels"].get("alertname") == name and a["labels"].get("instance") == instance]


@pytest.mark.timeout(480)
def test_history_leak_alert_reaches_receiver_and_bounded_daemon_stays_quiet(tmp_path, cache_dir):
    scaled = Thresholds().scaled(TIME_SCALE)
    serve = ("--max-new-tokens", "16", "--no-warmup")
    for name in ("leak", "bounded"):
        (tmp_path / name).mkdir()
    leak_d = Daemon(tmp_path / "leak", cache_dir, "--leak-mode", "history", *serve)
    bounded_d = Daemon(tmp_path / "bounded", cache_dir, *serve)
    sink = AlertSink().start()
    started: list = []
    monitoring = None
    try:
        for d in (leak_d, bounded_d):
            started.append(d.start())
        assert requests.get(leak_d.url + "/readyz", timeout=5).json().get("leak_mode") == "history"
        monitoring = Monitoring(tmp_path / "monitoring", [f"127.0.0.1:{leak_d.port}", f"127.0.0.1:{bounded_d.port}"],
                                sink.url, TIME_SCALE).start()
        leak, bounded = Driver(leak_d), Driver(bounded_d)
        monitoring.wait_targets_up([leak.instance, bounded.instance])

        # -- leak: drive turns until Prometheus fires EdgechatHistoryUnbounded for the leaking daemon
        t0 = time.monotonic()
        fired = []
        while not fired:
            assert time.monotonic() - t0 < FIRE_DEADLINE_S, (
                f"EdgechatHistoryUnbounded did not fire after {leak.turns} turns (longest history "
                f"{leak.history_max}); alerts: {monitoring.alerts()}\n{monitoring.prom.log_tail()}")
            leak.turn()
            bounded.turn()
            fired = [a for a in _matching(monitoring.alerts(), "EdgechatHistoryUnbounded", leak.instance)
                     if a["state"] == "firing"]
            time.sleep(0.3)
        assert fired[0]["labels"]["severity"] == "warning"
        # growth, not configuration: the leaking daemon still reports the configured limit of 5 turns
        assert not _matching(monitoring.alerts(), "EdgechatHistoryLimitDisabled", leak.instance)
        assert leak.history_max > 2 * 5 + 1

        # -- the notification reaches the receiver through Alertmanager's shipped routes
        def leak_notification(alert: dict) -> bool:
            return (alert["labels"].get("alertname") == "EdgechatHistoryUnbounded"
                    and alert["labels"].get("instance") == leak.instance and alert["status"] == "firing")
        deadline = time.monotonic() + NOTIFY_DEADLINE_S
        got = None
        while got is None and time.monotonic() < deadline:
            leak.turn()
            bounded.turn()
            got = sink.wait_for(leak_notification, timeout=1.0)
        assert got is not None, f"no notification within {NOTIFY_DEADLINE_S}s; sink got {sink.alerts()}"
        assert got["receiver"] == "webhook-warning"
        assert got["annotations"]["runbook_url"].endswith("#edgechathistoryunbounded")

        # -- bounded: a comparable run, at least as long as the growth rule looks back, fires no leak alert
        comparable = scaled.history_growth_span + scaled.history_unbounded_for + 5
        while time.monotonic() - t0 < comparable:
            bounded.turn()
            leak.turn()
            time.sleep(0.5)
        assert bounded.history_max <= 2 * 5, "the bounded daemon kept more than 5 turns"
        alerts = monitoring.alerts()
        noisy = [(a["labels"]["alertname"], a["state"]) for name in LEAK_ALERTS
                 for a in _matching(alerts, name, bounded.instance)]
        assert noisy == [], f"leak alerts on the bounded daemon: {noisy}"
        assert not [a for a in sink.alerts() if a["labels"].get("instance") == bounded.instance
                    and a["labels"].get("alertname") in LEAK_ALERTS]
        # the leaking daemon is still flagged, and every shipped rule evaluated without error
        assert _matching(alerts, "EdgechatHistoryUnbounded", leak.instance)
        errors = {k: v for k, v in monitoring.rule_health().items() if v.startswith("err")}
        assert errors == {}
    finally:
        if monitoring is not None:
            monitoring.stop()
        for d in started:
            d.stop()
        sink.stop()
