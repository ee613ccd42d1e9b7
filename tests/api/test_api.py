"""HTTP API through the Flask test client: shapes, trimming, leak mode, auth and every bad input."""
from __future__ import annotations

import json
import threading

import pytest

from daemon.services import get_services

USER = [{"role": "user", "content": "Say something about memory."}]


def sse_events(resp) -> list:
    """Decode a server-sent-event body into JSON objects (and the final '[DONE]')."""
    out = []
    for block in resp.get_data(as_text=True).split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def assert_error(resp, status: int, code: str | None = None):
    """The OpenAI error shape, with no traceback in it."""
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and "Traceback" not in body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


def new_session(client, **body) -> str:
    resp = client.post("/v1/sessions", json=body)
    assert resp.status_code == 201
    return resp.get_json()["id"]


# ---------------------------------------------------------------- stateless chat completions


def test_chat_completion_shape(client, app):
    resp = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 8,
                                                     "temperature": 0})
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert 0 < usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert body["model"] == get_services(app).engine.model_id


def test_chat_completion_greedy_is_deterministic(client):
    body = {"messages": USER, "max_tokens": 10, "temperature": 0}
    first = client.post("/v1/chat/completions", json=body).get_json()
    second = client.post("/v1/chat/completions", json=body).get_json()
    assert first["choices"][0]["message"] == second["choices"][0]["message"]


def test_chat_completion_stream(app_factory):
    client = app_factory(min_new_tokens=6).test_client()
    resp = client.post("/v1/chat/completions", json={
        "messages": USER, "max_tokens": 6, "stream": True,
        "stream_options": {"include_usage": True}})
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    events = sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 6


def test_models_health_ready(client, app):
    assert client.get("/healthz").get_json()["status"] == "ok"
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["ready"] is True
    assert "leak_mode" not in ready.get_json()
    decode = ready.get_json()["decode"]  # how decode runs: the compiled one-call step on this test machine
    assert decode["step"] == "one-call" and decode["isa"] and decode["huge_pages_mb"] >= 0
    data = client.get("/v1/models").get_json()["data"]
    assert [m["id"] for m in data] == [get_services(app).engine.model_id]


def test_readyz_shows_leak_mode(app_factory):
    body = app_factory(leak_mode="history").test_client().get("/readyz").get_json()
    assert body["leak_mode"] == "history"


BAD_COMPLETIONS = [
    ({"messages": "hi"}, 400, "invalid_type"),
    ({}, 400, "missing_field"),
    ({"messages": []}, 400, "invalid_value"),
    ({"messages": ["hi"]}, 400, "invalid_type"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value"),
    ({"messages": [{"role": "user", "content": 42}]}, 400, "invalid_type"),
    ({"messages": [{"role": "user"}]}, 400, "missing_field"),
    ({"messages": USER, "temperature": "hot"}, 400, "invalid_type"),
    ({"messages": USER, "temperature": 2.5}, 400, "invalid_value"),
    ({"messages": USER, "top_p": 0}, 400, "invalid_value"),
    ({"messages": USER, "max_tokens": 0}, 400, "invalid_value"),
    ({"messages": USER, "max_tokens": "8"}, 400, "invalid_type"),
    ({"messages": USER, "max_tokens": 10_000}, 400, "invalid_value"),
    ({"messages": USER, "max_completion_tokens": 10_000}, 400, "invalid_value"),
    ({"messages": USER, "seed": -1}, 400, "invalid_value"),
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_type"),
    ({"messages": USER, "stream": "yes"}, 400, "invalid_type"),
    ({"messages": USER, "n": 2}, 400, "unsupported_parameter"),
    ({"messages": USER, "stream_options": {"include_usage": True}}, 400, "invalid_value"),
    ({"messages": USER, "model": "gpt-4"}, 404, "model_not_found"),
    ({"messages": USER, "model": 7}, 400, "invalid_type"),
]


@pytest.mark.parametrize("body,status,code", BAD_COMPLETIONS)
def test_chat_completion_bad_input(client, body, status, code):
    assert_error(client.post("/v1/chat/completions", json=body), status, code)


@pytest.mark.parametrize("data,content_type,status,code", [
    ("{not json", "application/json", 400, "invalid_json"),
    ("[1, 2]", "application/json", 400, "invalid_json"),
    ('{"messages": []}', "text/plain", 415, "unsupported_media_type"),
])
def test_malformed_bodies(client, data, content_type, status, code):
    for path in ("/v1/chat/completions", "/v1/sessions"):
        assert_error(client.post(path, data=data, content_type=content_type), status, code)


def test_body_too_large(app_factory):
    client = app_factory(max_body_bytes=512).test_client()
    big = {"messages": [{"role": "user", "content": "x" * 2000}]}
    err = assert_error(client.post("/v1/chat/completions", json=big), 413, "request_too_large")
    assert "max_body_bytes" in err["message"]


def test_context_length_exceeded(client):
    huge = " ".join(["memory"] * 40_000)
    resp = client.post("/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": huge}], "max_tokens": 4})
    assert_error(resp, 400, "context_length_exceeded")


