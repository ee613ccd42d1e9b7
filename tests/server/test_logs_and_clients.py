"""A real gunicorn under log_format=json: every line it prints during start, a turn and SIGTERM is
JSON, with the request id; keys from a file reach no worker's environment or argv; langchain-openai
chats with it, streamed and not."""
from __future__ import annotations

import json

import psutil
import pytest
import requests

from support.servers import Daemon

pytestmark = pytest.mark.e2e
KEY = "file-key-1"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("ops")
    (tmp / "keys").write_text(KEY + "\n")
    d = Daemon(tmp, cache_dir, "--log-format", "json", "--access-log", "--api-keys-file",
               str(tmp / "keys"), "--max-new-tokens", "16")
    with d:
        yield d


def test_keys_come_from_the_file_and_stay_out_of_workers(daemon):
    url = daemon.url + "/v1/models"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, headers={"Authorization": f"Bearer {KEY}"}, timeout=10).status_code == 200
    master = psutil.Process(daemon.proc.pid)
    for proc in [master, *master.children(recursive=True)]:
        assert KEY not in " ".join(proc.cmdline())
        assert all(KEY not in v for v in proc.environ().values())


def test_langchain_openai_chats(daemon):
    from langchain_openai import ChatOpenAI
    chat = ChatOpenAI(base_url=daemon.url + "/v1", api_key=KEY, model="builtin:tiny",
                      max_tokens=8, temperature=0, max_retries=0, timeout=60)
    reply = chat.invoke("Hello there")
    assert reply.content and reply.usage_metadata["output_tokens"] > 0
    pieces = [chunk.content for chunk in chat.stream("Hello there")]
    assert len([p for p in pieces if p]) > 1 and "".join(pieces) == reply.content


def test_every_line_is_json_with_the_request_id(daemon):
    resp = requests.post(daemon.url + "/v1/chat/completions", timeout=60,
                         headers={"Authorization": f"Bearer {KEY}", "X-Request-Id": "rid-json-1"},
                         json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert resp.status_code == 200 and resp.headers["X-Request-Id"] == "rid-json-1"
    assert daemon.stop() == 0  # SIGTERM: the shutdown lines are in the log too
    lines = [line for line in daemon.log().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # raises on any line that is not JSON
    loggers = {r["logger"] for r in records}
    assert {"gunicorn.error", "gunicorn.access", "edgechat.engine", "edgechat.server"} <= loggers
    messages = " | ".join(r["msg"] for r in records)
    assert "edgechat listening on" in messages and "metrics folder" in messages
    assert "Handling signal: term" in messages or "Shutting down" in messages
    access = [r for r in records if r["logger"] == "gunicorn.access" and "chat/completions" in r["msg"]]
    assert "rid-json-1" in {r.get("request_id") for r in access}
    assert all(r.get("request_id") for r in access)
    assert len({r["pid"] for r in records}) >= 2  # the master's lines and the worker's
