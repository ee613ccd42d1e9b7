"""Continuous batching on builtin:tiny: a generation's tokens are the same alone or beside others (every weight
kind and ISA this CPU runs), the batch bound and its waiting line, the KV budget, cancel and shed."""
from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import torch

from daemon.model import kernels
from daemon.model.engine import EngineBusy, GenerationParams, GenerationShed

pytestmark = pytest.mark.usefixtures("no_thread_left")
QUESTIONS = ["Tell me about the sea.", "What is seventeen times three?", "Write a line about autumn.",
             "Name a prime number.", "Describe a quiet park."]
GREEDY = GenerationParams(max_new_tokens=24, temperature=0.0)
LONG = dict(min_new_tokens=20000, max_new_tokens=20000)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def drain(gen) -> list[int]:
    for _ in gen:
        pass
    return gen.token_ids


def together(e, prompts, params=GREEDY) -> list[list[int]]:
    """Start every prompt before any is read, so they run in one batch; their token ids."""
    gens = [e.generate(user(p), params) for p in prompts]
    return [drain(g) for g in gens]


@pytest.fixture
def forced(request, make_engine, monkeypatch, cache_dir):
    """make_engine on the compiled kernels forced to one ISA (skipped where this CPU lacks it)."""
    isa, vnni = request.param
    lib = kernels.load(cache_dir)
    if lib is None:
        pytest.skip("the kernels did not build")
    if isa > lib.isa or (vnni and not lib.vnni):
        pytest.skip(f"this CPU runs {lib.isa_name}{'+vnni' if lib.vnni else ''}")
    chosen = dataclasses.replace(lib, isa=isa, vnni=vnni)
    monkeypatch.setattr(kernels, "current", lambda: chosen)
    return make_engine


@pytest.mark.parametrize("forced", [(0, False), (1, False), (2, False), (3, False), (4, False), (2, True)],
                         ids=["generic", "avx2", "avx512", "avx512_bf16", "amx_bf16", "avx512+vnni"], indirect=True)
@pytest.mark.parametrize("quantize,dtype", [("none", "bfloat16"), ("none", "float32"), ("int8", "bfloat16"),
                                            ("int4", "bfloat16")])
def test_greedy_tokens_are_the_same_alone_or_batched(forced, quantize, dtype):
    # prefill_chunk: each prompt in one chunk, alone or beside others (the same prompt path both times)
    e = forced(quantize=quantize, dtype=dtype, kernel="native", min_new_tokens=24, kv_cache_bytes=0,
               max_batch=4, prefill_chunk=512)
    assert e.decode_path["step"] == "one-call"
    alone = [drain(e.generate(user(q), GREEDY)) for q in QUESTIONS[:4]]  # no KV kept: nothing reused below
    e.kv_pool.budget_bytes = 64 << 20  # room for all four beside each other
    assert together(e, QUESTIONS[:4]) == alone


@pytest.mark.parametrize("kernel", ["onednn", "plain"])
def test_torch_paths_batch_by_turns_with_the_same_tokens(make_engine, kernel):
    """Without the compiled step each sequence runs op by op in turn: the same tokens, nothing slower."""
    e = make_engine(kernel=kernel, min_new_tokens=16, kv_cache_bytes=0, prefill_chunk=512)
    alone = [drain(e.generate(user(q), GREEDY)) for q in QUESTIONS[:3]]
    e.kv_pool.budget_bytes = 64 << 20
    assert together(e, QUESTIONS[:3]) == alone


def test_seeded_sampling_is_its_own_stream_in_a_batch(make_engine):
    e = make_engine(min_new_tokens=20, kv_cache_bytes=0, prefill_chunk=512)
    params = GenerationParams(max_new_tokens=20, temperature=1.0, seed=1234)
    alone = drain(e.generate(user(QUESTIONS[0]), params))  # no KV kept: the same prompt path below
    e.kv_pool.budget_bytes = 64 << 20
    others = [GenerationParams(max_new_tokens=20, temperature=1.0, seed=s) for s in (1, 2)]
    gens = [e.generate(user(QUESTIONS[1]), others[0]), e.generate(user(QUESTIONS[0]), params),
            e.generate(user(QUESTIONS[2]), others[1])]
    ids = [drain(g) for g in gens]
    assert ids[1] == alone


def test_the_batch_never_exceeds_max_batch_and_the_oldest_joins_first(make_engine):
    # 300 tokens each: long enough that all 5 overlap (12 ended before the next arrived)
    e = make_engine(max_batch=2, queue_limit=4, min_new_tokens=300, max_new_tokens=300)
    seen, order, lock = [], [], threading.Lock()

    def run(i):
        gen = e.generate(user(QUESTIONS[i]), GenerationParams(max_new_tokens=300, temperature=0.0))
        with lock:
            order.append(i)
        for _ in gen:
            seen.append(e.in_progress())
    threads = []
    for i in range(5):
        threads.append(threading.Thread(target=run, args=(i,)))
        threads[-1].start()
        deadline = time.monotonic() + 10  # each arrival before the next: arrival order is known
        while e.in_progress() + e.queue_depth() < min(i + 1, 5) and time.monotonic() < deadline:
            time.sleep(0.002)
    for t in threads:
        t.join(60)
    assert max(seen) == 2 and len(order) == 5  # the batch filled, and never past max_batch
    assert order[:2] == sorted(order[:2]) and order[2:] == sorted(order[2:])  # FIFO among those that waited


