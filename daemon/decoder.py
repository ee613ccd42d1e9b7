"""Model forward passes over a kept KV cache: a lean one for Qwen2/Llama-shaped models, HF's for the rest.

Decoding one token of a 0.5B model is a few dozen GEMVs. Plain bf16 `F.linear` with one row reorders
its weight into oneDNN's blocked layout on every call, so it reads the weights about twice: half the
speed the memory allows (the tied 151936-row lm_head alone took ~40 ms a token on one core here).
FastDecoder prepacks every weight once (`torch.ops.mkldnn._reorder_linear_weight`) and runs the same
maths in ~20 tensor ops per layer: fused q/k/v and gate/up projections, a rotary table, grouped-query
attention without repeating keys, and the lm_head on the last position only. Optional int8 weights
(`torch._weight_int8pack_mm`) halve the bytes read per token again.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from .kvcache import BLOCK, KVState

QUANTIZE = ("none", "int8")
_ROWS_PER_CHUNK = 8192  # rows quantized at a time, so the float32 copy stays small


def fast_path_reason(model: Any) -> str | None:
    """None when FastDecoder supports this model, else why not (then HFDecoder serves it)."""
    cfg = model.config
    if cfg.model_type not in ("qwen2", "llama"):
        return f"model_type {cfg.model_type!r}"
    rope = getattr(cfg, "rope_parameters", None) or {"rope_type": "default"}
    if rope.get("rope_type", "default") != "default":
        return f"rope_type {rope.get('rope_type')!r}"
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "mlp_bias", False):
        return "mlp variant"
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ()):
        return "sliding-window layers"
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("layers", "norm", "embed_tokens")):
        return "module layout"
    return None


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


def can_pack() -> bool:
    """Whether oneDNN can hold weights prepacked for its GEMV kernels (x86 builds of torch)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, mode: str, dtype: torch.dtype,
            int8: tuple[torch.Tensor, torch.Tensor] | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """y = x W^T + b. mode "plain": F.linear; "packed": oneDNN with the weight prepacked once (plain bf16
    F.linear reorders it on every call: half the speed); "int8": per-row int8 weights (`int8` when
    already quantized)."""
    if mode == "int8":
        q, scales = int8 if int8 is not None else quantize_rows(weight, dtype)
        mm = torch._weight_int8pack_mm

        def run_int8(x: torch.Tensor) -> torch.Tensor:
            y = mm(x.reshape(-1, x.shape[-1]), q, scales).view(*x.shape[:-1], -1)
            return y if bias is None else y + bias
        return run_int8
    if mode == "packed":
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        op = torch.ops.mkldnn._linear_pointwise

        def run_packed(x: torch.Tensor) -> torch.Tensor:
            return op(x.reshape(-1, x.shape[-1]), packed, bias, "none", [], "").view(*x.shape[:-1], -1)
        return run_packed
    return lambda x: F.linear(x, weight, bias)


