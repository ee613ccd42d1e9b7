"""`edgechat memwatch`: watch a process's or daemon's memory and its trend; exit 3 when it leaks.

A classic monitor script prints RSS and VMS every 5 s and left the judging to a person;
this prints RSS, USS and VMS with the least-squares slope over a sliding window and exits non-zero
as soon as that slope passes a threshold, so a script or cron job can act on it.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import deque

from .memsample import MB, SampleError, sample_metrics, sample_pid, slope_per_minute

EXIT_LEAK = 3     # the slope passed --threshold-mb-per-min
EXIT_TARGET = 4   # the process exited or the daemon stopped answering


def add_parsers(sub) -> None:
    """Register `memwatch`."""
    p = sub.add_parser("memwatch", help="watch memory and its slope; exit 3 when it grows too fast",
                       description="Sample RSS, USS and VMS of a process tree (--pid) or of a daemon's "
                                   "workers (--url, from /metrics) and print the least-squares slope "
                                   f"over a sliding window. Exit codes: {EXIT_LEAK} = slope above the "
                                   f"threshold, {EXIT_TARGET} = target gone, 0 = otherwise.")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--pid", type=int, help="process to watch, with its descendants (e.g. the gunicorn master)")
    target.add_argument("--url", help="daemon base URL; sums edgechat_process_*_memory_bytes over workers")
    p.add_argument("--metrics-path", default="/metrics", help="with --url (default: %(default)s)")
    p.add_argument("--no-children", action="store_true", help="with --pid: that process only")
    p.add_argument("--interval", type=_positive, default=5.0, metavar="S", help="seconds between samples (default: %(default)s)")
    p.add_argument("--window", type=_positive, default=300.0, metavar="S",
                   help="sliding window of the slope, seconds; judged once the window is full (default: %(default)s)")
    p.add_argument("--duration", type=_positive, default=None, metavar="S", help="stop after S seconds (default: until Ctrl-C)")
    p.add_argument("--threshold-mb-per-min", type=float, default=None, metavar="MB",
                   help=f"exit {EXIT_LEAK} when the RSS slope over a full window exceeds this")
    p.set_defaults(func=run)


def _positive(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {raw}")
    return value


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / MB:.1f}"


def run(ns: argparse.Namespace) -> int:
    """Sample until the duration ends (0), the slope passes the threshold (3), or the target goes (4)."""
    sample = (lambda: sample_pid(ns.pid, children=not ns.no_children)) if ns.pid else \
        (lambda: sample_metrics(ns.url, ns.metrics_path))
    window: deque = deque()
    start = time.monotonic()
    print(f"{'time':>8} {'rss_mb':>9} {'uss_mb':>9} {'vms_mb':>10} {'slope_mb_per_min':>17}", flush=True)
    while True:
        now = time.monotonic()
        try:
            s = sample()
        except SampleError as exc:
            print(f"edgechat memwatch: {exc}", file=sys.stderr)
            return EXIT_TARGET
        window.append((now, s.rss / MB))
        while window and window[0][0] < now - ns.window - 1e-9:
            window.popleft()
        slope = slope_per_minute(list(window))
        # full window: the samples span (almost) the window, so a start-up jump cannot pass for a trend
        full = now - start >= ns.window - ns.interval / 2 and len(window) >= 3
        mark = "" if full else " (filling)"
        print(f"{time.strftime('%H:%M:%S')} {_mb(s.rss):>9} {_mb(s.uss):>9} {_mb(s.vms):>10} "
              f"{'-' if slope is None else f'{slope:+.2f}':>17}{mark}", flush=True)
        if full and ns.threshold_mb_per_min is not None and slope is not None \
                and slope > ns.threshold_mb_per_min:
            print(f"edgechat memwatch: RSS grows {slope:.2f} MB/min over the last {ns.window:g} s, above "
                  f"the threshold of {ns.threshold_mb_per_min:g} MB/min", file=sys.stderr)
            return EXIT_LEAK
        if ns.duration is not None and now - start + ns.interval > ns.duration + 1e-9:
            return 0
        time.sleep(max(0.0, ns.interval - (time.monotonic() - now)))
