"""Server-side chat sessions with bounded history: pick a backend by URL (setting `session_store`)."""
from __future__ import annotations

import time
from typing import Callable
from urllib.parse import urlsplit

from .base import (ContextTooLong, CountTokens, HistoryPolicy, Message, SessionBusy, SessionNotFound,
                   SessionRecord, SessionSnapshot, SessionStore, StoreListener, StoreStats, Trimmed, Turn,
                   TurnResult, trim_history)
from .memory import MemoryStore

__all__ = ["ContextTooLong", "CountTokens", "HistoryPolicy", "MemoryStore", "Message", "SessionBusy",
           "SessionNotFound", "SessionRecord", "SessionSnapshot", "SessionStore", "StoreListener",
           "StoreStats", "Trimmed", "Turn", "TurnResult", "make_store", "trim_history"]

BACKENDS = ("memory",)


def make_store(policy: HistoryPolicy, count_tokens: CountTokens, *, url: str = "memory",
               clock: Callable[[], float] = time.time,
               listener: StoreListener | None = None) -> SessionStore:
    """The SessionStore for `url` ("memory" or "memory://"); ValueError naming the setting otherwise."""
    scheme = urlsplit(url).scheme if isinstance(url, str) else ""
    if url == "memory" or scheme == "memory":
        return MemoryStore(policy, count_tokens, clock=clock, listener=listener)
    # name only the scheme: the URL itself may carry a password
    found = f"scheme {scheme!r}" if scheme else "a value without a scheme"
    raise ValueError(f"session_store: unsupported {found}; supported: {', '.join(BACKENDS)}")
