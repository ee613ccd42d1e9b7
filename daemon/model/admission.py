"""Who joins the batch: at most max_batch generations, each once its KV cache fits the budget; the rest wait
in arrival order (the oldest is always admitted first), at most queue_limit of them, each for at most a
timeout, and get EngineBusy (a 503 with Retry-After at the API) past that."""
from __future__ import annotations

import math
import threading
import time
from collections import deque
from typing import Protocol

from ..telemetry.labels import ADMISSION_WAIT_REASONS
from .kvpool import KVPool

QUEUE_FULL, QUEUE_TIMEOUT, SHUTTING_DOWN = "queue_full", "queue_timeout", "shutting_down"
BATCH_FULL, KV_BUDGET = ADMISSION_WAIT_REASONS  # why an arrival had to wait


class EngineBusy(RuntimeError):
    """No place for this request: reason "queue_full", "queue_timeout" or "shutting_down"; retry later."""

    def __init__(self, reason: str, retry_after: int) -> None:
        super().__init__(f"model busy ({reason}); retry after {retry_after} s")
        self.reason = reason
        self.retry_after = retry_after


class AdmissionListener(Protocol):
    """Observer of the line (metrics); called under the admission lock: quick."""

    def on_queue(self, waiting: int, running: int) -> None:
        """Requests now waiting to join the batch, and generations running in it."""

    def on_admission_wait(self, reason: str) -> None:
        """An arrival had to wait: the batch was full ("batch_full") or its KV did not fit ("kv_budget")."""


class _Ticket:
    __slots__ = ("nbytes", "event", "admitted")

    def __init__(self, nbytes: int) -> None:
        self.nbytes, self.event, self.admitted = nbytes, threading.Event(), False


class Admission:
    """The waiting line in front of the batch. KV bytes are held in the pool (one budget for running and
    kept caches) from admission until leave(); a generation alone always runs, whatever its size."""

    def __init__(self, max_batch: int, queue_limit: int, pool: KVPool,
                 listener: AdmissionListener | None = None) -> None:
        self.max_batch, self.queue_limit = max_batch, queue_limit
        self._pool = pool
        self._listener = listener
        self._lock = threading.Lock()
        self._waiting: deque[_Ticket] = deque()
        self._running = 0
        self._closed = False
        self._mean_s = 0.0  # moving average of generation durations, for Retry-After

    def counts(self) -> tuple[int, int]:
        """(waiting, running)."""
        with self._lock:
            return len(self._waiting), self._running

    def _changed(self) -> None:
        if self._listener is not None:
            self._listener.on_queue(len(self._waiting), self._running)

    def _retry_after(self, timeout: float) -> int:
        # each place in the batch frees about every mean duration; those ahead of us need theirs first
        ahead = (len(self._waiting) + 1) / max(1, self.max_batch)
        guess = self._mean_s * ahead if self._mean_s else timeout
        return max(1, math.ceil(min(guess, timeout)))

    def _fits(self, nbytes: int) -> str | None:
        """None when a generation needing nbytes of KV may run now, else why not."""
        if self._running == 0:
            return None
        if self._running >= self.max_batch:
            return BATCH_FULL
        return None if self._pool.fits(nbytes) else KV_BUDGET

    def _admit(self, ticket: _Ticket) -> None:
        self._running += 1
        self._pool.hold(ticket.nbytes)
        ticket.admitted = True
        ticket.event.set()

    def enter(self, nbytes: int, timeout: float) -> float:
        """Join the batch, waiting in line if it is full or the KV does not fit; the seconds waited, or
        EngineBusy."""
        started = time.monotonic()
        ticket = _Ticket(nbytes)
        with self._lock:
            if self._closed:
                raise EngineBusy(SHUTTING_DOWN, 1)
            why = None if self._waiting else self._fits(nbytes)
            if not self._waiting and why is None:
                self._admit(ticket)
                self._changed()
                return 0.0
            if len(self._waiting) >= self.queue_limit:
                raise EngineBusy(QUEUE_FULL, self._retry_after(timeout))
            if self._listener is not None:  # behind others: it waits for what the head of the line waits for
                head = self._waiting[0].nbytes if self._waiting else nbytes
                self._listener.on_admission_wait(self._fits(head) or BATCH_FULL)
            self._waiting.append(ticket)
            self._changed()
        ticket.event.wait(timeout)
        with self._lock:
            if ticket.admitted:
                return time.monotonic() - started
            if ticket in self._waiting:
                self._waiting.remove(ticket)
            self._changed()
            self._admit_waiting()  # the line moved: one behind us may fit now
            if self._closed:
                raise EngineBusy(SHUTTING_DOWN, 1)
            raise EngineBusy(QUEUE_TIMEOUT, self._retry_after(timeout))

    def leave(self, nbytes: int, duration: float = 0.0) -> None:
        """A generation left the batch: free its place and KV, and admit from the head of the line."""
        with self._lock:
            if duration:
                self._mean_s = duration if not self._mean_s else 0.8 * self._mean_s + 0.2 * duration
            self._running -= 1
            self._pool.unhold(nbytes)
            self._admit_waiting()
            self._changed()

    def _admit_waiting(self) -> None:
        while self._waiting and not self._closed and self._fits(self._waiting[0].nbytes) is None:
            self._admit(self._waiting.popleft())

    def close(self) -> None:
        """Refuse new arrivals and send everyone waiting away (EngineBusy shutting_down)."""
        with self._lock:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
            for ticket in waiting:
                ticket.event.set()
            self._changed()
