"""The history policy: how a session's history is bounded and trimmed (pure logic, no storage)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

Message = dict  # {"role": "user"|"assistant"|"system", "content": str}
CountTokens = Callable[[Sequence[dict]], int]
Pairs = tuple[tuple[str, str], ...]  # (role, content), oldest first: how records hold messages


@dataclass(frozen=True)
class HistoryPolicy:
    """Bounds on one session's history and on the number of sessions (0 = unbounded)."""

    max_turns: int      # keep at most this many user+assistant turns (2 messages each); 0 = unbounded
    max_tokens: int     # token budget of the prompt (system + history + new user message); 0 = unbounded
    ttl_s: float        # idle seconds before a session expires; 0 = never
    max_sessions: int   # beyond this, evict the LRU idle session of the key holding the most; 0 = unbounded
    trim: bool = True   # False = leak_mode "history": never trim by turns or tokens; limits still reported
    # Block trimming: once over a limit, cut to this share of it at once (0.5: a 5-turn history goes
    # back to 2 turns), so the kept history stays a stable prefix for several turns and KV caches keyed
    # by it survive. 1.0 drops only what must go (every turn once full: a new prefix every turn).
    trim_to: float = 1.0
    # sessions one owner (API key) may hold; at it, the owner's own LRU idle session goes. 0 = max_sessions
    max_sessions_per_key: int = 0

    def __post_init__(self):
        for name in ("max_turns", "max_tokens", "max_sessions", "max_sessions_per_key"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"HistoryPolicy.{name} must be an integer >= 0, got {value!r}")
        if isinstance(self.ttl_s, bool) or not isinstance(self.ttl_s, (int, float)) \
                or not math.isfinite(self.ttl_s) or self.ttl_s < 0:
            raise ValueError(f"HistoryPolicy.ttl_s must be a finite number >= 0, got {self.ttl_s!r}")
        if isinstance(self.trim_to, bool) or not isinstance(self.trim_to, (int, float)) \
                or not 0 < self.trim_to <= 1:
            raise ValueError(f"HistoryPolicy.trim_to must be in (0, 1], got {self.trim_to!r}")

    @property
    def per_key(self) -> int:
        """The per-owner quota when it is tighter than max_sessions, else 0 (max_sessions alone
        bounds an owner, and its evictions count as "lru")."""
        quota = self.max_sessions_per_key
        return quota if quota and (not self.max_sessions or quota < self.max_sessions) else 0

    def expired(self, last_active: float, now: float) -> bool:
        """Whether a session last active at `last_active` has been idle for the TTL at `now`."""
        return self.ttl_s > 0 and now - last_active >= self.ttl_s


def as_messages(system: str | None, pairs: Pairs) -> list[dict]:
    """The chat messages a model sees: the system prompt (when set) followed by `pairs`."""
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": r, "content": c} for r, c in pairs]


def count_prompt(count_tokens: CountTokens, system: str | None, pairs: Pairs) -> int:
    """Tokens of the system prompt plus `pairs`, as the model will see them (0 when both are empty)."""
    messages = as_messages(system, pairs)
    return count_tokens(messages) if messages else 0  # an empty conversation costs nothing; never template it


@dataclass(frozen=True)
class Trimmed:
    """The result of trimming a history: what is kept, its token count, and messages dropped per reason."""

    history: Pairs
    tokens: int       # count_tokens(system + history + tail)
    by_turns: int     # messages dropped to honour max_turns
    by_tokens: int    # messages dropped to honour max_tokens


def trim_history(policy: HistoryPolicy, count_tokens: CountTokens, system: str | None,
                 history: Pairs, tail: Pairs = ()) -> Trimmed:
    """Drop the oldest whole turns of `history` (turns first, then tokens); system and `tail` are kept.

    If even dropping every turn does not fit max_tokens, everything is dropped and the returned tokens
    exceed the limit: the caller decides whether that is an error. With policy.trim_to < 1, a history
    over a limit is cut to that share of it (block trimming; never below one turn or what must go).
    """
    turns = len(history) // 2
    drop = 0
    if policy.trim and policy.max_turns and turns > policy.max_turns:
        drop = turns - min(policy.max_turns, max(1, int(policy.max_turns * policy.trim_to)))
    by_turns = drop

    def cost(k: int) -> int:
        return count_prompt(count_tokens, system, history[2 * k:] + tail)

    tokens = cost(drop)
    limit = policy.max_tokens
    if policy.trim and limit and tokens > limit and drop < turns:
        floor = cost(turns)
        if floor > limit:
            drop, tokens = turns, floor
        else:
            goal = max(floor, int(limit * policy.trim_to))  # block trimming aims below the limit
            # invariant: dropping `lo` turns does not meet the goal, dropping `hi` does (with `tokens`)
            lo, hi, tokens = drop, turns, floor
            while hi - lo > 1:
                mid = (lo + hi) // 2
                mid_tokens = cost(mid)
                if mid_tokens <= goal:
                    hi, tokens = mid, mid_tokens
                else:
                    lo = mid
            drop = hi
    return Trimmed(history[2 * drop:], tokens, 2 * by_turns, 2 * (drop - by_turns))
