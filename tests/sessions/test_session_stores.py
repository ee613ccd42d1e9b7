"""Backend-specific session store tests: SQLite schema and startup errors, expiry on disk, cross-process
leases, Redis keys, /readyz on store failure, and real gunicorn workers sharing one store (durability)."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import requests

from daemon.config import Config
from daemon.sessions import HistoryPolicy, SessionBusy, StoreUnavailable, make_store
from daemon.sessions import sqlite_schema
from daemon.sessions.sqlite import SQLiteStore
from support import REPO_ROOT
from support.fakes import FakeClock, count_words
from support.metrics import metric_value
from support.processes import track
from support.redis_server import require as require_redis, start as start_redis
from support.servers import Daemon, wait_http

ROOT = REPO_ROOT
POLICY = HistoryPolicy(max_turns=5, max_tokens=0, ttl_s=100, max_sessions=0)
SUMMED = dict(combine=sum, default=0.0)  # every series of a name summed, 0 when there is none


def sqlite_store(tmp_path, policy=POLICY, **kwargs):
    return make_store(policy, count_words, url=f"sqlite://{tmp_path}/s.db", **kwargs)


def rows(path, table="sessions") -> int:
    with sqlite3.connect(path) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def chat(store, sid, n, size=1, owner=None):
    for i in range(n):
        with store.turn(sid, owner, f"u{i} " + "w " * size, timeout=5) as t:
            t.commit(f"a{i} " + "w " * size)


# -- SQLite: the file, its schema, startup errors --------------------------------------------------

def test_new_file_is_private_wal_incremental_and_latest(tmp_path):
    sqlite_store(tmp_path).close()
    path = tmp_path / "s.db"
    assert path.stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental
        assert sqlite_schema.version_of(conn) == sqlite_schema.LATEST


def test_migrates_a_version_1_file(tmp_path):
    path = str(tmp_path / "s.db")
    conn = sqlite_schema.connect(path, 1.0)
    sqlite_schema.migrate(conn, target=1)
    history = [["user", "hello there"], ["assistant", "hi"], ["user", "how are you"], ["assistant", "fine"]]
    conn.execute("INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?,?,?)",
                 ("old-id", None, 1.0, 999_990.0, 2, 25, 0, 2, "be kind", json.dumps(history)))
    conn.close()
    store = sqlite_store(tmp_path, clock=FakeClock())
    with sqlite3.connect(path) as check:
        assert sqlite_schema.version_of(check) == sqlite_schema.LATEST
        assert check.execute("SELECT n_messages FROM sessions").fetchone()[0] == 4
    snap = store.get("old-id", None)
    assert [m["content"] for m in snap.messages] == [c for _, c in history] and snap.system == "be kind"
    assert (store.stats().sessions, store.stats().messages_total, store.stats().messages_max) == (1, 4, 4)
    chat(store, "old-id", 1)
    assert store.get("old-id", None).turns == 3 and store.stats().messages_total == 6
    store.close()


def test_newer_schema_is_refused_naming_the_setting(tmp_path):
    sqlite_store(tmp_path).close()
    with sqlite3.connect(tmp_path / "s.db") as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(StoreUnavailable, match="session_store.*schema version 99"):
        sqlite_store(tmp_path)


def _garbage(path):
    path.write_bytes(b"these are not the sessions you are looking for\n" * 200)


def _torn(path):
    store = make_store(POLICY, count_words, url=f"sqlite://{path}")
    for _ in range(30):
        chat(store, store.create(None).id, 1, size=300)
    store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(path, "r+b") as f:  # one b-tree page overwritten: the header is still valid
        f.seek(3 * 4096)
        f.write(b"\xff" * 4096)


@pytest.mark.parametrize("damage", [_garbage, _torn], ids=["not-sqlite", "torn-page"])
def test_corrupt_file_is_a_clear_startup_error(tmp_path, damage):
    path = tmp_path / "s.db"
    damage(path)
    with pytest.raises(StoreUnavailable) as err:
        sqlite_store(tmp_path)
    text = str(err.value)
    assert text.startswith("session_store:") and str(path) in text and "corrupt" in text
    assert "\n" not in text


def test_locked_file_is_a_clear_startup_error(tmp_path):
    sqlite_store(tmp_path).close()
    holder = sqlite3.connect(tmp_path / "s.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable, match="session_store.*locked"):
            SQLiteStore(POLICY, count_words, path=str(tmp_path / "s.db"), busy_timeout_s=0.2)
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def _open_in_child(url: str, as_nobody: bool) -> str:
    """Open the store in a forked child (as user nobody when asked); the error text, or 'opened'."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no torch, only the store; always _exit
        try:
            os.close(r)
            if as_nobody:  # root ignores file modes: drop to an unprivileged user to test them
                os.setgid(65534)
                os.setuid(65534)
            try:
                make_store(POLICY, count_words, url=url).close()
                msg = "opened"
            except StoreUnavailable as exc:
                msg = str(exc)
            os.write(w, msg.encode())
        finally:
            os._exit(0)
    track(pid)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


