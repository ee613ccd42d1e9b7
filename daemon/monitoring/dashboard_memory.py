"""The "Is it leaking?" dashboard: memory against its limit first, then history, GC and the firing alerts."""

from daemon.monitoring.grafana import (annotation, dashboard, gauge, quantile, rate, red_dashed, row, sel, stat,
                                       table, target, timeseries)
from daemon.monitoring.thresholds import Thresholds

T = Thresholds()  # the alert rules' thresholds: the dashboards colour panels at the same values

UID = "edgechat-memory"
TITLE = "edgechat / Is it leaking?"

_SERVICE = f"max by (instance) ({sel('edgechat_service_memory_bytes')})"
_LIMIT = f"max by (instance) ({sel('edgechat_memory_limit_bytes')})"
_SLOPE = "max by (instance) (deriv({}[{}]))"
# 2 x max_turns + 1 messages (system prompt + max_turns user/assistant pairs); hidden when the limit is 0
_HISTORY_LIMIT = (f"max by (instance) (2 * {sel('edgechat_history_max_turns')} + 1"
                  f" and {sel('edgechat_history_max_turns')} > 0)")
_REFUSED = rate("edgechat_requests_rejected_total", 'reason="memory_pressure"')
FIRING = sel("ALERTS", 'alertstate="firing", alertname=~"Edgechat.*"')
_ALERT_COLUMNS = ("Time", "Value", "__name__", "alertstate", "job")


def firing_alerts_table(w=8, h=5):
    """Return the table of firing Edgechat* alerts (also used on the turns dashboard)."""
    return table(
        "Firing edgechat alerts",
        "Edgechat* alerts firing now, from Prometheus' ALERTS series (needs the rules in prometheus/rules/ "
        "loaded). Empty is good; each alert's runbook is in docs/runbooks.md.",
        "none", [target(FIRING, instant=True, fmt="table")], _ALERT_COLUMNS, w=w, h=h,
        no_value="No edgechat alert is firing")


def shared_annotations():
    """Return the worker-start and firing-alert annotations both dashboards overlay on their graphs."""
    return [
        annotation("Worker (re)starts", f"max by (instance, pid) ({sel('edgechat_process_start_time_seconds')}) * 1000",
                   "worker started", "pid {{pid}} on {{instance}}", "orange", "instance,pid", value_is_time=True),
        annotation("Firing edgechat alerts", FIRING, "{{alertname}}", "{{severity}} on {{instance}}", "red",
                   "alertname,severity"),
    ]


def _top_row():
    """Return the at-a-glance stats: how full, how long until full, is history bounded, recent restart."""
    return [
        gauge("Memory used of limit",
              "Service memory (cgroup memory.current, else the workers' summed RSS) as a share of the memory "
              f"limit. Orange from {T.near_limit_warning_ratio:.0%}, red from {T.near_limit_critical_ratio:.0%} "
              "(EdgechatMemoryNearLimit).", "percentunit",
              [target(f"{_SERVICE} / ({_LIMIT} > 0)", "{{instance}}")],
              [(None, "green"), (T.near_limit_warning_ratio, "orange"), (T.near_limit_critical_ratio, "red")]),
        stat("Projected time to memory limit",
             "Headroom divided by the 1 h slope of service memory: how long until the limit at the current "
             "growth. Years when flat or falling; hours (orange under a day, red under 6 h) when leaking.",
             "s", [target(f"({_LIMIT} - {_SERVICE}) / clamp_min("
                          f"{_SLOPE.format(sel('edgechat_service_memory_bytes'), '1h')}, 1)", "{{instance}}")],
             [(None, "red"), (21600, "orange"), (86400, "green")]),
        stat("History limit (max turns)",
             "The configured per-session history limit in turns (EDGECHAT_MAX_HISTORY_TURNS). 0 means "
             "unbounded: history, prompt length and latency then grow with every turn.", "none",
             [target(f"max by (instance) ({sel('edgechat_history_max_turns')})", "{{instance}}")],
             [(None, "green")],
             mappings=[{"options": {"0": {"color": "red", "index": 0, "text": "unbounded"}}, "type": "value"}]),
        stat("Youngest worker uptime",
             "Time since the most recent worker start. Short after a restart, an OOM kill or gunicorn's "
             "max_requests recycling; restarts also show as orange annotations on the graphs.", "s",
             [target(f"min by (instance) (time() - {sel('edgechat_process_start_time_seconds')})", "{{instance}}")],
             [(None, "orange"), (3600, "green")]),
        firing_alerts_table(),
    ]


