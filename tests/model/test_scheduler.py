"""The batch's loop on its own (daemon/model/scheduler.py, sequence.py, admission.py) over a fake decoder and
a fake KV pool: what each step runs, prefill chunks beside decodes, stop conditions, what goes back to
the pool, failures, the waiting line."""
from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from daemon.model.admission import Admission, EngineBusy
from daemon.model.sampling import Sampler, Sampling
from daemon.model.scheduler import PREFILL_CHUNK, Scheduler
from daemon.model.sequence import Sequence
from daemon.model.streaming import Generation, GenerationFailed, GenerationShed

EOS = 9
VOCAB = 10


class State:
    """A stand-in KV state: the ids it holds."""

    def __init__(self, ids=()):
        self.ids = list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def crop(self, tokens: int) -> None:
        del self.ids[tokens:]

    def reserve(self, tokens: int) -> None:
        self.reserved = tokens


class Decoder:
    """Next token = last id + 1 (mod VOCAB), as a one-hot logit row; records every step's work."""

    def __init__(self, fail_on_step: int | None = None, gate: threading.Event | None = None):
        self.steps: list[list[list[int]]] = []
        self.outputs: list[torch.Tensor] = []
        self.fail_on_step = fail_on_step
        self.gate = gate  # when set, each step waits for it (tests that line generations up)
        self.inference = []

    def new_state(self) -> State:
        return State()

    def step(self, work):
        if self.gate is not None:
            self.gate.wait(10)
        self.inference.append(torch.is_inference_mode_enabled())
        self.steps.append([list(ids) for _, ids, _ in work])
        if len(self.steps) == self.fail_on_step:
            raise RuntimeError("boom")
        out = []
        for state, ids, want in work:
            state.ids += ids
            row = torch.zeros(VOCAB)
            row[(state.ids[-1] + 1) % VOCAB] = 10.0
            self.outputs.append(row.clone())
            out.append(row if want else None)
        return out


class Pool:
    """A stand-in KV pool: hands out one prepared state, keeps what comes back, holds any bytes."""

    def __init__(self, state: State | None = None, reused: int = 0, epoch: int = 7, budget: int = 10**9):
        self.offer = (state, reused, epoch if state is not None else 0)
        self.taken: list[list[int]] = []
        self.put_back: list[tuple[State, int]] = []
        self.budget, self.held = budget, 0

    def take(self, prompt_ids):
        self.taken.append(list(prompt_ids))
        offer, self.offer = self.offer, (None, 0, 0)
        return offer

    def put(self, state, epoch) -> None:
        self.put_back.append((state, epoch))

    def fits(self, nbytes: int) -> bool:
        return self.held + nbytes <= self.budget

    def hold(self, nbytes: int) -> None:
        self.held += nbytes

    def unhold(self, nbytes: int) -> None:
        self.held -= nbytes


class Chars:
    """A tokenizer whose ids are the letters a.. (enough for TextTracker)."""

    @staticmethod
    def decode(ids, **kwargs):
        return "".join(chr(97 + i) for i in ids)


class Batch:
    """A scheduler over the fakes, and the generations submitted to it."""

    def __init__(self, decoder=None, pool=None, *, prefill_chunk=4, max_batch=4, queue_limit=4):
        self.decoder = decoder or Decoder()
        self.pool = pool if pool is not None else Pool()
        self.admission = Admission(max_batch, queue_limit, self.pool)
        self.hygiene_runs = 0
        self.scheduler = Scheduler(self.decoder, self.pool, self.admission, hygiene=self._hygiene,
                                   prefill_chunk=prefill_chunk, log=logging.getLogger("test"))

    def _hygiene(self) -> float:
        self.hygiene_runs += 1
        return 0.5  # what its stats say it took

    def start(self, prompt, *, kv_bytes=0, retain=None, timeout_s=60.0, stop=(), seed=None, **sampling):
        waited = self.admission.enter(kv_bytes, 5)
        gen = Generation(Chars(), list(prompt), tuple(stop), frozenset({EOS}), timeout_s=timeout_s,
                         queue_wait_s=waited, started=time.monotonic())
        s = Sampler(Sampling(**{"max_new": 5, **sampling}), frozenset({EOS}), None, list(prompt), seed=seed)
        self.scheduler.submit(Sequence(gen, s, s.s.max_new, kv_bytes, retain=retain))
        return gen

    def close(self):
        self.scheduler.close()


@pytest.fixture
def batch():
    made = []

    def make(**kw) -> Batch:
        made.append(Batch(**kw))
        return made[-1]
    yield make
    for b in made:
        b.close()


def run(gen) -> list[int]:
    list(gen)
    return gen.token_ids


def test_max_new_tokens_ends_it_without_a_step_past_the_last_token(batch):
    b = batch(prefill_chunk=8)
    assert run(b.start([1, 2], max_new=4)) == [3, 4, 5, 6]
    assert b.decoder.steps == [[[1, 2]], [[3]], [[4]], [[5]]]


