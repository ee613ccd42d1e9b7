"""Workers killed (SIGKILL as the OOM killer sends it, and the kernel's OOM killer itself under a
real memory cgroup limit), SIGTERM with four turns streaming, SIGHUP with turns in flight, and the
metrics folder full (a real tmpfs where the test may mount, else the ENOSPC shim)."""
from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time

import pytest
import requests

from support import chat
from support.faults import EnospcShim, Tmpfs, can_mount, memory_cgroup_parent, memory_limited
from support.servers import Daemon

pytestmark = pytest.mark.e2e
MID = 2000
RECOVERY_S = 30.0
ARGS = ("--min-new-tokens", str(MID), "--max-new-tokens", str(MID), "--worker-threads", "6")


@pytest.fixture(scope="module")
def daemons(tmp_path_factory, cache_dir):
    """kill: SIGKILL and OOM; term: SIGTERM; hup: SIGHUP; full: metrics folder full. Side by side."""
    made, mounts = {}, []
    for name in ("kill", "term", "hup", "full"):
        root = tmp_path_factory.mktemp(f"workers-{name}")
        env, metrics = {}, "metrics"
        if name == "full":
            if can_mount():
                fs = Tmpfs(root / "metrics", 512 << 10).__enter__()  # room for one worker's files
                mounts.append(fs)
                made["full_means"] = fs
            else:
                (root / "metrics").mkdir()
                shim = EnospcShim(root, root / "metrics").build()
                env = shim.env()
                made["full_means"] = shim
        made[name] = Daemon(root, cache_dir, *ARGS, env=env, metrics_dir=metrics)
    daemons_ = [d for k, d in made.items() if isinstance(d, Daemon)]
    threads = [threading.Thread(target=d.start) for d in daemons_]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    yield made
    for d in daemons_:
        d.stop()
    for fs in mounts:
        fs.__exit__()


def worker_pid(url: str) -> int:
    return requests.get(url + "/readyz", timeout=30).json()["pid"]


def ready_with_new_worker(url: str, old: int, what: str) -> int:
    def new() -> int | None:
        try:
            resp = requests.get(url + "/readyz", timeout=5)
        except requests.RequestException:
            return None
        return resp.status_code == 200 and resp.json()["pid"] != old and resp.json()["pid"]
    pid, took = chat.eventually(new, RECOVERY_S, "a new worker, ready")
    print(f"[{what}] a new worker ready {took:.1f} s later")
    return pid


def test_worker_sigkilled_mid_stream(daemons):
    d = daemons["kill"]
    sid = chat.new_session(d.url)
    assert chat.turn(d.url, sid, "before the kill").status == 200
    pid = worker_pid(d.url)
    mid = chat.turn(d.url, sid, "killed during this turn", stream=True, max_tokens=MID,
                    on_first_event=lambda: os.kill(pid, signal.SIGKILL))
    # nothing can be said in-band by a killed process: the client sees the stream cut, not a hang
    assert mid.status == 200 and not mid.done and (mid.cut or not mid.events[-1].get("turn")), mid
    ready_with_new_worker(d.url, pid, "SIGKILL")
    after, took = chat.eventually(lambda: (r := chat.turn(d.url, sid, "after the kill")).status == 200
                                  and r, RECOVERY_S, "a turn on the same session")  # lease freed
    users = [m["content"] for m in chat.history(d.url, sid) if m["role"] == "user"]
    assert users == ["before the kill", "after the kill"]  # the cut turn left nothing behind
    assert "was sent SIGKILL" in d.log()


@pytest.mark.skipif(memory_cgroup_parent() is None, reason="no writable memory cgroup here")
def test_worker_killed_by_a_real_memory_limit_mid_turn(daemons):
    d = daemons["kill"]
    sid = chat.new_session(d.url)
    pid = worker_pid(d.url)
    with memory_limited(pid, 2 << 20) as group:  # charged from now on: its new pages only
        mid = chat.turn(d.url, sid, "many words " * 1500, stream=True, max_tokens=MID)
        oom = (group / "memory.oom_control").read_text() if (group / "memory.oom_control").exists() \
            else (group / "memory.events").read_text()
    assert not mid.done and (mid.cut or mid.status in (0, 200)), mid
    assert "oom_kill 1" in oom or "oom_kill 1\n" in oom, oom
    ready_with_new_worker(d.url, pid, "OOM kill")
    assert chat.eventually(lambda: chat.turn(d.url, sid, "after the OOM kill").status == 200,
                           RECOVERY_S, "a turn after the OOM kill")
    assert [m["content"] for m in chat.history(d.url, sid) if m["role"] == "user"] == ["after the OOM kill"]


