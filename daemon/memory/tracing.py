"""tracemalloc on demand: top allocation sites, a baseline snapshot and the sites that grew since, per worker.

tracemalloc sees what Python's allocator hands out (objects, strings, lists): the history bug's
`history.append` lines, caches of Python objects. Tensor storage comes from torch's own allocator and is
invisible here (the object census in census.py counts it). Tracing costs CPU on every allocation
and memory per live allocation (more with more `tracemalloc_frames`), so it is off unless asked for;
a snapshot walks every trace while holding the GIL (~1-2 s with a model loaded, on a busy 2-core box).
"""
from __future__ import annotations

import json
import linecache
import logging
import os
import threading
import time
import tracemalloc
from dataclasses import dataclass
from typing import Callable

from .census import CENSUS_EVERY_S, CensusKeeper, CensusListener

GROUP_BY = ("lineno", "traceback")
# Frames that say nothing about the program, dropped as tracemalloc's documented display_top recipe drops them (matched on
# the allocating frame, like tracemalloc.Filter(False, name)), plus this machinery's own files
# (the baseline census's type names would otherwise top every diff).
DROPPED_FILES = frozenset({"<frozen importlib._bootstrap>", "<frozen importlib._bootstrap_external>",
                           "<unknown>", tracemalloc.__file__, linecache.__file__, __file__,
                           __file__.replace("tracing.py", "census.py"),
                           __file__.replace("tracing.py", "heapwalk.py")})
# The tracing switch every worker of one server follows, in the shared multiprocess folder (not *.db:
# invisible to the metrics collectors): a request reaches one worker, the others pick it up within
# metrics_refresh_s. Quick requests land on one worker almost every time, so asking each does not work.
SHARED_SWITCH = ".edgechat-tracemalloc.json"
log = logging.getLogger("edgechat.diagnostics")


class TracingOff(RuntimeError):
    """tracemalloc is not tracing in this process, so there is nothing to report."""


class NoBaseline(RuntimeError):
    """diff() was asked for before any baseline snapshot (or tracing restarted since)."""


def _frame(frame: tracemalloc.Frame) -> dict:
    return {"file": frame.filename, "line": frame.lineno,
            "source": linecache.getline(frame.filename, frame.lineno).strip()}


def _entry(stat: tracemalloc.Statistic, group_by: str, base: tuple[int, int] | None = None,
           diff: bool = False) -> dict:
    """One allocation site: the allocating frame's file, line and source; the whole stack for traceback."""
    frames = list(stat.traceback)  # oldest first, the allocating frame last
    entry = {**_frame(frames[-1]), "size_bytes": stat.size, "count": stat.count}
    if diff:
        entry["size_diff_bytes"] = stat.size - (base[0] if base else 0)
        entry["count_diff"] = stat.count - (base[1] if base else 0)
    if group_by == "traceback":
        entry["traceback"] = [_frame(f) for f in frames]
    return entry


def _grouped(snapshot: tracemalloc.Snapshot, group_by: str) -> dict:
    """{traceback: Statistic} for the sites worth showing. Statistics() walks every trace in Python
    (seconds for a million traces), so the filters apply to its result rather than to the traces."""
    return {s.traceback: s for s in snapshot.statistics(_key(group_by))
            if s.traceback[-1].filename not in DROPPED_FILES}


def _sizes(grouped: dict) -> dict:
    """{traceback: (size, count)}: what a baseline keeps of each site (a Statistic object less per site)."""
    return {tb: (s.size, s.count) for tb, s in grouped.items()}


@dataclass
class _Baseline:
    taken_at: float
    groups: dict  # group_by -> {traceback: (size, count)}


