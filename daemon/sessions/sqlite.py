"""SQLite SessionStore, the default: one WAL file that every gunicorn worker shares, durable across restarts.

- One connection per thread (WAL: readers never block the writer). Writes are short IMMEDIATE
  transactions; `busy_timeout` absorbs other processes' writes. synchronous=FULL: a committed turn
  survives kill -9 and power loss.
- The turn lock: a local lock per session, then a row in `leases` (token, pid, host, expiry) polled
  with backoff until the timeout (SessionBusy). A lease ends at release, at expiry (`lease_s`, longer
  than any turn), or at once when its pid is gone from this host (a kill -9'd worker).
- A commit is one UPDATE guarded by the record's version: nothing partial, no lost update.
- Expired and evicted sessions are DELETEd; sweep() returns freed pages to the file system
  (auto_vacuum=INCREMENTAL) and the WAL is cut back after checkpoints, so the file stays bounded.
- stats(): one aggregate over the small leading columns of at most max_sessions rows (≈ 0.1–0.5 ms
  for 1000 sessions); never parses the JSON histories.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
from contextlib import contextmanager

from . import sqlite_schema as schema
from .base import SessionNotFound, SessionRecord, SessionSnapshot, SessionStore, StoreStats
from .clock import SteadyClock
from .leases import (Failures, Probed, LocalLocks, Reentry, acquire_turn, host_identity, pid_alive, release_turn,
                     store_call)

ERRORS = (sqlite3.Error,)
COLUMNS = ("id, owner, created, last_active, turns, tokens, truncations, version, n_messages, "
           "system, messages")
_LEASED = "SELECT s.id, l.token, l.pid, l.host, l.expires FROM sessions s LEFT JOIN leases l " \
          "ON l.session_id = s.id "
_SLACK_S = 1.0  # index range wider than the exact TTL test that follows it (float rounding)


def _record(row) -> SessionRecord:
    sid, owner, created, last_active, turns, tokens, truncations, version, _n, system, messages = row
    return SessionRecord(sid, owner, created, last_active, system,
                         tuple((r, c) for r, c in json.loads(messages)), turns, tokens, truncations,
                         version)


def _row(rec: SessionRecord) -> tuple:
    return (rec.id, rec.owner, rec.created, rec.last_active, rec.turns, rec.tokens, rec.truncations,
            rec.version, len(rec.messages), rec.system, _dump(rec.messages))


def _dump(pairs) -> str:
    return json.dumps([list(p) for p in pairs], ensure_ascii=False, separators=(",", ":"))


class SQLiteStore(Probed, SessionStore):
    """Sessions in one SQLite file; safe for many threads and processes on one host."""

    _errors = ERRORS

    def __init__(self, policy, count_tokens, *, path: str, busy_timeout_s: float = 5.0, **kwargs):
        super().__init__(policy, count_tokens, **kwargs)
        self.path = path
        self._busy_timeout_s = busy_timeout_s
        self._tls = threading.local()
        self._conns_mu = threading.Lock()
        self._conns: dict[int, tuple[threading.Thread, sqlite3.Connection]] = {}
        self._locks = LocalLocks()
        self._reentry = Reentry()
        self._host = host_identity()
        self._closed = False
        self._failures = Failures()
        conn = self._register(schema.open_file(path, busy_timeout_s))  # StoreUnavailable if unusable
        try:
            offset = schema.clock_anchor(conn, schema.boot_id())
        except sqlite3.Error as exc:
            raise schema.unavailable(path, exc) from None
        if offset is not None:
            self.steady = SteadyClock(offset)

    # -- public API ---------------------------------------------------------------------------------

    @store_call("create", ERRORS)
    def create(self, owner, system=None) -> SessionSnapshot:
        """Start a session; expired sessions go first, then the owner's least recently active beyond
        its quota, then, beyond max_sessions, the least recently active of the owner holding most."""
        record = self._new_record(owner, system)
        with self._write(durable=True) as conn:
            expired = self._expire_all(conn, record.created)
            conn.execute(f"INSERT INTO sessions ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)", _row(record))
            quota, evicted = self._evict(conn, record.id, owner)
        self._notify_evict("ttl", expired)
        self._notify_evict("quota", quota)
        self._notify_evict("lru", evicted)
        return record.snapshot()

    @store_call("get", ERRORS)
    def get(self, session_id, owner) -> SessionSnapshot:
        """The session as stored; SessionNotFound if unknown, expired or another owner's."""
        row = self._conn().execute(f"SELECT {COLUMNS} FROM sessions WHERE id = ?", (session_id,)).fetchone()
        if row is None:
            raise SessionNotFound()
        record = _record(row)
        if self.policy.expired(record.last_active, self.clock()) and self._expire_one(session_id):
            raise SessionNotFound()
        if record.owner != owner:
            raise SessionNotFound()
        return record.snapshot()

    @store_call("delete", ERRORS)
    def delete(self, session_id, owner) -> None:
        """Remove a session; a turn in progress on it then fails to commit with SessionNotFound."""
        with self._write(durable=True) as conn:
            row = conn.execute("SELECT owner, last_active FROM sessions WHERE id = ?", (session_id,)).fetchone()
            if row is None:
                outcome = "missing"
            else:  # like a read: an idle session expires first, whoever asks
                outcome = self._expire_if_idle(conn, session_id, row[1]) or \
                    ("missing" if row[0] != owner else "deleted")
            if outcome == "deleted":
                self._remove(conn, [session_id])
        if outcome == "missing":
            raise SessionNotFound()
        self._notify_evict(outcome, 1)
        if outcome == "ttl":
            raise SessionNotFound()

    @store_call("sweep", ERRORS)
    def sweep(self) -> int:
        """Expire idle sessions now and give freed pages back to the file system."""
        with self._write() as conn:
            expired = self._expire_all(conn, self.clock())
        self._notify_evict("ttl", expired)
        conn = self._sync(self._conn(), False)
        if conn.execute("PRAGMA freelist_count").fetchone()[0]:
            # each step of the pragma frees one page; executescript steps it to the end (execute
            # would stop after the first), then the checkpoint moves the shrunken file out of the
            # WAL and truncates the WAL itself
            conn.executescript("PRAGMA incremental_vacuum; PRAGMA wal_checkpoint(TRUNCATE);")
        return expired

    @store_call("stats", ERRORS)
    def stats(self) -> StoreStats:
        """Gauges from cached per-row counts (no JSON parsed); expires idle sessions first."""
        return self._aggregate("", ())

    @store_call("stats", ERRORS)
    def owner_stats(self, owner) -> StoreStats:
        """The same over one owner's sessions (the owner index)."""
        return self._aggregate("WHERE owner IS ?", (owner,))

    def _aggregate(self, where: str, args: tuple) -> StoreStats:
        conn, now = self._conn(), self.clock()
        expired = 0
        if self.policy.ttl_s and self._expired_ids(conn, now):  # a read first: no write lock when idle
            with self._write() as conn:
                expired = self._expire_all(conn, now)
        count, total, longest, tokens = conn.execute(
            "SELECT count(*), total(n_messages), max(n_messages), max(tokens) FROM sessions " + where,
            args).fetchone()
        self._notify_evict("ttl", expired)
        return StoreStats(count, int(total), longest or 0, tokens or 0, store_bytes=self.file_bytes())

    def file_bytes(self) -> int:
        """The session file plus its write-ahead log, in bytes."""
        size = 0
        for name in (self.path, self.path + "-wal"):
            try:
                size += os.stat(name).st_size
            except FileNotFoundError:  # no WAL between checkpoint-and-close and the next write
                pass
        return size

    def healthy(self) -> bool:
        """Open, and the tables answer a read (failed writes: `writable`)."""
        if self._closed:
            return False
        try:
            conn = self._conn()
            conn.execute("SELECT version FROM schema_version").fetchone()
            conn.execute("SELECT 1 FROM sessions LIMIT 1").fetchone()
            conn.execute("SELECT 1 FROM leases LIMIT 1").fetchone()
        except sqlite3.Error as exc:  # the probe's failure is the answer
            self._failures.last = f"read: {type(exc).__name__}: {exc}"
            return False
        return True

    @store_call("probe", ERRORS)
    def _probe(self) -> None:
        with self._write() as conn:  # a page really written (and fsynced at the checkpoint)
            conn.execute("UPDATE schema_version SET version = version")

    def close(self) -> None:
        """Close every thread's connection; later calls raise RuntimeError."""
        self._closed = True
        with self._conns_mu:
            conns, self._conns = list(self._conns.values()), {}
        for _thread, conn in conns:
            conn.close()

    # -- turn primitives ----------------------------------------------------------------------------

    def _acquire(self, session_id, owner, timeout):
        return acquire_turn(self, session_id, timeout,
                            lambda token: self._try_lease(session_id, owner, token), ERRORS)

    def _release(self, session_id, lease):
        release_turn(self, session_id, lease, self._dropper(session_id, lease), ERRORS)

    def _dropper(self, session_id: str, token: str):
        """What drops this lease (if it is still ours), for a release now or a retry later."""
        def drop() -> None:
            if not self._closed:
                self._sync(self._conn(), False).execute(
                    "DELETE FROM leases WHERE session_id = ? AND token = ?", (session_id, token))
        return drop

    @store_call("commit", ERRORS)
    def _commit(self, before, after):
        values = (after.last_active, after.turns, after.tokens, after.truncations, after.version,
                  len(after.messages), _dump(after.messages), before.id, before.version)
        with self._write(durable=True) as conn:
            updated = conn.execute(
                "UPDATE sessions SET last_active = ?, turns = ?, tokens = ?, truncations = ?, version = ?, "
                "n_messages = ?, messages = ? WHERE id = ? AND version = ?", values).rowcount
        if updated != 1:
            raise SessionNotFound("session was deleted or evicted during the turn")

    # -- internals ----------------------------------------------------------------------------------

    def _try_lease(self, session_id, owner, token) -> SessionRecord | None:
        """One attempt: the record with our lease taken, None while another turn holds it."""
        outcome, record = "missing", None
        with self._write() as conn:
            row = conn.execute(f"SELECT {COLUMNS} FROM sessions WHERE id = ?", (session_id,)).fetchone()
            if row is not None:
                record = _record(row)
                outcome = self._expire_if_idle(conn, session_id, record.last_active) or \
                    ("missing" if record.owner != owner else None)
            if outcome is None:
                if self._leased(conn, session_id):
                    outcome = "busy"
                else:
                    conn.execute("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?, ?)",
                                 (session_id, token, os.getpid(), self._host, self.steady() + self.lease_s))
                    outcome = "ok"
        if outcome == "ttl":
            self._notify_evict("ttl", 1)
        if outcome in ("missing", "ttl"):
            raise SessionNotFound()
        return record if outcome == "ok" else None

    def _live(self, lease_pid, lease_host, expires, now: float) -> bool:
        """A lease holds until it expires, or until its process is gone from this host."""
        if expires <= now:
            return False
        return not (self._host and lease_host == self._host and not pid_alive(lease_pid))

    def _leased(self, conn, session_id: str) -> bool:
        row = conn.execute("SELECT pid, host, expires, token FROM leases WHERE session_id = ?",
                           (session_id,)).fetchone()
        if row is not None and (session_id, row[3]) in self._failures.unreleased:
            return False  # ours, from a turn whose release failed: that turn is over
        return row is not None and self._live(*row[:3], self.steady())

    def _expire_if_idle(self, conn, session_id: str, last_active: float) -> str | None:
        """Inside a write: delete the session if idle past the TTL and not in a turn; "ttl" if so."""
        if self.policy.expired(last_active, self.clock()) and not self._leased(conn, session_id):
            self._remove(conn, [session_id])
            return "ttl"
        return None

    def _expire_one(self, session_id: str) -> bool:
        """Expire one session seen idle by a read; True when it is gone (counted if we removed it)."""
        with self._write() as conn:
            row = conn.execute("SELECT last_active FROM sessions WHERE id = ?", (session_id,)).fetchone()
            outcome = "gone" if row is None else self._expire_if_idle(conn, session_id, row[0])
        if outcome == "ttl":
            self._notify_evict("ttl", 1)
        return outcome is not None

    def _expired_ids(self, conn, now: float) -> list[str]:
        """Idle-past-TTL sessions that no live lease protects."""
        ttl, wall = self.policy.ttl_s, self.steady()
        rows = conn.execute(_LEASED + "WHERE s.last_active <= ? AND ? - s.last_active >= ?",
                            (now - ttl + _SLACK_S, now, ttl)).fetchall()
        return [sid for sid, token, pid, host, expires in rows
                if token is None or not self._live(pid, host, expires, wall)]

    def _expire_all(self, conn, now: float) -> int:
        if not self.policy.ttl_s:
            return 0
        victims = self._expired_ids(conn, now)
        self._remove(conn, victims)
        return len(victims)

    def _evict(self, conn, keep: str, owner) -> tuple[int, int]:
        """After inserting `keep` for `owner`: (evicted for the owner's quota, evicted beyond
        max_sessions from the owner holding most), least recently active idle sessions first."""
        count = "SELECT count(*) FROM sessions WHERE owner IS ?"
        quota = self._evict_owned(conn, keep, owner, conn.execute(count, (owner,)).fetchone()[0]
                                  - self.policy.per_key) if self.policy.per_key else 0
        evicted = 0
        limit = self.policy.max_sessions
        excess = conn.execute("SELECT count(*) FROM sessions").fetchone()[0] - limit if limit else 0
        while excess > 0:
            largest = conn.execute("SELECT owner FROM sessions GROUP BY owner ORDER BY count(*) DESC, "
                                   "min(last_active) LIMIT 1").fetchone()
            if largest is None or not self._evict_owned(conn, keep, largest[0], 1):
                break
            evicted, excess = evicted + 1, excess - 1
        return quota, evicted

    def _evict_owned(self, conn, keep: str, owner, excess: int) -> int:
        """Evict up to `excess` of `owner`'s least recently active sessions, never `keep` or one in a turn."""
        victims, wall = [], self.steady()
        if excess > 0:
            for sid, token, pid, host, expires in conn.execute(
                    _LEASED + "WHERE s.owner IS ? AND s.id != ? ORDER BY s.last_active, s.rowid",
                    (owner, keep)):
                if token is None or not self._live(pid, host, expires, wall):
                    victims.append(sid)
                    if len(victims) >= excess:
                        break
        self._remove(conn, victims)
        return len(victims)

    @staticmethod
    def _remove(conn, ids: list[str]) -> None:
        for start in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            conn.execute(f"DELETE FROM sessions WHERE id IN ({marks})", chunk)
            conn.execute(f"DELETE FROM leases WHERE session_id IN ({marks})", chunk)

    @contextmanager
    def _write(self, durable: bool = False):
        """One IMMEDIATE transaction (the write lock up front: no deadlock between readers that upgrade).

        durable: fsync at commit (sessions created, turns, deletions). Leases and expiry need not
        survive power loss (a lost lease frees its session; a lost expiry is redone), so they skip
        the fsync — in WAL mode that never corrupts the file, and the next durable commit syncs them.
        """
        conn = self._sync(self._conn(), durable)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # also after a failed COMMIT (disk full, I/O error)
                conn.execute("ROLLBACK")
            raise

    def _sync(self, conn: sqlite3.Connection, durable: bool) -> sqlite3.Connection:
        if self._tls.durable is not durable:
            conn.execute("PRAGMA synchronous = FULL" if durable else "PRAGMA synchronous = NORMAL")
            self._tls.durable = durable
        return conn

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (a new one after fork or for a new thread)."""
        conn = getattr(self._tls, "conn", None)
        if conn is not None and self._tls.pid == os.getpid() and not self._closed:
            return conn
        if self._closed:
            raise RuntimeError("session store is closed")
        return self._register(schema.connect(self.path, self._busy_timeout_s))

    def _register(self, conn: sqlite3.Connection) -> sqlite3.Connection:
        me = threading.current_thread()
        self._tls.conn, self._tls.pid, self._tls.durable = conn, os.getpid(), True
        with self._conns_mu:
            # threads come and go (a dev server's thread per request): close their connections
            dead = [key for key, (thread, _c) in self._conns.items() if not thread.is_alive()]
            stale = [self._conns.pop(key)[1] for key in dead]
            self._conns[me.ident] = (me, conn)
        for old in stale:
            old.close()
        return conn

