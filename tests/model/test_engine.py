"""Engine behaviour on builtin:tiny: streaming, stops, limits, cancel, queue, leak mode, hygiene, load errors."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from daemon.model import engine as engine_mod
from daemon.memory import hygiene
from daemon.config import Config
from daemon.model.engine import ContextTooLong, Engine, EngineBusy, GenerationParams, ModelLoadError
from daemon.model.streaming import TextTracker
from support import REPO_ROOT
from support.engine import generation_threads

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("no_thread_left")  # make_engine and no_thread_left: conftest.py

HELLO = [{"role": "user", "content": "Tell me about the sea."}]
GREEDY = GenerationParams(max_new_tokens=30, temperature=0.0)


class Recorder:
    """An EngineListener keeping every (waiting, running) it is told."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def on_queue(self, waiting: int, running: int) -> None:
        self.calls.append((waiting, running))

    def on_kv_cache(self, **report) -> None:
        """The KV pool's reports: not what these tests watch."""

    def on_admission_wait(self, reason: str) -> None:
        """Why an arrival waited: not what these tests watch."""

    def on_batch_step(self, **step) -> None:
        """The batch's steps: not what these tests watch."""


def run(gen) -> list[str]:
    """Consume a generation, returning its deltas."""
    return list(gen)


def test_load_sets_attributes(make_engine):
    e = make_engine(warmup=True)
    assert e.ready and e.model_id == "builtin:tiny" and e.leak_mode == "off"
    assert e.dtype in ("float32", "bfloat16") and e.context_length == 32768
    assert e.load_seconds > 0 and e.in_progress() == 0 and e.queue_depth() == 0
    assert e.model.dtype == getattr(torch, e.dtype)


@pytest.mark.parametrize("flags,expected", [("fpu avx2 avx512_bf16 sse", "bfloat16"),
                                            ("fpu amx_bf16 amx_tile", "bfloat16"), ("fpu avx2 sse", "float32")])
def test_auto_dtype_follows_cpu_flags(tmp_path, monkeypatch, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(cpuinfo if p == "/proc/cpuinfo" else p,
                                                                    *a, **k))
    assert engine_mod.resolve_dtype("auto") == expected
    assert engine_mod.resolve_dtype("float32") == "float32"


def test_count_tokens_is_templated_prompt_length(make_engine):
    e = make_engine()
    text = "<|im_start|>user\nTell me about the sea.<|im_end|>\n<|im_start|>assistant\n"
    assert e.count_tokens(HELLO) == len(e.tokenizer(text, add_special_tokens=False)["input_ids"])


def test_greedy_is_deterministic_and_retokenizes_stably(make_engine):
    e = make_engine(min_new_tokens=20)
    first = e.generate(HELLO, GREEDY)
    run(first)
    second = e.generate(HELLO, GREEDY)
    run(second)
    assert first.text == second.text and first.token_ids == second.token_ids
    assert len(first.text) > 20 and first.stats.completion_tokens >= 20
    tok = e.tokenizer
    assert tok.decode(first.token_ids, skip_special_tokens=True) == first.text
    assert tok.decode(tok(first.text, add_special_tokens=False)["input_ids"]) == first.text


def test_sampled_replies_are_plain_text(make_engine):
    e = make_engine()
    tok = e.tokenizer
    special = set(tok.all_special_ids) - {tok.eos_token_id}
    for seed in range(8):
        gen = e.generate(HELLO, GenerationParams(max_new_tokens=40, temperature=3.0, seed=seed))
        run(gen)
        ids = gen.token_ids
        assert ids and all(i < len(tok) and i not in special for i in ids)
        assert "\ufffd" not in gen.text and all(c in "\n\t" or c >= " " for c in gen.text)
        assert tok.decode(tok(gen.text, add_special_tokens=False)["input_ids"]) == gen.text


def test_seed_makes_sampling_reproducible(make_engine):
    e = make_engine(min_new_tokens=20)
    texts = []
    for seed in (7, 7, 8):
        gen = e.generate(HELLO, GenerationParams(max_new_tokens=20, temperature=1.0, seed=seed))
        run(gen)
        texts.append(gen.text)
    assert texts[0] == texts[1] != texts[2]


def test_stream_deltas_concatenate_to_text(make_engine):
    e = make_engine(min_new_tokens=30)
    gen = e.generate(HELLO, GREEDY)
    deltas = run(gen)
    assert len(deltas) > 5 and "".join(deltas) == gen.text
    s = gen.stats
    assert s.completion_tokens == 30 and s.finish_reason == "length" and not s.timed_out
    assert s.prompt_tokens == e.count_tokens(HELLO) and s.queue_wait_s == 0.0
    assert s.ttft_s is not None and 0 <= s.ttft_s <= s.duration_s and s.hygiene_s >= 0