def test_unwritable_folder_is_a_clear_startup_error():
    base = tempfile.mkdtemp(prefix="edgechat-ro-")  # /tmp itself: reachable by an unprivileged user
    try:
        os.chmod(base, 0o755)
        ro = os.path.join(base, "ro")
        os.mkdir(ro, 0o555)
        os.chmod(ro, 0o555)
        message = _open_in_child(f"sqlite://{ro}/s.db", as_nobody=os.geteuid() == 0)
        assert message.startswith("session_store:") and "Permission denied" in message
        assert "writable" in message
        assert _open_in_child(f"sqlite://{base}/ok/s.db", as_nobody=False) == "opened"
    finally:
        os.chmod(os.path.join(base, "ro"), 0o755)
        subprocess.run(["rm", "-rf", base], check=True)


def test_invalid_setting_names_it_and_never_echoes_a_password(runner):
    with pytest.raises(ValueError, match="session_store") as err:
        Config(session_store="postgres://u:hunter2@h/db")
    assert "hunter2" not in str(err.value)
    code, _, err_text = runner("serve", "--session-store", "ftp://example/x")
    assert code == 2 and "session_store" in err_text
    assert Config(state_dir="/srv/ec").session_store_url() == "sqlite:///srv/ec/sessions.db"


# -- SQLite: expiry on disk ----------------------------------------------------------------------

def test_ttl_expiry_deletes_rows(tmp_path):
    clock = FakeClock()
    store = sqlite_store(tmp_path, clock=clock)
    for _ in range(30):
        chat(store, store.create("k").id, 2, owner="k")
    path = tmp_path / "s.db"
    assert rows(path) == 30 and rows(path, "leases") == 0
    clock.t += 99
    keep = store.create("k").id
    clock.t += 1
    assert store.sweep() == 30
    assert rows(path) == 1 and store.get(keep, "k").turns == 0
    store.close()


def test_file_stays_bounded_over_many_expired_sessions(tmp_path):
    clock = FakeClock()
    store = sqlite_store(tmp_path, clock=clock)
    big = "word " * 400
    peaks, after = [], []
    for n in (20, 20, 100, 20, 20, 20, 20):
        for _ in range(n):
            sid = store.create(None).id
            for _ in range(2):
                with store.turn(sid, None, big) as t:
                    t.commit(big)
        peaks.append(store.file_bytes())
        clock.t += POLICY.ttl_s
        assert store.sweep() == n
        after.append(store.file_bytes())
    store.close()
    assert max(after) <= 64 * 1024, after          # expired pages go back to the file system
    assert max(peaks[3:]) <= 1.2 * peaks[0], peaks  # the 100-session burst left no lasting growth
    assert peaks[2] > 1.2 * peaks[0]                # ...which it did cause while it lasted


# -- cross-process leases (SQLite and Redis) -------------------------------------------------------

HOLDER = """
import sys, time
sys.path.insert(0, "tests")  # run from the repository root: tests/support is importable as `support`
from daemon.sessions import HistoryPolicy, make_store
from support.fakes import count_words
store = make_store(HistoryPolicy(5, 0, 100, 0), count_words, url=sys.argv[1], lease_s=600)
with store.turn(sys.argv[2], None, "child turn", timeout=5) as t:
    t.commit("child reply")
held = store.turn(sys.argv[2], None, "never committed", timeout=5)
print("held", flush=True)
time.sleep(600)
"""