def _memory_rows():
    """Return the memory row: service total against the limit, its slope, then RSS and USS per worker."""
    service = sel("edgechat_service_memory_bytes")
    return [
        row("Memory"),
        timeseries("Service memory vs limit",
                   "What counts against the memory limit (cgroup memory.current, else the sum of the workers' "
                   "RSS), with the limit as a red dashed line. Healthy: flat after warm-up with a GC sawtooth. "
                   "Leak: a steady climb towards the line that idle periods do not undo.", "bytes",
                   [target(_SERVICE, "service {{instance}}"), target(_LIMIT, "limit {{instance}}")],
                   w=16, h=9, overrides=[red_dashed("limit .*")], minimum=0),
        timeseries("Service memory growth rate",
                   "Slope of service memory (least-squares deriv) over 30 min and 1 h. Healthy: around zero. "
                   "Leak: stays above zero for hours. EdgechatMemoryLeakSuspected watches such slopes (30 min "
                   "to a day) of anonymous memory + swap less the KV pool, which fills to its budget and stays.",
                   "Bps",
                   [target(_SLOPE.format(service, "30m"), "30m slope {{instance}}"),
                    target(_SLOPE.format(service, "1h"), "1h slope {{instance}}")], w=8, h=9),
        timeseries("Resident memory (RSS) per worker",
                   "Resident set size of each gunicorn worker (one series per pid). A leak in one worker "
                   "shows as one line climbing; workers recycled by max_requests start new lines.", "bytes",
                   [target(sel("edgechat_process_resident_memory_bytes"), "{{pid}}")], w=8, minimum=0),
        timeseries("Unique memory (USS) per worker",
                   "Memory only this worker holds (not shared with the master or other workers). Model "
                   "weights shared after fork do not count; memory a worker leaks does.", "bytes",
                   [target(sel("edgechat_process_unique_memory_bytes"), "{{pid}}")], w=8, minimum=0),
        timeseries("Anonymous memory and swap per worker",
                   "Each worker's anonymous RSS (RssAnon: heap, arenas, tensors) and what the kernel swapped "
                   "out of it (VmSwap). A leak grows their sum even when RSS looks flat because the leaked "
                   "pages went to swap; the leak alerts follow this sum, the level alerts RAM alone.", "bytes",
                   [target(sel("edgechat_process_anonymous_memory_bytes"), "anonymous {{pid}}"),
                    target(sel("edgechat_process_swap_bytes"), "swap {{pid}}")], w=8, minimum=0),
    ]


def _protection_rows():
    """Return the self-protection and census row: the memory watchdog's state and actions, live objects."""
    return [
        row("Memory self-protection and object census"),
        timeseries("Memory watchdog level",
                   "Each worker's memory watchdog: 0 ok, 1 above the soft limit (it frees idle sessions, "
                   "caches, runs gc and malloc_trim), 2 above the hard limit (new turns get 503 and /readyz "
                   "fails until memory is back under the soft limit). A leak walks it up 0, 1, 2 instead of "
                   "ending in an OOM kill.", "none",
                   [target(f"max by (instance) ({sel('edgechat_memory_pressure_level')})", "{{instance}}")],
                   w=8, minimum=0, steps=[(None, "green"), (1, "orange"), (2, "red")]),
        timeseries("Memory watchdog actions",
                   "What the watchdogs did, per second, by action: evict_sessions, release_caches, gc_collect, "
                   "malloc_trim (each pass above the soft limit), refuse_turns and resume_turns (crossing the "
                   "hard limit and back). Zero when memory is healthy.", "ops",
                   [target(f"sum by (instance, action) ({rate('edgechat_memory_pressure_actions_total')})",
                           "{{action}}")], w=8),
        timeseries("Turns refused for memory",
                   "Requests answered 503 memory_pressure because the service is above its hard memory limit "
                   "(edgechat_requests_rejected_total{reason=\"memory_pressure\"}). The daemon degrades "
                   "here instead of being OOM-killed; see the EdgechatMemoryLeakSuspected runbook.", "reqps",
                   [target(f"sum by (instance) ({_REFUSED})", "{{instance}}")], w=8),
        timeseries("Torch tensor bytes per worker",
                   "Bytes of the distinct storages of live torch tensors in each worker (object census, at "
                   "most every 2 min). Weights and a bounded KV cache keep it flat; a tensor leak (outputs or "
                   "caches kept alive) makes it climb. tracemalloc does not see this memory.", "bytes",
                   [target(sel("edgechat_torch_tensor_bytes"), "{{pid}}")], minimum=0),
        timeseries("Live objects by type",
                   "GC-tracked live objects by type (torch.Tensor, dict, list, tuple, set, function, cell, "
                   "other), summed over workers; object census at most every 2 min. The type that climbs "
                   "is what leaks; `edgechat diagnose URL --snapshot` shows its growth and what holds it.",
                   "short", [target(f"sum by (instance, type) ({sel('edgechat_live_objects')})", "{{type}}")],
                   minimum=0),
    ]


