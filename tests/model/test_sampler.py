"""The Sampler's processors on hand-made logits: each does its arithmetic, and only when asked."""
from __future__ import annotations

import pytest
import torch

from daemon.model.sampling import Sampler, Sampling

EOS = frozenset({9})


def sampler(**kw) -> Sampler:
    return Sampler(Sampling(max_new=10, **kw), EOS, None, prompt_ids=[0], logprobs=[])


def test_presence_and_frequency_penalties_count_the_reply():
    s = sampler(presence_penalty=0.5, frequency_penalty=1.0)
    logits = torch.zeros(10)
    s._process(logits, 0, None)
    assert torch.equal(logits, torch.zeros(10))  # nothing produced yet (the prompt does not count)
    for last in (3, 3, 4):
        logits = torch.zeros(10)
        s._process(logits, 1, last)
    # token 3 twice: 2 * 1.0 + 0.5; token 4 once: 1.0 + 0.5
    assert logits[3].item() == -2.5 and logits[4].item() == -1.5 and logits[5].item() == 0


def test_logit_bias_then_repetition_penalty():
    s = sampler(logit_bias=((2, 4.0), (7, -100.0)), repetition_penalty=2.0)
    logits = torch.zeros(10)
    s._process(logits, 0, None)
    assert logits[2].item() == 4.0 and logits[7].item() == -100.0 and logits[0].item() == 0
    logits = torch.zeros(10)
    s._process(logits, 1, 2)  # token 2 was produced: its biased logit is penalised
    assert logits[2].item() == 2.0


@pytest.mark.parametrize("kw,survivors", [
    ({"top_k": 2}, {8, 7}),
    ({"min_p": 0.5}, {8, 7}),  # p(7)/p(8) = e^-0.5 > 0.5, p(6)/p(8) = e^-3 < 0.5
    ({"top_p": 0.5}, {8}),
])
def test_truncation(kw, survivors):
    logits = torch.tensor([-9.0, -9, -9, -9, -9, -9, 1.0, 3.5, 4.0, -9])
    kept = sampler(temperature=1.0, **kw)._truncate(logits.clone())
    assert {i for i, v in enumerate(kept.tolist()) if v > float("-inf")} == survivors


def test_logprobs_record_the_choice_and_alternatives():
    s = sampler(top_logprobs=2)
    logits = torch.tensor([0.0, 0, 0, 0, 0, 0, 1.0, 3.5, 4.0, 0])
    token = s(logits.clone(), 0, None)
    assert token == 8
    (chosen, lp, alternatives), = s.logprobs
    assert chosen == 8 and lp == pytest.approx(float(logits.log_softmax(-1)[8]))
    assert [a for a, _ in alternatives] == [8, 7]


def test_defaults_record_nothing():
    s = Sampler(Sampling(max_new=10), EOS, None, prompt_ids=[0], logprobs=[])
    assert s.logprobs is None and s._bias is None and not s._counting and s.constraint is None
