"""Requests that share the batch each get what they get alone: streaming, stop strings, JSON mode, a forced
tool call, logprobs, seeded sampling, a session's turn; and a stream cancelled mid-way leaves the others running."""
from __future__ import annotations

import json
import threading
import time

import pytest

from daemon.services import get_services

# each prompt is prefilled whole (alone or beside others): the same prompt path, the same tokens
SETTINGS = dict(prefill_chunk=512, max_new_tokens=96, min_new_tokens=0)
REQUESTS = {
    "greedy": {"messages": [{"role": "user", "content": "Tell me about the sea."}], "max_tokens": 24,
               "temperature": 0},
    "stop": {"messages": [{"role": "user", "content": "Write a line about autumn."}], "max_tokens": 24,
             "temperature": 0, "stop": ["e"]},
    "json": {"messages": [{"role": "user", "content": "Describe a person."}], "max_tokens": 40,
             "temperature": 1.0, "seed": 3, "response_format": {"type": "json_object"}},
    "tools": {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "max_tokens": 96, "temperature": 0.8,
              "seed": 3, "tool_choice": "required", "tools": [{"type": "function", "function": {
                  "name": "get_weather", "parameters": {"type": "object", "required": ["city"], "properties": {
                      "city": {"type": "string", "maxLength": 10}}}}}]},
    "logprobs": {"messages": [{"role": "user", "content": "Name a prime number."}], "max_tokens": 8,
                 "temperature": 0, "logprobs": True, "top_logprobs": 2},
    "seeded": {"messages": [{"role": "user", "content": "What is seventeen times three?"}], "max_tokens": 16,
               "temperature": 1.0, "seed": 42, "presence_penalty": 0.5},
    "streamed": {"messages": [{"role": "user", "content": "Describe a quiet park."}], "max_tokens": 16,
                 "temperature": 0, "stream": True},
}


def answer(client, name: str) -> dict:
    """What a client keeps of one reply: text, finish reason, logprobs, tool calls less their random ids
    (streams: deltas joined)."""
    body = REQUESTS[name]
    resp = client.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    if body.get("stream"):
        chunks = [json.loads(line[6:]) for line in resp.get_data(as_text=True).splitlines()
                  if line.startswith("data: {")]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        return {"text": text, "finish": next(c["choices"][0]["finish_reason"] for c in reversed(chunks)
                                             if c["choices"] and c["choices"][0]["finish_reason"])}
    choice = resp.get_json()["choices"][0]
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in choice["message"].get("tool_calls") or []]
    return {"text": choice["message"]["content"], "finish": choice["finish_reason"], "logprobs": choice.get("logprobs"),
            "calls": calls}


@pytest.fixture
def batch_app(app_factory):
    return app_factory(**SETTINGS)


def test_each_request_in_a_batch_gets_what_it_gets_alone(batch_app):
    client = batch_app.test_client()
    alone = {name: answer(client, name) for name in REQUESTS}
    assert alone["stop"]["finish"] == "stop" and "e" not in alone["stop"]["text"]
    json.loads(alone["json"]["text"])  # JSON mode: a document
    assert alone["tools"]["finish"] == "tool_calls" and alone["tools"]["calls"][0][0] == "get_weather"
    json.loads(alone["tools"]["calls"][0][1])  # a forced call: its arguments parse
    assert len(alone["logprobs"]["logprobs"]["content"]) >= 1
    together, errors = {}, []
    engine = get_services(batch_app).engine
    seen = []

    def run(name):
        try:
            together[name] = answer(batch_app.test_client(), name)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def watch():
        while len(together) + len(errors) < len(REQUESTS):
            seen.append(engine.in_progress())
    threads = [threading.Thread(target=run, args=(name,)) for name in REQUESTS]
    watcher = threading.Thread(target=watch)
    for t in threads:
        t.start()
    watcher.start()
    for t in (*threads, watcher):
        t.join(120)
    assert not errors and together == alone
    assert max(seen) >= 2  # they really ran side by side


def test_a_stream_that_goes_away_leaves_the_others_running(app_factory):
    app = app_factory(max_new_tokens=20000, min_new_tokens=20000, generation_timeout_s=300.0)
    client, engine = app.test_client(), get_services(app).engine
    body = {"messages": [{"role": "user", "content": "Tell me about the sea."}], "temperature": 0}
    first = client.post("/v1/chat/completions", json={**body, "max_tokens": 20000, "stream": True}, buffered=False)
    other = client.post("/v1/chat/completions", json={**body, "max_tokens": 24})
    assert other.status_code == 200 and other.get_json()["usage"]["completion_tokens"] == 24
    assert engine.in_progress() == 1  # the long one still streams beside it
    first.close()  # its client goes away: its generation stops, nothing else does
    deadline = time.monotonic() + 10
    while engine.in_progress() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.in_progress() == 0
    again = client.post("/v1/chat/completions", json={**body, "max_tokens": 4})
    assert again.status_code == 200 and again.get_json()["usage"]["completion_tokens"] == 4
