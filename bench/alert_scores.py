"""Scores replayed alert episodes against what each trace knows about itself: recall, lead time,
false alerts per 1,000 healthy device-days, flaps; and the goals they are held to.

Definitions (docs/alerts-quality.md):
- counted alerts: warning or critical alerts of the memory and history families (the rules replayed);
- a leak is detected when one of them fires after the leak started and before the limit;
- lead: the share of the time from the leak's start (or the rules' arming after the last boot,
  whichever is later) to the limit that was still ahead when the first one fired;
- false alert: one firing on a healthy trace; flap: an alert that fires within an hour of the same
  alert (name and severity) on the same device resolving.
"""
from __future__ import annotations

import collections
import dataclasses
import math

import numpy as np

DAY, HOUR, MINUTE = 86400.0, 3600.0, 60.0
COUNTED = ("warning", "critical")
SLOW_RANGE = (6 * HOUR, 14 * DAY)      # leaks held to the lead goals
FLAP_GAP = HOUR
GOALS = {"lead_p10": 0.50, "lead_median": 0.65, "fast_critical_min": 10.0, "critical_per_1000": 0.0,
         "warning_per_1000": 1.0, "flaps_per_device_week": 1}


@dataclasses.dataclass
class LeakResult:
    device: str
    shape: str
    to_limit: float | None       # seconds from the leak's start to the limit (None: never reached)
    detected: bool
    first_alert: str = ""
    lead: float | None = None    # share of the armed time still ahead (None: not applicable)
    critical_ahead: float | None = None   # seconds the first critical came before the limit
    hours_to_alert: float | None = None
    before_start: int = 0        # counted alerts that fired before the leak began
    headroom_left: float | None = None    # share of the head room still unused when the first alert fired


def rule_key(e) -> str:
    """alert/severity[/window]: one alerting rule (the leak rules differ by their window label)."""
    window = dict(e.labels).get("window")
    return f"{e.alertname}/{e.severity}" + (f"/{window}" if window else "")


def _counted(eps):
    return sorted((e for e in eps if e.severity in COUNTED and e.fired_at is not None), key=lambda e: e.fired_at)


def leak_result(truth, t0: float, eps: list, arm_s: float) -> LeakResult:
    """How the rules did on one leaky trace (`t0`: the Unix time of its first scrape)."""
    start = t0 + truth.leak_start
    limit = t0 + truth.limit_at if truth.limit_at is not None else math.inf
    counted = _counted(eps)
    within = [e for e in counted if start <= e.fired_at < limit]
    r = LeakResult(truth.device, truth.shape, None if math.isinf(limit) else limit - start, bool(within),
                   before_start=sum(e.fired_at < start for e in counted))
    if within:
        first = within[0]
        r.first_alert = rule_key(first)
        r.hours_to_alert = (first.fired_at - start) / HOUR
        r.headroom_left = truth.headroom_left(first.fired_at - t0)
        base = t0 + truth.armed_from(arm_s)
        if not math.isinf(limit) and limit > base:
            r.lead = (limit - max(first.fired_at, base)) / (limit - base)
        crit = [e for e in within if e.severity == "critical"]
        if crit and not math.isinf(limit):
            r.critical_ahead = limit - crit[0].fired_at
    elif not math.isinf(limit):
        r.lead = 0.0
    return r


def flaps(eps: list, until: float = math.inf) -> list[tuple[str, float]]:
    """(alert, time) of every re-firing within FLAP_GAP of the same alert's resolution, before `until`."""
    by = collections.defaultdict(list)
    for e in _counted(eps):
        if e.fired_at < until:
            by[rule_key(e)].append(e)
    out = []
    for key, seq in by.items():
        for prev, nxt in zip(seq, seq[1:]):
            if prev.resolved_at is not None and nxt.fired_at - prev.resolved_at < FLAP_GAP:
                out.append((key, nxt.fired_at))
    return out


def worst_week(times: list[float]) -> int:
    """The most of `times` within any 7-day window."""
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while t - times[j] >= 7 * DAY:
            j += 1
        best = max(best, i - j + 1)
    return best


@dataclasses.dataclass
class Report:
    healthy_days: float
    leak_days: float
    false_alerts: dict           # "alert/severity" -> count on healthy traces
    leaks: list[LeakResult]
    flap_count: int
    flap_worst_week: int         # the most flaps of one alert on one device in a 7-day window
    devices: int

    def per_1000(self, count: float) -> float:
        return 1000 * count / self.healthy_days if self.healthy_days else 0.0

    def false_by_severity(self, severity: str) -> int:
        return sum(n for k, n in self.false_alerts.items() if k.split("/")[1] == severity)

    def slow(self) -> list[LeakResult]:
        return [r for r in self.leaks if r.to_limit is not None and SLOW_RANGE[0] <= r.to_limit <= SLOW_RANGE[1]]

    def fast(self) -> list[LeakResult]:
        return [r for r in self.leaks if r.to_limit is not None and r.to_limit < SLOW_RANGE[0]]

    def goals(self) -> dict[str, tuple[str, bool]]:
        """Each goal: (measured, met)."""
        slow, fast = self.slow(), self.fast()
        leads = [r.lead for r in slow if r.lead is not None]
        p10 = float(np.percentile(leads, 10)) if leads else 0.0
        med = float(np.median(leads)) if leads else 0.0
        recall = sum(r.detected for r in slow) / len(slow) if slow else 1.0
        ahead = [r.critical_ahead or 0.0 for r in fast]
        crit, warn = self.per_1000(self.false_by_severity("critical")), self.per_1000(self.false_by_severity("warning"))
        return {
            "recall of leaks reaching the limit in 6 h-14 d": (f"{recall:.1%} of {len(slow)}", recall == 1.0),
            "lead p10 >= 50 %": (f"{p10:.1%}", p10 >= GOALS["lead_p10"]),
            "lead median >= 65 %": (f"{med:.1%}", med >= GOALS["lead_median"]),
            "faster leaks: critical >= 10 min before the limit": (
                f"{sum(a >= 600 for a in ahead)} of {len(fast)}", all(a >= 600 for a in ahead)),
            "false critical per 1,000 healthy device-days = 0": (f"{crit:.2f}", crit == 0),
            "false warning per 1,000 healthy device-days <= 1": (f"{warn:.2f}", warn <= GOALS["warning_per_1000"]),
            "flaps of one alert per device-week <= 1": (str(self.flap_worst_week),
                                                         self.flap_worst_week <= GOALS["flaps_per_device_week"]),
        }


