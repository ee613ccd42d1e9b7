"""Memory watchdog, one per worker: free what this process holds above the soft limit, refuse turns above the hard.

It compares the service's memory (edgechat_service_memory_bytes: the cgroup's usage, else all workers'
RSS together) with the budget (edgechat_memory_limit_bytes), read with the same procstats readers, every
`metrics_refresh_s`. Every worker sees the same figures, so all of them free and refuse together.

- level 1, above `memory_soft_limit_ratio`: evict idle sessions of an in-process store, drop cached
  per-session state (Engine.release_caches: KV caches kept between turns), gc.collect(), malloc_trim(0);
  at most every RELEASE_EVERY_S while memory stays high, and at once when the level rises.
- level 2, above `memory_hard_limit_ratio`: the same with every idle session, then new turns get 503 +
  Retry-After (code memory_pressure) and /readyz fails, until memory falls below the soft limit
  (hysteresis: a daemon hovering at the hard limit does not flap in and out of the load balancer).

leak_mode "tensors" keeps every turn's outputs in Engine.retained on purpose; the watchdog leaves them:
a real leak is memory nobody knows how to free, and the point of the demo is to show the daemon
degrading (refusing turns, so the leak stops growing) instead of being OOM-killed.
"""
from __future__ import annotations

import gc
import logging
import math
import threading
import time
from typing import Callable

from .hygiene import find_malloc_trim

EXTENSION = "edgechat.watchdog"
OK, SOFT, HARD = 0, 1, 2
RELEASE_EVERY_S = 60.0  # each pass costs a full collection (~50-100 ms with a model loaded)
IDLE_EVICT_S = 60.0     # above the soft limit, sessions idle this long go; above the hard limit, all idle ones

log = logging.getLogger("edgechat.watchdog")
MemoryReader = Callable[[], "tuple[int, int]"]  # -> (service bytes, limit bytes)


def procstats_reader(memory_limit_bytes: int, multiprocess: bool) -> MemoryReader:
    """The real reader: edgechat_service_memory_bytes and edgechat_memory_limit_bytes, as metrics reads them."""
    from . import procstats
    cgroup = procstats.CgroupMemory.detect()

    def read() -> tuple[int, int]:
        budget = procstats.memory_budget(cgroup, memory_limit_bytes, siblings=multiprocess)
        return budget.service, budget.limit
    return read


