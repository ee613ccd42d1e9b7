"""Memory watchdog, one per worker: free what this process holds above the soft limit, refuse turns above the hard.

It compares the service's memory (edgechat_service_memory_bytes: the cgroup's working set, else all
workers' RSS together) with the limit (edgechat_memory_limit_bytes), both read through the worker's
MemoryBudget (daemon/memory/budget.py) every `metrics_refresh_s`. Every worker sees the same figures,
so all of them free and refuse together.

- level 1, above `memory_soft_limit_ratio`: evict idle sessions of an in-process store, drop cached
  per-session state (Engine.release_caches: KV caches kept between turns), gc.collect(), malloc_trim(0);
  at most every RELEASE_EVERY_S while memory stays high, and at once when the level rises.
- level 2, above `memory_hard_limit_ratio`: the same with every idle session; if that was not enough, the
  newest generations of the batch are cancelled (the oldest one runs on; theirs get 503 memory_pressure);
  then new turns get 503 + Retry-After (code memory_pressure) and /readyz fails, until memory falls below
  the soft limit (hysteresis: a daemon hovering at the hard limit does not flap in and out of the load
  balancer).

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
from typing import Callable, Protocol

from .budget import HARD, OK, SOFT, MemoryBudget
from .hygiene import find_malloc_trim

__all__ = ["HARD", "OK", "SOFT", "MemoryWatchdog", "PressureListener", "IDLE_EVICT_S", "RELEASE_EVERY_S"]
RELEASE_EVERY_S = 60.0  # each pass costs a full collection (~50-100 ms with a model loaded)
IDLE_EVICT_S = 60.0     # above the soft limit, sessions idle this long go; above the hard limit, all idle ones

log = logging.getLogger("edgechat.watchdog")


class PressureListener(Protocol):
    """Observer of the watchdog (metrics)."""

    def on_memory_pressure(self, action: str) -> None:
        """The watchdog took `action` (one of telemetry.labels.PRESSURE_ACTIONS)."""

    def set_memory_pressure_level(self, level: int) -> None:
        """The watchdog's level is now OK, SOFT or HARD."""


class Releaser(Protocol):
    """What can drop caches it keeps between turns (the engine's KV pool) and cancel running generations."""

    def release_caches(self) -> int:
        """Drop them; return the bytes freed."""

    def shed(self, keep: int = 1) -> int:
        """Cancel the newest running generations, keeping the `keep` oldest; return how many go."""


class IdleEvicter(Protocol):
    """What can evict idle sessions (a session store)."""

    def evict_idle(self, idle_s: float) -> int:
        """Evict sessions idle for at least idle_s; return how many."""


class MemoryWatchdog:
    """The per-worker state machine; check() is one step, start() runs it on a timer."""

    def __init__(self, budget: MemoryBudget, *, store: IdleEvicter | None = None,
                 engine: Releaser | None = None, metrics: PressureListener | None = None,
                 interval_s: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 idle_evict_s: float = IDLE_EVICT_S, release_every_s: float = RELEASE_EVERY_S,
                 trim: Callable[[int], int] | None = None):
        self.budget, self.clock = budget, clock
        self.soft_ratio, self.hard_ratio = budget.soft_ratio, budget.hard_ratio
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
            wanted = self.budget.level(ratio)
            now = self.clock()
            if wanted > OK and (now - self._last_release >= self.release_every_s
                                or wanted > self._released_at_level):
                self._release(wanted, ratio)
                self._last_release, self._released_at_level = now, wanted
                after = self._ratio()
                ratio = ratio if after is None else after
                wanted = self.budget.level(ratio)
            if wanted == HARD and self.engine is not None:  # freeing was not enough: fewer at once
                shed = self.engine.shed(keep=1)
                if shed:
                    self._count("shed_generations")
                    log.error("memory pressure: %s; cancelled the %d newest generation(s) of the batch",
                              self.describe(), shed)
            if self.level == HARD and wanted == SOFT:
                wanted = HARD  # hysteresis: refuse until below the soft limit
            if wanted == OK:
                self._released_at_level = OK
            self._transition(wanted)
            return self.level

    def _ratio(self) -> float | None:
        try:
            ratio = self.budget.read().ratio
        except OSError as exc:  # /proc or the cgroup unreadable this time: keep the last judgement
            log.warning("memory watchdog cannot read memory: %s", exc)
            return None
        if ratio is not None:
            self.ratio = ratio
        return ratio

    def _release(self, level: int, ratio: float) -> None:
        """Free what this process holds; every step counted and the whole pass logged."""
        done = []
        if self.store is not None:
            evicted = self.store.evict_idle(self.idle_evict_s if level == SOFT else 0.0)
            self._count("evict_sessions")
            done.append(f"{evicted} idle session(s) evicted")
        if self.engine is not None:
            freed = self.engine.release_caches()
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


def start(cfg, budget: MemoryBudget, *, engine: Releaser, store: IdleEvicter, metrics: PressureListener,
          stop: threading.Event) -> MemoryWatchdog | None:
    """Create and start this worker's watchdog (None when memory_watchdog is off)."""
    if not cfg.memory_watchdog:
        return None
    watchdog = MemoryWatchdog(budget, store=store, engine=engine, metrics=metrics,
                              interval_s=cfg.metrics_refresh_s)
    watchdog.start(stop)
    return watchdog
