"""One generation as its caller sees it: text deltas streamed from the scheduler, stop strings, cancel, timeout."""
from __future__ import annotations

import contextvars
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from .tokens import byte_decoder

_END = object()
_CONTROL = frozenset(chr(c) for c in (*range(32), 127)) - {"\n", "\t"}  # not plain text
THREAD_PREFIX = "edgechat-generate-"  # the scheduler thread's name starts with it


@dataclass(frozen=True)
class GenerationParams:
    """What a caller may choose per request; temperature 0 means greedy.

    top_k and repetition_penalty None: the model's generation config decides. The fields after
    `seed` cost time only when set: they need the full logits processed every step.
    """

    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    top_k: int | None = None  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    top_logprobs: int | None = None  # None: no logprobs; n: the chosen token's and n alternatives
    constraint: Callable[[], Any] | None = None  # makes a fresh Constraint for the generation
    raw_prompt: bool = False  # the prompt is one text, tokenized without the chat template

    def __post_init__(self) -> None:
        """Reject values generate() would choke on, naming the parameter."""
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k!r}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.repetition_penalty is not None and not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")


@dataclass
class GenerationStats:
    """How a generation went; ttft_s and duration_s count from its admission into the batch (queue wait apart)."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (eos or stop string) | "length" (max tokens or timeout) | "cancelled" | "error"
    #                     | "shed" (cancelled by the memory watchdog)
    timed_out: bool
    queue_wait_s: float
    ttft_s: float | None
    duration_s: float
    hygiene_s: float
    cached_tokens: int = 0  # prompt tokens whose KV came from a kept cache (not prefilled again)


class GenerationFailed(RuntimeError):
    """The model failed on this generation's step; its place in the batch has been freed all the same."""


class GenerationShed(RuntimeError):
    """The memory watchdog cancelled this generation to keep the process alive (retry later)."""

    def __init__(self, retry_after: int) -> None:
        super().__init__("generation cancelled: the worker is short of memory")
        self.retry_after = retry_after


def plain_text_mask(tokenizer: Any, vocab_rows: int, eos_ids: frozenset[int]) -> torch.Tensor:
    """Ban rows the tokenizer lacks, special tokens but eos, partial UTF-8 and control characters."""
    banned = torch.ones(vocab_rows, dtype=torch.bool)
    decoder = byte_decoder()
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    for token_id, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), vocab_rows))))):
        if token_id in special or token is None:
            continue
        try:
            text = bytes(decoder[c] for c in token).decode("utf-8")
        except (KeyError, UnicodeDecodeError):  # not a byte-level token, or a partial UTF-8 sequence
            continue
        banned[token_id] = any(c in _CONTROL for c in text)
    for token_id in eos_ids:
        if token_id < vocab_rows:
            banned[token_id] = False
    return banned


class TextTracker:
    """Turns generated ids into text deltas: stop strings cut the text, partial text is held back."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...], emit: Callable[[str], None]) -> None:
        self._tokenizer = tokenizer
        self._stops = tuple(s for s in stop if s)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._emit = emit
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False  # a stop string was found

    def add(self, token_id: int) -> bool:
        """Take one new token; True once a stop string has been found."""
        if not self.stopped:
            self.ids.append(token_id)
            self._advance(final=False)
        return self.stopped

    def finish(self) -> None:
        """Emit whatever was held back (the generation is over)."""
        if not self.stopped:
            self._advance(final=True)

    def _advance(self, final: bool) -> None:
        # Full decode each step: prefix-stable and microseconds for a few hundred ids.
        full = self._tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cut = self._find_stop(full)
        if cut is not None:
            full, final, self.stopped = full[:cut], True, True
        end = len(full)
        if not final:
            end = len(full.rstrip("\ufffd"))  # an incomplete UTF-8 sequence may still complete
            end -= self._partial_stop(full[:end])
        if end > len(self.text):
            delta = full[len(self.text):end]
            self.text += delta
            self._emit(delta)

    def _find_stop(self, full: str) -> int | None:
        start = max(0, len(self.text) - self._longest)
        found = [i for i in (full.find(s, start) for s in self._stops) if i >= 0]
        return max(min(found), len(self.text)) if found else None

    def _partial_stop(self, text: str) -> int:
        """Length of the longest tail of text that could begin a stop string."""
        best = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best


class Control:
    """Told every new token by the scheduler: feeds the text tracker and decides to stop early."""

    def __init__(self, tracker: TextTracker, cancel: threading.Event, deadline: float) -> None:
        self.tracker, self.cancel, self.deadline = tracker, cancel, deadline
        self.first_token_at: float | None = None
        self.reason: str | None = None  # "stop_string" | "cancelled" | "timeout"

    def __call__(self, token_id: int) -> bool:
        """Take one new token; True to stop generating."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if self.tracker.add(token_id) and self.reason is None:
            self.reason = "stop_string"
        return self.interrupted()

    def interrupted(self) -> bool:
        """Whether to stop now (asked before every step): cancelled, timed out or stopped."""
        if self.reason is None:
            if self.cancel.is_set():
                self.reason = "cancelled"
            elif time.monotonic() >= self.deadline:
                self.reason = "timeout"
        return self.reason is not None


