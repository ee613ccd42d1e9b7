"""Scrape cost: /metrics p50/p99 on a real 2-worker daemon holding 1000 sessions (goal: p99 <= 5 ms).

Starts `python -m daemon serve --workers 2` on builtin:tiny, creates the sessions over several
keep-alive connections (so both workers hold some) with a short turn in every 50th, then times
scrapes from the client and, server-side, from the daemon's own
edgechat_http_request_duration_seconds{route="/metrics"} histogram. Two passes: back to back
(a worker refreshes its gauges at most once a second, so most scrapes skip the refresh), and
spaced 1.1 s apart (every scrape refreshes, as with a 15 s Prometheus interval). Then, in this
process against the same multiprocess folder, the collector + generate_latest alone, timed and
profiled once.

    .venv/bin/python -m bench.scrape_cost                 # N=300, 1000 sessions
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time

import psutil
import requests

from bench.common import (ServedDaemon, default_cache_dir, exit_on_sigterm, machine_note,
                          markdown_table, median, percentile, today)

ROUTE = "/metrics"
HIST = "edgechat_http_request_duration_seconds"


def create_sessions(url: str, count: int, turn_every: int, connections: int) -> dict:
    """Create `count` sessions round-robin over keep-alive connections; a turn in every turn_every-th."""
    clients = [requests.Session() for _ in range(connections)]
    turns = misses = 0
    for i in range(count):
        client = clients[i % connections]
        resp = client.post(url + "/v1/sessions", json={}, timeout=30)
        resp.raise_for_status()
        if turn_every and i % turn_every == 0:
            # same connection, so the worker that holds the session (in-memory store) answers
            r = client.post(f"{url}/v1/sessions/{resp.json()['id']}/messages",
                            json={"content": "Hello there!", "max_tokens": 8}, timeout=60)
            turns += r.status_code == 200
            misses += r.status_code == 404  # the connection was re-opened on the other worker
    for client in clients:
        client.close()
    return {"turns": turns, "turn_misses": misses}


def parse(text: str) -> dict:
    """Facts from one exposition: series (sample lines), families, sessions, worker pids, the histogram."""
    from prometheus_client.parser import text_string_to_metric_families
    out = {"series": 0, "families": 0, "sessions": None, "pids": set(), "buckets": {},
           "sum": 0.0, "count": 0.0}
    for family in text_string_to_metric_families(text):
        out["families"] += 1
        for s in family.samples:
            out["series"] += 1
            if s.name == "edgechat_sessions":
                out["sessions"] = s.value
            elif s.name == "edgechat_process_resident_memory_bytes":
                out["pids"].add(s.labels.get("pid"))
            elif s.name.startswith(HIST) and s.labels.get("route") == ROUTE:
                if s.name.endswith("_bucket"):
                    out["buckets"][float(s.labels["le"])] = s.value
                elif s.name.endswith("_sum"):
                    out["sum"] = s.value
                elif s.name.endswith("_count"):
                    out["count"] = s.value
    return out


def server_side(before: dict, after: dict) -> dict:
    """p50/p99 (histogram_quantile-style interpolation), mean and share <= 5 ms of the scrapes between."""
    les = sorted(after["buckets"])
    cum = [after["buckets"][le] - before["buckets"].get(le, 0.0) for le in les]
    total = after["count"] - before["count"]

    def quantile(q: float) -> float:
        rank, prev_le, prev = q * total, 0.0, 0.0
        for le, c in zip(les, cum):
            if c >= rank:
                if le == float("inf"):
                    return prev_le
                return prev_le + (le - prev_le) * ((rank - prev) / (c - prev) if c > prev else 1.0)
            prev_le, prev = le, c
        return float("nan")
    le5 = next((c for le, c in zip(les, cum) if le == 0.005), float("nan"))
    return {"n": total, "p50": quantile(0.5), "p99": quantile(0.99),
            "mean": (after["sum"] - before["sum"]) / total if total else float("nan"),
            "share_le_5ms": le5 / total if total else float("nan")}


def workers_cpu_s(master_pid: int) -> float:
    """User+system CPU seconds used so far by the master's children (the gunicorn workers)."""
    return sum(sum(c.cpu_times()[:2]) for c in psutil.Process(master_pid).children())


