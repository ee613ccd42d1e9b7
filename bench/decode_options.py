"""Prefill and decode tokens/s of every way tried to run the model, interleaved round by round.

Each variant runs in its own child process with its own copy of the model (the lean decoder takes
its copy's weights over; OpenMP settings are read once per process), and every round asks each
child in turn for one measurement: a 512-token prompt from position 0 (llama-bench's pp512), then
64 greedy tokens (its tg64). Each variant's decode also shows the weight bytes it moves per second
(tok/s × bytes read per token). With --llama-bench and --gguf (bench/llamacpp/build.sh builds both),
llama.cpp's `llama-bench -t N -p 512 -n 64 -r 1` runs on the same model as GGUF (F32/BF16/Q8_0/Q4_K_M)
after each round of a variant, on the peer of its precision, and each variant is compared with the
median of its peer's runs from the same rounds (a shared machine's memory bandwidth drifts; both sides
then meet the same drift); the four GGUFs are also run together at the end. Used by bench.fast_turns;
runnable alone:

    .venv/bin/python -m bench.decode_options [--rounds 3] [--variants a,b,...]
        [--llama-bench PATH --gguf DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Callable

import psutil

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
    "lean-int8-torch": ("bfloat16", "int8-torch", 0),
    "lean-packed-bf16-spin": ("bfloat16", "packed", 0),
    "lean-native-bf16": ("bfloat16", "native", 0),
    "lean-native-fp32": ("float32", "native", 0),
    "lean-native-int8": ("bfloat16", "int8", 0),
    "lean-native-int4": ("bfloat16", "int4", 0),
}
# how -> FastDecoder's (quantize, kernel)
DECODERS = {"plain": ("none", "plain"), "packed": ("none", "onednn"), "native": ("none", "native"),
            "int8-torch": ("int8", "onednn"), "int8": ("int8", "native"), "int4": ("int4", "native")}
# llama.cpp's file for each precision (bench/llamacpp/build.sh's names) and its llama-bench type label
PEERS = {"float32": ("q05-f32.gguf", "F32"), "bfloat16": ("q05-bf16.gguf", "BF16"),
         "int8": ("q05-q8_0.gguf", "Q8_0"), "int4": ("q05-q4_k_m.gguf", "Q4_K_M")}
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
    "lean-packed-bf16": "lean decoder, oneDNN-prepacked weights, bf16 (the default where no compiler is found)",
    "lean-packed-bf16-1thread": "the default at 1 intra-op thread instead of 2 (physical cores)",
    "lean-packed-fp32": "lean decoder, prepacked, fp32 (dtype auto on CPUs without AVX512-BF16/AMX)",
    "lean-int8-torch": "lean decoder, int8 rows through torch's `_weight_int8pack_mm` (`quantize=int8 "
                       "kernel=onednn`)",
    "lean-packed-bf16-spin": "the default with libgomp's default wait policy (waiting threads spin) "
                             "instead of OMP_WAIT_POLICY=PASSIVE",
    "lean-native-bf16": "lean decoder, bf16 weights, compiled kernels, one call per token (`kernel=native`) — "
                        "edgechat's default here",
    "lean-native-fp32": "the same GEMV over fp32 weights (bf16 widened: exact)",
    "lean-native-int8": "int8 (`quantize=int8`), compiled kernels: a bf16 scale per 32 weights, 16 rows "
                        "interleaved, x in int8 (AVX512-VNNI; per-row scales elsewhere); int8 embeddings/lm_head",
    "lean-native-int4": "int4 groups of 32 for the MLPs (`quantize=int4`; attention and the first eighth of the "
                        "layers int8), compiled kernels; int8 embeddings/lm_head",
}


def precision(name: str) -> str:
    """float32 | bfloat16 | int8 | int4: what a variant's weights are, for its peer and bytes per token."""
    dtype, how, _ = VARIANTS[name]
    return "int8" if how.startswith("int8") else "int4" if how == "int4" else dtype


def bytes_per_token(config, prec: str) -> float:
    """Weight bytes one decode step reads: every projection and the lm_head (embedding rows are noise)."""
    from daemon.model.tune import parameters
    head = config.vocab_size * config.hidden_size
    layers = parameters(config) - head * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    per = {"float32": (4, 4), "bfloat16": (2, 2), "int8": (1 + 2 / config.hidden_size, 1), "int4": (0.625, 1)}
    layer_b, head_b = per[prec]
    return layers * layer_b + head * head_b


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
    if how == "hf":
        decoder = HFDecoder(model)
    else:
        from daemon.model import kernels
        kernels.load(common.default_cache_dir(), log=lambda line: print(line, file=sys.stderr))
        decoder = FastDecoder(model, *DECODERS[how])

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
    run_decoder.weight_bytes = streamed_bytes(decoder)
    return run_decoder


