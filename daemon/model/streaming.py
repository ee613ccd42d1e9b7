"""One generation: the decode loop in a worker thread, streaming text deltas, stop strings, cancel, timeout."""
from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from .tokens import byte_decoder

_END = object()
_CONTROL = frozenset(chr(c) for c in (*range(32), 127)) - {"\n", "\t"}  # not plain text
THREAD_PREFIX = "edgechat-generate-"


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
    """How a generation went; ttft_s and duration_s count from the slot being acquired (queue wait apart)."""

    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (eos or stop string) | "length" (max tokens or timeout) | "cancelled" | "error"
    timed_out: bool
    queue_wait_s: float
    ttft_s: float | None
    duration_s: float
    hygiene_s: float
    cached_tokens: int = 0  # prompt tokens whose KV came from a kept cache (not prefilled again)


class GenerationFailed(RuntimeError):
    """The worker's generate() raised; the slot has been released all the same."""


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


class _Control:
    """Told every new token by the decode loop: feeds the text tracker and decides to stop early."""

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
        """Whether to stop now (also asked between prefill chunks): cancelled, timed out or stopped."""
        if self.reason is None:
            if self.cancel.is_set():
                self.reason = "cancelled"
            elif time.monotonic() >= self.deadline:
                self.reason = "timeout"
        return self.reason is not None


@dataclass
class Plan:
    """Everything one generation needs, prepared by the engine while it holds the slot."""

    tokenizer: Any
    prompt_ids: list[int]
    # decode(on_token, interrupted) -> prompt tokens reused from a kept KV cache; runs the whole loop
    decode: Callable[[Callable[[int], bool], Callable[[], bool]], int]
    stop: tuple[str, ...]
    seed: int | None
    eos_ids: frozenset[int]
    timeout_s: float
    hygiene: Callable[[], float]
    release: Callable[[float], None]  # frees the slot; gets the duration
    queue_wait_s: float
    started: float  # monotonic time the slot was acquired
    # per generated token, (id, logprob, [(id, logprob) of the top alternatives]); None: not asked
    logprobs: list | None = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("edgechat.engine"))


class Generation:
    """A running generation: iterate for text deltas; cancel()/close() stop it and free the model."""

    def __init__(self, plan: Plan) -> None:
        self._plan = plan
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._tracker = TextTracker(plan.tokenizer, plan.stop, self._emit)
        self.stats: GenerationStats | None = None
        self._covered = 0  # tokens whose text the consumer has been given
        self._logprobs_taken = 0
        self._ended = False  # the consumer has seen the end; iterating again yields nothing
        # the caller's context (its request id, for log lines) goes with the work
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._work,),
                                        daemon=True,
                                        name=f"{THREAD_PREFIX}{id(self):x}")

    def start(self) -> None:
        """Start the worker thread (the engine calls this once)."""
        self._thread.start()

    @property
    def text(self) -> str:
        """The text produced so far (stop strings excluded)."""
        return self._tracker.text

    def _emit(self, delta: str) -> None:
        self._queue.put((delta, len(self._tracker.ids)))

    def take_logprobs(self, *, final: bool = False) -> list[tuple[int, float, list]] | None:
        """Logprob entries of the tokens whose text was handed out since the last call (None when
        not asked for); `final` takes the rest of the reply, without the end-of-text token."""
        entries = self._plan.logprobs
        if entries is None:
            return None
        end = self._covered
        if final:
            ids = self._tracker.ids
            end = len(ids) - (1 if ids and ids[-1] in self._plan.eos_ids else 0)
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
                    raise GenerationFailed(f"generation failed: {item!r}") from item
                text, self._covered = item
                yield text
        finally:
            if not finished:  # the consumer stopped listening (disconnect): stop generating
                self.close()

    def cancel(self) -> None:
        """Stop decoding within a token; returns once the worker is gone and the slot is free."""
        self._cancel.set()
        if threading.current_thread() is not self._thread and self._thread.ident is not None:
            self._thread.join()

    def close(self) -> None:
        """Cancel if unfinished; safe to call any number of times."""
        if not self._done.is_set():
            self.cancel()

    def _work(self) -> None:
        plan = self._plan
        control = _Control(self._tracker, self._cancel, plan.started + plan.timeout_s)
        error: BaseException | None = None
        cached = 0
        try:
            if not self._cancel.is_set():
                if plan.seed is not None:
                    torch.manual_seed(plan.seed)
                cached = plan.decode(control, control.interrupted)
            self._tracker.finish()
        except Exception as exc:  # any failure must still free the slot; the caller gets it from __iter__
            plan.log.error("generation failed", exc_info=exc)
            error = exc.with_traceback(None)  # the traceback would pin the KV cache's frames
        finally:
            duration = 0.0
            try:
                hygiene_s = plan.hygiene()
                duration = time.monotonic() - plan.started
                self.stats = GenerationStats(
                    prompt_tokens=len(plan.prompt_ids), completion_tokens=len(self._tracker.ids),
                    finish_reason="error" if error else self._finish_reason(control),
                    timed_out=control.reason == "timeout", queue_wait_s=plan.queue_wait_s,
                    ttft_s=None if control.first_token_at is None else control.first_token_at - plan.started,
                    duration_s=duration, hygiene_s=hygiene_s, cached_tokens=cached)
            finally:  # whatever happened, the next request must get the model
                plan.release(duration)
                self._done.set()
                self._queue.put(error if error else _END)

    def _finish_reason(self, control: _Control) -> str:
        ids = self._tracker.ids
        if self._tracker.stopped or (ids and ids[-1] in self._plan.eos_ids):
            return "stop"
        if control.reason == "cancelled" or (not ids and self._cancel.is_set()):
            return "cancelled"
        return "length"
