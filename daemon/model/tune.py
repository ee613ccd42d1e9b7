"""Never run a slower path than one we have: at first start, time the decode paths that give the
checkpoint's outputs (dtype, kernel; quantizations only with quantize=auto) for a few decode steps on this
CPU, and keep the choice in cache_dir/tune, keyed by CPU, usable cores, versions and model.

Runs in the worker that loads the model (never the gunicorn master), under a file lock so workers do
not tune at once; candidates whose weights do not fit the memory budget are not tried.
"""
from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from .. import __version__
from . import kernels
from .forward import STEP_ROWS_ALL
from .weights import can_pack

WEIGHT_SHARE = 0.6  # a candidate's weights may take at most this share of the memory limit
_BYTES = {("float32", "none"): 4.0, ("bfloat16", "none"): 2.0, "int8": 1.0, "int4": 0.625}
TUNE_LAYERS, TUNE_VOCAB, WARM, STEPS = 4, 32768, 3, 10
PREFILL_SIZES = (16, 32, 64, 128, STEP_ROWS_ALL)  # prompt chunks timed both ways: the compiled step's crossover


@dataclass(frozen=True)
class Choice:
    """A decode path and how it was chosen: forced (one candidate), tuned now, or read from the cache."""

    dtype: str
    quantize: str
    kernel: str
    source: str = "forced"
    step_ms: dict = field(default_factory=dict)  # candidate label -> median ms per decode step (tuned)
    # prompt ids per chunk up to which the compiled step prefills faster than oneDNN's GEMMs (native only)
    prefill_rows: int = 0

    @property
    def label(self) -> str:
        """dtype/quantize/kernel, e.g. bfloat16/none/native."""
        return f"{self.dtype}/{self.quantize}/{self.kernel}"


def weight_bytes(params: int, dtype: str, quantize: str) -> float:
    """Bytes the weights of `params` parameters take in this mode."""
    return params * _BYTES.get(quantize, _BYTES.get((dtype, quantize), 2.0))


def candidates(cfg: Any, checkpoint_dtype: str, params: int, limit_bytes: int,
               lib: kernels.Library | None) -> list[tuple[str, str, str]]:
    """(dtype, quantize, kernel) paths giving the checkpoint's outputs as far as its precision allows
    (bf16 weights widened to fp32 are exact; fp32 or fp16 narrowed to bf16 are not), or what is forced."""
    if cfg.dtype != "auto":
        dtypes = [cfg.dtype]
    else:
        dtypes = ["bfloat16", "float32"] if checkpoint_dtype == "bfloat16" else ["float32"]
    quants = ["none", "int8", "int4"] if cfg.quantize == "auto" else [cfg.quantize]
    if cfg.kernel != "auto":
        kinds = [cfg.kernel]
    else:
        kinds = ["native", "onednn"] if lib is not None else ["onednn"]
    out = []
    for q in quants:
        for d in dtypes if q == "none" else dtypes[:1]:  # quantized weights: the activations' dtype barely matters
            if weight_bytes(params, d, q) <= WEIGHT_SHARE * limit_bytes or (q, d) == (quants[0], dtypes[0]):
                usable = kinds
                if cfg.kernel == "auto":  # oneDNN where it packs this dtype; plain only where nothing else runs
                    usable = [k for k in kinds if k == "native" or (k == "onednn" and can_pack(getattr(torch, d)))]
                    usable = usable or ["plain"]
                out.extend((d, q, k) for k in usable)
    return out


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features"))]
        return "".join(dict.fromkeys(lines))  # first of each kind
    except OSError:
        return platform.processor()


def _cpu_quota() -> str:
    try:
        with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return "none"


