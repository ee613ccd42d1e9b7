"""One generation inside the batch: its prompt still to prefill, its KV cache, its sampler, its end.

The scheduler asks each running sequence for its rows of the next step (the last sampled token, or the
next chunk of its prompt) and hands it back the logits; the sequence samples, tells its Generation, and
says when it is done. A sequence's KV cache is reserved whole when it starts (prompt plus the most it may
generate), so its buffers never move and the batch never holds more than was admitted.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from .kvpool import KVPool
from .sampling import Sampler
from .streaming import Generation


@dataclass
class Rows:
    """A sequence's part of one step: ids to run after its cache, and whether the last one's logits are wanted."""

    seq: "Sequence"
    ids: list[int]
    logits: bool


class Sequence:
    """A generation's state between steps; only the scheduler thread touches it."""

    def __init__(self, gen: Generation, sampler: Sampler, max_new: int, kv_bytes: int, *,
                 use_pool: bool = True, retain: list | None = None) -> None:
        """kv_bytes: what admission reserved for its cache; retain: leak mode "tensors" keeps every
        turn's cache and scores here on purpose (never pooled)."""
        self.gen = gen
        self.sampler = sampler
        self.max_new = max_new
        self.kv_bytes = kv_bytes
        self.use_pool = use_pool
        self.retain = retain
        self.scores: list[torch.Tensor] | None = [] if retain is not None else None
        self.state: Any = None
        self.epoch = 0
        self.todo: list[int] = []  # prompt ids not run yet
        self.cached = 0  # prompt ids whose keys/values came from a kept cache
        self.produced = 0
        self.last: int | None = None  # the last sampled id: the next step's input
        self.ended = False  # nothing more to generate (eos, stop string, length, cancel, timeout)
        self.ran_whole = True  # every id the cache holds really ran (False after a failed step)

    def start(self, decoder: Any, pool: KVPool | None) -> None:
        """Take the longest kept prefix (or a fresh cache) and reserve room for the whole turn."""
        prompt = self.gen.prompt_ids
        state, reused, self.epoch = pool.take(prompt) if pool is not None and self.use_pool else (None, 0, 0)
        self.state = decoder.new_state() if state is None else state
        self.state.crop(reused)
        self.state.reserve(len(prompt) + self.max_new)
        self.cached = reused
        self.todo = list(prompt[reused:])
        self.ended = not prompt  # an empty prompt predicts nothing: no token

    @property
    def prefilling(self) -> bool:
        """Whether prompt ids are still to run."""
        return bool(self.todo)

    def rows(self, budget: int) -> Rows | None:
        """This step's ids: the last sampled token, or up to `budget` prompt ids (None: nothing to run)."""
        if self.ended:
            return None
        if self.todo:
            if budget <= 0:
                return None
            ids = self.todo[:budget]
            return Rows(self, ids, len(ids) == len(self.todo))
        return Rows(self, [self.last], True)

    def advance(self, rows: Rows, logits: torch.Tensor | None) -> None:
        """The step ran `rows`: take them off the prompt, and with logits sample the next id and tell the
        generation (which may end it)."""
        if self.todo:
            del self.todo[:len(rows.ids)]
        if logits is None:
            return
        if self.scores is not None:
            self.scores.append(logits.clone())
        self.last = self.sampler(logits, self.produced, None if self.produced == 0 else self.last)
        self.produced += 1
        stop = self.gen.control(self.last)
        if stop or self.last in self.gen.eos_ids or self.produced >= self.max_new:
            self.ended = True

    def interrupted(self) -> bool:
        """Cancelled, timed out or stopped (asked before every step)."""
        if self.gen.control.interrupted():
            self.ended = True
        return self.ended

    def release(self, pool: KVPool | None) -> None:
        """Give the cache back: kept for reuse (it holds only ids that really ran), kept on purpose in leak
        mode "tensors", or dropped."""
        state, self.state = self.state, None
        if state is None:
            return
        if self.retain is not None:
            self.retain.append(SimpleNamespace(past_key_values=state, scores=tuple(self.scores or ())))
        elif pool is not None and self.use_pool and self.ran_whole:
            pool.put(state, self.epoch)
