"""The app factory: builds this worker's Services (telemetry, memory budget, model, store) and the HTTP API."""
from __future__ import annotations

import functools
import logging
import os
import threading

from flask import Flask

from .config import Config
from .server import logs
from .services import KEY, Services, get_services
from .sessions import StoreFailure

log = logging.getLogger("edgechat")


def create_app(config: Config | None = None) -> Flask:
    """Build a ready-to-serve app; loads the model, so call it in the worker, never the master."""
    cfg = config if config is not None else Config.from_env()
    logs.setup(cfg.log_level, cfg.log_format, cfg.access_log)
    app = Flask("daemon")
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    if cfg.leak_mode != "off":
        log.warning("!!! LEAK MODE %r IS ON: this daemon leaks on purpose (demo/test only) !!!",
                    cfg.leak_mode)

    from prometheus_client import CollectorRegistry

    from .memory.budget import MemoryBudget
    from .telemetry.listeners import Recorder
    from .telemetry.metrics import Metrics
    from .telemetry.multiproc import MULTIPROC_ENV, backed_files
    from .telemetry.sampler import Sampler
    multiprocess = bool(os.environ.get(MULTIPROC_ENV))
    if multiprocess:  # no SIGBUS when the metrics folder fills up
        backed_files()
    # Sessions in SQLite (the default) or Redis are one store that every worker reports whole:
    # summing the workers' reports would count each session once per worker, so the history gauges
    # take the freshest report instead. Only "memory" is per worker (sum them).
    # Single process: a fresh registry per app, so several apps (tests) never collide.
    metrics = Metrics(None if multiprocess else CollectorRegistry(), multiprocess=multiprocess,
                      store_shared=cfg.session_store != "memory")
    recorder = Recorder(metrics)
    recorder.set_config(cfg)
    budget = MemoryBudget.from_config(cfg, siblings=multiprocess)
    sampler = Sampler(metrics, budget.read)
    if cfg.tracemalloc:
        sampler.trace(cfg.tracemalloc_frames)
    sampler.refresh()
    sampler.start(cfg.metrics_refresh_s)
    try:
        services = _load(cfg, metrics, recorder, sampler, budget)
    except BaseException:
        sampler.close()
        metrics.close()
        raise
    app.extensions[KEY] = services
    _init_concerns(app, services)
    return app


def _load(cfg: Config, metrics, recorder, sampler, budget) -> Services:
    """Load the model, open the session store, set up diagnostics: the worker's Services."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # a tqdm bar per load is noise in a daemon's log
    hf_logging.disable_default_handler()  # transformers' lines go through edgechat's handler
    hf_logging.enable_propagation()

    from .api.limits import TenantLimits
    from .api.stats import RecentTurns
    from .memory.tracing import Diagnostics
    from .model.engine import Engine
    # after each turn, above the soft memory limit, the engine keeps no KV cache idle
    engine = Engine.load(cfg, listener=recorder, memory_pressure=budget.above_soft)
    recorder.set_model_info(engine.model_id, engine.dtype_label, cfg.leak_mode, engine.load_seconds,
                            engine.kernel, engine.decode_path.get("step", "per-op"), engine.decode_path["compiled"])
    try:
        # counts stop early once past the context: a huge message is refused without tokenizing it all
        count = functools.partial(engine.count_tokens, limit=engine.context_length)
        store = open_store(cfg, count, engine.context_length, recorder)
    except BaseException:
        engine.close()
        raise
    recorder.set_store_stats(store.stats())
    return Services(config=cfg, metrics=metrics, recorder=recorder, sampler=sampler, budget=budget,
                    engine=engine, store=store, recent_turns=RecentTurns.for_config(cfg),
                    diagnostics=Diagnostics.for_config(cfg, recorder, metrics.multiprocess_dir),
                    limits=TenantLimits(cfg.turns_in_flight_per_key(),
                                        cfg.max_requests_per_minute_per_key))


def _init_concerns(app: Flask, services: Services) -> None:
    """Start the background threads and register every blueprint, each concern by its init_app."""
    from .api import (admin, completions, cors, errors, exposition, health, legacy, openapi,
                      sessions, stats, tokenize, ui)
    from .memory import tracing, watchdog
    from .server import worker
    cfg = services.config
    errors.init_app(app)
    cors.init_app(app, cfg.cors_origins)
    worker.set_listener(_ServerEvents(services))  # the server's refusals, its large requests
    exposition.init_app(app, cfg, services.metrics, services.sampler)
    tracing.start(services.diagnostics, services.metrics.track_tracemalloc, cfg.metrics_refresh_s,
                  services.stop)
    services.watchdog = watchdog.start(cfg, services.budget, engine=services.engine,
                                       store=services.store, metrics=services.recorder,
                                       stop=services.stop)
    _start_housekeeping(services)
    for bp in (health.bp, completions.bp, legacy.bp, tokenize.bp, sessions.bp, stats.bp, ui.bp,
               openapi.bp):
        app.register_blueprint(bp)
    if cfg.admin_key:  # without a key the /debug/memory endpoints do not exist at all
        app.register_blueprint(admin.bp)


class _ServerEvents:
    """The gunicorn worker's listener (server.worker.ServerListener): metrics, memory hygiene."""

    def __init__(self, services: Services) -> None:
        self._services = services

    def on_reject(self, reason: str) -> None:
        self._services.recorder.on_reject(reason)

    def after_large_request(self) -> None:
        self._services.engine.give_back_memory()