class Generation:
    """A generation in the batch: iterate for text deltas; cancel()/close() stop it and free its place.

    The scheduler thread produces (through `control` and `finish`); the caller's thread consumes."""

    def __init__(self, tokenizer: Any, prompt_ids: list[int], stop: tuple[str, ...], eos_ids: frozenset[int], *,
                 timeout_s: float, queue_wait_s: float, started: float, logprobs: list | None = None,
                 on_end: Callable[[], None] | None = None) -> None:
        """started: monotonic time of admission; on_end: run once it has ended and left the batch."""
        self.prompt_ids = prompt_ids
        self.eos_ids = eos_ids
        self.queue_wait_s, self.started = queue_wait_s, started
        self.logprobs = logprobs  # per generated token, (id, logprob, [(id, logprob) of the top alternatives])
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._tracker = TextTracker(tokenizer, stop, self._emit)
        self.control = Control(self._tracker, self._cancel, started + timeout_s)
        self.stats: GenerationStats | None = None
        self._covered = 0  # tokens whose text the consumer has been given
        self._logprobs_taken = 0
        self._ended = False  # the consumer has seen the end; iterating again yields nothing
        self._producer: threading.Thread | None = None  # the scheduler's thread, once it runs this
        self._on_end = on_end
        self.context = contextvars.copy_context()  # the caller's (its request id): the scheduler logs in it

    @property
    def text(self) -> str:
        """The text produced so far (stop strings excluded)."""
        return self._tracker.text

    @property
    def done(self) -> bool:
        """Whether the generation has ended (its stats are set)."""
        return self._done.is_set()

    def _emit(self, delta: str) -> None:
        self._queue.put((delta, len(self._tracker.ids)))

    def take_logprobs(self, *, final: bool = False) -> list[tuple[int, float, list]] | None:
        """Logprob entries of the tokens whose text was handed out since the last call (None when
        not asked for); `final` takes the rest of the reply, without the end-of-text token."""
        entries = self.logprobs
        if entries is None:
            return None
        end = self._covered
        if final:
            ids = self._tracker.ids
            end = len(ids) - (1 if ids and ids[-1] in self.eos_ids else 0)
        out = entries[self._logprobs_taken:end]
        self._logprobs_taken = max(self._logprobs_taken, end)
        return out

    @property
    def token_ids(self) -> list[int]:
        """The ids generated so far (eos included when it ended the reply)."""
        return list(self._tracker.ids)

    def __iter__(self) -> Iterator[str]:
        finished = self._ended
        try:
            while not finished:
                item = self._queue.get()
                if item is _END:
                    finished = self._ended = True
                    return
                if isinstance(item, BaseException):
                    finished = self._ended = True
                    if isinstance(item, GenerationShed):
                        raise item
                    raise GenerationFailed(f"generation failed: {item!r}") from item
                text, self._covered = item
                yield text
        finally:
            if not finished:  # the consumer stopped listening (disconnect): stop generating
                self.close()

    def cancel(self) -> None:
        """Stop decoding within a step; returns once the scheduler has let it go (its KV freed)."""
        self._cancel.set()
        if threading.current_thread() is not self._producer:
            self._done.wait()  # the scheduler sees it before its next step

    def close(self) -> None:
        """Cancel if unfinished; safe to call any number of times."""
        if not self._done.is_set():
            self.cancel()

    # --- the scheduler's side ------------------------------------------------------------------
    def adopt(self) -> None:
        """The calling thread (the scheduler's) produces this generation from now on."""
        self._producer = threading.current_thread()

    def finish(self, *, cached: int, hygiene_s: float, error: BaseException | None = None) -> None:
        """End it: emit held-back text, set the stats, wake the consumer (error: raised to it)."""
        control = self.control
        if error is None:
            self._tracker.finish()
        if isinstance(error, GenerationShed):
            reason = "shed"
        else:
            reason = "error" if error else self._finish_reason()
        self.stats = GenerationStats(
            prompt_tokens=len(self.prompt_ids), completion_tokens=len(self._tracker.ids),
            finish_reason=reason, timed_out=control.reason == "timeout", queue_wait_s=self.queue_wait_s,
            ttft_s=None if control.first_token_at is None else control.first_token_at - self.started,
            duration_s=time.monotonic() - self.started, hygiene_s=hygiene_s, cached_tokens=cached)
        try:
            if self._on_end is not None:
                self._on_end()
        finally:
            self._done.set()
            self._queue.put(error if error is not None else _END)

    def _finish_reason(self) -> str:
        ids = self._tracker.ids
        if self._tracker.stopped or (ids and ids[-1] in self.eos_ids):
            return "stop"
        if self.control.reason == "cancelled" or (not ids and self._cancel.is_set()):
            return "cancelled"
        return "length"
