"""Recording rules (level:metric:operation) that normalise edgechat's series to one per instance."""
from __future__ import annotations

import dataclasses

from .promql import Group, Rule, duration, number
from .thresholds import Thresholds

# Per-worker gauges carry `pid` under gunicorn's multiprocess mode and lack it in single-process
# mode; aggregating `by (job, instance, device)` gives one series per daemon either way. `device` is
# the fleet's target label where one Prometheus scrapes several devices (absent, so a no-op, on a
# device whose Prometheus sets it as an external label; see docs/fleet.md).
BY = "by (job, instance, device)"
EARLY_TURNS = "1|2-5"            # turn_index buckets that make the creep baseline
NOT_LATE_TURNS = "1|2-5|6-10"    # late = every other bucket ("11-20", "21+", and any added later)
ON = "on (job, instance, device)"


@dataclasses.dataclass(frozen=True)
class Names:
    """Recording-rule names; suffixes state the nominal window, which time scaling leaves alone."""

    service: str
    limit: str
    swap_sum: str
    anon_swap_sum: str
    committed: str
    usage_ratio: str
    committed_ratio: str
    kv_sum: str
    unpooled: str
    deriv_fast: str
    deriv_slow: str
    deriv_mid: str
    predict_fast: str
    predict_slow: str
    predict_mid: str
    unpooled_avg: str
    growth_day: str
    predict_day: str
    rss_sum: str
    rss_max: str
    uss_sum: str
    workers: str
    start_time_max: str
    uptime: str
    history_max: str
    max_turns: str
    history_allowed: str
    history_total: str
    history_delta: str
    sessions: str
    turns_rate: str
    turns_traffic: str
    turns_mid: str
    p95_by_index: str
    p95_all: str
    p95_early: str
    p95_late: str
    creep_ratio: str
    http_rate: str
    error_ratio: str
    rejected_rate: str
    rejected_ratio: str
    gc_pause_ratio: str
    gc_uncollectable: str
    decode_slow_path: str


def names_for(nominal: Thresholds) -> Names:
    """Derive every recording-rule name from the unscaled thresholds."""
    d = duration
    anon_swap = "instance:edgechat_process_anonymous_swap_bytes"
    unpooled = "instance:edgechat_memory_unpooled_bytes"
    committed = "instance:edgechat_memory_committed_bytes"
    dur = "edgechat_turn_duration_seconds"
    day, day_horizon = nominal.leak_day_window, nominal.leak_day_window * nominal.leak_day_horizon_windows
    return Names(
        service="instance:edgechat_service_memory_bytes:max",
        limit="instance:edgechat_memory_limit_bytes:max",
        swap_sum="instance:edgechat_process_swap_bytes:sum",
        anon_swap_sum=f"{anon_swap}:sum",
        committed=f"{committed}:sum",
        usage_ratio="instance:edgechat_memory_usage:ratio",
        committed_ratio="instance:edgechat_memory_committed:ratio",
        kv_sum="instance:edgechat_kv_bytes:sum",
        unpooled=f"{unpooled}:sum",
        deriv_fast=f"{unpooled}:deriv{d(nominal.leak_fast_window)}",
        deriv_slow=f"{unpooled}:deriv{d(nominal.leak_slow_window)}",
        deriv_mid=f"{unpooled}:deriv{d(nominal.leak_mid_window)}",
        predict_fast=f"{committed}:projected{d(nominal.leak_fast_window)}_{d(nominal.leak_fast_horizon)}",
        predict_slow=f"{committed}:projected{d(nominal.leak_slow_window)}_{d(nominal.leak_slow_horizon)}",
        predict_mid=f"{committed}:projected{d(nominal.leak_mid_window)}_{d(nominal.leak_mid_horizon)}",
        unpooled_avg=f"{unpooled}:avg{d(nominal.trend_interval)}",
        growth_day=f"{unpooled}:growth{d(day)}",
        predict_day=f"{committed}:projected{d(day)}_{d(day_horizon)}",
        rss_sum="instance:edgechat_process_resident_memory_bytes:sum",
        rss_max="instance:edgechat_process_resident_memory_bytes:max",
        uss_sum="instance:edgechat_process_unique_memory_bytes:sum",
        workers="instance:edgechat_workers:count",
        start_time_max="instance:edgechat_process_start_time_seconds:max",
        uptime="instance:edgechat_uptime_seconds:max",
        history_max="instance:edgechat_history_messages_max:max",
        max_turns="instance:edgechat_history_max_turns:max",
        history_allowed="instance:edgechat_history_messages_max:limit",
        history_total="instance:edgechat_history_messages:sum",
        history_delta=f"instance:edgechat_history_messages:delta{d(nominal.history_growth_step)}",
        sessions="instance:edgechat_sessions:sum",
        turns_rate=f"instance:edgechat_turns:rate{d(nominal.latency_rate_window)}",
        turns_traffic=f"instance:edgechat_turns:increase{d(nominal.leak_traffic_window)}",
        turns_mid=f"instance:edgechat_turns:increase{d(nominal.leak_mid_window)}",
        p95_by_index=f"instance_turn_index:{dur}:p95_rate{d(nominal.latency_rate_window)}",
        p95_all=f"instance:{dur}:p95_rate{d(nominal.latency_high_window)}",
        p95_early=f"instance:{dur}:p95_early_rate{d(nominal.creep_early_window)}",
        p95_late=f"instance:{dur}:p95_late_rate{d(nominal.creep_late_window)}",
        creep_ratio="instance:edgechat_turn_latency_creep:ratio",
        http_rate=f"instance:edgechat_http_requests:rate{d(nominal.error_window)}",
        error_ratio=f"instance:edgechat_http_request_errors:ratio_rate{d(nominal.error_window)}",
        rejected_rate=f"instance_reason:edgechat_requests_rejected:rate{d(nominal.saturation_window)}",
        rejected_ratio=f"instance_reason:edgechat_requests_rejected:ratio_rate{d(nominal.saturation_window)}",
        gc_pause_ratio=f"instance:edgechat_gc_pause_seconds:ratio_rate{d(nominal.gc_pause_window)}",
        gc_uncollectable=f"instance:edgechat_gc_uncollectable_objects:increase{d(nominal.gc_uncollectable_window)}",
        decode_slow_path="instance:edgechat_decode_slow_path_workers:count",
    )


