"""Redis SessionStore: sessions shared by several daemons (hosts), each operation one atomic Lua script.

- Turn lock: `edgechat:lease:<id>` = "token pid host", taken with SET NX PX (expires by itself
  after `lease_s`, so a crashed worker frees its sessions), polled with backoff until the timeout,
  released only by its holder; a holder whose pid is gone from this very host is taken over at once.
- Commit: a script that writes the turn only if the stored version is still the one read at
  acquire (compare-and-swap): nothing partial, no lost update.
- TTL: the policy's idle TTL is applied by the scripts against a sorted-set index by last_active
  (also the LRU order); each session hash additionally carries a Redis expiry of ttl + lease_s,
  so Redis drops sessions on its own even when no daemon runs.
- stats(): one script, O(log n + expired): ZCARD of the index, a running messages counter and the
  top of two sorted sets (longest history, most tokens); no scan of the sessions.
"""
from __future__ import annotations

import json
import os
from urllib.parse import urlsplit

import redis

from . import redis_scripts as lua
from .base import (SessionNotFound, SessionRecord, SessionSnapshot, SessionStore, StoreStats,
                   StoreUnavailable)
from .clock import SteadyClock, boottime
from .leases import (Failures, Probed, LocalLocks, Reentry, acquire_turn, host_identity, pid_alive, release_turn,
                     store_call)

PREFIX = "edgechat:"
SCHEMA_VERSION = 2  # 2: sessions indexed by owner (redis_scripts.MIGRATE_OWNERS)
ERRORS = (redis.RedisError,)
_NO_OWNER = "-"  # owner None; a key is stored as "k:<key>" so no key can collide with it


def _owner(owner: str | None) -> str:
    return _NO_OWNER if owner is None else "k:" + owner


def _fields(rec: SessionRecord) -> list[str]:
    """The session hash as flat field/value strings (floats as repr: exact round trip)."""
    return ["owner", _owner(rec.owner), "created", repr(rec.created), "last_active", repr(rec.last_active),
            "system", "-" if rec.system is None else "s:" + rec.system,
            "messages", json.dumps([list(p) for p in rec.messages], ensure_ascii=False, separators=(",", ":")),
            "turns", str(rec.turns), "tokens", str(rec.tokens), "truncations", str(rec.truncations),
            "version", str(rec.version)]


def _record(session_id: str, flat: list[str]) -> SessionRecord:
    h = dict(zip(flat[::2], flat[1::2]))
    return SessionRecord(session_id, None if h["owner"] == _NO_OWNER else h["owner"][2:],
                         float(h["created"]), float(h["last_active"]),
                         None if h["system"] == "-" else h["system"][2:],
                         tuple((r, c) for r, c in json.loads(h["messages"])), int(h["turns"]),
                         int(h["tokens"]), int(h["truncations"]), int(h["version"]))


