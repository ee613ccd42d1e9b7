"""Picking a generation's next token from its logits, as transformers `generate` would.

The logits of the last position only, the processors edgechat uses (repetition, presence and frequency
penalties, logit bias, min_new_tokens, a banned-token mask, a constraint, temperature, top-k, min-p,
top-p) applied in generate's order, each only when asked; each generation draws from its own random
generator (seeded by the request's `seed`), so sequences batched together never share a stream.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens; temperature 0 means greedy. Defaults cost nothing per token."""

    max_new: int
    min_new: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    top_logprobs: int | None = None  # record logprobs (with this many alternatives) when set


MIN_TEMPERATURE = 1e-4
LOGIT_CAP = 1e30  # finite, and still finite divided by MIN_TEMPERATURE in float32


def sampling_for(params: Any, max_new: int, conf: Any, min_new: int) -> Sampling:
    """A request's GenerationParams as Sampling; top_k and repetition_penalty default to the model's
    generation config; greedy requests drop the truncations that cannot change the argmax."""
    # below MIN_TEMPERATURE sampling is greedy in all but name, and logits / 1e-38 overflow to inf
    # (NaN probabilities): take the limit, argmax
    sample = params.temperature >= MIN_TEMPERATURE
    top_k = (conf.top_k or 0) if params.top_k is None else params.top_k
    repetition = params.repetition_penalty or float(getattr(conf, "repetition_penalty", None) or 1.0)
    return Sampling(
        max_new=max_new, min_new=min(min_new, max_new),
        temperature=params.temperature if sample else 0.0, top_p=params.top_p if sample else 1.0,
        top_k=top_k if sample else 0, min_p=params.min_p if sample else 0.0,
        repetition_penalty=repetition, presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty, logit_bias=params.logit_bias,
        top_logprobs=params.top_logprobs)


class Constraint(Protocol):
    """Restricts which tokens may come next (constrained decoding); one per generation."""

    def mask(self, logits: torch.Tensor) -> None:
        """Set -inf, in place, on tokens that certainly cannot come next (a cheap prefilter)."""

    def accepts(self, token_id: int) -> bool:
        """Whether this token may come next."""

    def advance(self, token_id: int) -> None:
        """Take the chosen token."""


