"""A real gunicorn on builtin:tiny against hostile clients: slow senders, odd bytes, one key against another."""
from __future__ import annotations

import json
import socket
import threading
import time

import psutil
import pytest
import requests

from support.metrics import metric_value
from support.servers import Daemon, wait_for

pytestmark = pytest.mark.e2e
KEY_A, KEY_B = "key-a", "key-b"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}
READ_TIMEOUT_S = 8
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, cache_dir):
    """Two keys, default limits but a short read deadline and few sessions (so a flood is quick)."""
    d = Daemon(tmp_path_factory.mktemp("hostile"), cache_dir, "--api-keys", f"{KEY_A},{KEY_B}",
               "--max-new-tokens", "8", "--max-sessions", "40",
               "--request-read-timeout-s", str(READ_TIMEOUT_S))
    with d:
        yield d


def metric(url: str, name: str, **labels) -> float:
    """A sample of the daemon's /metrics, summed over its workers (0 when absent)."""
    return metric_value(url, name, combine=sum, default=0.0, **labels)


def raw(daemon, data: bytes, *, half_close: bool = False) -> tuple[int, dict, dict | None]:
    """Send bytes as they are; (status, headers, JSON body) of the answer."""
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while b"\r\n\r\n" not in out or len(out.partition(b"\r\n\r\n")[2]) < _length(out):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), headers, json.loads(body) if body.strip() else None


def _length(out: bytes) -> int:
    for line in out.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":")[1])
    return 0


def assert_openai_error(status: int, body: dict | None, expected: int) -> None:
    assert status == expected, body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]


def chat(daemon, body: dict | bytes, headers: dict = A, **kwargs) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode()
    return requests.post(daemon.url + "/v1/chat/completions", data=data, timeout=60,
                         headers={**headers, "Content-Type": "application/json"}, **kwargs)


# -- slow clients --------------------------------------------------------------------------------------

