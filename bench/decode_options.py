"""Prefill and decode tokens/s of every way tried to run the model, interleaved round by round.

Each variant runs in its own child process with its own copy of the model (the lean decoder takes
its copy's weights over; OpenMP settings are read once per process), and every round asks each
child in turn for one measurement: a 512-token prompt from position 0 (llama-bench's pp512), then
64 greedy tokens (its tg64). Used by bench.fast_turns; runnable alone:

    .venv/bin/python -m bench.decode_options [--rounds 3] [--variants a,b,...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Callable

from . import common

PROMPT, NEW = 512, 64
# name -> (dtype, how, threads); threads 0 = physical cores (the daemon's default)
VARIANTS = {
    "generate-bf16": ("bfloat16", "generate", 0),
    "generate-fp32": ("float32", "generate", 0),
    "loop-on-hf-forward-bf16": ("bfloat16", "hf", 0),
    "lean-unpacked-bf16": ("bfloat16", "plain", 0),
    "lean-packed-bf16": ("bfloat16", "packed", 0),
    "lean-packed-bf16-1thread": ("bfloat16", "packed", 1),
    "lean-packed-fp32": ("float32", "packed", 0),
    "lean-int8": ("bfloat16", "int8", 0),
    "lean-packed-bf16-spin": ("bfloat16", "packed", 0),
}
# Every child runs with OpenMP's waiters asleep, as `edgechat serve` sets it; "-spin" shows libgomp's
# default (waiters spin), the setting the engine used to run under.
BASE_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}
ENV = {"lean-packed-bf16-spin": {"OMP_WAIT_POLICY": None}}
WHAT = {
    "generate-bf16": "transformers `generate`, bf16 (what the engine ran before KV reuse and the lean decoder)",
    "generate-fp32": "transformers `generate`, fp32 (the naive loop, bench.naive_loop)",
    "loop-on-hf-forward-bf16": "own decode loop over transformers' model forward + DynamicCache, bf16 "
                               "(edgechat's path for models outside the Qwen2/Llama family)",
    "lean-unpacked-bf16": "lean decoder, fused projections, plain `F.linear` weights, bf16",
    "lean-packed-bf16": "lean decoder, oneDNN-prepacked weights, bf16 — edgechat's default here",
    "lean-packed-bf16-1thread": "the default at 1 intra-op thread instead of 2 (physical cores)",
    "lean-packed-fp32": "lean decoder, prepacked, fp32 (dtype auto on CPUs without AVX512-BF16/AMX)",
    "lean-int8": "lean decoder, int8 weight-only (`quantize=int8`), bf16 activations",
    "lean-packed-bf16-spin": "the default with libgomp's default wait policy (waiting threads spin) "
                             "instead of OMP_WAIT_POLICY=PASSIVE",
}


def _model_path(cache_dir: str) -> str:
    from daemon.model.builtin import ensure_built
    return ensure_built(common.MODEL, cache_dir, log=lambda *a: None)


def load(path: str, dtype: str, how: str) -> Callable[[list[int]], tuple[float, float]]:
    """A runner: prompt ids -> (prefill seconds, decode seconds for NEW tokens)."""
    import torch
    from transformers import AutoModelForCausalLM, StoppingCriteria, StoppingCriteriaList

    from daemon.model.forward import FastDecoder, HFDecoder
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    if how == "generate":
        class FirstToken(StoppingCriteria):
            at = 0.0

            def __call__(self, input_ids, scores, **kwargs):
                self.at = self.at or time.perf_counter()
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        def run_generate(ids: list[int]) -> tuple[float, float]:
            first = FirstToken()
            x = torch.tensor([ids])
            started = time.perf_counter()
            with torch.inference_mode():
                model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW + 1,
                               min_new_tokens=NEW + 1, do_sample=False,
                               stopping_criteria=StoppingCriteriaList([first]))
            return first.at - started, time.perf_counter() - first.at
        return run_generate
    decoder = HFDecoder(model) if how == "hf" else FastDecoder(
        model, "int8" if how == "int8" else "none", pack=how != "plain")

    def run_decoder(ids: list[int]) -> tuple[float, float]:
        with torch.inference_mode():
            state = decoder.new_state()
            started = time.perf_counter()
            logits = decoder.forward(ids, state)
            token = int(torch.argmax(logits))
            prefilled = time.perf_counter()
            for _ in range(NEW):
                token = int(torch.argmax(decoder.forward([token], state)))
            return prefilled - started, time.perf_counter() - prefilled
    return run_decoder


def serve(name: str, cache_dir: str) -> None:
    """Child mode: load one variant, then answer each stdin line with one measurement as JSON."""
    import torch

    from daemon.model.cpu import physical_cores
    dtype, how, threads = VARIANTS[name]
    torch.set_num_threads(threads or physical_cores())
    runner = load(_model_path(cache_dir), dtype, how)
    prompt = list(range(1000, 1000 + PROMPT))  # ids inside the built-in tokenizer's range mostly
    print(json.dumps({"ready": name}), flush=True)
    for _ in sys.stdin:
        prefill_s, decode_s = runner(prompt)
        print(json.dumps({"prefill": PROMPT / prefill_s, "decode": NEW / decode_s}), flush=True)


REFERENCE = "lean-packed-bf16"


def _spawn(name: str, cache_dir: str) -> subprocess.Popen:
    env = {**common.clean_env(), **BASE_ENV, **ENV.get(name, {})}
    child = subprocess.Popen([sys.executable, "-m", "bench.decode_options", "--serve", name, "--cache-dir",
                              cache_dir], cwd=common.REPO, text=True, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, env={k: v for k, v in env.items() if v is not None})
    if "ready" not in json.loads(child.stdout.readline() or "{}"):
        common.stop_process(child, 30)
        raise RuntimeError(f"variant {name} failed to load")
    return child


def _ask(child: subprocess.Popen) -> dict:
    child.stdin.write("run\n")
    child.stdin.flush()
    return json.loads(child.stdout.readline())


def measure(names: list[str], rounds: int, cache_dir: str, log=print) -> dict[str, dict]:
    """Per variant lists of tok/s. The reference (the default) stays loaded; each other variant is
    loaded alone beside it and the two alternate for `rounds` rounds (two models in memory at most,
    not eight: a bench machine is often shared). Each variant's rows also carry the reference's figures from
    its own rounds ("ref_decode"), so ratios compare like with like."""
    results = {n: {"prefill": [], "decode": [], "ref_prefill": [], "ref_decode": []} for n in names}
    reference = _spawn(REFERENCE, cache_dir)
    try:
        for name in names:
            other = reference if name == REFERENCE else None
            try:
                if other is None:
                    log(f"  loading {name} ...")
                    other = _spawn(name, cache_dir)
                for r in range(rounds):
                    pair = [(name, other), (REFERENCE, reference)]
                    for who, child in (pair if r % 2 == 0 else pair[::-1]):  # alternate who goes first
                        got = _ask(child)
                        keys = ("prefill", "decode") if who == name else ("ref_prefill", "ref_decode")
                        results[name][keys[0]].append(got["prefill"])
                        results[name][keys[1]].append(got["decode"])
                        log(f"  {name} round {r + 1}: {who}: prefill {got['prefill']:.0f} tok/s, "
                            f"decode {got['decode']:.1f} tok/s")
                        if child is reference and name == REFERENCE:
                            break
            finally:
                if other is not None and other is not reference:
                    other.stdin.close()
                    common.stop_process(other, 30)
    finally:
        reference.stdin.close()
        common.stop_process(reference, 30)
    return results


def table(results: dict[str, dict]) -> str:
    """Markdown: variant, prefill and decode tok/s as median (p10–p90), and decode against the default
    measured in the same rounds."""
    rows = []
    for name, r in results.items():
        ref = common.median(r["ref_decode"]) if r["ref_decode"] else common.median(r["decode"])
        rows.append((f"`{name}`", WHAT[name], common.spread(r["prefill"], "{:.0f}"),
                     common.spread(r["decode"], "{:.1f}"), common.ratio(common.median(r["decode"]), ref)))
    return common.markdown_table(("variant", "what", f"prefill tok/s (pp{PROMPT})", f"decode tok/s (tg{NEW})",
                                  "decode / default's in the same rounds"), rows)


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table."""
    p = argparse.ArgumentParser(prog="python -m bench.decode_options", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--serve", default=None, help=argparse.SUPPRESS)  # child mode, used by measure()
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, args.cache_dir or common.default_cache_dir())
        return 0
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants: {', '.join(unknown)}")
    print(f"{common.today()}: {common.machine_note()}; {common.code_note()}", flush=True)
    results = measure(names, args.rounds, args.cache_dir or common.default_cache_dir())
    print(table(results))
    print(common.machine_note())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