def _rec(name: str, expr: str, comment: str) -> Rule:
    return Rule(comment, {"record": name, "expr": expr})


def _p95(selector: str, window: float, by: str) -> str:
    return (f"histogram_quantile(0.95, sum by ({by}, le) "
            f"(rate(edgechat_turn_duration_seconds_bucket{selector}[{duration(window)}])))")


def recording_groups(t: Thresholds, n: Names) -> list[Group]:
    """The recording groups; rules only use earlier rules of their own group (evaluated in order)."""
    d = duration
    probes = f'route!~"{t.probe_routes_regex}"'
    process = Group("edgechat.process.recording", [
        _rec(n.rss_sum, f"sum {BY} (edgechat_process_resident_memory_bytes)",
             "RSS of all workers together (dashboards; alerts use the service memory instead)."),
        _rec(n.rss_max, f"max {BY} (edgechat_process_resident_memory_bytes)", "RSS of the largest worker."),
        _rec(n.uss_sum, f"sum {BY} (edgechat_process_unique_memory_bytes)", "USS of all workers together."),
        _rec(n.workers, f"count {BY} (edgechat_process_start_time_seconds)", "Live workers."),
        _rec(n.start_time_max, f"max {BY} (edgechat_process_start_time_seconds)",
             "Start time of the youngest worker: it changes whenever a worker (re)starts."),
        _rec(n.uptime, f"time() - min {BY} (edgechat_process_start_time_seconds)",
             "Uptime of the oldest worker, i.e. of the service since its last full restart."),
    ])
    memory = Group("edgechat.memory.recording", [
        _rec(n.service, f"max {BY} (edgechat_service_memory_bytes)",
             "RAM counted against the limit (cgroup working set or the workers' RSS sum): level alerts."),
        _rec(n.limit, f"max {BY} (edgechat_memory_limit_bytes)", "The memory limit (cgroup, configured or host)."),
        _rec(n.usage_ratio, f"{n.service} / ({n.limit} > 0)",
             "Service memory as a fraction of the limit; no series while the limit is unknown (0)."),
        _rec(n.swap_sum, f"sum {BY} (edgechat_process_swap_bytes)", "Workers' memory swapped out (VmSwap)."),
        _rec(n.anon_swap_sum, f"sum {BY} (edgechat_process_anonymous_memory_bytes + edgechat_process_swap_bytes)\n"
                              f"or max {BY} (edgechat_service_memory_bytes)",
             "What a leak holds wherever the kernel keeps it: anonymous RSS plus swap, over workers "
             "(the service memory where /proc reports neither)."),
        _rec(n.committed, f"{n.service} + {ON} {n.swap_sum}\nor {n.service}",
             "RAM counted against the limit plus the workers' swap (just the RAM where swap is not reported)."),
        _rec(n.committed_ratio, f"{n.committed} / {ON} ({n.limit} > 0)",
             "RAM + swap as a fraction of the limit (the leak rules' floor: a leak pushed to swap counts)."),
        _rec(n.kv_sum, f'sum {BY} ({{__name__=~"edgechat_kv_cache_bytes|edgechat_kv_running_bytes"}})',
             "KV caches the workers hold under their one budget: kept between turns and reserved by the batch."),
        _rec(n.unpooled, f"(\n  {n.anon_swap_sum} - {ON} {n.kv_sum}\n  or {n.anon_swap_sum}\n)\n"
                         f"and {ON} {n.uptime} > {number(t.leak_settle)}",
             "What a leak grows: anonymous memory + swap less the KV pool (which fills to its budget and "
             "stays), once start-up has settled."),
        _rec(n.deriv_fast, f"deriv({n.unpooled}[{d(t.leak_fast_window)}])",
             "Least-squares slope of the memory a leak grows, bytes/s, short window."),
        _rec(n.deriv_slow, f"deriv({n.unpooled}[{d(t.leak_slow_window)}])",
             "Least-squares slope of the memory a leak grows, bytes/s, long window."),
        _rec(n.predict_fast, f"{n.committed} + {ON} {n.deriv_fast} * {number(t.leak_fast_horizon)}",
             "RAM + swap now, plus the short-window slope carried one fast-horizon ahead."),
        _rec(n.predict_slow, f"{n.committed} + {ON} {n.deriv_slow} * {number(t.leak_slow_horizon)}",
             "RAM + swap now, plus the long-window slope carried one slow-horizon ahead."),
    ])
    day = d(t.leak_day_window)
    trend = Group("edgechat.memory.trend.recording", [
        _rec(n.unpooled_avg, f"avg_over_time({n.unpooled}[{d(t.trend_interval)}])",
             "The memory a leak grows, averaged between two evaluations of this group."),
        _rec(n.deriv_mid, f"deriv({n.unpooled}[{d(t.leak_mid_window)}])",
             "Least-squares slope of the memory a leak grows, bytes/s, over hours."),
        _rec(n.predict_mid, f"{n.committed} + {ON} {n.deriv_mid} * " + (
                 f"{number(t.leak_mid_horizon)}" if t.leak_mid_horizon_max <= t.leak_mid_horizon else
                 f"{ON} clamp({n.uptime}, {number(t.leak_mid_horizon)}, {number(t.leak_mid_horizon_max)})"),
             "RAM + swap now, plus the hours-long slope carried ahead (as far as the process has been up, "
             "within the horizon's bounds)."),
        _rec(n.growth_day, f"avg_over_time({n.unpooled_avg}[{day}])\n- avg_over_time({n.unpooled_avg}[{day}] offset {day})",
             "Growth of the daily mean of the memory a leak grows: this day's against the day before "
             "(daily traffic cycles cancel out), bytes per day."),
        _rec(n.predict_day, f"{n.committed} + {ON} {n.growth_day} * {number(t.leak_day_horizon_windows)}",
             f"RAM + swap now, plus the daily growth carried {d(t.leak_day_window * t.leak_day_horizon_windows)} ahead."),
        _rec(n.turns_mid, f"sum {BY} (increase(edgechat_turns_total[{d(t.leak_mid_window)}]))",
             "Turns over the hours-long leak rule's window."),
    ], t.trend_interval)
    history = Group("edgechat.history.recording", [
        _rec(n.history_max, f"max {BY} (edgechat_history_messages_max)", "Messages in the longest conversation."),
        _rec(n.max_turns, f"max {BY} (edgechat_history_max_turns)", "Configured turn limit (0 = unbounded)."),
        _rec(n.history_allowed, f"2 * ({n.max_turns} > 0) + 1",
             "Most messages a conversation may hold under the limit: 2 per turn plus the system prompt."),
        _rec(n.history_total, f"sum {BY} (edgechat_history_messages)", "Messages held over all sessions."),
        _rec(n.history_delta, f"sum {BY} (delta(edgechat_history_messages[{d(t.history_growth_step)}]))",
             "Change of the total history over the growth step (> 0 = growing)."),
        _rec(n.sessions, f"sum {BY} (edgechat_sessions)", "Active sessions."),
    ])
    turns = Group("edgechat.turns.recording", [
        _rec(n.turns_rate, f"sum {BY} (rate(edgechat_turns_total[{d(t.latency_rate_window)}]))", "Turns per second."),
        _rec(n.turns_traffic, f"sum {BY} (increase(edgechat_turns_total[{d(t.leak_traffic_window)}]))",
             "Turns over the leak rules' traffic window (evidence that the daemon was used)."),
        _rec(n.p95_by_index, _p95("", t.latency_rate_window, "job, instance, device, turn_index"),
             "p95 turn latency per turn_index bucket (latency creep shows as a fan-out)."),
        _rec(n.p95_all, _p95("", t.latency_high_window, "job, instance, device"), "p95 turn latency over all turns."),
        _rec(n.p95_early, _p95(f'{{turn_index=~"{EARLY_TURNS}"}}', t.creep_early_window, "job, instance, device"),
             "p95 latency of early turns (1-5) over a long window: the creep baseline."),
        _rec(n.p95_late, _p95(f'{{turn_index!~"{NOT_LATE_TURNS}"}}', t.creep_late_window, "job, instance, device"),
             "p95 latency of late turns (11 and beyond) over a recent window."),
        _rec(n.creep_ratio, f"{n.p95_late} / ({n.p95_early} > 0)", "How many times slower late turns are than early ones."),
    ])
    http = Group("edgechat.http.recording", [
        _rec(n.http_rate, f"sum {BY} (rate(edgechat_http_requests_total{{{probes}}}[{d(t.error_window)}]))",
             "API requests per second, scrapes and probes left out."),
        _rec(n.error_ratio,
             f'(sum {BY} (rate(edgechat_http_requests_total{{{probes}, status=~"5..", status!="503"}}'
             f"[{d(t.error_window)}])) or 0 * {n.http_rate})\n/ ({n.http_rate} > 0)",
             "Share of API requests answered 5xx other than 503 (0 when there were none)."),
        _rec(n.rejected_rate, f"sum by (job, instance, device, reason) "
                              f"(rate(edgechat_requests_rejected_total[{d(t.saturation_window)}]))",
             "Rejected requests per second, by reason."),
        _rec(n.rejected_ratio, f"{n.rejected_rate}\n/ {ON} group_left ()\n"
                               f"(sum {BY} (rate(edgechat_http_requests_total{{{probes}}}"
                               f"[{d(t.saturation_window)}])) > 0)",
             "Share of API requests rejected (rejections answer 503 and are counted there too), by reason."),
    ])
    gc = Group("edgechat.gc.recording", [
        _rec(n.gc_pause_ratio, f"sum {BY} (rate(edgechat_gc_pause_seconds_sum[{d(t.gc_pause_window)}]))\n"
                               f"/ (count {BY} (edgechat_process_start_time_seconds) > 0)",
             "Share of wall time one worker spends in GC pauses (total pause rate over live workers)."),
        _rec(n.gc_uncollectable, f"sum {BY} "
                                 f"(increase(edgechat_gc_uncollectable_objects_total[{d(t.gc_uncollectable_window)}]))",
             "Objects the collector found unreachable but could not free."),
    ])
    decode = Group("edgechat.decode.recording", [
        _rec(n.decode_slow_path,
             f'count {BY} (edgechat_model_info{{step="per-op", compiled="unavailable", kernel!="hf"}} == 1)',
             "Workers decoding op by op because the compiled kernels could not be loaded, on a model they serve "
             "(the transformers path, kernel=hf, never runs on them); no series while there are none."),
    ])
    return [process, memory, trend, history, turns, http, gc, decode]
