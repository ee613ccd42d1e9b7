"""GET /v1/stats: the web page's live side panel, read from the same sources the metrics gauges use.

Memory comes from the worker's MemoryBudget (so the page and Prometheus agree), history from the
session store's stats and snapshots, model facts from the engine. The latency of a session's recent
turns is the one thing no existing source keeps per session, so this module keeps it: `RecentTurns`,
a per-worker LRU bounded in sessions and in turns per session (see its docstring for why it cannot
leak). The turn route records each committed turn in it (request start to commit) by a direct call.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict, deque

import psutil
from flask import Blueprint, g, jsonify, request

from ..telemetry import process
from ..services import get_services
from ..sessions import SessionNotFound
from .auth import protect
from .errors import ApiError
from .openapi import documented
from .fields import Query, Text

bp = protect(Blueprint("stats", __name__, url_prefix="/v1"))

TURNS_KEPT = 20       # latencies kept per session: what a sparkline shows
SESSIONS_CAP = 1000   # rings kept per worker, whatever max_sessions says (0 = unbounded there)


class RecentTurns:
    """Latencies of each session's last TURNS_KEPT turns in this worker, least recently fed evicted first.

    Bounded twice: at most `max_sessions` rings (LRU) of at most TURNS_KEPT (turn, seconds) pairs,
    about 2 KB each, so at most ~2 MB at SESSIONS_CAP whatever clients do. Sessions that expire,
    are evicted or deleted without being forgotten here simply age out of the LRU. Per worker: with
    several workers and a shared store a session's turns may be spread over workers' rings.
    """

    @classmethod
    def for_config(cls, cfg) -> "RecentTurns":
        """Rings for max_sessions sessions, capped at SESSIONS_CAP (max_sessions 0 = unbounded there)."""
        return cls(cfg.max_sessions if 0 < cfg.max_sessions <= SESSIONS_CAP else SESSIONS_CAP)

    def __init__(self, max_sessions: int, per_session: int = TURNS_KEPT):
        self.max_sessions = max(1, max_sessions)
        self.per_session = per_session
        self._mu = threading.Lock()
        self._rings: OrderedDict[str, deque] = OrderedDict()

    def record(self, session_id: str, turn: int, seconds: float) -> bool:
        """Keep one committed turn's latency; False when that turn (or a later one) is already kept."""
        with self._mu:
            ring = self._rings.pop(session_id, None)
            if ring is None:
                ring = deque(maxlen=self.per_session)
            fresh = not ring or ring[-1][0] < turn
            if fresh:
                ring.append((turn, round(seconds, 4)))
            self._rings[session_id] = ring
            while len(self._rings) > self.max_sessions:
                self._rings.popitem(last=False)
            return fresh

    def recent(self, session_id: str) -> list[tuple[int, float]]:
        """(turn, seconds) pairs, oldest first; empty for a session never seen here."""
        with self._mu:
            return list(self._rings.get(session_id, ()))

    def forget(self, session_id: str) -> None:
        """Drop a session's ring (deleted, or found gone)."""
        with self._mu:
            self._rings.pop(session_id, None)

    def __len__(self) -> int:
        with self._mu:
            return len(self._rings)


def history_limit(max_turns: int) -> int | str:
    """Messages a session may keep: 2 per configured turn, or "unbounded" when max_turns is 0."""
    return 2 * max_turns if max_turns else "unbounded"


def memory() -> dict:
    """This worker's RSS and the service's memory against its limit, read as the gauges read them."""
    sample = process.process_sample(psutil.Process())
    budget = get_services().budget.read()
    return {"rss_bytes": sample.rss_bytes, "limit_bytes": budget.limit,
            "limit_source": budget.limit_source, "service_bytes": budget.service,
            "host_available_bytes": budget.host_available, "host_total_bytes": budget.host_total}


def session_stats(session_id: str, limit: int | str) -> dict:
    """One session's history against the limit and its recent turn latencies; 404 if not visible."""
    try:
        snap = get_services().store.get(session_id, g.owner)
    except SessionNotFound:
        get_services().recent_turns.forget(session_id)
        raise ApiError(404, f"no session {session_id!r} (unknown, expired, or not yours)",
                       code="session_not_found", param="session") from None
    messages = len(snap.messages)
    return {"id": snap.id, "turns": snap.turns, "messages": messages, "limit": limit,
            "over_limit": isinstance(limit, int) and messages > limit,
            "tokens": snap.tokens, "truncations": snap.truncations,
            "trimmed": snap.truncations > 0,
            "recent_turns": [{"turn": t, "seconds": s} for t, s in get_services().recent_turns.recent(snap.id)]}


STATS_QUERY = Query({"session": Text(doc="A session of yours: adds its history and recent turns.")})


@bp.get("/stats")
@documented(query=STATS_QUERY, auth="api_key")
def stats():
    """Worker memory, your sessions' history sizes, model and leak mode; ?session=ID adds one's own."""
    services = get_services()
    cfg, engine = services.config, services.engine
    query = STATS_QUERY.parse(request.args, cfg)
    store = services.store.owner_stats(g.owner)  # tenant data: the caller's own sessions only
    limit = history_limit(cfg.max_history_turns)
    body = {"pid": os.getpid(), "model": engine.model_id, "dtype": engine.dtype,
            "leak_mode": cfg.leak_mode, "queue_depth": engine.queue_depth(), "batch": engine.batch(),
            "memory": memory(),
            "history": {"max_turns": cfg.max_history_turns, "limit": limit,
                        "sessions": store.sessions, "messages_total": store.messages_total,
                        "messages_max": store.messages_max, "tokens_max": store.tokens_max}}
    session_id = query["session"]
    if session_id is not None:
        body["session"] = session_stats(session_id, limit)
    return jsonify(body)
