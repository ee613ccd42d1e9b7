"""Many chats at once: N clients over HTTP against one daemon, beside llama.cpp in the same run.

For N = 1, 2, 4, 8 clients, each asks `--requests` streamed completions of exactly `--new` tokens
(different prompts; the daemon runs with min_new_tokens = new so every reply has that length). Reported
per N: aggregate decode tok/s from the daemon's own stats (tokens / time of the steps in which all N
generations decoded, /v1/stats batch.decode_steps), end-to-end tok/s (every generated token / wall time,
prefill and HTTP included), TTFT p50/p95 and per-client tok/s as the clients saw them, refusals (503),
worker RSS. Prompt speed: raw prompts of 32 and 128 tokens with max_tokens 1 (tokens / TTFT).

With --llama-dir (bench/llamacpp/build.sh's output folder), in the same run and at the same precision:
`llama-batched-bench -npp 32 -ntg NEW -npl 1,2,4,8` (S_TG: decode only; S: end to end), `llama-bench -p
32,128 -n 0`, and `llama-server` (its default slots, continuous batching) driven by the same HTTP client.

    python -m bench.concurrency [--quantize int8] [--clients 1,2,4,8] [--llama-dir DIR] [--baseline DIR]

--baseline DIR: also serve every N from another checkout of edgechat (e.g. the commit before a
change), so "single-stream decode vs today's" is measured in the same run.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from urllib.parse import urlsplit

from bench import common

PEERS = {"none": ("q05-bf16.gguf", "BF16"), "int8": ("q05-q8_0.gguf", "Q8_0"), "int4": ("q05-q4_k_m.gguf", "Q4_K_M")}
PROMPT_SIZES = (32, 128)


def stream_completion(url: str, body: dict, timeout: float = 600.0) -> dict:
    """POST a streamed chat completion; {status, ttft, seconds, tokens} as this client saw it."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    started = time.monotonic()
    ttft, tokens, usage, timings = None, 0, None, None
    try:
        conn.request("POST", parts.path, json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            resp.read()
            return {"status": resp.status, "ttft": None, "seconds": time.monotonic() - started, "tokens": 0}
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            for choice in event.get("choices") or ():
                text = (choice.get("delta") or {}).get("content") or choice.get("text")
                if text:
                    tokens += 1
                    if ttft is None:
                        ttft = time.monotonic() - started
            usage = event.get("usage") or usage
            timings = event.get("timings") or timings
    finally:
        conn.close()
    if usage and usage.get("completion_tokens"):
        tokens = usage["completion_tokens"]
    if timings and timings.get("prompt_ms") is not None:
        # llama-server streams no text for tokens that decode to nothing (random weights): its own prompt
        # time stands in for the first token's arrival
        ttft = timings["prompt_ms"] / 1000
    return {"status": 200, "ttft": ttft, "seconds": time.monotonic() - started, "tokens": tokens}


def drive(url: str, clients: int, requests: int, new: int, extra: dict, tag: int) -> dict:
    """`clients` threads, each `requests` completions in a row; per-request results and the wall time."""
    results: list[dict] = []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(requests):
            prompt = common.CHAT_PROMPTS[(tag * 7 + c * requests + r) % len(common.CHAT_PROMPTS)]
            body = {"messages": [{"role": "user", "content": f"({tag}.{c}.{r}) {prompt}"}], "max_tokens": new,
                    "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **extra}
            got = stream_completion(url + "/v1/chat/completions", body)
            with lock:
                results.append(got)
    started = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"results": results, "wall": time.monotonic() - started}


def summarize(run: dict, clients: int) -> dict:
    """E2E tok/s, TTFT p50/p95, per-client decode tok/s, refusals."""
    ok = [r for r in run["results"] if r["status"] == 200]
    tokens = sum(r["tokens"] for r in ok)
    decode_rates = [(r["tokens"] - 1) / (r["seconds"] - r["ttft"]) for r in ok
                    if r["ttft"] is not None and r["tokens"] > 1 and r["seconds"] > r["ttft"]]
    return {"clients": clients, "e2e": tokens / run["wall"], "ttft_p50": common.median(r["ttft"] for r in ok if r["ttft"]),
            "ttft_p95": common.percentile((r["ttft"] for r in ok if r["ttft"]), 95),
            "per_client": common.median(decode_rates), "refused": len(run["results"]) - len(ok),
            "requests": len(run["results"]), "median_request": common.median(r["seconds"] for r in ok)}


def decode_rate(daemon: common.ServedDaemon, before: dict, n: int) -> float:
    """Tokens per second of the steps in which exactly n generations decoded since `before`."""
    after = common.http_json("GET", daemon.url + "/v1/stats")[1]["batch"]["decode_steps"]
    now, then = after.get(str(n)), before.get(str(n))
    if not now:
        return float("nan")
    steps = now["steps"] - (then["steps"] if then else 0)
    seconds = now["seconds"] - (then["seconds"] if then else 0)
    return n * steps / seconds if seconds > 0 else float("nan")


TTFT = "edgechat_time_to_first_token_seconds"


def prompt_speed(url: str, tokenizer_url: str, size: int, repeats: int = 3) -> tuple[float, float]:
    """Prefill tok/s of raw prompts of exactly `size` tokens (distinct each time: no KV reuse), max_tokens 1:
    as the client saw it (HTTP, tokenizing included), and from the daemon's own time to first token
    (admission to the first token: the prefill step and its sampling)."""
    rates = []
    before = common.scrape(url)
    for r in range(repeats):
        text = " ".join(f"w{(r * 7919 + i * 104729) % 99991}" for i in range(size * 2))
        ids = common.http_json("POST", tokenizer_url, {"prompt": text})[1]["tokens"][:size]
        prompt = common.http_json("POST", tokenizer_url.replace("/tokenize", "/detokenize"), {"tokens": ids})[1]["prompt"]
        got = stream_completion(url + "/v1/completions", {"prompt": prompt, "max_tokens": 1, "stream": True,
                                                          "temperature": 0})
        if got["status"] == 200 and got["ttft"]:
            rates.append(size / got["ttft"])
    after = common.scrape(url)
    count = after[(TTFT + "_count", ())] - before[(TTFT + "_count", ())]
    seconds = after[(TTFT + "_sum", ())] - before[(TTFT + "_sum", ())]
    return common.median(rates), size * count / seconds if seconds > 0 else float("nan")


def run_edgechat(name: str, workdir: str, args: list[str], clients: list[int], requests: int, new: int,
                 repo: str = common.REPO, prompts: bool = True) -> dict:
    """Serve the 0.5B shape, drive every N, measure prompt speed; {rows, prompt, rss}."""
    daemon = common.ServedDaemon(name, workdir, ["--model", common.MODEL, "--min-new-tokens", str(new), *args],
                                 repo=repo)
    rows = []
    with daemon:
        drive(daemon.url, 1, 1, 8, {}, 999)  # a first request outside the figures
        for i, n in enumerate(clients):
            stats = common.http_json("GET", daemon.url + "/v1/stats")[1].get("batch", {})
            row = summarize(drive(daemon.url, n, requests, new, {}, i), n)
            row["decode"] = decode_rate(daemon, stats.get("decode_steps", {}), n) if stats else float("nan")
            row["rss_mb"] = common.rss_mb(daemon.worker_pid)
            row["peak_mb"] = common.peak_rss_mb(daemon.worker_pid)
            rows.append(row)
            print(f"  {name} N={n}: decode {row['decode']:.1f} tok/s, e2e {row['e2e']:.1f}, TTFT p50 "
                  f"{row['ttft_p50']:.2f} s, refused {row['refused']}/{row['requests']}, RSS {row['rss_mb']:.0f} MB",
                  flush=True)
        prompt = {size: prompt_speed(daemon.url, daemon.url + "/tokenize", size) for size in PROMPT_SIZES} \
            if prompts else {}
    return {"rows": rows, "prompt": prompt}


def llama_batched(bin_dir: str, gguf: str, new: int, clients: list[int], threads: int) -> dict[int, dict]:
    """llama-batched-bench's S_TG (decode) and S (end to end) per parallel sequences."""
    cmd = [os.path.join(bin_dir, "llama-batched-bench"), "-m", gguf, "-npp", "32", "-ntg", str(new),
           "-npl", ",".join(map(str, clients)), "-t", str(threads), "-c", "4096"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=True).stdout
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[2].isdigit():
            rows[int(cells[2])] = {"s_pp": float(cells[5]), "s_tg": float(cells[7]), "s": float(cells[9])}
    return rows


def llama_prompts(bin_dir: str, gguf: str, threads: int) -> dict[int, float]:
    """llama-bench's pp32 and pp128 tok/s."""
    cmd = [os.path.join(bin_dir, "llama-bench"), "-m", gguf, "-p", ",".join(map(str, PROMPT_SIZES)), "-n", "0",
           "-t", str(threads), "-r", "3", "-o", "json"]
    rows = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=True).stdout)
    return {r["n_prompt"]: r["avg_ts"] for r in rows}


