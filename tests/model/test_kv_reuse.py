"""KV reuse across turns on builtin:tiny (float32): same logits and replies as a full prefill, across a
trim; the pool's byte budget holds; dropped or released caches fall back to a full prefill; cancel,
timeout and errors free everything. Also the lean decoder against transformers, int8, block trimming."""
from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch

from daemon.services import get_services
from daemon.model import cpu, engine as engine_mod
from daemon.config import Config
from daemon.model.forward import FastDecoder, HFDecoder
from daemon.model.engine import Engine, GenerationParams
from daemon.model.kvpool import KVPool, KVState
from daemon.model.weights import release_file_pages
from daemon.sessions import HistoryPolicy, MemoryStore
from support.fakes import count_words
from support.metrics import metric_value

torch.set_num_threads(1)
# make_engine (conftest.py) loads builtin:tiny in float32 here: exact comparisons
pytestmark = [pytest.mark.engine_defaults(dtype="float32", min_new_tokens=12),
              pytest.mark.usefixtures("no_thread_left")]

GREEDY = GenerationParams(max_new_tokens=12, temperature=0.0)
SYSTEM = "You are a helpful sailor."


class KVRecorder:
    """A listener keeping every KV pool report (and the queue calls the engine also makes)."""

    def __init__(self) -> None:
        self.reports: list[dict] = []

    def on_queue(self, waiting: int, running: int) -> None:
        pass

    def on_kv_cache(self, **report) -> None:
        self.reports.append(report)

    def on_admission_wait(self, reason: str) -> None:
        pass

    def on_batch_step(self, **step) -> None:
        pass


def reply(e: Engine, messages: list[dict], params: GenerationParams = GREEDY):
    """Run one generation to the end; returns it (text, token_ids, stats)."""
    gen = e.generate(messages, params)
    for _ in gen:
        pass
    return gen


@pytest.fixture(scope="module")
def reference(cache_dir):
    """builtin:tiny as transformers runs it (the engine's decoder takes its own model's weights over)."""
    from transformers import AutoModelForCausalLM
    from daemon.model.builtin import builtin_dir
    return AutoModelForCausalLM.from_pretrained(builtin_dir("builtin:tiny", cache_dir), dtype=torch.float32).eval()


