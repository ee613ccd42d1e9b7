"""A client's view of a daemon under faults: turns over real HTTP with deadlines, SSE read to its end."""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import requests

DEADLINE_S = 60.0  # no request in the fault suite may take longer: a hang is a failure


@dataclass
class Reply:
    """What the client saw: status, headers, JSON body or SSE events, and how the body ended."""

    status: int
    headers: dict
    body: dict | None = None
    events: list = field(default_factory=list)
    done: bool = False          # the stream ended with data: [DONE]
    cut: str | None = None      # the connection closed mid-body (worker killed): the exception

    @property
    def error(self) -> dict | None:
        """The error object: the JSON body's, or the stream's final event's."""
        if self.body and "error" in self.body:
            return self.body["error"]
        if self.events and isinstance(self.events[-1], dict) and "error" in self.events[-1]:
            return self.events[-1]["error"]
        return None


def new_session(url: str) -> str:
    """POST /v1/sessions; the id."""
    resp = requests.post(url + "/v1/sessions", json={}, timeout=DEADLINE_S)
    assert resp.status_code == 201, resp.text
    return resp.json()["id"]


def turn(url: str, sid: str, content: str, *, stream: bool = False, max_tokens: int = 8,
         on_first_event=None) -> Reply:
    """One turn of session `sid`; on_first_event() runs once the first SSE event arrived."""
    body = {"content": content, "max_tokens": max_tokens, "stream": stream}
    try:
        resp = requests.post(f"{url}/v1/sessions/{sid}/messages", json=body, stream=stream,
                             timeout=DEADLINE_S)
    except requests.ConnectionError as exc:
        return Reply(0, {}, cut=repr(exc))
    reply = Reply(resp.status_code, dict(resp.headers))
    if not stream or not resp.headers.get("content-type", "").startswith("text/event-stream"):
        reply.body = resp.json()
        return reply
    try:
        for line in resp.iter_lines():
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                reply.done = True
                continue
            reply.events.append(json.loads(data))
            if on_first_event is not None and len(reply.events) == 1:
                on_first_event()
    except (requests.ConnectionError, requests.exceptions.ChunkedEncodingError) as exc:
        reply.cut = repr(exc)
    return reply


def history(url: str, sid: str) -> list[dict] | None:
    """The stored messages, or None when the session is gone (404)."""
    resp = requests.get(f"{url}/v1/sessions/{sid}", timeout=DEADLINE_S)
    if resp.status_code == 404:
        return None
    assert resp.status_code == 200, resp.text
    return resp.json()["messages"]


def metric(url: str, name: str, **labels) -> float | None:
    """One sample of /metrics (summed over pid labels), None when absent."""
    text = requests.get(url + "/metrics", timeout=DEADLINE_S).text
    total, seen = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total, seen = total + float(value), True
    return total if seen else None


class ReadyWatch:
    """Polls /readyz every `every` s on a thread and keeps every answer: flapping shows."""

    def __init__(self, url: str, every: float = 0.5):
        self.url, self.every = url, every
        self.seen: list[tuple[int, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                resp = requests.get(self.url + "/readyz", timeout=10)
                self.seen.append((resp.status_code, resp.json()))
            except requests.RequestException as exc:
                self.seen.append((0, {"error": repr(exc)}))
            self._stop.wait(self.every)

    def __enter__(self) -> "ReadyWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)

    def statuses(self) -> list[int]:
        """The HTTP statuses seen, in order."""
        return [status for status, _ in self.seen]


def eventually(predicate, timeout: float, what: str, every: float = 0.25):
    """predicate()'s first truthy value within timeout seconds (AssertionError naming `what`);
    returns it with the seconds it took."""
    start = time.monotonic()
    while True:
        value = predicate()
        if value:
            return value, time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(every)
