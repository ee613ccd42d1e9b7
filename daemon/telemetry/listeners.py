"""The listeners' implementation: store, engine, KV pool, watchdog and census events into the metrics.

Each producer defines the Protocol it calls (sessions.base.StoreListener, model.engine.EngineListener,
model.kvpool.KVListener, memory.watchdog.PressureListener, memory.census.CensusListener); Recorder
implements them all, so renaming a method breaks a type check, never silently a metric.
"""
from __future__ import annotations

from .labels import (ADMISSION_WAIT_REASONS, COMPILED_STATES, DECODE_STEPS, EVICT_REASONS, KV_DROP_REASONS,
                     LIVE_OBJECT_TYPES, OUTCOMES, PRESSURE_ACTIONS, REJECT_REASONS, STORE_OPERATIONS, STORE_WRITES,
                     TRUNCATE_REASONS, bounded, turn_index_bucket)
from .metrics import Metrics


class Recorder:
    """Turns events into metric updates; label values are bounded to their sets (labels.py)."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics
        self._model_labels: tuple | None = None

    def on_truncate(self, reason: str, messages: int) -> None:
        """A session's history lost `messages` messages to trimming by turns or tokens."""
        self.m.history_truncations_total.labels(bounded(reason, TRUNCATE_REASONS)).inc(max(messages, 0))

    def on_evict(self, reason: str, sessions: int) -> None:
        """`sessions` sessions left the store (ttl, lru, deleted)."""
        self.m.sessions_evicted_total.labels(bounded(reason, EVICT_REASONS)).inc(max(sessions, 0))

    def on_store_op(self, operation: str, seconds: float) -> None:
        """One session store call took `seconds` (operation in STORE_OPERATIONS)."""
        self.m.session_store_operation_seconds.labels(bounded(operation, STORE_OPERATIONS)).observe(
            max(seconds, 0.0))

    def on_store_error(self, operation: str) -> None:
        """A session store call failed; a failed write also marks the store unwritable."""
        self.m.session_store_errors_total.labels(bounded(operation, STORE_OPERATIONS)).inc()
        if operation in STORE_WRITES:
            self.m.session_store_writable.set(0)

    def set_store_writable(self, writable: bool) -> None:
        """What the housekeeping write probe found."""
        self.m.session_store_writable.set(1 if writable else 0)

    def on_reject(self, reason: str) -> None:
        """A request was refused (reason in REJECT_REASONS): by the API, or by the server reading it."""
        self.m.requests_rejected_total.labels(bounded(reason, REJECT_REASONS)).inc()

    def on_queue(self, waiting: int, running: int) -> None:
        """The model queue changed: requests waiting, generations running."""
        self.m.queue_depth.set(waiting)
        self.m.generations_in_progress.set(running)

    def set_store_stats(self, stats) -> None:
        """Copy store totals (.sessions .messages_total .messages_max .tokens_max) into the gauges."""
        self.m.sessions.set(stats.sessions)
        self.m.history_messages.set(stats.messages_total)
        self.m.history_messages_max.set(stats.messages_max)
        self.m.history_tokens_max.set(stats.tokens_max)
        store_bytes = stats.store_bytes
        if store_bytes is not None:
            self.m.session_store_bytes.set(store_bytes)

    def on_admission_wait(self, reason: str) -> None:
        """A request had to wait to join the batch (reason in ADMISSION_WAIT_REASONS)."""
        self.m.admission_waits_total.labels(bounded(reason, ADMISSION_WAIT_REASONS)).inc()

    def on_batch_step(self, *, rows: int, decode_rows: int, prefill_rows: int, seconds: float) -> None:
        """One batch step ran: its rows, and how many generations decoded in it."""
        self.m.batch_rows.observe(rows)
        if decode_rows:
            self.m.batch_decode_rows.observe(decode_rows)

    def on_kv_cache(self, *, bytes_held: int, hit: bool | None = None, reused_tokens: int = 0,
                    dropped: dict | None = None, running_bytes: int | None = None) -> None:
        """The engine's KV pool changed: idle bytes held, a lookup's outcome, caches dropped by reason, and
        the bytes running generations reserve (when they changed)."""
        self.m.kv_cache_bytes.set(bytes_held)
        if running_bytes is not None:
            self.m.kv_running_bytes.set(running_bytes)
        if hit is not None:
            (self.m.kv_cache_hits_total if hit else self.m.kv_cache_misses_total).inc()
            self.m.kv_cache_reused_tokens_total.inc(max(reused_tokens, 0))
        for reason, count in (dropped or {}).items():
            self.m.kv_cache_dropped_total.labels(bounded(reason, KV_DROP_REASONS)).inc(max(count, 0))

    def on_memory_pressure(self, action: str) -> None:
        """The memory watchdog took `action` (one of PRESSURE_ACTIONS)."""
        self.m.memory_pressure_actions_total.labels(bounded(action, PRESSURE_ACTIONS)).inc()

    def set_memory_pressure_level(self, level: int) -> None:
        """The memory watchdog's state: 0 ok, 1 above the soft limit, 2 above the hard limit."""
        self.m.memory_pressure_level.set(level)

    def set_census(self, counts, tensor_bytes: int) -> None:
        """Export an object census: {type: live objects} over LIVE_OBJECT_TYPES, tensor storage bytes."""
        for name, count in counts.items():
            self.m.live_objects.labels(bounded(name, LIVE_OBJECT_TYPES)).set(count)
        self.m.torch_tensor_bytes.set(tensor_bytes)

    def set_config(self, cfg) -> None:
        """Export configured limits: history turns kept, the KV cache budget and batch size per worker."""
        self.m.history_max_turns.set(cfg.max_history_turns)
        self.m.kv_cache_budget_bytes.set(cfg.kv_cache_bytes)
        self.m.batch_limit.set(cfg.max_batch)

    def set_model_info(self, model: str, dtype: str, leak_mode: str, load_seconds: float,
                       kernel: str = "", step: str = "per-op", compiled: str = "off") -> None:
        """Record what this worker serves, how it decodes (kernel, one-call or per-op step, where its
        compiled kernels came from), and how long loading took."""
        labels = (model, dtype, kernel, bounded(step, DECODE_STEPS), bounded(compiled, COMPILED_STATES), leak_mode)
        if self._model_labels not in (None, labels):
            # multiprocess files cannot forget a series: 0 marks the old one replaced
            self.m.model_info.labels(*self._model_labels).set(0)
        self._model_labels = labels
        self.m.model_info.labels(*labels).set(1)
        self.m.model_load_seconds.set(load_seconds)

    def observe_turn(self, *, turn: int, outcome: str, duration_s: float, ttft_s: float | None,
                     completion_tokens: int, prompt_tokens: int, queue_wait_s: float,
                     history_messages: int | None) -> None:
        """Record one finished turn; history_messages is None for stateless chat completions."""
        self.m.turns_total.labels(bounded(outcome, OUTCOMES)).inc()
        self.m.turn_duration_seconds.labels(turn_index_bucket(turn)).observe(duration_s)
        if ttft_s is not None:
            self.m.time_to_first_token_seconds.observe(ttft_s)
            if completion_tokens > 1:
                per_token = (duration_s - ttft_s) / (completion_tokens - 1)
                self.m.time_per_output_token_seconds.observe(max(per_token, 0.0))
        self.m.prompt_tokens_total.inc(max(prompt_tokens, 0))
        self.m.completion_tokens_total.inc(max(completion_tokens, 0))
        self.m.queue_wait_seconds.observe(max(queue_wait_s, 0.0))
        if history_messages is not None:
            self.m.turn_history_messages.observe(history_messages)
        self.m.turn_prompt_tokens.observe(prompt_tokens)

    # --- sampling ----------------------------------------------------------------------------
