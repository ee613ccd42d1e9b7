"""Alert rules replayed over stored history by Prometheus's own engine: the alert states a device's
Prometheus would have had at every evaluation of days of scrapes.

How (measured against promtool's rule tests, which took ~0.8 s of CPU per device-day, this is ~50x
cheaper; docs/alerts-quality.md):

1. The series are backfilled as TSDB blocks (`promtool tsdb create-blocks-from openmetrics`).
2. A real Prometheus serves them. Each alert rule's expression, with the recording rules it reads
   inlined (a range over a recorded series becomes a subquery at the recording group's interval),
   is evaluated by a range query at its group's interval: the engine computes at every step what
   the rule manager would at that evaluation.
3. `for` and `keep_firing_for` are applied to those results as Prometheus's rule manager applies
   them (pending, firing, kept firing, resolved), checked against promtool's rule tests.

Samples sit on the 30 s grid the queries step on, and the query lookback is just under one scrape
interval: a scrape that has no sample reads as absent at once, as a failed scrape's staleness
markers make it on a device (a backfill cannot write staleness markers).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import yaml

from daemon.fleet.procs import Proc, binary, free_port

UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
LOOKBACK = "29s"          # just under the 30 s scrape interval (see the module's docstring)
MAX_STEPS = 10_000        # Prometheus answers at most 11,000 points per series and query
BLOCK = "162h"            # backfilled block length (promtool's 2h x 3^4); no compaction past it


def seconds(text: str | None) -> float:
    """A Prometheus duration ("1h30m") in seconds; None or "" is 0."""
    if not text:
        return 0.0
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w|y)", text)
    if "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a Prometheus duration: {text!r}")
    return sum(int(n) * UNITS[u] for n, u in parts)


def _dur(s: float) -> str:
    s = int(round(s))
    return f"{s // 60}m" if s % 60 == 0 else f"{s}s"


@dataclasses.dataclass(frozen=True)
class AlertRule:
    """One alerting rule, its expression self-contained (recording rules inlined)."""

    group: str
    alertname: str
    severity: str
    expr: str
    interval: float
    for_s: float
    keep_firing_s: float
    labels: dict


def load_rules(paths: list[str], default_interval: float = 30.0) -> tuple[dict, list[dict]]:
    """(recorded name -> (expr, group interval), alert rules with their group) from rule files."""
    recorded, alerts = {}, []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            doc = yaml.safe_load(handle)
        for group in doc.get("groups", []):
            interval = seconds(group.get("interval")) or default_interval
            for rule in group["rules"]:
                if "record" in rule:
                    recorded[rule["record"]] = (rule["expr"], interval)
                else:
                    alerts.append({**rule, "group": group["name"], "interval": interval})
    return recorded, alerts


def _pattern(names) -> re.Pattern:
    alternatives = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
    return re.compile(rf"(?<![\w:])({alternatives})(?![\w:])(\s*\{{[^}}]*\}})?(\s*\[(\w+)\])?(\s+offset\s+(\w+))?")


def refs(expr: str, recorded: dict) -> set[str]:
    """The recorded series an expression reads directly."""
    return {m.group(1) for m in _pattern(recorded).finditer(expr)} if recorded else set()


def inline(expr: str, recorded: dict, interval: float, stored: dict | None = None, depth: int = 0) -> str:
    """`expr` with every recorded series replaced by the expression that records it, as the rule
    manager would read it at evaluations `interval` apart; names in `stored` are read from the
    series already recorded under the name it maps them to."""
    if depth > 20:
        raise ValueError("recording rules refer to each other in a cycle")
    if not recorded:
        return expr
    stored = stored or {}

    def replace(m: re.Match) -> str:
        name, matchers, window, offset = m.group(1), m.group(2), m.group(4), m.group(6)
        if matchers and matchers.strip() != "{}":
            raise NotImplementedError(f"label matchers on recorded series are not inlined: {m.group(0)!r}")
        if name in stored:
            return stored[name] + m.group(0)[len(name):]
        body, every = recorded[name]
        inner = "(\n" + inline(body, recorded, every, stored, depth + 1) + "\n)"
        step = _dur(every)
        if window:
            return f"{inner}[{window}:{step}]" + (f" offset {offset}" if offset else "")
        if offset or every != interval:
            # the newest recorded sample: at exactly t - offset (same grid), or within one interval
            return f"last_over_time({inner}[{_dur(every - 1)}:{step}]" + (f" offset {offset})" if offset else ")")
        return inner

    return _pattern(recorded).sub(replace, expr)


def alert_rules(paths: list[str], groups: tuple[str, ...] | None = None, stored: dict | None = None) -> list[AlertRule]:
    """The alert rules of `groups` (all when None), ready for range queries."""
    recorded, alerts = load_rules(paths)
    out = []
    for a in alerts:
        if groups is not None and a["group"] not in groups:
            continue
        labels = dict(a.get("labels") or {})
        out.append(AlertRule(a["group"], a["alert"], labels.get("severity", ""),
                             inline(a["expr"], recorded, a["interval"], stored), a["interval"],
                             seconds(a.get("for")), seconds(a.get("keep_firing_for")), labels))
    return out


def shared(paths: list[str], groups: tuple[str, ...] | None, candidates: tuple[str, ...], min_uses: int = 2) -> list[str]:
    """The candidates (in order) worth recording once: read, directly or through other recordings not
    chosen before, by at least `min_uses` alert rules of `groups`."""
    recorded, alerts = load_rules(paths)
    chosen: list[str] = []

    def reach(expr: str, seen: set) -> set:
        for name in refs(expr, recorded) - seen:
            seen.add(name)
            if name not in chosen:
                reach(recorded[name][0], seen)
        return seen

    for name in candidates:
        if name in recorded and recorded[name][1] == 30.0 and sum(
                name in reach(a["expr"], set()) for a in alerts if groups is None or a["group"] in groups) >= min_uses:
            chosen.append(name)
    return chosen


# -- the state machine ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Episode:
    """One alert instance from pending to resolved (Unix seconds); fired_at None: it never fired."""

    alertname: str
    severity: str
    labels: tuple
    active_at: float
    fired_at: float | None
    resolved_at: float | None      # None: still firing (or pending) at the end of the replay


def episodes(times: np.ndarray, interval: float, for_s: float, keep_s: float, end: float) -> list[tuple]:
    """(active_at, fired_at, resolved_at) of one alert instance whose expression returned a sample
    at `times` (sorted evaluation times) of evaluations every `interval` up to `end`, as the rule
    manager's AlertingRule.Eval turns them into states: pending from the first sample; firing once
    pending for `for_s`; a pending alert is dropped at the first evaluation without a sample; a
    firing one is resolved at the first evaluation without one at or after `keep_s` since the
    sample stopped (at once when keep_s is 0)."""
    out: list[tuple] = []
    if not len(times):
        return out
    breaks = np.flatnonzero(np.diff(times) > interval * 1.5)
    runs = zip(times[np.concatenate([[0], breaks + 1])], times[np.concatenate([breaks, [len(times) - 1]])])
    hold = math.ceil(for_s / interval - 1e-9) * interval      # the first evaluation with ts - active >= for
    keep = math.ceil(keep_s / interval - 1e-9) * interval     # ... and with ts - keepFiringSince >= keep
    active = fired = last = None
    for a, b in runs:                       # a run: the expression returned a sample at every step a..b
        if active is not None:              # evaluations last+interval .. a-interval had none
            resolved = last + interval + keep
            if fired is None or resolved < a:
                if fired is not None:
                    out.append((active, fired, resolved))
                active = fired = None
        if active is None:
            active = a
        if fired is None and b - active >= hold:
            fired = active + hold
        last = b
    if fired is not None:
        resolved = last + interval + keep
        out.append((active, fired, resolved if resolved <= end else None))
    return out


# -- Prometheus over backfilled blocks -------------------------------------------------------------

def backfill(path: str, data_dir: str) -> None:
    """Turn one OpenMetrics file into TSDB blocks in data_dir (the file is removed afterwards)."""
    promtool = binary("promtool")
    if promtool is None:
        raise RuntimeError("promtool not found: install Debian's `prometheus` package")
    os.makedirs(data_dir, exist_ok=True)
    try:
        run = subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", "-q",
                              f"--max-block-duration={BLOCK}", path, data_dir], capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"promtool could not backfill {path}: {run.stderr[-2000:]}")
    finally:
        os.unlink(path)


class Replayer:
    """A Prometheus over `data_dir`, serving range queries of alert rules; stop() ends it."""

    def __init__(self, data_dir: str, log_path: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = os.path.join(os.path.dirname(log_path), "replay-prometheus.yml")
        with open(config, "w", encoding="utf-8") as handle:
            handle.write("global: {evaluation_interval: 30s}\n")
        self.proc = Proc("replay prometheus", [
            binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={data_dir}",
            f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=100y",
            f"--storage.tsdb.max-block-duration={BLOCK}", f"--query.lookback-delta={LOOKBACK}",
            "--query.timeout=10m", "--query.max-samples=200000000", "--log.level=warn"],
            log_path, ports=(self.port,))

    def start(self) -> "Replayer":
        self.proc.start()
        self.proc.wait_http(f"{self.url}/-/ready", 120)
        return self

    def stop(self) -> None:
        self.proc.stop()

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        body = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step}).encode()
        with urllib.request.urlopen(f"{self.url}/api/v1/query_range", body, timeout=900) as resp:  # noqa: S310
            doc = json.loads(resp.read())
        if doc.get("status") != "success":
            raise RuntimeError(f"query failed: {doc.get('error')}: {expr[:200]}")
        return doc["data"]["result"]

    def record(self, recorded: dict, names: list[str], ranges, path: str, prefix: str) -> dict:
        """Evaluate recording rules over `ranges` as the rule manager would and write their samples as
        OpenMetrics to `path` under `prefix` + name; returns name -> stored name."""
        with open(path, "w", encoding="utf-8") as out:
            for name in names:
                body, every = recorded[name]
                expr = inline(body, recorded, every)
                for a0, b0 in ranges:
                    for a in np.arange(math.ceil(a0 / every) * every, b0 + 1, MAX_STEPS * every):
                        for series in self.query_range(expr, float(a), float(min(a + (MAX_STEPS - 1) * every, b0)), every):
                            labels = ",".join(f'{k}="{v}"' for k, v in sorted(series["metric"].items()) if k != "__name__")
                            head = f"{prefix}{name}{{{labels}}} "
                            out.writelines(f"{head}{v} {ts:.0f}\n" for ts, v in series["values"])
            out.write("# EOF\n")
        return {name: prefix + name for name in names}

    def restart(self) -> None:
        """Stop and start again (Prometheus reads blocks added to its folder at start)."""
        self.proc.stop()
        self.start()

    def replay(self, rules: list[AlertRule], start: float, end: float, threads: int = 2) -> list[Episode]:
        """Every firing episode of `rules` over [start, end] (Unix seconds, on the 30 s grid)."""
        jobs = []
        for i, rule in enumerate(rules):
            first = math.ceil(start / rule.interval) * rule.interval
            for a in np.arange(first, end + 1, MAX_STEPS * rule.interval):
                jobs.append((i, float(a), float(min(a + (MAX_STEPS - 1) * rule.interval, end))))

        def run(job):
            i, a, b = job
            return i, self.query_range(rules[i].expr, a, b, rules[i].interval)

        found: dict[tuple, list] = {}
        with ThreadPoolExecutor(threads) as pool:
            for i, result in pool.map(run, jobs):
                for series in result:
                    labels = {k: v for k, v in series["metric"].items() if k != "__name__"}
                    labels.update(rules[i].labels)
                    key = (i, tuple(sorted(labels.items())))
                    found.setdefault(key, []).append([float(ts) for ts, _ in series["values"]])
        out = []
        for (i, labels), parts in found.items():
            rule = rules[i]
            times = np.unique(np.concatenate(parts))
            for active, fired, resolved in episodes(times, rule.interval, rule.for_s, rule.keep_firing_s, end):
                out.append(Episode(rule.alertname, rule.severity, labels, active, fired, resolved))
        return out
