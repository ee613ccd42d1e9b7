"""Fast turns: a 20-turn conversation, the naive chat loop (bench.naive_loop) vs edgechat's default over HTTP.

One command, four parts, all on builtin:qwen2.5-0.5b-shape with the same new-token count every turn:
1. the conversation, turns interleaved: naive fp32 `generate` on the unbounded history, the same with
   the last 5 turns kept, and a real `python -m daemon serve` at its defaults (KV reuse, block
   trimming, dtype auto, lean decoder), streamed to time the first token;
2. that daemon's KV budget filled with long distinct prompts: RSS against the configured memory limit;
3. the same conversation on a 2-worker daemon sharing sessions: KV hit rate when a turn may land on
   the worker without the cache;
4. prefill and decode tokens/s of every way of running the model tried (bench.decode_options).

    .venv/bin/python -m bench.fast_turns [--turns 20] [--new-tokens 64] [--skip naive,budget,workers,options]
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import http.client
import json
import os
import shutil
import sys
import tempfile
import time

# before torch loads libgomp: the naive loop runs with OpenMP waiters asleep, as `edgechat serve` sets
# it (docs/performance.md: spinning waiters cut decode 3-5x when other jobs share the cores)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


from . import common, decode_options  # noqa: E402
from .naive_loop import NaiveChat  # noqa: E402

LIMIT = 2 << 30  # the configured memory limit: a 2 GB edge device
LLAMA_CPP = (("f32", "187", "19–20"), ("bf16", "326–354", "39–40"), ("Q8_0", "261–265", "53–55"))


def parse_args(argv):
    """The bench's flags."""
    p = argparse.ArgumentParser(prog="python -m bench.fast_turns", description=__doc__.split("\n")[0])
    p.add_argument("--turns", type=int, default=20)
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated every turn (min = max)")
    p.add_argument("--naive-dtype", default="float32", help="the naive loop's dtype (fp32: plain `generate` on CPU)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the options measurement")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: naive, budget, workers, options")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default="bench/results/fast_turns.csv")
    return p.parse_args(argv)


def metrics(d: common.ServedDaemon) -> dict:
    """{(name, labels): value} of the daemon's /metrics (summed over workers by the daemon)."""
    return common.scrape(d.url)


