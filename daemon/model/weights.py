"""How the lean decoder holds weights: fused, prepacked for oneDNN, or int8; and how the float
checkpoint's memory is given back once they are (views re-pointed, copies freed, mapped pages dropped).

Plain bf16 `F.linear` with one row reorders its weight into oneDNN's blocked layout on every call,
so it reads the weights about twice: half the speed the memory allows (the tied 151936-row lm_head
alone took ~40 ms a token on one core here). Prepacking once removes that (docs/performance.md).
"""
from __future__ import annotations

import ctypes
import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .kernels import fused
from .pages import Arena, huge_copy
from .quant import (dequantize_int4, dequantize_rows, equalize, quantize_groups8, quantize_int4, quantize_rows,
                    split_outliers)

# rows of x up to which the streaming GEMV runs; above (prefill), oneDNN's GEMM on the (dequantized) weight
GEMV_ROWS = 8
MODES = ("plain", "packed", "native", "int8", "int4")


@functools.lru_cache(maxsize=None)
def can_pack(dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether oneDNN can hold `dtype` weights prepacked for its GEMV kernels: x86 builds of torch, and
    for bf16 a CPU (or ONEDNN_MAX_CPU_ISA) with AVX512BW/VL/DQ or AVX-NE-CONVERT (tried once)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 1)
    except RuntimeError:  # "bf16 path needs the cpu support ..."
        return False
    return True


Linear = Callable[[torch.Tensor], torch.Tensor]


class Streamed:
    """A linear on the compiled kernels for one to GEMV_ROWS rows of x (decode), `big` above (prefill);
    `lin` describes it to step.cpp, outlier columns (kept apart in fp32) included."""

    def __init__(self, lib: kernels.Library, kind: str, weights: tuple, bias: torch.Tensor | None, n: int,
                 big: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 outliers: tuple[torch.Tensor, torch.Tensor] | None = None, arena: Arena | None = None) -> None:
        """The weight (weights[0]) is copied into huge pages (small ones into `arena`); prefill runs
        oneDNN's GEMM on it (or on dequantized())."""
        self.lib, self.kind, self.n, self.outliers, self.bias = lib, kind, n, outliers, bias
        self.weights = (huge_copy(weights[0], arena), *weights[1:])
        self.big = big or (lambda x: F.linear(x, self.weights[0] if kind in ("bf16", "f32")
                                              else self.dequantized(x.dtype), self.bias))
        self.bias32 = None if bias is None else bias.float().contiguous()
        self.k = weights[0].shape[1] * {"int4": 2, "int8g": 4, "int4v": 32}.get(kind, 1)  # columns of W
        self.lin = fused.lin(kind, self.weights, self.bias32, n, self.k, outliers)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] > GEMV_ROWS:
            return self.big(x)
        x32 = x2.float().contiguous()
        out = torch.empty(x2.shape[0], self.n, dtype=torch.float32)
        self.lib.lib.edgechat_gemv_lin(ctypes.byref(self.lin), x32.data_ptr(), out.data_ptr(), x2.shape[0],
                                       self.lib.isa, torch.get_num_threads())
        return out.to(x.dtype).view(*x.shape[:-1], self.n)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The float weight [n, k] this quantized linear stands for (outlier columns back in place)."""
        out = torch.empty(self.n, self.k, dtype=torch.float32 if dtype == torch.float32 else torch.bfloat16)
        self.lib.lib.edgechat_dequantize(ctypes.byref(self.lin), out.data_ptr(), int(out.dtype == torch.float32),
                                         torch.get_num_threads())
        return out.to(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the weight as `dtype` (a tied lm_head serving the embedding lookups)."""
        w = self.weights[0]
        if self.kind in ("bf16", "f32"):
            return F.embedding(ids, w).to(dtype)
        if self.kind == "int8":
            return (w[ids].to(torch.float32) * self.weights[1][ids].unsqueeze(-1)).to(dtype)
        if self.kind != "int8g":
            raise ValueError(f"no row lookup for {self.kind} weights")
        block, row = ids // fused.ROWS, ids % fused.ROWS  # the interleaved layout: 16 rows side by side
        q = w[block, :, row].reshape(*ids.shape, self.k).to(torch.float32) - 128
        scales = self.weights[1][block, :, row].float()  # [.., K/32]: each row's scale per group
        return (q * scales.repeat_interleave(32, -1)).to(dtype)


