"""The SQLite session file: its versioned schema, the migrations run at startup, and clear startup errors.

Schema versions (table `schema_version`, one row):
  1  sessions (JSON messages last in the row) + leases (the cross-process turn lock)
  2  sessions rebuilt with `n_messages` cached *before* the JSON, so stats() never parses JSON nor
     reads a long history's overflow pages (SQLite reads a row's columns front to back)
  3  an index by owner (and last_active): per-key quotas, eviction and stats
Each migration runs in one IMMEDIATE transaction (two workers starting together: one migrates, the
other waits on busy_timeout, then finds nothing left to do).
"""
from __future__ import annotations

import os
import sqlite3
import time

from .base import StoreUnavailable
from .clock import boottime

SETTING = "session_store"
LATEST = 3

_SESSIONS_V1 = """CREATE TABLE sessions (
    id TEXT PRIMARY KEY NOT NULL, owner TEXT, created REAL NOT NULL, last_active REAL NOT NULL,
    turns INTEGER NOT NULL, tokens INTEGER NOT NULL, truncations INTEGER NOT NULL,
    version INTEGER NOT NULL, system TEXT, messages TEXT NOT NULL)"""
_SESSIONS_V2 = """CREATE TABLE sessions (
    id TEXT PRIMARY KEY NOT NULL, owner TEXT, created REAL NOT NULL, last_active REAL NOT NULL,
    turns INTEGER NOT NULL, tokens INTEGER NOT NULL, truncations INTEGER NOT NULL,
    version INTEGER NOT NULL, n_messages INTEGER NOT NULL, system TEXT, messages TEXT NOT NULL)"""

MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (_SESSIONS_V1,
        "CREATE INDEX sessions_last_active ON sessions (last_active)",
        """CREATE TABLE leases (session_id TEXT PRIMARY KEY NOT NULL, token TEXT NOT NULL,
           pid INTEGER NOT NULL, host TEXT NOT NULL, expires REAL NOT NULL)"""),
    2: (_SESSIONS_V2.replace("CREATE TABLE sessions", "CREATE TABLE sessions_v2"),
        """INSERT INTO sessions_v2 SELECT id, owner, created, last_active, turns, tokens, truncations,
           version, json_array_length(messages), system, messages FROM sessions""",
        "DROP TABLE sessions",
        "ALTER TABLE sessions_v2 RENAME TO sessions",
        "CREATE INDEX sessions_last_active ON sessions (last_active)"),
    3: ("CREATE INDEX sessions_owner ON sessions (owner, last_active)",),
}


def path_from_url(url: str) -> str:
    """The file of `sqlite:///abs/path.db` (also `sqlite:////abs/path.db`); ValueError otherwise."""
    rest = url[len("sqlite://"):] if url.startswith("sqlite://") else ""
    if not rest.startswith("/") or "?" in rest or "#" in rest or rest.endswith("/"):
        raise ValueError(f"{SETTING}: a SQLite store is sqlite:///absolute/path/to/file.db "
                         f"(no query string), got {url!r}")
    return "/" + rest.lstrip("/")


def connect(path: str, busy_timeout_s: float) -> sqlite3.Connection:
    """A connection with the pragmas every connection needs (WAL is a property of the file)."""
    conn = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None,
                           check_same_thread=False)  # used by one thread; close() may come from another
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    conn.execute("PRAGMA synchronous = FULL")  # the store relaxes it per transaction where loss is harmless
    return conn


def open_file(path: str, busy_timeout_s: float) -> sqlite3.Connection:
    """Create or open the session file, check it, migrate it to LATEST; StoreUnavailable if unusable."""
    try:
        _create(path)
        conn = connect(path, busy_timeout_s)
    except (OSError, sqlite3.Error) as exc:
        raise unavailable(path, exc) from None
    try:
        # must precede the first table; a no-op on a file that has tables already
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise sqlite3.OperationalError(f"could not switch to WAL (journal_mode is {mode})")
        # after a checkpoint the WAL is cut back to this size, so it cannot only ever grow
        conn.execute("PRAGMA journal_size_limit = 4194304")
        problems = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError("integrity check failed: " + "; ".join(problems[:3]))
        migrate(conn)
    except (OSError, sqlite3.Error) as exc:
        conn.close()
        raise unavailable(path, exc) from None
    except StoreUnavailable:
        conn.close()
        raise
    return conn


def clock_anchor(conn: sqlite3.Connection, boot: str) -> float | None:
    """This boot's clock anchor (wall time minus boot time, clock.py), set by the first process
    after the boot and kept in the file, so every process of the host agrees on "now" and a
    wall-clock step after it moves none of them; None where the boot cannot be told apart."""
    if not boot:
        return None
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS clock (boot TEXT PRIMARY KEY, offset REAL NOT NULL)")
        conn.execute("DELETE FROM clock WHERE boot != ?", (boot,))
        conn.execute("INSERT OR IGNORE INTO clock VALUES (?, ?)", (boot, time.time() - boottime()))
        offset = conn.execute("SELECT offset FROM clock WHERE boot = ?", (boot,)).fetchone()[0]
        conn.execute("COMMIT")
        return float(offset)
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def version_of(conn: sqlite3.Connection) -> int:
    """The file's schema version (0: a new, empty file)."""
    has = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_version'"
                       ).fetchone()
    if not has:
        return 0
    row = conn.execute("SELECT version FROM schema_version").fetchone()
    return int(row[0]) if row else 0


def migrate(conn: sqlite3.Connection, target: int = LATEST) -> int:
    """Bring the file to `target` in one transaction; returns the version found before."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        found = version_of(conn)
        if found > LATEST:
            raise StoreUnavailable(f"{SETTING}: the SQLite file has schema version {found}, newer than "
                                   f"this edgechat understands ({LATEST}); upgrade edgechat or point "
                                   f"{SETTING} at another file")
        if found == 0:
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO schema_version VALUES (0)")
        for version in range(found + 1, target + 1):
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
        if target > found:
            conn.execute("UPDATE schema_version SET version = ?", (target,))
        conn.execute("COMMIT")
        return found
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def boot_id() -> str:
    """This boot's id ("" where /proc does not say)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def _create(path: str) -> None:
    """Make the folder (0700) and an empty file (0600): sessions are private; SQLite's WAL and
    shared-memory files copy the main file's mode."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))


def unavailable(path: str, exc: BaseException) -> StoreUnavailable:
    """StoreUnavailable naming the file, the reason and what to do."""
    reason = " ".join((getattr(exc, "strerror", None) or str(exc)).split())  # one line
    text = str(exc).lower()
    if "not a database" in text or "malformed" in text or "integrity" in text:
        hint = "the file is corrupt or not SQLite: move it aside (sessions are lost) or"
    elif "locked" in text or "busy" in text:
        hint = "another process holds it locked: stop it, or"
    elif isinstance(exc, PermissionError) or "readonly" in text or "unable to open" in text:
        hint = "make the file and its folder writable by the daemon's user, or"
    else:
        hint = "fix it, or"
    return StoreUnavailable(f"{SETTING}: cannot use the SQLite file {path}: {reason}; {hint} point "
                            f"{SETTING} (EDGECHAT_SESSION_STORE) at another file")
