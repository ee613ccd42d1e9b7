"""Per-turn memory hygiene: give freed memory back (gc, glibc malloc_trim) and measure what it costs."""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import platform
import time
from typing import Callable


def find_malloc_trim(log: logging.Logger | None = None) -> Callable[[int], int] | None:
    """glibc's malloc_trim via ctypes, or None where the C library is not glibc (musl, macOS)."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError) as exc:  # glibc reported but not loadable under that name
        if log:
            log.warning("malloc_trim unavailable (%s); freed heap stays with the process", exc)
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class Hygiene:
    """What runs after every turn, per the config: gc.collect() and/or malloc_trim(0)."""

    def __init__(self, gc_after_turn: bool, malloc_trim_after_turn: bool,
                 log: logging.Logger | None = None) -> None:
        self.gc_after_turn = gc_after_turn
        self._trim = find_malloc_trim(log) if malloc_trim_after_turn else None

    @property
    def trims(self) -> bool:
        """Whether malloc_trim runs after each turn (asked for and available)."""
        return self._trim is not None

    def __call__(self) -> float:
        """Run the configured steps; return the seconds they took."""
        started = time.perf_counter()
        if self.gc_after_turn:
            gc.collect()
        if self._trim is not None:
            self._trim(0)
        return time.perf_counter() - started


def rss_bytes() -> int:
    """Resident set size of this process (for log lines), 0 where /proc is missing."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: the log line shows 0 rather than failing
        return 0
