"""`edgechat soak`: drive many turns against a running daemon, recording memory, latency and prompt size.

The classic 30-turn history-leak test (docs/memory.md) made repeatable: varied prompts (poems, maths, code) over sessions of
the sessions API, one CSV row per turn, then a before/after table and a plot (soak_report.py).
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
        """Create a session with the soak's system prompt."""
        return self.call("POST", "/v1/sessions", {"system": SYSTEM})["id"]


def add_parsers(sub) -> None:
    """Register `soak` and `soak-report`."""
    p = sub.add_parser("soak", help="drive N turns against a daemon; CSV, table and plot of memory/latency",
                       description="Drive --turns turns round-robin over --sessions sessions with varied "
                                   "prompts against a running daemon; sample the workers' memory after "
                                   "each turn (by --pid with psutil, else from /metrics). Writes a CSV, "
                                   "prints a markdown table, optionally a PNG (needs matplotlib).")
    p.add_argument("--url", action="append", metavar="URL",
                   help="daemon base URL (default: http://127.0.0.1:8000); repeat it to soak several daemons "
                        "(e.g. default and leak mode) interleaved turn by turn, so machine load hits them alike")
    p.add_argument("--api-key", help="bearer key, when the daemon has api_keys")
    p.add_argument("--turns", type=int, default=30, help="turns in all (default: %(default)s)")
    p.add_argument("--sessions", type=int, default=1, help="conversations, turns go round-robin (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens per reply (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed sent with each turn (default: %(default)s)")
    p.add_argument("--pid", type=int, help="sample this process tree with psutil instead of /metrics")
    p.add_argument("--label", help="name of this run in the table and plot (default: from /readyz leak_mode)")
    p.add_argument("--csv", action="append", metavar="PATH",
                   help="per-turn CSV to write, one per --url (default: soak.csv; soak-1.csv, soak-2.csv, ... "
                        "for several URLs)")
    p.add_argument("--table", help="also write the markdown table here")
    p.add_argument("--png", help="also write a plot here (needs matplotlib: pip install 'edgechat[soak]')")
    p.add_argument("--compare", nargs="+", default=[], metavar="CSV",
                   help="earlier soak CSVs to put beside this run in the table and plot")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per turn request (default: %(default)s)")
    p.add_argument("--recover-timeout", type=float, default=180.0,
                   help="after a connection failure, wait this long for /readyz before giving up (default: %(default)s)")
    p.set_defaults(func=run)

    r = sub.add_parser("soak-report", help="table and plot from soak CSVs (e.g. default vs leak mode)",
                       description="Render the before/after table (and a PNG) from one or more soak CSVs.")
    r.add_argument("csvs", nargs="+", metavar="CSV")
    r.add_argument("--table", help="write the markdown table here (always printed)")
    r.add_argument("--png", help="write the plot here (needs matplotlib)")
    r.set_defaults(func=run_report)


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


def _progress(done: int, total: int, row: dict, label: str = "") -> None:
    width = 24
    filled = width * done // max(total, 1)
    rss = f"{int(row['rss_bytes']) / MB:.0f} MB" if row["rss_bytes"] != "" else "?"
    lat = f"{float(row['latency_s']):.2f} s" if row["latency_s"] else row["outcome"]
    line = (f"soak {label + ' ' if label else ''}[{'#' * filled}{'.' * (width - filled)}] {done}/{total}  turn {lat}  "
            f"prompt {row['prompt_tokens'] or '?'} tok  rss {rss}")
    end = "\r" if sys.stderr.isatty() and done < total and not label else "\n"
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