class Tracer:
    """This worker's tracemalloc: start/stop at run time, top sites, one baseline and the growth since.

    The baseline keeps grouped sizes, not the snapshot: one entry per allocation site rather than
    per live allocation (tens of thousands of sites, a few MB, when tracing started with the process),
    and each later diff groups only the new snapshot.
    """

    def __init__(self, frames: int = 1, shared_dir: str | None = None):
        """shared_dir: the folder all workers of this server share (multiprocess metrics), if any."""
        self.frames = frames
        self._lock = threading.Lock()  # one snapshot at a time: each costs memory and GIL time
        self._baseline: _Baseline | None = None
        self._switch = os.path.join(shared_dir, SHARED_SWITCH) if shared_dir else None
        self._applied: dict | None = None  # the shared switch state last published or followed

    @property
    def tracing(self) -> bool:
        """Whether tracemalloc traces allocations in this process now."""
        return tracemalloc.is_tracing()

    def start(self) -> bool:
        """Start tracing with `frames` frames per trace, here and in the other workers; False when it
        already traced here."""
        self._publish(True)
        return self._start()

    def stop(self) -> bool:
        """Stop tracing here and in the other workers; False when it was off here."""
        self._publish(False)
        return self._stop()

    def follow(self) -> bool:
        """Apply a switch another worker of this server published; True when tracing changed here."""
        if self._switch is None:
            return False
        try:
            with open(self._switch, encoding="utf-8") as fh:
                state = json.load(fh)
        except (OSError, ValueError):  # nothing published yet (writes are atomic renames)
            return False
        if state == self._applied or state.get("server") != os.getppid():  # a previous server's file
            return False
        self._applied = state
        return self._start() if state.get("enabled") else self._stop()

    def _publish(self, enabled: bool) -> None:
        if self._switch is None:
            return
        state = {"server": os.getppid(), "enabled": enabled}
        tmp = f"{self._switch}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(state, fh)
            os.replace(tmp, self._switch)
            self._applied = state
        except OSError as exc:  # a read-only folder: this worker still switches, the others do not
            log.warning("cannot share the tracemalloc switch with the other workers: %s", exc)

    def _start(self) -> bool:
        if tracemalloc.is_tracing():
            return False
        tracemalloc.start(self.frames)
        return True

    def _stop(self) -> bool:
        """Stop tracing and forget the baseline (its traces no longer match)."""
        with self._lock:
            self._baseline = None
            if not tracemalloc.is_tracing():
                return False
            tracemalloc.stop()
            return True

    def status(self) -> dict:
        """Tracing state, traced and peak bytes, frames per trace and the baseline's time."""
        traced, peak = tracemalloc.get_traced_memory()
        base = self._baseline
        return {"tracing": self.tracing, "frames": tracemalloc.get_traceback_limit() if self.tracing
                else self.frames, "traced_bytes": traced, "peak_bytes": peak,
                "baseline_at": None if base is None else base.taken_at}

    def _snapshot(self) -> tracemalloc.Snapshot:
        if not tracemalloc.is_tracing():
            raise TracingOff("tracemalloc is off")
        return tracemalloc.take_snapshot()

    def top(self, limit: int, group_by: str = "lineno") -> list[dict]:
        """The `limit` sites holding the most traced memory now."""
        _key(group_by)
        with self._lock:
            stats = _grouped(self._snapshot(), group_by)
        ranked = sorted(stats.values(), key=lambda s: s.size, reverse=True)[:limit]
        return [_entry(s, group_by) for s in ranked]

    def mark(self) -> float:
        """Take the baseline that diff() compares against; returns its time (Unix s)."""
        with self._lock:
            snapshot = self._snapshot()
            lineno = _sizes(_grouped(snapshot, "lineno"))
            # with one frame per trace, grouping by traceback is grouping by line
            traceback = lineno if tracemalloc.get_traceback_limit() == 1 else _sizes(_grouped(snapshot, "traceback"))
            del snapshot
            self._baseline = _Baseline(time.time(), {"lineno": lineno, "traceback": traceback})
            return self._baseline.taken_at

    def diff(self, limit: int, group_by: str = "lineno") -> list[dict]:
        """The `limit` sites that grew most since the baseline, biggest growth first (growth only)."""
        _key(group_by)
        with self._lock:
            if not tracemalloc.is_tracing():
                raise TracingOff("tracemalloc is off")
            base = self._baseline
            if base is None:
                raise NoBaseline("no baseline")
            now = _grouped(self._snapshot(), group_by)
        before = base.groups[group_by]
        grown = [(s.size - (before[tb][0] if tb in before else 0), s) for tb, s in now.items()]
        grown = sorted((g for g in grown if g[0] > 0), key=lambda g: g[0], reverse=True)[:limit]
        return [_entry(s, group_by, before.get(s.traceback), diff=True) for _, s in grown]


def _key(group_by: str) -> str:
    if group_by not in GROUP_BY:
        raise ValueError(f"group_by must be one of {', '.join(GROUP_BY)}, got {group_by!r}")
    return group_by


@dataclass
class Diagnostics:
    """What the admin endpoints work with in this worker: its tracer and its census keeper."""

    tracer: Tracer
    census: CensusKeeper

    @classmethod
    def for_config(cls, cfg, census_listener: CensusListener | None,
                   shared_dir: str | None) -> "Diagnostics":
        """A tracer following the switch in `shared_dir` (the multiprocess folder) and a census keeper."""
        return cls(Tracer(cfg.tracemalloc_frames, shared_dir), CensusKeeper(census_listener))


def start(diag: Diagnostics, on_tracing: Callable[[], None], tick_s: float,
          stop: threading.Event) -> None:
    """A thread follows the shared tracing switch every tick_s (calling on_tracing while tracing) and
    refreshes the census gauges at a low rate (first one tick after start), until `stop` is set."""
    def loop() -> None:
        census_due = 0.0
        while not stop.wait(tick_s):
            try:
                if diag.tracer.follow() and diag.tracer.tracing:
                    on_tracing()
                if time.monotonic() >= census_due:
                    census_due = time.monotonic() + max(CENSUS_EVERY_S, tick_s)
                    diag.census.take(collect=False, ids=False)  # the GC runs on its own schedule
            except Exception:  # noqa: BLE001 - one failed tick must not end the thread for good
                log.exception("diagnostics tick failed")
    threading.Thread(target=loop, name="edgechat-diagnostics", daemon=True).start()
