"""step.cpp's view of the weights: each linear described once as a ctypes struct, one call per token;
and the interleaved int8/int4 layouts its AVX512-VNNI kernels read (16 rows side by side)."""
from __future__ import annotations

import ctypes
from ctypes import POINTER, c_float, c_int32, c_int64, c_void_p
from typing import Any, Sequence

import torch

from . import Library

KINDS = {"bf16": 0, "f32": 1, "int8": 2, "int4": 3, "int4v": 5, "int8g": 6}
ROWS = 16  # rows side by side in the interleaved layouts
_CHUNK = 8192  # rows re-laid at a time (a multiple of ROWS), so the temporaries stay small


class Lin(ctypes.Structure):
    """step.cpp's `Lin`: y = W x + bias (outlier columns apart)."""

    _fields_ = [("kind", c_int32), ("pad", c_int32), ("n", c_int64), ("k", c_int64), ("w", c_void_p),
                ("s", c_void_p), ("z", c_void_p), ("bias", c_void_p), ("n_out", c_int64),
                ("out_idx", c_void_p), ("out_w", c_void_p)]


class Layer(ctypes.Structure):
    """step.cpp's `Layer`."""

    _fields_ = [("ln1", c_void_p), ("ln2", c_void_p), ("qkv", Lin), ("o", Lin), ("gate_up", Lin), ("down", Lin)]


class Model(ctypes.Structure):
    """step.cpp's `Model`."""

    _fields_ = [("layers", c_int32), ("hidden", c_int32), ("heads", c_int32), ("kv_heads", c_int32),
                ("head_dim", c_int32), ("inter", c_int32), ("kv_f32", c_int32), ("pad", c_int32),
                ("eps", c_float), ("scale", c_float), ("inv_freq", c_void_p), ("norm", c_void_p),
                ("layer", POINTER(Layer)), ("head", Lin), ("embed", c_void_p), ("embed_f32", c_int32),
                ("pad2", c_int32)]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def lin(kind: str, weights: tuple[torch.Tensor, ...], bias: torch.Tensor | None, n: int, k: int,
        outliers: tuple[torch.Tensor, torch.Tensor] | None = None) -> Lin:
    """The struct for one linear (the tensors must outlive it: the caller keeps them); outliers: (column
    indices int32, their fp32 weights [columns, n]) computed apart from the quantized weight."""
    w, s, z = (*weights, None, None)[:3]
    idx, cols = outliers if outliers is not None else (None, None)
    return Lin(KINDS[kind], 0, n, k, _ptr(w), _ptr(s), _ptr(z), _ptr(bias),
               0 if idx is None else idx.numel(), _ptr(idx), _ptr(cols))


def interleavable(n: int, k: int) -> bool:
    """Whether the interleaved kernels take this shape (x is quantized in groups of 32)."""
    return k % 32 == 0


def _pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 rows [N, K] -> [ceil(N/16), K/4, 16, 4] uint8 holding w + 128 (padding rows: weight 0)."""
    n, k = q.shape
    blocks = -(-n // ROWS)
    out = torch.empty(blocks, k // 4, ROWS, 4, dtype=torch.uint8)
    for start in range(0, n, _CHUNK):
        rows = q[start:start + _CHUNK]
        pad = (-rows.shape[0]) % ROWS
        u = (rows.to(torch.int16) + 128).to(torch.uint8)
        if pad:
            u = torch.cat((u, torch.full((pad, k), 128, dtype=torch.uint8)))
        out[start // ROWS:start // ROWS + u.shape[0] // ROWS] = u.view(-1, ROWS, k // 4, 4).transpose(1, 2)
    return out


def _by_block(t: torch.Tensor, blocks: int) -> torch.Tensor:
    """Per-group values [blocks*16, G] (rows padded) -> [blocks, G, 16]: a group's 16 rows side by side."""
    g = t.shape[1]
    pad = blocks * ROWS - t.shape[0]
    if pad:
        t = torch.cat((t, torch.zeros(pad, g, dtype=t.dtype)))
    return t.view(blocks, ROWS, g).transpose(1, 2).contiguous()


