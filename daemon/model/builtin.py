"""Locally generated `builtin:*` models: real Qwen2 architecture and tokenizer, random weights, no download."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator

BUILTIN_PREFIX = "builtin:"
NAMES = ("builtin:tiny", "builtin:qwen2.5-0.5b-shape")
# Bump when anything below changes what a build produces: ensure_built() then rebuilds old folders.
BUILD_VERSION = 2
MARKER = "edgechat-builtin.json"  # written last into a finished build; also tells the engine to mask ids
SEED = 20250101
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOKENIZER_VOCAB = 1280
# Qwen2's pre-tokenizer split (digits one by one, words with their leading space).
_SPLIT = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
          r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen2.5's ChatML template, tools and tool calls included, without the default system prompt Qwen
# injects: `tools` render in the system turn, assistant tool calls as <tool_call> JSON, tool results
# as <tool_response> in a user turn.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": "
    "<function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\\\"name\\\": \\\"' }}{{- tool_call.name }}"
    "{{- '\\\", \\\"arguments\\\": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_COMMON = dict(hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
               tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
               use_sliding_window=False, initializer_range=0.02)
# Model shapes. Embedding rows beyond the tokenizer exist (as in Qwen: 151936 rows, 151665 tokens).
# The tiny model's weights are wider than Qwen's 0.02 init, so greedy replies are not one token repeated,
# and its end-of-turn row is scaled up so replies end by themselves (sampled: median ~60 tokens).
_SPECS = {
    "builtin:tiny": dict(vocab_size=TOKENIZER_VOCAB + 64, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=128),
    "builtin:qwen2.5-0.5b-shape": dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24,
                                       num_attention_heads=14, num_key_value_heads=2,
                                       intermediate_size=4864),
}
_INIT = {"builtin:tiny": (0.2, 2.0), "builtin:qwen2.5-0.5b-shape": (0.02, 1.0)}  # (std, eos row scale)
_WEIGHTS = "model.safetensors"

Log = Callable[[str], None]


def is_builtin(name: str) -> bool:
    """Tell a built-in model name from a hub id or a folder."""
    return name.startswith(BUILTIN_PREFIX)


def _check(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(NAMES)}")


def builtin_dir(name: str, cache_dir: str) -> str:
    """Where a built-in model lives under the cache folder."""
    _check(name)
    return os.path.join(cache_dir, "models", name.replace(":", "-"))


def read_marker(folder: str) -> dict | None:
    """The build record of a finished built-in folder, or None for anything else."""
    try:
        with open(os.path.join(folder, MARKER), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):  # missing, unreadable or half-written: not a finished build
        return None


def is_built(name: str, folder: str) -> bool:
    """True when folder holds a finished build of name by the current recipe."""
    marker = read_marker(folder)
    return bool(marker) and marker.get("name") == name and marker.get("build_version") == BUILD_VERSION


def train_tokenizer():
    """Train the deterministic byte-level BPE tokenizer with ChatML special tokens and template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .builtin_corpus import CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, min_frequency=1, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.splitlines(keepends=True), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens=["<|im_start|>", "<|im_end|>"],
                                   model_max_length=_COMMON["max_position_embeddings"],
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def model_config(name: str, tokenizer):
    """The Qwen2Config of a built-in model, with the tokenizer's special ids."""
    from transformers import Qwen2Config

    _check(name)
    spec = _SPECS[name]
    if len(tokenizer) > spec["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than {name}'s {spec['vocab_size']} rows")
    return Qwen2Config(**spec, **_COMMON, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=None, dtype="bfloat16")


def parameter_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the saved tensors, from a model built on the meta device (no memory, no init)."""
    import torch
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    if config.tie_word_embeddings:  # saved once, as the embedding (like the released checkpoint)
        shapes = [(n, s) for n, s in shapes if n != "lm_head.weight"]
    return sorted(shapes)


def _tensor(name: str, shape: tuple[int, ...], std: float, eos_row: tuple[int, float]):
    """One bf16 weight: ones for norms, else normal(0, std) from a generator seeded by the tensor's name."""
    import torch

    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    seed = int.from_bytes(hashlib.sha256(f"{SEED}:{name}".encode()).digest()[:8], "little") >> 1
    gen = torch.Generator().manual_seed(seed)
    weight = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, std, generator=gen)
    if name == "model.embed_tokens.weight" and eos_row[1] != 1.0:
        weight[eos_row[0]] *= eos_row[1]
    return weight


