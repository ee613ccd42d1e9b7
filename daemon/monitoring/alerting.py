"""Alerting rules: what a leak, a stall or an outage of edgechat looks like, one comment each."""
from __future__ import annotations

from .promql import Group, Rule, duration, number
from .recording import ON, Names
from .thresholds import Thresholds

INSTANCE = "{{ $labels.instance }}"


def alert_rule(t: Thresholds, name: str, comment: str, expr: str, for_s: float, severity: str,
           summary: str, description: str, keep_firing_s: float = 0, labels: dict | None = None) -> Rule:
    """One alert with `for`, severity, summary, templated description and runbook_url (the house contract)."""
    body = {"alert": name, "expr": expr, "for": duration(for_s)}
    if keep_firing_s:
        body["keep_firing_for"] = duration(keep_firing_s)
    body["labels"] = {"severity": severity, **(labels or {})}
    body["annotations"] = {"summary": summary, "description": description, "runbook_url": t.runbook_url(name)}
    return Rule(comment, body)


LEAK = "EdgechatMemoryLeakSuspected"


def _guards(t: Thresholds, n: Names, uptime: float, traffic: str | None) -> str:
    """The leak rules' shared conditions: high enough to matter, past start-up, (with traffic)."""
    text = (f"\nand {ON} {n.committed_ratio} > {number(t.leak_level_floor_ratio)}"
            f"\nand {ON} {n.uptime} > {number(uptime)}")
    return text + (f"\nand {ON} {traffic} > 0" if traffic else "")


def _leak(t: Thresholds, n: Names, kind: str) -> Rule:
    """A slope over `window` that, carried `horizon` ahead, takes RAM + swap to the limit."""
    deriv, predict, window_s, horizon_s, for_s, severity, uptime, traffic, keep = {
        "fast": (n.deriv_fast, n.predict_fast, t.leak_fast_window, t.leak_fast_horizon, t.leak_fast_for,
                 "critical", t.leak_min_uptime, n.turns_traffic, t.leak_fast_keep_firing),
        "slow": (n.deriv_slow, n.predict_slow, t.leak_slow_window, t.leak_slow_horizon, t.leak_slow_for,
                 "warning", t.leak_min_uptime, n.turns_traffic, t.leak_keep_firing),
        "mid": (n.deriv_mid, n.predict_mid, t.leak_mid_window, t.leak_mid_horizon, t.leak_mid_for,
                "warning", t.leak_mid_min_uptime, n.turns_mid, t.leak_keep_firing),
    }[kind]
    window, horizon = duration(window_s), duration(horizon_s)
    expr = f"{deriv} * 60 > 0\nand {ON} {predict} >= {ON} {n.limit}" + _guards(t, n, uptime, traffic)
    label = deriv.rsplit(":deriv", 1)[1]      # the nominal window, whatever the time scale (as in names)
    return alert_rule(
        t, LEAK,
        f"Detects the memory a leak grows (anonymous + swap, less the KV pool) rising steadily over {window} "
        f"so that RAM + swap reaches the limit within {horizon} (above {t.leak_level_floor_ratio:.0%} of the "
        f"limit, {duration(uptime)} after start-up, with traffic).",
        expr, for_s, severity,
        f"edgechat memory is growing towards its limit (OOM within {horizon}).",
        f"Memory outside the KV pool on {INSTANCE} has grown by {{{{ $value | humanize1024 }}}}B/min over the "
        f"last {window}; at that pace RAM + swap reaches the memory limit within {horizon}.",
        keep, labels={"window": label})


def _leak_day(t: Thresholds, n: Names) -> Rule:
    """Day-over-day growth of the daily mean that, carried a week ahead, takes RAM + swap to the limit."""
    day = duration(t.leak_day_window)
    horizon = duration(t.leak_day_window * t.leak_day_horizon_windows)
    expr = (f"{n.growth_day} > 0\nand {ON} {n.predict_day} >= {ON} {n.limit}"
            + _guards(t, n, t.leak_day_min_uptime, None))
    return alert_rule(
        t, LEAK,
        f"Detects a slow leak: the mean over the last {day} of the memory a leak grows is above the mean of "
        f"the {day} before by enough that RAM + swap reaches the limit within {horizon} (daily traffic "
        f"cycles cancel out; above {t.leak_level_floor_ratio:.0%} of the limit, {duration(t.leak_day_min_uptime)} "
        "after start-up).",
        expr, t.leak_day_for, "warning",
        f"edgechat memory grows day after day towards its limit (OOM within {horizon}).",
        f"Memory outside the KV pool on {INSTANCE} averaged {{{{ $value | humanize1024 }}}}B more over the last "
        f"{day} than over the {day} before; at that pace RAM + swap reaches the memory limit within {horizon}.",
        t.leak_keep_firing, labels={"window": n.growth_day.rsplit(":growth", 1)[1]})


