"""Turn latency, prompt tokens and RSS over one long session: default daemon vs leak_mode=history.

The classic history leak (docs/memory.md) before and after bounding the history, measured on two
real daemons in the same run, their turns interleaved (turn i of the default daemon, then turn i of
the leaking one) so that the load other processes put on the machine hits both alike.

    .venv/bin/python -m bench.history_leak [--turns 30] [--new-tokens 64] [--out CSV]
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time

from . import common
from .common import markdown_table, median, ratio

DAEMONS = (("default", ()), ("leak", ("--leak-mode", "history")))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The bench's flags."""
    p = argparse.ArgumentParser(prog="python -m bench.history_leak", description=__doc__.split("\n")[0])
    p.add_argument("--turns", type=int, default=30, help="turns in each session")
    p.add_argument("--model", default=common.MODEL)
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated every turn (min = max)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=2, help="torch threads per daemon worker")
    p.add_argument("--cache-dir", default=None, help="shared model cache (default: the daemon's)")
    p.add_argument("--out", default="bench/results/history_leak.csv", help="per-turn CSV")
    return p.parse_args(argv)


def daemon_args(args: argparse.Namespace, cache_dir: str) -> list[str]:
    """Flags both daemons share; only --leak-mode differs."""
    n = str(args.new_tokens)
    return ["--model", args.model, "--dtype", args.dtype, "--threads", str(args.threads),
            "--max-new-tokens", n, "--min-new-tokens", n, "--cache-dir", cache_dir,
            # a leaking turn 30 may take minutes on a loaded machine; it must not be cut short
            "--generation-timeout-s", "1800",
            "--graceful-timeout-s", "10"]  # an aborted bench should not wait a minute per daemon