def _fuse(modules: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
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


class _Layer:
    __slots__ = ("ln1", "qkv", "o", "ln2", "gate_up", "down")


class FastDecoder:
    """Forward passes of a Qwen2/Llama-family model over a KVState; fills and reads the cache itself."""

    def __init__(self, model: Any, quantize: str = "none", pack: bool | None = None) -> None:
        """Take over the model's weights: fused, prepacked (pack None = where oneDNN can) or int8.
        Packed or int8, the float weights are freed layer by layer and the HF model cannot run."""
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}; got {quantize!r}")
        cfg, inner = model.config, model.model
        self.dtype = model.dtype
        self.quantize = quantize
        mode = "int8" if quantize == "int8" else "packed" if (can_pack() if pack is None else pack) else "plain"
        self.mode = mode
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.hidden = cfg.hidden_size
        self.eps = cfg.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        rope = getattr(cfg, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        self._inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))
        self._cos = self._sin = torch.empty(0)
        if mode != "plain":
            _own_small_weights(model)
        self.layers: list[_Layer] = []
        for block in inner.layers:
            attn, mlp = block.self_attn, block.mlp
            layer = _Layer()
            layer.ln1 = block.input_layernorm.weight.detach()
            layer.ln2 = block.post_attention_layernorm.weight.detach()
            layer.qkv = _linear(*_fuse([attn.q_proj, attn.k_proj, attn.v_proj]), mode, self.dtype)
            layer.o = _linear(attn.o_proj.weight.detach(), None if attn.o_proj.bias is None
                              else attn.o_proj.bias.detach(), mode, self.dtype)
            layer.gate_up = _linear(_fuse([mlp.gate_proj, mlp.up_proj])[0], None, mode, self.dtype)
            layer.down = _linear(mlp.down_proj.weight.detach(), None, mode, self.dtype)
            self.layers.append(layer)
            if mode != "plain":  # free this layer's float weights now: the peak stays one layer
                _drop_float_weights(block, self.dtype)
                release_file_pages(inner.embed_tokens.weight)  # and the file pages they came from
        self.norm = inner.norm.weight.detach()
        head = model.get_output_embeddings().weight.detach()
        embed = inner.embed_tokens.weight.detach()
        tied = head.data_ptr() == embed.data_ptr()
        self.embed: torch.Tensor | None = embed
        self._embed_q: tuple[torch.Tensor, torch.Tensor] | None = None
        if mode == "int8" and tied:  # one int8 copy serves the lm_head and the row lookups
            self._embed_q = quantize_rows(embed, self.dtype)
            self.embed = None
        # packed and tied: the plain embedding stays for row lookups beside the packed lm_head
        self.lm_head = _linear(head, None, mode, self.dtype, self._embed_q)
        del head, embed
        if mode != "plain":
            _drop_float_weights(model, self.dtype, keep=self.embed)
            if self.embed is not None:
                release_file_pages(self.embed)

    def new_state(self) -> KVState:
        """An empty cache for this model."""
        return KVState(len(self.layers), self.kv_heads, self.head_dim, self.dtype)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self._embed_q is None:
            return F.embedding(ids, self.embed)
        q, scales = self._embed_q
        return q[ids].to(self.dtype) * scales[ids].unsqueeze(-1)

    def _rope(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin for positions start..start+count-1, as [count, head_dim]."""
        end = start + count
        if end > self._cos.shape[0]:
            cap = -(-end // BLOCK) * BLOCK
            freqs = torch.arange(cap, dtype=torch.float)[:, None] * self._inv_freq[None]
            self._cos = torch.cat((freqs, freqs), -1).cos().to(self.dtype)
            sin = freqs.sin()
            # rotate_half(x) * sin == roll(x, half) * [-sin, sin]: one roll instead of slices + cat
            self._sin = torch.cat((-sin, sin), -1).to(self.dtype)
        return self._cos[start:end], self._sin[start:end]

    @torch.inference_mode()
    def forward(self, ids: list[int], state: KVState) -> torch.Tensor:
        """Run `ids` after the tokens `state` holds, store their keys/values; float32 logits of the last."""
        start, count = len(state), len(ids)
        state.reserve(start + count)
        end = start + count
        h, kvh, d = self.heads, self.kv_heads, self.head_dim
        x = self._embed(torch.tensor([ids], dtype=torch.long))
        cos, sin = self._rope(start, count)
        mask = None
        if count > 1 and start > 0:  # queries i may see keys 0..start+i
            mask = torch.ones(count, end, dtype=torch.bool).tril_(start)
        for i, layer in enumerate(self.layers):
            y = F.rms_norm(x, (self.hidden,), layer.ln1, self.eps)
            qkv = layer.qkv(y).view(1, count, h + 2 * kvh, d).transpose(1, 2)
            qk = qkv[:, : h + kvh]
            qk = torch.addcmul(qk * cos, torch.roll(qk, d // 2, -1), sin)
            state.k[i][:, :, start:end] = qk[:, h:]
            state.v[i][:, :, start:end] = qkv[:, h + kvh:]
            keys, values = state.k[i][:, :, :end], state.v[i][:, :, :end]
            if count == 1:  # decode: each kv head serves h/kvh query heads, as one batch row each
                attn = F.scaled_dot_product_attention(qk[:, :h].reshape(1, kvh, h // kvh, d), keys, values,
                                                      scale=self.scale)
                attn = attn.reshape(1, 1, h * d)
            else:
                attn = F.scaled_dot_product_attention(qk[:, :h], keys, values, attn_mask=mask,
                                                      is_causal=mask is None, scale=self.scale,
                                                      enable_gqa=True)
                attn = attn.transpose(1, 2).reshape(1, count, h * d)
            x = x + layer.o(attn)
            y = F.rms_norm(x, (self.hidden,), layer.ln2, self.eps)
            gate, up = layer.gate_up(y).chunk(2, -1)
            x = x + layer.down(F.silu(gate) * up)
        state.ids.extend(ids)
        x = F.rms_norm(x[:, -1:], (self.hidden,), self.norm, self.eps)
        return self.lm_head(x).view(-1).float()


_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _own_small_weights(model: nn.Module) -> None:
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
    import ctypes

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


def _drop_float_weights(module: nn.Module, dtype: torch.dtype, keep: torch.Tensor | None = None) -> None:
    """Free the float weights that packed or int8 copies replace (the HF modules cannot run after)."""
    empty = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Embedding)) and sub.weight.numel():
            if keep is None or sub.weight.data_ptr() != keep.data_ptr():
                sub.weight = empty
    module.edgechat_float_weights_dropped = True


class HFState:
    """A transformers DynamicCache with the ids it covers: KVState's interface for HFDecoder."""

    def __init__(self) -> None:
        from transformers import DynamicCache
        self.cache = DynamicCache()
        self.ids: list[int] = []

    def __len__(self) -> int:
        return len(self.ids)

    def nbytes(self) -> int:
        """Bytes of the cached keys and values."""
        total = 0
        for layer in getattr(self.cache, "layers", ()):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.untyped_storage().nbytes()
        return total

    def reserve(self, tokens: int) -> None:
        """Nothing to do: DynamicCache grows by concatenation."""

    def shrink(self) -> None:
        """Nothing to do: DynamicCache holds no spare capacity."""

    def crop(self, tokens: int) -> None:
        """Forget everything after the first `tokens` tokens."""
        if tokens < len(self.ids):
            self.cache.crop(tokens)
            del self.ids[tokens:]

    def prefix_copy(self, tokens: int) -> "HFState":
        """A copy holding the first `tokens` tokens."""
        out = HFState()
        out.cache = copy.deepcopy(self.cache)
        out.ids = list(self.ids)
        out.crop(tokens)
        return out


class HFDecoder:
    """Forward passes through the transformers model itself (any causal LM), over an HFState."""

    quantize = "none"

    def __init__(self, model: Any) -> None:
        import inspect
        self.model = model
        # transformers 5 renames the forward's past_key_values to cache (older models keep the old name)
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def new_state(self) -> HFState:
        """An empty cache."""
        return HFState()

    @torch.inference_mode()
    def forward(self, ids: list[int], state: HFState) -> torch.Tensor:
        """Run `ids` after the cached tokens; float32 logits of the last position."""
        start = len(state)
        out = self.model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=True, logits_to_keep=1,
                         cache_position=torch.arange(start, start + len(ids)), **{self._cache_arg: state.cache})
        state.ids.extend(ids)
        return out.logits[0, -1].float()


def make_decoder(model: Any, quantize: str = "none") -> FastDecoder | HFDecoder:
    """FastDecoder where the model allows it, else HFDecoder (which cannot quantize)."""
    reason = fast_path_reason(model)
    if reason is None:
        return FastDecoder(model, quantize)
    if quantize != "none":
        raise ValueError(f"quantize={quantize!r} needs a Qwen2/Llama-family model ({reason})")
    return HFDecoder(model)
