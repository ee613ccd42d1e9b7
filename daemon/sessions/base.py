"""Session store contract: the turn lifecycle every backend (memory, SQLite, Redis) shares; trimming is in policy.py.

A backend persists `SessionRecord`s (plain strings and numbers only) and supplies three primitives the
shared turn lifecycle is built on: `_acquire` (per-session lock + load), `_release`, and `_commit` (one
atomic compare-and-swap on the record's `version`, i.e. one transaction / one Lua script).

Token counting is injected and assumed expensive and not additive (a chat template wraps the messages),
so it is only ever called on whole candidate prompts: once for the prompt and once for the stored history
in the common case, and O(log turns) times when trimming by tokens (binary search over how many oldest
turns to drop). Each record caches its token total, so get() and stats() never tokenize.
"""
from __future__ import annotations

import functools
import secrets
import time
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

from ..telemetry.labels import STORE_OPERATIONS, STORE_WRITES
from .clock import SteadyClock
from .policy import CountTokens, HistoryPolicy, Message, Pairs, Trimmed, count_prompt, as_messages, trim_history

__all__ = ["CountTokens", "HistoryPolicy", "Message", "Pairs", "Trimmed", "as_messages", "trim_history",
           "STORE_OPERATIONS"]


@dataclass(frozen=True)
class SessionSnapshot:
    """A read-only copy of one session, safe to hand to the API layer."""

    id: str
    owner: str | None
    created: float
    last_active: float
    system: str | None
    messages: tuple[dict, ...]  # stored history, system prompt NOT included
    turns: int                  # turns ever committed in this session
    tokens: int                 # count_tokens(system + messages)
    truncations: int            # messages dropped by trimming, cumulative


class SessionNotFound(LookupError):
    """Unknown, expired, or owned by another key (the message never contains the id: it is a secret)."""

    def __init__(self, message: str = "session not found"):
        super().__init__(message)


class SessionBusy(RuntimeError):
    """The per-session lock was not acquired within the timeout."""


class StoreUnavailable(ValueError):
    """The configured store cannot be used (corrupt, locked, unwritable, unreachable): a startup error.

    A ValueError so `edgechat serve` reports it like any invalid setting; the message names
    `session_store` and never contains a URL's password.
    """


class StoreFailure(RuntimeError):
    """The store failed an operation at run time (disk full, read-only, locked past its busy
    timeout, unreachable): nothing of the operation happened. `write`: it was a write."""

    def __init__(self, operation: str, cause: BaseException):
        super().__init__(f"session store {operation} failed: {type(cause).__name__}: {cause}")
        self.operation = operation
        self.write = operation in STORE_WRITES




class ContextTooLong(ValueError):
    """System prompt + new user message alone (or the untrimmed prompt in leak mode) exceed max_tokens."""

    def __init__(self, tokens: int, limit: int):
        super().__init__(f"prompt needs {tokens} tokens, the limit is {limit}")
        self.tokens = tokens
        self.limit = limit


@dataclass(frozen=True)
class TurnResult:
    """What a committed turn produced."""

    session: SessionSnapshot  # after commit
    turn: int                 # 1-based index of the committed turn
    truncated: int            # messages this turn's trimming dropped (prompt-time + commit-time)


class StoreListener(Protocol):
    """Metrics hook; the store never imports metrics."""

    def on_truncate(self, reason: str, messages: int) -> None: ...  # reason "turns" | "tokens"

    def on_evict(self, reason: str, sessions: int) -> None: ...     # reason "ttl" | "lru" | "deleted"

    # operation is one of STORE_OPERATIONS: every public call and each turn primitive
    def on_store_op(self, operation: str, seconds: float) -> None: ...

    def on_store_error(self, operation: str) -> None: ...  # the operation failed (StoreFailure)