def streamed_turn(d: common.ServedDaemon, session: str, prompt: str, new_tokens: int) -> dict:
    """One session turn streamed over HTTP: wall latency, time to the first text, usage, KV reuse."""
    before = metrics(d).get(("edgechat_kv_cache_reused_tokens_total", ()), 0.0)
    conn = http.client.HTTPConnection("127.0.0.1", d.port, timeout=1800)
    body = json.dumps({"content": prompt, "max_tokens": new_tokens, "temperature": 0, "stream": True})
    started = time.perf_counter()
    conn.request("POST", f"/v1/sessions/{session}/messages", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first, summary = None, None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "delta" in event and first is None:
            first = time.perf_counter()
        elif "usage" in event:
            summary = event
    latency = time.perf_counter() - started
    if resp.status != 200 or summary is None:
        raise RuntimeError(f"{d.name}: turn failed with HTTP {resp.status}")
    cached = metrics(d).get(("edgechat_kv_cache_reused_tokens_total", ()), 0.0) - before
    return {"latency_s": latency, "ttft_s": (first or time.perf_counter()) - started,
            "prompt_tokens": summary["usage"]["prompt_tokens"], "cached_tokens": int(cached),
            "completion_tokens": summary["usage"]["completion_tokens"],
            "history_messages": summary["history"]["messages"]}


def rates(row: dict) -> dict:
    """Prefill tok/s (tokens run fresh / TTFT) and decode tok/s of a turn's row."""
    fresh = row["prompt_tokens"] - row["cached_tokens"]
    decode_s = row["latency_s"] - row["ttft_s"]
    return {"prefill_tok_s": fresh / row["ttft_s"] if row["ttft_s"] > 0 else float("nan"),
            "decode_tok_s": (row["completion_tokens"] - 1) / decode_s if decode_s > 0 else float("nan")}


def daemon_flags(args, cache_dir: str, limit: int = LIMIT) -> list[str]:
    """edgechat's defaults plus what the bench needs: the model, a fixed reply length, the memory limit."""
    n = str(args.new_tokens)
    return ["--model", common.MODEL, "--cache-dir", cache_dir, "--max-new-tokens", n, "--min-new-tokens", n,
            "--memory-limit-bytes", str(limit), "--generation-timeout-s", "1800", "--graceful-timeout-s", "10"]


def conversation(args, cache_dir, workdir, skip, stack) -> tuple[list[dict], dict, common.ServedDaemon]:
    """Part 1: the interleaved 20-turn conversation; returns the rows, notes and the running daemon."""
    info = {}
    loops = {}
    if "naive" not in skip:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from daemon.model.builtin import ensure_built
        from daemon.model.streaming import plain_text_mask
        path = ensure_built(common.MODEL, cache_dir, log=print)
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.naive_dtype)).eval()
        banned = plain_text_mask(tok, model.config.vocab_size, frozenset({tok.eos_token_id}))
        loops = {"naive-unbounded": NaiveChat(model, tok, banned, None, args.new_tokens),
                 "naive-last5": NaiveChat(model, tok, banned, 5, args.new_tokens)}
        info["naive_rss_mb"] = common.rss_mb(os.getpid())
    d = stack.enter_context(common.ServedDaemon("edgechat", workdir, daemon_flags(args, cache_dir)))
    info["edgechat_load_rss_mb"] = common.rss_mb(d.worker_pid)
    session = d.post("/v1/sessions", {})["id"]
    rows = []
    for turn in range(1, args.turns + 1):
        prompt = common.CHAT_PROMPTS[(turn - 1) % len(common.CHAT_PROMPTS)]
        line = []
        for name, loop in loops.items():
            row = {"part": "conversation", "variant": name, "turn": turn, **loop.turn(prompt),
                   "history_messages": len(loop.history), "rss_mb": common.rss_mb(os.getpid())}
            rows.append({**row, **rates(row)})
            line.append(f"{name} {row['latency_s']:.2f}s ({row['prompt_tokens']})")
        row = {"part": "conversation", "variant": "edgechat", "turn": turn,
               **streamed_turn(d, session, prompt, args.new_tokens), "rss_mb": common.rss_mb(d.worker_pid)}
        rows.append({**row, **rates(row)})
        line.append(f"edgechat {row['latency_s']:.2f}s ({row['prompt_tokens']}, {row['cached_tokens']} cached)")
        print(f"turn {turn:>2}: " + " | ".join(line), flush=True)
    loops.clear()
    gc.collect()
    return rows, info, d


def fill_budget(d: common.ServedDaemon, info: dict) -> None:
    """Part 2: distinct ~2500-token prompts until the pool drops caches: by LRU (the budget is full) or
    by a release (the memory watchdog, or the engine's own check, found the service near its limit)."""
    text = " ".join(common.PASSAGES * 3)

    def drops(m: dict) -> dict:
        return {r: m.get(("edgechat_kv_cache_dropped_total", (("reason", r),)), 0.0)
                for r in ("lru", "released", "pressure")}
    start, peak = drops(metrics(d)), (0.0, 0.0)
    for i in range(30):
        d.post("/v1/chat/completions", {"messages": [{"role": "user", "content": f"Document {i}. {text}"}],
                                        "max_tokens": 4, "temperature": 0}, timeout=1800)
        m = metrics(d)
        kv = sum(v for (n, _), v in m.items() if n == "edgechat_kv_cache_bytes")
        peak = max(peak, (kv, common.rss_mb(d.worker_pid)))
        now = drops(m)
        if now["lru"] - start["lru"] >= 2 or now["released"] + now["pressure"] > start["released"] + start["pressure"]:
            break
    m = metrics(d)
    now = drops(m)
    info.update(budget_requests=i + 1, kv_peak=peak[0], kv_peak_rss=peak[1],
                kv_bytes=sum(v for (n, _), v in m.items() if n == "edgechat_kv_cache_bytes"),
                kv_budget=m[("edgechat_kv_cache_budget_bytes", ())],
                **{f"{r}_drops": now[r] - start[r] for r in now},
                full_worker_rss_mb=common.rss_mb(d.worker_pid), full_master_rss_mb=common.rss_mb(d.proc.pid),
                full_worker_peak_mb=common.peak_rss_mb(d.worker_pid),
                service_mb=m.get(("edgechat_service_memory_bytes", ()), float("nan")) / common.MB)


