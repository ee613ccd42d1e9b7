"""Alerts you can trust, in numbers: recall, lead time, false alerts and flaps of the memory and
history rules over thousands of simulated device-days, evaluated by the real rule engines.

Device stage: seeded traces (prometheus/tests/traces.py) are backfilled as TSDB blocks and the
rules are replayed by a real Prometheus (bench/rule_replay.py). Fleet stage (bench/fleet_replay.py):
the device alerts, versions and scrapes of a fleet go into VictoriaMetrics, vmalert -replay runs the
fleet rules over them, and the cohort's alerts are sent to a real Alertmanager whose webhook counts
the pages. Results and how to read them: docs/alerts-quality.md.

  .venv/bin/python -m bench.alert_quality --device-days 10000
  .venv/bin/python -m bench.alert_quality --device-days 1000 --baseline-rules OLD_RULES_DIR
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "prometheus", "tests")]
import trace_io  # noqa: E402
import traces  # noqa: E402
from shapes import LEAKS  # noqa: E402

from bench import alert_scores, rule_replay  # noqa: E402
from bench.common import code_note, machine_note, today  # noqa: E402
from daemon.monitoring.thresholds import Thresholds  # noqa: E402

DAY = 86400
SPACING = 3 * 162 * 3600           # batches sit this far apart: 3 aligned blocks each, none shared
BASE = 1_700_000_000 // (162 * 3600) * (162 * 3600)
GROUPS = ("edgechat.memory.alerts", "edgechat.memory.trend.alerts", "edgechat.history.alerts")
RULE_FILES = ("edgechat-recording.yml", "edgechat-alerts.yml")
STEADY, NEXT, LEAKY = "1.3.2", "1.3.3", "1.4.0"


@dataclasses.dataclass(frozen=True)
class Spec:
    """One device of the run."""

    name: str
    shape: str
    seed: int
    days: int
    version: str
    deploy_at: float | None = None     # the cohort's rollout: a restart onto LEAKY
    fleet: bool = False                # also in the fleet stage


def plan(device_days: int, seed: int, leak_share: float = 0.25, cohort: int | None = None,
         rollout_day: float = 2.0) -> list[Spec]:
    """The run's devices: a release cohort (40 % of it leaking from its rollout), leak traces of every
    shape in turn up to `leak_share` of the device-days, then healthy archetypes in turn."""
    rng = np.random.default_rng(seed)
    specs: list[Spec] = []
    cohort = cohort if cohort is not None else max(10, min(40, device_days // 250))
    cohort_days = 10
    for i in range(cohort):
        leaky = i % 5 in (1, 3)
        shape = ("per_request", "per_token")[i % 2] if leaky else traces.HEALTHY[1 + i % 3]
        specs.append(Spec(f"c{i:04d}", shape, seed * 1_000_003 + i, cohort_days, LEAKY,
                          (rollout_day + rng.uniform(0, 0.1)) * DAY, fleet=True))
    total = sum(s.days for s in specs)
    leak_days = sum(s.days for s in specs if s.shape in LEAKS)
    shapes, i = list(LEAKS), 0
    while leak_days < leak_share * device_days:
        shape, s = shapes[i % len(shapes)], seed * 1_000_003 + 100_000 + i
        days = traces.leak_days(shape, s)
        specs.append(Spec(f"l{i:05d}", shape, s, days, (STEADY, NEXT)[i % 2], fleet=i % 25 == 0))
        leak_days, total, i = leak_days + days, total + days, i + 1
    i = 0
    while total < device_days:
        days = int(min(device_days - total, rng.integers(1, 15)))
        specs.append(Spec(f"h{i:05d}", traces.HEALTHY[i % len(traces.HEALTHY)], seed * 1_000_003 + 200_000 + i,
                          days, (STEADY, NEXT)[i % 2], fleet=i % 3 == 0))
        total, i = total + days, i + 1
    return specs


def batches(specs: list[Spec], batch_days: int) -> list[list[Spec]]:
    out, cur, n = [], [], 0
    for s in specs:
        cur.append(s)
        n += s.days
        if n >= batch_days:
            out.append(cur)
            cur, n = [], 0
    return out + ([cur] if cur else [])


def store(specs: list[Spec], workdir: str, batch_days: int) -> tuple[dict, dict, list[tuple[float, float]]]:
    """Build every trace and backfill it; returns (truths, device -> t0, batch time ranges)."""
    truths, offsets, ranges = {}, {}, []
    data = os.path.join(workdir, "data")
    os.makedirs(data, exist_ok=True)
    with ThreadPoolExecutor(1) as pool:        # promtool ingests one batch while the next is built
        pending = []
        for b, batch in enumerate(batches(specs, batch_days)):
            t0 = BASE + b * SPACING
            path = os.path.join(workdir, f"batch-{b:03d}.om")
            with open(path, "w", encoding="utf-8") as handle:
                for s in batch:
                    trace = traces.build(s.name, s.shape, s.seed, s.days, s.deploy_at)
                    handle.writelines(trace_io.openmetrics(trace, t0))
                    truths[s.name], offsets[s.name] = trace.truth, t0
                handle.write("# EOF\n")
            ranges.append((t0, t0 + max(s.days for s in batch) * DAY))
            pending.append(pool.submit(rule_replay.backfill, path, data))
            if len(pending) > 2:                # at most two batches on disk, waiting for promtool
                pending[-3].result()
        for job in pending:
            job.result()
    return truths, offsets, ranges


# Recordings many alert rules read, costly to evaluate inline again in each: recorded once (as the
# rule manager would) before the alerts are replayed, when a rule set has them.
SHARED = ("instance:edgechat_memory_unpooled_bytes:sum", "instance:edgechat_memory_committed_bytes:sum",
          "instance:edgechat_process_anonymous_swap_bytes:sum", "instance:edgechat_uptime_seconds:max")


def replay(workdir: str, rule_dirs: dict[str, str], ranges) -> dict[str, list]:
    """Every rule set's episodes over every batch, from one Prometheus."""
    data = os.path.join(workdir, "data")
    prom = rule_replay.Replayer(data, os.path.join(workdir, "replay.log")).start()
    try:
        out = {}
        for label, rules_dir in rule_dirs.items():
            paths = [os.path.join(rules_dir, f) for f in RULE_FILES]
            recorded, _ = rule_replay.load_rules(paths)
            names = rule_replay.shared(paths, GROUPS, SHARED)
            stored = {}
            if names:
                digest = hashlib.sha1(b"".join(open(p, "rb").read() for p in paths)).hexdigest()[:8]
                # one file per batch: promtool parses a whole file once per block it cuts, so one file
                # over every batch would cost (batches x blocks) parses
                for b, span in enumerate(ranges):
                    path = os.path.join(workdir, f"recorded-{label}-{b:03d}.om")
                    stored = prom.record(recorded, names, [span], path, f"replay_{label}_{digest}:")
                    rule_replay.backfill(path, data)
                prom.restart()
            rules = rule_replay.alert_rules(paths, GROUPS, stored)
            out[label] = [e for a, b in ranges for e in prom.replay(rules, a, b)]
        return out
    finally:
        prom.stop()


