"""Built-in models: deterministic, atomic builds loadable by transformers' Auto classes; build-model CLI."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import threading

import pytest
import torch

from daemon.model import builtin as bm
from daemon.cli import build_model as cli

torch.set_num_threads(1)

QUIET = dict(log=lambda line: None)


def sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def tiny_dir(cache_dir) -> str:
    """builtin:tiny as conftest built it once for the run."""
    return bm.builtin_dir("builtin:tiny", cache_dir)


def test_names_and_folders():
    assert bm.is_builtin("builtin:tiny") and not bm.is_builtin("Qwen/Qwen2.5-0.5B-Instruct")
    assert bm.builtin_dir("builtin:tiny", "/c") == "/c/models/builtin-tiny"
    with pytest.raises(ValueError, match="builtin:tiny"):
        bm.builtin_dir("builtin:huge", "/c")


def test_build_is_deterministic(tiny_dir, tmp_path):
    again = bm.build("builtin:tiny", str(tmp_path / "again"), **QUIET)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert sha(os.path.join(tiny_dir, name)) == sha(os.path.join(again, name)), name
    marker = bm.read_marker(tiny_dir)
    assert marker["weights_sha256"] == sha(os.path.join(tiny_dir, "model.safetensors"))
    assert marker["name"] == "builtin:tiny" and bm.is_built("builtin:tiny", tiny_dir)
    assert os.path.getsize(os.path.join(tiny_dir, "model.safetensors")) < 1_000_000  # a few hundred KB


def test_auto_classes_load_the_folder(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2ForCausalLM
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    c = model.config
    assert isinstance(model, Qwen2ForCausalLM)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.max_position_embeddings) == (64, 2, 4, 2, 128, 32768)
    assert c.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert 1000 <= len(tok) < c.vocab_size  # rows beyond the tokenizer exist, as in Qwen
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert c.eos_token_id == tok.eos_token_id and c.pad_token_id == tok.pad_token_id
    assert {"<|endoftext|>", "<|im_start|>", "<|im_end|>"} <= set(tok.all_special_tokens)


def test_chat_template_is_chatml(tiny_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n")
    ids = tok("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[-1] == tok.eos_token_id


@pytest.mark.parametrize("text", ["Hello there, how are you today?", "  two  spaces\nand lines\t!",
                                  "Zürich, 東京, emoji 🙂 and 12345", "never seen: qxzj vlorp"])
def test_tokenizer_is_byte_level_and_lossless(tiny_dir, text):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode())  # BPE merges, not one token per byte


def test_ensure_built_builds_once_across_concurrent_callers(tmp_path):
    lines: list[str] = []
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(
        bm.ensure_built("builtin:tiny", str(tmp_path), log=lines.append))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and sum(line.startswith("building") for line in lines) == 1
    folder = results[0]
    mtime = os.path.getmtime(os.path.join(folder, "model.safetensors"))
    assert bm.ensure_built("builtin:tiny", str(tmp_path), **QUIET) == folder
    assert os.path.getmtime(os.path.join(folder, "model.safetensors")) == mtime
    assert [n for n in os.listdir(os.path.dirname(folder)) if ".building-" in n or ".old-" in n] == []


def test_ensure_built_rebuilds_an_outdated_build(tmp_path):
    folder = bm.ensure_built("builtin:tiny", str(tmp_path), **QUIET)
    marker = os.path.join(folder, bm.MARKER)
    record = json.load(open(marker))
    record["build_version"] = bm.BUILD_VERSION - 1
    json.dump(record, open(marker, "w"))
    lines: list[str] = []
    bm.ensure_built("builtin:tiny", str(tmp_path), log=lines.append)
    assert any(line.startswith("building") for line in lines) and bm.is_built("builtin:tiny", folder)


def test_ensure_built_isolated_builds_in_a_child(tmp_path):
    lines: list[str] = []
    folder = bm.ensure_built("builtin:tiny", str(tmp_path), log=lines.append, isolate=True)
    assert bm.is_built("builtin:tiny", folder) and any(line.startswith("built builtin:tiny") for line in lines)


def test_build_refuses_a_foreign_folder_and_replaces_its_own(tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(FileExistsError):
        bm.build("builtin:tiny", str(tmp_path), **QUIET)
    assert (tmp_path / "mine.txt").read_text() == "precious"
    target = str(tmp_path / "model")
    bm.build("builtin:tiny", target, **QUIET)
    bm.build("builtin:tiny", target, **QUIET)  # a rebuild swaps in place
    assert bm.is_built("builtin:tiny", target)
    assert sorted(os.listdir(tmp_path)) == ["mine.txt", "model"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgechat")
    cli.add_parsers(parser.add_subparsers())
    return parser


def test_cli_build_model(tmp_path, capsys):
    args = _parser().parse_args(["build-model", "builtin:tiny", str(tmp_path / "out")])
    assert args.func(args) == 0
    assert str(tmp_path / "out") in capsys.readouterr().out
    assert bm.is_built("builtin:tiny", str(tmp_path / "out"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("x")
    args = _parser().parse_args(["build-model", "builtin:tiny", str(tmp_path / "other")])
    assert args.func(args) == 1
    with pytest.raises(SystemExit):
        _parser().parse_args(["build-model", "builtin:nope", str(tmp_path)])


# Qwen2.5-0.5B: embeddings 151936*896 (tied) + 24 layers * (q 896*896+896, k/v 2*(128*896+128),
# o 896*896, MLP 3*896*4864, 2 norms 896) + final norm 896 = 494,032,768.
QWEN05_PARAMS = 151936 * 896 + 24 * (896 * 896 + 896 + 2 * (128 * 896 + 128) + 896 * 896
                                     + 3 * 896 * 4864 + 2 * 896) + 896


@pytest.mark.slow
def test_qwen05_shape_build_and_generate(tmp_path):
    from daemon.config import Config
    from daemon.model.engine import Engine, GenerationParams

    assert QWEN05_PARAMS == 494_032_768
    folder = bm.ensure_built("builtin:qwen2.5-0.5b-shape", str(tmp_path), **QUIET)
    path = os.path.join(folder, "model.safetensors")
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    header.pop("__metadata__")
    assert {v["dtype"] for v in header.values()} == {"BF16"}
    assert sum(torch.Size(v["shape"]).numel() for v in header.values()) == QWEN05_PARAMS
    from transformers import AutoModelForCausalLM
    # counted on plain transformers: the engine's fast decoder repacks weights and frees HF's copies
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert sum(p.numel() for p in hf.parameters()) == QWEN05_PARAMS
    del hf
    # no KV kept and each prompt in one chunk: alone and batched below take the same prompt path
    engine = Engine.load(Config(model="builtin:qwen2.5-0.5b-shape", cache_dir=str(tmp_path), threads=1,
                                warmup=False, kv_cache_bytes=0, prefill_chunk=512))
    try:
        c = engine.model.config
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads,
                c.intermediate_size, c.vocab_size, c.max_position_embeddings) == \
            (896, 24, 14, 2, 4864, 151936, 32768)
        assert c.tie_word_embeddings and c.rope_parameters["rope_theta"] == 1e6 and c.rms_norm_eps == 1e-6
        gen = engine.generate([{"role": "user", "content": "Hi"}],
                              GenerationParams(max_new_tokens=4, temperature=0.0))
        deltas = list(gen)
        assert gen.stats.completion_tokens >= 1 and "".join(deltas) == gen.text
        assert all(i < len(engine.tokenizer) for i in gen.token_ids)
        # the real shape's greedy tokens are the same alone or decoded in one batch
        greedy = GenerationParams(max_new_tokens=8, temperature=0.0)
        prompts = [[{"role": "user", "content": q}] for q in ("Hi", "Tell me about the sea.", "Count to ten.")]

        def drain(g):
            for _ in g:
                pass
            return g.token_ids
        alone = [drain(engine.generate(p, greedy)) for p in prompts]
        engine.kv_pool.budget_bytes = 64 << 20  # room for the three beside each other
        gens = [engine.generate(p, greedy) for p in prompts]
        assert [drain(g) for g in gens] == alone
    finally:
        engine.close()
