"""What the CPU offers the model: native bf16, physical cores; the dtype and thread settings that follow."""
from __future__ import annotations

import os
from typing import Any


def cpu_has_bf16() -> bool:
    """Whether the CPU computes bf16 natively (AVX512-BF16 or AMX), from /proc/cpuinfo flags."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:  # not Linux: assume no native bf16
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(setting: str, checkpoint: Any = None) -> str:
    """The dtype to load with. "auto": the checkpoint's own bfloat16 where the CPU computes bf16
    natively, else float32 (bf16 without AVX512-BF16/AMX, and float16 on CPUs, are slow emulations;
    an unknown checkpoint dtype counts as bf16, as Qwen2.5 and most current releases are)."""
    if setting != "auto":
        return setting
    name = str(checkpoint).removeprefix("torch.") if checkpoint is not None else "bfloat16"
    return "bfloat16" if name == "bfloat16" and cpu_has_bf16() else "float32"


def physical_cores() -> int:
    """Physical cores this process may use (hyperthreads only slow down GEMV-bound decoding)."""
    import psutil

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(psutil.cpu_count(logical=False) or usable, usable))


def set_threads(threads: int) -> int:
    """Set torch's intra-op threads (0 = physical cores) and one inter-op thread; returns intra-op."""
    import torch

    n = threads or physical_cores()
    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # settable once per process, before inter-op work; a second Engine keeps it
        pass
    return n
