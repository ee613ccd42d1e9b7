"""Every edgechat metric, defined once; process/GC/host gauges refreshed on a timer (multiprocess-safe).

A leaf: imports nothing of the daemon except its own readers (procstats, gcstats), and no torch.
Names are a contract (issue 3, docs/metrics.md); attributes are the names minus `edgechat_`.
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import threading
import time
import tracemalloc

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

from . import gcstats, procstats

TURN_INDEX_BUCKETS = ("1", "2-5", "6-10", "11-20", "21+")
OUTCOMES = ("ok", "length", "timeout", "cancelled", "error")
TRUNCATE_REASONS = ("turns", "tokens")
EVICT_REASONS = ("ttl", "lru", "deleted", "memory_pressure")
# daemon.sessions.STORE_OPERATIONS (a leaf: metrics imports nothing of the daemon)
STORE_OPERATIONS = ("create", "get", "delete", "sweep", "stats", "acquire", "commit", "release")
REJECT_REASONS = ("queue_full", "queue_timeout", "unauthorized", "session_busy",
                  "memory_pressure")  # pre-created only
# What the memory watchdog (daemon/watchdog.py) does; level 0 = ok, 1 = above soft, 2 = above hard.
PRESSURE_ACTIONS = ("evict_sessions", "release_caches", "gc_collect", "malloc_trim", "refuse_turns",
                    "resume_turns")
# The object census (daemon/census.py) exports these types; every other type is summed into "other".
LIVE_OBJECT_TYPES = ("torch.Tensor", "dict", "list", "tuple", "set", "function", "cell", "other")
KV_DROP_REASONS = ("lru", "oversize", "released", "pressure")  # daemon.kvcache.DROP_REASONS
OTHER = "other"  # any label value outside the known sets, so cardinality stays bounded
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# gc.get_objects(2) holds the GIL ~3-25 ms per 200 k objects (torch + transformers, loaded box):
# a slow signal, so counted at most this often, on the sampler thread only.
TRACKED_OBJECTS_EVERY_S = 30.0

# Seconds. CPU inference: a tiny model answers in ~10 ms, a 0.5B model's long turn takes minutes.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 45, 60, 90, 120)
HTTP_BUCKETS = (0.001, 0.005) + LATENCY_BUCKETS  # health checks and scrapes take ~1 ms
TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)
GC_PAUSE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
# memory ~10 us, SQLite 0.05-0.5 ms (a commit's fsync: ms, more on SD cards), Redis ~0.2 ms a round trip
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
HISTORY_MESSAGE_BUCKETS = (1, 2, 3, 5, 7, 11, 13, 21, 41, 81, 161, 321, 641)  # 2n+1: n turns + new one
PROMPT_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def turn_index_bucket(turn: int) -> str:
    """The bounded turn_index label of a turn's 1-based position in its conversation."""
    if turn <= 1:
        return "1"
    if turn <= 5:
        return "2-5"
    if turn <= 10:
        return "6-10"
    return "11-20" if turn <= 20 else "21+"


def _bounded(value: str, allowed: tuple[str, ...]) -> str:
    return value if value in allowed else OTHER


