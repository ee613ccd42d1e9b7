"""A real gunicorn (`edgechat serve`) on builtin:tiny: openai SDK, disconnects, full queue, SIGTERM."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading

import pytest
import requests

from support.metrics import metric_value
from support.servers import Daemon, free_port, wait_for

pytestmark = pytest.mark.e2e

LONG = 20_000  # tokens: long enough that a test always acts while the generation still runs
SUMMED = dict(combine=sum, default=0.0)  # a sample's value summed over the series that carry more labels


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, cache_dir):
    """One server for the module: EOS suppressed so replies run exactly max_tokens long; one generation at
    a time, so a second one queues."""
    d = Daemon(tmp_path_factory.mktemp("srv"), cache_dir,
               "--max-new-tokens", str(LONG), "--min-new-tokens", str(LONG), "--max-batch", "1",
               "--queue-limit", "1", "--queue-timeout-s", "120", "--worker-threads", "4",
               "--generation-timeout-s", "300")
    with d:
        yield d


def open_stream(url: str, max_tokens: int):
    """Start a streamed completion and return (response, line iterator) after its first content."""
    resp = requests.post(url + "/v1/chat/completions", stream=True, timeout=120, json={
        "messages": [{"role": "user", "content": "Tell me a long story"}],
        "max_tokens": max_tokens, "stream": True})
    assert resp.status_code == 200
    lines = resp.iter_lines()
    for line in lines:
        if line.startswith(b"data: ") and b'"content":"' in line and b'"content":""' not in line:
            return resp, lines
    raise AssertionError("stream ended before any content")


def test_openai_sdk_plain_and_streamed(daemon):
    from openai import OpenAI
    client = OpenAI(base_url=daemon.url + "/v1", api_key="unused")
    model = client.models.list().data[0].id
    assert model == "builtin:tiny"
    reply = client.chat.completions.create(
        model=model, max_tokens=8, messages=[{"role": "user", "content": "Hello"}])
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 8 and reply.choices[0].message.content
    pieces, usage = [], None
    for chunk in client.chat.completions.create(
            model=model, max_tokens=6, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "Hello"}]):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) and usage.completion_tokens == 6


def test_sessions_over_http(daemon):
    sid = requests.post(daemon.url + "/v1/sessions", json={"system": "terse"}).json()["id"]
    for n in range(1, 4):
        body = requests.post(f"{daemon.url}/v1/sessions/{sid}/messages",
                             json={"content": f"hi {n}", "max_tokens": 3}).json()
        assert body["turn"] == n and body["history"]["messages"] == 2 * n
    with requests.post(f"{daemon.url}/v1/sessions/{sid}/messages", stream=True,
                       json={"content": "stream", "max_tokens": 3, "stream": True}) as resp:
        events = [json.loads(line[6:]) if line != b"data: [DONE]" else "[DONE]"
                  for line in resp.iter_lines() if line.startswith(b"data: ")]
    assert events[-1] == "[DONE]" and events[-2]["turn"] == 4
    assert requests.get(f"{daemon.url}/v1/sessions/{sid}").json()["turns"] == 4


def test_client_disconnect_stops_generation(daemon):
    cancelled = metric_value(daemon.url, "edgechat_turns_total", outcome="cancelled", **SUMMED)
    resp, _ = open_stream(daemon.url, LONG)
    resp.close()  # the client goes away after the first chunk
    wait_for(lambda: metric_value(daemon.url, "edgechat_turns_total", outcome="cancelled", **SUMMED)
             > cancelled, what="the cancelled turn to be counted")
    wait_for(lambda: metric_value(daemon.url, "edgechat_generations_in_progress", **SUMMED) == 0,
             what="the generation to stop")
    # the model is free again: a short request completes
    ok = requests.post(daemon.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "again"}], "max_tokens": 2})
    assert ok.status_code == 200


def test_full_queue_answers_503(daemon):
    holder, _ = open_stream(daemon.url, LONG)   # holds the model
    waiter_result = {}

    def waiter() -> None:
        waiter_result["resp"] = requests.post(daemon.url + "/v1/chat/completions", timeout=120,
                                              json={"messages": [{"role": "user", "content": "w"}],
                                                    "max_tokens": 2})
    t = threading.Thread(target=waiter)
    t.start()
    try:
        wait_for(lambda: requests.get(daemon.url + "/readyz").json()["queue_depth"] == 1,
                 what="the second request to queue")
        ready = requests.get(daemon.url + "/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["queue_not_full"] is False
        rejected = requests.post(daemon.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
        assert rejected.status_code == 503
        assert rejected.json()["error"]["code"] == "queue_full"
        assert int(rejected.headers["Retry-After"]) >= 1
        assert metric_value(daemon.url, "edgechat_requests_rejected_total", reason="queue_full", **SUMMED) >= 1
    finally:
        holder.close()
        t.join(120)
    assert waiter_result["resp"].status_code == 200


def test_sigterm_lets_the_turn_finish(tmp_path, cache_dir):
    d = Daemon(tmp_path, cache_dir, "--max-new-tokens", "3000", "--min-new-tokens", "3000",
               "--graceful-timeout-s", "120").start()
    try:
        resp, lines = open_stream(d.url, 3000)
        d.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith(b"data: ")]
        assert rest[-1] == b"data: [DONE]"
        finals = [json.loads(line[6:]) for line in rest[:-1]]
        assert finals[-1]["choices"][0]["finish_reason"] == "length"
        assert d.proc.wait(120) == 0
    finally:
        d.stop()


def test_unloadable_model_exits_nonzero_with_one_message(tmp_path, cache_dir):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "serve", "--model", str(broken), "--port", str(free_port()),
         "--cache-dir", cache_dir, "--metrics-dir", str(tmp_path / "m")],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0
    assert "model" in proc.stderr and "builtin:tiny" in proc.stderr


def test_chat_cli_streams_over_http(daemon):
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "chat", "--url", daemon.url, "--max-tokens", "5"],
        input="hello there\n/show\nsecond message\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "[turn 1 · 5 tokens · history 2 messages" in proc.stdout
    assert "[turn 2 · 5 tokens · history 4 messages" in proc.stdout
    assert '"content": "hello there"' in proc.stdout  # /show printed the stored history


def test_chat_cli_reports_unreachable_daemon():
    proc = subprocess.run([sys.executable, "-m", "daemon", "chat", "--url",
                           f"http://127.0.0.1:{free_port()}"], input="hi\n",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "cannot reach" in proc.stderr


def test_client_commands_import_no_torch():
    code = ("import sys; from daemon.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'transformers', 'flask') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