def write_weights(path: str, shapes: list[tuple[str, tuple[int, ...]]], log: Log, *, std: float = 0.02,
                  eos_row: tuple[int, float] = (0, 1.0)) -> str:
    """Stream tensors into a safetensors file one at a time (peak memory = the largest tensor).

    Returns the file's sha256.
    """
    import torch

    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes:
        size = math.prod(shape) * 2  # bf16
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes with spaces
    digest = hashlib.sha256()
    written, next_report, started = 0, 0.1, time.monotonic()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            f.write(chunk)
            digest.update(chunk)
        for name, shape in shapes:
            data = _tensor(name, shape, std, eos_row).view(-1).view(torch.uint8).numpy()
            f.write(memoryview(data))
            digest.update(memoryview(data))
            written += data.nbytes
            del data
            if offset > 50_000_000 and written / offset >= next_report:
                log(f"  weights {written / offset:4.0%} ({written / 1e6:.0f} of {offset / 1e6:.0f} MB, "
                    f"{time.monotonic() - started:.1f} s)")
                next_report += 0.1
    return digest.hexdigest()


def build(name: str, out_dir: str, *, log: Log = print) -> str:
    """Build a built-in model into out_dir: deterministic (fixed seeds) and atomic (temp sibling + rename)."""
    from transformers import GenerationConfig

    _check(name)
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and read_marker(out_dir) is None:
        raise FileExistsError(f"{out_dir} exists and is not a built-in model folder; not overwriting it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    started = time.monotonic()
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.building-", dir=parent)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model folder is not secret
        log(f"building {name} into {out_dir}")
        tokenizer = train_tokenizer()
        tokenizer.save_pretrained(tmp)
        log(f"  tokenizer: byte-level BPE, {len(tokenizer)} tokens ({time.monotonic() - started:.2f} s)")
        config = model_config(name, tokenizer)
        config.save_pretrained(tmp)
        GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                         do_sample=False).save_pretrained(tmp)
        shapes = parameter_shapes(config)
        n_params = sum(math.prod(s) for _, s in shapes)
        log(f"  weights: {len(shapes)} tensors, {n_params:,} parameters, bfloat16")
        std, eos_scale = _INIT[name]
        sha = write_weights(os.path.join(tmp, _WEIGHTS), shapes, log, std=std,
                            eos_row=(config.eos_token_id, eos_scale))
        marker = {"name": name, "build_version": BUILD_VERSION, "parameters": n_params,
                  "weights_sha256": sha, "tokenizer_tokens": len(tokenizer)}
        with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
            json.dump(marker, f, indent=2)
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"built {name} in {time.monotonic() - started:.1f} s (peak RSS {_peak_rss_mb():.0f} MB): {out_dir}")
    return out_dir


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _swap_in(tmp: str, out_dir: str) -> None:
    """Move a finished build into place, replacing an older build or an empty folder."""
    old = None
    if os.path.isdir(out_dir):
        if os.listdir(out_dir):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
            os.replace(out_dir, os.path.join(old, "x"))
        else:
            os.rmdir(out_dir)
    os.replace(tmp, out_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(path: str) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_built(name: str, cache_dir: str, *, log: Log = print, isolate: bool = False) -> str:
    """Return the built-in model's folder, building it first if missing (once across processes).

    isolate=True builds in a child process, so that the caller runs no torch operation (a gunicorn
    master must not before it forks) and the build's freed memory goes back to the OS with the child.
    """
    folder = builtin_dir(name, cache_dir)
    if is_built(name, folder):
        return folder
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with _file_lock(folder + ".lock"):
        if is_built(name, folder):  # another process built it while we waited
            return folder
        if isolate:
            _build_in_child(name, folder, log)
        else:
            build(name, folder, log=log)
    return folder


def _build_in_child(name: str, folder: str, log: Log) -> None:
    """Run build() in a fresh interpreter and relay its log lines."""
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    code = "import sys; from daemon.model.builtin import build; build(sys.argv[1], sys.argv[2])"
    proc = subprocess.Popen([sys.executable, "-c", code, name, folder], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    for line in proc.stdout:
        log(line.rstrip("\n"))
    if proc.wait() != 0:
        raise RuntimeError(f"building {name} in a child process failed (exit {proc.returncode})")
