"""Session store overhead per turn: SQLite and Redis against the in-memory store, and against a real turn.

What a turn asks of its store is measured directly, in one process run: `store.turn()` (take the
session's lease, load and trim the history — the tokenizer counts the prompt), `commit()` (write the
turn), closing the turn (drop the lease) and the `stats()` the API reads after every turn. The three
stores run interleaved, round by round in a shuffled order, each on a steady-state session (history
full at max_history_turns) among `--sessions` other sessions, with the served model's own tokenizer.
The same run then times real turns of `--model` (greedy, exactly --new-tokens tokens, same history).

Why not two daemons and end-to-end turn latency: on this shared 2-core box a 0.5B turn varies by
several percent from run to run, far more than the effect sought (< 1 %), so an A/B of whole turns
would measure the noise. Timing the store calls themselves is exact; dividing by the measured turn
gives the share. SQLite commits with synchronous=FULL (one fsync per turn) on the disk given by
--dir; Redis is a local redis-server started here (loopback, no persistence) and stopped at exit.

    .venv/bin/python -m bench.session_store                 # ~1 min: model load + a few turns
    .venv/bin/python -m bench.session_store --rounds 100 --model-turns 2
"""
from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time

from bench.common import (MODEL, code_note, default_cache_dir, exit_on_sigterm, free_port, machine_note,
                          median, percentile, today)

BACKENDS = ("memory", "sqlite", "redis")
USER = ("Here is what I need next: rewrite the paragraph above so it reads well aloud, keep the "
        "numbers, and end with one short question for the reader.")


class OpTimes:
    """A store listener that keeps every on_store_op duration by operation."""

    def __init__(self):
        self.times: dict[str, list[float]] = {}

    def on_truncate(self, reason, messages):
        """Not measured."""

    def on_evict(self, reason, sessions):
        """Not measured."""

    def on_store_op(self, operation, seconds):
        """Keep the duration."""
        self.times.setdefault(operation, []).append(seconds)


def start_redis(folder: str) -> tuple[subprocess.Popen, str]:
    """A private redis-server on a free loopback port; (process, URL)."""
    import redis
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", folder], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(200):
        try:
            redis.Redis.from_url(url).ping()
            return proc, url
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def reply_text(i: int) -> str:
    """A ~60-word assistant reply, different every turn."""
    return " ".join(f"word{(i * 7 + k) % 97}" for k in range(60))


def fill(store, sessions: int, history_turns: int) -> str:
    """`sessions` idle sessions plus the measured one, all with full histories; the measured id."""
    real, store.count_tokens = store.count_tokens, lambda ms: 4 * len(ms)  # filling need not tokenize
    try:
        ids = [store.create(None, system="You are a helpful assistant.").id for _ in range(sessions + 1)]
        for sid in ids:
            for i in range(history_turns):
                with store.turn(sid, None, USER) as t:
                    t.commit(reply_text(i))
    finally:
        store.count_tokens = real
    return ids[-1]


def store_round(store, sid: str, i: int) -> float:
    """One turn's store work, as the API does it; seconds."""
    t0 = time.perf_counter()
    with store.turn(sid, None, USER) as t:
        t.commit(reply_text(i))
    store.stats()
    return time.perf_counter() - t0


