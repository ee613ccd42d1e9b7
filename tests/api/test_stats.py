"""GET /v1/stats (the page's side panel) and GET / (the page, local assets only), via the Flask test client."""
from __future__ import annotations

import json
import os
import re

import psutil
import torch

from daemon.services import get_services
from daemon.telemetry import process
from daemon.api.stats import RecentTurns, history_limit
from support import REPO_ROOT

torch.set_num_threads(1)

URL = re.compile(r"(?i)\b(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}")  # absolute or protocol-relative
ASSET = re.compile(r'(?:src|href)="([^"]+)"')


def turn(client, sid: str, content: str = "hello", *, stream: bool = False, headers=None):
    """Take one turn; a streamed one is read to the end and its summary event returned."""
    resp = client.post(f"/v1/sessions/{sid}/messages", json={"content": content, "stream": stream},
                       headers=headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    if not stream:
        return resp.get_json()
    events = [line[6:] for line in resp.get_data(as_text=True).splitlines() if line.startswith("data: ")]
    resp.close()  # as a WSGI server would: the body's close is where a streamed turn ends
    assert events[-1] == "[DONE]"
    return json.loads(events[-2])


def new_session(client, headers=None) -> str:
    resp = client.post("/v1/sessions", json={}, headers=headers)
    assert resp.status_code == 201
    return resp.get_json()["id"]


def test_shape_without_session(client):
    resp = client.get("/v1/stats")
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    body = resp.get_json()
    assert set(body) == {"pid", "model", "dtype", "leak_mode", "queue_depth", "batch", "memory", "history"}
    assert body["pid"] == os.getpid()
    assert (body["model"], body["leak_mode"]) == ("builtin:tiny", "off")
    assert body["dtype"] in ("float32", "bfloat16")
    mem = body["memory"]
    assert set(mem) == {"rss_bytes", "limit_bytes", "limit_source", "service_bytes",
                        "host_available_bytes", "host_total_bytes"}
    # the worker's RSS as the sampler reads it for the gauge, within what this test allocated since
    rss_now = process.process_sample(psutil.Process()).rss_bytes
    assert 0 < mem["rss_bytes"] and abs(mem["rss_bytes"] - rss_now) < 64 << 20
    assert 0 < mem["service_bytes"] and 0 < mem["limit_bytes"] <= mem["host_total_bytes"]
    assert mem["limit_source"] in ("config", "cgroup", "host")
    assert body["history"] == {"max_turns": 5, "limit": 10, "sessions": 0, "messages_total": 0,
                               "messages_max": 0, "tokens_max": 0}


def test_memory_limit_is_the_configured_budget(app_factory):
    client = app_factory(memory_limit_bytes=3 << 30).test_client()
    mem = client.get("/v1/stats").get_json()["memory"]
    assert (mem["limit_bytes"], mem["limit_source"]) == (3 << 30, "config")


def test_numbers_move_after_turns(client):
    sid = new_session(client)
    before = client.get(f"/v1/stats?session={sid}").get_json()
    assert before["session"] == {"id": sid, "turns": 0, "messages": 0, "limit": 10,
                                 "over_limit": False, "tokens": 0, "truncations": 0,
                                 "trimmed": False, "recent_turns": []}
    assert before["history"]["sessions"] == 1

    first = turn(client, sid, stream=True)
    second = turn(client, sid, "and again")
    after = client.get(f"/v1/stats?session={sid}").get_json()
    s = after["session"]
    assert (s["turns"], s["messages"]) == (2, 4) == (second["turn"], second["history"]["messages"])
    assert s["tokens"] == second["history"]["tokens"] > first["history"]["tokens"] > 0
    assert [t["turn"] for t in s["recent_turns"]] == [1, 2]  # streamed and not, each once
    assert all(t["seconds"] > 0 for t in s["recent_turns"])
    assert after["history"]["messages_total"] == after["history"]["messages_max"] == 4
    assert after["history"]["tokens_max"] == s["tokens"]


def test_trimming_is_marked_and_history_stays_at_the_limit(app_factory):
    client = app_factory(max_history_turns=1).test_client()
    sid = new_session(client)
    turn(client, sid)
    assert client.get(f"/v1/stats?session={sid}").get_json()["session"]["trimmed"] is False
    turn(client, sid, "second")
    s = client.get(f"/v1/stats?session={sid}").get_json()["session"]
    assert (s["messages"], s["limit"], s["over_limit"]) == (2, 2, False)
    assert (s["truncations"], s["trimmed"]) == (2, True)


def test_leak_mode_history_goes_over_the_reported_limit(app_factory):
    client = app_factory(max_history_turns=1, leak_mode="history").test_client()
    sid = new_session(client)
    for n in range(3):
        turn(client, sid, f"turn {n}")
    body = client.get(f"/v1/stats?session={sid}").get_json()
    assert body["leak_mode"] == "history"
    s = body["session"]
    assert (s["messages"], s["limit"], s["over_limit"], s["trimmed"]) == (6, 2, True, False)


def test_unbounded_history_is_said_in_words(app_factory):
    client = app_factory(max_history_turns=0).test_client()
    sid = new_session(client)
    turn(client, sid)
    body = client.get(f"/v1/stats?session={sid}").get_json()
    assert body["history"]["limit"] == body["session"]["limit"] == "unbounded"
    assert body["session"]["over_limit"] is False


def test_unknown_session_is_404_in_the_error_shape(client):
    resp = client.get("/v1/stats?session=no-such-session")
    assert resp.status_code == 404
    assert resp.get_json() == {"error": {
        "message": "no session 'no-such-session' (unknown, expired, or not yours)",
        "type": "not_found_error", "param": "session", "code": "session_not_found"}}


def test_deleted_session_is_404_and_its_latencies_are_forgotten(app, client):
    sid = new_session(client)
    turn(client, sid)
    assert len(get_services(app).recent_turns) == 1
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    assert len(get_services(app).recent_turns) == 0
    assert client.get(f"/v1/stats?session={sid}").status_code == 404


def test_rejected_turn_records_no_latency(client):
    sid = new_session(client)
    resp = client.post(f"/v1/sessions/{sid}/messages", json={"content": ""})
    assert resp.status_code == 400
    assert client.get(f"/v1/stats?session={sid}").get_json()["session"]["recent_turns"] == []


def test_dropped_stream_records_no_latency(client):
    sid = new_session(client)
    resp = client.post(f"/v1/sessions/{sid}/messages", json={"content": "hi", "stream": True})
    next(resp.response)  # the first event, then the client goes away: nothing is committed
    resp.close()
    s = client.get(f"/v1/stats?session={sid}").get_json()["session"]
    assert (s["turns"], s["recent_turns"]) == (0, [])


def test_api_keys(app_factory):
    client = app_factory(api_keys=("k1", "k2")).test_client()
    assert client.get("/v1/stats").status_code == 401
    assert client.get("/v1/stats").get_json()["error"]["code"] == "missing_api_key"
    bad = client.get("/v1/stats", headers={"Authorization": "Bearer nope"})
    assert (bad.status_code, bad.get_json()["error"]["code"]) == (401, "invalid_api_key")
    k1, k2 = {"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}
    sid = new_session(client, k1)
    turn(client, sid, headers=k1)
    assert client.get(f"/v1/stats?session={sid}", headers=k1).get_json()["session"]["turns"] == 1
    assert client.get(f"/v1/stats?session={sid}", headers=k2).status_code == 404  # not yours
    assert client.get("/", ).status_code == 200  # the page itself is public: it asks for the key


def test_recent_turns_is_bounded():
    recent = RecentTurns(max_sessions=3, per_session=4)
    for n in range(10):
        for t in range(1, 8):
            recent.record(f"s{n}", t, 0.1 * t)
    assert len(recent) == 3  # least recently fed sessions evicted
    assert recent.recent("s0") == []
    assert [t for t, _ in recent.recent("s9")] == [4, 5, 6, 7]  # newest turns kept
    assert recent.record("s9", 7, 1.0) is False  # a turn is kept once
    recent.forget("s9")
    assert recent.recent("s9") == [] and len(recent) == 2


def test_history_limit_words():
    assert history_limit(5) == 10 and history_limit(0) == "unbounded"


def test_ring_cap_follows_max_sessions(app_factory):
    from daemon.api.stats import SESSIONS_CAP
    assert get_services(app_factory(max_sessions=7)).recent_turns.max_sessions == 7
    assert get_services(app_factory(max_sessions=0)).recent_turns.max_sessions == SESSIONS_CAP
    assert get_services(app_factory(max_sessions=10 * SESSIONS_CAP)).recent_turns.max_sessions == SESSIONS_CAP


# ---- the page ------------------------------------------------------------------------------

def test_page_is_served_with_a_same_origin_policy(client):
    resp = client.get("/")
    assert resp.status_code == 200 and resp.mimetype == "text/html"
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "connect-src 'self'" in csp
    html = resp.get_data(as_text=True)
    for needed in ('id="message"', 'id="system"', 'id="api-key"', 'id="new-chat"',
                   'id="history-count"', 'id="spark"', 'role="log"', 'aria-live="polite"'):
        assert needed in html


def test_page_and_assets_reference_only_the_daemon(client):
    html = client.get("/").get_data(as_text=True)
    assets = ASSET.findall(html)
    assert "static/app.js" in assets and "static/app.css" in assets
    assert all(not a.startswith(("http:", "https:", "//")) for a in assets), assets
    texts = {"/": html}
    for asset in assets:
        if asset.startswith("static/"):
            resp = client.get("/" + asset)
            assert resp.status_code == 200, asset
            texts[asset] = resp.get_data(as_text=True)
            resp.close()
    assert set(texts) == {"/", "static/app.js", "static/app.css"}
    for name, text in texts.items():
        assert not re.search(r"(?i)https?://", text), name
        assert not URL.search(text), name
        assert "@import" not in text and "url(" not in text, name


def test_every_input_has_a_label(client):
    html = client.get("/").get_data(as_text=True)
    ids = re.findall(r'<(?:textarea|input)[^>]*\bid="([^"]+)"', html)
    labels = set(re.findall(r'<label[^>]*\bfor="([^"]+)"', html))
    assert ids and set(ids) <= labels


def test_page_files_ship_in_the_package():
    import configparser
    cfg = configparser.ConfigParser()
    cfg.read(REPO_ROOT / "setup.cfg")
    assert "static/*" in cfg["options.package_data"]["daemon"]
    static = REPO_ROOT / "daemon" / "static"
    assert {"index.html", "app.js", "app.css"} <= set(os.listdir(static))