def take_turn(d: common.ServedDaemon, session: str, turn: int, prompt: str, new_tokens: int) -> dict:
    """One session turn over HTTP; client-side wall time, usage, history size, worker RSS."""
    cpu0 = common.cpu_seconds(d.worker_pid)
    started = time.perf_counter()
    answer = d.post(f"/v1/sessions/{session}/messages",
                    {"content": prompt, "max_tokens": new_tokens, "seed": turn})
    latency = time.perf_counter() - started
    cpu = common.cpu_seconds(d.worker_pid) - cpu0
    return {"turn": turn, "daemon": d.name, "latency_s": round(latency, 3),
            "prompt_tokens": answer["usage"]["prompt_tokens"],
            "completion_tokens": answer["usage"]["completion_tokens"],
            "history_messages": answer["history"]["messages"],
            "history_tokens": answer["history"]["tokens"],
            "rss_mb": round(common.rss_mb(d.worker_pid), 1),
            "rss_anon_mb": round(common.rss_anon_mb(d.worker_pid), 1),
            "mem_available_mb": round(common.mem_available_mb()),
            "worker_cpu_s": round(cpu, 2)}


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Start both daemons, play the turns interleaved, stop the daemons whatever happens."""
    cache_dir = args.cache_dir or common.default_cache_dir()
    workdir = tempfile.mkdtemp(prefix="edgechat-bench-")
    rows: list[dict] = []
    info: dict = {"load_before": common.machine_note()}
    with contextlib.ExitStack() as stack:
        daemons = {}
        for name, extra in DAEMONS:  # one after the other: the first builds the model if missing
            print(f"starting the {name} daemon ...", flush=True)
            d = daemons[name] = stack.enter_context(
                common.ServedDaemon(name, workdir, [*daemon_args(args, cache_dir), *extra]))
            info[f"{name}_load_rss"] = common.rss_mb(d.worker_pid)
            info[f"{name}_load_anon"] = common.rss_anon_mb(d.worker_pid)
            print(f"  worker pid {d.worker_pid}, RSS after load {info[f'{name}_load_rss']:.0f} MB", flush=True)
        sessions = {name: d.post("/v1/sessions", {})["id"] for name, d in daemons.items()}
        print(f"{'turn':>4} | {'default s':>9} {'prompt':>6} {'msgs':>4} {'RSS MB':>7} | "
              f"{'leak s':>7} {'prompt':>6} {'msgs':>4} {'RSS MB':>7}", flush=True)
        for turn in range(1, args.turns + 1):
            prompt = common.CHAT_PROMPTS[(turn - 1) % len(common.CHAT_PROMPTS)]
            pair = [take_turn(daemons[name], sessions[name], turn, prompt, args.new_tokens)
                    for name, _ in DAEMONS]
            rows += pair
            print(f"{turn:>4} | " + " | ".join(
                f"{r['latency_s']:>{9 if r['daemon'] == 'default' else 7}.2f} {r['prompt_tokens']:>6} "
                f"{r['history_messages']:>4} {r['rss_mb']:>7.0f}" for r in pair), flush=True)
        for name, d in daemons.items():
            info[f"{name}_peak_rss"] = common.peak_rss_mb(d.worker_pid)
    info["load_after"] = common.machine_note()
    shutil.rmtree(workdir, ignore_errors=True)  # reached only on success: logs stay for a failed run
    return rows, info


def summary(rows: list[dict], info: dict, turns: int, threads: int) -> str:
    """The before/after table: latency and prompt tokens at turns 1/20/30, RSS, ratios."""
    by = {(r["daemon"], r["turn"]): r for r in rows}
    marks = sorted({t for t in (1, 20, 30, turns) if t <= turns})
    last = turns
    out = []
    for t in marks:
        a, b = by[("default", t)], by[("leak", t)]
        out.append((f"turn {t} latency, s (prompt tokens)",
                    f"{a['latency_s']:.2f} ({a['prompt_tokens']})",
                    f"{b['latency_s']:.2f} ({b['prompt_tokens']})",
                    ratio(b["latency_s"], a["latency_s"])))
    # single turns shake with the machine's load; medians over the 5 turns up to a mark do less
    for t in (t for t in marks if t >= 5):
        a, b = (median(by[(n, k)]["latency_s"] for k in range(t - 4, t + 1)) for n in ("default", "leak"))
        out.append((f"median latency of turns {t - 4}–{t}, s", f"{a:.2f}", f"{b:.2f}", ratio(b, a)))
    for name in ("default", "leak"):
        first, end = by[(name, 1)], by[(name, last)]
        info[f"{name}_growth"] = ratio(end["latency_s"], first["latency_s"])
    # CPU seconds the worker burnt per turn: the work itself, less shaken by other processes' load
    if last >= 5:
        cpu = {n: (by[(n, 1)]["worker_cpu_s"], median(by[(n, k)]["worker_cpu_s"] for k in range(last - 4, last + 1)))
               for n in ("default", "leak")}
        out.append((f"worker CPU s per turn: turn 1 → median of turns {last - 4}–{last}",
                     *(f"{c[0]:.1f} → {c[1]:.1f} ({ratio(c[1], c[0])})" for c in cpu.values()),
                     ratio(cpu["leak"][1], cpu["default"][1])))
    out.append((f"turn {last} / turn 1 latency", info["default_growth"], info["leak_growth"], ""))
    out.append((f"history messages after turn {last}", by[("default", last)]["history_messages"],
                by[("leak", last)]["history_messages"], ""))
    out.append((f"worker RSS after load → after turn {last}, MB",
                f"{info['default_load_rss']:.0f} → {by[('default', last)]['rss_mb']:.0f}",
                f"{info['leak_load_rss']:.0f} → {by[('leak', last)]['rss_mb']:.0f}",
                ratio(by[("leak", last)]["rss_mb"], by[("default", last)]["rss_mb"])))
    out.append((f"worker RssAnon after load → after turn {last}, MB",
                f"{info['default_load_anon']:.0f} → {by[('default', last)]['rss_anon_mb']:.0f}",
                f"{info['leak_load_anon']:.0f} → {by[('leak', last)]['rss_anon_mb']:.0f}",
                ratio(by[("leak", last)]["rss_anon_mb"], by[("default", last)]["rss_anon_mb"])))
    out.append(("worker peak RSS (VmHWM), MB", f"{info['default_peak_rss']:.0f}",
                f"{info['leak_peak_rss']:.0f}", ""))
    shares = {}
    for name in ("default", "leak"):
        mine = [r for r in rows if r["daemon"] == name]
        shares[name] = sum(r["worker_cpu_s"] for r in mine) / sum(r["latency_s"] for r in mine) / threads
    out.append(("total time of all turns, s",
                f"{sum(r['latency_s'] for r in rows if r['daemon'] == 'default'):.0f}",
                f"{sum(r['latency_s'] for r in rows if r['daemon'] == 'leak'):.0f}", ""))
    out.append(("host MemAvailable, lowest seen after a turn, MB",
                f"{min(r['mem_available_mb'] for r in rows):.0f}", "", ""))
    out.append((f"CPU the worker got (CPU s / wall s / {threads} threads)",
                f"{shares['default']:.0%}", f"{shares['leak']:.0%}", ""))
    return markdown_table(("measure", "default (max_history_turns=5)", "leak_mode=history", "leak / default"),
                          out)


def main(argv: list[str] | None = None) -> int:
    """Run the bench, print the per-turn and summary tables, write the CSV."""
    args = parse_args(argv)
    common.exit_on_sigterm()
    started = time.monotonic()
    print(f"{common.today()}: {args.turns} turns on {args.model}, {args.new_tokens} new tokens a turn, "
          f"dtype {args.dtype}, {args.threads} threads; {common.machine_note()}\n{common.code_note()}",
          flush=True)
    rows, info = run(args)
    incomplete = [r for r in rows if r["completion_tokens"] != args.new_tokens]
    if incomplete:
        print(f"WARNING: {len(incomplete)} turns generated fewer than {args.new_tokens} tokens", file=sys.stderr)
    common.write_csv(args.out, rows)
    print()
    print(summary(rows, info, args.turns, args.threads))
    print(f"\nload before: {info['load_before']}\nload after:  {info['load_after']}\n"
          f"wall time {time.monotonic() - started:.0f} s; per-turn CSV: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