@pytest.fixture(params=["sqlite", "redis"])
def shared_url(request, tmp_path):
    """A URL of a shared store: a SQLite file, or a freshly emptied Redis database."""
    if request.param == "sqlite":
        return f"sqlite://{tmp_path}/s.db"
    server = request.getfixturevalue("redis_server")
    server.client().flushdb()
    return server.url


def test_lease_serializes_processes_and_dies_with_its_holder(shared_url):
    store = make_store(POLICY, count_words, url=shared_url, lease_s=600)
    sid = store.create(None).id
    child = track(subprocess.Popen([sys.executable, "-c", HOLDER, shared_url, sid], cwd=ROOT,
                                   stdout=subprocess.PIPE, text=True))
    try:
        assert child.stdout.readline().strip() == "held"
        assert store.get(sid, None).turns == 1  # the other process' commit is visible here
        with pytest.raises(SessionBusy):
            store.turn(sid, None, "must wait", timeout=0.2)
    finally:
        child.kill()
        child.wait(10)
    # its lease outlives it by 600 s, but the holder's pid is gone from this host: taken over now
    with store.turn(sid, None, "after the crash", timeout=5) as t:
        assert t.index == 2 and [m["content"] for m in t.prompt] == ["child turn", "child reply",
                                                                      "after the crash"]
        t.commit("ok")
    store.close()


def test_a_lease_of_another_host_ends_at_its_expiry(shared_url):
    store = make_store(POLICY, count_words, url=shared_url)
    sid = store.create(None).id
    if shared_url.startswith("sqlite"):
        with sqlite3.connect(shared_url[len("sqlite://"):]) as conn:
            conn.execute("INSERT INTO leases VALUES (?, 'tok', 1, 'elsewhere', ?)", (sid, time.time() + 1.0))
    else:
        import redis
        redis.Redis.from_url(shared_url).set(f"edgechat:lease:{sid}", "tok 1 elsewhere", px=1000)
    with pytest.raises(SessionBusy):
        store.turn(sid, None, "blocked", timeout=0.1)
    with store.turn(sid, None, "after expiry", timeout=10) as t:  # polls until the lease expires
        t.commit("ok")
    assert store.get(sid, None).turns == 1
    store.close()


# -- Redis specifics --------------------------------------------------------------------------------

def test_redis_keys_are_namespaced_and_expire(redis_server):
    client = redis_server.client()
    client.flushdb()
    store = make_store(POLICY, count_words, url=redis_server.url, clock=FakeClock(), lease_s=30)
    sid = store.create(None).id
    assert 0 < client.pttl(f"edgechat:session:{sid}") <= (100 + 30) * 1000
    with store.turn(sid, None, "hello") as t:
        assert 0 < client.pttl(f"edgechat:lease:{sid}") <= 30_000
        t.commit("hi")
    assert not client.exists(f"edgechat:lease:{sid}")
    assert all(key.startswith("edgechat:") for key in client.keys("*"))
    store.close()


def test_redis_counters_stay_right_when_redis_drops_a_hash_itself(redis_server):
    """Redis expires a session hash on its own (ttl + lease_s) or evicts it under maxmemory: the index,
    counters and maxima must not depend on reading the vanished hash."""
    from daemon.sessions import SessionNotFound
    client = redis_server.client()
    client.flushdb()
    events, clock = [], FakeClock()
    listener = type("L", (), {"on_truncate": lambda *a: None, "on_store_op": lambda *a: None,
                              "on_evict": lambda self, reason, n: events.append((reason, n))})()
    store = make_store(POLICY, count_words, url=redis_server.url, clock=clock, listener=listener)
    a, b, c = (store.create(None).id for _ in range(3))
    chat(store, a, 3)
    chat(store, b, 1)
    assert (store.stats().sessions, store.stats().messages_total, store.stats().messages_max) == (3, 8, 6)
    clock.t += 60
    chat(store, c, 2)                        # c stays active; a and b will be idle past the TTL
    clock.t += 40
    client.delete(f"edgechat:session:{a}")   # as Redis' own expiry would have done
    stats = store.stats()
    assert (stats.sessions, stats.messages_total, stats.messages_max) == (1, 4, 4)
    assert events == [("ttl", 2)]
    client.delete(f"edgechat:session:{c}")   # evicted early (maxmemory): noticed at its next read
    with pytest.raises(SessionNotFound):
        store.get(c, None)
    assert store.stats() == type(stats)(0, 0, 0, 0)
    store.close()


