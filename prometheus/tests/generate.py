#!/usr/bin/env python3
"""Generates prometheus/tests/scenario-*.yml: promtool tests replaying simulated leaky and healthy devices.

Each scenario is a realistic run of one daemon on a 2 GB device (see simulate.py) with the exact set of
firing alerts expected at several times. At every check the test asserts that set through the ALERTS
series (so an unexpected alert of any name fails it) and lists every other alert name with
`exp_alerts: []` (promtool only checks the names it is given). Alerts expected to fire are checked by
name and labels via ALERTS; their exact annotations are checked in alerts_test.yml.

  .venv/bin/python prometheus/tests/generate.py            # rewrite the committed files
  .venv/bin/python prometheus/tests/generate.py --check    # exit 1 if they are out of date
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]
from simulate import GiB, MiB, STEP, Epoch, Scrapes, User, encode  # noqa: E402

from daemon.monitoring import rules  # noqa: E402
from daemon.monitoring.promql import duration  # noqa: E402

# expected firing alerts: (alertname, severity[, window]); EdgechatHeartbeat is the pipeline heartbeat, always firing
W = ("EdgechatHeartbeat", "none")
II = ("EdgechatInfoInhibitor", "none")
LEAK_W, LEAK_C = ("EdgechatMemoryLeakSuspected", "warning", "1h"), ("EdgechatMemoryLeakSuspected", "critical", "30m")
NEAR_W, NEAR_C = ("EdgechatMemoryNearLimit", "warning"), ("EdgechatMemoryNearLimit", "critical")
HISTORY = ("EdgechatHistoryUnbounded", "warning")
CREEP, SLOW = ("EdgechatTurnLatencyCreep", "warning"), ("EdgechatTurnLatencyHigh", "warning")
RESTARTED = ("EdgechatRestarted", "info")


def sawtooth(t: float) -> float:
    """+-50 MB: pymalloc/glibc arenas filling for 7 minutes, then a collection handing memory back."""
    return (t % 420) / 420 * 100 * MiB - 50 * MiB


def startup(steady):
    """Model load: interpreter and torch, weights mapping in, warm-up peak, then `steady`."""
    def memory(t: float) -> float:
        if t <= 30:
            return 350 * MiB
        if t <= 60:
            return 900 * MiB
        if t <= 120:
            return 1.3 * GiB
        return steady(t)
    return memory


def bounded(i: int) -> float:
    """Turn latency with history trimmed to 5 turns: the prompt stops growing (1.4 s at turn 1, capped from turn 6)."""
    return 1.4 + 0.15 * (min(i, 6) - 1)


def growing(i: int) -> float:
    """Turn latency when the whole history is re-fed (the classic history leak): 1.4 s at turn 1, 8.2 s at turn 20."""
    return 1.4 + 0.358 * (i - 1)


def chatters(n: int, start: float, turns: int = 8, latency=bounded, **kw) -> list[User]:
    """n users with staggered starts, each chatting conversations of `turns` turns."""
    return [User(start=start + 97 * j, turns=turns, latency=latency, **kw) for j in range(n)]


@dataclasses.dataclass
class Scenario:
    name: str
    kind: str                          # "leak" or "healthy"
    about: str
    minutes: int
    epochs: list[Epoch]
    checks: list[tuple[float, set]]    # (minute, alerts firing then)
    down: list[tuple[float, float]] = dataclasses.field(default_factory=list)


SCENARIOS = [
    Scenario("history_unbounded", "leak",
             "The classic bug: history appended, never trimmed, while the daemon reports max_turns=5. One user "
             "chats on for 3 h; RSS grows 1.5 % while latency grows with the prompt.",
             180, [Epoch(-600, lambda t: GiB + sawtooth(t) + 15 * MiB * t / 10800,
                         [User(660, 10 ** 6, growing), User(900, 4, growing, gap=300)], trims=False)],
             [(10, {W}), (20, {HISTORY, W}), (40, {HISTORY, CREEP, W}), (120, {HISTORY, CREEP, SLOW, W}),
              (180, {HISTORY, CREEP, SLOW, W})]),
    Scenario("slow_rss_leak", "leak",
             "5 MB/min RSS leak on a 2 GB device from a fresh start: the slow leak rule warns at ~1 h "
             "(about 2 h before OOM), then the level and fast rules follow as the limit nears.",
             180, [Epoch(0, startup(lambda t: GiB + 5 * MiB * (t - 120) / 60 + sawtooth(t)), chatters(2, 300))],
             [(50, {W}), (75, {LEAK_W, W}), (140, {LEAK_W, NEAR_W, W}), (160, {LEAK_W, LEAK_C, NEAR_W, W}),
              (178, {LEAK_W, LEAK_C, NEAR_W, NEAR_C, W})]),
    Scenario("fast_tensor_leak", "leak",
             "Generation outputs kept alive: +40 MB per turn at a turn a minute (1 GB -> 2.2 GB in 30 turns). "
             "Idle for 40 min after start, then OOM in under half an hour.",
             64, [Epoch(0, startup(lambda t: GiB + sawtooth(t) + 40 * MiB * max(0, (t - 2400) // 60)),
                        [User(2400, 10 ** 6, bounded, think=57)])],
             [(45, {W}), (55, {W}), (59, {LEAK_C, W}), (64, {LEAK_C, NEAR_W, NEAR_C, W})]),
    Scenario("latency_creep", "leak",
             "max_history_turns=50 on a small CPU: history stays within its (too loose) limit, but turns "
             "11-30 carry ever longer prompts and take up to 8x longer than turns 1-5. Memory is flat.",
             150, [Epoch(-7200, lambda t: 1.1 * GiB + sawtooth(t), chatters(2, 30, turns=30, latency=growing,
                                                                            think=20, gap=180), max_turns=50)],
             [(15, {W}), (45, {CREEP, W}), (150, {CREEP, W})]),
    Scenario("healthy_sawtooth", "healthy",
             "A day-old daemon: RSS flat at 1.1 GB with a +-50 MB GC sawtooth, bounded history, 3 users.",
             180, [Epoch(-86400, lambda t: 1.1 * GiB + sawtooth(t), chatters(3, 30))],
             [(10, {W}), (60, {W}), (120, {W}), (180, {W})]),
    Scenario("startup_spike", "healthy",
             "Fresh start: RSS jumps to 1.3 GB while the model loads and warms up, drops to 1 GB, then glibc "
             "arenas grow by 150 MB over the first 20 min of turns and stay: flat from there.",
             180, [Epoch(0, startup(lambda t: GiB + sawtooth(t) + 150 * MiB * min(max(t - 300, 0), 1200) / 1200),
                         chatters(2, 300))],
             [(5, {W}), (35, {W}), (60, {W}), (90, {W}), (180, {W})]),
    Scenario("restart", "healthy",
             "Two gunicorn workers (pid labels) at 1.45 GB after a day are restarted at 60 min: a minute "
             "down, new pids, RSS back to its 1.1 GB baseline. Only the info alert fires, and EdgechatInfoInhibitor "
             "holds it back in Alertmanager.",
             180, [Epoch(-86400, lambda t: 1.45 * GiB + sawtooth(t), chatters(2, 30), pids=("101", "102"), end=3600),
                   Epoch(3660, startup(lambda t: 1.1 * GiB + sawtooth(t)), chatters(2, 300), pids=("201", "202"))],
             [(55, {W}), (64, {II, W}), (70, {RESTARTED, II, W}), (85, {W}), (180, {W})],
             down=[(3600, 3660)]),
    Scenario("swap_hidden_leak", "leak",
             "A leak the kernel hides in swap (the Ollama report): 4 MB/min of leaked pages are swapped out as "
             "fast as they are made, so RSS and the RAM working set stay flat at 1.2 GB of 2 GB (no NearLimit, "
             "ever) while anonymous memory + swap climbs. Started an hour before the run.",
             180, [Epoch(-3600, lambda t: 1.2 * GiB + sawtooth(t), chatters(2, 30),
                         swap=lambda t: 4 * MiB * t / 60)],
             [(30, {W}), (50, {LEAK_W, W}), (100, {LEAK_W, LEAK_C, W}), (180, {LEAK_W, LEAK_C, W})]),
    Scenario("swap_settled", "healthy",
             "A day-old daemon whose box swapped out 300 MB of cold pages once (start-up code, unused "
             "arenas) and stays there: RAM flat at 1.1 GB, swap flat. Some swap is not a leak.",
             180, [Epoch(-86400, lambda t: 1.1 * GiB + sawtooth(t), chatters(3, 30),
                         swap=lambda t: 300 * MiB)],
             [(10, {W}), (90, {W}), (180, {W})]),
    Scenario("memory_high_flat", "healthy",
             "Two workers using 75 % of a 2 GB limit (1.5 GB +-50 MB), flat for 4 h: high is not leaking.",
             240, [Epoch(-86400, lambda t: 1.5 * GiB + sawtooth(t), chatters(3, 30), pids=("101", "102"))],
             [(30, {W}), (90, {W}), (150, {W}), (240, {W})]),
]

# series holding seconds of wall time: a compressed replay shrinks them with the clock
TIME_VALUED = ("edgechat_process_start_time_seconds", "edgechat_gc_pause_seconds_sum")


def _alerts_sample(alert: tuple[str, ...]) -> dict:
    name, severity = alert[:2]
    # the heartbeat (vector(1)) carries only its job; the others the instance's labels
    where = ', job="edgechat"' if alert == W else ', instance="127.0.0.1:8000", job="edgechat"'
    window = f', window="{alert[2]}"' if len(alert) > 2 else ""
    return {"labels": f'ALERTS{{alertname="{name}", alertstate="firing"{where}, severity="{severity}"{window}}}',
            "value": 1}


def _test_doc(s: Scenario, time_scale: float, rule_files: list[str], alertnames: list[str],
              group_order: list[str]) -> dict:
    scrapes = Scrapes(s.minutes)
    for epoch in s.epochs:
        scrapes.add(epoch)
    scrapes.up(s.down)
    at = lambda minute: duration(minute * 60 * time_scale)  # noqa: E731
    series = [{"series": key, "values": encode(values, time_scale if key.startswith(TIME_VALUED) else 1)}
              for key, values in scrapes.series.items()]
    rule_tests, expr_tests = [], []
    for minute, firing in s.checks:
        expr_tests.append({"expr": 'ALERTS{alertstate="firing"}', "eval_time": at(minute),
                           "exp_samples": [_alerts_sample(a) for a in sorted(firing)]})
        names = {alert[0] for alert in firing}
        rule_tests += [{"eval_time": at(minute), "alertname": name, "exp_alerts": []}
                       for name in alertnames if name not in names]
    return {"rule_files": rule_files, "evaluation_interval": duration(STEP * time_scale),
            "group_eval_order": group_order,
            "tests": [{"name": f"{s.kind}: {s.name}", "interval": duration(STEP * time_scale),
                       "input_series": series, "alert_rule_test": rule_tests, "promql_expr_test": expr_tests}]}


def build(time_scale: float = 1.0, rules_dir: str = "../rules") -> dict[str, str]:
    """Map file name -> promtool test YAML for every scenario, against rule files in `rules_dir`."""
    recording, alerts = rules.groups(time_scale)
    alertnames = sorted({r.body["alert"] for g in alerts for r in g.rules})
    group_order = [g.name for g in recording + alerts]
    rule_files = [os.path.join(rules_dir, rules.RECORDING_FILE), os.path.join(rules_dir, rules.ALERTS_FILE)]
    files = {}
    for s in SCENARIOS:
        doc = _test_doc(s, time_scale, rule_files, alertnames, group_order)
        head = (f"# {s.kind} scenario {s.name}: {s.about}\n"
                f"# Generated by prometheus/tests/generate.py (time_scale {time_scale:g}); do not edit.\n")
        files[f"scenario-{s.name}.yml"] = head + yaml.safe_dump(doc, sort_keys=False, width=4096)
    return files


def main(argv: list[str] | None = None) -> int:
    """Write the scenario files, or with --check report whether the committed ones are current."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    parser.add_argument("--time-scale", type=float, default=1.0, help="compress time (with rules rendered alike)")
    parser.add_argument("--rules-dir", default="../rules", help="rule folder, relative to --out")
    parser.add_argument("--out", default=HERE, help="folder to write to")
    ns = parser.parse_args(argv)
    stale = []
    for name, text in build(ns.time_scale, ns.rules_dir).items():
        path = os.path.join(ns.out, name)
        if ns.check:
            try:
                with open(path, encoding="utf-8") as handle:
                    current = handle.read() == text
            except FileNotFoundError:
                current = False
            stale += [] if current else [path]
        else:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)
    for path in stale:
        print(f"out of date: {path} (run prometheus/tests/generate.py)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
