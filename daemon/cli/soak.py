"""`edgechat soak`: drive many turns against a running daemon, recording memory, latency and prompt size.

The seed article's 30-turn test made repeatable: varied prompts (poems, maths, code) over sessions of
the sessions API, one CSV row per turn, then the article-shaped table and a plot (soak_report.py).
A client command: stdlib (+ psutil with --pid), no torch, starts in well under a second.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import time
import urllib.error
import urllib.request

from . import soak_report
from .memsample import MB, SampleError, sample_metrics, sample_pid

PROMPTS = (
    "Write a short poem about the sea at night.",
    "What is 17 times 23? Show your working.",
    "Write a Python function that reverses a linked list.",
    "Compose a haiku about autumn leaves.",
    "Solve for x: 3x + 7 = 22.",
    "Explain what a hash map is and write one in JavaScript.",
    "Write a limerick about a cat who learns to code.",
    "What is the derivative of x^3 * sin(x)?",
    "Write a SQL query that finds the second highest salary in a table.",
    "Write a sonnet about a lighthouse keeper.",
    "A train leaves at 3 pm at 80 km/h; another at 4 pm at 100 km/h. When does the second catch up?",
    "Write a bash one-liner that counts lines in all .py files under a folder.",
    "Write a poem about memory that slowly fills up.",
    "Is 221 a prime number? Explain.",
    "Write a C function that computes the length of a string without strlen.",
    "Describe a sunrise in the mountains in four lines of verse.",
    "What is the sum of the first 100 positive integers?",
    "Write a Rust function that returns the largest element of a slice.",
    "Write a short free-verse poem about rain on a tin roof.",
    "Integrate 2x * e^(x^2) with respect to x.",
    "Write a Go HTTP handler that returns the current time as JSON.",
    "Write a children's rhyme about counting stars.",
    "What is the probability of rolling two sixes with two dice?",
    "Refactor this Python: result = []; for x in xs: if x > 0: result.append(x * 2)",
)
SYSTEM = "You are a helpful assistant."


class Api:
    """The few sessions-API calls the soak makes (urllib: no extra dependency)."""

    def __init__(self, url: str, key: str | None, timeout: float):
        self.url, self.key, self.timeout = url.rstrip("/"), key, timeout

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        """Send a JSON request; returns the JSON answer (raises urllib's errors)."""
        headers = {"Content-Type": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 - user-given URL
            return json.load(resp)

    def wait_ready(self, timeout: float) -> dict | None:
        """Poll /readyz until it answers 200; returns its JSON, or None when time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.call("GET", "/readyz")
            except OSError:  # refused, reset or 503 while (re)starting: try again
                if time.monotonic() >= deadline:
                    return None
                time.sleep(1.0)

    def new_session(self) -> str:
        """Create a session with the seed's system prompt."""
        return self.call("POST", "/v1/sessions", {"system": SYSTEM})["id"]


def add_parsers(sub) -> None:
    """Register `soak` and `soak-report`."""
    p = sub.add_parser("soak", help="drive N turns against a daemon; CSV, table and plot of memory/latency",
                       description="Drive --turns turns round-robin over --sessions sessions with varied "
                                   "prompts against a running daemon; sample the workers' memory after "
                                   "each turn (by --pid with psutil, else from /metrics). Writes a CSV, "
                                   "prints a markdown table, optionally a PNG (needs matplotlib).")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="daemon base URL (default: %(default)s)")
    p.add_argument("--api-key", help="bearer key, when the daemon has api_keys")
    p.add_argument("--turns", type=int, default=30, help="turns in all (default: %(default)s)")
    p.add_argument("--sessions", type=int, default=1, help="conversations, turns go round-robin (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens per reply (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed sent with each turn (default: %(default)s)")
    p.add_argument("--pid", type=int, help="sample this process tree with psutil instead of /metrics")
    p.add_argument("--label", help="name of this run in the table and plot (default: from /readyz leak_mode)")
    p.add_argument("--csv", default="soak.csv", help="per-turn CSV to write (default: %(default)s)")
    p.add_argument("--table", help="also write the markdown table here")
    p.add_argument("--png", help="also write a plot here (needs matplotlib: pip install 'edgechat[soak]')")
    p.add_argument("--compare", nargs="+", default=[], metavar="CSV",
                   help="earlier soak CSVs to put beside this run in the table and plot")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per turn request (default: %(default)s)")
    p.add_argument("--recover-timeout", type=float, default=180.0,
                   help="after a connection failure, wait this long for /readyz before giving up (default: %(default)s)")
    p.set_defaults(func=run)

    r = sub.add_parser("soak-report", help="table and plot from soak CSVs (e.g. default vs leak mode)",
                       description="Render the seed-shaped table (and a PNG) from one or more soak CSVs.")
    r.add_argument("csvs", nargs="+", metavar="CSV")
    r.add_argument("--table", help="write the markdown table here (always printed)")
    r.add_argument("--png", help="write the plot here (needs matplotlib)")
    r.set_defaults(func=run_report)


def _sample(ns: argparse.Namespace):
    try:
        return sample_pid(ns.pid) if ns.pid else sample_metrics(ns.url)
    except SampleError as exc:
        print(f"\nedgechat soak: memory sample failed: {exc}", file=sys.stderr)
        return None


def _row(label: str, turn: int, session: int, session_turn: int, outcome: str, sample, start: float,
         answer: dict | None = None, latency: float | None = None) -> dict:
    usage, history = (answer or {}).get("usage", {}), (answer or {}).get("history", {})
    return {"label": label, "turn": turn, "session": session, "session_turn": session_turn,
            "outcome": outcome, "latency_s": "" if latency is None else f"{latency:.4f}",
            "prompt_tokens": usage.get("prompt_tokens", ""), "completion_tokens": usage.get("completion_tokens", ""),
            "history_messages": history.get("messages", ""),
            "rss_bytes": sample.rss if sample else "", "uss_bytes": sample.uss if sample and sample.uss is not None else "",
            "service_bytes": sample.service if sample and sample.service is not None else "",
            "limit_bytes": sample.limit if sample and sample.limit is not None else "",
            "pids": ";".join(sample.pids) if sample else "", "elapsed_s": f"{time.monotonic() - start:.2f}"}


def _progress(done: int, total: int, row: dict) -> None:
    width = 24
    filled = width * done // max(total, 1)
    rss = f"{int(row['rss_bytes']) / MB:.0f} MB" if row["rss_bytes"] != "" else "?"
    lat = f"{float(row['latency_s']):.2f} s" if row["latency_s"] else row["outcome"]
    line = (f"soak [{'#' * filled}{'.' * (width - filled)}] {done}/{total}  turn {lat}  "
            f"prompt {row['prompt_tokens'] or '?'} tok  rss {rss}")
    end = "\r" if sys.stderr.isatty() and done < total else "\n"
    print(line.ljust(78), end=end, file=sys.stderr, flush=True)


def _turn(api: Api, session_id: str, prompt: str, ns: argparse.Namespace) -> tuple[str, dict | None, float]:
    """One turn; returns (outcome, answer, seconds). Outcomes: ok, rejected, lost, error, down."""
    t0 = time.monotonic()
    try:
        answer = api.call("POST", f"/v1/sessions/{session_id}/messages",
                          {"content": prompt, "max_tokens": ns.max_tokens, "seed": ns.seed})
        return "ok", answer, time.monotonic() - t0
    except urllib.error.HTTPError as exc:
        # 503: queue full or memory pressure (degraded); 404: the session vanished (worker restarted)
        outcome = {503: "rejected", 404: "lost"}.get(exc.code, "error")
        return outcome, None, time.monotonic() - t0
    except OSError:  # refused, reset, timed out: the daemon (or its worker) is gone
        return "down", None, time.monotonic() - t0


def run(ns: argparse.Namespace) -> int:
    """Drive the turns, write the CSV, print the table; exit 1 when the daemon went down for good."""
    if ns.turns < 1 or ns.sessions < 1:
        print("edgechat soak: --turns and --sessions must be >= 1", file=sys.stderr)
        return 2
    if ns.png:
        try:
            soak_report.require_matplotlib()
        except soak_report.MissingMatplotlib as exc:
            print(f"edgechat soak: {exc}", file=sys.stderr)
            return 2
    api = Api(ns.url, ns.api_key, ns.timeout)
    info = api.wait_ready(30.0)
    if info is None:
        print(f"edgechat soak: {ns.url}/readyz does not answer ready", file=sys.stderr)
        return 2
    label = ns.label or (f"leak_mode={info['leak_mode']}" if info.get("leak_mode") else "default")
    start = time.monotonic()
    try:
        sessions = [api.new_session() for _ in range(ns.sessions)]
    except OSError as exc:  # e.g. 401 without --api-key
        print(f"edgechat soak: cannot create a session: {exc}", file=sys.stderr)
        return 2
    counts = [0] * ns.sessions
    code = 0
    with open(ns.csv, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=soak_report.FIELDS)
        writer.writeheader()
        writer.writerow(_row(label, 0, 0, 0, "initial", _sample(ns), start))
        for turn in range(1, ns.turns + 1):
            slot = (turn - 1) % ns.sessions
            counts[slot] += 1
            outcome, answer, seconds = _turn(api, sessions[slot], PROMPTS[(turn - 1) % len(PROMPTS)], ns)
            row = _row(label, turn, slot + 1, counts[slot], outcome, _sample(ns), start, answer,
                       seconds if outcome == "ok" else None)
            writer.writerow(row)
            handle.flush()
            _progress(turn, ns.turns, row)
            if outcome == "down" and api.wait_ready(ns.recover_timeout) is None:
                print(f"\nedgechat soak: daemon down since turn {turn}; stopping", file=sys.stderr)
                code = 1
                break
            if outcome in ("lost", "down"):
                try:  # a restarted worker has an empty store: go on in a new conversation
                    sessions[slot], counts[slot] = api.new_session(), 0
                except OSError:
                    pass
    runs = [soak_report.read_csv(path) for path in ns.compare] + [soak_report.read_csv(ns.csv)]
    return _report(runs, ns.table, ns.png) or code


def _report(runs: list, table_path: str | None, png_path: str | None) -> int:
    table = soak_report.markdown_table(runs)
    print(table, end="")
    if table_path:
        with open(table_path, "w", encoding="utf-8") as handle:
            handle.write(table)
    if png_path:
        try:
            soak_report.plot(runs, png_path)
        except soak_report.MissingMatplotlib as exc:
            print(f"edgechat soak: {exc}", file=sys.stderr)
            return 2
        print(f"plot: {png_path}", file=sys.stderr)
    return 0


def run_report(ns: argparse.Namespace) -> int:
    """Table (and plot) from saved CSVs."""
    try:
        runs = [soak_report.read_csv(path) for path in ns.csvs]
    except (OSError, KeyError, ValueError) as exc:  # missing file or not a soak CSV
        print(f"edgechat soak-report: {exc}", file=sys.stderr)
        return 2
    return _report(runs, ns.table, ns.png)