def _where(url: str) -> str:
    """host:port/db of a Redis URL, without credentials (they must never reach a log)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path or '/0'}"


class RedisStore(Probed, SessionStore):
    """Sessions in one Redis database under the `edgechat:` prefix."""

    _errors = ERRORS

    def __init__(self, policy, count_tokens, *, url: str, **kwargs):
        super().__init__(policy, count_tokens, **kwargs)
        self.where = _where(url)
        self._locks = LocalLocks()
        self._reentry = Reentry()
        self._failures = Failures()
        self._closed = False
        self._host = host_identity()
        try:
            self._redis = redis.Redis.from_url(url, decode_responses=True, socket_timeout=5,
                                               socket_connect_timeout=2, health_check_interval=30)
            self._scripts = {name: self._redis.register_script(getattr(lua, name))
                             for name in ("CREATE", "GET", "ACQUIRE", "RELEASE", "COMMIT", "DELETE", "STATS",
                                          "OWNER_STATS", "MIGRATE_OWNERS")}
            self._check_schema()
            seconds, micros = self._redis.time()  # Redis's clock: one "now" for every host sharing it
            self.steady = SteadyClock(seconds + micros / 1e6 - boottime())
        except (redis.RedisError, ValueError) as exc:
            password = urlsplit(url).password
            reason = str(exc).replace(password, "***") if password else str(exc)
            raise StoreUnavailable(f"session_store: cannot use Redis at {self.where}: {reason}; start "
                                   f"Redis or point session_store (EDGECHAT_SESSION_STORE) elsewhere") from None

    def _check_schema(self) -> None:
        key = PREFIX + "schema_version"
        self._redis.set(key, SCHEMA_VERSION, nx=True)
        found = int(self._redis.get(key) or 0)
        if found > SCHEMA_VERSION:
            raise ValueError(f"its edgechat data has schema version {found}, newer than this edgechat "
                             f"understands ({SCHEMA_VERSION})")
        if found < 2:  # one script: atomic, and a second daemon starting meanwhile finds it done
            self._scripts["MIGRATE_OWNERS"](args=[PREFIX])

    def _run(self, name: str, *args) -> object:
        if self._closed:
            raise RuntimeError("session store is closed")
        return self._scripts[name](args=[PREFIX, *args])

    def _expire_ms(self) -> int:
        """Redis' own expiry of a session hash: after the policy TTL plus the longest turn."""
        return int((self.policy.ttl_s + self.lease_s) * 1000) if self.policy.ttl_s else 0

    # -- public API ---------------------------------------------------------------------------------

    @store_call("create", ERRORS)
    def create(self, owner, system=None) -> SessionSnapshot:
        """Start a session; expired sessions go first, then the owner's least recently active beyond
        its quota, then, beyond max_sessions, the least recently active of the owner holding most."""
        rec = self._new_record(owner, system)
        expired, quota, evicted = self._run(
            "CREATE", repr(rec.created), repr(self.policy.ttl_s), self.policy.max_sessions,
            self._expire_ms(), rec.id, rec.tokens, repr(rec.last_active), self.policy.per_key,
            _owner(owner), *_fields(rec))
        self._notify_evict("ttl", expired)
        self._notify_evict("quota", quota)
        self._notify_evict("lru", evicted)
        return rec.snapshot()

    @store_call("get", ERRORS)
    def get(self, session_id, owner) -> SessionSnapshot:
        """The session as stored; SessionNotFound if unknown, expired or another owner's."""
        reply = self._run("GET", session_id, repr(self.clock()), repr(self.policy.ttl_s))
        self._notify_evict("ttl", int(reply[0] == "ttl"))
        if reply[0] != "live":
            raise SessionNotFound()
        rec = _record(session_id, reply[1:])
        if rec.owner != owner:
            raise SessionNotFound()
        return rec.snapshot()

    @store_call("delete", ERRORS)
    def delete(self, session_id, owner) -> None:
        """Remove a session; a turn in progress on it then fails to commit with SessionNotFound."""
        outcome = self._run("DELETE", session_id, repr(self.clock()), repr(self.policy.ttl_s), _owner(owner))
        if outcome in ("ttl", "deleted"):
            self._notify_evict(outcome, 1)
        if outcome != "deleted":
            raise SessionNotFound()

    @store_call("sweep", ERRORS)
    def sweep(self) -> int:
        """Expire idle sessions now; returns how many were evicted."""
        n = int(self._run("STATS", repr(self.clock()), repr(self.policy.ttl_s))[0])
        self._notify_evict("ttl", n)
        return n

    @store_call("stats", ERRORS)
    def stats(self) -> StoreStats:
        """Gauges from the index, a counter and two sorted sets (O(log n)); expires idle sessions first."""
        expired, count, total, longest, tokens = self._run("STATS", repr(self.clock()), repr(self.policy.ttl_s))
        self._notify_evict("ttl", int(expired))
        return StoreStats(int(count), int(total), int(float(longest)), int(float(tokens)))

    @store_call("stats", ERRORS)
    def owner_stats(self, owner) -> StoreStats:
        """The same over one owner's sessions (its index; O(its sessions))."""
        expired, count, total, longest, tokens = self._run("OWNER_STATS", repr(self.clock()),
                                                           repr(self.policy.ttl_s), _owner(owner))
        self._notify_evict("ttl", int(expired))
        return StoreStats(int(count), int(total), int(float(longest)), int(float(tokens)))

    def healthy(self) -> bool:
        """Open, and Redis answers PING (failed writes: `writable`)."""
        if self._closed:
            return False
        try:
            self._redis.ping()
        except redis.RedisError as exc:  # the probe's failure is the answer
            self._failures.last = f"read: {type(exc).__name__}: {exc}"
            return False
        return True

    @store_call("probe", ERRORS)
    def _probe(self) -> None:
        self._redis.set(PREFIX + "probe", str(os.getpid()), px=60_000)

    def close(self) -> None:
        """Drop the connection pool; later calls raise RuntimeError. The data stays in Redis."""
        self._closed = True
        self._redis.close()

    # -- turn primitives ----------------------------------------------------------------------------

    def _acquire(self, session_id, owner, timeout):
        return acquire_turn(self, session_id, timeout,
                            lambda token: self._try_lease(session_id, owner, token), ERRORS)

    def _lease_value(self, token: str) -> str:
        return f"{token} {os.getpid()} {self._host}"

    def _try_lease(self, session_id: str, owner: str | None, token: str) -> SessionRecord | None:
        reply = self._run("ACQUIRE", session_id, repr(self.clock()), repr(self.policy.ttl_s), _owner(owner),
                          self._lease_value(token), int(self.lease_s * 1000), self._expire_ms())
        self._notify_evict("ttl", int(reply[0] == "ttl"))
        if reply[0] == "busy":
            _token, _sep, rest = reply[1].partition(" ")
            pid, _sep, host = rest.partition(" ")
            if self._host and host == self._host and pid.isdigit() and not pid_alive(int(pid)):
                self._run("RELEASE", session_id, reply[1])  # a crashed worker's: free it, retry soon
            return None
        if reply[0] != "ok":
            raise SessionNotFound()
        return _record(session_id, reply[1:])

    def _release(self, session_id, lease):
        release_turn(self, session_id, lease, self._dropper(session_id, lease), ERRORS)

    def _dropper(self, session_id: str, token: str):
        """What drops this lease (if it is still ours), for a release now or a retry later."""
        def drop() -> None:
            if not self._closed:
                self._run("RELEASE", session_id, self._lease_value(token))
        return drop

    @store_call("commit", ERRORS)
    def _commit(self, before, after):
        done = self._run("COMMIT", before.id, str(before.version), self._expire_ms(), len(after.messages),
                         after.tokens, repr(after.last_active), *_fields(after))
        if not done:
            raise SessionNotFound("session was deleted or evicted during the turn")
