"""Model forward passes over a kept KV cache: a lean one for Qwen2/Llama-shaped models, HF's for the rest.

Decoding one token of a 0.5B model is a few dozen GEMVs. FastDecoder runs them on prepacked (or int8)
weights (daemon/weights.py) in ~20 tensor ops per layer: fused q/k/v and gate/up projections, a rotary
table, grouped-query attention without repeating keys, and the lm_head on the last position only.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from . import kernels
from ..memory.hygiene import find_malloc_trim
from .kernels import fused
from .kvpool import BLOCK, KVState
from .quant import int4_plan, quantize_rows
from .pages import Arena, huge_bytes_held
from .weights import Streamed, can_pack, drop_float_weights, fuse, linear, own_small_weights, release_file_pages

QUANTIZE = ("none", "int8", "int4")
# how the projections run: gemv.cpp (compiled), oneDNN prepacked, or plain F.linear
KERNELS = ("native", "onednn", "plain")
STEP_ROWS = 8  # rows of one prompt chunk up to which the compiled step runs them (the tuner may raise it)
STEP_ROWS_ALL = 256  # the tuner's largest size: a step_rows this high means longer chunks go through it in pieces


def default_kernel(dtype: torch.dtype = torch.bfloat16) -> str:
    """The kernel a decoder built without one uses: native where compiled, else oneDNN where it packs."""
    return "native" if kernels.current() is not None else "onednn" if can_pack(dtype) else "plain"


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


class _Layer:
    __slots__ = ("ln1", "qkv", "o", "ln2", "gate_up", "down")


class FastDecoder:
    """Forward passes of a Qwen2/Llama-family model over a KVState; fills and reads the cache itself."""

    def __init__(self, model: Any, quantize: str = "none", kernel: str | None = None) -> None:
        """Take over the model's weights: fused, then streamed by gemv.cpp, prepacked for oneDNN, or
        quantized (kernel None = default_kernel()). Unless plain, the float weights are freed layer by
        layer and the HF model cannot run. int4 keeps the embeddings and lm_head int8 (per row)."""
        if quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}; got {quantize!r}")
        kernel = kernel or default_kernel(model.dtype)
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
        lib = kernels.current() if kernel == "native" else None
        if kernel == "native" and lib is None:
            raise ValueError("kernel 'native' needs the compiled decode kernels (none were built)")
        cfg, inner = model.config, model.model
        self.dtype = model.dtype
        self.quantize = quantize
        self.kernel = kernel
        mode = quantize if quantize != "none" else {"native": "native", "onednn": "packed"}.get(kernel, "plain")
        if mode == "packed" and not can_pack(self.dtype):
            raise ValueError("kernel 'onednn' needs a torch build whose oneDNN prepacks weights")
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
            own_small_weights(model)
        self.layers: list[_Layer] = []
        arena = Arena()  # the streamed weights under 2 MiB, packed into huge pages
        trim = find_malloc_trim()
        for i, block in enumerate(inner.layers):
            attn, mlp = block.self_attn, block.mlp
            layer = _Layer()
            layer.ln1 = block.input_layernorm.weight.detach()
            layer.ln2 = block.post_attention_layernorm.weight.detach()

            def as_planned(projection: str) -> str:  # int4: some projections int8, as Q4_K_M keeps some Q6_K
                return int4_plan(projection, i, len(inner.layers)) if mode == "int4" else mode
            layer.qkv = linear(*fuse([attn.q_proj, attn.k_proj, attn.v_proj]), as_planned("qkv"), self.dtype, lib=lib,
                               arena=arena)
            layer.o = linear(attn.o_proj.weight.detach(), None if attn.o_proj.bias is None
                              else attn.o_proj.bias.detach(), as_planned("o"), self.dtype, lib=lib, arena=arena)
            layer.gate_up = linear(fuse([mlp.gate_proj, mlp.up_proj])[0], None, as_planned("gate_up"), self.dtype,
                                   lib=lib, arena=arena)
            layer.down = linear(mlp.down_proj.weight.detach(), None, as_planned("down"), self.dtype, lib=lib,
                                arena=arena)
            self.layers.append(layer)
            if mode != "plain":  # free this layer's float weights now: the peak stays one layer
                drop_float_weights(block, self.dtype)
                release_file_pages(inner.embed_tokens.weight)  # and the file pages they came from
                if trim is not None:  # and the heap the fused and quantized temporaries were made in
                    trim(0)
        self.norm = inner.norm.weight.detach()
        head = model.get_output_embeddings().weight.detach()
        embed = inner.embed_tokens.weight.detach()
        tied = head.data_ptr() == embed.data_ptr()
        self.vocab_rows = head.shape[0]  # the lm_head's rows: every valid token id is below
        self.embed: torch.Tensor | None = embed
        self._embed_q: tuple[torch.Tensor, torch.Tensor] | None = None
        head_mode = "int8" if mode == "int4" else mode  # the lm_head stays int8 (as llama.cpp's Q4_K_M keeps Q6_K)
        if head_mode == "int8" and tied and lib is None:  # one int8 copy serves the lm_head and the row lookups
            self._embed_q = quantize_rows(embed, self.dtype)
            self.embed = None
        # packed and tied: the plain embedding stays for row lookups beside the lm_head's packed copy
        self.lm_head = linear(head, None, head_mode, self.dtype, self._embed_q, lib=lib, apart=not tied)
        self._rows = self.lm_head.rows if tied and isinstance(self.lm_head, Streamed) else None
        if self._rows is not None:  # the compiled kernels' lm_head copy serves the row lookups too
            self._embed_q = self.embed = None
        if mode != "plain":
            drop_float_weights(model, self.dtype, keep=self.embed)
            release_file_pages(embed)
        del head, embed
        if trim is not None:
            trim(0)
        linears = [getattr(layer, n) for layer in self.layers for n in ("qkv", "o", "gate_up", "down")]
        self._step = None  # the whole decode step in one call, where every linear runs on the kernels
        self.step_rows = STEP_ROWS  # rows up to which a chunk goes through it (above: oneDNN's GEMMs)
        if lib is not None and all(isinstance(f, Streamed) for f in (*linears, self.lm_head)):
            self._step = fused.DecodeStep(lib, self)

    def new_state(self) -> KVState:
        """An empty cache for this model."""
        return KVState(len(self.layers), self.kv_heads, self.head_dim, self.dtype)

    def kv_bytes(self, tokens: int) -> int:
        """Bytes of a cache reserved for `tokens` tokens (its buffers grow in whole blocks)."""
        cap = -(-max(tokens, 1) // BLOCK) * BLOCK
        return 2 * len(self.layers) * self.kv_heads * self.head_dim * cap * self.dtype.itemsize

    @torch.inference_mode()
    def step(self, work: Sequence[tuple[KVState, list[int], bool]]) -> list[torch.Tensor | None]:
        """Run each (state, ids, want) item's ids after the tokens its state holds, all sequences at once:
        chunks of up to step_rows ids and every decode row in one compiled call (each weight read once),
        longer chunks op by op; float32 logits of each item's last id where wanted."""
        out: list[torch.Tensor | None] = [None] * len(work)
        together = [i for i, (_, ids, _) in enumerate(work) if self._step is not None and len(ids) <= self.step_rows]
        for i, (state, ids, want) in enumerate(work):
            if i not in together:
                if self._step is not None and self.step_rows >= STEP_ROWS_ALL:  # faster at every size: in pieces
                    for start in range(0, len(ids), self.step_rows):
                        logits = self.forward(ids[start:start + self.step_rows], state)
                else:
                    logits = self.forward(ids, state)
                out[i] = logits if want else None
        if not together:
            return out
        tokens: list[int] = []
        positions: list[int] = []
        seqs: list[int] = []
        wanted: list[int] = []
        caches = [work[i][0] for i in together]
        for j, i in enumerate(together):
            state, ids, want = work[i]
            start = len(state)
            state.reserve(start + len(ids))
            tokens.extend(ids)
            positions.extend(range(start, start + len(ids)))
            seqs.extend([j] * len(ids))
            if want:
                wanted.append(len(tokens) - 1)
        logits = self._step.run(tokens, positions, seqs, caches, wanted, torch.get_num_threads())
        rows = iter(range(len(wanted)))
        for i in together:
            state, ids, want = work[i]
            state.ids.extend(ids)
            if want:
                out[i] = logits[next(rows)]
        return out

    def describe(self) -> dict:
        """How decode runs, for the load log and /readyz: one call per step or op by op, the kernels' ISA,
        the prompt chunks the compiled step takes (longer: oneDNN's GEMMs), and the process's bytes in huge
        pages (the streamed weights, where the kernel granted them)."""
        lib = self._step.lib if self._step is not None else None
        return {"step": "one-call" if lib else "per-op",
                "isa": lib.label if lib else None,
                "prefill_rows": self.step_rows if lib else None,
                "huge_pages_mb": round(huge_bytes_held() / 2**20)}

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        if self._rows is not None:
            return self._rows(ids, self.dtype)
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
        if self._step is not None and count <= self.step_rows:
            logits = self._step.run(ids, range(start, start + count), [0] * count, [state], [count - 1],
                                    torch.get_num_threads())
            state.ids.extend(ids)
            return logits[0]
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

    def kv_bytes(self, tokens: int) -> int:
        """Bytes of the keys and values of `tokens` tokens (DynamicCache grows by concatenation)."""
        cfg = self.model.config
        layers, heads = cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return 2 * layers * heads * dim * max(tokens, 1) * self.model.dtype.itemsize

    def step(self, work: Sequence[tuple[HFState, list[int], bool]]) -> list[torch.Tensor | None]:
        """Each (state, ids, want) item's ids in turn (transformers' forward takes one cache at a time)."""
        return [logits if want else None for logits, (_, _, want) in
                zip((self.forward(ids, state) for state, ids, _ in work), work)]

    @torch.inference_mode()
    def forward(self, ids: list[int], state: HFState) -> torch.Tensor:
        """Run `ids` after the cached tokens; float32 logits of the last position."""
        start = len(state)
        out = self.model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=True, logits_to_keep=1,
                         cache_position=torch.arange(start, start + len(ids)), **{self._cache_arg: state.cache})
        state.ids.extend(ids)
        return out.logits[0, -1].float()


def make_decoder(model: Any, quantize: str = "none", kernel: str | None = None) -> FastDecoder | HFDecoder:
    """FastDecoder where the model allows it, else HFDecoder (which cannot quantize)."""
    reason = fast_path_reason(model)
    if reason is None:
        return FastDecoder(model, quantize, kernel)
    if quantize != "none":
        raise ValueError(f"quantize={quantize!r} needs a Qwen2/Llama-family model ({reason})")
    return HFDecoder(model)
