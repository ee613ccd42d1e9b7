"""Weight-only quantization for the lean decoder: int8 rows (one scale per row) and int4 groups of 32
(bf16 scale and minimum per group: w ≈ scale * q + min, q in 0..15, 0.625 bytes a weight)."""
from __future__ import annotations

import torch

GROUP = 32  # int4 weights per scale/minimum pair
_ROWS_PER_CHUNK = 8192  # rows quantized at a time, so the float32 copy stays small


def quantize_rows(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 weights and their scales (in the activation dtype)."""
    q = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(weight.shape[0], dtype=torch.float32)
    for start in range(0, weight.shape[0], _ROWS_PER_CHUNK):
        rows = weight[start:start + _ROWS_PER_CHUNK].float()
        s = rows.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q[start:start + _ROWS_PER_CHUNK] = (rows / s[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        scales[start:start + _ROWS_PER_CHUNK] = s
    return q, scales.to(dtype)


def int4_fits(weight: torch.Tensor) -> bool:
    """Whether int4 groups tile the weight's rows."""
    return weight.dim() == 2 and weight.shape[1] % GROUP == 0


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nibbles [N, K/2] uint8, scales [N, K/32] bf16, minimums [N, K/32] bf16). In each group's 16 bytes
    the low nibbles hold elements 0..15 and the high nibbles 16..31 (what gemv.cpp reads)."""
    n, k = weight.shape
    g = k // GROUP
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    scales = torch.empty(n, g, dtype=torch.bfloat16)
    mins = torch.empty(n, g, dtype=torch.bfloat16)
    for start in range(0, n, _ROWS_PER_CHUNK):
        end = min(n, start + _ROWS_PER_CHUNK)
        w = weight[start:end].float().view(end - start, g, GROUP)
        lo, hi = w.amin(-1), w.amax(-1)
        s = ((hi - lo) / 15).clamp(min=1e-12).to(torch.bfloat16)
        m = lo.to(torch.bfloat16)
        # quantize against the stored (bf16-rounded) scale and minimum, so dequantizing matches
        q = ((w - m.float()[..., None]) / s.float()[..., None]).round_().clamp_(0, 15).to(torch.uint8)
        q = q.view(end - start, g, 2, GROUP // 2)
        packed[start:end] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(end - start, k // 2)
        scales[start:end], mins[start:end] = s, m
    return packed, scales, mins


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """The float weight int4 groups stand for, [N, K] in `dtype`."""
    n, g = scales.shape
    b = packed.view(n, g, 1, GROUP // 2)
    q = torch.cat((b & 15, b >> 4), 2).view(n, g, GROUP).to(torch.float32)
    return (q * scales.float()[..., None] + mins.float()[..., None]).view(n, g * GROUP).to(dtype)


def dequantize_rows(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float weight int8 rows stand for, in `dtype`."""
    return (q.to(torch.float32) * scales.float()[:, None]).to(dtype)


OUTLIER_RATIO = 4.0  # a column whose largest weight is this many times the median column's is an outlier


def equalize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight with outlier columns divided down, the fp32 factors x must be multiplied by) or
    (weight, None) when no column stands out. x W^T == (x * c) (W / c)^T; without this, a few columns
    ×30 set every row's int8 scale (or their group's int4 scale) and the other weights lose their bits."""
    col = weight.float().abs().amax(0)
    factor = (col / col.median().clamp(min=1e-12)).clamp(min=1.0)
    if float(factor.max()) < OUTLIER_RATIO:
        return weight, None
    return (weight.float() / factor).to(weight.dtype), factor.contiguous()


OUTLIER_SHARE = 16  # at most one column in this many is kept apart (fused q/k/v may each bring their own)


def split_outliers(weight: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(weight with its outlier columns zeroed, (their indices int32, their fp32 weights [columns, N])),
    or (weight, None). The compiled kernels compute those columns apart, in fp32: they neither take every
    row's (or group's) resolution nor, as equalize()'s factors would, x's int8 resolution."""
    col = weight.float().abs().amax(0)
    factor = col / col.median().clamp(min=1e-12)
    idx = torch.nonzero(factor >= OUTLIER_RATIO).view(-1)
    if not idx.numel():
        return weight, None
    cap = max(1, weight.shape[1] // OUTLIER_SHARE)
    if idx.numel() > cap:
        idx = idx[factor[idx].topk(cap).indices].sort().values
    cols = weight[:, idx].float().t().contiguous()
    rest = weight.clone()
    rest[:, idx] = 0
    return rest, (idx.to(torch.int32).contiguous(), cols)