def pack_int8g(q: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quant.quantize_groups8's rows -> ([ceil(N/16), K/4, 16, 4] uint8 holding w + 128, scales [N/16, K/32, 16])."""
    v = _pack_int8(q)
    return v, _by_block(scales, v.shape[0])


def pack_int4v(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quant.quantize_int4's groups -> ([N/16, G, 4, 16, 4] bytes: low nibble k = 8t + i, high 8t + 4 + i,
    scales and minimums [N/16, G, 16]); padding rows have scale and minimum 0."""
    n, half = packed.shape
    g = half // 16
    pad = (-n) % ROWS
    if pad:
        packed = torch.cat((packed, torch.zeros(pad, half, dtype=torch.uint8)))
        scales = torch.cat((scales, torch.zeros(pad, g, dtype=scales.dtype)))
        mins = torch.cat((mins, torch.zeros(pad, g, dtype=mins.dtype)))
    blocks = packed.shape[0] // ROWS
    out = torch.empty(blocks, g, 4, ROWS, 4, dtype=torch.uint8)
    step = _CHUNK // ROWS
    for b in range(0, blocks, step):
        p = packed[b * ROWS:(b + step) * ROWS].view(-1, ROWS, g, 16)
        q = torch.cat((p & 15, p >> 4), -1).view(-1, ROWS, g, 4, 2, 4)  # [blocks, j, g, t, lo/hi, i]
        out[b:b + step] = (q[..., 0, :] | (q[..., 1, :] << 4)).permute(0, 2, 3, 1, 4)
    return out, _by_block(scales, blocks), _by_block(mins, blocks)


class Batch(ctypes.Structure):
    """step.cpp's `Batch`: R rows, each a token at a position of one sequence, and the rows whose logits
    are wanted."""

    _fields_ = [("rows", c_int64), ("token", c_void_p), ("pos", c_void_p), ("seq", c_void_p), ("kc", c_void_p),
                ("vc", c_void_p), ("cap", c_void_p), ("n_logits", c_int64), ("logit_rows", c_void_p),
                ("logits", c_void_p)]


class DecodeStep:
    """Rows of one or more sequences through the whole model in one call to step.cpp (each weight read once)."""

    def __init__(self, lib: Library, decoder: Any) -> None:
        """Describe `decoder`'s weights (a FastDecoder whose linears all run on the compiled kernels)."""
        self.lib = lib
        self._keep: list[torch.Tensor] = []
        f32 = self._f32
        layers = (Layer * len(decoder.layers))()
        for i, layer in enumerate(decoder.layers):
            layers[i] = Layer(f32(layer.ln1), f32(layer.ln2), layer.qkv.lin, layer.o.lin,
                              layer.gate_up.lin, layer.down.lin)
        self._layers = layers
        self.vocab = decoder.lm_head.n
        embed = decoder.embed
        if embed is not None and (embed.dtype not in (torch.bfloat16, torch.float32) or not embed.is_contiguous()):
            raise ValueError("the embedding must be contiguous bf16 or fp32 rows")
        inter = decoder.layers[0].down.k
        self.model = Model(len(decoder.layers), decoder.hidden, decoder.heads, decoder.kv_heads, decoder.head_dim,
                           inter, int(decoder.dtype == torch.float32), 0, decoder.eps, decoder.scale,
                           f32(decoder._inv_freq), f32(decoder.norm), layers, decoder.lm_head.lin,
                           _ptr(embed), int(embed is not None and embed.dtype == torch.float32), 0)

    def _f32(self, t: torch.Tensor) -> int:
        t = t.float().contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def run(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int], caches: Sequence[Any],
            logit_rows: Sequence[int], threads: int) -> torch.Tensor:
        """fp32 logits [len(logit_rows), vocab] of `tokens`, row r at positions[r] of the sequence whose
        cache is caches[seqs[r]] (a KVState whose capacity covers it); the rows' keys and values are
        written into those caches."""
        rows = len(tokens)
        if any(not 0 <= t < self.vocab for t in tokens):
            bad = next(t for t in tokens if not 0 <= t < self.vocab)
            raise IndexError(f"token id {bad} outside the vocabulary ({self.vocab})")
        for r in range(rows):
            if not 0 <= positions[r] < caches[seqs[r]].capacity:
                raise IndexError(f"position {positions[r]} outside its cache ({caches[seqs[r]].capacity})")
        logits = torch.empty(len(logit_rows), self.vocab, dtype=torch.float32)
        ptrs = [c.pointers() for c in caches]
        kc = (c_void_p * len(caches))(*(ctypes.addressof(k) for k, _ in ptrs))
        vc = (c_void_p * len(caches))(*(ctypes.addressof(v) for _, v in ptrs))
        ints = c_int64 * rows
        token, pos, seq = ints(*tokens), ints(*positions), ints(*seqs)
        cap = (c_int64 * len(caches))(*(c.capacity for c in caches))
        want = (c_int64 * max(1, len(logit_rows)))(*logit_rows)
        batch = Batch(rows, ctypes.addressof(token), ctypes.addressof(pos), ctypes.addressof(seq),
                      ctypes.addressof(kc), ctypes.addressof(vc), ctypes.addressof(cap), len(logit_rows),
                      ctypes.addressof(want), logits.data_ptr())
        self.lib.lib.edgechat_batch_step(ctypes.byref(self.model), ctypes.byref(batch), self.lib.isa, threads)
        return logits