class Sampler:
    """Turns float32 logits into the next token id, the way transformers `generate` would.

    Penalties, logit_bias, logprobs and a constraint run only when asked for: the default request
    pays for none of them.
    """

    def __init__(self, sampling: Sampling, eos_ids: frozenset[int], banned: torch.Tensor | None,
                 prompt_ids: Sequence[int], constraint: Constraint | None = None,
                 logprobs: list | None = None, seed: int | None = None,
                 argmax: Callable[[torch.Tensor, torch.Tensor | None], int] | None = None) -> None:
        """seed: this generation's random stream (None: one drawn from torch's global generator); argmax:
        the compiled kernels' masked argmax, for greedy turns that need nothing else (the same token)."""
        self.s = sampling
        self.generator = torch.Generator()
        self.generator.manual_seed(int(torch.randint(0, 2**62, ())) if seed is None else seed)
        self.banned = banned
        self._eos = torch.tensor(sorted(eos_ids), dtype=torch.long)
        self._seen: torch.Tensor | None = None
        self._prompt = prompt_ids
        self._counts: torch.Tensor | None = None
        self._counting = bool(sampling.presence_penalty or sampling.frequency_penalty)
        self._bias = None
        if sampling.logit_bias:
            ids, values = zip(*sampling.logit_bias)
            self._bias = (torch.tensor(ids, dtype=torch.long), torch.tensor(values, dtype=torch.float32))
        self.constraint = constraint
        self.logprobs = logprobs if sampling.top_logprobs is not None else None
        plain = (sampling.temperature <= 0 and constraint is None and self.logprobs is None and self._bias is None
                 and sampling.repetition_penalty == 1.0 and not self._counting)
        self._argmax = argmax if plain else None  # the token is the argmax of what is not banned

    def _penalize(self, logits: torch.Tensor, token: int | None) -> None:
        if self._seen is None:  # first call: ids of the prompt, then each new token
            self._seen = torch.zeros(logits.shape[0], dtype=torch.bool)
            self._seen[torch.tensor(list(self._prompt), dtype=torch.long)] = True
        if token is not None:
            self._seen[token] = True
        picked = logits[self._seen]
        penalty = self.s.repetition_penalty
        # a tiny penalty (the API allows any > 0) would turn a positive logit into inf, and the
        # softmax into NaN: cap what it produces at a finite logit no real model reaches
        logits[self._seen] = torch.where(picked < 0, picked * penalty,
                                         (picked / penalty).clamp(max=LOGIT_CAP))

    def _penalize_counts(self, logits: torch.Tensor, token: int | None) -> None:
        """OpenAI's presence and frequency penalties, over the tokens of this reply."""
        if self._counts is None:
            self._counts = torch.zeros(logits.shape[0], dtype=torch.float32)
        if token is not None:
            self._counts[token] += 1
        logits -= self._counts * self.s.frequency_penalty + (self._counts > 0) * self.s.presence_penalty

    def _process(self, logits: torch.Tensor, produced: int, last: int | None) -> torch.Tensor:
        """Everything before temperature: bias, penalties, eos and banned masks, the constraint."""
        s = self.s
        if self._bias is not None:  # the client's prior first, so penalties act on the biased logits
            ids, values = self._bias
            keep = ids < logits.shape[0]
            logits.index_add_(0, ids[keep], values[keep])
        if s.repetition_penalty != 1.0:
            self._penalize(logits, last)
        if self._counting:
            self._penalize_counts(logits, last)
        if produced < s.min_new:
            logits[self._eos[self._eos < logits.shape[0]]] = float("-inf")
        if self.banned is not None:
            logits.masked_fill_(self.banned[: logits.shape[0]], float("-inf"))
        if self.constraint is not None:
            self.constraint.mask(logits)
        return logits

    def _truncate(self, logits: torch.Tensor) -> torch.Tensor:
        """Temperature, top-k, min-p and top-p, in transformers' order."""
        s = self.s
        logits = logits / s.temperature
        if 0 < s.top_k < logits.shape[0]:
            kth = torch.topk(logits, s.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if s.min_p > 0:
            probs = logits.softmax(-1)
            logits = logits.masked_fill(probs < s.min_p * probs.max(), float("-inf"))
        if s.top_p < 1.0:
            ordered, order = torch.sort(logits)
            drop = ordered.softmax(-1).cumsum(-1) <= 1 - s.top_p
            drop[-1] = False  # always keep the most likely token
            logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        return logits

    def __call__(self, logits: torch.Tensor, produced: int, last: int | None) -> int:
        """Next token, given the tokens produced so far in this turn and the last one (None at first)."""
        if self._argmax is not None:
            if produced < self.s.min_new:
                logits[self._eos[self._eos < logits.shape[0]]] = float("-inf")
            return self._argmax(logits, None if self.banned is None else self.banned[: logits.shape[0]])
        logits = self._process(logits, produced, last)
        if self.constraint is not None:
            token = self._constrained(logits)
        elif self.s.temperature <= 0:
            token = int(torch.argmax(logits))
        else:
            token = int(torch.multinomial(self._truncate(logits).softmax(-1), 1, generator=self.generator))
        if self.logprobs is not None:
            self._record(logits, token)
        return token

    def _constrained(self, logits: torch.Tensor) -> int:
        """Draw as usual, reject what the constraint refuses and draw again among the rest; when the
        truncated distribution has nothing acceptable left, the best acceptable token by logit."""
        check = self.constraint
        if self.s.temperature > 0:
            probs = self._truncate(logits).softmax(-1)
            for _ in range(64):  # rejections are rare once mask() has removed the impossible
                if not probs.sum() > 0:
                    break
                token = int(torch.multinomial(probs, 1, generator=self.generator))
                if check.accepts(token):
                    check.advance(token)
                    return token
                probs[token] = 0.0
        for token in torch.argsort(logits, descending=True).tolist():
            if logits[token] == float("-inf"):
                break
            if check.accepts(token):
                check.advance(token)
                return token
        return int(self._eos[0])  # nothing can continue: end the reply

    def _record(self, logits: torch.Tensor, token: int) -> None:
        logprobs = logits.log_softmax(-1)
        n = self.s.top_logprobs or 0
        top = torch.topk(logprobs, n) if n else None
        alternatives = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        self.logprobs.append((token, float(logprobs[token]), alternatives))
