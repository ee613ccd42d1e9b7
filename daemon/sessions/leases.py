"""Turn locks for shared stores (SQLite, Redis): a local lock per session, then a store lease polled with backoff.

Threads of one worker queue on an in-process lock (woken at once, no polling); only the thread that
holds it polls the store's lease, which serializes turns across processes and hosts. A lease expires
on its own (a kill -9'd worker cannot hold a session forever), so its duration must exceed the
longest turn.

Garbage collection may finalize an abandoned Turn, and so release its lease, in the middle of any
store call on the same thread (inside an open SQLite transaction, or while redis-py holds its pool
lock). `Reentry` detects that and runs such releases right after the interrupted call instead.
"""
from __future__ import annotations

import functools
import logging
import os
import random
import secrets
import threading
import time
from collections import deque
from typing import Callable, TypeVar

from ..telemetry.labels import STORE_WRITES
from .base import SessionBusy, SessionRecord, StoreFailure, timed

log = logging.getLogger("edgechat.sessions")
T = TypeVar("T")
FIRST_DELAY_S = 0.005
MAX_DELAY_S = 0.1


class LocalLocks:
    """Per-session in-process locks, created on demand and dropped when nobody holds or waits."""

    def __init__(self):
        self._mu = threading.Lock()
        self._locks: dict[str, list] = {}  # id -> [lock, holders + waiters]

    def acquire(self, session_id: str, timeout: float | None) -> bool:
        """Take the session's local lock within timeout (None = wait forever)."""
        with self._mu:
            entry = self._locks.setdefault(session_id, [threading.Lock(), 0])
            entry[1] += 1
        if entry[0].acquire(timeout=-1 if timeout is None else max(timeout, 0)):
            return True
        self._drop(session_id)
        return False

    def release(self, session_id: str) -> None:
        """Give the local lock back (any thread may: a finalizer releases for its turn)."""
        self._locks[session_id][0].release()
        self._drop(session_id)

    def __len__(self) -> int:
        return len(self._locks)

    def _drop(self, session_id: str) -> None:
        with self._mu:
            entry = self._locks[session_id]
            entry[1] -= 1
            if not entry[1]:
                del self._locks[session_id]


def poll(attempt: Callable[[], T | None], deadline: float | None) -> T:
    """Call attempt() until it returns non-None, sleeping with jittered exponential backoff.

    deadline is a time.monotonic() value (None = forever); past it, SessionBusy.
    """
    delay = FIRST_DELAY_S
    while True:
        result = attempt()
        if result is not None:
            return result
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise SessionBusy("another turn on this session is in progress")
        pause = delay * random.uniform(0.5, 1.0)  # jitter: waiters in several processes drift apart
        time.sleep(pause if remaining is None else min(pause, remaining))
        delay = min(delay * 2, MAX_DELAY_S)


def deadline_of(timeout: float | None) -> float | None:
    """The monotonic deadline for a timeout in seconds (None = none)."""
    return None if timeout is None else time.monotonic() + max(timeout, 0.0)


def remaining(deadline: float | None) -> float | None:
    """Seconds left until deadline (None = unbounded), never negative."""
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


class Reentry:
    """Tracks store calls per thread; a release that arrives inside one is deferred to its end."""

    def __init__(self):
        self._tls = threading.local()
        self._pending: deque = deque()

    def enter(self) -> None:
        """A store call starts on this thread."""
        self._tls.depth = getattr(self._tls, "depth", 0) + 1

    def leave(self) -> None:
        """A store call ends; the outermost one runs the releases deferred meanwhile."""
        self._tls.depth -= 1
        if not self._tls.depth and self._pending:
            self._drain()

    def inside(self) -> bool:
        """Whether this thread is in the middle of a store call."""
        return bool(getattr(self._tls, "depth", 0))

    def defer(self, fn: Callable, *args) -> None:
        """Run fn(*args) when this thread's current store call ends."""
        self._pending.append((fn, args))

    def _drain(self) -> None:
        self._tls.depth = 1
        try:
            while self._pending:
                fn, args = self._pending.popleft()
                try:
                    fn(*args)
                except Exception:  # noqa: BLE001 - a failed deferred release only delays until lease expiry
                    log.exception("deferred session release failed")
        finally:
            self._tls.depth = 0


