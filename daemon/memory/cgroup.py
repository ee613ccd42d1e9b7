"""The memory cgroup that bounds this process (v2 or v1): found once per worker, read on every refresh."""
from __future__ import annotations

import os

# cgroup v1 reports "no limit" as LONG_MAX rounded down to a page (9223372036854771712); v2 as "max".
# Anything this large is no limit on any real machine.
NO_LIMIT = 1 << 60


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
        return value if value is not None and value < NO_LIMIT else None

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
        limit = limit if limit is not None and limit < NO_LIMIT else None
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