def test_unknown_route_and_method_are_json(client):
    assert_error(client.get("/v1/nope"), 404, "not_found")
    assert_error(client.put("/v1/chat/completions", json={}), 405, "method_not_allowed")


def test_unexpected_error_is_500_with_request_id(app, client, monkeypatch):
    engine = get_services(app).engine

    def boom(messages):
        raise RuntimeError("secret internal detail")
    monkeypatch.setattr(engine, "count_tokens", boom)
    resp = client.post("/v1/chat/completions", json={"messages": USER},
                       headers={"X-Request-Id": "req-123"})
    err = assert_error(resp, 500, "internal_error")
    assert "req-123" in err["message"] and "secret" not in err["message"]
    assert resp.headers["X-Request-Id"] == "req-123"


# ---------------------------------------------------------------- sessions


def test_session_lifecycle(client):
    resp = client.post("/v1/sessions", json={"system": "You are terse."})
    assert resp.status_code == 201
    created = resp.get_json()
    assert set(created) == {"id", "created"} and len(created["id"]) >= 22
    sid = created["id"]
    turn = client.post(f"/v1/sessions/{sid}/messages",
                       json={"content": "Hello there", "max_tokens": 5, "temperature": 0})
    assert turn.status_code == 200
    body = turn.get_json()
    assert set(body) == {"id", "turn", "message", "finish_reason", "usage", "history"}
    assert body["id"] == sid and body["turn"] == 1
    assert body["message"]["role"] == "assistant"
    assert body["history"]["messages"] == 2 and body["history"]["truncated"] == 0
    assert body["history"]["tokens"] > 0
    shown = client.get(f"/v1/sessions/{sid}").get_json()
    assert {"id", "created", "last_active", "turns", "messages", "tokens",
            "truncations"} <= set(shown)
    assert shown["turns"] == 1 and shown["truncations"] == 0
    assert shown["messages"] == [{"role": "user", "content": "Hello there"},
                                 body["message"]]
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    assert_error(client.get(f"/v1/sessions/{sid}"), 404, "session_not_found")
    assert_error(client.delete(f"/v1/sessions/{sid}"), 404, "session_not_found")


def test_session_stream(app_factory):
    client = app_factory(min_new_tokens=4).test_client()
    sid = new_session(client)
    resp = client.post(f"/v1/sessions/{sid}/messages",
                       json={"content": "Stream please", "max_tokens": 4, "stream": True})
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    events = sse_events(resp)
    assert events[-1] == "[DONE]"
    deltas = [e["delta"] for e in events[:-2]]
    summary = events[-2]
    assert "message" not in summary and summary["turn"] == 1
    assert summary["finish_reason"] == "length" and summary["usage"]["completion_tokens"] == 4
    stored = client.get(f"/v1/sessions/{sid}").get_json()["messages"]
    assert stored[-1] == {"role": "assistant", "content": "".join(deltas)}


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_session_deleted_while_its_turn_streams(app_factory, tmp_path, caplog, store):
    url = "memory" if store == "memory" else f"sqlite:///{tmp_path / 'sessions.db'}"
    client = app_factory(min_new_tokens=4, session_store=url).test_client()
    sid = new_session(client)
    resp = client.post(f"/v1/sessions/{sid}/messages",
                       json={"content": "Stream please", "max_tokens": 4, "stream": True})
    chunks = resp.response  # the body, read lazily: the turn commits after its last token
    first = next(iter(chunks))
    assert first.startswith(b"data: {")
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    with caplog.at_level("INFO", logger="edgechat.api"):
        rest = b"".join(chunks).decode()
    events = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith("data: {")]
    assert events[-1]["error"]["code"] == "session_not_found", events[-1]
    assert "[DONE]" not in rest
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    assert_error(client.get(f"/v1/sessions/{sid}"), 404, "session_not_found")  # nothing came back
    rejected = client.get("/metrics").get_data(as_text=True)
    assert 'edgechat_requests_rejected_total{reason="session_gone"} 1.0' in rejected


def test_history_trimmed_by_turns(app_factory):
    client = app_factory(max_history_turns=2, history_trim_to=1.0).test_client()  # a sliding window
    sid = new_session(client, system="sys")
    truncated = []
    for i in range(5):
        body = client.post(f"/v1/sessions/{sid}/messages",
                           json={"content": f"turn {i}", "max_tokens": 2}).get_json()
        assert body["history"]["messages"] <= 4
        truncated.append(body["history"]["truncated"])
    assert sum(truncated) == 6  # turns 3, 4, 5 each dropped one old turn (2 messages)
    shown = client.get(f"/v1/sessions/{sid}").get_json()
    assert [m["content"] for m in shown["messages"] if m["role"] == "user"] == ["turn 3", "turn 4"]
    assert shown["system"] == "sys" and shown["turns"] == 5 and shown["truncations"] == 6


