"""Decode speed of the per-request options that need the full logits every step, against the default.

Each variant generates the same number of tokens (end of text suppressed; constrained variants count
their own tokens) from the same prompt on one engine, in rounds that interleave the variants. With
--baseline-tree, the default variant also runs on another checkout's code (e.g. main, in a child
process) in the same rounds, so "the default path stays as fast" is a ratio from one run.

    .venv/bin/python -m bench.request_options [--model builtin:tiny] [--tokens 64] [--rounds 5]
        [--baseline-tree ../main]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = [{"role": "user", "content": "Write a short poem about the sea at night."}]


def variants(engine) -> dict[str, dict]:
    """GenerationParams keyword sets; the constraint ones are built lazily (they need the engine)."""
    from daemon.model import grammar
    from daemon.model.constrain import GrammarConstraint
    table = engine.token_table()
    state = grammar.start(grammar.ANY)
    return {
        "default greedy": {"temperature": 0.0},
        "default sampled": {"temperature": 1.0, "seed": 1},
        "logprobs top 5": {"temperature": 1.0, "seed": 1, "top_logprobs": 5},
        "penalties + logit_bias": {"temperature": 1.0, "seed": 1, "presence_penalty": 0.5,
                                   "frequency_penalty": 0.5, "logit_bias": ((11, 2.0), (12, -2.0))},
        "top_k + min_p": {"temperature": 1.0, "seed": 1, "top_k": 40, "min_p": 0.05},
        "json (constrained)": {"temperature": 1.0, "seed": 1,
                               "constraint": lambda: GrammarConstraint(table, engine.eos_ids, state)},
    }


def run_one(engine, params: dict, tokens: int) -> tuple[int, float]:
    """(tokens, seconds of decode) for one generation."""
    from daemon.model.engine import GenerationParams
    gen = engine.generate(PROMPT, GenerationParams(max_new_tokens=tokens, **params))
    for _ in gen:
        pass
    return gen.stats.completion_tokens, gen.stats.duration_s - (gen.stats.ttft_s or 0.0)


def load(model: str, cache_dir: str, tokens: int):
    from daemon.config import Config
    from daemon.model.engine import Engine
    cfg = Config(model=model, cache_dir=cache_dir, warmup=True, kv_cache_bytes=0,
                 max_new_tokens=tokens, min_new_tokens=tokens, session_store="memory")
    return Engine.load(cfg)


def serve_default(model: str, cache_dir: str, tokens: int) -> None:
    """Child mode: load once, then time the default variant once per line read on stdin."""
    engine = load(model, cache_dir, tokens)
    for line in sys.stdin:
        n, s = run_one(engine, json.loads(line), tokens)
        print(json.dumps([n, s]), flush=True)


def baseline(child, rates: dict, tokens: int) -> None:
    """One default greedy generation on the baseline tree (the child process)."""
    child.stdin.write(json.dumps({"temperature": 0.0}) + "\n")
    child.stdin.flush()
    n, s = json.loads(child.stdout.readline())
    rates["baseline tree, default greedy"].append((n - 1) / s)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.request_options", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="builtin:tiny")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--baseline-tree", help="another checkout: its default path runs in the same rounds")
    p.add_argument("--serve-default", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", default=None)
    ns = p.parse_args(argv)
    cache = ns.cache_dir or tempfile.mkdtemp(prefix="edgechat-bench-")
    if ns.serve_default:
        serve_default(ns.model, cache, ns.tokens)
        return 0
    engine = load(ns.model, cache, ns.tokens)
    child = None
    if ns.baseline_tree:
        # the baseline's `daemon` package first on the path; this file loaded by its path
        code = ("import importlib.util, sys; sys.path.insert(0, sys.argv[1]); "
                "spec = importlib.util.spec_from_file_location('bench_options', sys.argv[2]); "
                "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
                "m.main(sys.argv[3:])")
        child = subprocess.Popen([sys.executable, "-c", code, os.path.abspath(ns.baseline_tree),
                                  os.path.abspath(__file__), "--serve-default", "--model", ns.model,
                                  "--tokens", str(ns.tokens), "--cache-dir",
                                  os.path.join(cache, "baseline")],
                                 env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                                 text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=cache)
    todo = variants(engine)
    rates: dict[str, list[float]] = {name: [] for name in todo}
    if child:
        rates["baseline tree, default greedy"] = []
    for i in range(ns.rounds):
        if child and i % 2:  # alternate which tree goes first, so drifting load favours neither
            baseline(child, rates, ns.tokens)
        for name, params in todo.items():
            n, s = run_one(engine, params, ns.tokens)
            rates[name].append((n - 1) / s)
        if child and not i % 2:
            baseline(child, rates, ns.tokens)
    if child:
        child.stdin.close()
        child.wait(60)
    base = statistics.median(rates["default greedy"])
    print(f"model {ns.model}, {ns.tokens} tokens, {ns.rounds} rounds; decode tokens/s (median) and "
          f"ratio to this tree's default greedy")
    for name, values in rates.items():
        med = statistics.median(values)
        print(f"  {name:32s} {med:8.1f} tok/s  x{med / base:5.2f}  (min {min(values):.1f}, "
              f"max {max(values):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
