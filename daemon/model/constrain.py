"""Constrained decoding: only tokens whose bytes keep the output a prefix of the grammar's language.

Per step: the bytes that may come next (256 trial steps of the automaton) mask every token that
starts otherwise, in one vectorised pass; the sampler's pick is then checked byte by byte and
redrawn when refused. End-of-text is allowed exactly when the value is complete, and then alone.
"""
from __future__ import annotations

import torch

from . import grammar
from .tokens import TokenTable


class GrammarConstraint:
    """The sampler's Constraint for one generation (see sampling.Constraint)."""

    def __init__(self, table: TokenTable, eos_ids: frozenset[int], state: grammar.State) -> None:
        self._table = table
        self._eos = torch.tensor(sorted(i for i in eos_ids if i < table.rows), dtype=torch.long)
        self._eos_set = eos_ids
        self.state: grammar.State | None = state

    @property
    def complete(self) -> bool:
        """Whether the output so far is one whole value."""
        return self.state is not None and grammar.can_end(self.state)

    def mask(self, logits: torch.Tensor) -> None:
        """-inf on tokens whose first byte cannot come next; only end-of-text once complete."""
        rows = min(logits.shape[0], self._table.rows)
        eos_logits = logits[self._eos].clone()
        if self.state is None or grammar.can_end(self.state):
            logits.fill_(float("-inf"))
            logits[self._eos] = eos_logits
            return
        allowed = [b for b in range(256) if grammar.step(self.state, b) is not None]
        ok = torch.isin(self._table.first[:rows], torch.tensor(allowed, dtype=torch.int16))
        logits[:rows].masked_fill_(~ok, float("-inf"))
        logits[rows:] = float("-inf")
        logits[self._eos] = float("-inf")

    def accepts(self, token_id: int) -> bool:
        """Whether every byte of the token may follow."""
        if token_id in self._eos_set:
            return self.complete
        data = self._table.spelled[token_id] if token_id < self._table.rows else b""
        return bool(data) and grammar.feed(self.state, data) is not None

    def advance(self, token_id: int) -> None:
        """Take the chosen token."""
        if token_id in self._eos_set:
            self.state = None
        else:
            self.state = grammar.feed(self.state, self._table.spelled[token_id])