# -- metrics and startup through the daemon ---------------------------------------------------------

def test_store_size_and_latency_are_exported(app_factory):
    client = app_factory().test_client()  # default store: SQLite in state_dir
    sid = client.post("/v1/sessions", json={}).get_json()["id"]
    assert client.post(f"/v1/sessions/{sid}/messages", json={"content": "hi", "max_tokens": 2}).status_code == 200
    text = client.get("/metrics").get_data(as_text=True)
    assert metric_value(text, "edgechat_session_store_bytes") > 4096
    for op in ("create", "acquire", "commit", "release", "stats"):
        assert metric_value(text, "edgechat_session_store_operation_seconds_count", operation=op) >= 1, op
    assert metric_value(text, "edgechat_session_store_operation_seconds_count", operation="delete") == 0
    assert metric_value(text, "edgechat_sessions") == 1


@pytest.mark.e2e
def test_serve_stops_with_one_message_on_a_corrupt_store(tmp_path, cache_dir):
    _garbage(tmp_path / "s.db")
    proc = subprocess.run(
        [sys.executable, "-m", "daemon", "serve", "--model", "builtin:tiny", "--cache-dir", cache_dir,
         "--port", "0", "--no-warmup", "--metrics-dir", str(tmp_path / "m"),
         "--session-store", f"sqlite://{tmp_path}/s.db"],
        capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "edgechat.serve: session_store:" in line]
    assert len(lines) == 1 and "corrupt" in lines[0], proc.stderr[-2000:]


# -- /readyz when the store fails at run time -------------------------------------------------------

def test_readyz_false_when_the_sqlite_store_breaks(app_factory, tmp_path):
    app = app_factory()
    client = app.test_client()
    assert client.get("/readyz").get_json()["checks"]["session_store"] is True
    with sqlite3.connect(tmp_path / "state" / "sessions.db") as conn:  # the default: state_dir
        conn.execute("DROP TABLE sessions")
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["checks"]["session_store"] is False


def test_readyz_false_when_redis_goes_away(app_factory, tmp_path):
    require_redis()
    server = start_redis(tmp_path)
    try:
        client = app_factory(session_store=server.url).test_client()
        assert client.post("/v1/sessions", json={}).status_code == 201
        assert client.get("/readyz").status_code == 200
        server.stop()
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.get_json()["checks"]["session_store"] is False
    finally:
        server.stop()
# -- real gunicorn: two workers, one store; kill -9 mid-turn ---------------------------------------

def _store_arg(backend: str, tmp_path, request) -> str:
    if backend == "sqlite":
        return f"sqlite://{tmp_path}/shared/sessions.db"
    server = request.getfixturevalue("redis_server")
    server.client().flushdb()
    return server.url


def _workers(d: Daemon, n: int) -> list[int]:
    import psutil
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = sorted(p.pid for p in psutil.Process(d.proc.pid).children())
        if len(pids) == n:
            return pids
        time.sleep(0.1)
    raise AssertionError(f"gunicorn did not run {n} workers")


