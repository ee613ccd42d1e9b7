"""Readers of process, host and cgroup memory for the metrics gauges: cheap, Linux-first, psutil elsewhere."""
from __future__ import annotations

import os
from dataclasses import dataclass

import psutil

# cgroup v1 reports "no limit" as LONG_MAX rounded down to a page (9223372036854771712); v2 as "max".
# Anything this large is no limit on any real machine.
_NO_LIMIT = 1 << 60


@dataclass(frozen=True)
class ProcSample:
    """One cheap look at a process: what the per-worker gauges show."""

    rss_bytes: int
    vms_bytes: int
    open_fds: int
    threads: int
    cpu_seconds: float
    start_time_s: float


def process_sample(proc: psutil.Process) -> ProcSample:
    """Read RSS, VMS, fds, threads and CPU of one process (a few /proc reads, ~0.05 ms)."""
    with proc.oneshot():
        mem = proc.memory_info()
        cpu = proc.cpu_times()
        return ProcSample(rss_bytes=mem.rss, vms_bytes=mem.vms, open_fds=_num_fds(proc),
                          threads=proc.num_threads(), cpu_seconds=cpu.user + cpu.system,
                          start_time_s=proc.create_time())


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


def memory_limit(config_bytes: int, cgroup_bytes: int | None, host_total: int) -> tuple[int, str]:
    """The memory budget and where it came from: explicit config wins, then the cgroup, then the host.

    An explicit setting is an operator's statement about this service (e.g. a box shared with other
    services), so it beats a cgroup limit; a cgroup limit above the host's RAM can never be reached,
    so the host total caps it.
    """
    if config_bytes > 0:
        return config_bytes, "config"
    if cgroup_bytes is not None and cgroup_bytes < _NO_LIMIT:
        return min(cgroup_bytes, host_total), "cgroup"
    return host_total, "host"


@dataclass(frozen=True)
class MemoryBudget:
    """The host, the limit the service lives under, and what the service uses against it."""

    host_available: int
    host_total: int
    limit: int
    limit_source: str  # config | cgroup | host
    service: int  # what counts: working set (usage minus inactive page cache) in a limited cgroup
    charged: int  # the cgroup's raw usage incl. reclaimable page cache; = service outside a cgroup


def memory_budget(cgroup: "CgroupMemory | None", config_limit: int, siblings: bool) -> MemoryBudget:
    """Read the budget now: in a cgroup with a limit, its working set; else the RSS sum.

    The working set (usage minus inactive file pages) is what the kernel cannot simply reclaim
    before it OOM-kills, so alerts and the watchdog compare it, not the raw usage, with the limit:
    a model file's page cache alone would otherwise look like a leak (seen in the soak runs).
    """
    available, total = host_memory()
    cg_limit = cgroup.limit_bytes() if cgroup is not None else None
    limit, source = memory_limit(config_limit, cg_limit, total)
    if cg_limit is not None:
        charged = cgroup.current_bytes() or 0
        service = cgroup.working_set_bytes() or charged
    else:
        service = charged = service_rss_bytes(siblings)
    return MemoryBudget(available, total, limit, source, service, charged)


class CgroupMemory:
    """The memory cgroup that bounds this process (v2 or v1): files resolved once, read per refresh.

    The limiting level is the ancestor (or self) with the smallest limit: a systemd slice's
    MemoryMax bounds every service below it. Its usage file is what the kernel compares with it.
    """

    def __init__(self, version: int, directory: str, limit: int | None):
        self.version = version
        self.directory = directory
        self._limit = limit
        self._current = os.path.join(directory, "memory.current" if version == 2
                                     else "memory.usage_in_bytes")
        self._stat = os.path.join(directory, "memory.stat")
        self._limit_file = os.path.join(directory, "memory.max" if version == 2
                                        else "memory.limit_in_bytes")

    @classmethod
    def detect(cls, proc_self: str = "/proc/self", root: str = "") -> "CgroupMemory | None":
        """Find this process's memory cgroup; None when there is none (not Linux, no controller)."""
        try:
            with open(os.path.join(proc_self, "cgroup")) as fh:
                membership = fh.read().splitlines()
            with open(os.path.join(proc_self, "mountinfo")) as fh:
                mounts = fh.read().splitlines()
        except OSError:  # not Linux
            return None
        for version in (2, 1):
            found = _resolve(version, membership, mounts, root)
            if found is not None:
                return cls(version, *found)
        return None

    def limit_bytes(self) -> int | None:
        """The limit in force now (re-read: `systemctl set-property` can change it), None = no limit."""
        value = _read_number(self._limit_file)
        return value if value is not None and value < _NO_LIMIT else None

    def current_bytes(self) -> int | None:
        """memory.current (v2) / memory.usage_in_bytes (v1): all memory charged, page cache included."""
        return _read_number(self._current)

    def working_set_bytes(self) -> int | None:
        """Usage minus inactive file cache, what the kernel cannot reclaim cheaply (kubelet's formula)."""
        current = self.current_bytes()
        if current is None:
            return None
        key = "inactive_file" if self.version == 2 else "total_inactive_file"
        try:
            with open(self._stat) as fh:
                for line in fh:
                    name, _, value = line.partition(" ")
                    if name == key:
                        return max(current - int(value), 0)
        except (OSError, ValueError):  # stat file missing or malformed: report plain usage
            pass
        return current


def _read_number(path: str) -> int | None:
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _resolve(version: int, membership: list[str], mounts: list[str],
             root: str) -> tuple[str, int | None] | None:
    """(directory of the limiting level, its limit) for one cgroup version, or None if absent."""
    cg_path = None
    for line in membership:
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if version == 2 and hier == "0" and controllers == "":
            cg_path = path
        elif version == 1 and "memory" in controllers.split(","):
            cg_path = path
    if cg_path is None:
        return None
    mount = _mount_of(version, mounts)
    if mount is None:
        return None
    mount_root, mount_point = mount
    rel = os.path.relpath(cg_path, mount_root) if cg_path.startswith(mount_root) else cg_path
    rel = "" if rel in (".", "/") else rel.lstrip("/")
    top = root + mount_point
    probe = "memory.current" if version == 2 else "memory.usage_in_bytes"
    limit_name = "memory.max" if version == 2 else "memory.limit_in_bytes"
    best: tuple[str, int | None] | None = None
    parts = rel.split("/") if rel else []
    for depth in range(len(parts), -1, -1):
        directory = os.path.join(top, *parts[:depth])
        if not os.path.exists(os.path.join(directory, probe)):
            continue
        limit = _read_number(os.path.join(directory, limit_name))
        limit = limit if limit is not None and limit < _NO_LIMIT else None
        if best is None or (limit is not None and (best[1] is None or limit < best[1])):
            best = (directory, limit)
    return best


def _mount_of(version: int, mounts: list[str]) -> tuple[str, str] | None:
    """(root, mount point) of the cgroup2 mount, or of the v1 mount carrying the memory controller."""
    for line in mounts:
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, extra = left.split(), right.split()
        if len(fields) < 5 or len(extra) < 3:
            continue
        fstype, superopts = extra[0], extra[2].split(",")
        if version == 2 and fstype == "cgroup2":
            return fields[3], fields[4]
        if version == 1 and fstype == "cgroup" and "memory" in superopts:
            return fields[3], fields[4]
    return None
