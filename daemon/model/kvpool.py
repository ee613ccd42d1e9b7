"""KV caches under one byte budget: those of running generations (held from admission) and idle ones kept
between turns in an LRU pool keyed by the token ids each covers; idle ones make room for running ones.

The engine knows nothing of sessions: a turn's prompt ids are matched against every kept cache and the
longest common prefix is reused, so a prompt that re-renders the same history (a session's next turn,
an OpenAI client resending its conversation) prefills only its new tokens. Validity is by ids, never
assumed: a cache is reused only up to the first id where it differs from the new prompt.
"""
from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from typing import Callable, Protocol, Sequence

import torch

from ..telemetry.labels import KV_DROP_REASONS

LRU, OVERSIZE, RELEASED, PRESSURE = KV_DROP_REASONS  # why a cache was dropped (the metric's label)

BLOCK = 256  # cache buffers grow in steps of this many tokens (one copy per step, not per token)
# A shorter common prefix is a chat-template header, not a conversation: not worth a copy, and a miss.
MIN_REUSE = 16


class KVListener(Protocol):
    """Observer of the pool (metrics); called outside the pool's lock."""

    def on_kv_cache(self, *, bytes_held: int, hit: bool | None = None, reused_tokens: int = 0,
                    dropped: dict[str, int] | None = None, running_bytes: int | None = None) -> None:
        """Idle bytes now held; a lookup's outcome (hit None: no lookup); caches dropped by reason; the
        bytes running generations reserve (None: unchanged)."""


