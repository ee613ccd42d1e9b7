"""The process guard (support/processes.py, wired in conftest.py): what it finds, and that a process left
running fails a pytest session that otherwise passed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import psutil
import pytest

from support import TESTS_DIR, processes


def baseline_now() -> processes.Baseline:
    """A baseline taken now, under the running session's mark (begin() would replace the mark)."""
    existing = frozenset((p.pid, p.create_time()) for p in psutil.Process().children(recursive=True))
    return processes.Baseline(os.getpid(), os.environ[processes.MARK_ENV], existing)


def pids(procs) -> set[int]:
    return {p.pid for p in procs}


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait(10)


def wait_until(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_tracked_process_left_running_is_found_until_it_is_gone():
    baseline = baseline_now()
    proc = processes.track(subprocess.Popen(["sleep", "300"], start_new_session=True))
    try:
        assert proc.pid in pids(processes.leftovers(baseline))
        assert f"pid {proc.pid}: sleep 300" in [processes.describe(p) for p in processes.leftovers(baseline)]
    finally:
        stop(proc)
    assert proc.pid not in pids(processes.leftovers(baseline))


def test_an_orphan_is_found_by_the_runs_mark():
    """Its parent exited: no walk from pytest or from a tracked process reaches it; the mark does."""
    baseline = baseline_now()
    out = subprocess.run(["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"], capture_output=True,
                         text=True, timeout=30, check=True)
    orphan = psutil.Process(int(out.stdout))
    try:
        assert orphan.pid not in pids(psutil.Process().children(recursive=True))
        assert orphan.environ()[processes.MARK_ENV] == baseline.mark
        assert orphan.pid in pids(processes.leftovers(baseline))
    finally:
        processes.kill([orphan])
    assert orphan.pid not in pids(processes.leftovers(baseline))


def test_the_children_of_a_tracked_process_are_found():
    """A gunicorn master forks its workers: they are found with it (here not descendants of pytest)."""
    baseline = baseline_now()
    # a parent in its own session that starts a child and outlives it by nothing: both are left
    parent = processes.track(subprocess.Popen(
        ["sh", "-c", "sleep 300 & echo $!; wait"], stdout=subprocess.PIPE, text=True, start_new_session=True))
    try:
        child = int(parent.stdout.readline())
        assert {parent.pid, child} <= pids(processes.leftovers(baseline))
    finally:
        processes.kill([psutil.Process(child)])
        stop(parent)
    assert not {parent.pid, child} & pids(processes.leftovers(baseline))


def test_what_ran_before_the_baseline_and_zombies_are_not_left_over():
    earlier = subprocess.Popen(["sleep", "300"])
    zombie = None
    try:
        baseline = baseline_now()
        assert earlier.pid not in pids(processes.leftovers(baseline))
        zombie = processes.track(subprocess.Popen(["sleep", "300"]))
        assert zombie.pid in pids(processes.leftovers(baseline))
        os.kill(zombie.pid, signal.SIGKILL)  # dead, and not reaped (no wait() yet): a zombie
        wait_until(lambda: psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE, "the zombie")
        assert zombie.pid not in pids(processes.leftovers(baseline))
    finally:
        stop(earlier)
        if zombie is not None:
            zombie.wait(10)


# --- a whole pytest session, run in a child process with the guard wired as conftest.py wires it ------
CONFTEST = """
from support import processes

def pytest_sessionstart(session):
    processes.session_started(session)

def pytest_sessionfinish(session):
    processes.session_finished(session, grace_s=1.0)
"""

TEST = """
import json, subprocess
import psutil
from support.processes import track

def test_starts_a_process(tmp_path_factory):
    proc = track(subprocess.Popen(["sleep", "300"], start_new_session=True))
    with open({record!r}, "w") as out:
        json.dump([proc.pid, psutil.Process(proc.pid).create_time()], out)
    if {stop_it!r}:
        proc.kill()
        proc.wait(10)
"""


def run_session(pytester, monkeypatch, stop_it: bool):
    monkeypatch.setenv("PYTHONPATH", str(TESTS_DIR))
    record = pytester.path / "started.json"
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_leaves=TEST.format(record=str(record), stop_it=stop_it))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    pid, created = json.loads(record.read_text())
    return result, pid, created


def still_running(pid: int, created: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_process_left_running_fails_the_session_and_is_killed(pytester, monkeypatch):
    result, pid, created = run_session(pytester, monkeypatch, stop_it=False)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*ERROR at teardown of the process guard*",
                                 "*1 process(es) started during the run were still alive*",
                                 f"*pid {pid}: sleep 300*", "*1 passed, 1 error*"])
    assert not still_running(pid, created)


def test_a_session_that_stops_what_it_started_passes(pytester, monkeypatch):
    result, pid, created = run_session(pytester, monkeypatch, stop_it=True)
    assert result.ret == pytest.ExitCode.OK
    result.assert_outcomes(passed=1)
    assert "process guard" not in result.stdout.str()
    assert not still_running(pid, created)