def test_sigterm_with_four_turns_streaming_finishes_them_all(daemons):
    d = daemons["term"]
    sids = [chat.new_session(d.url) for _ in range(4)]
    replies: dict[int, chat.Reply] = {}
    streaming = threading.Semaphore(0)

    def run(i: int) -> None:
        replies[i] = chat.turn(d.url, sids[i], f"turn {i}", stream=True, max_tokens=MID,
                               on_first_event=streaming.release)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for _ in range(4):  # all four are streaming (decoded together, or waiting for a place)
        assert streaming.acquire(timeout=60), "a turn never started streaming"
    d.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(120)
    assert all(not t.is_alive() for t in threads), "a stream hung"
    assert d.proc.wait(60) == 0
    for i in range(4):
        assert replies[i].status == 200 and replies[i].done, (i, replies[i].events[-1:], replies[i].cut)
        assert replies[i].events[-1]["turn"] == 1
    with sqlite3.connect(d.state_dir + "/sessions.db") as conn:  # every 200 is stored
        stored = {sid: n for sid, n in conn.execute("SELECT id, turns FROM sessions")}
    assert all(stored[sid] == 1 for sid in sids), stored


def test_sighup_with_turns_in_flight_finishes_them_and_reloads(daemons):
    d = daemons["hup"]
    sids = [chat.new_session(d.url) for _ in range(2)]
    old = worker_pid(d.url)
    replies: dict[int, chat.Reply] = {}
    started = threading.Event()

    def run(i: int) -> None:
        replies[i] = chat.turn(d.url, sids[i], f"turn {i}", stream=True, max_tokens=MID,
                               on_first_event=started.set if i == 0 else None)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    assert started.wait(60)
    d.proc.send_signal(signal.SIGHUP)  # gunicorn: new workers, the old ones finish and leave
    for t in threads:
        t.join(120)
    assert all(replies[i].status == 200 and replies[i].done for i in range(2)), replies
    new = ready_with_new_worker(d.url, old, "SIGHUP")
    assert new != old and d.proc.poll() is None
    assert chat.turn(d.url, sids[0], "after the reload").status == 200
    assert len(chat.history(d.url, sids[0])) == 4


def test_metrics_folder_full_keeps_the_worker_alive(daemons):
    d, means = daemons["full"], daemons["full_means"]
    pid = worker_pid(d.url)
    before = chat.metric(d.url, "edgechat_metrics_write_failures_total")
    assert before == 0
    try:
        if isinstance(means, Tmpfs):
            means.fill()
        else:
            means.on()
        # new series need new room in the worker's files: every route a fresh label set
        for path in ("/v1/models", "/tokenize", "/v1/nope", "/openapi.json", "/v1/stats"):
            requests.get(d.url + path, timeout=30)
        assert chat.turn(d.url, chat.new_session(d.url), "metrics have no room").status == 200
        assert worker_pid(d.url) == pid  # no SIGBUS: the same worker answers
        failures, _ = chat.eventually(lambda: chat.metric(d.url, "edgechat_metrics_write_failures_total"),
                                      RECOVERY_S, "write failures counted")
        assert failures > 0
        assert requests.get(d.url + "/readyz", timeout=30).json()["metrics_write_failures"] > 0
    finally:
        if isinstance(means, Tmpfs):
            means.drain()
        else:
            means.off()
    requests.get(d.url + "/v1/nope", timeout=30)  # its series is written now there is room
    chat.eventually(lambda: chat.metric(d.url, "edgechat_http_requests_total", route="other") or
                    'status="404"' in requests.get(d.url + "/metrics", timeout=30).text,
                    RECOVERY_S, "the 404 series written once there is room")
    assert worker_pid(d.url) == pid
    print(f"[metrics folder full: {type(means).__name__}] {failures:.0f} writes lost, worker {pid} alive")
