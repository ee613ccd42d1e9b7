"""Garbage-collector readings: pause times via gc.callbacks, per-generation counts, tracked objects."""
from __future__ import annotations

import bisect
import gc
import time

GENERATIONS = (0, 1, 2)


class GcPauseRecorder:
    """Times every collection from gc.callbacks into plain per-generation bucket counts.

    The callback runs inside whatever allocation triggered the collection, possibly while that
    thread holds a prometheus_client value lock (multiprocess mode uses one process-wide,
    non-reentrant lock), so it must not touch a metric: it only bumps integers here, and
    `drain()` (called from refresh) moves the growth into the histogram. Counts only ever grow
    and only the callback writes them (one collection at a time, under the GIL), so a drain that
    races a collection just sees that collection on the next drain: nothing is lost.
    """

    def __init__(self, upper_bounds: tuple[float, ...]):
        self._bounds = [b for b in upper_bounds if b != float("inf")]
        width = len(self._bounds) + 1  # the last slot is +Inf
        self._counts = [[0] * width for _ in GENERATIONS]
        self._sums = [0.0 for _ in GENERATIONS]
        self._drained_counts = [[0] * width for _ in GENERATIONS]
        self._drained_sums = [0.0 for _ in GENERATIONS]
        self._started: float | None = None
        self._installed = False

    def install(self) -> None:
        """Start timing collections (idempotent)."""
        if not self._installed:
            gc.callbacks.append(self._callback)
            self._installed = True

    def uninstall(self) -> None:
        """Stop timing collections (idempotent)."""
        if self._installed:
            try:
                gc.callbacks.remove(self._callback)
            except ValueError:  # someone cleared gc.callbacks behind our back
                pass
            self._installed = False

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        started, self._started = self._started, None
        if started is None:
            return
        pause = time.perf_counter() - started
        generation = min(max(int(info.get("generation", 2)), 0), 2)
        self._counts[generation][bisect.bisect_left(self._bounds, pause)] += 1
        self._sums[generation] += pause

    def drain(self) -> list[tuple[int, list[int], float]]:
        """(generation, new count per bucket, new pause seconds) since the last drain."""
        out = []
        for g in GENERATIONS:
            counts, total = list(self._counts[g]), self._sums[g]
            delta = [now - before for now, before in zip(counts, self._drained_counts[g])]
            if any(delta):
                out.append((g, delta, total - self._drained_sums[g]))
            self._drained_counts[g], self._drained_sums[g] = counts, total
        return out

    def flush_into(self, histogram) -> None:
        """Add the pauses recorded since the last flush to a Histogram labelled by generation."""
        for gen, counts, seconds in self.drain():
            child = histogram.labels(str(gen))
            # No public "add n observations to bucket i": these per-bucket values (not cumulative)
            # are exactly what Histogram.observe() increments, in both value classes.
            for value, n in zip(child._buckets, counts):
                if n:
                    value.inc(n)
            child._sum.inc(seconds)


class GcCounters:
    """Growth of gc.get_stats() counters since the last call (baseline: construction time).

    The baseline is taken at construction, not process start, so a worker forked from a master
    does not re-count the master's collections that its copied counters still hold.
    """

    KEYS = ("collections", "collected", "uncollectable")

    def __init__(self) -> None:
        self._last = gc.get_stats()

    def deltas(self) -> list[dict[str, int]]:
        """Per generation: {'collections': n, 'collected': n, 'uncollectable': n} grown since last call."""
        now = gc.get_stats()
        out = [{k: max(cur[k] - prev[k], 0) for k in self.KEYS} for cur, prev in zip(now, self._last)]
        self._last = now
        return out


def tracked_objects() -> list[int]:
    """Objects tracked by the collector, per generation.

    Costs O(objects): ~4.5 ms for ~200 k objects with torch + transformers imported, and a
    transient list of that size, so it runs on the sampler's timer, not on every refresh.

    The list gc.get_objects() returns may hold a tuple another thread is still building from a
    generator (`tuple(x for x in ...)`): if that thread ran while the list lives, its tuple's
    final resize would fail with "SystemError: Objects/tupleobject.c: bad argument to internal
    function". So the list only ever lives inside C calls (map -> get_objects -> len), where no
    bytecode runs and the GIL is never given up; a Python expression holding it would race.
    """
    return list(map(len, map(gc.get_objects, GENERATIONS)))
