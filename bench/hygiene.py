"""Per-turn memory hygiene: what gc.collect() and malloc_trim(0) give back, and what they cost.

Four variants (none, gc only, malloc_trim only, both) each live in their own child process, so each
has its own heap, the thing being measured. All four are alive at once and driven turn by turn in a
rotating order (turn i starts with variant i mod 4): every variant sees the same prompts and the
same drift in the machine's load, and no variant always follows the same neighbour. One generation
runs at a time, so they never compete for the cores with each other.

    .venv/bin/python -m bench.hygiene [--turns 40] [--new-tokens 16] [--out CSV]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import subprocess
import sys
import time

from . import common
from .common import markdown_table, median, percentile

# name -> (gc_after_turn, malloc_trim_after_turn)
VARIANTS = {"none": (False, False), "gc": (True, False), "trim": (False, True), "both": (True, True)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The bench's flags (--child is internal: the coordinator starts its variants with it)."""
    p = argparse.ArgumentParser(prog="python -m bench.hygiene", description=__doc__.split("\n")[0])
    p.add_argument("--turns", type=int, default=40,
                   help="turns per variant (40 x 4 variants fit ~15 min on 2 idle cores)")
    p.add_argument("--model", default=common.MODEL)
    p.add_argument("--new-tokens", type=int, default=16, help="tokens generated every turn (min = max)")
    p.add_argument("--min-prompt", type=int, default=500, help="shortest prompt, tokens")
    p.add_argument("--max-prompt", type=int, default=4000, help="longest prompt, tokens")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--threads", type=int, default=2, help="torch threads per variant")
    p.add_argument("--seed", type=int, default=7, help="seed of the prompt-length schedule and texts")
    p.add_argument("--cache-dir", default=None, help="model cache (default: the daemon's)")
    p.add_argument("--out", default="bench/results/hygiene.csv", help="per-turn CSV")
    p.add_argument("--child", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prompt_lengths(args: argparse.Namespace) -> list[int]:
    """Prompt lengths spaced evenly on a log scale from --min-prompt to --max-prompt, shuffled.

    More short turns than long ones, as chat goes, and the whole range covered whatever --turns is.
    """
    lo, hi, n = math.log(args.min_prompt), math.log(args.max_prompt), args.turns
    lengths = [round(math.exp(lo + (hi - lo) * k / max(1, n - 1))) for k in range(n)]
    random.Random(args.seed).shuffle(lengths)
    return lengths


def build_prompt(engine, tokens: int, rng: random.Random) -> str:
    """A user message of about `tokens` prompt tokens: shuffled prose, maths and code passages."""
    parts: list[str] = []
    ids: list[int] = []
    while len(ids) < tokens:
        parts += rng.sample(common.PASSAGES, len(common.PASSAGES))
        ids = engine.tokenizer("\n\n".join(parts), add_special_tokens=False)["input_ids"]
    overhead = engine.count_tokens([{"role": "user", "content": ""}])
    return engine.tokenizer.decode(ids[: max(1, tokens - overhead)])


def child(args: argparse.Namespace) -> int:
    """One variant: load the engine, then serve turns read as JSON lines on stdin until EOF."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints must not corrupt the protocol on stdout
    import gc

    from transformers.utils import logging as hf_logging

    from daemon.config import Config
    from daemon.model.engine import Engine, GenerationParams
    from daemon.memory.hygiene import rss_bytes

    hf_logging.disable_progress_bar()
    use_gc, use_trim = VARIANTS[args.child]
    cfg = Config(model=args.model, cache_dir=args.cache_dir, dtype=args.dtype, threads=args.threads,
                 max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                 gc_after_turn=use_gc, malloc_trim_after_turn=use_trim, generation_timeout_s=1800)
    engine = Engine.load(cfg)
    # Attribute work to the hygiene step: wrap the engine's hook (its own timing stays the
    # hygiene_s we report) to count the objects its gc.collect() frees and the RSS it returns.
    state = {"in_hygiene": False, "collected": 0, "auto": 0, "before": 0, "after": 0}
    inner = engine._hygiene

    def measured() -> float:
        state["before"], state["in_hygiene"] = rss_bytes(), True
        try:
            return inner()
        finally:
            state["in_hygiene"], state["after"] = False, rss_bytes()

    def on_gc(phase: str, info: dict) -> None:
        if phase == "stop":
            state["collected" if state["in_hygiene"] else "auto"] += info["collected"]

    engine._hygiene = measured
    gc.callbacks.append(on_gc)
    proto.write(json.dumps({"pid": os.getpid(), "dtype": engine.dtype, "load_s": engine.load_seconds,
                            "rss_mb": rss_bytes() / common.MB}) + "\n")
    for line in sys.stdin:
        job = json.loads(line)
        state["collected"] = state["auto"] = 0
        text = build_prompt(engine, job["tokens"], random.Random(f"{args.seed}-{job['turn']}"))
        gen = engine.generate([{"role": "user", "content": text}],
                              GenerationParams(max_new_tokens=args.new_tokens, seed=job["turn"]))
        for _ in gen:
            pass
        s = gen.stats
        proto.write(json.dumps({
            "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
            "duration_s": s.duration_s, "hygiene_s": s.hygiene_s, "gc_collected": state["collected"],
            "gc_auto_collected": state["auto"], "rss_before_hygiene_mb": state["before"] / common.MB,
            "rss_after_hygiene_mb": state["after"] / common.MB}) + "\n")
    return 0


class Variant:
    """A child process running one variant; a context manager that always ends it."""

    def __init__(self, name: str, args: argparse.Namespace, cache_dir: str) -> None:
        self.name = name
        cmd = [sys.executable, "-m", "bench.hygiene", "--child", name, "--model", args.model,
               "--new-tokens", str(args.new_tokens), "--dtype", args.dtype, "--threads", str(args.threads),
               "--seed", str(args.seed), "--cache-dir", cache_dir]
        env = common.clean_env()
        # as `edgechat serve` does: idle variants' spinning OpenMP threads would steal the cores
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.proc = subprocess.Popen(cmd, cwd=common.REPO, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        self.ready = self._read()
        self.pid = self.ready["pid"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"variant {self.name} exited with {self.proc.wait()} (its stderr is above)")
        return json.loads(line)

    def turn(self, turn: int, tokens: int) -> dict:
        """Run one turn in the child; returns its stats plus the RSS psutil sees afterwards."""
        self.proc.stdin.write(json.dumps({"turn": turn, "tokens": tokens}) + "\n")
        self.proc.stdin.flush()
        row = self._read()
        row["rss_mb"] = common.rss_mb(self.pid)
        row["rss_anon_mb"] = common.rss_anon_mb(self.pid)
        row["mem_available_mb"] = common.mem_available_mb()
        return row

    def __enter__(self) -> "Variant":
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(OSError):  # the child may be gone already (a failure)
            self.proc.stdin.close()  # EOF: the child's loop ends and it exits
        common.stop_process(self.proc, timeout=30)


def run(args: argparse.Namespace) -> tuple[list[dict], dict]:
    """Start the variants, play the turns in rotating order, end the children whatever happens."""
    cache_dir = args.cache_dir or common.default_cache_dir()
    lengths = prompt_lengths(args)
    rows: list[dict] = []
    info: dict = {"load_before": common.machine_note(), "load_rss": {}, "load_anon": {}, "peak_rss": {}}
    names = list(VARIANTS)
    with contextlib.ExitStack() as stack:
        children = {}
        for name in names:  # sequential loads: the first builds the model if it is missing
            v = children[name] = stack.enter_context(Variant(name, args, cache_dir))
            info["load_rss"][name] = common.rss_mb(v.pid)
            info["load_anon"][name] = common.rss_anon_mb(v.pid)
            print(f"{name}: pid {v.pid}, {v.ready['dtype']}, RSS after load {info['load_rss'][name]:.0f} MB",
                  flush=True)
        for i, tokens in enumerate(lengths):
            order = names[i % len(names):] + names[:i % len(names)]
            line = []
            for name in order:
                r = children[name].turn(i + 1, tokens)
                rows.append({"turn": i + 1, "variant": name, "order": order.index(name), **r})
                line.append(f"{name} {r['duration_s']:5.1f}s {r['rss_mb']:5.0f}MB")
            print(f"turn {i + 1:>3} ({tokens:>4} tok): " + " | ".join(line), flush=True)
        for name, v in children.items():
            info["peak_rss"][name] = common.peak_rss_mb(v.pid)
    info["load_after"] = common.machine_note()
    return rows, info


def tables(rows: list[dict], info: dict) -> str:
    """Memory per variant, then the cost of the hygiene step per variant."""
    mem, cost = [], []
    for name, (use_gc, use_trim) in VARIANTS.items():
        mine = [r for r in rows if r["variant"] == name]
        rss = [r["rss_mb"] for r in mine]
        returned = [r["rss_before_hygiene_mb"] - r["rss_after_hygiene_mb"] for r in mine]
        share = [r["hygiene_s"] / r["duration_s"] for r in mine]
        ms = [r["hygiene_s"] * 1000 for r in mine]
        label = f"{name} (gc={'on' if use_gc else 'off'}, trim={'on' if use_trim else 'off'})"
        mem.append((label, f"{info['load_rss'][name]:.0f}", f"{rss[-1]:.0f}", f"{max(rss):.0f}",
                    f"{info['peak_rss'][name]:.0f}", f"{rss[-1] - info['load_rss'][name]:+.0f}",
                    f"{info['load_anon'][name]:.0f} → {mine[-1]['rss_anon_mb']:.0f}",
                    f"{median(returned):.1f} / {max(returned):.1f}"))
        cost.append((label, f"{median(ms):.1f}", f"{percentile(ms, 90):.1f}",
                     f"{median(share):.2%}", f"{percentile(share, 90):.2%}",
                     f"{sum(r['gc_collected'] for r in mine)}", f"{sum(r['gc_auto_collected'] for r in mine)}",
                     f"{median([r['duration_s'] for r in mine]):.2f}"))
    return "\n\n".join((
        markdown_table(("variant", "RSS after load, MB", "after last turn", "max after a turn",
                        "peak (VmHWM)", "last − load", "RssAnon load → last", "RSS returned by the step per turn, MB (median / max)"), mem),
        markdown_table(("variant", "step median, ms", "step p90, ms", "step / turn median", "step / turn p90",
                        "objects freed by the step's gc", "objects freed by automatic gc", "turn median, s"), cost)))


def main(argv: list[str] | None = None) -> int:
    """Run the bench (or, with --child, one variant), print the tables, write the CSV."""
    args = parse_args(argv)
    if args.child:
        return child(args)
    common.exit_on_sigterm()
    started = time.monotonic()
    print(f"{common.today()}: {args.turns} turns x {len(VARIANTS)} variants on {args.model}, prompts "
          f"{args.min_prompt}-{args.max_prompt} tokens (log-spaced, shuffled), {args.new_tokens} new tokens, "
          f"dtype {args.dtype}, {args.threads} threads; {common.machine_note()}\n{common.code_note()}",
          flush=True)
    rows, info = run(args)
    common.write_csv(args.out, rows)
    print()
    print(tables(rows, info))
    tokens = [r["prompt_tokens"] for r in rows if r["variant"] == "none"]
    print(f"\nprompt tokens {common.spread(tokens, '{:.0f}')} median (p10–p90)\n"
          f"load before: {info['load_before']}\nload after:  {info['load_after']}\n"
          f"wall time {time.monotonic() - started:.0f} s; per-turn CSV: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