def test_eos_ends_it_and_is_the_last_token(batch):
    b = batch()
    gen = b.start([6], max_new=10)
    assert run(gen) == [7, 8, EOS] and gen.stats.finish_reason == "stop"
    assert b.decoder.steps == [[[6]], [[7]], [[8]]]


def test_min_new_tokens_runs_past_eos(batch):
    ids = run(batch().start([6], max_new=10, min_new=5))
    assert ids[:3] == [7, 8, 0] and EOS not in ids[:5] and len(ids) >= 5


def test_a_stop_string_ends_it(batch):
    gen = batch().start([1], max_new=10, stop=("d",))  # ids 2, 3 read "cd"
    assert run(gen) == [2, 3] and gen.text == "c" and gen.stats.finish_reason == "stop"


def test_alone_a_long_prompt_is_prefilled_in_big_chunks(batch):
    b = batch()
    prompt = [i % 5 for i in range(2 * PREFILL_CHUNK + 10)]
    assert len(run(b.start(prompt, max_new=2))) == 2
    assert [len(s[0]) for s in b.decoder.steps] == [PREFILL_CHUNK, PREFILL_CHUNK, 10, 1]
    assert sum((s[0] for s in b.decoder.steps[:3]), []) == prompt


def test_beside_running_decodes_a_prompt_is_prefilled_in_small_chunks(batch):
    steps = threading.Semaphore(0)  # the test lets the decoder take one step at a time

    class Stepped(Decoder):
        def step(self, work):
            steps.acquire(timeout=10)
            return super().step(work)
    b = batch(decoder=Stepped(), prefill_chunk=3)
    first = b.start([1], max_new=8)
    steps.release()
    deadline = time.monotonic() + 5
    while len(b.decoder.steps) < 1 and time.monotonic() < deadline:
        time.sleep(0.002)
    second = b.start([0, 1, 2, 3, 4, 5, 6], max_new=2)
    for _ in range(20):
        steps.release()
    assert run(first) == [2, 3, 4, 5, 6, 7, 8, 9][:len(first.token_ids)] and run(second) == [7, 8]
    # once it joins, `first` decodes one token a step and `second`'s prompt comes 3 ids at a time beside it
    at = next(i for i, step in enumerate(b.decoder.steps) if [0, 1, 2] in step)
    (d,), _ = b.decoder.steps[at]
    assert b.decoder.steps[at:at + 3] == [[[d], [0, 1, 2]], [[d + 1], [3, 4, 5]], [[d + 2], [6]]]


def test_every_running_generation_advances_each_step(batch):
    gate = threading.Event()
    b = batch(decoder=Decoder(gate=gate))
    gens = [b.start([k], max_new=3) for k in (0, 1, 2)]
    gate.set()
    assert [run(g) for g in gens] == [[1, 2, 3], [2, 3, 4], [3, 4, 5]]
    assert max(len(s) for s in b.decoder.steps) == 3  # all three in one step
    assert len(b.decoder.steps) <= 3 + 2  # three tokens each: not three times the steps


def test_a_kept_prefix_is_reused_and_the_state_goes_back_to_the_pool(batch):
    prompt = [1, 2, 3, 4, 5, 6]
    kept = State([1, 2, 3, 4, 9, 9])  # longer than what matches: cropped to the reused ids
    pool = Pool(kept, reused=4, epoch=7)
    b = batch(pool=pool, prefill_chunk=8)
    gen = b.start(prompt, max_new=2)
    ids = run(gen)
    assert pool.taken == [prompt] and b.decoder.steps[0] == [[5, 6]]
    assert gen.stats.cached_tokens == 4 and pool.put_back == [(kept, 7)]
    assert kept.ids == prompt + ids[:-1]  # the last token never ran through the model
    assert kept.reserved == len(prompt) + 2  # the whole turn's room, reserved when it started


def test_cancel_before_the_prefill_runs_nothing_and_keeps_the_cache(batch):
    gate = threading.Event()
    b = batch(decoder=Decoder(gate=gate))
    gen = b.start([1, 2, 3], max_new=5)
    gen._cancel.set()
    gate.set()
    assert run(gen) == [] and gen.stats.finish_reason == "cancelled"
    assert b.decoder.steps == []


def test_a_timeout_mid_prompt_produces_no_token(batch):
    b = batch()
    gen = b.start([1] * (PREFILL_CHUNK + 3), timeout_s=0.0)
    assert run(gen) == [] and gen.stats.timed_out and gen.stats.finish_reason == "length"


def test_a_failed_step_fails_its_generations_and_drops_their_caches(batch):
    pool = Pool()
    b = batch(decoder=Decoder(fail_on_step=2), pool=pool)
    gen = b.start([1, 2], max_new=3)
    with pytest.raises(GenerationFailed, match="boom"):
        run(gen)
    assert gen.stats.finish_reason == "error" and pool.put_back == []
    assert b.admission.counts() == (0, 0)
    after = b.start([1], max_new=2)  # the batch goes on
    assert run(after) == [2, 3]