def streamed_bytes(decoder) -> int | None:
    """Weight bytes a decode step of `decoder` reads when every linear runs on the compiled kernels
    (quantized weights, their scales, outlier columns); None otherwise (then bytes_per_token() estimates)."""
    from daemon.model.weights import Streamed
    if not hasattr(decoder, "lm_head"):
        return None
    linears = [getattr(layer, n) for layer in decoder.layers for n in ("qkv", "o", "gate_up", "down")]
    linears.append(decoder.lm_head)
    if not all(isinstance(f, Streamed) for f in linears):
        return None
    return sum(t.numel() * t.element_size() for f in linears
               for t in (*f.weights, *(f.outliers or ())) if t is not None)


def serve(name: str, cache_dir: str) -> None:
    """Child mode: load one variant, then answer each stdin line with one measurement as JSON."""
    import torch

    from daemon.model.cpu import physical_cores
    dtype, how, threads = VARIANTS[name]
    torch.set_num_threads(threads or physical_cores())
    runner = load(_model_path(cache_dir), dtype, how)
    prompt = list(range(1000, 1000 + PROMPT))  # ids inside the built-in tokenizer's range mostly
    print(json.dumps({"ready": name}), flush=True)
    me = psutil.Process()
    for _ in sys.stdin:
        prefill_s, decode_s = runner(prompt)
        print(json.dumps({"prefill": PROMPT / prefill_s, "decode": NEW / decode_s, "rss": me.memory_info().rss,
                          "weight_bytes": getattr(runner, "weight_bytes", None)}), flush=True)


REFERENCE = "lean-native-bf16"


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


def measure(names: list[str], rounds: int, cache_dir: str, log=print,
            peer: Callable[[str], dict] | None = None) -> dict[str, dict]:
    """Per variant lists of tok/s. The reference (the default) stays loaded; each other variant is
    loaded alone beside it and the two alternate for `rounds` rounds (two models in memory at most,
    not eight: a bench machine is often shared). Each variant's rows also carry the reference's figures from
    its own rounds ("ref_decode"), so ratios compare like with like. `peer`, given a precision, runs
    llama.cpp once on it: called after each round of a variant, whose rows then carry the peer's figures
    from the same rounds ("peer"), so the memory bandwidth a shared machine gives drifts alike for both."""
    results = {n: {"prefill": [], "decode": [], "ref_prefill": [], "ref_decode": [], "rss": [], "weight_bytes": None,
                   "peer": []} for n in names}
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
                        if who == name:
                            results[name]["rss"].append(got["rss"])
                            results[name]["weight_bytes"] = got["weight_bytes"]
                        log(f"  {name} round {r + 1}: {who}: prefill {got['prefill']:.0f} tok/s, "
                            f"decode {got['decode']:.1f} tok/s")
                        if child is reference and name == REFERENCE:
                            break
                    if peer is not None and precision(name) in PEERS:
                        got = peer(precision(name))
                        results[name]["peer"].append(got)
                        log(f"  {name} round {r + 1}: llama.cpp {PEERS[precision(name)][1]}: prefill "
                            f"{got['prefill']:.0f} tok/s, decode {got['decode']:.1f} tok/s")
            finally:
                if other is not None and other is not reference:
                    other.stdin.close()
                    common.stop_process(other, 30)
    finally:
        reference.stdin.close()
        common.stop_process(reference, 30)
    return results


def llama_bench(binary: str, gguf_dir: str, threads: int, repetitions: int,
                precisions: tuple[str, ...] = tuple(PEERS)) -> dict[str, dict]:
    """llama.cpp's pp512/tg64 per precision: {precision: {"prefill", "decode", "bytes"}} (bytes: the
    model's tensor bytes, all read per generated token)."""
    files = [(prec, os.path.join(gguf_dir, f)) for prec, (f, _) in PEERS.items() if prec in precisions]
    files = [(prec, f) for prec, f in files if os.path.exists(f)]
    if not files:
        raise FileNotFoundError(f"no q05-*.gguf in {gguf_dir} (bench/llamacpp/build.sh writes them)")
    cmd = [binary, "-t", str(threads), "-p", str(PROMPT), "-n", str(NEW), "-r", str(repetitions), "-o", "json"]
    for _, f in files:
        cmd += ["-m", f]
    rows = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=3600).stdout)
    out: dict[str, dict] = {}
    for prec, f in files:
        for r in rows:
            if os.path.basename(r["model_filename"]) == os.path.basename(f):
                key = "prefill" if r["n_prompt"] else "decode"
                out.setdefault(prec, {"bytes": r["model_size"]})[key] = r["avg_ts"]
    return out