def test_history_trimmed_by_tokens(app_factory):
    client = app_factory(max_history_turns=0, max_history_tokens=160,
                         max_new_tokens=8).test_client()
    sid = new_session(client)
    for i in range(12):
        body = client.post(f"/v1/sessions/{sid}/messages",
                           json={"content": f"this is a rather long message number {i}",
                                 "max_tokens": 2}).get_json()
        assert body["usage"]["prompt_tokens"] <= 160
        assert body["history"]["tokens"] <= 160
    assert client.get(f"/v1/sessions/{sid}").get_json()["truncations"] > 0


def test_500_turns_stay_bounded(app_factory):
    client = app_factory(max_history_turns=5).test_client()
    sid = new_session(client)
    for i in range(500):
        body = client.post(f"/v1/sessions/{sid}/messages",
                           json={"content": f"n{i}", "max_tokens": 1}).get_json()
        assert body["history"]["messages"] <= 10
    assert client.get(f"/v1/sessions/{sid}").get_json()["turns"] == 500


def test_leak_mode_history_grows_two_messages_per_turn(app_factory):
    client = app_factory(max_history_turns=5, leak_mode="history").test_client()
    sid = new_session(client)
    for i in range(1, 121):
        body = client.post(f"/v1/sessions/{sid}/messages",
                           json={"content": f"n{i}", "max_tokens": 1}).get_json()
        assert body["history"]["messages"] == 2 * i and body["history"]["truncated"] == 0


SESSION_BAD = [
    ({}, 400, "missing_field"),
    ({"content": ""}, 400, "invalid_value"),
    ({"content": 5}, 400, "invalid_type"),
    ({"content": "hi", "temperature": -1}, 400, "invalid_value"),
    ({"content": "hi", "max_tokens": 100_000}, 400, "invalid_value"),
    ({"content": "hi", "stream": 1}, 400, "invalid_type"),
    ({"content": "hi", "role": "system"}, 400, "unknown_field"),
    ({"content": " ".join(["memory"] * 40_000)}, 400, "context_length_exceeded"),
]


@pytest.mark.parametrize("body,status,code", SESSION_BAD)
def test_session_bad_input_changes_nothing(client, body, status, code):
    sid = new_session(client)
    client.post(f"/v1/sessions/{sid}/messages", json={"content": "first", "max_tokens": 2})
    before = client.get(f"/v1/sessions/{sid}").get_json()
    assert_error(client.post(f"/v1/sessions/{sid}/messages", json=body), status, code)
    assert client.get(f"/v1/sessions/{sid}").get_json() == before


def test_session_bad_create(client):
    assert_error(client.post("/v1/sessions", json={"system": 3}), 400, "invalid_type")
    assert_error(client.post("/v1/sessions", json={"sistem": "x"}), 400, "unknown_field")


def test_unknown_session(client):
    assert_error(client.post("/v1/sessions/nope/messages", json={"content": "hi"}), 404,
                 "session_not_found")


def test_concurrent_turns_on_one_session(app_factory):
    app = app_factory(max_history_turns=0)
    sid = new_session(app.test_client())
    errors = []

    def talk(n: int) -> None:
        client = app.test_client()
        for i in range(4):
            resp = client.post(f"/v1/sessions/{sid}/messages",
                               json={"content": f"t{n}-{i}", "max_tokens": 2})
            if resp.status_code != 200:
                errors.append(resp.get_json())
    threads = [threading.Thread(target=talk, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    messages = app.test_client().get(f"/v1/sessions/{sid}").get_json()["messages"]
    assert len(messages) == 24
    assert [m["role"] for m in messages] == ["user", "assistant"] * 12
    users = sorted(m["content"] for m in messages if m["role"] == "user")
    assert users == sorted(f"t{n}-{i}" for n in range(3) for i in range(4))


# ---------------------------------------------------------------- API keys


@pytest.fixture
def keyed(app_factory):
    """A client on an app that requires API keys k1 or k2."""
    return app_factory(api_keys=("k1", "k2")).test_client()


@pytest.mark.parametrize("headers,code", [
    ({}, "missing_api_key"),
    ({"Authorization": "Bearer nope"}, "invalid_api_key"),
    ({"Authorization": "Basic k1"}, "missing_api_key"),
])
def test_api_keys_required(keyed, headers, code):
    assert_error(keyed.post("/v1/chat/completions", json={"messages": USER}, headers=headers),
                 401, code)
    assert_error(keyed.post("/v1/sessions", json={}, headers=headers), 401, code)
    assert_error(keyed.get("/v1/models", headers=headers), 401, code)


def test_sessions_belong_to_their_key(keyed):
    k1, k2 = {"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}
    sid = keyed.post("/v1/sessions", json={}, headers=k1).get_json()["id"]
    assert keyed.get(f"/v1/sessions/{sid}", headers=k1).status_code == 200
    assert_error(keyed.get(f"/v1/sessions/{sid}", headers=k2), 404, "session_not_found")
    assert_error(keyed.post(f"/v1/sessions/{sid}/messages", json={"content": "hi"}, headers=k2),
                 404, "session_not_found")
    assert_error(keyed.delete(f"/v1/sessions/{sid}", headers=k2), 404, "session_not_found")
    assert keyed.get(f"/v1/sessions/{sid}", headers=k1).status_code == 200
    assert keyed.get("/healthz").status_code == 200  # probes stay open
