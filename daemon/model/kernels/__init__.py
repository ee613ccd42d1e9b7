"""Decode GEMVs that stream each weight once (gemv.cpp, arm.cpp on aarch64) and a whole decode step in
one call (step.cpp): the library shipped in the package (built by `pip install` / `pip wheel`), else
built at first start (an editable checkout) into cache_dir; None without either, and the decoder then
runs torch's own kernels (a log line says so, edgechat_model_info{compiled="unavailable"} too).

torch's batch-1 kernels read bf16 and quantized weights at half the speed memory allows or less
(docs/performance.md); gemv.cpp converts bf16, int8 and int4 weights to fp32 in registers instead.
Built with the system C++ compiler (build.py: no torch headers, about 2 s), one function per ISA
chosen at run time, threads from torch's own OpenMP pool (the library links libgomp.so.1, the one
torch loaded).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import threading
from dataclasses import dataclass
from typing import Callable

import torch

from ...telemetry.labels import COMPILED_STATES
from . import build

_LOG = logging.getLogger("edgechat.kernels")
SOURCES_DIR = build.HERE  # step.cpp and what it includes
PACKAGED = os.path.join(build.HERE, build.LIBRARY)  # what setup.py builds into the wheel
MACHINE = platform.machine().lower()
ARCH = {"amd64": "x86_64", "arm64": "aarch64"}.get(MACHINE, MACHINE)
# edgechat_best_isa()'s levels on each architecture (0 is the portable C++ everywhere)
ISA_LEVELS = {"x86_64": ("generic", "avx2", "avx512", "avx512_bf16", "amx_bf16"),
              "aarch64": ("generic", "neon", "neon_dotprod")}
ISA_NAMES = ISA_LEVELS.get(ARCH, ("generic",))
TOP = len(ISA_NAMES) - 1
# ATen's and oneDNN's own caps (the forced-ISA switches) cap these kernels too
_ATEN_CAP = {"default": 0, "avx2": 1}
_ONEDNN_CAP = {"sse41": 0, "avx": 0, "avx2": 1, "avx2_vnni": 1, "avx2_vnni_2": 1, "avx512_core": 2,
               "avx512_core_vnni": 2, "avx512_core_bf16": 3, "avx10_1_512": 3, "avx512_core_fp16": 3}
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
PACKAGED_STATE, BUILT, UNAVAILABLE, OFF = COMPILED_STATES


@dataclass(frozen=True)
class Library:
    """The loaded kernels and the ISA they run with."""

    lib: ctypes.CDLL
    isa: int
    path: str
    # int8 dot products over int8/int4 weights interleaved 16 rows wide, x quantized to int8 per 32:
    # AVX512-VNNI on x86, SDOT (asimddp) on aarch64
    vnni: bool = False
    source: str = BUILT  # "packaged" (in the wheel) or "built" (at first start, into cache_dir)
    digest: str = ""  # the hash of the sources it was built from (build.source_hash)

    @property
    def isa_name(self) -> str:
        """generic | avx2 | avx512 | avx512_bf16 | amx_bf16 on x86; generic | neon | neon_dotprod on aarch64."""
        return ISA_NAMES[self.isa]

    @property
    def label(self) -> str:
        """The ISA as /readyz and the load line show it: avx512_bf16+vnni, neon_dotprod, avx2, ..."""
        return f"{self.isa_name}+vnni" if self.vnni and ARCH == "x86_64" else self.isa_name


_lock = threading.Lock()
_loaded: dict[str, Library | None] = {}


def isa_cap(environ: dict | None = None) -> int:
    """The highest ISA allowed by ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA (TOP when neither caps it)."""
    env = os.environ if environ is None else environ
    cap = _ATEN_CAP.get(env.get("ATEN_CPU_CAPABILITY", "").lower(), TOP)
    return min(cap, _ONEDNN_CAP.get(env.get("ONEDNN_MAX_CPU_ISA", "").lower(), TOP))


def _build(cache_dir: str) -> str:
    """Compile the sources into cache_dir/kernels (once per source, compiler and machine); its path."""
    cxx = build.compiler()
    if cxx is None:
        raise FileNotFoundError("no C++ compiler (g++, c++ or clang++; or set CXX)")
    sources = build.source_hash(SOURCES_DIR)
    if sources is None:
        raise FileNotFoundError(f"the kernel sources are not all in {SOURCES_DIR}")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256(version.encode() + MACHINE.encode() + sources.encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, "kernels", f"kernels-{key}.so")
    if not os.path.exists(path):
        build.compile_library(path, cxx, SOURCES_DIR)
    return path


def _open(path: str, source: str) -> Library:
    """Load the library at `path` and pick its ISA (OSError when it cannot be loaded)."""
    cdll = ctypes.CDLL(path)
    cdll.edgechat_batch_step.argtypes = [_P, _P, _INT, _INT]
    cdll.edgechat_batch_step.restype = None
    cdll.edgechat_gemv_lin.argtypes = [_P, _P, _P, _I64, _INT, _INT]
    cdll.edgechat_gemv_lin.restype = None
    cdll.edgechat_dequantize.argtypes = [_P, _P, _INT, _INT]
    cdll.edgechat_dequantize.restype = None
    cdll.edgechat_argmax.argtypes = [_P, _P, _I64]
    cdll.edgechat_argmax.restype = _I64
    cdll.edgechat_source_hash.restype = ctypes.c_char_p
    isa = min(cdll.edgechat_best_isa(), isa_cap())
    return Library(cdll, isa, path, vnni=_dot(isa, cdll.edgechat_has_vnni), source=source,
                   digest=cdll.edgechat_source_hash().decode())


def _dot(isa: int, has_vnni: Callable[[], int]) -> bool:
    """Whether the interleaved int8 dot-product kernels run: neon_dotprod on aarch64; on x86 AVX512 with
    VNNI, unless ATen or oneDNN is capped below AVX512."""
    if ARCH == "aarch64":
        return isa >= 2
    return ARCH == "x86_64" and isa >= 2 and isa_cap() >= 3 and bool(has_vnni())


def _packaged(say: Callable[[str], None]) -> Library | None:
    """The library the wheel ships, when it is there, loads, and was built from the sources beside it."""
    if not os.path.exists(PACKAGED):
        return None  # an editable checkout (or a wheel built without kernels)
    try:
        lib = _open(PACKAGED, PACKAGED_STATE)
    except (OSError, AttributeError) as exc:
        say(f"packaged decode kernels {PACKAGED} do not load ({type(exc).__name__}: {exc})")
        return None
    expected = build.source_hash(SOURCES_DIR)  # None where the sources are not shipped beside it
    if expected is not None and lib.digest != expected:
        say(f"packaged decode kernels {PACKAGED} were built from other sources ({lib.digest}, these are "
            f"{expected}): not used")
        return None
    return lib


def load(cache_dir: str, log: Callable[[str], None] | None = None) -> Library | None:
    """The kernels: the packaged library, else one built on first use; None (logged once) where neither
    can be had."""
    say = log or _LOG.info
    with _lock:
        if cache_dir in _loaded:
            return _loaded[cache_dir]
        lib = _packaged(say)
        if lib is None:
            try:
                lib = _open(_build(cache_dir), BUILT)
            except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as exc:
                say(f"decode kernels unavailable ({type(exc).__name__}: {exc}); using torch's kernels "
                    "(about half the decode speed: see docs/deploy.md, \"Is decode on the fast path?\")")
        if lib is not None:
            say(f"decode kernels: {lib.path} ({lib.source}, {lib.label})")
        _loaded[cache_dir] = lib
        return lib


def state() -> str:
    """The compiled kernels of this process: "packaged" or "built" (where the last loaded one came from),
    "unavailable" (asked for, none could be loaded) or "off" (never asked for: kernel=onednn or plain)."""
    with _lock:
        lib = next((lib for lib in reversed(list(_loaded.values())) if lib is not None), None)
        if lib is not None:
            return lib.source
        return UNAVAILABLE if _loaded else OFF


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