def _history_rows():
    """Return the history row: sessions and message counts against the configured limit, trimming activity."""
    return [
        row("Conversation history"),
        timeseries("Active sessions",
                   "Sessions currently held. Grows with users; a store that never evicts (no TTL/LRU) keeps "
                   "growing even when users leave.", "short",
                   [target(f"sum by (instance) ({sel('edgechat_sessions')})", "{{instance}}")], w=6, minimum=0),
        timeseries("History messages (all sessions)",
                   "Messages held across all sessions. Bounded history: roughly sessions x limit. Unbounded "
                   "history: grows with every turn and never falls.", "short",
                   [target(f"sum by (instance) ({sel('edgechat_history_messages')})", "{{instance}}")],
                   w=6, minimum=0),
        timeseries("Longest history vs limit",
                   "Messages in the longest session against what the configured limit allows "
                   "(2 x max turns + 1, red dashed; absent when the limit is 0). History leak: the line "
                   "crosses the limit and keeps rising (EdgechatHistoryUnbounded).", "short",
                   [target(f"max by (instance) ({sel('edgechat_history_messages_max')})", "longest {{instance}}"),
                    target(_HISTORY_LIMIT, "limit {{instance}}")],
                   overrides=[red_dashed("limit .*")], minimum=0),
        timeseries("Longest history in tokens",
                   "Tokens in the longest session's history, i.e. the longest prompt the model is fed. "
                   "Drives prefill time; climbs without bound when history is not trimmed.", "short",
                   [target(f"max by (instance) ({sel('edgechat_history_tokens_max')})", "{{instance}}")],
                   w=8, minimum=0),
        timeseries("History messages per turn",
                   "p50 and p95 of the history length (messages) each turn was given. Flat at the limit when "
                   "trimming works; rising turn by turn when it does not.", "short",
                   [target(quantile(0.5, "edgechat_turn_history_messages"), "p50 {{instance}}"),
                    target(quantile(0.95, "edgechat_turn_history_messages"), "p95 {{instance}}")], w=8),
        timeseries("History truncations and session evictions",
                   "Rate of history trims (by turns or tokens) and of evicted sessions (ttl, lru, deleted). "
                   "Zero while history grows past the limit means trimming is broken.", "ops",
                   [target(f"sum by (instance, reason) ({rate('edgechat_history_truncations_total')})",
                           "truncated: {{reason}}"),
                    target(f"sum by (instance, reason) ({rate('edgechat_sessions_evicted_total')})",
                           "evicted: {{reason}}")], w=8),
        timeseries("Session store size on disk",
                   "The SQLite session file plus its write-ahead log (0 for the memory and Redis stores). "
                   "Healthy: plateaus, since expired sessions are deleted and their pages returned. "
                   "Leak: climbs with sessions that never expire or histories that are never trimmed.",
                   "bytes", [target(f"max by (instance) ({sel('edgechat_session_store_bytes')})", "{{instance}}")],
                   minimum=0),
        timeseries("Session store latency p99 by operation",
                   "99th percentile of session store calls (commit, acquire, get, ...). A commit writes the "
                   "whole history, so a history leak makes it slower; a slow or failing disk shows here "
                   "before turns fail.", "s",
                   [target(quantile(0.99, "edgechat_session_store_operation_seconds", by=("operation",)),
                           "{{operation}}")]),
    ]


