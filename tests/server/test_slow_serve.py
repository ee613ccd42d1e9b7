"""`edgechat serve` with 2 workers on the 494M-parameter model: no fork-after-torch hang."""
from __future__ import annotations

import concurrent.futures
import time

import pytest
import requests

from support.servers import Daemon

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_two_workers_on_the_qwen_shaped_model(tmp_path, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("big-cache"))
    # started once by `with`, stopped when it ends (start_timeout: the first run builds the model)
    with Daemon(tmp_path, cache, "--model", "builtin:qwen2.5-0.5b-shape", "--workers", "2",
                "--threads", "1", "--max-new-tokens", "4", "--worker-threads", "2", start_timeout=600) as d:
        def turn(n: int) -> tuple[int, int]:
            resp = requests.post(d.url + "/v1/chat/completions", timeout=300, json={
                "messages": [{"role": "user", "content": f"hello {n}"}], "max_tokens": 4})
            assert resp.status_code == 200, resp.text
            return resp.json()["usage"]["completion_tokens"], requests.get(
                d.url + "/healthz", timeout=30).json()["pid"]

        # the first worker to be ready opens the door; the second may still be loading (or waiting for
        # the first's decode-path tuning): turns sent before it listens would all land on the first
        assert len(ready_pids(d.url, 2, 600)) == 2, d.log()[-2000:]
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            results = list(pool.map(turn, range(8)))
        assert all(tokens == 4 for tokens, _ in results)
        pids = {pid for _, pid in results}
        assert len(pids) == 2, f"both workers should answer, saw {pids}\n{d.log()[-2000:]}"


def ready_pids(url: str, want: int, timeout: float) -> set[int]:
    """Pids of workers that answered /readyz 200, polled on fresh connections until `want` are seen."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(seen) < want and time.monotonic() < deadline:
        resp = requests.get(url + "/readyz", timeout=30)  # no session: each request may reach another worker
        if resp.status_code == 200:
            seen.add(resp.json()["pid"])
        time.sleep(0.1)
    return seen