def episodes_by_device(episodes: list, truths: dict, offsets: dict) -> dict:
    """device -> its trace's facts and its alerts, times in hours from the trace's start."""
    out = {name: {"shape": t.shape, "days": t.days, "leak_start": t.leak_start and t.leak_start / 3600,
                  "limit_at": t.limit_at and t.limit_at / 3600, "boots": [b / 3600 for b in t.boots],
                  "alerts": []} for name, t in truths.items()}
    for e in episodes:
        device = dict(e.labels).get("device")
        t0 = offsets[device]
        out[device]["alerts"].append([alert_scores.rule_key(e), round((e.fired_at - t0) / 3600, 3),
                                      None if e.resolved_at is None else round((e.resolved_at - t0) / 3600, 3)])
    return out


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown CPU"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown CPU")


def print_report(label: str, report: alert_scores.Report) -> None:
    print(f"\n## {label}: {report.devices} devices, {report.healthy_days:.0f} healthy + "
          f"{report.leak_days:.0f} leaky device-days\n")
    print(alert_scores.markdown(alert_scores.SHAPE_HEADER, alert_scores.shape_rows(report)))
    rows = [[k, str(n), f"{report.per_1000(n):.2f}"] for k, n in sorted(report.false_alerts.items())]
    print("\nFalse alerts on healthy traces:\n")
    print(alert_scores.markdown(["alert/severity", "count", "per 1,000 healthy device-days"], rows or [["none", "0", "0"]]))
    print(f"\nFlaps: {report.flap_count}; the most of one alert on one device in 7 days: {report.flap_worst_week}\n")
    print(alert_scores.markdown(["goal", "measured", "met"],
                                [[k, v, "yes" if ok else "NO"] for k, (v, ok) in report.goals().items()]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device-days", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch-days", type=int, default=400, help="device-days per backfilled batch")
    parser.add_argument("--rules", default=os.path.join(REPO, "prometheus", "rules"), help="rule folder to measure")
    parser.add_argument("--baseline-rules", help="a second rule folder measured on the same traces")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=DIR",
                        help="more rule folders measured on the same traces (repeatable)")
    parser.add_argument("--no-fleet", action="store_true", help="skip the fleet stage")
    parser.add_argument("--fleet-compress", type=float, default=2880,
                        help="how many times faster than real time alerts reach the Alertmanager")
    parser.add_argument("--json", help="write the numbers here")
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary one)")
    parser.add_argument("--reuse", action="store_true", help="replay the traces a --keep folder holds already")
    ns = parser.parse_args(argv)
    workdir = ns.keep or tempfile.mkdtemp(prefix="alert-quality-")
    began = time.time()
    try:
        saved = os.path.join(workdir, "run.pickle")
        if ns.reuse and os.path.exists(saved):
            with open(saved, "rb") as handle:
                specs, truths, offsets, ranges = pickle.load(handle)
            specs = [Spec(**s) for s in specs]
        else:
            specs = plan(ns.device_days, ns.seed)
            truths, offsets, ranges = store(specs, workdir, ns.batch_days)
            with open(saved, "wb") as handle:
                pickle.dump(([dataclasses.asdict(s) for s in specs], truths, offsets, ranges), handle)
        stored = time.time()
        dirs = {"rules": ns.rules, **({"baseline": ns.baseline_rules} if ns.baseline_rules else {}),
                **dict(v.split("=", 1) for v in ns.variant)}
        found = replay(workdir, dirs, ranges)
        replayed = time.time()
        arm = Thresholds().leak_min_uptime
        reports = {k: alert_scores.score(list(truths.values()), offsets, eps, arm) for k, eps in found.items()}
        fleet = None
        if not ns.no_fleet:
            from bench import fleet_replay
            fleet = fleet_replay.run([s for s in specs if s.fleet], truths, offsets, found["rules"],
                                     os.path.join(workdir, "fleet"), ns.fleet_compress)
    finally:
        if not ns.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"# alert quality: {ns.device_days} device-days, seed {ns.seed} — {today()}, {cpu_model()}, "
          f"{machine_note()}; {code_note()}")
    print("command: python -m bench.alert_quality " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"build + backfill {stored - began:.0f} s, replay {replayed - stored:.0f} s "
          f"({len(dirs)} rule set(s)), total {time.time() - began:.0f} s")
    for label, report in reports.items():
        print_report(f"{label} ({dirs[label]})", report)
    if len(reports) > 1:
        print("\n## side by side\n")
        print(alert_scores.side_by_side(reports))
    if fleet is not None:
        print("\n## fleet\n")
        print(fleet.text())
    if ns.json:
        with open(ns.json, "w", encoding="utf-8") as handle:
            json.dump({k: {"goals": r.goals(), "false_alerts": r.false_alerts, "healthy_days": r.healthy_days,
                           "leaks": [dataclasses.asdict(x) for x in r.leaks],
                           "episodes": episodes_by_device(found[k], truths, offsets)} for k, r in reports.items()},
                      handle, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
