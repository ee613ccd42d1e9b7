"""Decode GEMVs that stream each weight once (gemv.cpp) and a whole decode step in one call (step.cpp),
compiled on first use and cached; None without a compiler, and the decoder then runs torch's own kernels
(a log line says so).

torch's batch-1 kernels read bf16 and quantized weights at half the speed memory allows or less
(docs/performance.md); gemv.cpp converts bf16, int8 and int4 weights to fp32 in registers instead.
Built with the system C++ compiler (no torch headers: about 2 s), one function per ISA chosen at run
time, threads from torch's own OpenMP pool (the library links libgomp.so.1, the one torch loaded).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from typing import Callable

import torch

_LOG = logging.getLogger("edgechat.kernels")
SOURCE = os.path.join(os.path.dirname(__file__), "step.cpp")  # includes gemv.cpp: one unit
SOURCES = (os.path.join(os.path.dirname(__file__), "gemv.cpp"), SOURCE)
ISA_NAMES = ("generic", "avx2", "avx512", "avx512_bf16", "amx_bf16")
TOP = len(ISA_NAMES) - 1
# ATen's and oneDNN's own caps (the forced-ISA switches) cap these kernels too
_ATEN_CAP = {"default": 0, "avx2": 1}
_ONEDNN_CAP = {"sse41": 0, "avx": 0, "avx2": 1, "avx2_vnni": 1, "avx2_vnni_2": 1, "avx512_core": 2,
               "avx512_core_vnni": 2, "avx512_core_bf16": 3, "avx10_1_512": 3, "avx512_core_fp16": 3}
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
# no -march: one binary, the ISA picked at run time. -ffp-contract=off: the compiler may not fuse a scalar
# a*b+c into an FMA in one instantiation of a kernel and not in another (a row's sums must not depend on
# how many rows run beside it)
FLAGS = ("-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")


@dataclass(frozen=True)
class Library:
    """The loaded kernels and the ISA they run with."""

    lib: ctypes.CDLL
    isa: int
    path: str
    vnni: bool = False  # AVX512-VNNI: int8/int4 weights interleaved 16 rows wide, x quantized to int8

    @property
    def isa_name(self) -> str:
        """generic | avx2 | avx512 | avx512_bf16 | amx_bf16."""
        return ISA_NAMES[self.isa]


_lock = threading.Lock()
_loaded: dict[str, Library | None] = {}


def _compiler() -> str | None:
    return next((c for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c and shutil.which(c)), None)


def isa_cap(environ: dict | None = None) -> int:
    """The highest ISA allowed by ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA (TOP when neither caps it)."""
    env = os.environ if environ is None else environ
    cap = _ATEN_CAP.get(env.get("ATEN_CPU_CAPABILITY", "").lower(), TOP)
    return min(cap, _ONEDNN_CAP.get(env.get("ONEDNN_MAX_CPU_ISA", "").lower(), TOP))


def _build(cache_dir: str) -> str:
    """Compile gemv.cpp into cache_dir/kernels (once per source, compiler and machine); its path."""
    cxx = _compiler()
    if cxx is None:
        raise FileNotFoundError("no C++ compiler (g++, c++ or clang++; or set CXX)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest = hashlib.sha256(version.encode() + platform.machine().encode() + " ".join(FLAGS).encode())
    for source in SOURCES:
        with open(source, "rb") as f:
            digest.update(f.read())
    key = digest.hexdigest()[:16]
    folder = os.path.join(cache_dir, "kernels")
    path = os.path.join(folder, f"gemv-{key}.so")
    if os.path.exists(path):
        return path
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        done = subprocess.run([cxx, *FLAGS, "-o", tmp, SOURCE],
                              capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"{cxx} failed: {done.stderr.strip()[-400:]}")
        os.replace(tmp, path)  # atomic: two workers building at once both end with a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load(cache_dir: str, log: Callable[[str], None] | None = None) -> Library | None:
    """The kernels, built on first use; None (logged once) where they cannot be built or loaded."""
    say = log or _LOG.info
    with _lock:
        if cache_dir in _loaded:
            return _loaded[cache_dir]
        lib = None
        try:
            path = _build(cache_dir)
            cdll = ctypes.CDLL(path)
            cdll.edgechat_batch_step.argtypes = [_P, _P, _INT, _INT]
            cdll.edgechat_batch_step.restype = None
            cdll.edgechat_gemv_lin.argtypes = [_P, _P, _P, _I64, _INT, _INT]
            cdll.edgechat_gemv_lin.restype = None
            cdll.edgechat_dequantize.argtypes = [_P, _P, _INT, _INT]
            cdll.edgechat_dequantize.restype = None
            cdll.edgechat_argmax.argtypes = [_P, _P, _I64]
            cdll.edgechat_argmax.restype = _I64
            isa = min(cdll.edgechat_best_isa(), isa_cap())
            lib = Library(cdll, isa, path, vnni=isa >= 2 and isa_cap() >= 3 and bool(cdll.edgechat_has_vnni()))
            say(f"decode kernels: {path} ({lib.isa_name}{', vnni' if lib.vnni else ''})")
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            say(f"decode kernels unavailable ({type(exc).__name__}: {exc}); using torch's kernels")
        _loaded[cache_dir] = lib
        return lib


def current() -> Library | None:
    """The library loaded last (None if none was): what a decoder built without a cache_dir uses."""
    with _lock:
        return next((lib for lib in reversed(list(_loaded.values())) if lib is not None), None)


def argmaxer(lib: Library) -> Callable[[torch.Tensor, torch.Tensor | None], int]:
    """torch.argmax(logits.masked_fill(banned, -inf)) in one pass on one thread (fp32 logits, bool banned)."""
    run = lib.lib.edgechat_argmax

    def argmax(logits: torch.Tensor, banned: torch.Tensor | None) -> int:
        return run(logits.data_ptr(), None if banned is None else banned.data_ptr(), logits.shape[0])
    return argmax


def gemv(lib: Library, kind: str, weights: tuple[torch.Tensor, ...], bias: torch.Tensor | None,
         x: torch.Tensor, out: torch.Tensor) -> None:
    """out[M, N] = x[M, K] W^T (+ bias), all fp32 but W: kind bf16 | f32 (W), int8 (W, row scales fp32),
    int4 (nibbles, scales, minimums); int8g and int4v as kernels.fused packs them."""
    from . import fused  # it imports Library from here
    m, k = x.shape
    lin = fused.lin(kind, weights, bias, out.shape[1], k)
    lib.lib.edgechat_gemv_lin(ctypes.byref(lin), x.data_ptr(), out.data_ptr(), m, lib.isa, torch.get_num_threads())