def test_a_generation_waits_for_kv_room_and_a_lone_one_always_runs(make_engine):
    e = make_engine(max_batch=4, queue_timeout_s=0.2, **LONG)
    per = e.decoder.kv_bytes(len(e.encode(user(QUESTIONS[0]))) + 20000)
    e.kv_pool.budget_bytes = per + per // 2  # room for one such generation, not two
    first = e.generate(user(QUESTIONS[0]), GenerationParams(max_new_tokens=20000, temperature=0.0))
    it = iter(first)
    assert next(it)
    with pytest.raises(EngineBusy) as busy:  # the second waits for KV room, then times out
        e.generate(user(QUESTIONS[1]), GenerationParams(max_new_tokens=20000, temperature=0.0))
    assert busy.value.reason == "queue_timeout"
    first.cancel()
    e.kv_pool.budget_bytes = 0  # nothing fits beside another, but alone it runs
    assert len(drain(e.generate(user(QUESTIONS[1]), GenerationParams(max_new_tokens=5, temperature=0.0)))) == 5


def test_cancelling_one_leaves_the_others_running(make_engine):
    e = make_engine(**LONG)
    gens = [e.generate(user(q), GenerationParams(max_new_tokens=20000, temperature=0.0)) for q in QUESTIONS[:3]]
    its = [iter(g) for g in gens]
    for it in its:
        assert next(it)
    gens[1].cancel()
    assert gens[1].stats.finish_reason == "cancelled" and e.in_progress() == 2
    for g, it in ((gens[0], its[0]), (gens[2], its[2])):  # each keeps decoding: 5 new tokens past the cancel
        target = len(g.token_ids) + 5
        while len(g.token_ids) < target:
            assert next(it, None) is not None, g.stats.finish_reason
    for g in (gens[0], gens[2]):
        g.cancel()
    assert e.in_progress() == 0


def test_a_newcomer_starts_while_the_others_keep_streaming(make_engine):
    e = make_engine(prefill_chunk=8, **LONG)
    running = e.generate(user(QUESTIONS[0]), GenerationParams(max_new_tokens=20000, temperature=0.0))
    it = iter(running)
    assert next(it)
    long_prompt = user(" ".join(QUESTIONS * 6))
    newcomer = e.generate(long_prompt, GenerationParams(max_new_tokens=3, temperature=0.0))
    at_join = len(running.token_ids)
    assert len(drain(newcomer)) == 3
    # the newcomer's prompt went in chunks of 8 beside it: the running one kept producing meanwhile
    assert len(running.token_ids) - at_join >= newcomer.stats.prompt_tokens // 8
    running.cancel()


def test_shed_cancels_the_newest_and_tells_their_callers(make_engine):
    e = make_engine(**LONG)
    gens = [e.generate(user(q), GenerationParams(max_new_tokens=20000, temperature=0.0)) for q in QUESTIONS[:3]]
    its = [iter(g) for g in gens]
    for it in its:
        assert next(it)
    assert e.shed(keep=1) == 2
    for it, gen in zip(its[1:], gens[1:]):
        with pytest.raises(GenerationShed):
            for _ in it:
                pass
        assert gen.stats.finish_reason == "shed"
    assert not gens[0].done and e.in_progress() == 1
    gens[0].cancel()


def test_batch_reports_places_and_kv_bytes(make_engine):
    e = make_engine(max_batch=3, **LONG)
    gen = e.generate(user(QUESTIONS[0]), GenerationParams(max_new_tokens=20000, temperature=0.0))
    it = iter(gen)  # kept: an iterator dropped unfinished cancels its generation
    next(it)
    b = e.batch()
    assert (b["max_batch"], b["running"], b["waiting"]) == (3, 1, 0)
    assert b["kv_running_bytes"] == e.decoder.kv_bytes(len(e.encode(user(QUESTIONS[0]))) + 20000)
    gen.cancel()
    drain(e.generate(user(QUESTIONS[1]), GenerationParams(max_new_tokens=40, temperature=0.0)))
    b = e.batch()
    assert b["running"] == 0 and b["kv_running_bytes"] == 0 and b["kv_idle_bytes"] > 0
    assert b["decode_steps"]["1"]["steps"] >= 38 and b["decode_steps"]["1"]["tokens_per_s"] > 0


def test_close_ends_running_and_waiting_generations(make_engine):
    e = make_engine(max_batch=1, queue_limit=2, **LONG)
    running = e.generate(user(QUESTIONS[0]), GenerationParams(max_new_tokens=20000, temperature=0.0))
    it = iter(running)
    next(it)
    refused = []
    waiter = threading.Thread(target=lambda: refused.append(pytest.raises(
        EngineBusy, e.generate, user(QUESTIONS[1]), GREEDY).value.reason))
    waiter.start()
    deadline = time.monotonic() + 10
    while e.queue_depth() < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    e.close()
    waiter.join(10)
    assert refused == ["shutting_down"] and running.stats.finish_reason == "cancelled"


def test_the_loop_uses_no_autograd(make_engine, monkeypatch):
    e = make_engine()
    seen = []
    real = e.decoder.step

    def watch(work):
        seen.append(torch.is_inference_mode_enabled())
        return real(work)
    monkeypatch.setattr(e.decoder, "step", watch)
    drain(e.generate(user(QUESTIONS[0]), GenerationParams(max_new_tokens=3, temperature=0.0)))
    assert seen and all(seen)
