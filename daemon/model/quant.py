"""Weight-only quantization for the lean decoder: int8 rows (one scale per row) and int4 groups of 32
(bf16 scale and minimum per group: w ≈ scale * q + min, q in 0..15, 0.625 bytes a weight)."""
from __future__ import annotations

import torch

GROUP = 32  # int4 weights per scale/minimum pair
_ROWS_PER_CHUNK = 8192  # rows quantized at a time, so the float32 copy stays small
_INT4_CHUNK_GROUPS = 8192  # int4 groups searched at a time: the temporaries stay in cache


def quantize_rows(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 weights and their scales (in the activation dtype)."""
    q = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(weight.shape[0], dtype=torch.float32)
    for start in range(0, weight.shape[0], _ROWS_PER_CHUNK):
        rows = weight[start:start + _ROWS_PER_CHUNK].float()
        # quantize against the scale as stored (in `dtype`), not the float32 one it rounds from
        s = (rows.abs().amax(dim=1).clamp(min=1e-12) / 127.0).to(dtype).float()
        q[start:start + _ROWS_PER_CHUNK] = (rows / s[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        scales[start:start + _ROWS_PER_CHUNK] = s
    return q, scales.to(dtype)


def quantize_groups8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weights with a bf16 scale per GROUP of each row (as llama.cpp's Q8_0): a row's
    largest weight no longer sets every weight's step ([N, K] int8, [N, K/32] bf16)."""
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int8)
    scales = torch.empty(n, k // GROUP, dtype=torch.bfloat16)
    for start in range(0, n, _ROWS_PER_CHUNK):
        w = weight[start:start + _ROWS_PER_CHUNK].float().view(-1, k // GROUP, GROUP)
        s = (w.abs().amax(-1) / 127.0).clamp(min=1e-12).to(torch.bfloat16)
        q[start:start + _ROWS_PER_CHUNK] = (w / s.float()[..., None]).round_().clamp_(-127, 127).view(-1, k).to(torch.int8)
        scales[start:start + _ROWS_PER_CHUNK] = s
    return q, scales


def int4_fits(weight: torch.Tensor) -> bool:
    """Whether int4 groups tile the weight's rows."""
    return weight.dim() == 2 and weight.shape[1] % GROUP == 0


# candidate scales of the search: (15 + _RMIN + _RDELTA * i) / (max - min), i < _CANDIDATES (as llama.cpp's
# make_qkx2_quants: grids slightly coarser or finer than min..max, each refitted by least squares)
_RMIN, _RDELTA, _CANDIDATES = -2.0, 0.2, 16
_REFITS = 2  # alternating refinements of the best candidate (requantize, refit)


def _lstsq(w: torch.Tensor, q: torch.Tensor, sw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group, the scale and minimum minimising ||w - (scale*q + min)||, and Σqw (for the residual)."""
    sq, sqq, sqw = q.sum(-1), (q * q).sum(-1), (q * w).sum(-1)
    det = GROUP * sqq - sq * sq
    flat = det <= 0  # every q equal: a constant group
    det = det.masked_fill(flat, 1.0)
    s = ((GROUP * sqw - sq * sw) / det).masked_fill(flat, 0.0)
    m = torch.where(flat, sw / GROUP, (sqq * sw - sq * sqw) / det)
    return s, m, sqw


def _fit_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 (scale, minimum) per group of w [rows, groups, 32]: the least-squares error over candidate
    grids, then refined: 20 % less squared error than plain min..max on Gaussian weights. Only grids
    that reach every weight to half a step count (no clipping: no weight is off by more than that)."""
    lo, hi = w.amin(-1), w.amax(-1)
    rng = (hi - lo).clamp(min=1e-12)
    d = w - lo[..., None]
    sw, sww = w.sum(-1), (w * w).sum(-1)

    def covers(s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return (s > 0) & (m - s / 2 <= lo) & (m + 15.5 * s >= hi)
    best = torch.full_like(sw, float("inf"))
    s_best, m_best = rng / 15, lo.clone()
    for i in range(_CANDIDATES):
        q = (d * ((15 + _RMIN + _RDELTA * i) / rng)[..., None]).round_().clamp_(0, 15)
        s, m, sqw = _lstsq(w, q, sw)
        err = sww - s * sqw - m * sw  # the least-squares residual (normal equations)
        better = (err < best) & covers(s, m)
        best = torch.where(better, err, best)
        s_best, m_best = torch.where(better, s, s_best), torch.where(better, m, m_best)
    for _ in range(_REFITS):
        q = ((w - m_best[..., None]) / s_best[..., None]).round_().clamp_(0, 15)
        s, m, sqw = _lstsq(w, q, sw)
        better = (sww - s * sqw - m * sw < best) & covers(s, m)
        best = torch.where(better, sww - s * sqw - m * sw, best)
        s_best, m_best = torch.where(better, s, s_best), torch.where(better, m, m_best)
    # round the scale up to bf16 first, then the minimum that best fits it, kept where it still covers
    s = s_best.to(torch.bfloat16)
    s = torch.where(s.float() < s_best, s.view(torch.int16).add(1).view(torch.bfloat16), s).float()
    q = ((w - m_best[..., None]) / s[..., None]).round_().clamp_(0, 15)
    m = (sw - s * q.sum(-1)) / GROUP
    ulp = m.abs() * 2.0 ** -8  # the most rounding m to bf16 moves it
    floor, ceil = hi - 15.5 * s + ulp, lo + s / 2 - ulp
    m = torch.where(floor <= ceil, torch.minimum(torch.maximum(m, floor), ceil), (floor + ceil) / 2)
    return s.to(torch.bfloat16), m.to(torch.bfloat16)


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(nibbles [N, K/2] uint8, scales [N, K/32] bf16, minimums [N, K/32] bf16). In each group's 16 bytes
    the low nibbles hold elements 0..15 and the high nibbles 16..31 (what gemv.cpp reads)."""
    n, k = weight.shape
    g = k // GROUP
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    scales = torch.empty(n, g, dtype=torch.bfloat16)
    mins = torch.empty(n, g, dtype=torch.bfloat16)
    step = max(1, _INT4_CHUNK_GROUPS // g)
    for start in range(0, n, step):
        end = min(n, start + step)
        w = weight[start:end].float().view(end - start, g, GROUP)
        s, m = _fit_int4(w)
        # quantize against the stored (bf16-rounded) scale and minimum, so dequantizing matches
        q = ((w - m.float()[..., None]) / s.float()[..., None]).round_().clamp_(0, 15).to(torch.uint8)
        q = q.view(end - start, g, 2, GROUP // 2)
        packed[start:end] = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(end - start, k // 2)
        scales[start:end], mins[start:end] = s, m
    return packed, scales, mins


def int4_plan(projection: str, layer: int, layers: int) -> str:
    """"int8" or "int4" for one fused projection ("qkv", "o", "gate_up", "down") of `layer` (0-based) of
    `layers` with quantize=int4, as llama.cpp's Q4_K_M keeps some tensors at 6 bits: attention (12 % of
    a Qwen2.5-0.5B layer's weights) everywhere and the first eighth of the layers whole at int8, where
    int4 errors cost the logits the most (docs/performance.md: 0.9968 against 0.967 all-int4)."""
    return "int8" if projection in ("qkv", "o") or layer < max(1, layers // 8) else "int4"


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
EQUALIZE_POWER = 0.5  # an outlier column is divided by ratio ** this (1 = brought down to the median)


def equalize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight with outlier columns divided down, the fp32 factors x must be multiplied by) or
    (weight, None) when no column stands out. x W^T == (x * c) (W / c)^T; without this, a few columns
    ×30 set every row's int8 scale (or their group's int4 scale) and the other weights lose their bits.
    Dividing by the square root of the ratio, not all of it: a column's quantization error comes back
    multiplied by its factor, and half-way costs its group some resolution but the column far less
    (int4 on the test model's ×30 columns: logits cosine 0.96 against 0.85 fully divided)."""
    col = weight.float().abs().amax(0)
    ratio = (col / col.median().clamp(min=1e-12)).clamp(min=1.0)
    if float(ratio.max()) < OUTLIER_RATIO:
        return weight, None
    factor = ratio.pow(EQUALIZE_POWER)
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