def history_token_budget(cfg: Config, context_length: int) -> int:
    """The prompt budget: configured, or the model context minus room for the reply."""
    budget = cfg.max_history_tokens or context_length - cfg.max_new_tokens
    if budget <= 0 or budget + cfg.max_new_tokens > context_length:
        raise ValueError(f"max_history_tokens ({budget}) + max_new_tokens ({cfg.max_new_tokens}) "
                         f"must fit the model context ({context_length})")
    return budget


def open_store(cfg: Config, count_tokens, context_length: int, listener):
    """The session store under the configured history policy."""
    from .sessions import HistoryPolicy, make_store
    policy = HistoryPolicy(max_turns=cfg.max_history_turns,
                           max_tokens=history_token_budget(cfg, context_length),
                           ttl_s=cfg.session_ttl_s, max_sessions=cfg.max_sessions,
                           max_sessions_per_key=cfg.max_sessions_per_key,
                           trim=cfg.leak_mode != "history",
                           # with KV reuse, trim in blocks so most turns keep their cached prefix
                           trim_to=cfg.history_trim_to if cfg.kv_cache_bytes else 1.0)
    # a turn holds its session from before the queue wait until its commit, so a shared store's
    # lease must outlast both (+30 s for a slow client draining the stream); it is also the longest
    # a crashed worker can keep a session locked (SQLite frees a dead local pid's lease at once)
    lease_s = cfg.queue_timeout_s + cfg.generation_timeout_s + 30.0
    return make_store(policy, count_tokens, url=cfg.session_store_url(), listener=listener,
                      lease_s=lease_s)


def shutdown_app(app: Flask) -> None:
    """Stop background threads and release the model, store and metrics (tests, worker exit)."""
    get_services(app).close()


def _start_housekeeping(services: Services) -> None:
    """Expire idle sessions and refresh the history gauges even when no request comes."""
    store, recorder, stop = services.store, services.recorder, services.stop

    def loop() -> None:
        while not stop.wait(services.config.metrics_refresh_s):
            recorder.set_store_writable(store.probe_write())  # recovers by itself within a tick
            try:
                store.sweep()
                recorder.set_store_stats(store.stats())
            except StoreFailure as exc:  # counted and shown on /readyz already
                log.warning("session housekeeping: %s", exc)
            except Exception:  # noqa: BLE001 - keep the loop alive; a failing store shows in logs
                log.exception("session housekeeping failed")

    threading.Thread(target=loop, name="edgechat-housekeeping", daemon=True).start()