def time_scrapes(url: str, n: int, spacing_s: float, master_pid: int) -> tuple[list[float], dict]:
    """n scrapes on one keep-alive connection: client seconds each, and the server-side summary
    (histogram quantiles, and the workers' CPU per scrape: everything they did meanwhile)."""
    client = requests.Session()
    before = parse(client.get(url + ROUTE, timeout=30).text)
    cpu0 = workers_cpu_s(master_pid)
    times = []
    for _ in range(n):
        if spacing_s:
            time.sleep(spacing_s)
        t0 = time.perf_counter()
        resp = client.get(url + ROUTE, timeout=30)
        times.append(time.perf_counter() - t0)
        resp.raise_for_status()
    cpu = workers_cpu_s(master_pid) - cpu0
    after = parse(client.get(url + ROUTE, timeout=30).text)
    client.close()
    return times, {**server_side(before, after), "cpu_per_scrape": cpu / n}


def in_process(folder: str, n: int) -> tuple[dict, dict, str]:
    """Collect + render the daemon's folder here, interleaved: prometheus_client's own collector
    fresh per scrape (the daemon before 154a68c) and one kept LockedMultiProcessCollector (now).
    Returns {variant: (wall s, CPU s)}, the kept one's CPU by stage, and a profile of it."""
    import glob
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector
    from daemon.telemetry.multiproc import LockedMultiProcessCollector, scrape_registry

    def stock():
        registry = CollectorRegistry()
        MultiProcessCollector(registry, folder)
        return registry
    kept = scrape_registry(folder)
    variants = {"prometheus_client collector, fresh per scrape (before)": lambda: generate_latest(stock()),
                "kept LockedMultiProcessCollector (now)": lambda: generate_latest(kept)}
    out = {name: ([], []) for name in variants}
    for _ in range(n):
        for name, scrape in variants.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            scrape()
            out[name][0].append(time.perf_counter() - t0)
            out[name][1].append(time.thread_time() - c0)
    collector = LockedMultiProcessCollector(folder)
    files = glob.glob(os.path.join(folder, "*.db"))
    collector._read(files)  # warm its key cache
    families = list(MultiProcessCollector._accumulate_metrics(collector._read(files), True))
    rendered = CollectorRegistry()
    rendered.register(type("Fixed", (), {"collect": lambda self: families})())
    stages = {"read files + parse keys (cached)": lambda: collector._read(files),
              "merge across pids (accumulate)": lambda: list(
                  MultiProcessCollector._accumulate_metrics(collector._read(files), True)),
              "render text (generate_latest)": lambda: generate_latest(rendered)}
    cpu = {}
    for name, fn in stages.items():
        xs = []
        for _ in range(max(n // 3, 20)):
            c0 = time.thread_time()
            fn()
            xs.append(time.thread_time() - c0)
        cpu[name] = median(xs)
    merge = "merge across pids (accumulate)"
    cpu[merge] -= cpu["read files + parse keys (cached)"]  # timed together, reported apart
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        generate_latest(kept)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(14)
    return out, cpu, buf.getvalue()


def _ms(x: float) -> str:
    return f"{x * 1e3:.2f}"


def main(argv=None) -> int:
    """Start the daemon, fill it, time the scrapes, print markdown."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--turn-every", type=int, default=50, help="a turn in every n-th session")
    p.add_argument("-n", "--scrapes", type=int, default=300)
    p.add_argument("--spaced", type=int, default=30, help="scrapes 1.1 s apart (0: skip that pass)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--cache-dir", default=default_cache_dir())
    args = p.parse_args(argv)
    exit_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="edgechat-scrape-") as tmp:
        daemon = ServedDaemon("scrape", tmp, ["--workers", str(args.workers), "--model", "builtin:tiny",
                                              "--cache-dir", args.cache_dir, "--threads", "1",
                                              "--log-level", "WARNING"])
        folder = os.path.join(tmp, "scrape", "metrics")
        with daemon:
            one = create_sessions(daemon.url, 1, 1, connections=1)  # every route and label set once
            requests.get(daemon.url + ROUTE, timeout=30)  # a scrape's own series appear after it
            first = parse(requests.get(daemon.url + ROUTE, timeout=30).text)
            made = create_sessions(daemon.url, args.sessions - 1, args.turn_every, connections=4)
            made["turns"] += one["turns"]
            for _ in range(10):  # warm both workers' scrape paths
                requests.get(daemon.url + ROUTE, timeout=30)
            load_before = machine_note()
            fast, fast_srv = time_scrapes(daemon.url, args.scrapes, 0.0, daemon.proc.pid)
            load_after = machine_note()
            spaced = time_scrapes(daemon.url, args.spaced, 1.1, daemon.proc.pid) if args.spaced else None
            full = parse(requests.get(daemon.url + ROUTE, timeout=30).text)
            files = sorted(os.listdir(folder))
            size = sum(os.path.getsize(os.path.join(folder, f)) for f in files)
            # in-process, on the live folder: prometheus_client picks its value class at import
            from daemon.telemetry.multiproc import MULTIPROC_ENV
            os.environ[MULTIPROC_ENV] = folder
            local, stages, profile = in_process(folder, args.scrapes)
    rows = [("back to back, client", len(fast), _ms(median(fast)), _ms(percentile(fast, 99)),
             _ms(max(fast)), "")]
    rows.append(("back to back, server histogram", int(fast_srv["n"]), _ms(fast_srv["p50"]),
                 _ms(fast_srv["p99"]), "", f"{fast_srv['share_le_5ms'] * 100:.1f} %",
                 _ms(fast_srv["cpu_per_scrape"])))
    if spaced:
        times, srv = spaced
        rows.append(("1.1 s apart, client", len(times), _ms(median(times)), _ms(percentile(times, 99)),
                     _ms(max(times)), ""))
        rows.append(("1.1 s apart, server histogram", int(srv["n"]), _ms(srv["p50"]), _ms(srv["p99"]), "",
                     f"{srv['share_le_5ms'] * 100:.1f} %"))  # CPU: the 5 s sampler would swamp it
    for name, (wall, cpu) in local.items():
        for kind, xs in (("wall", wall), ("CPU", cpu)):
            rows.append((f"in-process, {name}, {kind}", len(xs), _ms(median(xs)), _ms(percentile(xs, 99)),
                         _ms(max(xs))))
    print(f"scrape cost, {today()}: {args.workers} workers, builtin:tiny, {args.sessions} sessions "
          f"({made['turns']} with a turn, {made['turn_misses']} turns missed their worker)\n")
    rows = [row + ("",) * (7 - len(row)) for row in rows]
    print(markdown_table(("scrapes", "n", "p50 ms", "p99 ms", "max ms", "server ≤ 5 ms",
                          "workers' CPU ms / scrape"), rows))
    print(f"\nseries (sample lines): {first['series']} with 1 session, {full['series']} with "
          f"{full['sessions']:.0f} sessions; {full['families']} families; worker pids in the scrape: "
          f"{len(full['pids'] - {None})}; folder: {len(files)} files, {size / 1024:.0f} KiB")
    print(f"load during the back-to-back pass: before {load_before}; after {load_after}\n")
    print("where a kept collector's scrape CPU goes (median ms): " + "; ".join(
        f"{name} {_ms(x)}" for name, x in stages.items()) + "\n")
    print("profile of 50 in-process scrapes (tottime):\n```\n" + profile.strip() + "\n```")
    return 0


if __name__ == "__main__":
    sys.exit(main())
