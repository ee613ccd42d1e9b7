"""Per-key limits (turns in flight, requests a minute), the metrics key and the bounded prompt count, in-process."""
from __future__ import annotations

import threading
import time

import pytest

from daemon.model import counting
from daemon.services import get_services

A = {"Authorization": "Bearer key-a"}
B = {"Authorization": "Bearer key-b"}
USER = [{"role": "user", "content": "hi"}]
LONG = dict(max_new_tokens=20_000, min_new_tokens=20_000, generation_timeout_s=300.0)


def stream(client, headers):
    return client.post("/v1/chat/completions", headers=headers, buffered=False,
                       json={"messages": USER, "stream": True})


def test_a_key_at_its_turn_limit_gets_429_and_another_key_is_served(app_factory):
    app = app_factory(api_keys=("key-a", "key-b"), max_turns_in_flight_per_key=1, queue_limit=4, **LONG)
    client, engine = app.test_client(), get_services(app).engine
    first = stream(client, A)
    assert first.status_code == 200
    other: dict = {}
    waiter = threading.Thread(target=lambda: other.update(resp=client.post(
        "/v1/chat/completions", headers=B, json={"messages": USER, "max_tokens": 2})))
    try:
        again = client.post("/v1/chat/completions", headers=A, json={"messages": USER, "max_tokens": 2})
        assert again.status_code == 429 and again.json["error"]["code"] == "too_many_in_flight"
        assert int(again.headers["Retry-After"]) >= 1
        waiter.start()  # key B still reaches the model: its turn joins the batch beside A's
        waiter.join(120)
        assert other["resp"].status_code == 200 and engine.in_progress() == 1  # A's still streams
    finally:
        first.close()
    # A's slot came back with the end of its generation
    assert client.post("/v1/chat/completions", headers=A,
                       json={"messages": USER, "max_tokens": 1}).status_code == 200


def test_the_default_turn_limit_is_half_the_queue_with_keys(config_factory):
    assert config_factory(api_keys=("k",), queue_limit=4, max_batch=4).turns_in_flight_per_key() == 4
    assert config_factory(api_keys=("k",), queue_limit=4, max_batch=1).turns_in_flight_per_key() == 3
    assert config_factory(queue_limit=4).turns_in_flight_per_key() == 0
    assert config_factory(api_keys=("k",), max_turns_in_flight_per_key=1).turns_in_flight_per_key() == 1


def test_requests_a_minute_per_key(app_factory):
    app = app_factory(api_keys=("key-a", "key-b"), max_requests_per_minute_per_key=3)
    client = app.test_client()
    for _ in range(3):
        assert client.get("/v1/models", headers=A).status_code == 200
    refused = client.get("/v1/models", headers=A)
    assert refused.status_code == 429 and refused.json["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["Retry-After"]) <= 20
    assert client.get("/v1/models", headers=B).status_code == 200
    assert 'edgechat_requests_rejected_total{reason="rate_limited"} 1.0' in client.get("/metrics").text


def test_metrics_key_guards_the_metrics(app_factory):
    client = app_factory(metrics_key="scrape-me").test_client()
    refused = client.get("/metrics")
    assert refused.status_code == 401 and refused.json["error"]["code"] == "invalid_metrics_key"
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = client.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
    assert ok.status_code == 200 and "edgechat_requests_rejected_total" in ok.text


def test_metrics_key_and_metrics_port_cannot_be_combined(config_factory):
    with pytest.raises(ValueError, match="metrics_key"):
        config_factory(metrics_key="k", metrics_port=9100)


@pytest.mark.parametrize("route,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 450_000}], "max_tokens": 2}),
    ("/v1/sessions/{sid}/messages", {"content": "x " * 450_000, "max_tokens": 2}),
])
def test_an_oversized_prompt_is_refused_before_the_tokenizer_reads_it_all(app_factory, route, body):
    app = app_factory(max_body_bytes=2_000_000)
    client = app.test_client()
    sid = client.post("/v1/sessions", json={}).json["id"]
    resp = client.post(route.format(sid=sid), json=body)
    assert resp.status_code == 400 and resp.json["error"]["code"] == "context_length_exceeded"
    engine = get_services(app).engine
    seen = engine.last_count
    assert not seen.exact and seen.tokens > engine.context_length
    # "x " is a token a character for this tokenizer: the first prefix alone is over the context
    assert seen.chars_read <= counting.first_prefix(engine.context_length) < 900_000 / 20
    assert client.get(f"/v1/sessions/{sid}").json["turns"] == 0


def test_a_prompt_that_fits_is_counted_exactly(app):
    engine = get_services(app).engine
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "word " * (engine.context_length // 2)}]
    assert engine.count_tokens(messages, limit=engine.context_length) == len(engine.encode(messages))
    assert engine.last_count.exact
