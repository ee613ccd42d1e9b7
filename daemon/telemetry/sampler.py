"""Refreshes the sampled gauges (process, memory budget, GC, tracemalloc) on a timer and before scrapes."""
from __future__ import annotations

import logging
import os
import threading
import time
import tracemalloc
from typing import Callable, Protocol

import psutil

from . import gcstats, multiproc, process
from .metrics import GC_PAUSE_BUCKETS, Metrics

# gc.get_objects(2) holds the GIL ~3-25 ms per 200 k objects (torch + transformers, loaded box):
# a slow signal, so counted at most this often, on the sampler thread only.
TRACKED_OBJECTS_EVERY_S = 30.0
log = logging.getLogger("edgechat.metrics")


class MemoryFigures(Protocol):
    """One reading of the memory budget (daemon.memory.budget.MemoryReading satisfies it)."""

    host_available: int
    host_total: int
    limit: int
    service: int
    charged: int


class Sampler:
    """Reads this worker's process, GC and tracemalloc figures, and the budget it is handed, into gauges."""

    def __init__(self, metrics: Metrics, memory: Callable[[], MemoryFigures] | None = None) -> None:
        """memory: the worker's budget reader (MemoryBudget.read); None leaves the memory gauges alone."""
        self.m = metrics
        self._memory = memory
        self._proc = psutil.Process()
        self._cpu_labels = ("pid",) if metrics.multiprocess else ()
        self._cpu_seen = (os.getpid(), 0.0)
        self._gc_counters = gcstats.GcCounters()
        self._gc_pauses = gcstats.GcPauseRecorder(GC_PAUSE_BUCKETS)
        self._gc_pauses.install()
        self._refresh_lock = threading.Lock()
        self._last_refresh = 0.0
        self._tracked_due = 0.0
        self._write_failures = multiproc.write_failures()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def trace(self, frames: int) -> None:
        """Start tracemalloc (unless already tracing) and export its gauges from now on."""
        if not tracemalloc.is_tracing():
            tracemalloc.start(frames)
        self.m.track_tracemalloc()

    def refresh(self, max_age_s: float = 0.0) -> None:
        """Sample process, memory budget, GC and tracemalloc into the gauges now (~0.2 ms).

        Skipped when the last refresh is younger than max_age_s (scrape storms).
        """
        with self._refresh_lock:
            now = time.monotonic()
            if max_age_s and now - self._last_refresh < max_age_s:
                return
            self._last_refresh = now
            self._refresh_process()
            self._refresh_memory()
            self._refresh_gc()
            self._refresh_write_failures()
            if self.m.tracemalloc_traced_bytes is not None:  # (0, 0) once tracing is stopped
                traced, peak = tracemalloc.get_traced_memory()
                self.m.tracemalloc_traced_bytes.set(traced)
                self.m.tracemalloc_peak_bytes.set(peak)

    def refresh_slow(self) -> None:
        """Costly readings, sampler thread only: USS (page-table walk, ~2-10 ms), and GC tracked
        objects at most every TRACKED_OBJECTS_EVERY_S."""
        uss = process.unique_memory_bytes(self._proc)
        if uss is not None:
            self.m.process_unique_memory_bytes.set(uss)
        now = time.monotonic()
        if now >= self._tracked_due:
            self._tracked_due = now + TRACKED_OBJECTS_EVERY_S
            for gen, count in zip(gcstats.GENERATIONS, gcstats.tracked_objects()):
                self.m.gc_tracked_objects.labels(str(gen)).set(count)

    def _refresh_process(self) -> None:
        m, pid = self.m, os.getpid()
        if pid != self._proc.pid:  # forked since construction: measure the child
            self._proc = psutil.Process(pid)
        sample = process.process_sample(self._proc)
        m.process_resident_memory_bytes.set(sample.rss_bytes)
        m.process_virtual_memory_bytes.set(sample.vms_bytes)
        m.process_open_fds.set(sample.open_fds)
        m.process_threads.set(sample.threads)
        m.process_start_time_seconds.set(sample.start_time_s)
        if sample.anon_bytes is not None:
            m.process_anonymous_memory_bytes.set(sample.anon_bytes)
            m.process_swap_bytes.set(sample.swap_bytes or 0)
        seen_pid, seen_cpu = self._cpu_seen
        base = seen_cpu if seen_pid == pid else 0.0  # a forked child's CPU time starts at 0
        if sample.cpu_seconds > base:
            cpu = m.process_cpu_seconds_total
            (cpu.labels(str(pid)) if self._cpu_labels else cpu).inc(sample.cpu_seconds - base)
            base = sample.cpu_seconds
        self._cpu_seen = (pid, base)

    def _refresh_memory(self) -> None:
        if self._memory is None:
            return
        m, reading = self.m, self._memory()
        m.host_memory_available_bytes.set(reading.host_available)
        m.host_memory_total_bytes.set(reading.host_total)
        m.memory_limit_bytes.set(reading.limit)
        m.service_memory_bytes.set(reading.service)
        m.service_memory_charged_bytes.set(reading.charged)

    def _refresh_write_failures(self) -> None:
        failed = multiproc.write_failures()
        if failed > self._write_failures:
            self.m.metrics_write_failures_total.inc(failed - self._write_failures)
            self._write_failures = failed

    def _refresh_gc(self) -> None:
        m = self.m
        for gen, delta in enumerate(self._gc_counters.deltas()):
            label = str(gen)
            m.gc_collections_total.labels(label).inc(delta["collections"])
            m.gc_collected_objects_total.labels(label).inc(delta["collected"])
            m.gc_uncollectable_objects_total.labels(label).inc(delta["uncollectable"])
        self._gc_pauses.flush_into(m.gc_pause_seconds)

    def start(self, interval_s: float) -> None:
        """Refresh every interval_s on a daemon thread (idempotent); start it in the worker, after fork."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, args=(interval_s,), daemon=True,
                                        name="edgechat-metrics-sampler")
        self._thread.start()

    def _loop(self, interval_s: float) -> None:
        while True:
            try:
                self.refresh()
                self.refresh_slow()
            except Exception:  # noqa: BLE001 - a failed reading must not end the sampling for good
                log.exception("metrics refresh failed")
            if self._stop.wait(interval_s):
                return

    def close(self) -> None:
        """Stop the thread and remove this sampler's gc callback (idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        self._gc_pauses.uninstall()