class KVState:
    """The keys and values of one token sequence: per layer [1, kv_heads, capacity, head_dim] buffers."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self.shape = (layers, kv_heads, head_dim)
        self.dtype = dtype
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.ids: list[int] = []  # the ids whose keys/values are stored, in order
        self._ptrs: tuple | None = None  # the buffers' addresses for the compiled step, while they stay put

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def capacity(self) -> int:
        """Tokens the buffers hold without growing."""
        return self.k[0].shape[2] if self.k else 0

    def nbytes(self) -> int:
        """Bytes the buffers occupy (capacity, not length: what the process really holds)."""
        return sum(t.untyped_storage().nbytes() for t in (*self.k, *self.v))

    def reserve(self, tokens: int) -> None:
        """Make room for `tokens` tokens, growing every buffer to a multiple of BLOCK."""
        if tokens <= self.capacity:
            return
        cap = -(-tokens // BLOCK) * BLOCK
        self._ptrs = None
        layers, heads, dim = self.shape
        n = len(self.ids)
        for buffers in (self.k, self.v):
            for i in range(layers):
                new = torch.empty((1, heads, cap, dim), dtype=self.dtype)
                if i < len(buffers):
                    new[:, :, :n] = buffers[i][:, :, :n]
                    buffers[i] = new
                else:
                    buffers.append(new)

    def pointers(self) -> tuple[ctypes.Array, ctypes.Array]:
        """Each layer's key and value buffer address (c_void_p arrays), made again only when they move."""
        if self._ptrs is None:
            self._ptrs = tuple((ctypes.c_void_p * len(b))(*(t.data_ptr() for t in b)) for b in (self.k, self.v))
        return self._ptrs

    def crop(self, tokens: int) -> None:
        """Forget everything after the first `tokens` tokens (the buffers keep their capacity)."""
        del self.ids[tokens:]

    def shrink(self) -> None:
        """Give back unused capacity beyond the next BLOCK boundary (before the state is kept idle)."""
        cap = -(-max(len(self.ids), 1) // BLOCK) * BLOCK
        if cap < self.capacity:
            self._ptrs = None
            n = len(self.ids)
            for buffers in (self.k, self.v):
                for i, buf in enumerate(buffers):
                    new = torch.empty((1, buf.shape[1], cap, buf.shape[3]), dtype=self.dtype)
                    new[:, :, :n] = buf[:, :, :n]
                    buffers[i] = new

    def prefix_copy(self, tokens: int) -> "KVState":
        """A new state holding a copy of the first `tokens` tokens (the original stays untouched)."""
        out = KVState(*self.shape, self.dtype)
        out.reserve(tokens)
        for src, dst in ((self.k, out.k), (self.v, out.v)):
            for s, d in zip(src, dst):
                d[:, :, :tokens] = s[:, :, :tokens]
        out.ids = self.ids[:tokens]
        return out


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """Length of the longest common prefix of two 1-D id tensors."""
    n = min(a.shape[0], b.shape[0])
    differ = torch.nonzero(a[:n] != b[:n])
    return int(differ[0, 0]) if differ.numel() else n


class _Entry:
    __slots__ = ("state", "ids", "nbytes")

    def __init__(self, state: KVState) -> None:
        self.state = state
        self.ids = torch.tensor(state.ids, dtype=torch.int32)
        self.nbytes = state.nbytes()


class KVPool:
    """The KV budget's owner. Running generations hold bytes (hold/unhold, decided at admission); idle caches,
    least recently used first, fill what is left of `budget_bytes` and are dropped to make room (0 = none
    kept, and no generation joins another).

    take() hands a cache out (exclusively, for one generation); put() takes it back once the turn is
    over. release() drops everything, also a cache that is out: it will not be taken back.
    """

    def __init__(self, budget_bytes: int, listener: KVListener | None = None,
                 pressure: Callable[[], bool] | None = None, min_reuse: int = MIN_REUSE) -> None:
        self.budget_bytes = budget_bytes
        self.min_reuse = min_reuse
        self._listener = listener
        self._pressure = pressure  # True when the process should hold no idle caches at all
        self._lock = threading.Lock()
        self._entries: OrderedDict[int, _Entry] = OrderedDict()  # id(state) -> entry, LRU first
        self._bytes = 0
        self._held = 0  # bytes reserved by running generations
        self._epoch = 0  # bumped by release(); a cache taken before it is not taken back
        self.hits = self.misses = self.reused_tokens = 0

    @property
    def enabled(self) -> bool:
        """Whether caches are kept between turns at all."""
        return self.budget_bytes > 0

    @property
    def bytes_held(self) -> int:
        """Bytes of the idle caches now kept."""
        return self._bytes

    @property
    def held_bytes(self) -> int:
        """Bytes reserved by running generations."""
        return self._held

    def __len__(self) -> int:
        return len(self._entries)

    def fits(self, nbytes: int) -> bool:
        """Whether a generation needing nbytes fits beside the running ones (idle caches always make room)."""
        return self._held + nbytes <= self.budget_bytes

    def hold(self, nbytes: int) -> None:
        """A generation joins: reserve its bytes, dropping idle caches (LRU) until everything fits."""
        with self._lock:
            self._held += nbytes
            dropped = self._evict_to(self.budget_bytes - self._held)
            held, running = self._bytes, self._held
        self._notify(bytes_held=held, dropped={LRU: dropped} if dropped else {}, running_bytes=running)

    def unhold(self, nbytes: int) -> None:
        """A generation left: its reservation is free again."""
        with self._lock:
            self._held = max(0, self._held - nbytes)
            held, running = self._bytes, self._held
        self._notify(bytes_held=held, running_bytes=running)

    def _evict_to(self, room: int) -> int:
        """Drop least recently used idle caches until they take at most `room` bytes; how many went."""
        count = 0
        while self._entries and self._bytes > max(room, 0):
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes
            count += 1
        return count

    def take(self, prompt_ids: Sequence[int]) -> tuple[KVState | None, int, int]:
        """The kept cache sharing the longest prefix with prompt_ids, how many of its tokens to reuse
        (at most len(prompt_ids) - 1: the last prompt token must run to give the next-token logits),
        and the epoch to hand back to put(). A cache entirely covered by the prompt is taken out of
        the pool; a partial match is copied, so the longer cache stays for whoever continues it."""
        limit = len(prompt_ids) - 1
        with self._lock:
            epoch = self._epoch
            best, best_len = None, 0
            if self._entries and limit > 0:
                query = torch.tensor(prompt_ids, dtype=torch.int32)
                for key, entry in self._entries.items():
                    n = common_prefix(entry.ids, query)
                    if n > best_len:
                        best, best_len = key, n
            reuse = min(best_len, limit)
            state = None
            if best is not None and reuse >= max(self.min_reuse, 1):
                entry = self._entries[best]
                if reuse == len(entry.ids):
                    del self._entries[best]
                    self._bytes -= entry.nbytes
                    state = entry.state
                else:
                    self._entries.move_to_end(best)
                    state = entry.state.prefix_copy(reuse)
                self.hits += 1
                self.reused_tokens += reuse
            else:
                reuse = 0
                self.misses += 1
            held = self._bytes
        self._notify(bytes_held=held, hit=state is not None, reused_tokens=reuse)
        return state, reuse, epoch

    def put(self, state: KVState, epoch: int) -> None:
        """Keep `state` as the most recently used cache, dropping the least recently used ones to
        stay within what the running generations leave of the budget; dropped at once if it alone
        exceeds that, if release() ran since it was taken, or under memory pressure."""
        dropped: dict[str, int] = {}
        if not self.enabled or not len(state):
            return
        entry = None
        if self._pressure is None or not self._pressure():
            state.shrink()
            entry = _Entry(state)
        with self._lock:
            if entry is None:  # memory pressure: keep nothing idle, this cache and every kept one go
                dropped[PRESSURE] = len(self._entries) + 1
                self._entries.clear()
                self._bytes = 0
            elif epoch != self._epoch:
                dropped[RELEASED] = 1
            elif entry.nbytes > self.budget_bytes - self._held:
                dropped[OVERSIZE] = 1
            else:
                evicted = self._evict_to(self.budget_bytes - self._held - entry.nbytes)
                if evicted:
                    dropped[LRU] = evicted
                self._entries[id(state)] = entry
                self._bytes += entry.nbytes
            held = self._bytes
        self._notify(bytes_held=held, dropped=dropped)

    def release(self, reason: str = RELEASED) -> int:
        """Drop every kept cache (and any handed out now); returns the bytes that were held."""
        with self._lock:
            count, freed = len(self._entries), self._bytes
            self._entries.clear()
            self._bytes = 0
            self._epoch += 1
        self._notify(bytes_held=0, dropped={reason: count} if count else {})
        return freed

    def _notify(self, **kwargs) -> None:
        if self._listener is not None:
            self._listener.on_kv_cache(**kwargs)
