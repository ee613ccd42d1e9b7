"""The memory budget, owned here alone: the limit, what the service uses against it, and the soft/hard levels.

One `MemoryBudget` is built per worker (`from_config`); the metrics sampler, the memory watchdog, the
KV pool's pressure check and /v1/stats all read memory through it, so the gauges, the alerts and the
watchdog's decisions always compare the same figures with the same limit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..telemetry.process import host_memory, service_rss_bytes
from .cgroup import NO_LIMIT, CgroupMemory

OK, SOFT, HARD = 0, 1, 2  # memory pressure levels: below soft, above soft (freeing), above hard (refusing)


def memory_limit(config_bytes: int, cgroup_bytes: int | None, host_total: int) -> tuple[int, str]:
    """The memory budget and where it came from: explicit config wins, then the cgroup, then the host.

    An explicit setting is an operator's statement about this service (e.g. a box shared with other
    services), so it beats a cgroup limit; a cgroup limit above the host's RAM can never be reached,
    so the host total caps it.
    """
    if config_bytes > 0:
        return config_bytes, "config"
    if cgroup_bytes is not None and cgroup_bytes < NO_LIMIT:
        return min(cgroup_bytes, host_total), "cgroup"
    return host_total, "host"


@dataclass(frozen=True)
class MemoryReading:
    """The host, the limit the service lives under, and what the service uses against it."""

    host_available: int
    host_total: int
    limit: int
    limit_source: str  # config | cgroup | host
    service: int  # what counts: working set (usage minus inactive page cache) in a limited cgroup
    charged: int  # the cgroup's raw usage incl. reclaimable page cache; = service outside a cgroup

    @property
    def ratio(self) -> float | None:
        """service / limit, None when no limit is known."""
        return self.service / self.limit if self.limit > 0 else None


def read_memory(cgroup: CgroupMemory | None, config_limit: int, siblings: bool) -> MemoryReading:
    """Read memory now: in a cgroup with a limit, its working set; else the RSS sum.

    The working set (usage minus inactive file pages) is what the kernel cannot simply reclaim
    before it OOM-kills, so alerts and the watchdog compare it, not the raw usage, with the limit:
    a model file's page cache alone would otherwise look like a leak (seen in the soak runs).
    """
    available, total = host_memory()
    cg_limit = cgroup.limit_bytes() if cgroup is not None else None
    limit, source = memory_limit(config_limit, cg_limit, total)
    if cgroup is not None and cg_limit is not None:
        charged = cgroup.current_bytes() or 0
        service = cgroup.working_set_bytes() or charged
    else:
        service = charged = service_rss_bytes(siblings)
    return MemoryReading(available, total, limit, source, service, charged)


class MemoryBudget:
    """This worker's budget: read() the service against its limit, level() a ratio against soft/hard."""

    def __init__(self, config_limit: int, soft_ratio: float, hard_ratio: float, *, siblings: bool,
                 read: Callable[[], MemoryReading] | None = None):
        """siblings: the service is the gunicorn master plus all its workers (multiprocess mode).
        read: an injected reader (tests); by default this process's cgroup, found once, or the RSS sum."""
        if not 0 < soft_ratio < hard_ratio <= 1:
            raise ValueError(f"need 0 < memory_soft_limit_ratio < memory_hard_limit_ratio <= 1, "
                             f"got {soft_ratio!r}, {hard_ratio!r}")
        self.config_limit, self.siblings = config_limit, siblings
        self.soft_ratio, self.hard_ratio = soft_ratio, hard_ratio
        if read is None:
            cgroup = CgroupMemory.detect()
            read = lambda: read_memory(cgroup, config_limit, siblings)  # noqa: E731
        self.read = read

    @classmethod
    def from_config(cls, cfg, *, siblings: bool) -> "MemoryBudget":
        """The budget the config describes (memory_limit_bytes, memory_soft/hard_limit_ratio)."""
        return cls(cfg.memory_limit_bytes, cfg.memory_soft_limit_ratio, cfg.memory_hard_limit_ratio,
                   siblings=siblings)

    def level(self, ratio: float) -> int:
        """OK, SOFT or HARD for a service/limit ratio."""
        return HARD if ratio >= self.hard_ratio else SOFT if ratio >= self.soft_ratio else OK

    def above_soft(self) -> bool:
        """Whether the service is above the soft limit now (the KV pool keeps no cache idle then)."""
        ratio = self.read().ratio
        return ratio is not None and ratio >= self.soft_ratio
