"""Every edgechat metric, defined once on one registry; names are a contract (docs/metrics.md).

A leaf like the rest of telemetry: imports nothing of the daemon but its own modules, and no torch.
Attributes are the metric names minus `edgechat_`. What feeds them: listeners.Recorder (events from
the store, engine, watchdog and census) and sampler.Sampler (process, memory, GC on a timer).
"""
from __future__ import annotations

import importlib.metadata
import os
import platform

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values

from .gcstats import GENERATIONS as GC_GENERATIONS
from .labels import (ADMISSION_WAIT_REASONS, EVICT_REASONS, KV_DROP_REASONS, OUTCOMES, PRESSURE_ACTIONS, REJECT_REASONS,
                     STORE_OPERATIONS, TRUNCATE_REASONS, TURN_INDEX_BUCKETS)
from .multiproc import MULTIPROC_ENV

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
BATCH_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # rows of one step: decode tokens + prompt ids
BATCH_DECODE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)  # generations decoding in one step


def _version(dist: str, missing: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return missing


class Metrics:
    """All edgechat metric families on one registry (or the multiprocess folder), pre-created at 0."""

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
        # anonymous RSS + swap is what a leak holds wherever the kernel keeps it (leak alerts); RSS
        # and the RAM working set are what the limit is compared with (near-limit alerts, watchdog)
        self.process_anonymous_memory_bytes = g("process_anonymous_memory_bytes",
                                                "Anonymous resident memory (RssAnon): heap, arenas, tensors.")
        self.process_swap_bytes = g("process_swap_bytes", "Anonymous memory swapped out (VmSwap).")
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
        self.session_store_errors_total = c("session_store_errors_total", "Session store calls that "
                                            "failed (disk full, read-only, locked, unreachable).",
                                            ("operation",))
        # any worker that cannot write shows 0: the minimum over the live workers
        self.session_store_writable = g("session_store_writable", "1 while the session store "
                                        "accepts writes, 0 from a failed write until one succeeds.",
                                        mode="livemin")
        self.metrics_write_failures_total = c("metrics_write_failures_total", "Metric values this "
                                              "worker could not write to its multiprocess files "
                                              "(folder full).")
        # --- turns
        self.turn_duration_seconds = h("turn_duration_seconds", "Turn latency by position in its "
                                       "conversation.", ("turn_index",), buckets=LATENCY_BUCKETS)
        self.time_to_first_token_seconds = h("time_to_first_token_seconds", "Time to first token.",
                                             buckets=LATENCY_BUCKETS)
        self.time_per_output_token_seconds = h("time_per_output_token_seconds", "Decode time per "
                                               "token after the first.", buckets=TOKEN_TIME_BUCKETS)
        self.queue_wait_seconds = h("queue_wait_seconds", "Wait for a place in the batch.", buckets=QUEUE_BUCKETS)
        self.prompt_tokens_total = c("prompt_tokens_total", "Prompt tokens processed.")
        self.completion_tokens_total = c("completion_tokens_total", "Tokens generated.")
        self.turns_total = c("turns_total", "Turns by outcome.", ("outcome",))
        self.generations_in_progress = g("generations_in_progress", "Generations in the batch.", mode="livesum")
        self.queue_depth = g("queue_depth", "Requests waiting to join the batch.", mode="livesum")
        # --- the batch: every running generation advances one token per step (continuous batching)
        self.batch_limit = g("batch_limit", "Configured generations per worker's batch (max_batch).",
                             mode="livemax")
        self.batch_rows = h("batch_rows", "Rows per batch step: decode tokens and prompt tokens.",
                            buckets=BATCH_ROW_BUCKETS)
        self.batch_decode_rows = h("batch_decode_rows", "Generations decoding together per batch step.",
                                   buckets=BATCH_DECODE_BUCKETS)
        self.admission_waits_total = c("admission_waits_total", "Requests that waited to join the batch, by "
                                       "what they waited for.", ("reason",))
        self.kv_running_bytes = g("kv_running_bytes", "Bytes of KV caches reserved by generations in the "
                                  "batch.")
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
        self.model_info = g("model_info", "The served model and its decode path.",
                            ("model", "dtype", "kernel", "step", "compiled", "leak_mode"),
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
            self.session_store_errors_total.labels(operation)
        self.session_store_writable.set(1)
        for reason in KV_DROP_REASONS:
            self.kv_cache_dropped_total.labels(reason)
        for reason in REJECT_REASONS:
            self.requests_rejected_total.labels(reason)
        for action in PRESSURE_ACTIONS:
            self.memory_pressure_actions_total.labels(action)
        for reason in ADMISSION_WAIT_REASONS:
            self.admission_waits_total.labels(reason)
        for gen in map(str, GC_GENERATIONS):
            for metric in (self.gc_collections_total, self.gc_collected_objects_total,
                           self.gc_uncollectable_objects_total, self.gc_pause_seconds):
                metric.labels(gen)
        self.build_info.labels(_version("edgechat", "0+unknown"), platform.python_version(),
                               _version("torch", "none"), _version("transformers", "none")).set(1)

    # --- listener protocols (the store and the engine call these; they never import metrics) ---

    def track_tracemalloc(self) -> None:
        """Define the tracemalloc gauges from now on (tracing started by config or at run time)."""
        if self.tracemalloc_traced_bytes is None:
            self.tracemalloc_traced_bytes = self._gauge("tracemalloc_traced_bytes", "Python heap traced.")
            self.tracemalloc_peak_bytes = self._gauge("tracemalloc_peak_bytes", "Peak Python heap traced.")

    def on_close(self, callback) -> None:
        """Run callback() at close (e.g. stop the sampler, the metrics port server)."""
        self._closers.append(callback)

    def close(self) -> None:
        """Run the on_close callbacks, last registered first (idempotent)."""
        while self._closers:
            self._closers.pop()()
