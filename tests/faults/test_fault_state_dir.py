"""The state folder (the SQLite session file) full, read-only, corrupt or locked, at start and mid-turn.

Real means: a small tmpfs mounted over the state folder and filled by a real file, or remounted
read-only, where this machine lets the test mount; else (and always, for the shim's own sake) a
preloaded library failing writes there with ENOSPC. Each test names the means it used.
"""
from __future__ import annotations

import errno
import sqlite3
import subprocess
import sys
import threading

import pytest
import requests

from support import chat
from support.faults import EnospcShim, Tmpfs, can_mount
from support.servers import Daemon

pytestmark = pytest.mark.e2e
MEANS = ["tmpfs", "shim"]
RECOVERY_S = 30.0
MID = 2000  # tokens of a turn faulted mid-way: long enough that the fault lands before its end
LONG = ("--min-new-tokens", str(MID), "--max-new-tokens", str(MID))


class Faulty:
    """A daemon whose state folder a test can fill (fault_on) and free (fault_off)."""

    def __init__(self, means: str, root, cache_dir: str):
        self.means, self.root = means, root
        state = root / "state"
        self.tmpfs = self.shim = None
        env = {}
        if means == "tmpfs":
            self.tmpfs = Tmpfs(state, 8 << 20).__enter__()
        else:
            state.mkdir(parents=True)
            self.shim = EnospcShim(root, state).build()
            env = self.shim.env()
        self.daemon = Daemon(root, cache_dir, *LONG, env=env)

    def fault_on(self) -> None:
        if self.tmpfs:
            self.tmpfs.fill()
        else:
            self.shim.on()

    def fault_off(self) -> None:
        if self.tmpfs:
            self.tmpfs.drain()
        else:
            self.shim.off()

    def close(self) -> None:
        self.daemon.stop()
        if self.tmpfs:
            self.tmpfs.__exit__()


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, cache_dir):
    """One daemon per means, started side by side."""
    made: dict[str, Faulty] = {}
    for means in MEANS:
        if means == "tmpfs" and not can_mount():
            continue
        made[means] = Faulty(means, tmp_path_factory.mktemp(f"state-{means}"), cache_dir)
    threads = [threading.Thread(target=f.daemon.start) for f in made.values()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    yield made
    for f in made.values():
        f.close()


@pytest.mark.parametrize("means", MEANS)
def test_state_folder_full_mid_turn(faulty, means):
    if means not in faulty:
        pytest.skip("this machine does not let the test mount a tmpfs (the shim case runs instead)")
    f = faulty[means]
    url = f.daemon.url
    sid = chat.new_session(url)
    first = chat.turn(url, sid, "before the disk fills")
    assert first.status == 200, first.body
    with chat.ReadyWatch(url) as ready:
        try:
            mid = chat.turn(url, sid, "the disk fills during this turn", stream=True, max_tokens=MID,
                            on_first_event=f.fault_on)
            # a stream's status line went out before the fault: its last event says what happened
            assert mid.status == 200 and not mid.done and mid.cut is None
            assert mid.error["code"] == "store_unavailable", mid.events[-1]
            refused = chat.turn(url, sid, "while the disk is full")
            assert refused.status == 503 and refused.error["code"] == "store_unavailable"
            assert int(refused.headers["Retry-After"]) > 0
            during = requests.get(url + "/readyz", timeout=10)
            assert during.status_code == 200 and during.json()["session_store"]["writable"] is False
            assert "full" in during.json()["session_store"]["last_error"]
            created = requests.post(url + "/v1/sessions", json={}, timeout=60)
            assert created.status_code == 503 and created.headers["Retry-After"]
            # reads go on: the stored conversation is the one turn that got its 200
            assert [m["content"] for m in chat.history(url, sid) if m["role"] == "user"] == \
                ["before the disk fills"]
            chat.eventually(lambda: chat.metric(url, "edgechat_session_store_writable") == 0,
                            RECOVERY_S, "edgechat_session_store_writable 0")
            assert chat.metric(url, "edgechat_session_store_errors_total", operation="commit") >= 1
            assert chat.metric(url, "edgechat_requests_rejected_total", reason="store_unavailable") >= 2
            stateless = requests.post(url + "/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            assert stateless.status_code == 200  # what needs no store still works
        finally:
            f.fault_off()
        body, took = chat.eventually(
            lambda: (r := requests.get(url + "/readyz", timeout=10).json())["session_store"]["writable"]
            and r, RECOVERY_S, "writable again")
        after = chat.turn(url, sid, "after the disk has room")  # no 409: the lease was released
        assert after.status == 200, after.body
    statuses = ready.statuses()
    assert statuses and set(statuses) == {200}, statuses  # ready all along: no flapping
    users = [m["content"] for m in chat.history(url, sid) if m["role"] == "user"]
    assert users == ["before the disk fills", "after the disk has room"]
    print(f"[{means}] recovered {took:.1f} s after the space came back")


def test_state_folder_read_only_mid_turn(faulty):
    # A mounted folder with open files cannot be remounted read-only (EBUSY); the kernel does it
    # after I/O errors (errors=remount-ro). The shim gives the daemon what it then sees: EROFS.
    f = faulty["shim"]
    url = f.daemon.url
    sid = chat.new_session(url)
    assert chat.turn(url, sid, "before").status == 200
    try:
        mid = chat.turn(url, sid, "read-only meanwhile", stream=True, max_tokens=MID,
                        on_first_event=lambda: f.shim.on(errno.EROFS))
        assert mid.status == 200 and mid.error["code"] == "store_unavailable", mid.events[-1:]
        refused = chat.turn(url, sid, "while read-only")
        assert refused.status == 503 and refused.error["code"] == "store_unavailable"
        ready = requests.get(url + "/readyz", timeout=10)
        assert ready.status_code == 200 and ready.json()["session_store"]["last_error"]  # SQLite: "disk I/O error"
    finally:
        f.shim.off()
    chat.eventually(lambda: chat.turn(url, sid, "writable again").status == 200, RECOVERY_S,
                    "a turn once writes work")
    users = [m["content"] for m in chat.history(url, sid) if m["role"] == "user"]
    assert users == ["before", "writable again"]


def serve_once(tmp_path, cache_dir, state, env=None) -> subprocess.CompletedProcess:
    """`edgechat serve` on a state folder that cannot work: it must stop, saying why."""
    return subprocess.run([sys.executable, "-m", "daemon", "serve", "--model", "builtin:tiny",
                           "--cache-dir", cache_dir, "--state-dir", str(state),
                           "--metrics-dir", str(tmp_path / "metrics"), "--port", "1"],
                          capture_output=True, text=True, timeout=120, env={**Daemon(
                              tmp_path, cache_dir).env, **(env or {})})


@pytest.mark.parametrize("fault", ["full", "read_only", "corrupt"])
def test_state_folder_unusable_at_start_stops_with_the_reason(tmp_path, cache_dir, fault):
    state = tmp_path / "state"
    if fault in ("full", "read_only") and not can_mount():
        if fault == "read_only":
            pytest.skip("read-only needs a tmpfs this machine lets the test mount")
        state.mkdir()
        shim = EnospcShim(tmp_path, state).build()
        shim.on()
        out = serve_once(tmp_path, cache_dir, state, shim.env())
        assert out.returncode == 2 and "session_store" in out.stderr, out.stderr
        return
    if fault == "corrupt":
        state.mkdir()
        garbage = b"this is not a database, it is what a half-written SD card returns\n" * 200
        (state / "sessions.db").write_bytes(garbage)
        out = serve_once(tmp_path, cache_dir, state)
        assert out.returncode == 2, out.stderr
        assert "corrupt or not SQLite" in out.stderr and "session_store" in out.stderr, out.stderr
        assert (state / "sessions.db").read_bytes() == garbage  # untouched, never moved or rewritten
        return
    with Tmpfs(state, 1 << 20) as fs:
        if fault == "full":
            fs.fill()
        else:
            fs.read_only(True)
        out = serve_once(tmp_path, cache_dir, state)
    assert out.returncode == 2, out.stderr
    assert "session_store" in out.stderr and "sessions.db" in out.stderr, out.stderr


def test_database_locked_past_the_busy_timeout(faulty):
    f = next(iter(faulty.values()))
    url = f.daemon.url
    sid = chat.new_session(url)
    assert chat.turn(url, sid, "before the lock").status == 200
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys\n"
        f"c = sqlite3.connect({str(f.root / 'state' / 'sessions.db')!r}, isolation_level=None)\n"
        "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); sys.stdin.read()")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        locked = chat.turn(url, sid, "while another process holds the lock")  # busy_timeout: 5 s
        assert locked.status == 503 and locked.error["code"] == "store_unavailable", locked.body
        assert locked.headers["Retry-After"]
        assert chat.history(url, sid) is not None  # WAL: reads are not blocked by the writer's lock
        assert requests.get(url + "/readyz", timeout=10).status_code == 200
    finally:
        holder.stdin.close()
        holder.wait(30)
    chat.eventually(lambda: chat.turn(url, sid, "after the lock").status == 200, RECOVERY_S,
                    "a turn once the lock is gone")
    with sqlite3.connect(f.root / "state" / "sessions.db") as conn:  # intact after all of it
        assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"