def host_identity() -> str:
    """This machine's boot and pid namespace: a lease's pid means something only where they match."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:  # not Linux, or /proc hidden: leases then end by expiry only
        return ""
    return f"{boot}/{namespace}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists here (a zombie counts as alive until reaped)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class Failures:
    """A shared store's run-time failures: the last one (for /readyz), whether writes fail, and the
    leases whose release failed (retried, so the session is not busy until the lease expires)."""

    def __init__(self) -> None:
        self.last: str | None = None
        self.writes_fail = False
        self.unreleased: dict[tuple[str, str], Callable[[], None]] = {}  # (id, token) -> drop

    def retry_releases(self, errors: tuple, session_id: str | None = None) -> None:
        """Drop the leases left behind by failed releases (of one session, or all) now."""
        for key, drop in list(self.unreleased.items()):
            if session_id is None or key[0] == session_id:
                try:
                    drop()
                except errors:
                    continue
                self.unreleased.pop(key, None)

    def failed(self, store, operation: str, exc: BaseException) -> StoreFailure:
        """Record a backend error of `operation`; the StoreFailure to raise in its place."""
        self.last = f"{operation}: {type(exc).__name__}: {exc}"
        if operation in STORE_WRITES:
            self.writes_fail = True
        store._notify_error(operation)
        return StoreFailure(operation, exc)

    def succeeded(self, operation: str) -> None:
        """A call of `operation` worked: a write clears the write failure, any call the last error."""
        if operation in STORE_WRITES:
            self.writes_fail = False
        self.last = None if not self.writes_fail else self.last


class Probed:
    """A shared store's failures as /readyz reports them, and its write probe: the store sets `_failures`,
    `_errors` (its backend's exceptions) and defines `_probe` (one tiny write)."""

    _failures: Failures
    _errors: tuple

    @property
    def writable(self) -> bool:
        """False from a failed write until a write succeeds again."""
        return not self._failures.writes_fail

    def last_error(self) -> str | None:
        """The last failure, while it stands."""
        return self._failures.last

    def probe_write(self) -> bool:
        """One tiny write now; `writable` after it (a success also retries the leases left behind)."""
        try:
            self._probe()
        except StoreFailure:
            return self.writable
        self._failures.retry_releases(self._errors)
        return self.writable


def store_call(operation: str, errors: tuple):
    """Decorate a shared store's method: timed, guarded against re-entry from GC, and `errors`
    (the backend's own exceptions) recorded (store._failures) and raised as StoreFailure, which the
    API answers with 503 store_unavailable."""
    def wrap(method):
        @functools.wraps(method)
        @timed(operation)
        def run(self, *args, **kwargs):
            self._reentry.enter()
            try:
                result = method(self, *args, **kwargs)
            except errors as exc:
                raise self._failures.failed(self, operation, exc) from exc
            finally:
                self._reentry.leave()
            self._failures.succeeded(operation)
            return result
        return run
    return wrap


def acquire_turn(store, session_id: str, timeout: float | None,
                 try_lease: Callable[[str], SessionRecord | None], errors: tuple) -> tuple[SessionRecord, str]:
    """The local lock, then try_lease(token) until it returns the record; (record, token) as the lease.

    Observed as one "acquire": the store's time over all attempts, not the wait for a busy session.
    """
    deadline = deadline_of(timeout)
    if not store._locks.acquire(session_id, remaining(deadline)):
        store._observe_op("acquire", 0.0)
        raise SessionBusy("another turn on this session is in progress")
    store._failures.retry_releases(errors, session_id)  # our own lease a failed release left
    token, spent = secrets.token_hex(16), [0.0]

    def attempt() -> SessionRecord | None:
        t0 = time.perf_counter()
        store._reentry.enter()
        try:
            record = try_lease(token)
        except errors as exc:
            # a timed-out attempt may still be carried out by the store later (a paused Redis runs
            # it when it resumes): the lease may be ours without our knowing, so drop it at retry
            store._failures.unreleased[(session_id, token)] = store._dropper(session_id, token)
            raise store._failures.failed(store, "acquire", exc) from exc
        finally:
            store._reentry.leave()
            spent[0] += time.perf_counter() - t0
        store._failures.succeeded("acquire")
        return record

    try:
        return poll(attempt, deadline), token
    except BaseException:
        store._locks.release(session_id)
        raise
    finally:
        store._observe_op("acquire", spent[0])


def release_turn(store, session_id: str, token: str, drop_lease: Callable[[], None], errors: tuple) -> None:
    """Drop the store lease (deferred if GC interrupted a store call), then the local lock."""
    if store._reentry.inside():
        store._reentry.defer(release_turn, store, session_id, token, drop_lease, errors)
        return
    t0 = time.perf_counter()
    try:
        drop_lease()
    except errors as exc:  # retried at the next turn on the session and by the write probe
        store._failures.failed(store, "release", exc)
        store._failures.unreleased[(session_id, token)] = drop_lease
        log.warning("could not release a session lease (retried): %s", exc)
    finally:
        store._locks.release(session_id)
        store._observe_op("release", time.perf_counter() - t0)