def full_logits(model, ids: list[int]) -> torch.Tensor:
    """Next-token logits of a full prefill through the transformers model itself."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def chat(e: Engine, store: MemoryStore, turns: int) -> list:
    """A session of `turns` turns through the store's policy; returns each turn's (prompt ids, gen,
    messages its commit trimmed)."""
    sid = store.create(None, system=SYSTEM).id
    out = []
    for i in range(turns):
        with store.turn(sid, None, f"Question {i}: where does the river go?") as t:
            gen = reply(e, t.prompt)
            result = t.commit(gen.text)
        out.append((e.encode(t.prompt), gen, result.truncated))
    return out


@pytest.mark.parametrize("kernel", [None, "plain"], ids=["default", "plain"])
def test_fast_decoder_matches_transformers(make_engine, reference, kernel):
    e = make_engine(kv_cache_bytes=0)
    if kernel is not None:
        e.decoder = FastDecoder(copy.deepcopy(reference), kernel=kernel)
    assert isinstance(e.decoder, FastDecoder)
    expected = {"native": "native", "onednn": "packed", "plain": "plain"}[e.decoder.kernel]
    assert e.decoder.mode == expected and (kernel is None or e.decoder.kernel == kernel)
    if e.decoder.mode != "plain":  # the float copies were freed; oneDNN's packed lm_head cannot serve the
        # embedding rows, so they stay there; the compiled kernels' lm_head copy serves them itself
        assert not e.model.model.layers[0].mlp.down_proj.weight.numel()
        assert bool(e.model.lm_head.weight.numel()) == (e.decoder.mode == "packed")
    ids = e.encode([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello, how are you?"}])
    state = e.decoder.new_state()
    with torch.inference_mode():
        e.decoder.forward(ids[:7], state)  # a first chunk, a second one after it, then token by token
        e.decoder.forward(ids[7:15], state)
        for token in ids[15:]:
            logits = e.decoder.forward([token], state)
    assert state.ids == ids
    torch.testing.assert_close(logits, full_logits(reference, ids), atol=1e-4, rtol=1e-4)


def test_reuse_matches_full_prefill_across_a_trim(make_engine, reference):
    policy = HistoryPolicy(max_turns=3, max_tokens=0, ttl_s=0, max_sessions=0, trim_to=0.5)
    reuse = make_engine()
    fresh = make_engine(kv_cache_bytes=0)
    with_kv = chat(reuse, MemoryStore(policy, reuse.count_tokens), 7)
    without = chat(fresh, MemoryStore(policy, fresh.count_tokens), 7)
    for (ids, gen, _), (ids0, gen0, _) in zip(with_kv, without):
        assert ids == ids0 and gen.token_ids == gen0.token_ids and gen.text == gen0.text
        assert gen0.stats.cached_tokens == 0
    assert sum(trimmed > 0 for _, _, trimmed in with_kv) >= 2  # 7 turns of at most 3: two trims
    extended = 0
    for (previous, _, _), (ids, gen, _) in zip(with_kv, with_kv[1:]):
        if ids[:len(previous)] == previous:
            extended += 1
            assert gen.stats.cached_tokens >= len(previous)  # the whole earlier prompt was reused
        else:
            assert gen.stats.cached_tokens < len(previous)  # after a trim: the system part at most
    assert extended >= 3 and reuse.kv_pool.hits >= extended
    # next-token logits over a reused prefix equal those of a full prefill
    nxt = with_kv[-1][0] + with_kv[-1][1].token_ids[:-1]
    state, cached, _ = reuse.kv_pool.take(nxt)
    assert state is not None and cached == len(nxt) - 1
    with torch.inference_mode():
        state.crop(cached)
        logits = reuse.decoder.forward(nxt[cached:], state)
    torch.testing.assert_close(logits, full_logits(reference, nxt), atol=1e-4, rtol=1e-4)


def test_dropped_cache_falls_back_to_full_prefill(make_engine):
    e = make_engine()
    first = [{"role": "user", "content": "Tell me about the sea."}]
    one = reply(e, first)
    second = first + [{"role": "assistant", "content": one.text}, {"role": "user", "content": "More!"}]
    hit = reply(e, second)
    assert hit.stats.cached_tokens > 0 and e.kv_pool.bytes_held > 0
    assert e.release_caches() > 0 and e.kv_pool.bytes_held == 0 and len(e.kv_pool) == 0
    miss = reply(e, second)
    assert miss.stats.cached_tokens == 0 and miss.token_ids == hit.token_ids


def test_budget_is_never_exceeded(make_engine):
    rec = KVRecorder()
    block = KVState(2, 2, 16, torch.float32)
    block.reserve(1)
    budget = 2 * block.nbytes() + 1  # two caches of one block each
    e = make_engine(listener=rec, kv_cache_bytes=budget)
    for i in range(6):
        reply(e, [{"role": "user", "content": f"Conversation {i} begins here."}])
        assert 0 < e.kv_pool.bytes_held <= budget and len(e.kv_pool) <= 2
    assert all(r["bytes_held"] <= budget for r in rec.reports)
    assert sum(r.get("dropped", {}).get("lru", 0) for r in rec.reports) == 4
    assert [r["hit"] for r in rec.reports if "hit" in r] == [False] * 6
    tiny = make_engine(kv_cache_bytes=block.nbytes() - 1)  # smaller than any cache: nothing is kept
    reply(tiny, [{"role": "user", "content": "hello"}])
    assert tiny.kv_pool.bytes_held == 0 and len(tiny.kv_pool) == 0


def test_partial_match_copies_and_keeps_the_longer_cache(make_engine):
    e = make_engine()
    base = [{"role": "system", "content": SYSTEM}]
    a = reply(e, base + [{"role": "user", "content": "First session asks this."}])
    b = reply(e, base + [{"role": "user", "content": "Second one asks that."}])
    assert 0 < b.stats.cached_tokens < a.stats.prompt_tokens  # the system prompt was shared
    assert len(e.kv_pool) == 2  # the first session's cache is still whole
    follow = base + [{"role": "user", "content": "First session asks this."},
                     {"role": "assistant", "content": a.text}, {"role": "user", "content": "Go on."}]
    assert reply(e, follow).stats.cached_tokens >= a.stats.prompt_tokens


@pytest.mark.parametrize("how", ["cancel", "timeout"])
def test_cancel_and_timeout_keep_only_valid_ids_and_free_everything(make_engine, how):
    e = make_engine(min_new_tokens=20000, max_new_tokens=20000,
                    generation_timeout_s=0.2 if how == "timeout" else 60.0)
    prompt = [{"role": "user", "content": "Tell me a long story."}]
    gen = e.generate(prompt, GenerationParams(max_new_tokens=20000, temperature=0.0))
    it = iter(gen)
    assert next(it)
    if how == "cancel":
        gen.cancel()
    else:
        for _ in it:
            pass
        assert gen.stats.timed_out
    assert e.in_progress() == 0 and len(e.kv_pool) == 1
    (entry,) = e.kv_pool._entries.values()
    ids = e.encode(prompt)
    assert entry.state.ids == ids + gen.token_ids[:len(entry.state.ids) - len(ids)]
    ref = weakref.ref(entry.state)
    del entry
    e.release_caches()
    gc.collect()
    assert ref() is None and e.kv_pool.bytes_held == 0


def test_release_while_generating_is_not_taken_back(make_engine):
    e = make_engine(min_new_tokens=20000, max_new_tokens=20000)
    gen = e.generate([{"role": "user", "content": "hi"}], GenerationParams(max_new_tokens=20000, temperature=0.0))
    it = iter(gen)
    assert next(it)
    e.release_caches()
    gen.cancel()
    assert len(e.kv_pool) == 0 and e.kv_pool.bytes_held == 0


def test_failed_generation_drops_its_cache(make_engine, monkeypatch):
    e = make_engine()
    first = [{"role": "user", "content": "Tell me about the sea."}]
    one = reply(e, first)
    assert len(e.kv_pool) == 1
    real = e.decoder.step
    calls = {"n": 0}

    def flaky(work):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(work)
    monkeypatch.setattr(e.decoder, "step", flaky)
    gen = e.generate(first + [{"role": "assistant", "content": one.text}, {"role": "user", "content": "x"}], GREEDY)
    with pytest.raises(Exception, match="boom"):
        for _ in gen:
            pass
    assert len(e.kv_pool) == 0 and e.kv_pool.bytes_held == 0 and e.in_progress() == 0


def test_memory_pressure_keeps_nothing_idle(cache_dir):
    rec = KVRecorder()
    pressure = {"on": False}
    e = Engine.load(Config(model="builtin:tiny", cache_dir=cache_dir, threads=1, warmup=False,
                           dtype="float32", max_new_tokens=8), listener=rec,
                    memory_pressure=lambda: pressure["on"])
    try:
        reply(e, [{"role": "user", "content": "one"}])
        reply(e, [{"role": "user", "content": "two"}])
        assert len(e.kv_pool) == 2
        pressure["on"] = True
        reply(e, [{"role": "user", "content": "three"}])
        assert len(e.kv_pool) == 0 and e.kv_pool.bytes_held == 0
        assert rec.reports[-1]["dropped"] == {"pressure": 3}
    finally:
        e.close()


def test_hf_decoder_fallback_reuses_too(make_engine, reference):
    e = make_engine()
    fast = reply(e, [{"role": "user", "content": "Tell me about the sea."}])
    e.decoder = HFDecoder(reference)  # what a model outside the Qwen2/Llama family gets
    e.release_caches()
    slow = reply(e, [{"role": "user", "content": "Tell me about the sea."}])
    assert slow.token_ids == fast.token_ids
    more = [{"role": "user", "content": "Tell me about the sea."}, {"role": "assistant", "content": slow.text},
            {"role": "user", "content": "And rivers?"}]
    again = reply(e, more)
    assert again.stats.cached_tokens > 0
    e.release_caches()
    assert reply(e, more).token_ids == again.token_ids


def test_int8_weights_stay_close(make_engine):
    ref = make_engine(kv_cache_bytes=0)
    q = make_engine(kv_cache_bytes=0, quantize="int8")
    assert q.dtype_label == "float32+int8" and getattr(q.model, "edgechat_float_weights_dropped", False)
    ids = ref.encode([{"role": "user", "content": "Tell me about the sea."}])
    with torch.inference_mode():
        a = ref.decoder.forward(ids, ref.decoder.new_state())
        b = q.decoder.forward(ids, q.decoder.new_state())
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
    assert (a - b).abs().max() < 0.1 * a.abs().max()
    assert reply(q, [{"role": "user", "content": "hi"}]).stats.completion_tokens == 12


@pytest.mark.parametrize("checkpoint,flags,expected", [
    ("bfloat16", "avx512_bf16", "bfloat16"), ("float32", "avx512_bf16", "float32"),
    ("float16", "amx_bf16", "float32"), ("bfloat16", "avx2", "float32"), (None, "avx512_bf16", "bfloat16")])
def test_auto_dtype_follows_checkpoint_and_cpu(monkeypatch, checkpoint, flags, expected):
    monkeypatch.setattr(cpu, "cpu_has_bf16", lambda: "bf16" in flags)
    dtype = getattr(torch, checkpoint) if checkpoint else None
    assert engine_mod.resolve_dtype("auto", dtype) == expected
    assert engine_mod.resolve_dtype("bfloat16", dtype) == "bfloat16"


# -- block trimming -----------------------------------------------------------------------------------

@pytest.mark.parametrize("max_turns,max_tokens", [(5, 0), (4, 0), (0, 120), (6, 150)])
def test_block_trimming_bounds_history_and_keeps_prefixes_stable(max_turns, max_tokens):
    policy = HistoryPolicy(max_turns, max_tokens, 0, 0, trim_to=0.5)
    store = MemoryStore(policy, count_words)
    sid = store.create(None, system="be brief").id
    prompts, stable = [], 0
    for i in range(40):
        with store.turn(sid, None, " ".join(["u"] * (3 + i % 5))) as t:
            history = t.prompt[1:-1]
            if max_turns:
                assert len(history) <= 2 * max_turns
            if max_tokens:
                assert t.prompt_tokens <= max_tokens
            if prompts and t.prompt[:len(prompts[-1]) - 1] == prompts[-1][:-1]:
                stable += 1  # this prompt extends the last one: its KV cache is reused whole
            prompts.append(t.prompt)
            snap = t.commit(" ".join(["a"] * (4 + i % 7))).session
        if max_turns:
            assert len(snap.messages) <= 2 * max_turns
        if max_tokens:
            assert snap.tokens <= max_tokens
    exact = MemoryStore(HistoryPolicy(max_turns, max_tokens, 0, 0), count_words)
    sid = exact.create(None, system="be brief").id
    exact_prompts, exact_stable = [], 0
    for i in range(40):
        with exact.turn(sid, None, " ".join(["u"] * (3 + i % 5))) as t:
            if exact_prompts and t.prompt[:len(exact_prompts[-1]) - 1] == exact_prompts[-1][:-1]:
                exact_stable += 1
            exact_prompts.append(t.prompt)
            t.commit(" ".join(["a"] * (4 + i % 7)))
    assert stable >= 0.6 * 39 and stable > 2 * exact_stable


def test_block_trim_keeps_at_least_one_turn():
    policy = HistoryPolicy(1, 0, 0, 0, trim_to=0.5)
    store = MemoryStore(policy, count_words)
    sid = store.create(None).id
    for i in range(4):
        with store.turn(sid, None, f"u{i}") as t:
            snap = t.commit(f"a{i}").session
    assert [m["content"] for m in snap.messages] == ["u3", "a3"]
    with pytest.raises(ValueError):
        HistoryPolicy(1, 0, 0, 0, trim_to=0)


def test_pool_counts_hits_and_misses():
    pool = KVPool(10**9, min_reuse=1)
    a = KVState(1, 1, 2, torch.float32)
    a.reserve(4)
    a.ids = [1, 2, 3, 4]
    pool.put(a, 0)
    state, reused, epoch = pool.take([1, 2, 3, 4, 5, 6])
    assert state is a and reused == 4 and len(pool) == 0  # a whole prefix: taken out
    pool.put(a, epoch)
    state, reused, _ = pool.take([1, 2, 9])
    assert state is not a and reused == 2 and state.ids == [1, 2] and len(pool) == 1  # partial: copied
    state, reused, _ = pool.take([1, 2, 3, 4])
    assert reused == 3 and state.ids == [1, 2, 3]  # the last prompt token always runs
    assert pool.take([7, 8]) == (None, 0, 0)
    assert (pool.hits, pool.misses, pool.reused_tokens) == (3, 1, 9)


def test_metrics_show_the_pool(app_factory):
    app = app_factory(kv_cache_bytes=8 << 20, min_new_tokens=8, max_history_turns=4)
    client = app.test_client()
    sid = client.post("/v1/sessions", json={"system": SYSTEM}).get_json()["id"]
    for i in range(4):
        body = client.post(f"/v1/sessions/{sid}/messages", json={"content": f"turn {i}", "max_tokens": 8})
        assert body.status_code == 200
    text = client.get("/metrics").text
    engine = get_services(app).engine
    assert metric_value(text, "edgechat_kv_cache_hits_total") == engine.kv_pool.hits == 3
    assert metric_value(text, "edgechat_kv_cache_misses_total") == 1
    assert metric_value(text, "edgechat_kv_cache_reused_tokens_total") == engine.kv_pool.reused_tokens > 0
    assert 0 < metric_value(text, "edgechat_kv_cache_bytes") == engine.kv_pool.bytes_held <= 8 << 20
    assert metric_value(text, "edgechat_kv_cache_budget_bytes") == 8 << 20
    assert metric_value(text, "edgechat_kv_cache_dropped_total", reason="lru") == 0


def test_release_file_pages_keeps_values_and_spares_written_pages(tmp_path):
    data = torch.arange(300_000, dtype=torch.float32)
    path = tmp_path / "weights.bin"
    path.write_bytes(data.numpy().tobytes())
    mapped = torch.from_file(str(path), shared=False, size=data.numel(), dtype=torch.float32)
    assert float(mapped.sum()) == float(data.sum())  # pages resident now
    assert release_file_pages(mapped) is True
    assert torch.equal(mapped, data)  # read back from the file, unchanged
    mapped[5] = -1.0  # a private written copy: giving its page back would lose the write
    assert release_file_pages(mapped) is False and mapped[5] == -1.0
    assert release_file_pages(torch.zeros(10)) is False  # anonymous memory: nothing to give back
