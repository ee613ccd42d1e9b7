"""Every process the suite starts, and the check that none of them outlives the run.

Whatever starts a process for a test records it with `track()` (a Popen, a psutil.Process or a pid)
in TRACKED, a module-level set shared by the whole run. conftest.py calls `session_started()` when
the session starts and `session_finished()` when it ends; at the end, after a grace period for
processes that are still exiting, the run fails listing every process that is still alive among:

- the descendants of the pytest process that were not there at the start;
- the tracked processes and their descendants (daemons start in their own sessions, so process
  groups alone miss them; a gunicorn master forks its workers);
- every process whose environment carries this run's mark (MARK_ENV, exported at the start and so
  inherited by everything the run starts): an orphan, reparented when its parent exited, is the
  descendant of nobody the first two walks know.

The survivors are killed afterwards, so a failed run leaves the machine clean.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Union

import psutil
import pytest

MARK_ENV = "PYTEST_PROCESS_GUARD"  # not EDGECHAT_*: the daemon starters drop those from the env
GRACE_S = 10.0  # how long processes get to finish exiting before they count as left running

# (pid, create time) of every process a test started; the create time tells a reused pid apart
TRACKED: set[tuple[int, float]] = set()

Trackable = Union[subprocess.Popen, psutil.Process, int]


def track(proc: Trackable) -> Trackable:
    """Record a process the suite started (returned unchanged, so it wraps a Popen call)."""
    pid = proc if isinstance(proc, int) else proc.pid
    try:
        TRACKED.add((pid, psutil.Process(pid).create_time()))
    except psutil.NoSuchProcess:  # already gone and reaped: it cannot outlive anything
        pass
    return proc


@dataclass(frozen=True)
class Baseline:
    """What was there before the run: the pytest process, its descendants, and the run's mark."""

    pid: int
    mark: str
    existing: frozenset[tuple[int, float]]


def _key(proc: psutil.Process) -> tuple[int, float] | None:
    try:
        return proc.pid, proc.create_time()
    except psutil.Error:
        return None


def begin() -> Baseline:
    """Mark this run's environment and note the descendants that exist already."""
    mark = f"{os.getpid()}-{uuid.uuid4().hex}"
    os.environ[MARK_ENV] = mark
    existing = {_key(p) for p in psutil.Process().children(recursive=True)}
    return Baseline(os.getpid(), mark, frozenset(k for k in existing if k is not None))


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _marked(proc: psutil.Process, mark: str) -> bool:
    try:
        return proc.environ().get(MARK_ENV) == mark
    except psutil.Error:  # another user's process, or gone meanwhile
        return False


def leftovers(baseline: Baseline) -> list[psutil.Process]:
    """The processes started during the run that are alive now (zombies are dead: not listed)."""
    found: dict[tuple[int, float], psutil.Process] = {}

    def add(proc: psutil.Process, with_children: bool = True) -> None:
        try:
            family = [proc] + (proc.children(recursive=True) if with_children else [])
        except psutil.Error:
            family = [proc]
        for member in family:
            key = _key(member)
            if key is not None and member.pid != baseline.pid:
                found.setdefault(key, member)

    add(psutil.Process(baseline.pid))
    for pid, created in list(TRACKED):
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created:
                add(proc)
        except psutil.Error:
            continue
    for proc in psutil.process_iter():
        if proc.pid != baseline.pid and _marked(proc, baseline.mark):
            add(proc)
    return sorted((p for k, p in found.items() if k not in baseline.existing and _alive(p)),
                  key=lambda p: p.pid)


def wait_for_leftovers(baseline: Baseline, grace_s: float = GRACE_S, poll_s: float = 0.2) -> list[psutil.Process]:
    """leftovers(), polled until none is left or grace_s has passed (a stopped server may still be
    exiting: gunicorn workers finish after their master's SIGTERM returns)."""
    deadline = time.monotonic() + grace_s
    while True:
        left = leftovers(baseline)
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(poll_s)


def describe(proc: psutil.Process) -> str:
    """pid and command line, for the failure message."""
    try:
        cmdline = " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        cmdline = "(gone)"
    return f"pid {proc.pid}: {cmdline}"


def kill(procs: list[psutil.Process], timeout: float = 10.0) -> None:
    """SIGKILL each process and wait for it to go."""
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=timeout)


# --- the session hooks' bodies (conftest.py's pytest_sessionstart / pytest_sessionfinish call these)
_BASELINE = pytest.StashKey[Baseline]()


def session_started(session: pytest.Session) -> None:
    """Record the baseline for this session."""
    session.config.stash[_BASELINE] = begin()


def session_finished(session: pytest.Session, grace_s: float = GRACE_S) -> list[str]:
    """Fail the session (exit status 1, an error in the summary) if any process outlived the run;
    kill those. Returns their descriptions (empty when the run was clean)."""
    baseline = session.config.stash.get(_BASELINE, None)
    if baseline is None:
        return []
    left = wait_for_leftovers(baseline, grace_s)
    if not left:
        return []
    lines = [describe(p) for p in left]
    kill(left)
    message = (f"{len(lines)} process(es) started during the run were still alive {grace_s:g} s after "
               "the last test (killed now):\n" + "\n".join("  " + line for line in lines))
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        print(message, file=sys.stderr)
    else:
        # an error of its own: listed under ERRORS ("ERROR at teardown of the process guard"), in the
        # short summary, and counted in the last line, so the run does not end on a green "passed"
        reporter.stats.setdefault("error", []).append(pytest.TestReport(
            nodeid="tests/conftest.py::process-guard",
            location=("tests/conftest.py", None, "the process guard"), keywords={},
            outcome="failed", longrepr=message, when="teardown"))
        if session.config.option.tbstyle == "no":  # --tb=no hides the ERRORS section: say it here
            reporter.write_line(message, red=True)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    return lines
