"""Shared bench utilities: real daemons on free ports, RSS by pid, varied prompts, median/spread tables."""
from __future__ import annotations

import csv
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Iterable, Sequence

import psutil

MODEL = "builtin:qwen2.5-0.5b-shape"
MB = 2**20
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Varied user turns, as a real conversation mixes them: poems, maths, code.
CHAT_PROMPTS = (
    "Write a short poem about the sea at night.",
    "What is 17 times 23? Show the steps.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Compose a haiku about autumn leaves falling in a quiet park.",
    "Solve for x: 3x + 7 = 22, and explain each step.",
    "Explain what a closure is in JavaScript, with a small example.",
    "Write four rhyming lines about a cat who loves the rain.",
    "What is the derivative of x^3 * sin(x)?",
    "Write a SQL query that returns the ten most recent orders per customer.",
    "Give me a limerick about a programmer who never sleeps.",
    "Is 221 a prime number? Explain how you checked.",
    "Write a bash one-liner that counts the lines of every .py file in a folder.",
    "Write a sonnet opening about mountains in the morning fog.",
    "What is the sum of the integers from 1 to 100, and why?",
    "Write a Rust function that reverses a vector in place.",
)

# Building blocks for long prompts (documents a user pastes in): prose, maths, code.
PASSAGES = (
    "The tide came in slowly over the flat grey sand, carrying weed and small shells, and the gulls "
    "wheeled above the harbour wall calling to one another while the boats rocked at their moorings.",
    "Let f(x) = x^2 sin(x). By the product rule f'(x) = 2x sin(x) + x^2 cos(x); at x = pi the first "
    "term vanishes and f'(pi) = -pi^2. The second derivative follows the same way, term by term.",
    "def merge(a, b):\n    out, i, j = [], 0, 0\n    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n        else:\n"
    "            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]\n",
    "In the autumn the maples along the river turned red and gold, and the old ferryman said the "
    "water always ran colder once the first leaves had fallen into it from the northern bank.",
    "A matrix A is invertible exactly when its determinant is non-zero; for a 2x2 matrix with rows "
    "(a, b) and (c, d) the inverse is 1/(ad - bc) times the matrix with rows (d, -b) and (-c, a).",
    "SELECT customer_id, order_id, created_at FROM (SELECT *, row_number() OVER (PARTITION BY "
    "customer_id ORDER BY created_at DESC) AS rn FROM orders) ranked WHERE rn <= 10;",
    "The summation of the first n integers equals n(n + 1)/2, which Gauss is said to have noticed by "
    "pairing the first term with the last, the second with the second-to-last, and so on.",
    "fn reverse<T>(v: &mut Vec<T>) {\n    let n = v.len();\n    for i in 0..n / 2 {\n"
    "        v.swap(i, n - 1 - i);\n    }\n}\n",
    "Snow settled on the mountain pass overnight, and by morning the shepherds had brought the flock "
    "down to the lower meadow where the stream still ran clear between the stones.",
)


def default_cache_dir() -> str:
    """The daemon's default cache folder, so benches reuse the built-in model it builds there."""
    from daemon.config import Config  # light import: no torch
    return Config().cache_dir


def today() -> str:
    """The run's date, for docs/benchmarks.md."""
    return datetime.date.today().isoformat()


def machine_note() -> str:
    """CPU count and load average: timings on a shared machine mean little without them."""
    one, five, fifteen = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min)"


def code_note() -> str:
    """Which daemon code runs: its folder and git commit, flagging uncommitted changes under daemon/."""
    where = os.path.join(REPO, "daemon")
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "daemon"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):  # no git, or a plain copy (git archive)
        return f"daemon code from {where} (not a git checkout)"
    return f"daemon code from {where} at git {head}" + (" + UNCOMMITTED changes" if dirty else "")


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so `with` blocks stop the daemons and children we started."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_json(method: str, url: str, body: dict | None = None, timeout: float = 900.0) -> tuple[int, dict]:
    """One JSON request; returns (status, decoded body) for any HTTP status."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:  # 4xx/5xx still carry the daemon's JSON error body
        return err.code, json.loads(err.read() or b"{}")


def scrape(url: str) -> dict:
    """{(name, sorted label pairs): value} of a daemon's /metrics (summed over workers by the daemon)."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(url + "/metrics", timeout=60) as resp:  # noqa: S310 - our own daemon
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def rss_mb(pid: int) -> float:
    """Resident set size of one process, in MiB (psutil)."""
    return psutil.Process(pid).memory_info().rss / MB