def run_llama_server(bin_dir: str, gguf: str, workdir: str, clients: list[int], requests: int, new: int,
                     threads: int) -> list[dict]:
    """llama-server with its default slots, the same client (ignore_eos: replies of exactly `new` tokens)."""
    port = common.free_port()
    log = open(os.path.join(workdir, "llama-server.log"), "wb")
    proc = subprocess.Popen([os.path.join(bin_dir, "llama-server"), "-m", gguf, "-t", str(threads), "-c", "4096",
                             "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        deadline = time.monotonic() + 300
        while not _up(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("llama-server did not start; see llama-server.log")
            time.sleep(0.5)
        drive(url, 1, 1, 8, {"ignore_eos": True}, 999)
        for i, n in enumerate(clients):
            row = summarize(drive(url, n, requests, new, {"ignore_eos": True}, i), n)
            rows.append(row)
            print(f"  llama-server N={n}: e2e {row['e2e']:.1f} tok/s, TTFT p50 {row['ttft_p50']:.2f} s, "
                  f"refused {row['refused']}/{row['requests']}", flush=True)
    finally:
        common.stop_process(proc, 30)
        log.close()
    return rows


def _up(url: str) -> bool:
    """Whether llama-server answers /health with 200 (it says 503 while loading)."""
    try:
        return common.http_json("GET", url + "/health", timeout=5)[0] == 200
    except (OSError, ValueError):
        return False


def report(args, ours: dict, base: dict | None, peer: dict | None) -> str:
    """Markdown tables: per N, ours against llama.cpp's same-run figures."""
    precision = PEERS[args.quantize][1]
    lines = []
    headers = ["clients", "decode tok/s (daemon stats)", "e2e tok/s (HTTP)", "TTFT p50 / p95 s",
               "per-client tok/s", "refused", "worker RSS MB"]
    if peer:
        headers += [f"llama.cpp {precision} S_TG", "decode / S_TG", "e2e / S_TG", "llama-server e2e tok/s",
                    "e2e / llama-server"]
    rows = []
    for i, r in enumerate(ours["rows"]):
        row = [r["clients"], f"{r['decode']:.1f}", f"{r['e2e']:.1f}", f"{r['ttft_p50']:.2f} / {r['ttft_p95']:.2f}",
               f"{r['per_client']:.1f}", f"{r['refused']} of {r['requests']}", f"{r['rss_mb']:.0f}"]
        if peer:
            b = peer["batched"].get(r["clients"], {})
            s = peer["server"][i] if i < len(peer["server"]) else {}
            row += [f"{b.get('s_tg', float('nan')):.1f}", common.ratio(r["decode"], b.get("s_tg", 0)),
                    common.ratio(r["e2e"], b.get("s_tg", 0)), f"{s.get('e2e', float('nan')):.1f}",
                    common.ratio(r["e2e"], s.get("e2e", 0))]
        rows.append(row)
    lines.append(common.markdown_table(headers, rows))
    p_headers = ["prompt tokens", "edgechat tok/s (HTTP, max_tokens 1)", "edgechat tok/s (daemon's TTFT)"]
    nan = (float("nan"), float("nan"))
    p_rows = [[size, f"{ours['prompt'].get(size, nan)[0]:.1f}", f"{ours['prompt'].get(size, nan)[1]:.1f}"]
              for size in PROMPT_SIZES]
    if peer:
        p_headers += [f"llama.cpp {precision} pp (llama-bench)", "HTTP / pp", "daemon / pp"]
        for row, size in zip(p_rows, PROMPT_SIZES):
            pp = peer["prompts"].get(size, 0)
            http_rate, daemon_rate = ours["prompt"].get(size, (0, 0))
            row += [f"{pp:.1f}", common.ratio(http_rate, pp), common.ratio(daemon_rate, pp)]
    lines += ["", common.markdown_table(p_headers, p_rows)]
    if base:  # the baseline may predate the daemon's batch stats: both sides as the clients saw them
        b_rows = []
        for new_row, old_row in zip(ours["rows"], base["rows"]):
            b_rows.append([new_row["clients"], f"{old_row['per_client']:.1f}", f"{new_row['per_client']:.1f}",
                           common.ratio(new_row["per_client"], old_row["per_client"]), f"{old_row['e2e']:.1f}",
                           f"{new_row['e2e']:.1f}", common.ratio(new_row["e2e"], old_row["e2e"]),
                           f"{old_row['refused']} of {old_row['requests']}"])
        lines += ["", common.markdown_table(["clients", "baseline per-client decode tok/s", "this", "ratio",
                                             "baseline e2e tok/s", "this", "ratio", "baseline refused"], b_rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quantize", default="none", choices=tuple(PEERS))
    p.add_argument("--clients", default="1,2,4,8")
    p.add_argument("--requests", type=int, default=3, help="completions per client")
    p.add_argument("--new", type=int, default=64, help="tokens per completion")
    p.add_argument("--llama-dir", default=None, help="bench/llamacpp/build.sh's output (build/bin, gguf)")
    p.add_argument("--baseline", default=None, help="another edgechat checkout served for comparison")
    p.add_argument("--args", default="", help="extra flags for `edgechat serve`")
    p.add_argument("--out", default=None, help="write the Markdown tables here too")
    args = p.parse_args(argv)
    common.exit_on_sigterm()
    from daemon.model.cpu import physical_cores
    threads = physical_cores()
    clients = [int(c) for c in args.clients.split(",")]
    serve = (["--quantize", args.quantize] if args.quantize != "none" else []) + args.args.split()
    print(f"# bench.concurrency {common.today()}: {common.machine_note()}; {common.code_note()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="edgechat-concurrency-") as workdir:
        peer = None
        if args.llama_dir:
            bin_dir, gguf = os.path.join(args.llama_dir, "build", "bin"), os.path.join(args.llama_dir, "gguf",
                                                                                         PEERS[args.quantize][0])
            print("llama.cpp: llama-batched-bench, llama-bench, llama-server ...", flush=True)
            peer = {"batched": llama_batched(bin_dir, gguf, args.new, clients, threads),
                    "prompts": llama_prompts(bin_dir, gguf, threads)}
            peer["server"] = run_llama_server(bin_dir, gguf, workdir, clients, args.requests, args.new, threads)
        ours = run_edgechat("edgechat", workdir, serve, clients, args.requests, args.new)
        base = None
        if args.baseline:
            base = run_edgechat("baseline", workdir, serve, clients, args.requests, args.new,
                                repo=os.path.abspath(args.baseline), prompts=False)
    text = report(args, ours, base, peer)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