def timed(operation: str):
    """Decorate a store method so its duration reaches the listener's on_store_op(operation, s)."""
    def wrap(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                self._observe_op(operation, time.perf_counter() - t0)
        return run
    return wrap


@dataclass(frozen=True)
class StoreStats:
    """Cheap aggregate gauges over live sessions."""

    sessions: int
    messages_total: int
    messages_max: int
    tokens_max: int
    # bytes the store occupies on disk (SQLite file + WAL); None where not measured (memory, Redis)
    store_bytes: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class SessionRecord:
    """What a backend persists for one session: plain strings and numbers, so it maps to a row or a hash."""

    id: str
    owner: str | None
    created: float
    last_active: float
    system: str | None
    messages: Pairs
    turns: int
    tokens: int
    truncations: int
    version: int = 0  # bumped by every commit; a commit is written only if the stored version still matches

    def snapshot(self) -> SessionSnapshot:
        """A snapshot with fresh message dicts, so callers cannot mutate stored history."""
        return SessionSnapshot(self.id, self.owner, self.created, self.last_active, self.system,
                               tuple({"role": r, "content": c} for r, c in self.messages),
                               self.turns, self.tokens, self.truncations)


def new_session_id() -> str:
    """An unguessable session id: 192 random bits, URL-safe."""
    return secrets.token_urlsafe(24)


def require_text(name: str, value: object, *, optional: bool = False) -> None:
    """Reject anything but a str (sessions must hold only plain strings, never tensors or objects)."""
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")


class Turn:
    """One turn in progress: holds the session's lock until closed; commit() stores it atomically.

    Use as a context manager; leaving the block (or close(), or garbage collection of an abandoned
    Turn) releases the lock. Without commit() the session stays exactly as it was.
    """

    def __init__(self, store: "SessionStore", record: SessionRecord, lease: object,
                 user_content: str, plan: Trimmed):
        self._store, self._before, self._user, self._plan = store, record, user_content, plan
        self.session: SessionSnapshot = record.snapshot()  # before the turn
        self.prompt: list[dict] = as_messages(record.system, plan.history + (("user", user_content),))
        self.prompt_tokens: int = plan.tokens
        self.index: int = record.turns + 1
        self.dropped: int = plan.by_turns + plan.by_tokens
        self.result: TurnResult | None = None
        # finalize runs at most once: close(), block exit and GC of a forgotten Turn all share it
        self._release = weakref.finalize(self, store._release, record.id, lease)
        self._release.atexit = False

    def commit(self, assistant_content: str) -> TurnResult:
        """Append user + assistant, trim per policy, bump last_active: one atomic write."""
        if not self._release.alive:
            raise RuntimeError("turn is closed; commit inside its with block")
        if self.result is not None:
            raise RuntimeError("turn already committed")
        require_text("assistant_content", assistant_content)
        store, before, plan = self._store, self._before, self._plan
        pairs = plan.history + (("user", self._user), ("assistant", assistant_content))
        kept = trim_history(store.policy, store.count_tokens, before.system, pairs)
        by_turns, by_tokens = plan.by_turns + kept.by_turns, plan.by_tokens + kept.by_tokens
        after = replace(before, messages=kept.history, turns=before.turns + 1, tokens=kept.tokens,
                        truncations=before.truncations + by_turns + by_tokens,
                        last_active=store.clock(), version=before.version + 1)
        store._commit(before, after)
        store._notify_truncate("turns", by_turns)
        store._notify_truncate("tokens", by_tokens)
        self.result = TurnResult(after.snapshot(), self.index, by_turns + by_tokens)
        return self.result

    def close(self) -> None:
        """Release the session lock (idempotent); an uncommitted turn leaves no trace."""
        self._release()

    def __enter__(self) -> "Turn":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SessionStore(ABC):
    """Bounded per-session chat history; backends implement storage, the turn lifecycle is shared."""

    def __init__(self, policy: HistoryPolicy, count_tokens: CountTokens, *,
                 clock: Callable[[], float] | None = None, listener: StoreListener | None = None,
                 lease_s: float = 300.0):
        """clock: Unix seconds for TTLs and timestamps; None = the store's steady clock (clock.py),
        which wall-clock steps do not move. lease_s: how long a turn may hold a shared store's
        session lock before another process may take it over (must exceed the longest turn: queue
        wait + generation timeout)."""
        if not lease_s > 0:
            raise ValueError(f"lease_s must be > 0, got {lease_s!r}")
        self.policy = policy
        self.count_tokens = count_tokens
        self.steady = SteadyClock()  # backends that share a store re-anchor it on the store's clock
        self.clock = clock if clock is not None else (lambda: self.steady())
        self.listener = listener
        self.lease_s = float(lease_s)

    @abstractmethod
    def create(self, owner: str | None, system: str | None = None) -> SessionSnapshot:
        """Start a session, LRU-evicting the least recently active idle ones beyond max_sessions;
        ContextTooLong (nothing stored) when the system prompt leaves no room for a message."""

    @abstractmethod
    def get(self, session_id: str, owner: str | None) -> SessionSnapshot:
        """The session as stored; SessionNotFound if unknown, expired or another owner's."""

    @abstractmethod
    def delete(self, session_id: str, owner: str | None) -> None:
        """Remove a session (counted as evict "deleted"); a turn in progress on it then fails to commit."""

    @abstractmethod
    def sweep(self) -> int:
        """Expire idle sessions now (also done lazily on access); returns how many were evicted."""

    @abstractmethod
    def stats(self) -> StoreStats:
        """Aggregate gauges from cached per-session figures (no tokenization)."""

    @abstractmethod
    def owner_stats(self, owner: str | None) -> StoreStats:
        """The same figures over one owner's sessions (what /v1/stats shows that owner)."""

    @abstractmethod
    def close(self) -> None:
        """Release the backend's resources."""

    def healthy(self) -> bool:
        """Whether the store answers reads now (cheap; /readyz asks). Failed writes do not count:
        a store that reads but cannot write stays ready (see `writable`), so readiness does not
        flap with every read that succeeds between two failed writes."""
        return True

    @property
    def writable(self) -> bool:
        """False from a failed write until a write (a turn, or probe_write()) succeeds again."""
        return True

    def last_error(self) -> str | None:
        """The last failure of a store call, for /readyz (None once a call of its kind succeeded)."""
        return None

    def probe_write(self) -> bool:
        """Write something tiny now (housekeeping calls it), so `writable` recovers by itself
        once the disk or server accepts writes again; returns `writable`."""
        return True

    def evict_idle(self, idle_s: float) -> int:
        """Memory watchdog: evict sessions with no turn in progress, idle for at least idle_s, from this
        process's memory (counted as evict "memory_pressure"); returns how many. Shared stores (SQLite,
        Redis) keep sessions outside the process, so by default there is nothing to free here."""
        return 0

    def turn(self, session_id: str, owner: str | None, user_content: str, *,
             timeout: float | None = None) -> Turn:
        """Lock the session and build the trimmed prompt; use the returned Turn as a context manager.

        Raises SessionNotFound, SessionBusy (lock not acquired within `timeout`; None waits forever),
        or ContextTooLong (nothing changed) right here, before any generation starts.
        """
        require_text("user_content", user_content)
        record, lease = self._acquire(session_id, owner, timeout)
        try:
            plan = trim_history(self.policy, self.count_tokens, record.system, record.messages,
                                (("user", user_content),))
            if self.policy.max_tokens and plan.tokens > self.policy.max_tokens:
                raise ContextTooLong(plan.tokens, self.policy.max_tokens)
            return Turn(self, record, lease, user_content, plan)
        except BaseException:
            self._release(session_id, lease)
            raise

    # -- backend primitives -------------------------------------------------------------------------

    @abstractmethod
    def _acquire(self, session_id: str, owner: str | None, timeout: float | None
                 ) -> tuple[SessionRecord, object]:
        """Take the per-session lock and load the record; returns it with an opaque lease for _release."""

    @abstractmethod
    def _release(self, session_id: str, lease: object) -> None:
        """Give the per-session lock back; must tolerate a session deleted meanwhile."""

    @abstractmethod
    def _commit(self, before: SessionRecord, after: SessionRecord) -> None:
        """Atomically replace `before` by `after` iff the stored version is still before.version.

        Raises SessionNotFound when the session was deleted or evicted meanwhile.
        """

    # -- shared by the backends ----------------------------------------------------------------------

    def _new_record(self, owner: str | None, system: str | None) -> SessionRecord:
        """A fresh record for create(): validated, id drawn, system tokens counted."""
        require_text("owner", owner, optional=True)
        require_text("system", system, optional=True)
        system = system or None
        tokens = count_prompt(self.count_tokens, system, ())
        if system and self.policy.max_tokens:  # no turn could fit: refuse now, not at every turn
            floor = count_prompt(self.count_tokens, system, (("user", ""),))
            if floor > self.policy.max_tokens:
                raise ContextTooLong(floor, self.policy.max_tokens)
        now = self.clock()
        return SessionRecord(new_session_id(), owner, now, now, system, (), 0, tokens, 0)

    def _observe_op(self, operation: str, seconds: float) -> None:
        if self.listener is not None:
            self.listener.on_store_op(operation, seconds)

    def _notify_truncate(self, reason: str, messages: int) -> None:
        if messages and self.listener is not None:
            self.listener.on_truncate(reason, messages)

    def _notify_error(self, operation: str) -> None:
        if self.listener is not None and hasattr(self.listener, "on_store_error"):
            self.listener.on_store_error(operation)

    def _notify_evict(self, reason: str, sessions: int) -> None:
        if sessions and self.listener is not None:
            self.listener.on_evict(reason, sessions)

    def __enter__(self) -> "SessionStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
