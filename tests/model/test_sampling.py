"""Picking tokens on its own (daemon/model/sampling.py): Sampler's processors on hand-made logits, and
each generation's own random stream (the scheduler's loop: test_scheduler.py)."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from daemon.model.sampling import Sampler, Sampling

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


def test_a_seed_gives_a_generation_its_own_stream():
    """Two generations with the same seed draw the same tokens, whatever else draws between them."""
    values = (0.0, 0.1, 0.2, 0.3)
    first = Sampler(Sampling(max_new=100, temperature=1.0), frozenset({EOS}), None, [], seed=11)
    second = Sampler(Sampling(max_new=100, temperature=1.0), frozenset({EOS}), None, [], seed=11)
    other = Sampler(Sampling(max_new=100, temperature=1.0), frozenset({EOS}), None, [], seed=12)
    a, b, c = [], [], []
    for _ in range(50):  # interleaved, as rows of one batch
        a.append(first(logits(*values), 0, None))
        c.append(other(logits(*values), 0, None))
        torch.rand(7)  # the global generator moves too: nothing seeded reads it
        b.append(second(logits(*values), 0, None))
    assert a == b and a != c