def table(results: dict[str, dict], config=None, peers: dict[str, dict] | None = None) -> str:
    """Markdown: variant, prefill and decode tok/s as median (p10–p90), decode against the default
    measured in the same rounds, the weight GB/s decode moves, and the ratios to llama.cpp's peer."""
    rows = []
    peers = peers or {}
    for name, r in results.items():
        ref = common.median(r["ref_decode"]) if r["ref_decode"] else common.median(r["decode"])
        decode, prefill = common.median(r["decode"]), common.median(r["prefill"])
        prec = precision(name)
        per_token = r.get("weight_bytes") or (bytes_per_token(config, prec) if config is not None else float("nan"))
        gbs = decode * per_token / 1e9
        peer = peers.get(prec)
        if r.get("peer"):  # llama.cpp interleaved with this variant's rounds: their medians
            peer = {k: common.median([p[k] for p in r["peer"]]) for k in ("prefill", "decode", "bytes")}
        rss = f"{max(r['rss']) / common.MB:.0f}" if r.get("rss") else "—"
        row = [f"`{name}`", WHAT[name], common.spread(r["prefill"], "{:.0f}"), common.spread(r["decode"], "{:.1f}"),
               common.ratio(decode, ref), f"{per_token / 1e6:.0f}", f"{gbs:.1f}", rss]
        if peers:
            row += (["—"] * 4 if peer is None else
                    [PEERS[prec][1], common.ratio(decode, peer["decode"]), common.ratio(prefill, peer["prefill"]),
                     common.ratio(gbs, peer["decode"] * peer["bytes"] / 1e9)])
        rows.append(row)
    headers = ["variant", "what", f"prefill tok/s (pp{PROMPT})", f"decode tok/s (tg{NEW})",
               "decode / default's in the same rounds", "weight MB read per token", "weight GB/s in decode",
               "RSS MB"]
    if peers:
        headers += ["llama.cpp peer", "decode / peer's", "prefill / peer's", "weight GB/s / peer's"]
    return common.markdown_table(headers, rows)


def peer_table(peers: dict[str, dict]) -> str:
    """Markdown: llama.cpp's own figures."""
    rows = [(PEERS[p][1], f"{v['prefill']:.0f}", f"{v['decode']:.1f}", f"{v['bytes'] / 1e6:.0f}",
             f"{v['decode'] * v['bytes'] / 1e9:.1f}") for p, v in peers.items()]
    return common.markdown_table(("llama.cpp GGUF", f"prefill tok/s (pp{PROMPT})", f"decode tok/s (tg{NEW})",
                                  "weight MB", "weight GB/s in decode"), rows)


def main(argv: list[str] | None = None) -> int:
    """Measure and print the table."""
    p = argparse.ArgumentParser(prog="python -m bench.decode_options", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--llama-bench", default=None, help="llama.cpp's llama-bench, run on the same model")
    p.add_argument("--gguf", default=None, help="folder of q05-{f32,bf16,q8_0,q4_k_m}.gguf")
    p.add_argument("--llama-repetitions", type=int, default=3)
    p.add_argument("--serve", default=None, help=argparse.SUPPRESS)  # child mode, used by measure()
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, args.cache_dir or common.default_cache_dir())
        return 0
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants: {', '.join(unknown)}")
    if bool(args.llama_bench) != bool(args.gguf):
        p.error("--llama-bench and --gguf go together")
    print(f"{common.today()}: {common.machine_note()}; {common.code_note()}", flush=True)
    cache_dir = args.cache_dir or common.default_cache_dir()
    peers = None
    peer = None
    if args.llama_bench:
        from daemon.model.cpu import physical_cores

        def peer(prec: str) -> dict:
            return llama_bench(args.llama_bench, args.gguf, physical_cores(), 1, (prec,))[prec]
        print(f"  llama.cpp: llama-bench -t {physical_cores()} -p {PROMPT} -n {NEW} -r 1 after each round of a "
              "variant, on its peer", flush=True)
    results = measure(names, args.rounds, cache_dir, peer=peer)
    if args.llama_bench:
        print(f"  llama-bench -t {physical_cores()} -p {PROMPT} -n {NEW} -r {args.llama_repetitions}, all four ...",
              flush=True)
        peers = llama_bench(args.llama_bench, args.gguf, physical_cores(), args.llama_repetitions)
        print(peer_table(peers))
    from transformers import AutoConfig
    print(table(results, AutoConfig.from_pretrained(_model_path(cache_dir)), peers))
    print(common.machine_note())
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
