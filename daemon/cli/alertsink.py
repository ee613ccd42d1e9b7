"""`edgechat alert-sink`: a tiny Alertmanager webhook receiver that prints notifications (local stack, tests)."""
from __future__ import annotations

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


def describe(notification: dict) -> list[str]:
    """One line per alert of an Alertmanager webhook notification."""
    lines = []
    for alert in notification.get("alerts", []):
        labels, notes = alert.get("labels", {}), alert.get("annotations", {})
        lines.append(f"[{notification.get('receiver', '?')}] {alert.get('status', '?').upper():8} "
                     f"{labels.get('alertname', '?')} severity={labels.get('severity', '?')} "
                     f"instance={labels.get('instance', '-')}: {notes.get('summary', '')}")
    return lines


class AlertSink:
    """An HTTP server in a thread that keeps every webhook notification it receives (JSON bodies)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 on_notification: Callable[[dict], None] | None = None):
        self.notifications: list[dict] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:  # not JSON: tell the sender, keep nothing
                    self.send_response(400)
                    self.end_headers()
                    return
                with sink._changed:
                    sink.notifications.append(body)
                    sink._changed.notify_all()
                if on_notification is not None:
                    on_notification(body)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:  # quiet: notifications are reported by the caller
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://{host}:{self.port}/alerts"
        self._thread = threading.Thread(target=self._server.serve_forever, name="alert-sink", daemon=True)

    def start(self) -> "AlertSink":
        """Start serving in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()

    def alerts(self) -> list[dict]:
        """Every alert of every notification so far, each with the receiver it came through."""
        with self._lock:
            return self._alerts_locked()

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float) -> dict | None:
        """Block until an alert satisfying predicate has arrived; returns it, or None on timeout."""
        with self._changed:
            found = self._changed.wait_for(
                lambda: next((a for a in self._alerts_locked() if predicate(a)), None), timeout)
        return found or None

    def _alerts_locked(self) -> list[dict]:
        return [dict(alert, receiver=n.get("receiver")) for n in self.notifications
                for alert in n.get("alerts", [])]

    def __enter__(self) -> "AlertSink":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def add_parsers(sub) -> None:
    """Register `alert-sink`."""
    p = sub.add_parser("alert-sink", help="print Alertmanager webhook notifications",
                       description="Listen for Alertmanager webhook notifications and print one line "
                                   "per alert (POST to /alerts or any path).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=9095, help="port to listen on (default: %(default)s)")
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    """Serve until Ctrl-C."""
    def show(notification: dict) -> None:
        for line in describe(notification):
            print(line, flush=True)
    sink = AlertSink(ns.host, ns.port, on_notification=show).start()
    print(f"alert sink listening on {sink.url}", file=sys.stderr, flush=True)
    try:
        threading.Event().wait()
    finally:
        sink.stop()
    return 0