def _version(dist: str, missing: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return missing


class Metrics:
    """All edgechat metrics on one registry; also the session-store and engine listener."""

    def __init__(self, registry: CollectorRegistry | None = None, *, multiprocess: bool | None = None,
                 store_shared: bool = False):
        """multiprocess=None: on when PROMETHEUS_MULTIPROC_DIR is set. store_shared: sessions live in
        one store all workers see (SQLite/Redis), so its gauges must not be summed across workers."""
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV)) if multiprocess is None else multiprocess
        if self.multiprocess and not getattr(values.ValueClass, "_multiprocess", False):
            raise RuntimeError(f"{MULTIPROC_ENV} must be set before prometheus_client is first imported")
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) if self.multiprocess else None
        self.registry = CollectorRegistry() if registry is None else registry
        c, g, h = self._counter, self._gauge, self._histogram
        # --- per worker: one series per live pid in multiprocess mode (`pid` added by the collector)
        self.process_resident_memory_bytes = g("process_resident_memory_bytes", "Resident set size.")
        self.process_unique_memory_bytes = g("process_unique_memory_bytes",
                                             "Unique set size: memory freed if this worker exited.")
        self.process_virtual_memory_bytes = g("process_virtual_memory_bytes", "Virtual memory size.")
        self.process_open_fds = g("process_open_fds", "Open file descriptors.")
        self.process_threads = g("process_threads", "OS threads.")
        self.process_start_time_seconds = g("process_start_time_seconds", "Start time, Unix seconds.")
        # Counters cannot be set, so CPU grows by deltas; in multiprocess mode counters are summed,
        # so the pid label is ours; worker_exited drops a dead pid's series (multiproc.py).
        self._cpu_labels = ("pid",) if self.multiprocess else ()
        self.process_cpu_seconds_total = c("process_cpu_seconds_total", "User+system CPU seconds.",
                                           self._cpu_labels)
        self.model_load_seconds = g("model_load_seconds", "Seconds this worker took to load its model.")
        self.gc_tracked_objects = g("gc_tracked_objects", "Objects tracked by the GC.", ("generation",))
        # --- shared truths every worker measures alike: the freshest sample wins, dead workers never
        self.host_memory_available_bytes = g("host_memory_available_bytes", "Host available memory.",
                                             mode="livemostrecent")
        self.host_memory_total_bytes = g("host_memory_total_bytes", "Host total memory.", mode="livemax")
        self.memory_limit_bytes = g("memory_limit_bytes", "Memory budget: config, else cgroup "
                                    "limit, else host total.", mode="livemax")
        self.service_memory_bytes = g("service_memory_bytes", "Memory counted against the limit: "
                                      "cgroup working set, else RSS of master+workers.",
                                      mode="livemostrecent")
        self.service_memory_charged_bytes = g(
            "service_memory_charged_bytes", "Cgroup usage incl. reclaimable page cache "
            "(= service_memory_bytes outside a limited cgroup).", mode="livemostrecent")
        # --- history: an in-memory store is per worker (sum the workers); a shared store is one
        # truth seen by all, so summing would count it once per worker: take the freshest report.
        store_mode = "livemostrecent" if store_shared else "livesum"
        self.sessions = g("sessions", "Active sessions.", mode=store_mode)
        self.history_messages = g("history_messages", "Messages held over all sessions.", mode=store_mode)
        self.history_messages_max = g("history_messages_max", "Messages in the longest session.",
                                      mode="livemax")
        self.history_tokens_max = g("history_tokens_max", "Tokens in the longest session.", mode="livemax")
        self.history_max_turns = g("history_max_turns", "Configured turns kept; 0 = unbounded.",
                                   mode="livemax")
        self.history_truncations_total = c("history_truncations_total", "Messages dropped by trimming.",
                                           ("reason",))
        self.sessions_evicted_total = c("sessions_evicted_total", "Sessions removed.", ("reason",))
        self.turn_history_messages = h("turn_history_messages", "History messages sent to the model "
                                       "per session turn.", buckets=HISTORY_MESSAGE_BUCKETS)
        self.turn_prompt_tokens = h("turn_prompt_tokens", "Prompt tokens per turn.",
                                    buckets=PROMPT_TOKEN_BUCKETS)
        # --- session store: a SQLite file is one shared truth every worker measures: freshest wins
        self.session_store_bytes = g("session_store_bytes", "Session store on disk (SQLite file + "
                                     "WAL); 0 where not measured (memory, Redis).", mode="livemostrecent")
        self.session_store_operation_seconds = h("session_store_operation_seconds", "Session store "
                                                 "call latency by operation.", ("operation",),
                                                 buckets=STORE_BUCKETS)
        # --- turns
        self.turn_duration_seconds = h("turn_duration_seconds", "Turn latency by position in its "
                                       "conversation.", ("turn_index",), buckets=LATENCY_BUCKETS)
        self.time_to_first_token_seconds = h("time_to_first_token_seconds", "Time to first token.",
                                             buckets=LATENCY_BUCKETS)
        self.time_per_output_token_seconds = h("time_per_output_token_seconds", "Decode time per "
                                               "token after the first.", buckets=TOKEN_TIME_BUCKETS)
        self.queue_wait_seconds = h("queue_wait_seconds", "Wait for the model lock.", buckets=QUEUE_BUCKETS)
        self.prompt_tokens_total = c("prompt_tokens_total", "Prompt tokens processed.")
        self.completion_tokens_total = c("completion_tokens_total", "Tokens generated.")
        self.turns_total = c("turns_total", "Turns by outcome.", ("outcome",))
        self.generations_in_progress = g("generations_in_progress", "Generations running.", mode="livesum")
        self.queue_depth = g("queue_depth", "Requests waiting for the model.", mode="livesum")
        # --- KV caches kept between turns: each worker holds its own, so bytes are per pid
        self.kv_cache_bytes = g("kv_cache_bytes", "Bytes of KV caches kept between turns.")
        self.kv_cache_budget_bytes = g("kv_cache_budget_bytes", "Configured KV cache budget per "
                                       "worker; 0 = off.", mode="livemax")
        self.kv_cache_hits_total = c("kv_cache_hits_total", "Turns whose prompt reused a kept KV "
                                     "cache prefix.")
        self.kv_cache_misses_total = c("kv_cache_misses_total", "Turns prefilled from the first token.")
        self.kv_cache_reused_tokens_total = c("kv_cache_reused_tokens_total", "Prompt tokens taken from "
                                              "kept KV caches instead of being prefilled.")
        self.kv_cache_dropped_total = c("kv_cache_dropped_total", "KV caches dropped, by reason.",
                                        ("reason",))
        # --- HTTP
        self.http_requests_total = c("http_requests_total", "HTTP requests by route template.",
                                     ("route", "method", "status"))
        self.http_request_duration_seconds = h("http_request_duration_seconds", "HTTP request latency "
                                               "(streams: until the body is closed).", ("route",),
                                               buckets=HTTP_BUCKETS)
        self.requests_rejected_total = c("requests_rejected_total", "Requests refused.", ("reason",))
        # --- GC
        self.gc_collections_total = c("gc_collections_total", "GC runs.", ("generation",))
        self.gc_collected_objects_total = c("gc_collected_objects_total", "Objects freed by the GC.",
                                            ("generation",))
        self.gc_uncollectable_objects_total = c("gc_uncollectable_objects_total", "Uncollectable "
                                                "objects found.", ("generation",))
        self.gc_pause_seconds = h("gc_pause_seconds", "GC pause.", ("generation",), buckets=GC_PAUSE_BUCKETS)
        # --- info (value 1; gauges because Info does not work in multiprocess mode)
        self.build_info = g("build_info", "Versions.", ("version", "python", "torch", "transformers"),
                            mode="livemax")
        self.model_info = g("model_info", "The served model.", ("model", "dtype", "leak_mode"),
                            mode="livemax")
        self.tracemalloc_traced_bytes: Gauge | None = None
        self.tracemalloc_peak_bytes: Gauge | None = None
        # --- memory self-protection and diagnostics (daemon/watchdog.py, daemon/census.py)
        self.memory_pressure_level = g("memory_pressure_level", "Memory watchdog state: 0 ok, 1 above "
                                       "the soft limit (freeing), 2 above the hard limit (refusing turns).")
        self.memory_pressure_actions_total = c("memory_pressure_actions_total", "Memory watchdog "
                                               "actions taken.", ("action",))
        self.live_objects = g("live_objects", "GC-tracked live objects by type (object census, "
                              "at most every minute).", ("type",))
        self.torch_tensor_bytes = g("torch_tensor_bytes", "Bytes of the distinct storages of live "
                                    "torch tensors (object census).")
        self._preinit()
        self._proc = psutil.Process()
        self._cgroup = procstats.CgroupMemory.detect()
        self._config_limit = 0
        self._model_labels: tuple | None = None
        self._cpu_seen = (os.getpid(), 0.0)
        self._gc_counters = gcstats.GcCounters()
        self._gc_pauses = gcstats.GcPauseRecorder(GC_PAUSE_BUCKETS)
        self._gc_pauses.install()
        self._refresh_lock = threading.Lock()
        self._last_refresh = 0.0
        self._tracked_due = 0.0
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None
        self._closers: list = []

    def _gauge(self, name, doc, labels=(), mode="liveall"):
        return Gauge("edgechat_" + name, doc, labels, registry=self.registry, multiprocess_mode=mode)

    def _counter(self, name, doc, labels=()):
        return Counter("edgechat_" + name, doc, labels, registry=self.registry)

    def _histogram(self, name, doc, labels=(), *, buckets):
        return Histogram("edgechat_" + name, doc, labels, registry=self.registry, buckets=buckets)

    def _preinit(self) -> None:
        """Create the known label sets at 0, so rate() works from the first scrape."""
        for outcome in OUTCOMES:
            self.turns_total.labels(outcome)
        for bucket in TURN_INDEX_BUCKETS:
            self.turn_duration_seconds.labels(bucket)
        for reason in TRUNCATE_REASONS:
            self.history_truncations_total.labels(reason)
        for reason in EVICT_REASONS:
            self.sessions_evicted_total.labels(reason)
        for operation in STORE_OPERATIONS:
            self.session_store_operation_seconds.labels(operation)
        for reason in KV_DROP_REASONS:
            self.kv_cache_dropped_total.labels(reason)
        for reason in REJECT_REASONS:
            self.requests_rejected_total.labels(reason)
        for action in PRESSURE_ACTIONS:
            self.memory_pressure_actions_total.labels(action)
        for gen in map(str, gcstats.GENERATIONS):
            for metric in (self.gc_collections_total, self.gc_collected_objects_total,
                           self.gc_uncollectable_objects_total, self.gc_pause_seconds):
                metric.labels(gen)
        self.build_info.labels(_version("edgechat", "0+unknown"), platform.python_version(),
                               _version("torch", "none"), _version("transformers", "none")).set(1)

    # --- listener protocols (the store and the engine call these; they never import metrics) ---
    def on_truncate(self, reason: str, messages: int) -> None:
        """A session's history lost `messages` messages to trimming by turns or tokens."""
        self.history_truncations_total.labels(_bounded(reason, TRUNCATE_REASONS)).inc(max(messages, 0))

    def on_evict(self, reason: str, sessions: int) -> None:
        """`sessions` sessions left the store (ttl, lru, deleted)."""
        self.sessions_evicted_total.labels(_bounded(reason, EVICT_REASONS)).inc(max(sessions, 0))

    def on_store_op(self, operation: str, seconds: float) -> None:
        """One session store call took `seconds` (operation in STORE_OPERATIONS)."""
        self.session_store_operation_seconds.labels(_bounded(operation, STORE_OPERATIONS)).observe(
            max(seconds, 0.0))

    def on_queue(self, waiting: int, running: int) -> None:
        """The model queue changed: requests waiting, generations running."""
        self.queue_depth.set(waiting)
        self.generations_in_progress.set(running)

    def set_store_stats(self, stats) -> None:
        """Copy store totals (.sessions .messages_total .messages_max .tokens_max) into the gauges."""
        self.sessions.set(stats.sessions)
        self.history_messages.set(stats.messages_total)
        self.history_messages_max.set(stats.messages_max)
        self.history_tokens_max.set(stats.tokens_max)
        store_bytes = getattr(stats, "store_bytes", None)
        if store_bytes is not None:
            self.session_store_bytes.set(store_bytes)

    def on_kv_cache(self, *, bytes_held: int, hit: bool | None = None, reused_tokens: int = 0,
                    dropped: dict | None = None) -> None:
        """The engine's KV pool changed: bytes held, a lookup's outcome, caches dropped by reason."""
        self.kv_cache_bytes.set(bytes_held)
        if hit is not None:
            (self.kv_cache_hits_total if hit else self.kv_cache_misses_total).inc()
            self.kv_cache_reused_tokens_total.inc(max(reused_tokens, 0))
        for reason, count in (dropped or {}).items():
            self.kv_cache_dropped_total.labels(_bounded(reason, KV_DROP_REASONS)).inc(max(count, 0))

    def on_memory_pressure(self, action: str) -> None:
        """The memory watchdog took `action` (one of PRESSURE_ACTIONS)."""
        self.memory_pressure_actions_total.labels(_bounded(action, PRESSURE_ACTIONS)).inc()

    def set_memory_pressure_level(self, level: int) -> None:
        """The memory watchdog's state: 0 ok, 1 above the soft limit, 2 above the hard limit."""
        self.memory_pressure_level.set(level)

    def set_census(self, counts, tensor_bytes: int) -> None:
        """Export an object census: {type: live objects} over LIVE_OBJECT_TYPES, tensor storage bytes."""
        for name, count in counts.items():
            self.live_objects.labels(_bounded(name, LIVE_OBJECT_TYPES)).set(count)
        self.torch_tensor_bytes.set(tensor_bytes)

    def track_tracemalloc(self) -> None:
        """Export the tracemalloc gauges from now on (tracing started by config or at run time)."""
        if self.tracemalloc_traced_bytes is None:
            self.tracemalloc_traced_bytes = self._gauge("tracemalloc_traced_bytes", "Python heap traced.")
            self.tracemalloc_peak_bytes = self._gauge("tracemalloc_peak_bytes", "Peak Python heap traced.")

    def set_config(self, cfg) -> None:
        """Export configured limits (history turns, memory budget); start tracemalloc if asked."""
        self.history_max_turns.set(cfg.max_history_turns)
        self.kv_cache_budget_bytes.set(int(getattr(cfg, "kv_cache_bytes", 0) or 0))
        self._config_limit = int(getattr(cfg, "memory_limit_bytes", 0) or 0)
        if getattr(cfg, "tracemalloc", False) and self.tracemalloc_traced_bytes is None:
            if not tracemalloc.is_tracing():
                tracemalloc.start(getattr(cfg, "tracemalloc_frames", 1))
            self.track_tracemalloc()
        self.refresh()

    def set_model_info(self, model: str, dtype: str, leak_mode: str, load_seconds: float) -> None:
        """Record what this worker serves and how long loading took."""
        labels = (model, dtype, leak_mode)
        if self._model_labels not in (None, labels):
            # multiprocess files cannot forget a series: 0 marks the old one replaced
            self.model_info.labels(*self._model_labels).set(0)
        self._model_labels = labels
        self.model_info.labels(*labels).set(1)
        self.model_load_seconds.set(load_seconds)

    def observe_turn(self, *, turn: int, outcome: str, duration_s: float, ttft_s: float | None,
                     completion_tokens: int, prompt_tokens: int, queue_wait_s: float,
                     history_messages: int | None) -> None:
        """Record one finished turn; history_messages is None for stateless chat completions."""
        self.turns_total.labels(_bounded(outcome, OUTCOMES)).inc()
        self.turn_duration_seconds.labels(turn_index_bucket(turn)).observe(duration_s)
        if ttft_s is not None:
            self.time_to_first_token_seconds.observe(ttft_s)
            if completion_tokens > 1:
                per_token = (duration_s - ttft_s) / (completion_tokens - 1)
                self.time_per_output_token_seconds.observe(max(per_token, 0.0))
        self.prompt_tokens_total.inc(max(prompt_tokens, 0))
        self.completion_tokens_total.inc(max(completion_tokens, 0))
        self.queue_wait_seconds.observe(max(queue_wait_s, 0.0))
        if history_messages is not None:
            self.turn_history_messages.observe(history_messages)
        self.turn_prompt_tokens.observe(prompt_tokens)

    # --- sampling ----------------------------------------------------------------------------
    def refresh(self, max_age_s: float = 0.0) -> None:
        """Sample process, host, cgroup, GC and tracemalloc into the gauges now (~0.2 ms).

        Skipped when the last refresh is younger than max_age_s (scrape storms).
        """
        with self._refresh_lock:
            now = time.monotonic()
            if max_age_s and now - self._last_refresh < max_age_s:
                return
            self._last_refresh = now
            self._refresh_process()
            self._refresh_memory_budget()
            self._refresh_gc()
            if self.tracemalloc_traced_bytes is not None:  # (0, 0) once tracing is stopped
                traced, peak = tracemalloc.get_traced_memory()
                self.tracemalloc_traced_bytes.set(traced)
                self.tracemalloc_peak_bytes.set(peak)

    def refresh_slow(self) -> None:
        """Costly readings, sampler thread only: USS (page-table walk, ~2-10 ms), and GC tracked
        objects at most every TRACKED_OBJECTS_EVERY_S."""
        uss = procstats.unique_memory_bytes(self._proc)
        if uss is not None:
            self.process_unique_memory_bytes.set(uss)
        now = time.monotonic()
        if now >= self._tracked_due:
            self._tracked_due = now + TRACKED_OBJECTS_EVERY_S
            for gen, count in zip(gcstats.GENERATIONS, gcstats.tracked_objects()):
                self.gc_tracked_objects.labels(str(gen)).set(count)

    def _refresh_process(self) -> None:
        pid = os.getpid()
        if pid != self._proc.pid:  # forked since construction: measure the child
            self._proc = psutil.Process(pid)
        sample = procstats.process_sample(self._proc)
        self.process_resident_memory_bytes.set(sample.rss_bytes)
        self.process_virtual_memory_bytes.set(sample.vms_bytes)
        self.process_open_fds.set(sample.open_fds)
        self.process_threads.set(sample.threads)
        self.process_start_time_seconds.set(sample.start_time_s)
        seen_pid, seen_cpu = self._cpu_seen
        base = seen_cpu if seen_pid == pid else 0.0  # a forked child's CPU time starts at 0
        if sample.cpu_seconds > base:
            cpu = self.process_cpu_seconds_total
            (cpu.labels(str(pid)) if self._cpu_labels else cpu).inc(sample.cpu_seconds - base)
            base = sample.cpu_seconds
        self._cpu_seen = (pid, base)

    def _refresh_memory_budget(self) -> None:
        budget = procstats.memory_budget(self._cgroup, self._config_limit, siblings=self.multiprocess)
        self.host_memory_available_bytes.set(budget.host_available)
        self.host_memory_total_bytes.set(budget.host_total)
        self.memory_limit_bytes.set(budget.limit)
        self.service_memory_bytes.set(budget.service)
        self.service_memory_charged_bytes.set(budget.charged)

    def _refresh_gc(self) -> None:
        for gen, delta in enumerate(self._gc_counters.deltas()):
            label = str(gen)
            self.gc_collections_total.labels(label).inc(delta["collections"])
            self.gc_collected_objects_total.labels(label).inc(delta["collected"])
            self.gc_uncollectable_objects_total.labels(label).inc(delta["uncollectable"])
        self._gc_pauses.flush_into(self.gc_pause_seconds)

    def start_sampler(self, interval_s: float) -> None:
        """Refresh every interval_s on a daemon thread (idempotent); start it in the worker, after fork."""
        if self._sampler is not None and self._sampler.is_alive():
            return
        self._stop.clear()
        self._sampler = threading.Thread(target=self._sample_loop, args=(interval_s,), daemon=True,
                                         name="edgechat-metrics-sampler")
        self._sampler.start()

    def _sample_loop(self, interval_s: float) -> None:
        while True:
            try:
                self.refresh()
                self.refresh_slow()
            except Exception:  # noqa: BLE001 - a failed reading must not end the sampling for good
                logging.getLogger(__name__).exception("metrics refresh failed")
            if self._stop.wait(interval_s):
                return

    def on_close(self, callback) -> None:
        """Run callback() at close (e.g. stop the metrics port server)."""
        self._closers.append(callback)

    def close(self) -> None:
        """Stop the sampler, remove this instance's gc callback, run on_close callbacks (idempotent)."""
        while self._closers:
            self._closers.pop()()
        self._stop.set()
        if self._sampler is not None and self._sampler is not threading.current_thread():
            self._sampler.join(timeout=5)
        self._sampler = None
        self._gc_pauses.uninstall()
