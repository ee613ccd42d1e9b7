"""`edgechat chat`: an interactive terminal client over the sessions API (imports no torch)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from typing import Iterator

HELP = "commands: /new (new conversation), /show (stored history), /quit"


class ChatClient:
    """A minimal HTTP client for the sessions API, streaming replies as server-sent events."""

    def __init__(self, url: str, key: str | None = None, timeout: float = 300.0):
        self.url, self.key, self.timeout = url.rstrip("/"), key, timeout

    def _request(self, method: str, path: str, body: dict | None = None):
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        return urllib.request.urlopen(req, timeout=self.timeout)  # noqa: S310 - user-given URL

    def create(self, system: str | None = None) -> str:
        """Start a session; returns its id."""
        with self._request("POST", "/v1/sessions", {"system": system} if system else {}) as r:
            return json.load(r)["id"]

    def show(self, session_id: str) -> dict:
        """The stored session."""
        with self._request("GET", f"/v1/sessions/{session_id}") as r:
            return json.load(r)

    def send(self, session_id: str, content: str, **params) -> Iterator[dict]:
        """Send one message; yields {"delta": str} events, then the turn summary."""
        body = {"content": content, "stream": True, **params}
        with self._request("POST", f"/v1/sessions/{session_id}/messages", body) as r:
            for raw in r:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    return
                yield json.loads(payload)


def error_message(exc: urllib.error.HTTPError) -> str:
    """The server's error message from an HTTP error, in plain words."""
    try:
        return f"{exc.code}: {json.load(exc)['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{exc.code}: {exc.reason}"


def add_parsers(sub) -> None:
    """Register `chat`."""
    p = sub.add_parser("chat", help="interactive chat with a running daemon")
    p.add_argument("--url", default=os.environ.get("EDGECHAT_URL", "http://127.0.0.1:8000"),
                   help="daemon base URL [env EDGECHAT_URL]")
    p.add_argument("--key", default=os.environ.get("EDGECHAT_API_KEY"),
                   help="API key [env EDGECHAT_API_KEY]")
    p.add_argument("--system", help="system prompt for the conversation")
    p.add_argument("--max-tokens", type=int, help="cap on reply tokens")
    p.set_defaults(func=run)


def run(ns: argparse.Namespace) -> int:
    """Read lines from stdin, stream the replies, print the history size after each turn."""
    client = ChatClient(ns.url, ns.key)
    params = {"max_tokens": ns.max_tokens} if ns.max_tokens else {}
    try:
        session = client.create(ns.system)
    except urllib.error.HTTPError as exc:
        print(f"edgechat chat: {error_message(exc)}", file=sys.stderr)
        return 1
    except urllib.error.URLError as exc:
        print(f"edgechat chat: cannot reach {ns.url}: {exc.reason}", file=sys.stderr)
        return 1
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"session {session[:8]}…  {HELP}")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/quit":
            return 0
        if line == "/new":
            session = client.create(ns.system)
            print(f"new session {session[:8]}…")
            continue
        if line == "/show":
            print(json.dumps(client.show(session), indent=2))
            continue
        try:
            print("bot> ", end="", flush=True)
            for event in client.send(session, line, **params):
                if "delta" in event:
                    print(event["delta"], end="", flush=True)
                elif "error" in event:
                    print(f"\n[error: {event['error']['message']}]")
                else:
                    h = event["history"]
                    print(f"\n[turn {event['turn']} · {event['usage']['completion_tokens']} tokens"
                          f" · history {h['messages']} messages / {h['tokens']} tokens"
                          f"{' · trimmed ' + str(h['truncated']) if h['truncated'] else ''}]")
        except urllib.error.HTTPError as exc:
            print(f"\n[{error_message(exc)}]")
        except urllib.error.URLError as exc:
            print(f"\n[cannot reach {ns.url}: {exc.reason}]")
            return 1