def _status_mb(pid: int, key: str) -> float:
    """One kB field of /proc/PID/status, in MiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb(pid: int) -> float:
    """The process's RSS high-water mark (VmHWM), in MiB: catches peaks between samples."""
    return _status_mb(pid, "VmHWM")


def rss_anon_mb(pid: int) -> float:
    """Anonymous resident memory (RssAnon), in MiB: the heap, where leaks live.

    Unlike RSS it does not shrink when memory pressure evicts the mmap-ed weight file's pages
    (there is no swap here), so it stays comparable when another process eats the host's memory.
    """
    return _status_mb(pid, "RssAnon")


def mem_available_mb() -> float:
    """The host's MemAvailable, in MiB: low values mean RSS figures were squeezed by pressure."""
    return psutil.virtual_memory().available / MB


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used (to see how much CPU a turn really got)."""
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def stop_process(proc: subprocess.Popen, timeout: float = 60.0) -> int | None:
    """SIGTERM, wait, then SIGKILL the process group if it hangs; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    return proc.returncode


def clean_env(repo: str = REPO) -> dict:
    """This environment without EDGECHAT_* settings, so only the bench's flags configure daemons; the
    daemon's code comes from `repo` (this checkout by default)."""
    from daemon.telemetry.multiproc import MULTIPROC_ENV  # light import: no prometheus_client
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGECHAT_") and k != MULTIPROC_ENV}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
    return env


class ServedDaemon:
    """`python -m daemon serve` (one gunicorn worker) on a free port; a context manager that always stops it."""

    def __init__(self, name: str, workdir: str, args: Sequence[str], repo: str = REPO) -> None:
        self.name = name
        self.repo = repo
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.cmd = [sys.executable, "-m", "daemon", "serve", "--port", str(self.port), "--workers", "1",
                    "--state-dir", os.path.join(workdir, name, "state"),
                    "--metrics-dir", os.path.join(workdir, name, "metrics"), *args]
        self.proc: subprocess.Popen | None = None
        self.worker_pid = 0

    def start(self, timeout: float = 600.0) -> "ServedDaemon":
        """Start, wait for /readyz, and find the worker: /healthz's pid, a child of the master."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, env=clean_env(self.repo), cwd=self.repo, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} daemon exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if http_json("GET", self.url + "/readyz", timeout=5)[0] == 200:
                    break
            except (OSError, ValueError):  # not listening yet, or a partial answer while starting
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} daemon not ready after {timeout:.0f} s; see {self.log_path}")
            time.sleep(0.5)
        self.worker_pid = int(http_json("GET", self.url + "/healthz")[1]["pid"])
        if psutil.Process(self.worker_pid).ppid() != self.proc.pid:
            raise RuntimeError(f"pid {self.worker_pid} is not a worker of master {self.proc.pid}")
        return self

    def post(self, path: str, body: dict, timeout: float = 900.0) -> dict:
        """POST JSON and return the answer; any non-2xx status is an error for a bench."""
        status, answer = http_json("POST", self.url + path, body, timeout)
        if status // 100 != 2:
            raise RuntimeError(f"{self.name}: POST {path} -> {status} {answer}")
        return answer

    def stop(self) -> int | None:
        """SIGTERM the master (gunicorn stops the worker), SIGKILL the group if it hangs."""
        return stop_process(self.proc) if self.proc is not None else None

    def __enter__(self) -> "ServedDaemon":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0..100), linearly interpolated; nan for no values."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Iterable[float]) -> float:
    """The median; nan for no values."""
    return percentile(values, 50)


def spread(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    """"median (p10–p90)": a centre and how much the shared machine shook it."""
    return f"{fmt.format(median(values))} ({fmt.format(percentile(values, 10))}–" \
           f"{fmt.format(percentile(values, 90))})"


def ratio(a: float, b: float) -> str:
    """a / b as "×r.rr" ("n/a" when b is zero)."""
    return f"×{a / b:.2f}" if b else "n/a"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table, readable as plain text too."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: str, rows: Sequence[dict]) -> None:
    """Write rows (dicts with the same keys) as CSV, creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