def _turn(url: str, sid: str, content: str, **extra) -> dict:
    """One non-streamed turn; retries while the session is busy (409) or the model queue full (503)."""
    deadline = time.monotonic() + 120
    while True:
        resp = requests.post(f"{url}/v1/sessions/{sid}/messages", timeout=120,
                             json={"content": content, "max_tokens": 3, **extra})
        if resp.status_code not in (409, 503) or time.monotonic() > deadline:
            assert resp.status_code == 200, resp.text
            return resp.json()
        time.sleep(0.2)


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_two_workers_share_one_store(backend, tmp_path, cache_dir, request):
    store = _store_arg(backend, tmp_path, request)
    with Daemon(tmp_path, cache_dir, "--workers", "2", "--session-store", store,
                "--max-history-turns", "0", "--no-warmup") as d:
        workers = _workers(d, 2)
        sid = requests.post(d.url + "/v1/sessions", json={"system": "terse"}).json()["id"]
        answered = []
        for i in range(6):  # alternate: stop one worker so the other must answer this turn
            active, paused = workers[i % 2], workers[1 - i % 2]
            os.kill(paused, signal.SIGSTOP)
            try:
                assert requests.get(d.url + "/healthz", timeout=30).json()["pid"] == active
                body = _turn(d.url, sid, f"turn {i}")
                assert body["turn"] == i + 1 and body["history"]["messages"] == 2 * (i + 1)
                answered.append(active)
            finally:
                os.kill(paused, signal.SIGCONT)
        assert set(answered) == set(workers)

        # both workers at once on the same session: the lease serializes them, nothing is lost
        threads = [threading.Thread(target=_turn, args=(d.url, sid, f"together {i}")) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        snap = requests.get(f"{d.url}/v1/sessions/{sid}").json()
        messages = snap["messages"]
        assert snap["turns"] == 12 and len(messages) == 24
        assert [m["role"] for m in messages] == ["user", "assistant"] * 12
        users = [m["content"] for m in messages[::2]]
        assert users[:6] == [f"turn {i}" for i in range(6)]
        assert sorted(users[6:]) == sorted(f"together {i}" for i in range(6))

        # the history gauges describe the one shared store: not once per worker (every series of a
        # name summed, so a gauge reported once per worker would count twice)
        for _ in range(2):
            requests.post(d.url + "/v1/sessions", json={})
        wait_for_value = time.monotonic() + 30
        while metric_value(d.url, "edgechat_sessions", **SUMMED) != 3 and time.monotonic() < wait_for_value:
            time.sleep(0.2)
        for _ in range(5):  # both workers refresh every second (metrics_refresh_s=1): no doubling
            assert metric_value(d.url, "edgechat_sessions", **SUMMED) == 3
            assert metric_value(d.url, "edgechat_history_messages", **SUMMED) == 24
            time.sleep(0.5)


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_kill_9_mid_turn_keeps_every_committed_turn(backend, tmp_path, cache_dir, request):
    store = _store_arg(backend, tmp_path, request)
    args = ("--workers", "1", "--session-store", store, "--max-history-turns", "0",
            "--max-new-tokens", "20000", "--min-new-tokens", "20000", "--generation-timeout-s", "30",
            "--queue-timeout-s", "2", "--no-warmup")
    d = Daemon(tmp_path, cache_dir, *args).start()
    try:
        sid = requests.post(d.url + "/v1/sessions", json={}).json()["id"]
        committed = []
        for i in range(3):
            body = _turn(d.url, sid, f"kept {i}")
            committed += [{"role": "user", "content": f"kept {i}"}, body["message"]]
        resp = requests.post(f"{d.url}/v1/sessions/{sid}/messages", stream=True, timeout=60,
                             json={"content": "lost", "max_tokens": 20000, "stream": True})
        lines = resp.iter_lines()
        assert any(line.startswith(b'data: {"delta"') for line in lines)  # generating now
        worker = requests.get(d.url + "/healthz", timeout=10).json()["pid"]
        os.kill(worker, signal.SIGKILL)
        resp.close()
        wait_http(d.url + "/readyz", 120, d.proc)  # gunicorn replaced the worker
        snap = requests.get(f"{d.url}/v1/sessions/{sid}").json()
        assert snap["turns"] == 3 and snap["messages"] == committed  # nothing partial
        # the dead worker's lease is gone (its pid left this host): a new turn goes through
        assert _turn(d.url, sid, "after the kill")["turn"] == 4
        os.killpg(d.proc.pid, signal.SIGKILL)  # now crash the whole daemon
        d.proc.wait(30)
    finally:
        d.stop()
    with Daemon(tmp_path, cache_dir, *args) as again:
        snap = requests.get(f"{again.url}/v1/sessions/{sid}").json()
        assert snap["turns"] == 4 and snap["messages"][:6] == committed
        assert snap["messages"][6]["content"] == "after the kill" and len(snap["messages"]) == 8