def _gc_rows():
    """Return the Python GC and tracemalloc row."""
    return [
        row("Python garbage collector"),
        timeseries("GC collections by generation",
                   "Collections per second per generation. Generation 2 collections speeding up means "
                   "long-lived objects keep piling up.", "ops",
                   [target(f"sum by (instance, generation) ({rate('edgechat_gc_collections_total')})",
                           "gen {{generation}}")], w=8),
        timeseries("GC objects collected and uncollectable",
                   "Objects freed by the collector and objects it found but could not free (uncollectable, "
                   "which stay in gc.garbage). Uncollectable above zero and rising is a leak "
                   "(EdgechatGCUncollectableGrowing).", "ops",
                   [target(f"sum by (instance, generation) ({rate('edgechat_gc_collected_objects_total')})",
                           "collected gen {{generation}}"),
                    target(f"sum by (instance, generation) ({rate('edgechat_gc_uncollectable_objects_total')})",
                           "uncollectable gen {{generation}}")],
                   w=8, overrides=[red_dashed("uncollectable .*")]),
        timeseries("GC pause p99 by generation",
                   "99th percentile of stop-the-world GC pauses, measured with gc.callbacks. Pauses grow as "
                   "the number of tracked objects grows (EdgechatGCPausesHigh).", "s",
                   [target(quantile(0.99, "edgechat_gc_pause_seconds", by=("generation",)),
                           "gen {{generation}}")], w=8),
        timeseries("GC tracked objects by generation",
                   "Objects the collector tracks, per generation, summed over workers. Generation 2 climbing "
                   "without bound is the Python-object flavour of a leak.", "short",
                   [target(f"sum by (instance, generation) ({sel('edgechat_gc_tracked_objects')})",
                           "gen {{generation}}")], minimum=0),
        timeseries("Python heap traced by tracemalloc",
                   "Bytes of Python allocations traced by tracemalloc and their peak, per worker. Empty unless "
                   "tracemalloc is enabled (EDGECHAT_TRACEMALLOC; it costs CPU); `edgechat diagnose` names the "
                   "allocating lines.", "bytes",
                   [target(sel("edgechat_tracemalloc_traced_bytes"), "traced {{pid}}"),
                    target(sel("edgechat_tracemalloc_peak_bytes"), "peak {{pid}}")], minimum=0),
    ]


def _process_rows():
    """Return the host and per-worker resource row (leaks of descriptors, threads and address space)."""
    return [
        row("Host and workers"),
        timeseries("Host memory available",
                   "Memory the host can still hand out, against its total. On a 2-4 GB device, available "
                   "falling towards zero precedes the OOM killer.", "bytes",
                   [target(f"max by (instance) ({sel('edgechat_host_memory_available_bytes')})",
                           "available {{instance}}"),
                    target(f"max by (instance) ({sel('edgechat_host_memory_total_bytes')})", "total {{instance}}")],
                   w=8, overrides=[red_dashed("total .*")], minimum=0),
        timeseries("Virtual memory per worker",
                   "Virtual address space of each worker. Large and mostly reserved (mmapped weights); a "
                   "steady climb points at leaked mappings or thread stacks.", "bytes",
                   [target(sel("edgechat_process_virtual_memory_bytes"), "{{pid}}")], w=8, minimum=0),
        timeseries("CPU per worker",
                   "CPU seconds per second of each worker (1 = one core busy). Busy while idle hints at a "
                   "runaway collector or thread.", "percentunit",
                   [target(rate("edgechat_process_cpu_seconds_total"), "{{pid}}")], w=8, minimum=0),
        timeseries("Open file descriptors and threads per worker",
                   "Open file descriptors and OS threads of each worker. Either climbing with traffic is a "
                   "resource leak (sockets, files, thread pools).", "short",
                   [target(sel("edgechat_process_open_fds"), "fds {{pid}}"),
                    target(sel("edgechat_process_threads"), "threads {{pid}}")], minimum=0),
        stat("Model and leak mode",
             "The model served, its dtype, how it decodes (kernel; step one-call is the compiled kernels' fast "
             "path; compiled says where they came from, unavailable = the slow path) and the deliberate leak mode "
             "(off in production; the leak modes exist to test these dashboards and the alerts).", "none",
             [target(f"max by (instance, model, dtype, kernel, step, compiled, leak_mode) "
                     f"({sel('edgechat_model_info')})",
                     "{{model}} {{dtype}} {{kernel}} {{step}} compiled={{compiled}} leak_mode={{leak_mode}}")],
             [(None, "blue")], w=12, h=8, text_mode="name"),
    ]


def build():
    """Return the memory dashboard as a dict."""
    panels = [*_top_row(), *_memory_rows(), *_protection_rows(), *_history_rows(), *_gc_rows(),
              *_process_rows()]
    return dashboard(UID, TITLE,
                     "Is edgechat leaking? Memory against its limit, conversation history against its limit, "
                     "GC, restarts and firing alerts. See docs/dashboards.md.",
                     panels, shared_annotations(), [("edgechat-turns", "edgechat / Turns and latency")])
