"""Readers of process and host memory for the gauges and the memory budget: cheap, Linux-first, psutil elsewhere."""
from __future__ import annotations

import os
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class ProcSample:
    """One cheap look at a process: what the per-worker gauges show."""

    rss_bytes: int
    vms_bytes: int
    open_fds: int
    threads: int
    cpu_seconds: float
    start_time_s: float
    anon_bytes: int | None = None  # RssAnon: heap, arenas, tensors (None where /proc has no status)
    swap_bytes: int | None = None  # VmSwap: anonymous pages the kernel moved to swap


def process_sample(proc: psutil.Process) -> ProcSample:
    """Read RSS, VMS, fds, threads, CPU, RssAnon and VmSwap of one process (a few /proc reads, ~0.07 ms)."""
    with proc.oneshot():
        mem = proc.memory_info()
        cpu = proc.cpu_times()
        anon_swap = anon_swap_bytes(proc.pid)
        return ProcSample(rss_bytes=mem.rss, vms_bytes=mem.vms, open_fds=_num_fds(proc),
                          threads=proc.num_threads(), cpu_seconds=cpu.user + cpu.system,
                          start_time_s=proc.create_time(),
                          anon_bytes=anon_swap[0] if anon_swap else None,
                          swap_bytes=anon_swap[1] if anon_swap else None)


def anon_swap_bytes(pid: int) -> tuple[int, int] | None:
    """(RssAnon, VmSwap) of a process from /proc/PID/status: what a leak holds in RAM and in swap.

    RSS alone hides a leak whose pages the kernel swapped out; anonymous RSS plus swap does not.
    None off Linux or when the process is gone.
    """
    found: dict[bytes, int] = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                key, _, rest = line.partition(b":")
                if key in (b"RssAnon", b"VmSwap"):
                    found[key] = int(rest.split()[0]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):  # not Linux, the process exited, or an odd kernel
        return None
    if b"RssAnon" not in found:  # kernels before 4.5 have no RssAnon
        return None
    return found[b"RssAnon"], found.get(b"VmSwap", 0)


def _num_fds(proc: psutil.Process) -> int:
    try:
        return proc.num_fds()
    except AttributeError:  # Windows has handles, not fds
        return 0


def unique_memory_bytes(proc: psutil.Process) -> int | None:
    """USS: memory freed if the process exited. Walks page tables (ms per GB mapped): sampler only."""
    try:
        return proc.memory_full_info().uss
    except (psutil.AccessDenied, psutil.NoSuchProcess, OSError):  # hardened /proc, or process gone
        return None


def host_memory() -> tuple[int, int]:
    """Host (available, total) bytes, as `free` shows them."""
    vm = psutil.virtual_memory()
    return vm.available, vm.total


def rss_of(pid: int) -> int:
    """RSS of any process by pid (0 when it is gone or unreadable): /proc/PID/statm, else psutil."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):  # not Linux, or the process just exited
        try:
            return psutil.Process(pid).memory_info().rss
        except (psutil.Error, OSError):
            return 0


def child_pids(ppid: int) -> list[int]:
    """Direct children of a process: /proc/PID/task/*/children (cheap), else psutil's /proc scan."""
    pids: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{ppid}/task"):
            with open(f"/proc/{ppid}/task/{tid}/children", "rb") as fh:
                pids.extend(int(p) for p in fh.read().split())
        return pids
    except OSError:  # kernel without CONFIG_PROC_CHILDREN, or not Linux
        try:
            return [c.pid for c in psutil.Process(ppid).children()]
        except psutil.Error:
            return []


def service_rss_bytes(siblings: bool) -> int:
    """RSS of the whole service: this process, or (under gunicorn) the master plus all its workers.

    Plain RSS sums count shared pages once per process, so this over-estimates when workers share
    copy-on-write pages: the safe side for an alert that compares it with a limit.
    """
    me = os.getpid()
    if not siblings:
        return rss_of(me)
    ppid = os.getppid()
    pids = set(child_pids(ppid)) | {me}
    return rss_of(ppid) + sum(rss_of(p) for p in pids)
