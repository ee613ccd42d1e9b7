"""Weights the decode kernels stream, held in transparent huge pages where the kernel grants them.

A decode step reads every weight once, ~1 GB in 4 KiB pages: a TLB miss every 4 KiB caps what two
cores pull from memory (43 GB/s on a 2-core AMD EPYC; 70 GB/s from 2 MiB pages, docs/performance.md).
THP is usually `madvise`-only, so the region is asked for explicitly, before its first touch.
"""
from __future__ import annotations

import ctypes
import logging
import mmap
import os
import weakref

import torch

HUGE = 2 * 1024 * 1024
_LOG = logging.getLogger("edgechat.pages")
_PROT, _FLAGS = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                                  ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):  # not Linux/glibc: plain allocations
        return None


_C = _libc() if os.name == "posix" else None


def _huge_bytes(nbytes: int) -> torch.Tensor | None:
    """nbytes of uint8 starting on a 2 MiB boundary, advised huge; None where it cannot be had."""
    addr = _C.mmap(None, nbytes + HUGE, _PROT, _FLAGS, -1, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return None
    start = -(-addr // HUGE) * HUGE
    # unmap what lies outside [start, start + nbytes): the tail's partial 2 MiB stays in small pages
    if start > addr:
        _C.munmap(addr, start - addr)
    tail = addr + nbytes + HUGE - (start + nbytes)
    if tail:
        _C.munmap(start + nbytes, tail)
    _C.madvise(start, nbytes, _MADV_HUGEPAGE)
    buf = (ctypes.c_uint8 * nbytes).from_address(start)
    weakref.finalize(buf, _C.munmap, start, nbytes)  # when the last tensor viewing it is gone
    return torch.frombuffer(buf, dtype=torch.uint8)


class Arena:
    """Huge-page chunks the weights under 2 MiB are packed into, one arena per decoder (its chunks go
    when the decoder's tensors do); a chunk's pages are resident only once written."""

    CHUNK = 32 * HUGE
    SMALLEST = 64 * 1024  # below this a weight is noise: a plain copy

    def __init__(self) -> None:
        self._chunk: torch.Tensor | None = None
        self._used = 0

    def take(self, nbytes: int) -> torch.Tensor | None:
        """nbytes of uint8 in the current chunk (a new one when full), 4 KiB-aligned; None without mmap."""
        start = -(-self._used // 4096) * 4096
        if self._chunk is None or start + nbytes > self._chunk.numel():
            chunk = _huge_bytes(self.CHUNK) if _C is not None else None
            if chunk is None:
                return None
            self._chunk, start = chunk, 0
        self._used = start + nbytes
        return self._chunk[start:start + nbytes]


def huge_copy(t: torch.Tensor, arena: Arena | None = None) -> torch.Tensor:
    """A contiguous copy of `t` in huge pages: its own mapping from 2 MiB, a slice of `arena` below (a
    plain copy for tiny tensors, without an arena, or without mmap)."""
    nbytes = t.numel() * t.element_size()
    raw = None
    if _C is not None and nbytes >= HUGE:
        raw = _huge_bytes(nbytes)
    elif arena is not None and nbytes >= Arena.SMALLEST:
        raw = arena.take(nbytes)
    if raw is None:
        return t.clone(memory_format=torch.contiguous_format)
    out = raw.view(t.dtype).view(t.shape)
    out.copy_(t)
    return out


def huge_bytes_held() -> int:
    """Bytes of this process in transparent huge pages (AnonHugePages; 0 where /proc cannot say)."""
    try:
        with open("/proc/self/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):  # not Linux, or an older kernel without smaps_rollup
        pass
    return 0
