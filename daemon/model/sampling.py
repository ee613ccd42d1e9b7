"""One turn's token loop: reuse a kept KV prefix, prefill the rest in chunks, then sample token by token.

Replaces transformers `generate`: the logits of the last position only, the processors edgechat uses
(min_new_tokens, a banned-token mask, repetition penalty, temperature, top-k, top-p) applied in
generate's order, and nothing else per token.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch

from .kvpool import KVPool

PREFILL_CHUNK = 512  # prompt tokens per forward: bounds the activations of a long prompt


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens; temperature 0 means greedy."""

    max_new: int
    min_new: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0


class Sampler:
    """Turns float32 logits into the next token id, the way transformers `generate` would."""

    def __init__(self, sampling: Sampling, eos_ids: frozenset[int], banned: torch.Tensor | None,
                 prompt_ids: Sequence[int]) -> None:
        self.s = sampling
        self.banned = banned
        self._eos = torch.tensor(sorted(eos_ids), dtype=torch.long)
        self._seen: torch.Tensor | None = None
        self._prompt = prompt_ids

    def _penalize(self, logits: torch.Tensor, token: int | None) -> None:
        if self._seen is None:  # first call: ids of the prompt, then each new token
            self._seen = torch.zeros(logits.shape[0], dtype=torch.bool)
            self._seen[torch.tensor(list(self._prompt), dtype=torch.long)] = True
        if token is not None:
            self._seen[token] = True
        picked = logits[self._seen]
        penalty = self.s.repetition_penalty
        logits[self._seen] = torch.where(picked < 0, picked * penalty, picked / penalty)

    def __call__(self, logits: torch.Tensor, produced: int, last: int | None) -> int:
        """Next token, given the tokens produced so far in this turn and the last one (None at first)."""
        s = self.s
        if s.repetition_penalty != 1.0:
            self._penalize(logits, last)
        if produced < s.min_new:
            logits[self._eos[self._eos < logits.shape[0]]] = float("-inf")
        if self.banned is not None:
            logits.masked_fill_(self.banned[: logits.shape[0]], float("-inf"))
        if s.temperature <= 0:
            return int(torch.argmax(logits))
        logits = logits / s.temperature
        if 0 < s.top_k < logits.shape[0]:
            kth = torch.topk(logits, s.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if s.top_p < 1.0:
            ordered, order = torch.sort(logits)
            drop = ordered.softmax(-1).cumsum(-1) <= 1 - s.top_p
            drop[-1] = False  # always keep the most likely token
            logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        return int(torch.multinomial(logits.softmax(-1), 1))


@dataclass
class TurnCounts:
    """What a turn's loop did: prompt tokens reused from a kept cache and run fresh, tokens produced."""

    cached: int = 0
    prefilled: int = 0
    produced: int = 0


@torch.inference_mode()
def run_turn(decoder: Any, pool: KVPool | None, prompt_ids: list[int], sampler: Sampler,
             on_token: Callable[[int], bool], interrupted: Callable[[], bool],
             eos_ids: frozenset[int], counts: TurnCounts, retain: list | None = None) -> None:
    """Generate until on_token(id) says stop, an eos id, max_new tokens, or interrupted() between
    prefill chunks. The cache goes back to the pool afterwards (cancelled and timed-out turns too:
    it holds only ids that really ran); after an exception it is dropped."""
    state, reused, epoch = pool.take(prompt_ids) if pool is not None else (None, 0, 0)
    if state is None:
        state = decoder.new_state()
    state.crop(reused)
    counts.cached = reused
    scores: list[torch.Tensor] | None = [] if retain is not None else None
    finished = False
    try:
        logits = None
        todo = prompt_ids[reused:]
        for start in range(0, len(todo), PREFILL_CHUNK):
            if interrupted():
                logits = None  # a partly prefilled prompt's logits predict nothing: no token
                break
            logits = decoder.forward(todo[start:start + PREFILL_CHUNK], state)
            counts.prefilled += min(PREFILL_CHUNK, len(todo) - start)
        last = None
        while logits is not None and counts.produced < sampler.s.max_new:
            if scores is not None:
                scores.append(logits.clone())
            last = sampler(logits, counts.produced, last)
            counts.produced += 1
            if on_token(last) or last in eos_ids or counts.produced >= sampler.s.max_new:
                break
            logits = decoder.forward([last], state)
        finished = True
    finally:
        if retain is not None:  # leak_mode "tensors": keep it all on purpose, never pool it
            retain.append(SimpleNamespace(past_key_values=state, scores=tuple(scores or ())))
        elif pool is not None and finished:
            pool.put(state, epoch)
        state = logits = None
