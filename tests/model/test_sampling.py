"""The token loop on its own (daemon/model/sampling.py): Sampler's processors on hand-made logits, and
run_turn over a fake decoder and a fake KV pool: prefill chunks, stop conditions, what it counts, what
goes back to the pool."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from daemon.model.sampling import PREFILL_CHUNK, Sampler, Sampling, TurnCounts, run_turn

EOS = 9
VOCAB = 10


def logits(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def sampler(prompt=(), banned=None, eos=frozenset({EOS}), **kw) -> Sampler:
    return Sampler(Sampling(**{"max_new": 100, **kw}), eos, banned, list(prompt))


def picks(make_sampler, values, n: int, seed: int) -> list[int]:
    """n tokens drawn from the same logits, after torch.manual_seed(seed) (as a seeded generation)."""
    torch.manual_seed(seed)
    s = make_sampler()
    return [s(logits(*values), 50, None) for _ in range(n)]


def draws(make_sampler, values, n: int = 4000, seed: int = 0) -> Counter:
    """How often each token is picked in n draws (seeded: the same counts on every run)."""
    return Counter(picks(make_sampler, values, n, seed))


# --- Sampler ---------------------------------------------------------------------------------------
def test_greedy_picks_the_argmax():
    s = sampler()
    assert s(logits(0.1, 3.0, -1.0, 2.9), 0, None) == 1
    assert s(logits(5.0, 3.0, -1.0, 2.9), 1, 0) == 0


def test_min_new_tokens_masks_every_eos_id_until_reached():
    s = sampler(eos=frozenset({2, 3, 1000}), min_new=2)  # an id past the logits' rows is ignored
    row = (0.0, 1.0, 5.0, 4.0, 2.0)
    assert s(logits(*row), 0, None) == 4
    assert s(logits(*row), 1, 4) == 4
    assert s(logits(*row), 2, 4) == 2  # the third token may end the reply


def test_banned_tokens_are_never_picked_and_a_longer_mask_is_cut_to_the_logits():
    banned = torch.zeros(VOCAB + 6, dtype=torch.bool)
    banned[[1, 3]] = True
    assert sampler(banned=banned)(logits(0.0, 9.0, 1.0, 8.0), 0, None) == 2
    counts = draws(lambda: sampler(banned=banned, temperature=5.0), (0.0, 9.0, 1.0, 8.0), n=500)
    assert set(counts) == {0, 2}


def test_repetition_penalty_1_changes_nothing():
    row = logits(3.0, 2.0, -1.0, 1.9)
    assert sampler(prompt=[0], repetition_penalty=1.0)(row, 0, None) == 0
    assert torch.equal(row, logits(3.0, 2.0, -1.0, 1.9))


def test_repetition_penalty_lowers_the_prompt_and_the_produced_tokens():
    # token 0 leads unpenalized; divided by 2 (a positive logit) it falls behind token 1
    s = sampler(prompt=[0], repetition_penalty=2.0)
    first = s(logits(3.0, 2.0, -1.0, 1.9), 0, None)
    assert first == 1
    # token 1 was just produced: it is penalized too (2.0 / 2 < 1.9)
    row = logits(3.0, 2.0, -1.0, 1.9)
    assert s(row, 1, first) == 3
    assert torch.equal(row, logits(1.5, 1.0, -1.0, 1.9))  # processed in place; token 2 was never seen
    row = logits(-0.5, -1.5, -1.0, -3.0)  # a negative logit is multiplied
    sampler(prompt=[2], repetition_penalty=2.0)(row, 0, None)
    assert torch.equal(row, logits(-0.5, -1.5, -2.0, -3.0))


def test_temperature_sampling_follows_the_softmax():
    values = (2.0, 1.0, 0.0)
    for temperature in (1.0, 2.0):
        counts = draws(lambda: sampler(temperature=temperature), values)
        expected = torch.softmax(logits(*values) / temperature, -1).tolist()
        for token, p in enumerate(expected):
            assert counts[token] / 4000 == pytest.approx(p, abs=0.03), (temperature, token)


def test_the_same_seed_draws_the_same_tokens():
    values = (1.0, 1.0, 1.0, 1.0, 1.0)
    runs = [picks(lambda: sampler(temperature=1.0), values, n=50, seed=seed) for seed in (3, 3, 4)]
    assert runs[0] == runs[1] != runs[2]


def test_top_k_keeps_the_k_most_likely():
    counts = draws(lambda: sampler(temperature=1.0, top_k=2), (2.0, 0.0, 1.9, 1.8), n=1000)
    assert set(counts) == {0, 2}
    wide = draws(lambda: sampler(temperature=1.0, top_k=4), (2.0, 0.0, 1.9, 1.8), n=1000)  # k = rows: off
    assert set(wide) == {0, 1, 2, 3}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.6, 0.3, 0.1])
    values = tuple(probs.log().tolist())
    counts = draws(lambda: sampler(temperature=1.0, top_p=0.7), values)
    assert set(counts) == {0, 1}  # 0.6 alone is not 0.7: the 0.3 joins, the 0.1 is cut
    assert counts[0] / 4000 == pytest.approx(0.6 / 0.9, abs=0.03)  # renormalized over what is kept
    only = draws(lambda: sampler(temperature=1.0, top_p=0.5), values, n=500)
    assert set(only) == {0}


# --- run_turn over a fake decoder --------------------------------------------------------------------
class State:
    """A stand-in KV state: the ids it holds."""

    def __init__(self, ids=()):
        self.ids = list(ids)

    def crop(self, tokens: int) -> None:
        del self.ids[tokens:]


class Decoder:
    """Next token = last id + 1 (mod VOCAB), as a one-hot logit row; records every forward call."""

    def __init__(self, fail_on_call: int | None = None):
        self.calls: list[list[int]] = []
        self.outputs: list[torch.Tensor] = []
        self.fail_on_call = fail_on_call

    def new_state(self) -> State:
        return State()

    def forward(self, ids: list[int], state: State) -> torch.Tensor:
        self.calls.append(list(ids))
        if len(self.calls) == self.fail_on_call:
            raise RuntimeError("boom")
        state.ids += ids
        row = torch.zeros(VOCAB)
        row[(state.ids[-1] + 1) % VOCAB] = 10.0
        self.outputs.append(row.clone())
        return row


class Pool:
    """A stand-in KV pool: hands out one prepared state, keeps what comes back."""

    def __init__(self, state: State | None = None, reused: int = 0, epoch: int = 7):
        self.offer = (state, reused, epoch if state is not None else 0)
        self.taken: list[list[int]] = []
        self.put_back: list[tuple[State, int]] = []

    def take(self, prompt_ids):
        self.taken.append(list(prompt_ids))
        return self.offer

    def put(self, state, epoch) -> None:
        self.put_back.append((state, epoch))


def turn(prompt, decoder=None, pool=None, on_token=lambda t: False, interrupted=lambda: False,
         retain=None, **sampling_kw):
    decoder = decoder or Decoder()
    tokens: list[int] = []
    counts = TurnCounts()

    def seen(token: int) -> bool:
        tokens.append(token)
        return on_token(token)
    s = Sampler(Sampling(**{"max_new": 5, **sampling_kw}), frozenset({EOS}), None, prompt)
    run_turn(decoder, pool, list(prompt), s, seen, interrupted, frozenset({EOS}), counts, retain=retain)
    return tokens, counts, decoder


def test_turn_counts_start_at_zero():
    assert (TurnCounts().cached, TurnCounts().prefilled, TurnCounts().produced) == (0, 0, 0)


def test_max_new_tokens_ends_the_turn_without_a_forward_past_the_last_token():
    tokens, counts, decoder = turn([1, 2], max_new=4)
    assert tokens == [3, 4, 5, 6]
    assert (counts.cached, counts.prefilled, counts.produced) == (0, 2, 4)
    assert decoder.calls == [[1, 2], [3], [4], [5]]


def test_eos_ends_the_turn_and_is_the_last_token_reported():
    tokens, counts, decoder = turn([6], max_new=10)
    assert tokens == [7, 8, EOS] and counts.produced == 3
    assert decoder.calls == [[6], [7], [8]]


def test_min_new_tokens_runs_past_eos():
    tokens, counts, _ = turn([6], max_new=10, min_new=5)
    # the decoder's favourite after 8 is EOS: masked, the runner-up (token 0, all zeros: the first) wins
    assert tokens[:3] == [7, 8, 0] and EOS not in tokens[:5] and counts.produced >= 5


def test_on_token_saying_stop_ends_the_turn():
    tokens, counts, decoder = turn([1], max_new=10, on_token=lambda t: t == 3)
    assert tokens == [2, 3] and counts.produced == 2 and len(decoder.calls) == 2


def test_a_long_prompt_is_prefilled_in_chunks():
    prompt = [i % 5 for i in range(2 * PREFILL_CHUNK + 10)]
    tokens, counts, decoder = turn(prompt, max_new=2)
    assert [len(c) for c in decoder.calls] == [PREFILL_CHUNK, PREFILL_CHUNK, 10, 1]
    assert sum(decoder.calls[:3], []) == prompt
    assert counts.prefilled == len(prompt) and counts.produced == 2


def test_interrupted_before_the_prefill_runs_nothing():
    tokens, counts, decoder = turn([1, 2, 3], interrupted=lambda: True)
    assert tokens == [] and decoder.calls == [] and (counts.prefilled, counts.produced) == (0, 0)


def test_interrupted_between_prefill_chunks_produces_no_token():
    asked = []

    def interrupted() -> bool:  # the deadline passes after the first chunk
        asked.append(1)
        return len(asked) > 1
    prompt = [1] * (PREFILL_CHUNK + 3)
    # on_token answers as the engine's does: stop once interrupted
    tokens, counts, decoder = turn(prompt, interrupted=interrupted, on_token=lambda t: interrupted())
    assert counts.prefilled == PREFILL_CHUNK and len(decoder.calls) == 1
    assert tokens == [] and counts.produced == 0


def test_a_kept_prefix_is_reused_and_the_state_goes_back_to_the_pool():
    prompt = [1, 2, 3, 4, 5, 6]
    kept = State([1, 2, 3, 4, 9, 9])  # longer than what matches: cropped to the reused tokens
    pool = Pool(kept, reused=4, epoch=7)
    tokens, counts, decoder = turn(prompt, pool=pool, max_new=2)
    assert pool.taken == [prompt] and decoder.calls[0] == [5, 6]
    assert (counts.cached, counts.prefilled, counts.produced) == (4, 2, 2)
    assert pool.put_back == [(kept, 7)]
    assert kept.ids == prompt + tokens[:-1]  # the last token never ran through the model


def test_a_pool_miss_starts_a_new_state_and_keeps_it():
    pool = Pool()
    tokens, counts, decoder = turn([1, 2], pool=pool, max_new=3)
    assert counts.cached == 0 and counts.prefilled == 2
    ((state, epoch),) = pool.put_back
    assert state.ids == [1, 2, 3, 4] and epoch == 0


def test_a_failed_forward_drops_the_state():
    pool = Pool()
    with pytest.raises(RuntimeError, match="boom"):
        turn([1, 2], decoder=Decoder(fail_on_call=2), pool=pool, max_new=3)
    assert pool.put_back == []


def test_retain_keeps_the_state_and_the_raw_scores_instead_of_pooling():
    pool, retained = Pool(), []
    tokens, counts, decoder = turn([1, 2], pool=pool, retain=retained, max_new=3, min_new=3)
    assert pool.put_back == []
    (kept,) = retained
    assert kept.past_key_values.ids == [1, 2] + tokens[:-1]
    assert len(kept.scores) == 3  # one row per produced token, before any processor touched it
    assert all(torch.equal(a, b) for a, b in zip(kept.scores, decoder.outputs))


def test_the_loop_runs_without_autograd():
    seen = []

    class Watching(Decoder):
        def forward(self, ids, state):
            seen.append(torch.is_inference_mode_enabled())
            return super().forward(ids, state)
    turn([1], decoder=Watching(), max_new=2)
    assert seen == [True, True]
