"""Every alert threshold and window in one commented place, chosen for a 2-4 GB edge device."""
from __future__ import annotations

import dataclasses

MINUTE = 60
HOUR = 3600
DAY = 86400


def _window(seconds: float, why: str) -> float:
    """Declare a duration that `Thresholds.scaled` shrinks (range window, `for`, horizon, guard)."""
    return dataclasses.field(default=seconds, metadata={"scaled": True, "why": why})


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """The knobs of every edgechat rule; durations are seconds, ratios are fractions of 1."""

    # -- identity ---------------------------------------------------------------------------------
    # Scrape job of the daemon in prometheus/prometheus.yml; only `up`/`absent` select on it, every
    # other rule keys on the edgechat_ metric names and keeps whatever job the scrape config gives.
    job: str = "edgechat"
    # runbook_url of alert X is f"{runbook_base}#{X.lower()}" (GitHub's heading anchor).
    runbook_base: str = "https://github.com/edgechat/edgechat/blob/main/docs/runbooks.md"
    # Routes left out of the HTTP error and rejection ratios: scrapes and probes would otherwise
    # dilute them (Prometheus alone sends 2 requests a minute to a box that may serve a few turns).
    probe_routes_regex: str = "/metrics|/healthz|/readyz"

    # -- memory: what the leak rules watch -----------------------------------------------------------
    # Anonymous memory + swap over the workers, less the KV caches under the pool's budget (kept between
    # turns, edgechat_kv_cache_bytes, and reserved by the running batch, edgechat_kv_running_bytes): the
    # pool fills to kv_cache_bytes after every start and then stays, and the batch's caches come and go
    # with traffic, which looked like a leak for hours to days on quiet devices and in busy hours; a leak
    # held in RAM or pushed to swap still shows in full.
    # -- memory: slow leak (warning) ---------------------------------------------------------------
    # A 0.5B model takes ~1 GB after load; a leak of a few MB/min (the `tensors` leak mode's is ~35
    # MB/min, a cache leak can be 1-5 MB/min) needs an hour of samples (120 at 30 s) before a slope
    # means anything, and GC/malloc sawtooth of +-50 MB averages out over 1 h.
    leak_slow_window: float = _window(1 * HOUR, "deriv range of the slow leak rule")
    # "Reaches the limit within 4 h": time for a person to look at an edge box before it OOMs.
    leak_slow_horizon: float = _window(4 * HOUR, "projection horizon of the slow leak rule")
    # 30 min of continuous evidence; a phase of the GC sawtooth never keeps the slope up that long.
    leak_slow_for: float = _window(30 * MINUTE, "for of the slow leak rule")
    # -- memory: fast leak (critical) --------------------------------------------------------------
    # OOM within the hour: a shorter window reacts to leaks like the tensor leak (980 MB -> 2.1 GB in 30 turns).
    leak_fast_window: float = _window(30 * MINUTE, "deriv range of the fast leak rule")
    leak_fast_horizon: float = _window(1 * HOUR, "projection horizon of the fast leak rule")
    # 5 min: that leak goes from 1 GB to a 2 GB limit in ~25 min, so every minute counts; a
    # sawtooth cannot hold a 30 min regression at "limit within 1 h" that long below ~90 %.
    leak_fast_for: float = _window(5 * MINUTE, "for of the fast leak rule")
    # -- memory: leaks over hours and days (warning; docs/alerts-quality.md has the numbers) ----------
    # The 1 h / 4 h rule warns 4 h ahead at most: a leak that takes two days got 8 % of its time as
    # warning, a slow one only NearLimit's. Two longer windows, evaluated every 5 min (a slope over
    # hours needs no 30 s steps). Measured over thousands of simulated device-days:
    trend_interval: float = _window(5 * MINUTE, "evaluation interval of the hour- and day-long leak rules")
    # 6 h slope carried one day ahead, armed 4 h after a start. Carried two days ahead from the first
    # day it doubled the false warnings (heap and traffic settling on a device's first busy day look
    # like hours of growth) for a few points of lead: we chose fewer false alarms.
    leak_mid_window: float = _window(6 * HOUR, "deriv range of the 6 h leak rule")
    leak_mid_horizon: float = _window(1 * DAY, "projection horizon of the 6 h leak rule")
    # ... carried further, up to this, as the process has been up that long: a settled process whose
    # memory still climbs for hours is trusted with a longer projection than one in its first day.
    leak_mid_horizon_max: float = _window(2 * DAY, "projection horizon of the 6 h leak rule after that uptime")
    leak_mid_for: float = _window(1 * HOUR, "for of the 6 h leak rule")
    leak_mid_min_uptime: float = _window(4 * HOUR, "uptime before the 6 h leak rule arms")
    # Day over day: the mean of the last day against the mean of the day before, so daily traffic
    # cycles cancel out; that growth per day carried ten days ahead (a week left slow leaks' lead p10
    # near 50 %). Needs two days of uptime.
    leak_day_window: float = _window(1 * DAY, "averaging window (and offset) of the day leak rule")
    leak_day_horizon_windows: float = 10.0    # horizon in windows: ten days ahead
    leak_day_for: float = _window(6 * HOUR, "for of the day leak rule")
    leak_day_min_uptime: float = _window(2 * DAY, "uptime before the day leak rule arms")
    # -- memory: guards shared by the leak rules ---------------------------------------------------
    # Below half the limit (RAM + swap) a 2 GB box has >1 GB of head room: growth there is start-up
    # and caches filling, and NearLimit still catches anything that gets further.
    leak_level_floor_ratio: float = 0.5
    # Model load makes RSS jump by ~1 GB in the first minutes; no leak window may start inside it.
    # Equal to the fast window, so the fast rule never regresses over the start-up; the slow rule's
    # 30 min `for` then carries its window past start-up before it can fire.
    leak_min_uptime: float = _window(30 * MINUTE, "uptime of the oldest worker before leak rules arm")
    # Growth with no turns in the window is not a per-turn leak (page cache in a cgroup, lazy loads).
    leak_traffic_window: float = _window(1 * HOUR, "window in which turns must have happened")
    # Start-up (model load, warm-up peak) is left out of the leak signal altogether, so a window that
    # reaches back to a start sees a settled process: no rule has to wait a whole window after it.
    leak_settle: float = _window(5 * MINUTE, "uptime before the leak signal is recorded")
    # keep_firing_for of the leak rules: a leak driven by traffic slows down between busy hours and
    # its projection dips under the limit now and then; the leak is still there, so is the alert.
    leak_fast_keep_firing: float = _window(30 * MINUTE, "keep_firing_for of the fast leak rule")
    leak_keep_firing: float = _window(1 * HOUR, "keep_firing_for of the slower leak rules")

    # -- memory: level (warning ~80 %, critical ~90 %) ---------------------------------------------
    # On 2 GB, 80 % leaves ~400 MB: one long prefill can take 70 MB, so that is a few
    # turns of margin; 90 % leaves ~200 MB, i.e. the next bad turn OOMs.
    near_limit_warning_ratio: float = 0.80
    near_limit_warning_for: float = _window(5 * MINUTE, "for of NearLimit warning (rides out one long prefill)")
    near_limit_critical_ratio: float = 0.90
    near_limit_critical_for: float = _window(2 * MINUTE, "for of NearLimit critical (little time is left)")
    # keep_firing_for of both: memory riding the threshold with the +-50 MB GC sawtooth would
    # otherwise resolve and re-fire every few minutes; a peak is what OOMs. 10 min still let a slow
    # leak riding 90 % for hours flap (the sawtooth's period is up to 15 min): 30 min.
    near_limit_keep_firing: float = _window(30 * MINUTE, "keep_firing_for of NearLimit")

    # -- history -----------------------------------------------------------------------------------
    # The longest history above 2*max_turns+1 messages is a bug as soon as it is seen; 10 min keeps
    # a message appended before its trim (mid-turn) from paging.
    history_unbounded_for: float = _window(10 * MINUTE, "for of HistoryUnbounded")
    # An over-long conversation ends (TTL, eviction) and the next one starts short: without this the
    # history bug fires and resolves with every conversation that outgrows the limit (1 h still
    # flapped between a device's chatty users); the bug stays until a fixed release restarts it.
    history_unbounded_keep_firing: float = _window(6 * HOUR, "keep_firing_for of HistoryUnbounded")
    # "Total messages growing without pause": the 10 min delta stayed > 0 at every evaluation of
    # the last 2 h while the number of sessions did not grow. A bounded store pauses (trims, TTL
    # evictions, idle users) well within that; sessions that never expire pile up to max_sessions
    # and grow the total without pause too, which is bounded and no bug.
    history_growth_step: float = _window(10 * MINUTE, "delta window of total history messages")
    history_growth_span: float = _window(2 * HOUR, "span over which the delta never paused")
    history_limit_disabled_for: float = _window(15 * MINUTE, "for of HistoryLimitDisabled (info)")

    # -- garbage collector -------------------------------------------------------------------------
    # CPython >= 3.4 frees cycles with finalizers, so any uncollectable object is a real leak.
    gc_uncollectable_window: float = _window(1 * HOUR, "increase window of uncollectable objects")
    gc_uncollectable_for: float = _window(15 * MINUTE, "for of GCUncollectableGrowing")
    # Share of wall time a worker spends in GC pauses; CPython's usual cost is ~1 %. 5 % for 15 min
    # means millions of tracked objects, i.e. something accumulates Python objects.
    gc_pause_window: float = _window(10 * MINUTE, "rate window of GC pause seconds")
    gc_pause_ratio: float = 0.05
    gc_pause_for: float = _window(15 * MINUTE, "for of GCPausesHigh")

    # -- turn latency ------------------------------------------------------------------------------
    # Dashboard resolution of p95 by turn_index.
    latency_rate_window: float = _window(5 * MINUTE, "rate window of p95 by turn_index (dashboards)")
    # Absolute: a 0.5B model on 2 cores answers a bounded turn in 1.4-14 s (fp32 13.6 s at turn 30
    # with 5 turns kept); 30 s p95 means users wait twice the worst healthy case.
    latency_high_window: float = _window(10 * MINUTE, "rate window of overall p95")
    latency_high_seconds: float = 30.0
    latency_high_for: float = _window(15 * MINUTE, "for of TurnLatencyHigh")
    # Creep: late turns (11+) against early turns (1-5). Healthy bounded history: 13.4 s / 9.5 s =
    # 1.4x; the history bug: 5.9x on a small
    # model, 3.8x on the 0.5B shape (36.9 s / 9.6 s).
    creep_ratio: float = 2.0
    # Late turns need a recent window; early turns come from a long one, because in the classic
    # leak one user chats on and no new conversation (turn 1-5) happens for hours.
    creep_late_window: float = _window(30 * MINUTE, "rate window of late-turn p95")
    creep_early_window: float = _window(6 * HOUR, "rate window of early-turn p95 (baseline)")
    # Sub-second turns (builtin:tiny, tests) are timer noise; creep matters once a human feels it.
    creep_min_late_seconds: float = 1.0
    creep_for: float = _window(15 * MINUTE, "for of TurnLatencyCreep")

    # -- restarts and OOM --------------------------------------------------------------------------
    # One (re)start: info (deploys, max_requests recycling). More than 3 in an hour: crash loop.
    restart_window: float = _window(15 * MINUTE, "window in which a start-time change counts")
    restart_for: float = _window(5 * MINUTE, "for of Restarted (info)")
    crashloop_window: float = _window(1 * HOUR, "window of the crash-loop count")
    crashloop_restarts: int = 3
    crashloop_for: float = _window(5 * MINUTE, "for of Restarted (warning)")
    oom_window: float = _window(15 * MINUTE, "increase window of node_vmstat_oom_kill")
    oom_for: float = _window(1 * MINUTE, "for of OOMKilled")

    # -- availability ------------------------------------------------------------------------------
    # A restart reloads a 1 GB model from eMMC/SD (30-90 s); 5 min is a restart gone wrong.
    down_for: float = _window(5 * MINUTE, "for of Down")
    # 5xx other than 503 (503 is a queue/memory rejection, counted by Saturated instead).
    error_window: float = _window(10 * MINUTE, "rate window of HTTP errors")
    error_ratio: float = 0.05
    error_for: float = _window(10 * MINUTE, "for of HighErrorRate (one failed turn never lasts that long)")
    # Rejections over all API requests, for the reasons that mean "no capacity" (the daemon also
    # counts unauthorized and session_busy rejections: client mistakes, not saturation).
    saturation_reasons_regex: str = "queue_full|queue_timeout|memory_pressure"
    saturation_window: float = _window(10 * MINUTE, "rate window of rejections")
    saturation_ratio: float = 0.05
    saturation_for: float = _window(10 * MINUTE, "for of Saturated")

    # -- dependencies (docs/reliability.md) --------------------------------------------------------
    # The session store refusing writes (disk full, read-only, locked): every turn and new session
    # gets 503 until an operator frees space; the housekeeping probe shows recovery within seconds,
    # so 2 min is a fault that did not pass by itself.
    store_unwritable_for: float = _window(2 * MINUTE, "for of SessionStoreUnwritable")
    # Any store call failing (Redis down or paused, the file locked past busy_timeout) for 5 min.
    store_errors_window: float = _window(5 * MINUTE, "rate window of session store errors")
    store_errors_for: float = _window(5 * MINUTE, "for of SessionStoreFailing")
    # The metrics folder full: the dashboards miss values from now on; the operator frees space.
    metrics_writes_window: float = _window(10 * MINUTE, "increase window of metric write failures")
    metrics_writes_for: float = _window(1 * MINUTE, "for of MetricsWritesFailing")

    # -- decode path -------------------------------------------------------------------------------
    # A worker decoding op by op on torch's kernels because the compiled kernels did not load (a wheel
    # built without them, a missing compiler in an editable checkout, a library that does not load):
    # decode runs at about half speed. The state is fixed at load, so `for` only has to outlast a
    # deploy that replaces the workers; 10 min of it is no transient.
    decode_slow_path_for: float = _window(10 * MINUTE, "for of DecodeSlowPath")

    # -- meta --------------------------------------------------------------------------------------
    heartbeat_for: float = _window(1 * MINUTE, "for of EdgechatHeartbeat (heartbeat starts a minute after Prometheus)")
    # Must stay shorter than every info alert's `for` (a test checks it), so the inhibitor fires
    # before any info alert does.
    info_inhibitor_for: float = _window(1 * MINUTE, "for of EdgechatInfoInhibitor")

    # -- fleet (central rules, evaluated by vmalert on the central store; docs/fleet.md) -----------
    # Device-level alerts that make a device count as leaking for its cohort.
    fleet_leak_alerts_regex: str = "EdgechatMemoryLeakSuspected|EdgechatHistoryUnbounded"
    # A device counts as leaking when one of those fired on it within this window: a leaking device
    # that OOMs and restarts (its alert resolves until the uptime guard re-arms) still counts. An hour
    # made a leaking release page 24 times in a week (docs/alerts-quality.md): a leak driven by traffic
    # goes quiet at night and after each OOM restart; a release that leaks does not stop. A day.
    cohort_window: float = _window(1 * DAY, "window in which a device's leak alert counts for its cohort")
    # "A release leaks": 30 % of its devices, and at least 3, so two unlucky boxes of a 5-box pilot
    # do not page as a cohort (their own device alerts still notify).
    cohort_ratio: float = 0.30
    cohort_min_devices: int = 3
    cohort_for: float = _window(10 * MINUTE, "for of EdgechatCohortLeaking")
    # No sample from an expected device for 15 min: 30 scrapes at 30 s, longer than a reboot (a
    # 1 GB model reloads in 30-90 s) and than vmagent's retry backoff, shorter than an outage that matters.
    device_silent_window: float = _window(15 * MINUTE, "window with no sample before a device is silent")
    device_silent_for: float = _window(5 * MINUTE, "for of EdgechatDeviceSilent")
    # The central store unreachable for 2 min pages; the alert then stays up long enough for the
    # devices' buffered samples to land, so no device looks silent while the backlog drains.
    store_down_for: float = _window(2 * MINUTE, "for of EdgechatCentralStoreDown")
    store_down_keep_firing: float = _window(30 * MINUTE, "keep_firing_for of EdgechatCentralStoreDown")
    # Scrape job names of the central side (the watcher Prometheus).
    central_store_job: str = "edgechat-central-store"
    fleet_rules_job: str = "edgechat-fleet-rules"

    def scaled(self, time_scale: float) -> "Thresholds":
        """Shrink (or stretch) every window, `for`, horizon and guard by one factor, for fast tests."""
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {time_scale!r}")
        changes = {f.name: getattr(self, f.name) * time_scale
                   for f in dataclasses.fields(self) if f.metadata.get("scaled")}
        return dataclasses.replace(self, **changes)

    def runbook_url(self, alertname: str) -> str:
        """The docs/runbooks.md anchor of an alert (GitHub lower-cases heading anchors)."""
        return f"{self.runbook_base}#{alertname.lower()}"


def scaled_field_names() -> list[str]:
    """Names of the duration fields that `Thresholds.scaled` multiplies."""
    return [f.name for f in dataclasses.fields(Thresholds) if f.metadata.get("scaled")]
