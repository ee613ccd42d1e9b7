"""What hostile clients cost a real daemon: slow senders beside normal clients, oversized prompts.

Two parts, each against its own baseline in the same run, on builtin:tiny (the model is not what
is measured):

1. Slow clients: latency of /healthz and of a 2-token completion with no other client, then with
   N sockets open that send their request head one byte every 0.25 s (never finishing before the
   read deadline), interleaved round by round. Reported: medians and the ratio, worker RSS.
2. Oversized prompts: 100 chat completions of a 900 KB prompt ("x " * 450000) refused with 400;
   milliseconds per refusal, characters the tokenizer read (in-process, bounded vs whole), and the
   worker's RSS before and after the 100 (over HTTP, the daemon as shipped).

    .venv/bin/python -m bench.hostile_clients [--slow 60] [--rounds 20] [--prompts 100]
"""
from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time

from bench.common import (ServedDaemon, code_note, default_cache_dir, machine_note, median,
                          rss_mb, today)

HUGE = {"messages": [{"role": "user", "content": "x " * 450_000}], "max_tokens": 2}
SHORT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def cpu_model() -> str:
    """lscpu's "Model name" (from /proc/cpuinfo)."""
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1000


def post(url: str, body: bytes, expect: int) -> None:
    import urllib.error
    import urllib.request
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            status = resp.status
            resp.read()
    except urllib.error.HTTPError as err:
        status = err.code
        err.read()
    if status != expect:
        raise RuntimeError(f"{url}: {status}, expected {expect}")


def get(url: str) -> None:
    import urllib.request
    with urllib.request.urlopen(url, timeout=120) as resp:
        resp.read()


def slow_clients(d: ServedDaemon, count: int, rounds: int) -> dict:
    """Normal requests' latency alone and beside `count` slow senders, interleaved."""
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
    short = json.dumps(SHORT).encode()
    alone = {"healthz": [], "turn": []}
    beside = {"healthz": [], "turn": []}
    for _ in range(rounds):
        alone["healthz"].append(timed(lambda: get(d.url + "/healthz")))
        alone["turn"].append(timed(lambda: post(d.url + "/v1/chat/completions", short, 200)))
        socks = [socket.create_connection(("127.0.0.1", d.port), timeout=30) for _ in range(count)]
        stop = threading.Event()

        def trickle() -> None:
            for i in range(len(head)):
                for s in socks:
                    try:
                        s.send(head[i:i + 1])
                    except OSError:
                        pass
                if stop.wait(0.25):
                    return
        sender = threading.Thread(target=trickle, daemon=True)
        sender.start()
        time.sleep(0.5)  # every slow client has started its head
        beside["healthz"].append(timed(lambda: get(d.url + "/healthz")))
        beside["turn"].append(timed(lambda: post(d.url + "/v1/chat/completions", short, 200)))
        rss = rss_mb(d.worker_pid)
        stop.set()
        sender.join()
        for s in socks:
            s.close()
    return {"alone": {k: median(v) for k, v in alone.items()},
            "beside": {k: median(v) for k, v in beside.items()}, "worker_rss_mb": rss}


def oversized_http(d: ServedDaemon, prompts: int) -> dict:
    body = json.dumps(HUGE).encode()
    for _ in range(3):  # the first large requests size the allocator's arenas
        post(d.url + "/v1/chat/completions", body, 400)
    before = rss_mb(d.worker_pid)
    times = [timed(lambda: post(d.url + "/v1/chat/completions", body, 400)) for _ in range(prompts)]
    get(d.url + "/healthz")
    return {"ms_median": median(times), "rss_before_mb": before, "rss_after_mb": rss_mb(d.worker_pid)}


def oversized_in_process(cache_dir: str, repeats: int = 5) -> dict:
    """count_tokens with the context as its limit (as served) against the whole prompt tokenized."""
    from daemon.config import Config
    from daemon.model.engine import Engine
    engine = Engine.load(Config(model="builtin:tiny", cache_dir=cache_dir, threads=1, warmup=False))
    messages = HUGE["messages"]
    out = {}
    for name, limit in (("bounded", engine.context_length), ("whole", None)):
        times = [timed(lambda: engine.count_tokens(messages, limit=limit)) for _ in range(repeats)]
        out[name] = {"ms": median(times), "chars_read": engine.last_count.chars_read}
        engine.give_back_memory()
    engine.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slow", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=100)
    args = parser.parse_args()
    cache = default_cache_dir()
    print(f"# {today()}, {cpu_model()}, {machine_note()}, {code_note()}")
    local = oversized_in_process(cache)
    b, w = local["bounded"], local["whole"]
    print(f"count_tokens of a 900 KB prompt: bounded {b['ms']:.0f} ms, {b['chars_read']} chars read; "
          f"whole {w['ms']:.0f} ms, {w['chars_read']} chars; time ratio x{w['ms'] / b['ms']:.1f}")
    with tempfile.TemporaryDirectory() as work:
        with ServedDaemon("hostile", work, ["--model", "builtin:tiny", "--cache-dir", cache,
                                            "--threads", "1", "--max-new-tokens", "8",
                                            "--request-read-timeout-s", "30"]) as d:
            slow = slow_clients(d, args.slow, args.rounds)
            big = oversized_http(d, args.prompts)
    for what in ("healthz", "turn"):
        a, s = slow["alone"][what], slow["beside"][what]
        print(f"{what}: alone {a:.1f} ms, beside {args.slow} slow clients {s:.1f} ms (x{s / a:.2f})")
    print(f"worker RSS with {args.slow} slow clients open: {slow['worker_rss_mb']:.0f} MB")
    print(f"{args.prompts} x 900 KB prompts refused: {big['ms_median']:.0f} ms each (median); worker RSS "
          f"{big['rss_before_mb']:.0f} -> {big['rss_after_mb']:.0f} MB "
          f"({big['rss_after_mb'] - big['rss_before_mb']:+.0f} MB)")


if __name__ == "__main__":
    main()