def linear(weight: torch.Tensor, bias: torch.Tensor | None, mode: str, dtype: torch.dtype,
           int8: tuple[torch.Tensor, torch.Tensor] | None = None,
           lib: kernels.Library | None = None, apart: bool = True, arena: Arena | None = None) -> Linear:
    """y = x W^T + b. mode "plain": F.linear; "packed": oneDNN with the weight prepacked once (plain bf16
    F.linear reorders it on every call: half the speed); "native": gemv.cpp on the plain weight in decode
    (`lib` required); "int8": int8 weights — a bf16 scale per 32 on the AVX512-VNNI kernels, else per row
    (`int8` when already quantized), the compiled kernels where `lib` is given, else torch's int8 kernel;
    "int4": groups of 32 (compiled, else dequantized per call). apart: outlier columns computed apart
    (compiled kernels; not for a table whose rows are also looked up)."""
    col = outliers = None
    if mode in ("int8", "int4") and int8 is None:
        if lib is None:  # torch's kernels: outlier columns divided down, x multiplied back
            weight, col = equalize(weight)
        elif apart:  # the compiled kernels compute outlier columns apart
            weight, outliers = split_outliers(weight)

    def restore(w: torch.Tensor) -> torch.Tensor:  # the dequantized weight with its outlier columns back
        return w if col is None else w * col.to(w.dtype)
    if mode == "int8":
        if lib is not None and int8 is None and lib.vnni and fused.interleavable(*weight.shape):
            return Streamed(lib, "int8g", fused.pack_int8g(*quantize_groups8(weight)), bias, weight.shape[0],
                            outliers=outliers, arena=arena)
        q, scales = int8 if int8 is not None else quantize_rows(weight, dtype)
        if lib is not None:
            return Streamed(lib, "int8", (q, scales.float()), bias, q.shape[0], outliers=outliers, arena=arena)
        if col is not None:
            q, scales = quantize_rows(restore(weight), dtype)  # torch's int8 kernel takes no column factors
        mm = torch._weight_int8pack_mm

        def run_int8(x: torch.Tensor) -> torch.Tensor:
            y = mm(x.reshape(-1, x.shape[-1]), q, scales).view(*x.shape[:-1], -1)
            return y if bias is None else y + bias
        return run_int8
    if mode == "int4":
        packed, scales, mins = quantize_int4(weight)
        if lib is not None:
            n = packed.shape[0]
            if lib.vnni and fused.interleavable(n, packed.shape[1] * 2):
                return Streamed(lib, "int4v", fused.pack_int4v(packed, scales, mins), bias, n, outliers=outliers,
                                arena=arena)
            return Streamed(lib, "int4", (packed, scales, mins), bias, n, outliers=outliers, arena=arena)

        def big_int4(x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, restore(dequantize_int4(packed, scales, mins, x.dtype)), bias)
        return big_int4
    if mode == "packed":
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        op = torch.ops.mkldnn._linear_pointwise

        def run_packed(x: torch.Tensor) -> torch.Tensor:
            return op(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "").view(*x.shape[:-1], -1)
        return run_packed
    if mode == "native":
        if lib is None:
            raise ValueError("mode 'native' needs the compiled decode kernels")
        kind = "f32" if weight.dtype == torch.float32 else "bf16"
        if kind == "bf16" and weight.dtype != torch.bfloat16:
            raise ValueError(f"mode 'native' runs bfloat16 or float32 weights, not {weight.dtype}")
        return Streamed(lib, kind, (weight,), bias, weight.shape[0], arena=arena)  # a copy: not the file mapping
    return lambda x: F.linear(x, weight, bias)


def fuse(modules: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenate the weights (and biases) of `modules`, re-pointing each to its view of the result."""
    weight = torch.cat([m.weight.detach() for m in modules])
    bias = None
    if modules[0].bias is not None:
        bias = torch.cat([m.bias.detach() for m in modules])
    start = 0
    for m in modules:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(weight[start:start + n], requires_grad=False)
        if bias is not None:
            m.bias = nn.Parameter(bias[start:start + n], requires_grad=False)
        start += n
    return weight, bias


_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def own_small_weights(model: nn.Module) -> None:
    """Copy the norms and biases the decoder keeps out of the checkpoint file's mapping.

    transformers maps the safetensors file and hands out views of it; the projections are fused and
    packed into new memory, the small weights are copied here, and the embedding rows stay a view
    (release_file_pages() then gives back the pages the packed weights were read from).
    """
    for name, param in model.named_parameters():
        if param.numel() and name.rsplit(".", 2)[-2] not in _PROJECTIONS and param.dim() == 1:
            param.data = param.data.clone()


def release_file_pages(t: torch.Tensor) -> bool:
    """Drop the resident pages of the read-only file mapping `t` lives in; True if done.

    Once the projections are packed, the mapped checkpoint's pages are dead weight in RSS (about the
    model's size) until the kernel reclaims them. MADV_DONTNEED gives them back now; a page touched
    later (an embedding row) is read again from the file (or the page cache), unchanged. Skipped when
    the mapping holds anonymous pages (copies written by this process, which DONTNEED would lose) or
    is not a file.
    """
    ptr = t.data_ptr()
    try:
        with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:  # not Linux: nothing to give back
        return False
    start = end = copied = None
    for line in lines:
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            found = lo <= ptr < hi and len(head) >= 6 and head[5].startswith("/")
            if start is not None:
                break  # past our mapping's block
            if found:
                start, end = lo, hi
        elif start is not None and head[0] == "Anonymous:":
            copied = int(head[1])
    if start is None or copied != 0:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc.madvise(start, end - start, 4) == 0  # 4 = MADV_DONTNEED


def drop_float_weights(module: nn.Module, dtype: torch.dtype, keep: torch.Tensor | None = None) -> None:
    """Free the float weights that packed or int8 copies replace (the HF modules cannot run after)."""
    empty = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)) and sub.weight.numel():
            if keep is None or sub.weight.data_ptr() != keep.data_ptr():
                sub.weight = empty
    module.edgechat_float_weights_dropped = True