def memory_alerts(t: Thresholds, n: Names) -> Group:
    """Leak (trend over minutes to an hour) and level alerts on the memory counted against the limit."""
    def near(severity: str, ratio: float, for_s: float) -> Rule:
        return alert_rule(
            t, "EdgechatMemoryNearLimit",
            f"Detects service memory above {ratio:.0%} of the memory limit (never one worker's RSS).",
            f"{n.usage_ratio} > {number(ratio)}", for_s, severity,
            f"edgechat uses more than {ratio:.0%} of its memory limit.",
            f"edgechat on {INSTANCE} uses {{{{ $value | humanizePercentage }}}} of its memory limit.",
            t.near_limit_keep_firing)
    return Group("edgechat.memory.alerts", [
        _leak(t, n, "slow"), _leak(t, n, "fast"),
        near("warning", t.near_limit_warning_ratio, t.near_limit_warning_for),
        near("critical", t.near_limit_critical_ratio, t.near_limit_critical_for),
    ])


def memory_trend_alerts(t: Thresholds, n: Names) -> Group:
    """Leaks over hours and days, evaluated every few minutes like the recordings they read."""
    return Group("edgechat.memory.trend.alerts", [_leak(t, n, "mid"), _leak_day(t, n)], t.trend_interval)


def history_alerts(t: Thresholds, n: Names) -> Group:
    """History growth (the classic unbounded-history bug) and a disabled limit."""
    span = duration(t.history_growth_span)
    unbounded = (f"# the longest conversation holds more messages than the turn limit allows\n"
                 f"{n.history_max} > {ON} {n.history_allowed}\n"
                 f"or\n"
                 f"# total history grew in every {duration(t.history_growth_step)} step of the last {span},\n"
                 f"# and not because more sessions are open\n"
                 f"(\n"
                 f"  {n.history_max}\n"
                 f"  and {ON} min_over_time({n.history_delta}[{span}]) > 0\n"
                 f"  and {ON} ({n.history_delta} offset {span})\n"
                 f"  and {ON} {n.sessions} <= {ON} ({n.sessions} offset {span})\n"
                 f")")
    return Group("edgechat.history.alerts", [
        alert_rule(t, "EdgechatHistoryUnbounded",
               "Detects conversation history that is not trimmed: longer than 2 x max_turns + 1 messages, "
               f"or the total growing without pause for {span} while sessions do not (growth, not "
               "configuration). Kept firing between over-long conversations.",
               unbounded, t.history_unbounded_for, "warning",
               "edgechat conversation history is growing without bound.",
               f"The longest conversation on {INSTANCE} holds {{{{ $value }}}} messages, more than the "
               f"configured turn limit allows, or the total history has grown without pause for {span}.",
               t.history_unbounded_keep_firing),
        alert_rule(t, "EdgechatHistoryLimitDisabled",
               "Detects a configuration with no turn limit on conversation history (max_history_turns = 0).",
               f"{n.max_turns} == 0", t.history_limit_disabled_for, "info",
               "edgechat runs with an unbounded history turn limit.",
               f"edgechat on {INSTANCE} reports max_history_turns = {{{{ $value }}}}: conversations are "
               "trimmed only by tokens, TTL and max_sessions."),
    ])


def gc_alerts(t: Thresholds, n: Names) -> Group:
    """Python garbage collector: objects it cannot free, time it steals from turns."""
    window = duration(t.gc_uncollectable_window)
    return Group("edgechat.gc.alerts", [
        alert_rule(t, "EdgechatGCUncollectableGrowing",
               f"Detects objects the garbage collector found unreachable but could not free, over {window}.",
               f"{n.gc_uncollectable} > 0", t.gc_uncollectable_for, "warning",
               "Python's garbage collector finds objects it cannot free in edgechat.",
               f"{{{{ $value | humanize }}}} uncollectable objects appeared on {INSTANCE} in the last {window}."),
        alert_rule(t, "EdgechatGCPausesHigh",
               f"Detects workers spending more than {t.gc_pause_ratio:.0%} of wall time in GC pauses.",
               f"{n.gc_pause_ratio} > {number(t.gc_pause_ratio)}", t.gc_pause_for, "warning",
               "edgechat workers spend a large share of time in garbage collection.",
               f"Each worker on {INSTANCE} spent {{{{ $value | humanizePercentage }}}} of the last "
               f"{duration(t.gc_pause_window)} in GC pauses."),
    ])