def test_fifty_slow_clients_leave_normal_clients_served(daemon):
    timeouts = metric(daemon.url, "edgechat_requests_rejected_total", reason="read_timeout")
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    socks = [socket.create_connection(("127.0.0.1", daemon.port), timeout=30) for _ in range(60)]
    for s in socks[40:]:  # 20 promise a body longer than what they send
        s.sendall(head + b"Content-Length: 5000\r\n\r\n{\"messages\": ")
    stop = threading.Event()

    def trickle() -> None:  # 40 send their head one byte every 0.25 s
        for i in range(len(head)):
            for s in socks[:40]:
                try:
                    s.send(head[i:i + 1])
                except OSError:
                    pass
            if stop.wait(0.25):
                return
    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    try:
        for _ in range(10):
            assert requests.get(daemon.url + "/healthz", timeout=30).status_code == 200
        ok = chat(daemon, {"messages": USER, "max_tokens": 2})
        assert ok.status_code == 200, ok.text
        # the slow clients are all still waiting: the normal ones were served beside them
        for s in socks:
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)
            s.setblocking(True)
        stop.set()
        sender.join()
        # past the deadline each gets a 408 in the OpenAI shape, and nothing ran
        for s in socks:
            s.settimeout(60)
            answer = b""
            while not answer.endswith(b"}"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                answer += chunk
            head_text, _, body = answer.partition(b"\r\n\r\n")
            assert head_text.startswith(b"HTTP/1.1 408"), answer[:200]
            assert json.loads(body)["error"]["code"] == "request_timeout"
    finally:
        stop.set()
        for s in socks:
            s.close()
    assert metric(daemon.url, "edgechat_requests_rejected_total", reason="read_timeout") >= timeouts + 60


def test_rejections_are_counted(daemon):
    before = metric(daemon.url, "edgechat_requests_rejected_total", reason="malformed_request")
    status, _, _ = raw(daemon, b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 414
    after = metric(daemon.url, "edgechat_requests_rejected_total", reason="malformed_request")
    assert after == before + 1


# -- server-level errors are JSON ----------------------------------------------------------------------

GET = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
POST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" \
       b"Authorization: Bearer key-a\r\n"


@pytest.mark.parametrize("data,status", [
    (GET + b"Bad Header\r\n\r\n", 400),
    (GET + b"X-A: 1\x00\r\n\r\n", 400),
    (POST + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400),
    (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (GET + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
    (GET + b"".join(b"X-%d: a\r\n" % i for i in range(120)) + b"\r\n", 431),
    (POST + b"Content-Length: 2000000\r\n\r\n", 413),
    (POST + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n\r\n", 400),
    (POST + b"Transfer-Encoding: chunked\r\n\r\n-1\r\n\r\n", 400),
    (POST + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-Trailer: 1\r\n\r\n", 400),
    (b"BLAH\r\n\r\n", 400),
])
def test_server_level_errors_are_openai_json(daemon, data, status):
    got, headers, body = raw(daemon, data)
    assert headers["Content-Type"] == "application/json"
    assert_openai_error(got, body, status)


def test_a_valid_chunked_body_is_served(daemon):
    payload = json.dumps({"messages": USER, "max_tokens": 2}).encode()
    status, _, body = raw(daemon, POST + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
                          + b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload))
    assert status == 200 and body["choices"][0]["message"]["content"] is not None


def test_a_body_shorter_than_its_length_commits_nothing(daemon):
    sid = requests.post(daemon.url + "/v1/sessions", json={}, headers=A, timeout=30).json()["id"]
    payload = json.dumps({"content": "hello", "max_tokens": 2}).encode()
    status, _, body = raw(daemon, f"POST /v1/sessions/{sid}/messages HTTP/1.1\r\nHost: x\r\n"
                                  f"Authorization: Bearer {KEY_A}\r\nContent-Type: application/json\r\n"
                                  f"Content-Length: {len(payload) + 50}\r\n\r\n".encode() + payload,
                          half_close=True)
    assert_openai_error(status, body, 400)
    assert requests.get(f"{daemon.url}/v1/sessions/{sid}", headers=A, timeout=30).json()["turns"] == 0


# -- odd bytes: 4xx, never 500 -------------------------------------------------------------------------

@pytest.mark.parametrize("body,code", [
    (b'{"messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", "invalid_json"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1' + b"0" * 400 + b"}",
     "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": -1' + b"0" * 400 + b"}",
     "invalid_value"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "invalid_unicode"),
    (b'{"messages": [{"role": "system", "content": "\\udfff x"}, {"role": "user", "content": "hi"}]}',
     "invalid_unicode"),
    (b'\xff\xfe{"messages": 1}', "invalid_json"),
])
def test_odd_bodies_are_400(daemon, body, code):
    resp = chat(daemon, body)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == code, resp.text


@pytest.mark.parametrize("token", ["k\u00e9y", "\u65e5\u672c", "key-a\u00ff"])
def test_a_non_ascii_bearer_key_is_401(daemon, token):
    resp = requests.get(daemon.url + "/v1/models", timeout=30,
                        headers={"Authorization": b"Bearer " + token.encode("utf-8")})
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("stream", [False, True])
def test_a_vanishing_temperature_is_greedy_not_nan(daemon, stream):
    body = {"messages": USER, "max_tokens": 4, "temperature": 1e-38, "stream": stream}
    resp = chat(daemon, body)
    assert resp.status_code == 200
    assert '"error"' not in resp.text and "generation failed" not in resp.text


def test_a_system_prompt_that_can_never_fit_is_refused_at_creation(daemon):
    resp = requests.post(daemon.url + "/v1/sessions", headers=A, timeout=60,
                         json={"system": "x " * 40_000})
    assert resp.status_code == 400
    assert resp.json()["error"]["code"] == "context_length_exceeded"
    assert resp.json()["error"]["param"] == "system"


# -- tenancy -------------------------------------------------------------------------------------------

def test_one_key_cannot_evict_another_keys_sessions(daemon):
    mine = [requests.post(daemon.url + "/v1/sessions", json={}, headers=A, timeout=30).json()["id"]
            for _ in range(3)]
    for _ in range(100):  # more than max_sessions (40), all from key B
        assert requests.post(daemon.url + "/v1/sessions", json={}, headers=B,
                             timeout=30).status_code == 201
    for sid in mine:
        assert requests.get(f"{daemon.url}/v1/sessions/{sid}", headers=A, timeout=30).status_code == 200


def test_stats_show_the_callers_own_sessions(daemon):
    def stats(headers) -> dict:
        return requests.get(daemon.url + "/v1/stats", headers=headers, timeout=30).json()["history"]
    before_a, before_b = stats(A), stats(B)
    sid = requests.post(daemon.url + "/v1/sessions", json={}, headers=B, timeout=30).json()["id"]
    for n in range(3):  # key B's history grows; key A's figures must not show it
        requests.post(f"{daemon.url}/v1/sessions/{sid}/messages", headers=B, timeout=60,
                      json={"content": f"tell me {n}", "max_tokens": 2})
    assert stats(A) == before_a
    assert stats(B)["messages_max"] >= 6 and stats(B)["messages_total"] > before_b["messages_total"]


# -- oversized prompts ---------------------------------------------------------------------------------

def test_oversized_prompts_leave_worker_memory_where_it_was(daemon):
    pid = requests.get(daemon.url + "/healthz", timeout=30).json()["pid"]
    worker = psutil.Process(pid)
    huge = json.dumps({"messages": [{"role": "user", "content": "x " * 450_000}],
                       "max_tokens": 2}).encode()
    session = requests.Session()
    for _ in range(3):  # warm: the first large requests size the allocator's arenas
        session.post(daemon.url + "/v1/chat/completions", data=huge, timeout=60,
                     headers={**A, "Content-Type": "application/json"})
    before = worker.memory_info().rss
    for _ in range(100):
        resp = session.post(daemon.url + "/v1/chat/completions", data=huge, timeout=60,
                            headers={**A, "Content-Type": "application/json"})
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
    assert session.get(daemon.url + "/healthz", timeout=30).status_code == 200  # after the last trim
    grown = worker.memory_info().rss - before
    assert grown < 50 * 2**20, f"worker RSS grew {grown / 2**20:.0f} MB over 100 refused prompts"


# -- queue accounting ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def busy_daemon(tmp_path_factory, cache_dir):
    """Default queue and threads; replies run until cancelled (EOS suppressed, a long cap)."""
    d = Daemon(tmp_path_factory.mktemp("busy"), cache_dir, "--max-new-tokens", "20000",
               "--min-new-tokens", "20000", "--generation-timeout-s", "300")
    with d:
        yield d


def test_a_burst_beyond_the_queue_gets_503_and_shows_in_readyz(busy_daemon):
    url = busy_daemon.url
    results: list = []
    lock = threading.Lock()

    def turn() -> None:
        resp = requests.post(url + "/v1/chat/completions", stream=True, timeout=120, json={
            "messages": USER, "max_tokens": 20000, "stream": True})
        with lock:
            results.append(resp)
    threads = [threading.Thread(target=turn) for _ in range(16)]
    for t in threads:
        t.start()
    try:
        # max_batch (8) run, queue_limit (4) wait for a place inside the daemon, the other 4 are refused
        wait_for(lambda: sum(r.status_code == 503 for r in list(results)) == 4, 60,
                 "the refusals beyond the queue")
        ready = requests.get(url + "/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["queue_depth"] == 4
        assert not ready.json()["checks"]["queue_not_full"]
        assert ready.json()["batch"]["running"] == 8 == ready.json()["batch"]["max_batch"]
        assert metric(url, "edgechat_queue_depth") == 4
        assert metric(url, "edgechat_generations_in_progress") == 8
        assert [r.status_code for r in results].count(200) == 8
        for r in results:
            if r.status_code == 503:
                assert int(r.headers["Retry-After"]) >= 1 and r.json()["error"]["code"] == "queue_full"
    finally:
        # the clients go away one by one: each generation stops and the next waiter gets the model
        while any(t.is_alive() for t in threads) or any(not r.raw.closed for r in results):
            for r in list(results):
                r.close()
            time.sleep(0.05)
    assert sorted(r.status_code for r in results) == [200] * 12 + [503] * 4
    wait_for(lambda: requests.get(url + "/readyz", timeout=30).status_code == 200,
             what="the queue to empty after the disconnects")
    wait_for(lambda: metric(url, "edgechat_generations_in_progress") == 0, what="no generation left")
