"""Heap walks (GC tracked-object counts, the object census) never break another thread's work.

gc.get_objects() lists a tuple that another thread is still building from a generator; a walk that
holds that list while the builder runs makes the builder's `tuple(...)` raise SystemError
("Objects/tupleobject.c: bad argument to internal function"). Before the walks ran inside C calls,
each of these failed within a fraction of a second.
"""
from __future__ import annotations

import sys
import threading
import time

import pytest

from daemon.memory import census
from daemon.telemetry import gcstats

WALK_S = 3.0
SIZES = (50, 100, 200, 20_000)  # tuples resized at different moments: the race shows sooner


def _report() -> None:
    keeper = census.CensusKeeper()
    keeper.mark()
    keeper.report(5)


WALKS = {
    "tracked_objects": gcstats.tracked_objects,
    "census": lambda: census.take(collect=False, ids=True),
    "census_report": _report,
}


@pytest.mark.parametrize("walk", sorted(WALKS))
def test_walk_does_not_break_tuples_built_in_other_threads(walk):
    errors: list[BaseException] = []
    stop = threading.Event()
    built = [0]

    def builder(size: int) -> None:
        while not stop.is_set():
            try:
                tuple(x for x in range(size))  # a generator: the tuple grows while bytecode runs
            except SystemError as exc:
                errors.append(exc)
                return
            built[0] += 1

    threads = [threading.Thread(target=builder, args=(size,), daemon=True) for size in SIZES]
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # frequent switches: the race shows within a few walks
    for t in threads:
        t.start()
    walks, deadline = 0, time.monotonic() + WALK_S
    try:
        while time.monotonic() < deadline and not errors:
            WALKS[walk]()
            walks += 1
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        sys.setswitchinterval(switch)
    assert not errors, f"{walk} broke a tuple being built in another thread: {errors[0]!r}"
    assert walks and built[0], (walks, built[0])  # both sides really ran


class Probe:
    """Instances to find in a census."""


def test_census_counts_by_type_and_in_all():
    keep = [Probe() for _ in range(1000)]
    now = census.take(collect=True, ids=True)
    assert now.counts[census.type_name(Probe)] == 1000
    assert now.objects >= sum(now.counts.values())  # objects of classes gone since the walk count too
    del keep