def turn_alerts(t: Thresholds, n: Names) -> Group:
    """Turn latency: late turns slower than early ones (creep), and plainly slow turns."""
    return Group("edgechat.turns.alerts", [
        alert_rule(t, "EdgechatTurnLatencyCreep",
               f"Detects late turns (11+) at more than {number(t.creep_ratio)}x the p95 latency of early "
               "turns (1-5): prompts grow with the conversation.",
               f"{n.creep_ratio} > {number(t.creep_ratio)}\n"
               f"and {ON} {n.p95_late} > {number(t.creep_min_late_seconds)}",
               t.creep_for, "warning",
               "edgechat turns get slower as conversations get longer.",
               f"On {INSTANCE} the p95 latency of turns 11 and later is {{{{ $value | printf \"%.1f\" }}}}x "
               f"that of turns 1-5 (late turns over {duration(t.creep_late_window)}, early over "
               f"{duration(t.creep_early_window)})."),
        alert_rule(t, "EdgechatTurnLatencyHigh",
               f"Detects p95 turn latency above {number(t.latency_high_seconds)} s.",
               f"{n.p95_all} > {number(t.latency_high_seconds)}", t.latency_high_for, "warning",
               "edgechat turns are slow.",
               f"p95 turn latency on {INSTANCE} is {{{{ $value | humanizeDuration }}}} over the last "
               f"{duration(t.latency_high_window)}."),
    ])


def process_alerts(t: Thresholds, n: Names) -> Group:
    """Worker restarts and kernel OOM kills."""
    def restarted(severity: str, window: float, above: int, for_s: float, what: str) -> Rule:
        return alert_rule(
            t, "EdgechatRestarted", f"Detects {what} in {duration(window)}: the youngest worker's start time "
            "changed (a new pid or a restarted process).",
            f"changes({n.start_time_max}[{duration(window)}]) > {above}", for_s, severity,
            f"edgechat workers {'keep restarting' if above else 'restarted'}.",
            f"Workers on {INSTANCE} (re)started {{{{ $value }}}} time(s) in the last {duration(window)}.")
    window = duration(t.oom_window)
    return Group("edgechat.process.alerts", [
        restarted("info", t.restart_window, 0, t.restart_for, "a worker (re)start"),
        restarted("warning", t.crashloop_window, t.crashloop_restarts, t.crashloop_for,
                  f"a crash loop, more than {t.crashloop_restarts} (re)starts"),
        alert_rule(t, "EdgechatOOMKilled",
               f"Detects the kernel OOM killer firing on the host within {window} (needs node_exporter).",
               f"increase(node_vmstat_oom_kill[{window}]) > 0", t.oom_for, "critical",
               "The kernel OOM-killed a process on the edgechat host.",
               f"The kernel OOM-killed {{{{ $value | printf \"%.0f\" }}}} process(es) on {INSTANCE} in the last "
               f"{window}; on an edge box running edgechat that is usually the daemon."),
    ])


def availability_alerts(t: Thresholds, n: Names) -> Group:
    """Down, failing, or refusing work."""
    job = f'up{{job="{t.job}"}}'
    return Group("edgechat.availability.alerts", [
        alert_rule(t, "EdgechatDown", "Detects a daemon Prometheus cannot scrape, or no daemon target at all.",
               f"{job} == 0 or absent({job})", t.down_for, "critical",
               "edgechat is down.",
               f"{{{{ with $labels.instance }}}}edgechat at {{{{ . }}}} has failed every scrape for "
               f"{duration(t.down_for)} (up = {{{{ $value }}}}).{{{{ else }}}}Prometheus has had no "
               f"{t.job} target for {duration(t.down_for)} (absent = {{{{ $value }}}}).{{{{ end }}}}"),
        alert_rule(t, "EdgechatHighErrorRate",
               f"Detects more than {t.error_ratio:.0%} of API requests failing with 5xx (503 rejections excluded).",
               f"{n.error_ratio} > {number(t.error_ratio)}", t.error_for, "warning",
               "edgechat answers many requests with server errors.",
               f"{{{{ $value | humanizePercentage }}}} of API requests to {INSTANCE} failed with a 5xx "
               f"over the last {duration(t.error_window)}."),
        alert_rule(t, "EdgechatSaturated",
               f"Detects more than {t.saturation_ratio:.0%} of API requests rejected (queue full, queue "
               "timeout, memory pressure).",
               f'{n.rejected_ratio}{{reason=~"{t.saturation_reasons_regex}"}} > {number(t.saturation_ratio)}',
               t.saturation_for, "warning",
               "edgechat rejects requests: it cannot keep up or is short of memory.",
               f"{{{{ $value | humanizePercentage }}}} of API requests to {INSTANCE} were rejected with "
               f"reason {{{{ $labels.reason }}}} over the last {duration(t.saturation_window)}."),
    ])