class MemoryWatchdog:
    """The per-worker state machine; check() is one step, start() runs it on a timer."""

    def __init__(self, *, soft_ratio: float, hard_ratio: float, read: MemoryReader, store=None,
                 engine=None, metrics=None, interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 idle_evict_s: float = IDLE_EVICT_S, release_every_s: float = RELEASE_EVERY_S,
                 trim: Callable[[int], int] | None = None):
        if not 0 < soft_ratio < hard_ratio <= 1:
            raise ValueError(f"need 0 < soft_ratio < hard_ratio <= 1, got {soft_ratio!r}, {hard_ratio!r}")
        self.soft_ratio, self.hard_ratio = soft_ratio, hard_ratio
        self.read, self.clock = read, clock
        self.store, self.engine, self.metrics = store, engine, metrics
        self.interval_s = interval_s
        self.idle_evict_s, self.release_every_s = idle_evict_s, release_every_s
        self._trim = trim if trim is not None else find_malloc_trim(log)
        self.level = OK
        self.ratio: float | None = None  # last service / limit seen
        self._last_release = -math.inf
        self._released_at_level = OK
        self._lock = threading.Lock()  # check() from the timer and from tests never interleave
        self._thread: threading.Thread | None = None
        self._set_level(OK)

    @property
    def refusing(self) -> bool:
        """Whether new turns are refused (level 2)."""
        return self.level == HARD

    def admits_turn(self) -> bool:
        """Whether a new turn may start. Above the soft limit memory is read now rather than at the
        last tick, so a burst of quick turns between two ticks cannot carry it past the limit."""
        if self.ratio is not None and self.ratio >= self.soft_ratio:
            self.check()
        return not self.refusing

    @property
    def retry_after_s(self) -> int:
        """What a refused client is told to wait: a few watchdog periods, when memory is next judged."""
        return max(5, math.ceil(3 * self.interval_s))

    def describe(self) -> str:
        """One line for a 503 body or a log: how full, against which limits."""
        ratio = "unknown" if self.ratio is None else f"{self.ratio:.0%}"
        return (f"service memory at {ratio} of its limit (soft {self.soft_ratio:.0%}, "
                f"hard {self.hard_ratio:.0%})")

    def check(self) -> int:
        """Read memory, free what this process holds if over the soft limit, set the level; returns it."""
        with self._lock:
            ratio = self._ratio()
            if ratio is None:
                return self.level
            wanted = HARD if ratio >= self.hard_ratio else SOFT if ratio >= self.soft_ratio else OK
            now = self.clock()
            if wanted > OK and (now - self._last_release >= self.release_every_s
                                or wanted > self._released_at_level):
                self._release(wanted, ratio)
                self._last_release, self._released_at_level = now, wanted
                after = self._ratio()
                ratio = ratio if after is None else after
                wanted = HARD if ratio >= self.hard_ratio else SOFT if ratio >= self.soft_ratio else OK
            if self.level == HARD and wanted == SOFT:
                wanted = HARD  # hysteresis: refuse until below the soft limit
            if wanted == OK:
                self._released_at_level = OK
            self._transition(wanted)
            return self.level

    def _ratio(self) -> float | None:
        try:
            service, limit = self.read()
        except OSError as exc:  # /proc or the cgroup unreadable this time: keep the last judgement
            log.warning("memory watchdog cannot read memory: %s", exc)
            return None
        if limit <= 0:
            return None
        self.ratio = service / limit
        return self.ratio

    def _release(self, level: int, ratio: float) -> None:
        """Free what this process holds; every step counted and the whole pass logged."""
        done = []
        if self.store is not None:
            evicted = self.store.evict_idle(self.idle_evict_s if level == SOFT else 0.0)
            self._count("evict_sessions")
            done.append(f"{evicted} idle session(s) evicted")
        release = getattr(self.engine, "release_caches", None)
        if release is not None:
            freed = release()
            self._count("release_caches")
            done.append(f"caches released ({(freed or 0) / 2**20:.1f} MB)")
        collected = gc.collect()
        self._count("gc_collect")
        done.append(f"gc.collect() freed {collected} objects")
        if self._trim is not None:
            self._trim(0)
            self._count("malloc_trim")
            done.append("malloc_trim(0)")
        log.warning("memory pressure (%s, %s): %s", "hard" if level == HARD else "soft",
                    f"{ratio:.0%} of the limit", "; ".join(done))

    def _transition(self, level: int) -> None:
        if level == self.level:
            return
        if level == HARD:
            self._count("refuse_turns")
            log.error("memory pressure: %s; refusing new turns (503 memory_pressure) and reporting "
                      "not ready until below the soft limit", self.describe())
        elif self.level == HARD:
            self._count("resume_turns")
            log.warning("memory pressure over: %s; accepting turns again", self.describe())
        elif level == SOFT:
            log.warning("memory above the soft limit: %s", self.describe())
        self._set_level(level)

    def _count(self, action: str) -> None:
        if self.metrics is not None:
            self.metrics.on_memory_pressure(action)

    def _set_level(self, level: int) -> None:
        self.level = level
        if self.metrics is not None:
            self.metrics.set_memory_pressure_level(level)

    def start(self, stop: threading.Event) -> None:
        """Run check() every interval_s on a daemon thread until `stop` is set."""
        def loop() -> None:
            while not stop.wait(self.interval_s):
                try:
                    self.check()
                except Exception:  # noqa: BLE001 - the watchdog must outlive one failed pass
                    log.exception("memory watchdog check failed")
        self._thread = threading.Thread(target=loop, name="edgechat-memory-watchdog", daemon=True)
        self._thread.start()


def init_app(app, cfg, *, engine, store, metrics, stop: threading.Event,
             read: MemoryReader | None = None) -> MemoryWatchdog | None:
    """Create and start this worker's watchdog (None when memory_watchdog is off)."""
    if not cfg.memory_watchdog:
        return None
    watchdog = MemoryWatchdog(
        soft_ratio=cfg.memory_soft_limit_ratio, hard_ratio=cfg.memory_hard_limit_ratio,
        read=read or procstats_reader(cfg.memory_limit_bytes, metrics.multiprocess), store=store,
        engine=engine, metrics=metrics, interval_s=cfg.metrics_refresh_s)
    app.extensions[EXTENSION] = watchdog
    watchdog.start(stop)
    return watchdog


def of(app) -> MemoryWatchdog | None:
    """The app's watchdog, or None when it is off."""
    return app.extensions.get(EXTENSION)
