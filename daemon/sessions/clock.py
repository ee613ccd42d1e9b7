"""The sessions' clock: Unix seconds that a step of the wall clock (NTP after a boot without network,
an operator's `date -s`) does not move, agreed on by every process that shares a store.

TTL expiry and turn leases compare stored times with "now". On the wall clock, a step forward by
hours would expire every session at once and take leases from running turns; a step back would
keep leases for hours. So "now" is an anchor plus CLOCK_BOOTTIME (monotonic, counts suspend, the
same in every process of the host): the SQLite store keeps one anchor per boot in its file (the
first process after a boot sets it), the Redis store takes it from Redis's TIME (one clock for
every host sharing it), the memory store from its own start. Times shown to clients
(`created`, `last_active`) are on this clock too: after a step they differ from the wall clock by
the step, until the next boot (SQLite) or restart.
"""
from __future__ import annotations

import time


def boottime() -> float:
    """Seconds since boot, suspend included; steps of the wall clock never move it."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class SteadyClock:
    """anchor + boottime(): Unix seconds as of the anchor, advanced by the boot clock."""

    def __init__(self, offset: float | None = None):
        """offset: wall time minus boottime() at the anchor; None anchors now."""
        self.offset = time.time() - boottime() if offset is None else offset

    def __call__(self) -> float:
        return self.offset + boottime()
