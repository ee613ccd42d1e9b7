"""`edgechat diagnose URL`: where does the memory go? tracemalloc top/diff and the object census of every worker.

A client (stdlib only, never torch): it asks a daemon's /debug/memory admin endpoints and prints
readable tables. Requests land on whichever gunicorn worker accepts them, so each one goes on a new
connection, several at once, until every worker listed in /metrics (its `pid` labels) has answered or
the attempts run out; the output says which workers answered.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

EXIT_PARTIAL = 1  # some worker never answered
EXIT_ERROR = 2    # unreachable, admin endpoints off, wrong key, bad parameters
_PID = re.compile(r'^edgechat_process_start_time_seconds\{[^}]*\bpid="(\d+)"', re.M)
_TRACED = re.compile(r'^edgechat_tracemalloc_traced_bytes\{[^}]*\bpid="(\d+)"[^}]*\} (\S+)', re.M)
SWITCH_WAIT_S = 30.0  # workers follow a tracing switch within metrics_refresh_s (5 s by default)


class DiagnoseError(RuntimeError):
    """The daemon cannot be diagnosed (unreachable, admin endpoints off, wrong key)."""


def add_parsers(sub) -> None:
    """Register `diagnose`."""
    p = sub.add_parser("diagnose", help="show where a daemon's memory goes (tracemalloc, object census)",
                       description="Ask every worker of a daemon for its top allocation sites, their growth "
                                   "since a baseline (tracemalloc) and its live objects by type with their "
                                   "growth (census). Needs the daemon's admin key. Exit codes: "
                                   f"{EXIT_PARTIAL} = some worker never answered, {EXIT_ERROR} = error.")
    p.add_argument("url", help="daemon base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--admin-key", default=os.environ.get("EDGECHAT_ADMIN_KEY"),
                   help="the daemon's admin_key (default: $EDGECHAT_ADMIN_KEY)")
    p.add_argument("--snapshot", action="store_true", help="take the baseline first (every worker)")
    p.add_argument("--tracemalloc", choices=("on", "off"), help="switch tracing in every worker first")
    p.add_argument("--watch", type=_positive, metavar="N", help="repeat every N seconds (Ctrl-C stops)")
    p.add_argument("--count", type=int, metavar="M", help="with --watch: stop after M rounds")
    p.add_argument("--limit", type=int, default=10, help="rows per table (default: %(default)s)")
    p.add_argument("--group-by", choices=("lineno", "traceback"), default="lineno",
                   help="tracemalloc grouping; traceback shows the callers (needs tracemalloc_frames > 1)")
    p.add_argument("--no-census", action="store_true", help="skip the object census (it walks the heap)")
    p.add_argument("--attempts", type=int, default=8, help="request rounds to reach every worker "
                   "(default: %(default)s)")
    p.add_argument("--timeout", type=_positive, default=60.0, help="seconds per request (default: %(default)s)")
    p.set_defaults(func=run)


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


class Client:
    """One daemon's admin API; every request on a fresh connection, so it may reach another worker."""

    def __init__(self, url: str, key: str | None, timeout: float):
        self.url, self.key, self.timeout = url.rstrip("/"), key, timeout

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        """(status, JSON body) of one request; HTTP errors are answers too, only I/O errors raise."""
        headers = {"Content-Type": "application/json", "Connection": "close"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 - user-given URL
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as err:
            try:
                return err.code, json.load(err)
            except ValueError:  # not our JSON (a proxy's page): keep the status
                return err.code, {}
        except OSError as exc:
            raise DiagnoseError(f"cannot reach {self.url}{path}: {exc}") from exc

    def metrics(self) -> str:
        """The /metrics text (every worker's series, whichever worker answers)."""
        req = urllib.request.Request(self.url + "/metrics", headers={"Connection": "close"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                return resp.read().decode("utf-8", "replace")
        except OSError as exc:
            raise DiagnoseError(f"cannot scrape {self.url}/metrics: {exc}") from exc

    def workers(self) -> set[str]:
        """Worker pids from /metrics (empty: single process, no `pid` labels)."""
        return set(_PID.findall(self.metrics()))

    def tracing_workers(self) -> set[str]:
        """Pids whose tracemalloc gauge shows traced memory (so tracing is on there)."""
        return {pid for pid, value in _TRACED.findall(self.metrics()) if float(value) > 0}


def gather(client: Client, method: str, path: str, expected: set[str], attempts: int,
           body: dict | None = None) -> dict[str, tuple[int, dict]]:
    """Ask until every expected worker answered (or attempts run out): {pid: (status, body)}."""
    answers: dict[str, tuple[int, dict]] = {}
    for attempt in range(max(attempts, 1)):
        # Quick requests all land on the first worker to wake (measured on 2 workers: 40 of 40 with 4
        # in flight, 43 of 80 with 8): double the requests in flight each round, up to 4 a worker.
        parallel = min(2 ** (attempt + 1), 4 * len(expected)) if expected else 1
        with ThreadPoolExecutor(parallel) as pool:
            results = list(pool.map(lambda _: client.request(method, path, body), range(parallel)))
        for status, payload in results:
            _fatal(status, payload, path)
            answers.setdefault(str(payload.get("pid", "?")), (status, payload))
        if expected <= answers.keys() and answers:
            break
    return answers


def _fatal(status: int, payload: dict, path: str) -> None:
    """Stop on answers no other worker would give differently."""
    message = (payload.get("error") or {}).get("message", "")
    if status == 404:
        raise DiagnoseError(f"{path}: 404 — the admin endpoints are off; start the daemon with "
                            "EDGECHAT_ADMIN_KEY (or --admin-key) set")
    if status in (400, 401):
        raise DiagnoseError(f"{path}: {status} {message}")


def run(args: argparse.Namespace) -> int:
    """Entry point of `edgechat diagnose`."""
    client = Client(args.url, args.admin_key, args.timeout)
    try:
        expected = client.workers()
        if args.tracemalloc:
            switch(client, expected, args.tracemalloc == "on")
        if args.snapshot:
            _report_setup(gather(client, "POST", "/debug/memory/snapshot", expected, args.attempts),
                          "baseline taken")
        rounds = 0
        while True:
            rounds += 1
            answered = _round(client, args, expected)
            if not args.watch or (args.count and rounds >= args.count):
                break
            time.sleep(args.watch)
    except DiagnoseError as exc:
        print(f"edgechat diagnose: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 0
    return EXIT_PARTIAL if expected - answered else 0


def switch(client: Client, expected: set[str], enabled: bool) -> None:
    """Switch tracing: one worker takes the request and shares it, the others follow within
    metrics_refresh_s; wait until /metrics shows every worker traced (or none)."""
    status, body = client.request("POST", "/debug/memory/tracemalloc", {"enabled": enabled})
    _fatal(status, body, "/debug/memory/tracemalloc")
    word = "on" if enabled else "off"
    deadline = time.monotonic() + SWITCH_WAIT_S
    done: set[str] = set()
    while expected:
        tracing = client.tracing_workers()
        done = expected & tracing if enabled else expected - tracing
        if done == expected or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for pid in sorted(expected or {str(body.get("pid", "?"))}):
        print(f"worker {pid}: tracemalloc {word}" if not expected or pid in done
              else f"worker {pid}: tracemalloc not yet {word} after {SWITCH_WAIT_S:.0f} s")


def _report_setup(answers: dict, what: str) -> None:
    for pid, (status, body) in sorted(answers.items()):
        note = what if status == 200 else (body.get("error") or {}).get("message", status)
        print(f"worker {pid}: {note}")


def _round(client: Client, args, expected: set[str]) -> set[str]:
    """One look at every worker; returns the pids that answered."""
    query = f"?limit={args.limit}&group_by={args.group_by}"
    parts = {"top": gather(client, "GET", "/debug/memory/top" + query, expected, args.attempts),
             "diff": gather(client, "GET", "/debug/memory/diff" + query, expected, args.attempts)}
    if not args.no_census:
        parts["census"] = gather(client, "GET", f"/debug/memory/census?limit={args.limit}", expected,
                                 args.attempts)
    pids = set().union(*(p.keys() for p in parts.values()))
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    print(f"== {stamp} {client.url}: {len(pids)} worker(s) answered: {', '.join(sorted(pids)) or 'none'}"
          + (f"; never answered: {', '.join(sorted(expected - pids))}" if expected - pids else ""))
    for pid in sorted(pids):
        print(f"\n-- worker {pid}")
        for name, answers in parts.items():
            if pid in answers:
                print(render(name, *answers[pid]))
    return pids


def size(n: int, sign: bool = False) -> str:
    """Bytes for people: 512 B, 12.3 KiB, 4.5 MiB (with a sign for growth)."""
    prefix = ("+" if n > 0 else "-" if n < 0 else "") if sign else ("-" if n < 0 else "")
    value = abs(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{prefix}{value:.0f} {unit}" if unit == "B" else f"{prefix}{value:.1f} {unit}"
        value /= 1024
    return f"{prefix}{value} B"


def site(path: str, line: int) -> str:
    """file:line with the noise cut: from site-packages/ or the daemon/ package on, else the last 2 parts."""
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in path:
            return f"{path.split(marker, 1)[1]}:{line}"
    parts = path.replace(os.sep, "/").split("/")
    if "daemon" in parts[:-1]:
        return "/".join(parts[len(parts) - 1 - parts[::-1].index("daemon"):]) + f":{line}"
    return "/".join(parts[-2:]) + f":{line}"


def table(headers: list[str], rows: list[list[str]], width: int = 70) -> str:
    """Aligned columns; the last one (source text) is cut at `width` characters."""
    rows = [r[:-1] + [r[-1] if len(r[-1]) <= width else r[-1][: width - 1] + "…"] for r in rows]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    def line(cells):
        return "  " + "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def render(kind: str, status: int, body: dict) -> str:
    """One endpoint's answer as readable text."""
    if status != 200:
        return f"{kind}: {(body.get('error') or {}).get('message', f'HTTP {status}')}"
    if kind == "census":
        return render_census(body)
    entries = body.get("entries", [])
    grew = kind == "diff"
    title = (f"{'growth since the baseline' if grew else 'top allocation sites'} (tracemalloc, "
             f"group_by={body.get('group_by')}; traced {size(body.get('traced_bytes', 0))}, "
             f"peak {size(body.get('peak_bytes', 0))})")
    rows = []
    for i, e in enumerate(entries, 1):
        head = [f"#{i}"] + ([size(e["size_diff_bytes"], sign=True), f"{e['count_diff']:+d}"] if grew else [])
        rows.append(head + [size(e["size_bytes"]), str(e["count"]), site(e["file"], e["line"]), e["source"]])
        for frame in (e.get("traceback") or [])[:-1][::-1][:8]:  # callers, nearest first
            rows.append([""] * (len(head) + 2) + ["  called from " + site(frame["file"], frame["line"]),
                                                 frame["source"]])
    headers = ["#"] + (["+size", "+count"] if grew else []) + ["size", "count", "where", "source line"]
    return title + "\n" + (table(headers, rows) if rows else "  (nothing)")


def render_census(body: dict) -> str:
    """The census: totals, what grew (or the biggest types without a baseline), who holds new tensors."""
    torch = body.get("torch", {})
    lines = [f"object census ({body.get('seconds', 0):.2f} s): {body.get('objects', 0)} objects"
             + (f" ({body['objects_diff']:+d})" if "objects_diff" in body else "")
             + f"; torch tensors {torch.get('tensors', 0)}"
             + (f" ({torch['tensors_diff']:+d})" if "tensors_diff" in torch else "")
             + f", {size(torch.get('bytes', 0))}"
             + (f" ({size(torch['bytes_diff'], sign=True)})" if "bytes_diff" in torch else "")]
    if body.get("baseline_at") is None:
        rows = [[t["type"], str(t["count"])] for t in body.get("top", [])]
        lines += ["no baseline (use --snapshot): biggest types now", table(["type", "count"], rows)]
    else:
        rows = [[g["type"], str(g["count"]), f"{g['count_diff']:+d}",
                 size(g["bytes_diff"], sign=True) if "bytes_diff" in g else ""] for g in body.get("growth", [])]
        lines += ["growth since the baseline", table(["type", "count", "+count", "+bytes"], rows)
                  if rows else "  (nothing grew)"]
    lines += [f"new tensors held by: {chain}" for chain in body.get("holders", [])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m daemon.cli.diagnose URL ...` (the same as `edgechat diagnose`)."""
    parser = argparse.ArgumentParser(prog="edgechat")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["diagnose", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