def two_workers(args, cache_dir, workdir) -> dict:
    """Part 3: the conversation on 2 workers sharing the session store; hits and misses. Two copies
    of the model do not fit 2 GB: this one runs under a 4 GB limit (a box for several users)."""
    flags = [*daemon_flags(args, cache_dir, 2 * LIMIT), "--workers", "2"]
    with common.ServedDaemon("two-workers", workdir, flags) as d:
        session = d.post("/v1/sessions", {})["id"]
        lat = [streamed_turn(d, session, common.CHAT_PROMPTS[(t - 1) % len(common.CHAT_PROMPTS)],
                             args.new_tokens) for t in range(1, args.turns + 1)]
        m = metrics(d)
    return {"hits": m[("edgechat_kv_cache_hits_total", ())], "misses": m[("edgechat_kv_cache_misses_total", ())],
            "reused": m[("edgechat_kv_cache_reused_tokens_total", ())],
            "prompt": sum(r["prompt_tokens"] for r in lat), "latency": [r["latency_s"] for r in lat]}


def report(args, rows, info, workers, options) -> str:
    """The Markdown tables for docs/benchmarks.md."""
    conv = [r for r in rows if r["part"] == "conversation"]
    names = [n for n in ("naive-unbounded", "naive-last5", "edgechat") if any(r["variant"] == n for r in conv)]
    by = {(r["variant"], r["turn"]): r for r in conv}
    last, tail = args.turns, range(max(1, args.turns - 4), args.turns + 1)
    out = [common.markdown_table(["turn", *names], [
        [t, *(f"{by[(n, t)]['latency_s']:.2f} s ({by[(n, t)]['prompt_tokens']}"
              + (f", {by[(n, t)]['cached_tokens']} cached)" if n == "edgechat" else ")") for n in names)]
        for t in range(1, last + 1)])]
    summary = []
    for n in names:
        mine = [r for r in conv if r["variant"] == n]
        tail_lat = [by[(n, t)]["latency_s"] for t in tail]
        summary.append([n, f"{by[(n, 1)]['latency_s']:.2f}", f"{by[(n, last)]['latency_s']:.2f}",
                        common.spread(tail_lat), common.ratio(by[(n, last)]["latency_s"], by[(n, 1)]["latency_s"]),
                        common.spread([r["prefill_tok_s"] for r in mine], "{:.0f}"),
                        common.spread([r["decode_tok_s"] for r in mine], "{:.1f}"),
                        f"{mine[0]['rss_mb']:.0f} → {mine[-1]['rss_mb']:.0f}"])
    out.append(common.markdown_table(["loop", "turn 1 s", f"turn {last} s", f"turns {tail[0]}–{last} s, median (p10–p90)",
                                      f"turn {last} / turn 1", "prefill tok/s (fresh tokens / TTFT)",
                                      "decode tok/s", "RSS after turn 1 → last, MB"], summary))
    if "edgechat" in names:
        e = [by[("edgechat", t)]["latency_s"] for t in tail]
        goals = []
        for n in names[:-1]:
            base = [by[(n, t)]["latency_s"] for t in tail]
            goals.append(f"edgechat vs {n}: turn {last} {common.ratio(by[(n, last)]['latency_s'], by[('edgechat', last)]['latency_s'])} "
                         f"faster; median of turns {tail[0]}–{last} {common.ratio(common.median(base), common.median(e))}")
        hits = sum(1 for t in range(2, last + 1) if by[("edgechat", t)]["cached_tokens"] > 0)
        goals.append(f"edgechat KV hits: {hits} of {last - 1} turns after the first; prompt tokens reused "
                     f"{sum(r['cached_tokens'] for r in conv if r['variant'] == 'edgechat')} of "
                     f"{sum(r['prompt_tokens'] for r in conv if r['variant'] == 'edgechat')}")
        out.append("\n".join(f"- {g}" for g in goals))
    if "full_worker_rss_mb" in info:
        out.append(f"- KV budget: after {info['budget_requests']} long prompts the pool held at most "
                   f"{info['kv_peak'] / common.MB:.0f} MB of its {info['kv_budget'] / common.MB:.0f} MB budget "
                   f"(worker RSS then {info['kv_peak_rss']:.0f} MB), now {info['kv_bytes'] / common.MB:.0f} MB; "
                   f"drops: {info['lru_drops']:.0f} LRU, {info['released_drops']:.0f} released (memory watchdog), "
                   f"{info['pressure_drops']:.0f} pressure; worker RSS {info['full_worker_rss_mb']:.0f} MB (peak "
                   f"{info['full_worker_peak_mb']:.0f}), master {info['full_master_rss_mb']:.0f} MB, service memory "
                   f"{info['service_mb']:.0f} MB, against the configured limit {LIMIT / common.MB:.0f} MB; "
                   f"worker RSS after load {info['edgechat_load_rss_mb']:.0f} MB")
    if workers:
        out.append(f"- 2 workers sharing sessions (4 GB limit): {workers['hits']:.0f} hits, {workers['misses']:.0f} misses over "
                   f"{args.turns} turns; {workers['reused']:.0f} of {workers['prompt']} prompt tokens reused; turn "
                   f"latency median {common.spread(workers['latency'])} s")
    if options:
        out.append(decode_options.table(options))
    out.append(common.markdown_table(["llama.cpp (measured earlier, not rerun; 0c1e57098, 2 threads, llama-bench -p 512 -n 64)",
                                      "prompt pp512 tok/s", "generation tg64 tok/s"], LLAMA_CPP))
    return "\n\n".join(out)


