"""Bounded in-memory SessionStore: the reference backend for tests and single-worker daemons.

Locking: `_mu` guards the session map and running totals and is held only for dict operations (never
while tokenizing or generating); each session has its own lock, held across a turn, so turns on one
session are serialized while turns on different sessions proceed in parallel. `pending` counts turns
holding or waiting for a session's lock: such sessions are never expired or LRU-evicted.
"""
from __future__ import annotations

import threading
from collections import Counter, OrderedDict

from .base import (SessionNotFound, SessionBusy, SessionRecord, SessionSnapshot, SessionStore, StoreStats,
                   timed)


class _Slot:
    """A stored record plus the in-process lock state that goes with it."""

    __slots__ = ("record", "lock", "pending")

    def __init__(self, record: SessionRecord):
        self.record = record
        self.lock = threading.Lock()
        self.pending = 0


class MemoryStore(SessionStore):
    """Sessions in a dict ordered least recently active first (LRU order, and the TTL sweep's order)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._mu = threading.Lock()
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        self._messages_total = 0
        self._owned: Counter = Counter()  # owner -> sessions held
        self._closed = False

    @timed("create")
    def create(self, owner: str | None, system: str | None = None) -> SessionSnapshot:
        """Start a session; expired sessions go first, then the owner's least recently active beyond
        its quota, then, beyond max_sessions, the least recently active of the owner holding most."""
        record = self._new_record(owner, system)  # tokenizes: outside the map lock
        with self._mu:
            self._check_open()
            expired = self._expire_locked(record.created)
            self._slots[record.id] = _Slot(record)
            self._owned[owner] += 1
            quota = self._evict_locked(record.id, lambda: self._owned[owner] - self.policy.per_key
                                       if self.policy.per_key else 0, lambda: owner)
            evicted = self._evict_locked(record.id, self._excess_locked, self._largest_owner_locked)
        self._notify_evict("ttl", expired)
        self._notify_evict("quota", quota)
        self._notify_evict("lru", evicted)
        return record.snapshot()

    @timed("get")
    def get(self, session_id: str, owner: str | None) -> SessionSnapshot:
        """The session as stored; SessionNotFound if unknown, expired or another owner's."""
        return self._lookup(session_id, owner).record.snapshot()

    @timed("delete")
    def delete(self, session_id: str, owner: str | None) -> None:
        """Remove a session; a turn in progress on it then fails to commit with SessionNotFound."""
        slot = self._lookup(session_id, owner)
        with self._mu:
            if self._slots.get(session_id) is not slot:  # a concurrent delete or eviction won
                raise SessionNotFound()
            self._remove_locked(slot)
        self._notify_evict("deleted", 1)

    @timed("sweep")
    def sweep(self) -> int:
        """Expire idle sessions now; returns how many were evicted."""
        with self._mu:
            self._check_open()
            expired = self._expire_locked(self.clock())
        self._notify_evict("ttl", expired)
        return expired

    @timed("stats")
    def stats(self) -> StoreStats:
        """Gauges over live sessions: O(sessions) over cached lengths and token totals."""
        messages_max = tokens_max = 0
        with self._mu:
            self._check_open()
            expired = self._expire_locked(self.clock())
            for slot in self._slots.values():
                messages_max = max(messages_max, len(slot.record.messages))
                tokens_max = max(tokens_max, slot.record.tokens)
            stats = StoreStats(len(self._slots), self._messages_total, messages_max, tokens_max)
        self._notify_evict("ttl", expired)
        return stats

    @timed("stats")
    def owner_stats(self, owner: str | None) -> StoreStats:
        """Gauges over one owner's live sessions."""
        with self._mu:
            self._check_open()
            expired = self._expire_locked(self.clock())
            mine = [slot.record for slot in self._slots.values() if slot.record.owner == owner]
        self._notify_evict("ttl", expired)
        return StoreStats(len(mine), sum(len(r.messages) for r in mine),
                          max((len(r.messages) for r in mine), default=0),
                          max((r.tokens for r in mine), default=0))

    def healthy(self) -> bool:
        """In-process: healthy until closed."""
        return not self._closed

    def evict_idle(self, idle_s: float) -> int:
        """Evict sessions without a turn in progress, idle for at least idle_s (memory pressure)."""
        with self._mu:
            self._check_open()
            cutoff = self.clock() - idle_s
            victims = [slot for slot in self._slots.values()  # least recently active first
                       if not slot.pending and slot.record.last_active <= cutoff]
            for slot in victims:
                self._remove_locked(slot)
        self._notify_evict("memory_pressure", len(victims))
        return len(victims)

    def close(self) -> None:
        """Drop every session; later calls raise RuntimeError."""
        with self._mu:
            self._closed = True
            self._slots.clear()
            self._owned.clear()
            self._messages_total = 0

    # -- turn primitives ----------------------------------------------------------------------------

    @timed("acquire")
    def _acquire(self, session_id, owner, timeout):
        slot = self._lookup(session_id, owner, pin=True)
        if not slot.lock.acquire(timeout=-1 if timeout is None else max(timeout, 0)):
            self._unpin(slot)
            raise SessionBusy("another turn on this session is in progress")
        with self._mu:
            live = self._slots.get(session_id) is slot
        if not live:  # deleted or closed while we waited for the lock
            self._release(session_id, slot)
            raise SessionNotFound()
        return slot.record, slot

    @timed("release")
    def _release(self, session_id, lease):
        lease.lock.release()
        self._unpin(lease)

    @timed("commit")
    def _commit(self, before, after):
        with self._mu:
            self._check_open()
            slot = self._slots.get(before.id)
            if slot is None or slot.record.version != before.version:
                raise SessionNotFound("session was deleted or evicted during the turn")
            slot.record = after
            self._slots.move_to_end(before.id)
            self._messages_total += len(after.messages) - len(before.messages)

    # -- internals (the *_locked ones need self._mu held) --------------------------------------------

    def _lookup(self, session_id: str, owner: str | None, *, pin: bool = False) -> _Slot:
        """The live slot visible to `owner`, expiring it first if idle past the TTL; pin = count a turn."""
        expired = False
        with self._mu:
            self._check_open()
            slot = self._slots.get(session_id)
            if slot is not None and not slot.pending \
                    and self.policy.expired(slot.record.last_active, self.clock()):
                self._remove_locked(slot)
                slot, expired = None, True
            if slot is not None and slot.record.owner == owner:
                slot.pending += pin
                return slot
        self._notify_evict("ttl", int(expired))
        raise SessionNotFound()

    def _unpin(self, slot: _Slot) -> None:
        with self._mu:
            slot.pending -= 1

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("session store is closed")

    def _remove_locked(self, slot: _Slot) -> None:
        del self._slots[slot.record.id]
        self._messages_total -= len(slot.record.messages)
        self._owned[slot.record.owner] -= 1
        if not self._owned[slot.record.owner]:
            del self._owned[slot.record.owner]

    def _expire_locked(self, now: float) -> int:
        if not self.policy.ttl_s:
            return 0
        victims = []
        for slot in self._slots.values():  # least recently active first: stop at the first live one
            if not self.policy.expired(slot.record.last_active, now):
                break
            if not slot.pending:
                victims.append(slot)
        for slot in victims:
            self._remove_locked(slot)
        return len(victims)

    def _excess_locked(self) -> int:
        return len(self._slots) - self.policy.max_sessions if self.policy.max_sessions else 0

    def _largest_owner_locked(self):
        """The owner holding the most sessions (ties: whose least recently active session is oldest)."""
        most = max(self._owned.values())
        return next(slot.record.owner for slot in self._slots.values()
                    if self._owned[slot.record.owner] == most)

    def _evict_locked(self, keep: str, excess, owner_of) -> int:
        """While excess() > 0, evict the least recently active idle session of owner_of(), never
        `keep` or a busy one; stops (over the bound until turns end) when that owner has none idle."""
        evicted = 0
        while excess() > 0 and self._owned:
            owner = owner_of()
            victim = next((slot for sid, slot in self._slots.items() if slot.record.owner == owner
                           and not slot.pending and sid != keep), None)
            if victim is None:
                break
            self._remove_locked(victim)
            evicted += 1
        return evicted
