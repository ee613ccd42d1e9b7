"""Continuous batching: one thread owns the model and advances every running generation together.

Each step, every decoding sequence contributes its last token and the oldest prefilling ones a bounded
chunk of their prompt (prefill_chunk ids beside running decodes, PREFILL_CHUNK when nothing decodes), all
through one decoder call that reads each weight once. A newcomer starts within a bounded time while the
others keep streaming; a finished or cancelled sequence leaves before the next step and frees its place.
The after-turn hygiene (gc, malloc_trim) runs when the batch is empty, where it costs nobody a token.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable, Protocol

import torch

from .admission import Admission
from .kvpool import KVPool
from .sequence import Rows, Sequence
from .streaming import THREAD_PREFIX, GenerationShed

PREFILL_CHUNK = 512  # prompt ids per step when nothing decodes beside them: bounds a long prompt's activations
HYGIENE_EVERY = 64  # turns after which the hygiene step runs between two steps even if the batch never empties


class BatchListener(Protocol):
    """Observer of the steps (metrics); called from the scheduler thread."""

    def on_batch_step(self, *, rows: int, decode_rows: int, prefill_rows: int, seconds: float) -> None:
        """One step ran: its rows (decode tokens and prompt ids) and how long it took."""


class Scheduler:
    """The batch's thread: submit() admitted sequences, close() to stop; everything else is its own."""

    def __init__(self, decoder: Any, pool: KVPool | None, admission: Admission, *,
                 hygiene: Callable[[], float], prefill_chunk: int, log: logging.Logger,
                 listener: BatchListener | None = None) -> None:
        self.decoder, self.pool, self.admission = decoder, pool, admission
        self.hygiene, self.prefill_chunk, self.log, self.listener = hygiene, prefill_chunk, log, listener
        self._lock = threading.Lock()
        self._incoming: list[Sequence] = []
        self._running: list[Sequence] = []  # in admission order: the oldest prefills first
        self._stop = False
        self._shed = 0  # newest generations the memory watchdog asked to cancel
        self._since_hygiene = 0
        self._thread: threading.Thread | None = None
        # steps that only decoded, by generations in them: [steps, seconds] (n tokens per step: the
        # aggregate decode rate at n concurrent generations is n * steps / seconds)
        self.decode_steps: dict[int, list] = {}

    def submit(self, seq: Sequence) -> None:
        """Add an admitted sequence; it starts at the next step."""
        with self._lock:
            if self._stop:
                raise RuntimeError("engine is closed")
            self._incoming.append(seq)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"{THREAD_PREFIX}scheduler", daemon=True)
                self._thread.start()

    def shed(self, keep: int) -> int:
        """Cancel the newest running generations beyond the `keep` oldest (memory pressure); how many."""
        with self._lock:
            count = max(0, len(self._running) + len(self._incoming) - keep)
            self._shed = max(self._shed, count)
        return count

    def close(self) -> None:
        """Cancel every generation, end the thread and wait for it."""
        with self._lock:
            self._stop = True
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    @property
    def busy(self) -> bool:
        """Whether the thread runs (generations are in the batch or about to join it)."""
        with self._lock:
            return self._thread is not None

    @torch.inference_mode()
    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._incoming and not self._running:  # nothing to do: the thread ends (submit starts
                    self._thread = None                          # another), so an idle worker runs none
                    return
                new, self._incoming = self._incoming, []
                stop, shed, self._shed = self._stop, self._shed, 0
            try:
                self._turn(new, stop, shed)
            except Exception as exc:  # noqa: BLE001 - a bug here must fail the batch, never hang its callers
                self.log.error("batch scheduler failed; ending its generations", exc_info=exc)
                error = exc.with_traceback(None)
                for seq in [*new, *self._running]:
                    if not seq.gen.done:
                        seq.ran_whole = False
                        self._finish(seq, error)

    def _turn(self, new: list[Sequence], stop: bool, shed: int) -> None:
        """Take in new sequences, let go of those that ended, run a step."""
        for seq in new:
            self._start(seq)
        if stop:
            for seq in list(self._running):
                seq.gen.control.cancel.set()
                seq.interrupted()
                self._finish(seq)
            return
        if shed:
            for seq in self._running[len(self._running) - shed:]:
                self._finish(seq, GenerationShed(5))
        for seq in [s for s in self._running if s.interrupted()]:
            self._finish(seq)
        if self._running:
            self._step()

    def _start(self, seq: Sequence) -> None:
        seq.gen.adopt()
        try:
            seq.start(self.decoder, self.pool)
        except Exception as exc:  # noqa: BLE001 - e.g. no memory for its cache: this generation fails alone
            seq.gen.context.run(self.log.error, "generation failed to start", exc_info=exc)
            self._running.append(seq)
            self._finish(seq, exc.with_traceback(None))
            return
        self._running.append(seq)

    def _plan(self) -> list[Rows]:
        decoding = [rows for seq in self._running if not seq.prefilling for rows in [seq.rows(1)] if rows]
        budget = self.prefill_chunk if decoding else PREFILL_CHUNK
        plan = list(decoding)
        for seq in self._running:
            if seq.prefilling and budget > 0:
                rows = seq.rows(budget)
                if rows is not None:
                    plan.append(rows)
                    budget -= len(rows.ids)
        return plan

    def _step(self) -> None:
        plan = self._plan()
        started = time.perf_counter()
        try:
            outputs = self.decoder.step([(r.seq.state, r.ids, r.logits) for r in plan])
        except Exception as exc:  # noqa: BLE001 - the step failed as a whole: so do the generations in it
            self.log.error("batch step failed (%d generations)", len(plan), exc_info=exc)
            error = exc.with_traceback(None)  # the traceback would pin the KV caches' frames
            for rows in plan:
                rows.seq.ran_whole = False
                self._finish(rows.seq, error)
            return
        seconds = time.perf_counter() - started
        decode = sum(1 for r in plan if not r.seq.prefilling)
        total = sum(len(r.ids) for r in plan)
        if decode == total:
            tally = self.decode_steps.setdefault(decode, [0, 0.0])
            tally[0] += 1
            tally[1] += seconds
        if self.listener is not None:
            self.listener.on_batch_step(rows=total, decode_rows=decode, prefill_rows=total - decode,
                                        seconds=seconds)
        for rows, logits in zip(plan, outputs):
            seq = rows.seq
            try:
                seq.advance(rows, logits)
            except Exception as exc:  # noqa: BLE001 - its sampler or constraint failed: it alone ends
                seq.gen.context.run(self.log.error, "generation failed", exc_info=exc)
                self._finish(seq, exc.with_traceback(None))
                continue
            if seq.ended:
                self._finish(seq)

    def _finish(self, seq: Sequence, error: BaseException | None = None) -> None:
        """Take it out of the batch, give its cache and place back, then tell its caller."""
        if seq in self._running:
            self._running.remove(seq)
        seq.ended = True
        # its place first: a waiting generation's cache has the budget before this idle one
        self.admission.leave(seq.kv_bytes, time.monotonic() - seq.gen.started)
        try:
            seq.release(self.pool)
        except Exception as exc:  # noqa: BLE001 - its cache is lost, the batch goes on
            self.log.error("could not give a generation's KV cache back", exc_info=exc)
        self._since_hygiene += 1
        hygiene_s = 0.0
        idle = not self._running and not self._incoming
        if idle or self._since_hygiene >= HYGIENE_EVERY:
            hygiene_s = self.hygiene()
            self._since_hygiene = 0
        seq.gen.finish(cached=seq.cached, hygiene_s=hygiene_s, error=error)
