"""The Redis session store killed mid-turn, paused (SIGSTOP) past the client's timeout, and restarted
empty (no persistence: its sessions are reported gone, 404) or from its append-only file (nothing lost)."""
from __future__ import annotations

import signal
import threading

import pytest
import requests

from support import chat, redis_server
from support.servers import Daemon

pytestmark = pytest.mark.e2e
MID = 2000
RECOVERY_S = 30.0
MODES = ["plain", "aof"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, cache_dir):
    """Per mode a redis-server and a daemon on it, started side by side."""
    redis_server.require()
    made = {}
    for mode in MODES:
        root = tmp_path_factory.mktemp(f"redis-{mode}")
        server = redis_server.start(root, persist=mode == "aof")
        made[mode] = {"root": root, "redis": server, "daemon": Daemon(
            root, cache_dir, "--session-store", server.url, "--min-new-tokens", str(MID),
            "--max-new-tokens", str(MID))}
    threads = [threading.Thread(target=p["daemon"].start) for p in made.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    yield made
    for p in made.values():
        p["daemon"].stop()
        p["redis"].stop()


def ready(url: str) -> tuple[int, dict]:
    resp = requests.get(url + "/readyz", timeout=30)
    return resp.status_code, resp.json()


def test_redis_paused_past_its_timeout(pairs):
    p = pairs["plain"]
    url, server = p["daemon"].url, p["redis"]
    sid = chat.new_session(url)
    assert chat.turn(url, sid, "before the pause").status == 200
    server.proc.send_signal(signal.SIGSTOP)
    try:
        paused = chat.turn(url, sid, "while Redis is paused")  # socket_timeout 5 s, not a hang
        assert paused.status == 503 and paused.error["code"] == "store_unavailable", paused.body
        assert paused.headers["Retry-After"]
        status, body = ready(url)
        assert status == 503 and body["checks"]["session_store"] is False
        assert chat.metric(url, "edgechat_session_store_errors_total", operation="acquire") >= 1
    finally:
        server.proc.send_signal(signal.SIGCONT)
    chat.eventually(lambda: ready(url)[0] == 200, RECOVERY_S, "ready once Redis runs again")
    assert chat.turn(url, sid, "after the pause").status == 200
    users = [m["content"] for m in chat.history(url, sid) if m["role"] == "user"]
    assert users == ["before the pause", "after the pause"]


@pytest.mark.parametrize("mode", MODES)
def test_redis_killed_mid_turn_and_restarted(pairs, mode):
    p = pairs[mode]
    url, server = p["daemon"].url, p["redis"]
    sid = chat.new_session(url)
    assert chat.turn(url, sid, "before the kill").status == 200
    mid = chat.turn(url, sid, "Redis dies during this turn", stream=True, max_tokens=MID,
                    on_first_event=lambda: server.proc.send_signal(signal.SIGKILL))
    server.proc.wait(10)
    assert mid.status == 200 and not mid.done and mid.error["code"] == "store_unavailable", mid.events[-1:]
    refused = chat.turn(url, sid, "while Redis is down")
    assert refused.status == 503 and refused.headers["Retry-After"]
    assert ready(url)[0] == 503  # reads fail too: not ready, steadily
    p["redis"] = server = redis_server.start(p["root"], port=server.port, persist=mode == "aof")
    _, took = chat.eventually(lambda: ready(url)[0] == 200, RECOVERY_S, "ready once Redis is back")
    stored = chat.history(url, sid)
    if mode == "plain":  # restarted empty: the session is gone, and said so
        assert stored is None
        gone = chat.turn(url, sid, "after the restart")
        assert gone.status == 404 and gone.error["code"] == "session_not_found"
        assert chat.turn(url, chat.new_session(url), "a new session").status == 200
    else:  # the append-only file kept every turn that got its 200
        assert [m["content"] for m in stored if m["role"] == "user"] == ["before the kill"]
        assert chat.turn(url, sid, "after the restart").status == 200
    print(f"[redis {mode}] ready {took:.1f} s after the restart")