def main(argv=None) -> int:
    """Run the parts, print the tables, write the CSV."""
    args = parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    common.exit_on_sigterm()
    cache_dir = args.cache_dir or common.default_cache_dir()
    started = time.monotonic()
    print(f"{common.today()}: {args.turns} turns, {args.new_tokens} new tokens a turn, naive loop in "
          f"{args.naive_dtype}; {common.machine_note()}\n{common.code_note()}", flush=True)
    workdir = tempfile.mkdtemp(prefix="edgechat-fast-")
    workers, options = None, None
    with contextlib.ExitStack() as stack:
        rows, info, daemon = conversation(args, cache_dir, workdir, skip, stack)
        common.write_csv(args.out, rows)
        print(report(args, rows, info, None, None), flush=True)  # each part's result as soon as it is in
        if "budget" not in skip:
            print("filling the KV budget ...", flush=True)
            fill_budget(daemon, info)
            print(report(args, rows, info, None, None).split("\n\n")[-2], flush=True)
        daemon.stop()
    info["load_mid"] = common.machine_note()
    if "workers" not in skip:
        print("2 workers ...", flush=True)
        workers = two_workers(args, cache_dir, workdir)
        print(report(args, rows, info, workers, None).split("\n\n")[-2], flush=True)
    if "options" not in skip:
        print("decode options ...", flush=True)
        options = decode_options.measure(list(decode_options.VARIANTS), args.rounds, cache_dir)
    common.write_csv(args.out, rows)
    print()
    print(report(args, rows, info, workers, options))
    print(f"\nload after part 1: {info['load_mid']}\nload at the end: {common.machine_note()}\n"
          f"wall time {time.monotonic() - started:.0f} s; per-turn CSV: {args.out}")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