def test_retain_keeps_the_state_and_the_raw_scores_instead_of_pooling(batch):
    pool, retained = Pool(), []
    b = batch(pool=pool)
    ids = run(b.start([1, 2], retain=retained, max_new=3, min_new=3))
    assert pool.put_back == []
    (kept,) = retained
    assert kept.past_key_values.ids == [1, 2] + ids[:-1]
    assert len(kept.scores) == 3  # one row per produced token, before any processor touched it
    assert all(torch.equal(a, b) for a, b in zip(kept.scores, [o for o in b.decoder.outputs]))


def test_steps_run_without_autograd_and_the_thread_ends_when_idle(batch):
    b = batch()
    run(b.start([1], max_new=2))
    assert b.decoder.inference == [True, True]
    deadline = time.monotonic() + 5
    while b.scheduler.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not b.scheduler.busy


def test_hygiene_waits_for_an_empty_batch(batch):
    gate = threading.Event()
    b = batch(decoder=Decoder(gate=gate))
    short, long = b.start([1], max_new=1), b.start([1], max_new=6)
    gate.set()
    run(short)
    run(long)
    assert short.stats.hygiene_s == 0.0  # the other one still ran when it ended
    assert long.stats.hygiene_s == 0.5 and b.hygiene_runs == 1


def test_seeded_generations_draw_alike_alone_or_batched(batch):
    alone = run(batch().start([1], max_new=5, temperature=1.0, seed=5))
    gate = threading.Event()
    b = batch(decoder=Decoder(gate=gate))
    gens = [b.start([1], max_new=5, temperature=1.0, seed=s) for s in (4, 5, 6)]
    gate.set()
    assert [run(g) for g in gens][1] == alone


def test_shed_cancels_the_newest_and_keeps_the_oldest(batch):
    gate = threading.Event()
    b = batch(decoder=Decoder(gate=gate))
    gens = [b.start([1], max_new=5, min_new=5) for _ in range(3)]
    assert b.scheduler.shed(keep=1) == 2
    gate.set()
    assert len(run(gens[0])) == 5
    for gen in gens[1:]:
        with pytest.raises(GenerationShed):
            run(gen)
        assert gen.stats.finish_reason == "shed"


def test_close_cancels_everything(batch):
    gate = threading.Event()
    b = batch(decoder=Decoder(gate=gate))
    gen = b.start([1], max_new=5)
    closer = threading.Thread(target=b.close)
    closer.start()
    gate.set()
    closer.join(10)
    assert gen.done and gen.stats.finish_reason in ("cancelled", "length", "stop")


# --- the waiting line --------------------------------------------------------------------------------
def test_the_line_admits_up_to_max_batch_then_in_arrival_order():
    a = Admission(2, 3, Pool())
    a.enter(1, 1)
    a.enter(1, 1)
    order = []

    def wait(name):
        a.enter(1, 10)
        order.append(name)
    threads = []
    for name in ("first", "second"):
        threads.append(threading.Thread(target=wait, args=(name,)))
        threads[-1].start()
        deadline = time.monotonic() + 5
        while a.counts()[0] < len(threads) and time.monotonic() < deadline:
            time.sleep(0.005)
    assert a.counts() == (2, 2)
    a.leave(1)
    threads[0].join(5)
    a.leave(1)
    threads[1].join(5)
    assert order == ["first", "second"] and a.counts() == (0, 2)


def test_the_line_refuses_past_queue_limit_and_times_out():
    a = Admission(1, 1, Pool())
    a.enter(0, 1)
    waiter = threading.Thread(target=lambda: pytest.raises(EngineBusy, a.enter, 0, 0.3))
    waiter.start()
    deadline = time.monotonic() + 5
    while a.counts()[0] < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    with pytest.raises(EngineBusy) as busy:
        a.enter(0, 1)
    assert busy.value.reason == "queue_full" and busy.value.retry_after >= 1
    waiter.join(5)
    assert a.counts() == (0, 1)


def test_kv_that_does_not_fit_waits_unless_alone():
    pool = Pool(budget=100)
    a = Admission(4, 4, pool)
    a.enter(500, 1)  # alone: runs though it is over the budget
    assert pool.held == 500
    with pytest.raises(EngineBusy) as busy:
        a.enter(10, 0.05)
    assert busy.value.reason == "queue_timeout"
    a.leave(500)
    a.enter(60, 1)
    a.enter(40, 1)  # 100: fits exactly
    assert a.counts() == (0, 2) and pool.held == 100


def test_close_sends_the_line_away():
    a = Admission(1, 2, Pool())
    a.enter(0, 1)
    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(EngineBusy, a.enter, 0, 10).value.reason))
    t.start()
    deadline = time.monotonic() + 5
    while a.counts()[0] < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    a.close()
    t.join(5)
    assert errors == ["shutting_down"]
    with pytest.raises(EngineBusy):
        a.enter(0, 1)