def dependency_alerts(t: Thresholds) -> Group:
    """What the daemon depends on failing under it: the session store, the metrics folder."""
    errors, failures = duration(t.store_errors_window), duration(t.metrics_writes_window)
    return Group("edgechat.dependencies.alerts", [
        alert_rule(t, "EdgechatSessionStoreUnwritable",
               "Detects a session store that refuses writes (disk full, read-only, locked): turns and "
               "new sessions get 503 while reads go on.",
               "edgechat_session_store_writable == 0", t.store_unwritable_for, "critical",
               "edgechat cannot store turns: its session store refuses writes.",
               f"The session store of {INSTANCE} has refused writes for {duration(t.store_unwritable_for)} "
               "(writable = {{ $value }}): "
               "every turn and new session is answered 503 store_unavailable; see /readyz "
               "session_store.last_error."),
        alert_rule(t, "EdgechatSessionStoreFailing",
               f"Detects session store calls failing for {duration(t.store_errors_for)} (Redis down or "
               "paused, the SQLite file locked past busy_timeout, I/O errors).",
               f"sum without (operation) (rate(edgechat_session_store_errors_total[{errors}])) > 0",
               t.store_errors_for, "warning",
               "edgechat's session store keeps failing.",
               f"Session store calls on {INSTANCE} fail at {{{{ $value | humanize }}}}/s over the last "
               f"{errors}; the requests concerned get 503 store_unavailable."),
        alert_rule(t, "EdgechatMetricsWritesFailing",
               "Detects workers that cannot write their metric files (the metrics folder's file "
               "system is full): dashboards and alerts miss their newest values.",
               f"increase(edgechat_metrics_write_failures_total[{failures}]) > 0",
               t.metrics_writes_for, "warning",
               "edgechat cannot write its metrics: the metrics folder is full.",
               f"Workers on {INSTANCE} failed {{{{ $value | printf \"%.0f\" }}}} metric write(s) in the "
               f"last {failures} for lack of room in metrics_dir."),
    ])


def decode_alerts(t: Thresholds, n: Names) -> Group:
    """Decode on the slow path where the fast one should be."""
    return Group("edgechat.decode.alerts", [
        alert_rule(t, "EdgechatDecodeSlowPath",
               "Detects a worker decoding op by op on torch's kernels (about half speed) because the compiled "
               "decode kernels could not be loaded, on a model they serve.",
               f"{n.decode_slow_path} > 0", t.decode_slow_path_for, "warning",
               "edgechat decodes without its compiled kernels, at about half speed.",
               f"{{{{ $value }}}} worker(s) on {INSTANCE} decode op by op (step per-op, compiled unavailable in "
               "edgechat_model_info): the compiled decode kernels were neither packaged nor buildable. The worker's "
               "log line 'decode kernels unavailable' says why; /readyz shows decode.step and decode.compiled."),
    ])


def meta_alerts(t: Thresholds) -> Group:
    """The heartbeat and the info inhibitor, named and scoped so they cannot collide with another
    job's in a shared Prometheus (severity none: never a page)."""
    own = f'job="{t.job}"'
    heartbeat = alert_rule(t, "EdgechatHeartbeat",
                       "Always fires: proves the whole alerting pipeline works (dead man's switch).",
                       "vector(1)", t.heartbeat_for, "none",
                       "edgechat alerting pipeline heartbeat.",
                       "This alert always fires (value {{ $value }}). If the receiver stops getting it, "
                       "Prometheus, the rules or Alertmanager are broken.")
    heartbeat.body["labels"]["job"] = t.job  # vector(1) has no labels: say whose heartbeat it is
    return Group("edgechat.meta.alerts", [
        heartbeat,
        alert_rule(t, "EdgechatInfoInhibitor",
               "Fires while one of this job's info alerts is pending or firing on an instance with no "
               "warning or critical alert of the job; Alertmanager uses it to hold back lone info alerts.",
               f'count by (job, instance, device) (ALERTS{{{own}, severity="info"}})\n'
               "unless on (job, instance, device)\n"
               f'max by (job, instance, device) (ALERTS{{{own}, alertname!="EdgechatInfoInhibitor", '
               'alertstate="firing", severity=~"warning|critical"})',
               t.info_inhibitor_for, "none",
               "Info-level alert inhibition.",
               f"{{{{ $value }}}} info alert(s) on {INSTANCE} and nothing more severe: info alerts are "
               "held back until a warning or critical alert gives them context."),
    ])


def alert_groups(t: Thresholds, n: Names) -> list[Group]:
    """All alert groups; the meta group comes last so EdgechatInfoInhibitor sees the others' ALERTS."""
    return [memory_alerts(t, n), memory_trend_alerts(t, n), history_alerts(t, n), gc_alerts(t, n), turn_alerts(t, n),
            process_alerts(t, n), availability_alerts(t, n), dependency_alerts(t), decode_alerts(t, n),
            meta_alerts(t)]