class Target:
    """One daemon under soak: its API, sessions, label and CSV; turns go round-robin over its sessions."""

    def __init__(self, url: str, csv_path: str, ns: argparse.Namespace, start: float):
        self.api, self.csv_path, self.ns, self.start = Api(url, ns.api_key, ns.timeout), csv_path, ns, start
        self.url, self.down, self.label = url, False, ""
        self.sessions: list[str] = []
        self.counts = [0] * ns.sessions
        self._handle = self._writer = None

    def open(self, label: str | None) -> str | None:
        """Check readiness, create the sessions, write the header and the initial sample; error text or None."""
        info = self.api.wait_ready(30.0)
        if info is None:
            return f"{self.url}/readyz does not answer ready"
        self.label = label or (f"leak_mode={info['leak_mode']}" if info.get("leak_mode") else "default")
        try:
            self.sessions = [self.api.new_session() for _ in range(self.ns.sessions)]
        except OSError as exc:  # e.g. 401 without --api-key
            return f"cannot create a session on {self.url}: {exc}"
        self._handle = open(self.csv_path, "w", newline="", encoding="utf-8")  # noqa: SIM115 - close()
        self._writer = csv.DictWriter(self._handle, fieldnames=soak_report.FIELDS)
        self._writer.writeheader()
        self._writer.writerow(_row(self.label, 0, 0, 0, "initial", self._sample(), self.start))
        return None

    def _sample(self):
        try:
            return sample_pid(self.ns.pid) if self.ns.pid else sample_metrics(self.url)
        except SampleError as exc:
            print(f"\nedgechat soak: memory sample failed: {exc}", file=sys.stderr)
            return None

    def turn(self, turn: int) -> dict:
        """Take turn number `turn`, sample memory, write and return its row."""
        slot = (turn - 1) % self.ns.sessions
        self.counts[slot] += 1
        outcome, answer, seconds = _turn(self.api, self.sessions[slot], PROMPTS[(turn - 1) % len(PROMPTS)], self.ns)
        row = _row(self.label, turn, slot + 1, self.counts[slot], outcome, self._sample(), self.start, answer,
                   seconds if outcome == "ok" else None)
        self._writer.writerow(row)
        self._handle.flush()
        if outcome == "down" and self.api.wait_ready(self.ns.recover_timeout) is None:
            print(f"\nedgechat soak: {self.url} down since turn {turn}; stopping it", file=sys.stderr)
            self.down = True
        elif outcome in ("lost", "down"):
            try:  # a restarted worker has an empty store: go on in a new conversation
                self.sessions[slot], self.counts[slot] = self.api.new_session(), 0
            except OSError:  # still coming up: the next turn will say
                pass
        return row

    def close(self) -> None:
        """Close the CSV."""
        if self._handle is not None:
            self._handle.close()


def _csv_paths(ns: argparse.Namespace, urls: list[str]) -> list[str] | None:
    paths = ns.csv or ["soak.csv"]
    if len(paths) == len(urls):
        return paths
    if len(paths) == 1:  # soak.csv -> soak-1.csv, soak-2.csv, ...
        stem = paths[0][:-4] if paths[0].endswith(".csv") else paths[0]
        return [f"{stem}-{i}.csv" for i in range(1, len(urls) + 1)]
    return None


def run(ns: argparse.Namespace) -> int:
    """Drive the turns, write the CSVs, print the table; exit 1 when a daemon went down for good."""
    urls = ns.url or ["http://127.0.0.1:8000"]
    paths = _csv_paths(ns, urls)
    problem = ("--turns and --sessions must be >= 1" if ns.turns < 1 or ns.sessions < 1 else
               "give one --csv, or one per --url" if paths is None else
               "--pid and --label need a single --url" if len(urls) > 1 and (ns.pid or ns.label) else None)
    if problem is None and ns.png:
        try:
            soak_report.require_matplotlib()
        except soak_report.MissingMatplotlib as exc:
            problem = str(exc)
    if problem:
        print(f"edgechat soak: {problem}", file=sys.stderr)
        return 2
    start = time.monotonic()
    targets = [Target(url, path, ns, start) for url, path in zip(urls, paths)]
    try:
        for target in targets:
            problem = target.open(ns.label)
            if problem:
                print(f"edgechat soak: {problem}", file=sys.stderr)
                return 2
        for turn in range(1, ns.turns + 1):
            # interleaved turn by turn, so the machine's load hits every daemon alike
            for target in targets:
                if not target.down:
                    row = target.turn(turn)
                    _progress(turn, ns.turns, row, target.label if len(targets) > 1 else "")
            if all(t.down for t in targets):
                break
    finally:
        for target in targets:
            target.close()
    runs = [soak_report.read_csv(path) for path in ns.compare + paths]
    return _report(runs, ns.table, ns.png) or int(any(t.down for t in targets))


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