def test_stop_string_cuts_the_text(make_engine):
    e = make_engine(min_new_tokens=30)
    full = e.generate(HELLO, GREEDY)
    run(full)
    stop = full.text[len(full.text) // 2:len(full.text) // 2 + 4]
    expected = full.text[:full.text.index(stop)]
    gen = e.generate(HELLO, GenerationParams(max_new_tokens=30, temperature=0.0, stop=("zzzz", stop)))
    deltas = run(gen)
    assert gen.text == expected == "".join(deltas)
    assert gen.stats.finish_reason == "stop" and gen.stats.completion_tokens < 30


def test_tracker_holds_back_a_partial_stop_string():
    class Chars:  # a tokenizer whose ids are code points
        @staticmethod
        def decode(ids, **kwargs):
            return "".join(map(chr, ids))
    out: list[str] = []
    t = TextTracker(Chars(), ("END",), out.append)
    for c in "abEN":
        t.add(ord(c))
    assert "".join(out) == "ab"
    t.add(ord("x"))
    assert "".join(out) == "abENx"
    for c in "yEND!":
        if t.add(ord(c)):
            break
    assert t.stopped and t.text == "abENxy" == "".join(out)


def test_max_new_tokens_ends_with_length(make_engine):
    e = make_engine(min_new_tokens=50, max_new_tokens=50)
    gen = e.generate(HELLO, GenerationParams(max_new_tokens=5, temperature=0.0))
    run(gen)
    assert (gen.stats.completion_tokens, gen.stats.finish_reason) == (5, "length")
    capped = make_engine(min_new_tokens=8, max_new_tokens=8)
    gen = capped.generate(HELLO, GenerationParams(max_new_tokens=500, temperature=0.0))
    run(gen)
    assert (gen.stats.completion_tokens, gen.stats.finish_reason) == (8, "length")


def _sampled_runs(e, seeds):
    out = []
    for seed in seeds:
        gen = e.generate(HELLO, GenerationParams(max_new_tokens=40, temperature=1.0, seed=seed))
        run(gen)
        out.append(gen.stats)
    return out


def test_min_new_tokens_suppresses_early_eos(make_engine):
    free = _sampled_runs(make_engine(), range(20))
    assert any(s.finish_reason == "stop" and s.completion_tokens <= 10 for s in free)  # the model does end early
    held = _sampled_runs(make_engine(min_new_tokens=10), range(20))
    assert all(s.completion_tokens > 10 for s in held)  # eos only as the 11th token or later
    assert any(s.finish_reason == "stop" for s in held)


def test_generation_timeout_ends_with_length(make_engine):
    e = make_engine(generation_timeout_s=0.05, min_new_tokens=20000, max_new_tokens=20000)
    gen = e.generate(HELLO, GenerationParams(max_new_tokens=20000, temperature=0.0))
    run(gen)
    assert gen.stats.timed_out and gen.stats.finish_reason == "length"
    assert 0 < gen.stats.completion_tokens < 20000


def _hold(e):
    """Start a long generation and wait for its first chunk, so the slot is surely held."""
    gen = e.generate(HELLO, GenerationParams(max_new_tokens=20000, temperature=0.0))
    it = iter(gen)
    assert next(it)
    return gen, it


LONG = dict(min_new_tokens=20000, max_new_tokens=20000)


def test_cancel_mid_stream_frees_the_model(make_engine):
    e = make_engine(**LONG)
    gen, _ = _hold(e)
    assert e.in_progress() == 1 and generation_threads()
    gen.cancel()
    assert gen.stats.finish_reason == "cancelled" and 0 < gen.stats.completion_tokens < 20000
    assert e.in_progress() == 0  # the scheduler's thread ends by itself once the batch is empty
    deadline = time.monotonic() + 10
    while generation_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert generation_threads() == []
    gen.close()  # idempotent
    again = e.generate(HELLO, GenerationParams(max_new_tokens=3, temperature=0.0))
    run(again)
    assert again.stats.completion_tokens == 3


def test_abandoned_iterator_cancels(make_engine):
    e = make_engine(**LONG)
    gen, it = _hold(e)
    it.close()  # what a generator-based HTTP stream does when the client disconnects
    assert gen.stats.finish_reason == "cancelled" and e.in_progress() == 0


def test_queue_full_and_handover(make_engine):
    rec = Recorder()
    e = make_engine(listener=rec, queue_limit=1, max_batch=1, **LONG)
    holder, _ = _hold(e)
    waiter_result = {}

    def wait_in_line():
        gen = e.generate(HELLO, GenerationParams(max_new_tokens=3, temperature=0.0))
        waiter_result["wait"] = gen.stats  # None until it finishes
        run(gen)
        waiter_result["stats"] = gen.stats

    waiter = threading.Thread(target=wait_in_line)
    waiter.start()
    deadline = time.monotonic() + 30
    while e.queue_depth() != 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert e.queue_depth() == 1
    with pytest.raises(EngineBusy) as busy:
        e.generate(HELLO, GREEDY)
    assert busy.value.reason == "queue_full" and busy.value.retry_after >= 1
    holder.cancel()
    waiter.join(30)
    assert waiter_result["stats"].completion_tokens == 3 and waiter_result["stats"].queue_wait_s > 0
    assert (1, 1) in rec.calls and rec.calls[-1] == (0, 0)


def test_queue_timeout(make_engine):
    e = make_engine(queue_timeout_s=0.1, max_batch=1, **LONG)
    holder, _ = _hold(e)
    with pytest.raises(EngineBusy) as busy:
        e.generate(HELLO, GREEDY)
    assert busy.value.reason == "queue_timeout" and busy.value.retry_after >= 1
    assert e.queue_depth() == 0
    holder.cancel()


def test_queue_limit_zero_refuses_at_once(make_engine):
    e = make_engine(queue_limit=0, max_batch=1, **LONG)
    holder, _ = _hold(e)
    with pytest.raises(EngineBusy) as busy:
        e.generate(HELLO, GREEDY)
    assert busy.value.reason == "queue_full"
    holder.cancel()


def test_leak_mode_tensors_retains_each_turn(make_engine):
    leaky = make_engine(leak_mode="tensors", warmup=True)
    assert leaky.retained == []  # the warm-up is not counted
    for turn in range(1, 4):
        run(leaky.generate(HELLO, GenerationParams(max_new_tokens=4, temperature=0.0)))
        assert len(leaky.retained) == turn
    kept = leaky.retained[-1]
    assert kept.past_key_values is not None and len(kept.scores) >= 1
    clean = make_engine()
    for _ in range(3):
        run(clean.generate(HELLO, GenerationParams(max_new_tokens=4, temperature=0.0)))
    assert clean.retained == []


@pytest.mark.parametrize("gc_on,trim_on", [(True, True), (False, False)])
def test_hygiene_runs_per_config(make_engine, monkeypatch, gc_on, trim_on):
    calls = []
    monkeypatch.setattr(hygiene.gc, "collect", lambda: calls.append("gc") or 0)
    real_find = hygiene.find_malloc_trim
    monkeypatch.setattr(hygiene, "find_malloc_trim",
                        lambda log=None: (lambda pad, _t=real_find(log): calls.append("trim") or _t(pad)))
    e = make_engine(gc_after_turn=gc_on, malloc_trim_after_turn=trim_on)
    for _ in range(2):
        run(e.generate(HELLO, GenerationParams(max_new_tokens=2, temperature=0.0)))
    expected = (["gc"] if gc_on else []) + (["trim"] if trim_on else [])
    assert calls == expected * 2


def test_malloc_trim_found_on_glibc():
    import platform
    trim = hygiene.find_malloc_trim()
    assert (trim is not None) == (platform.libc_ver()[0] == "glibc")
    if trim is not None:
        assert trim(0) in (0, 1)


def test_context_too_long(make_engine):
    e = make_engine()
    e.context_length = e.count_tokens(HELLO)
    with pytest.raises(ContextTooLong):
        e.generate(HELLO, GREEDY)
    assert e.in_progress() == 0


def test_close_cancels_in_flight(make_engine):
    e = make_engine(**LONG)
    gen, _ = _hold(e)
    e.close()
    assert gen.stats.finish_reason == "cancelled" and not e.ready
    with pytest.raises(RuntimeError):
        e.generate(HELLO, GREEDY)


def test_invalid_params_rejected():
    for bad in (dict(max_new_tokens=0), dict(max_new_tokens=1, temperature=-1),
                dict(max_new_tokens=1, top_p=0.0), dict(max_new_tokens=1, top_p=1.5)):
        with pytest.raises(ValueError):
            GenerationParams(**bad)


@pytest.mark.parametrize("model", ["/nonexistent/edgechat-model", "EMPTY", "builtin:nope"])
def test_bad_model_raises_model_load_error(tmp_path, model):
    if model == "EMPTY":
        model = str(tmp_path)
    with pytest.raises(ModelLoadError) as err:
        Engine.load(Config(model=model, cache_dir=str(tmp_path / "cache"), threads=1, warmup=False))
    assert "`model`" in str(err.value) and "builtin:tiny" in str(err.value)


def test_uncached_hub_model_offline_raises_model_load_error(tmp_path):
    import os
    import subprocess
    import sys
    code = ("from daemon.config import Config\nfrom daemon.model.engine import Engine, ModelLoadError\n"
            "try:\n    Engine.load(Config(model='Qwen/Qwen2.5-0.5B-Instruct', threads=1))\n"
            "except ModelLoadError as exc:\n    print(exc)\n    raise SystemExit(3)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    message = proc.stdout.strip()
    assert "\n" not in message and "`model`" in message and "builtin:tiny" in message


def test_failed_generation_raises_and_frees_the_model(make_engine, monkeypatch):
    from daemon.model.streaming import GenerationFailed
    e = make_engine()
    monkeypatch.setattr(e.decoder, "step", lambda *args: (_ for _ in ()).throw(RuntimeError("boom")))
    gen = e.generate(HELLO, GREEDY)
    with pytest.raises(GenerationFailed, match="boom"):
        run(gen)
    assert gen.stats.finish_reason == "error" and e.in_progress() == 0
    monkeypatch.undo()
    ok = e.generate(HELLO, GenerationParams(max_new_tokens=2, temperature=0.0))
    run(ok)
    assert ok.stats.completion_tokens == 2