def score(truths: list, offsets: dict, episodes: list, arm_s: float) -> Report:
    """truths: every trace's Truth; offsets: device -> Unix time of its first scrape."""
    by_device = collections.defaultdict(list)
    for e in episodes:
        by_device[dict(e.labels).get("device")].append(e)
    false = collections.Counter()
    leaks, all_flaps, worst = [], 0, 0
    healthy_days = leak_days = 0.0
    for truth in truths:
        eps, t0 = by_device.get(truth.device, []), offsets[truth.device]
        if truth.leaky:
            leak_days += truth.days
            leaks.append(leak_result(truth, t0, eps, arm_s))
            until = t0 + truth.limit_at if truth.limit_at is not None else math.inf
        else:
            healthy_days += truth.days
            false.update(rule_key(e) for e in _counted(eps))
            until = math.inf
        found = flaps(eps, until)
        all_flaps += len(found)
        per_alert = collections.defaultdict(list)
        for name, t in found:
            per_alert[name].append(t)
        worst = max([worst] + [worst_week(ts) for ts in per_alert.values()])
    return Report(healthy_days, leak_days, dict(false), leaks, all_flaps, worst, len(truths))


def shape_rows(report: Report) -> list[list[str]]:
    """Per leak shape: traces, reaching the limit, recall, lead median / p10, fast-leak warning, first alert."""
    rows = []
    for shape in sorted({r.shape for r in report.leaks}):
        rs = [r for r in report.leaks if r.shape == shape]
        reach = [r for r in rs if r.to_limit is not None]
        leads = [r.lead for r in reach if r.lead is not None and r.to_limit >= SLOW_RANGE[0]]
        ahead = [r.critical_ahead / MINUTE for r in reach if r.to_limit < SLOW_RANGE[0] and r.critical_ahead]
        firsts = collections.Counter(r.first_alert.replace("Edgechat", "") for r in rs if r.detected)
        room = [r.headroom_left for r in reach if r.headroom_left is not None and r.to_limit >= SLOW_RANGE[0]]
        t_lim = [r.to_limit / HOUR for r in reach]
        rows.append([
            shape, str(len(rs)),
            f"{len(reach)} ({np.min(t_lim):.1f}-{np.max(t_lim):.0f} h)" if reach else "0",
            f"{sum(r.detected for r in reach)}/{len(reach)}" if reach else
            f"noticed {sum(r.detected for r in rs)}/{len(rs)}",
            f"{np.median(leads):.0%} / {np.percentile(leads, 10):.0%}" if leads else "—",
            f"{np.median(room):.0%} / {np.percentile(room, 10):.0%}" if room else "—",
            f"{np.median(ahead):.0f} / {np.min(ahead):.0f} min" if ahead else "—",
            ", ".join(f"{k} {v}" for k, v in firsts.most_common(2)) or "—"])
    return rows


SHAPE_HEADER = ["leak shape", "traces", "reach the limit (time to it)", "detected before the limit",
                "lead median / p10 (6 h-14 d)", "head room left median / p10", "faster: critical ahead, median / min",
                "first alert"]


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def summary(report: Report) -> dict[str, str]:
    """The headline numbers of one rule set, for a side-by-side table."""
    slow, fast = report.slow(), report.fast()
    leads = [r.lead for r in slow if r.lead is not None]
    room = [r.headroom_left for r in slow if r.headroom_left is not None]
    never = {shape: [r for r in report.leaks if r.shape == shape and r.to_limit is None] for shape in ("recycled", "history")}
    crit, warn = report.false_by_severity("critical"), report.false_by_severity("warning")
    pct = lambda xs, q: f"{np.percentile(xs, q):.0%}" if xs else "—"  # noqa: E731
    return {
        "false pages (critical) per 1,000 healthy device-days": f"{report.per_1000(crit):.2f} ({crit})",
        "false warnings per 1,000 healthy device-days": f"{report.per_1000(warn):.2f} ({warn})",
        "recall, leaks reaching the limit in 6 h-14 d": f"{sum(r.detected for r in slow)}/{len(slow)}",
        "lead median / p10": f"{pct(leads, 50)} / {pct(leads, 10)}",
        "head room left median / p10": f"{pct(room, 50)} / {pct(room, 10)}",
        "faster leaks: critical >= 10 min ahead": f"{sum((r.critical_ahead or 0) >= 600 for r in fast)}/{len(fast)}",
        "flaps (all devices); worst in one device-week": f"{report.flap_count}; {report.flap_worst_week}",
        "never at the limit, noticed: recycled / history bug": " / ".join(
            f"{sum(r.detected for r in rs)}/{len(rs)}" for rs in never.values()),
    }


def side_by_side(reports: dict[str, Report]) -> str:
    """One row per headline number, one column per rule set."""
    rows = {label: summary(r) for label, r in reports.items()}
    keys = list(next(iter(rows.values())))
    return markdown(["", *rows], [[k, *(rows[label][k] for label in rows)] for k in keys])