def model_turns(engine, prompt: list[dict], n: int, new_tokens: int) -> list[float]:
    """Wall seconds of n greedy turns of exactly new_tokens tokens on this prompt."""
    from daemon.model.streaming import GenerationParams
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        gen = engine.generate(prompt, GenerationParams(max_new_tokens=new_tokens, temperature=0.0))
        for _piece in gen:
            pass
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    """Run the bench and print a markdown section for docs/benchmarks.md."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=MODEL)
    p.add_argument("--rounds", type=int, default=200, help="store turns per backend")
    p.add_argument("--sessions", type=int, default=300, help="other sessions in each store")
    p.add_argument("--model-turns", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--dir", default=None, help="folder for the SQLite file (default: a temp folder)")
    args = p.parse_args(argv)
    exit_on_sigterm()
    if shutil.which("redis-server") is None:
        print("redis-server is not installed (make test-deps)", file=sys.stderr)
        return 2

    from daemon.config import Config
    from daemon.model.engine import Engine
    from daemon.sessions import HistoryPolicy, make_store
    cfg = Config(model=args.model, cache_dir=default_cache_dir(), min_new_tokens=args.new_tokens,
                 max_new_tokens=max(args.new_tokens, 64))
    t0 = time.perf_counter()
    engine = Engine.load(cfg)
    load_s = time.perf_counter() - t0
    policy = HistoryPolicy(cfg.max_history_turns, engine.context_length - cfg.max_new_tokens,
                           cfg.session_ttl_s, cfg.max_sessions)
    folder = tempfile.mkdtemp(prefix="edgechat-bench-", dir=args.dir)
    redis_proc, redis_url = start_redis(folder)
    urls = {"memory": "memory", "sqlite": f"sqlite://{folder}/sessions.db", "redis": redis_url}
    listeners = {name: OpTimes() for name in BACKENDS}
    try:
        stores = {name: make_store(policy, engine.count_tokens, url=urls[name], listener=listeners[name])
                  for name in BACKENDS}
        sids = {name: fill(stores[name], args.sessions, cfg.max_history_turns) for name in BACKENDS}
        for listener in listeners.values():
            listener.times.clear()
        times: dict[str, list[float]] = {name: [] for name in BACKENDS}
        rng = random.Random(7)
        for i in range(args.rounds):
            order = list(BACKENDS)
            rng.shuffle(order)
            for name in order:
                times[name].append(store_round(stores[name], sids[name], i))
        prompt = stores["memory"].get(sids["memory"], None)
        messages = [{"role": "system", "content": prompt.system}, *prompt.messages,
                    {"role": "user", "content": USER}]
        turns = model_turns(engine, messages, args.model_turns, args.new_tokens)
        size_kb = stores["sqlite"].file_bytes() / 1024
        for store in stores.values():
            store.close()
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)

    turn_s = median(turns)
    base = median(times["memory"])
    ms = lambda v: f"{v * 1000:.2f}"  # noqa: E731
    print(f"## Session store overhead\n\n`.venv/bin/python -m bench.session_store --rounds {args.rounds} "
          f"--sessions {args.sessions} --model-turns {args.model_turns} --new-tokens {args.new_tokens}` "
          f"— {today()}, {code_note()}; {machine_note()}.\n")
    print(f"A turn's store work (lease + load + trim with the real tokenizer, commit, release, the "
          f"stats() read after the turn), {args.rounds} rounds per store interleaved, each store holding "
          f"{args.sessions + 1} sessions with full {cfg.max_history_turns}-turn histories. Against one "
          f"{args.model} turn measured in the same run: {args.new_tokens} new tokens on the same history, "
          f"median of {len(turns)} = {turn_s:.2f} s (model load {load_s:.0f} s). SQLite file + WAL at the end: "
          f"{size_kb:.0f} KiB.\n")
    print("| store | ms per turn, median (p10–p90) | minus memory, ms | share of a turn | acquire / commit / "
          "release / stats, ms (medians) |")
    print("| --- | --- | --- | --- | --- |")
    for name in BACKENDS:
        v = times[name]
        ops = " / ".join(ms(median(listeners[name].times.get(op, [0.0])))
                         for op in ("acquire", "commit", "release", "stats"))
        extra = median(v) - base
        print(f"| {name} | {ms(median(v))} ({ms(percentile(v, 10))}–{ms(percentile(v, 90))}) | "
              f"{'—' if name == 'memory' else ms(extra)} | "
              f"{median(v) / turn_s:.3%} (over memory {'—' if name == 'memory' else f'{extra / turn_s:.3%}'}) "
              f"| {ops} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