def model_hash(path: str) -> str:
    """Hash of the model folder's config and weight files' names and sizes (cheap, no weight reads)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)) if os.path.isdir(path) else [path]:
        full = os.path.join(path, name)
        if name == "config.json":
            with open(full, "rb") as f:
                h.update(f.read())
        elif name.endswith((".safetensors", ".bin")):
            h.update(f"{name}:{os.path.getsize(full)}".encode())
    return h.hexdigest()[:16]


def cache_key(cfg: Any, path: str, threads: int, lib: kernels.Library | None) -> dict:
    """What the choice depends on: CPU model and flags, usable cores, versions, model, settings."""
    return {"cpu": hashlib.sha256(_cpu_id().encode()).hexdigest()[:16], "cores": len(os.sched_getaffinity(0)),
            "cpu_quota": _cpu_quota(), "threads": threads, "torch": torch.__version__, "edgechat": __version__,
            "model": model_hash(path), "settings": [cfg.dtype, cfg.quantize, cfg.kernel],
            "kernels": None if lib is None else [lib.digest, lib.isa_name]}


def _cut(model_config: Any, dtype: str, quantize: str, kernel: str) -> Any:
    """A FastDecoder on a model of this shape cut to TUNE_LAYERS layers and TUNE_VOCAB rows (random weights:
    the time depends on shapes, not values)."""
    from transformers import AutoModelForCausalLM

    from .forward import FastDecoder
    small = copy.deepcopy(model_config)
    small.num_hidden_layers = min(small.num_hidden_layers, TUNE_LAYERS)
    if getattr(small, "layer_types", None):
        small.layer_types = small.layer_types[:small.num_hidden_layers]
    small.vocab_size = min(small.vocab_size, TUNE_VOCAB)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(small, dtype=getattr(torch, dtype)).eval()
    return FastDecoder(model, quantize, kernel)


def time_prefill(model_config: Any, dtype: str, quantize: str) -> int:
    """The largest of PREFILL_SIZES at which the compiled step still prefills a chunk faster than oneDNN's
    GEMMs op by op (0: never faster, the compiled step then takes decode rows and short chunks alone; the
    largest size: faster at every size, longer chunks go through it in pieces of that size)."""
    with torch.inference_mode():
        decoder = _cut(model_config, dtype, quantize, "native")
        if decoder._step is None:
            return 0
        best = 0
        for n in PREFILL_SIZES:
            seconds = {}
            for how, rows in (("compiled", n), ("per-op", 0)):
                decoder.step_rows = rows
                times = []
                for rep in range(3):
                    state = decoder.new_state()
                    decoder.forward(list(range(8)), state)  # a short prefix, as a turn after the template
                    started = time.perf_counter()
                    decoder.forward([(8 + rep + i) % TUNE_VOCAB for i in range(n)], state)
                    times.append(time.perf_counter() - started)
                seconds[how] = min(times)
            if seconds["compiled"] > seconds["per-op"]:
                break
            best = n
        return best


def time_candidate(model_config: Any, dtype: str, quantize: str, kernel: str) -> float:
    """Median seconds of one decode step on a model of this shape cut to TUNE_LAYERS layers (random weights:
    the time depends on shapes, not values)."""
    with torch.inference_mode():
        decoder = _cut(model_config, dtype, quantize, kernel)
        state = decoder.new_state()
        decoder.forward(list(range(8)), state)
        times = []
        for i in range(WARM + STEPS):
            started = time.perf_counter()
            decoder.forward([8 + i], state)
            times.append(time.perf_counter() - started)
    return statistics.median(times[WARM:])


def _read(file: str) -> dict | None:
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def choose(cfg: Any, path: str, model_config: Any, params: int, limit_bytes: int, threads: int,
           lib: kernels.Library | None, log: Callable[[str], None], retune: bool = False) -> Choice:
    """The decode path to load: the one candidate, the cached choice, or the fastest when timed now."""
    checkpoint = str(getattr(model_config, "dtype", None) or "bfloat16").removeprefix("torch.")
    found = candidates(cfg, checkpoint, params, limit_bytes, lib)
    if len(found) == 1 and found[0][2] != "native":
        return Choice(*found[0])
    key = cache_key(cfg, path, threads, lib)
    folder = os.path.join(cfg.cache_dir, "tune")
    os.makedirs(folder, exist_ok=True)
    file = os.path.join(folder, hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20] + ".json")
    with open(os.path.join(folder, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second worker waits here, then reads what the first wrote
        cached = None if retune else _read(file)
        if cached is not None and cached.get("key") == key:
            return Choice(**cached["choice"], source="cached")
        started = time.monotonic()
        timings = {}
        if len(found) > 1:
            for d, q, k in found:
                timings[f"{d}/{q}/{k}"] = time_candidate(model_config, d, q, k) * 1000
        best = min(found, key=lambda c: timings.get(f"{c[0]}/{c[1]}/{c[2]}", 0))
        rows = time_prefill(model_config, best[0], best[1]) if best[2] == "native" else 0
        choice = Choice(*best, source="tuned" if timings else "forced",
                        step_ms={k: round(v, 3) for k, v in timings.items()}, prefill_rows=rows)
        log(f"tuned decode in {time.monotonic() - started:.1f} s: {choice.label} "
            f"({', '.join(f'{k} {v:.1f} ms' for k, v in timings.items()) or 'forced'} per step of a "
            f"{TUNE_LAYERS}-layer cut); the compiled step prefills chunks of up to {rows} prompt tokens, "
            f"oneDNN's GEMMs longer ones")
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"key": key, "choice": {k: v for k, v in asdict(choice).items() if k != "source"}}, f)
        os.replace(tmp, file)
        return choice


def fast_path_config(config: Any) -> bool:
    """Whether the lean decoder can serve a model of this config (FastDecoder's check, before loading)."""
    rope = getattr(config, "rope_parameters", None) or {"rope_type": "default"}
    return (config.model_type in ("qwen2", "llama") and rope.get("rope_type", "default") == "default"
            and getattr(config, "hidden_act", "silu") == "silu" and not getattr(config, "mlp_bias", False)
            and all(t == "full_attention" for t in getattr(config, "layer_types", None) or ()))


def parameters(config: Any) -> int:
    """Parameters of a Qwen2/Llama-shaped model from its config (tied embeddings counted once)."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    kv = config.num_key_value_heads * d
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * inter
    embed = config.vocab_size * h
    return layers * per_layer + embed * (1 if getattr(config, "tie_word_embeddings", False) else 2)


def for_config(cfg: Any, path: str, model_config: Any, threads: int, log: Callable[[str], None],
               retune: bool = False) -> Choice:
    """The decode path to load: what the settings force, else the fastest on this CPU (tuned once, cached)."""
    from ..memory.budget import MemoryBudget
    from .cpu import resolve_dtype

    lib = kernels.load(cfg.cache_dir, log) if cfg.kernel in ("auto", "native") else None
    if cfg.kernel == "native" and lib is None:
        raise ValueError("kernel=native needs the compiled decode kernels, which could not be built "
                         "(see the log line above); use kernel=auto or onednn")
    if not fast_path_config(model_config):  # HFDecoder serves it: only the dtype is ours to pick
        return Choice(resolve_dtype(cfg.dtype, getattr(model_config, "dtype", None)),
                      "none" if cfg.quantize == "auto" else cfg.quantize, "hf")
    limit = MemoryBudget.from_config(cfg, siblings=False).read().limit
    return choose(cfg, path, model_config, parameters(model_config), limit, threads, lib, log, retune)
