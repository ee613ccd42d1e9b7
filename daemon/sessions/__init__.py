"""Server-side chat sessions with bounded history: pick a backend by URL (setting `session_store`).

base.py (the contract and trimming policy), memory.py, sqlite.py, redis.py (backends), leases.py.
May import: telemetry.labels. Never imports the model or the api: token counting is handed in as a
callable, metrics are reached through the StoreListener Protocol.
"""
from __future__ import annotations

from typing import Callable
from urllib.parse import urlsplit

from .base import (STORE_OPERATIONS, ContextTooLong, CountTokens, HistoryPolicy, Message, SessionBusy,
                   SessionNotFound, SessionRecord, SessionSnapshot, SessionStore, StoreListener, StoreStats,
                   StoreFailure, StoreUnavailable, Trimmed, Turn, TurnResult, trim_history)
from .memory import MemoryStore

__all__ = ["STORE_OPERATIONS", "ContextTooLong", "CountTokens", "HistoryPolicy", "MemoryStore", "Message",
           "SessionBusy", "SessionNotFound", "SessionRecord", "SessionSnapshot", "SessionStore",
           "StoreFailure", "StoreListener", "StoreStats", "StoreUnavailable", "Trimmed", "Turn", "TurnResult", "make_store",
           "trim_history"]

BACKENDS = ("memory", "sqlite:///path/to/file.db", "redis://host:port/db")


def _scheme(url: object) -> str:
    return urlsplit(url).scheme if isinstance(url, str) else ""


def make_store(policy: HistoryPolicy, count_tokens: CountTokens, *, url: str = "memory",
               clock: Callable[[], float] | None = None, listener: StoreListener | None = None,
               lease_s: float = 300.0) -> SessionStore:
    """The SessionStore for `url`: "memory", "sqlite:///abs/path.db" or "redis://host:port/db".

    ValueError naming the setting for anything else; StoreUnavailable (a ValueError) when the store
    cannot be opened. lease_s bounds how long a crashed worker's turn can block its session.
    """
    scheme = _scheme(url)
    common = dict(clock=clock, listener=listener, lease_s=lease_s)
    if url == "memory" or scheme == "memory":
        return MemoryStore(policy, count_tokens, **common)
    if scheme == "sqlite":
        from .sqlite import SQLiteStore
        from .sqlite_schema import path_from_url
        return SQLiteStore(policy, count_tokens, path=path_from_url(url), **common)
    if scheme in ("redis", "rediss", "unix"):
        try:
            from .redis import RedisStore
        except ImportError as exc:  # redis-py is optional: only Redis stores need it
            raise StoreUnavailable(f"session_store: a Redis store needs redis-py ({exc}); "
                                   f"pip install 'redis>=5'") from None
        return RedisStore(policy, count_tokens, url=url, **common)
    # name only the scheme: the URL itself may carry a password
    found = f"scheme {scheme!r}" if scheme else "a value without a scheme"
    raise ValueError(f"session_store: unsupported {found}; supported: {', '.join(BACKENDS)}")
