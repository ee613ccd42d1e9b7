"""The app factory: wires config, metrics, engine, session store and the HTTP API together."""
from __future__ import annotations

import logging
import threading

from flask import Flask

from . import extensions, logs
from .config import Config

log = logging.getLogger("edgechat")
STOP = "edgechat.stop"


def create_app(config: Config | None = None) -> Flask:
    """Build a ready-to-serve app; loads the model, so call it in the worker, never the master."""
    cfg = config if config is not None else Config.from_env()
    logs.setup(cfg.log_level, cfg.log_format)
    app = Flask("daemon")
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions[extensions.CONFIG] = cfg
    if cfg.leak_mode != "off":
        log.warning("!!! LEAK MODE %r IS ON: this daemon leaks on purpose (demo/test only) !!!",
                    cfg.leak_mode)

    from .api import errors, metrics as metrics_api
    errors.init_app(app)
    metrics_api.init_app(app, cfg)
    metrics = extensions.get_metrics(app)

    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # a tqdm bar per load is noise in a daemon's log
    from .engine import Engine
    engine = Engine.load(cfg, listener=metrics, memory_pressure=kv_pressure(cfg, metrics.multiprocess))
    app.extensions[extensions.ENGINE] = engine
    metrics.set_model_info(engine.model_id, engine.dtype_label, cfg.leak_mode, engine.load_seconds)

    init_store(app, cfg, engine, metrics)

    from . import diagnostics, watchdog  # issue 8: find the leak (admin endpoints), survive it
    diagnostics.init_app(app, cfg, metrics, app.extensions[STOP])
    watchdog.init_app(app, cfg, engine=engine, store=app.extensions[extensions.STORE], metrics=metrics,
                      stop=app.extensions[STOP])

    from .api import chat, health, sessions
    for bp in (health.bp, chat.bp, sessions.bp):
        app.register_blueprint(bp)
    if cfg.admin_key:  # without a key the /debug/memory endpoints do not exist at all
        from .api import admin
        app.register_blueprint(admin.bp)
    from .api import stats, ui  # the web page and its live side panel (/v1/stats)
    for bp in (stats.bp, ui.bp):
        app.register_blueprint(bp)
    return app


def history_token_budget(cfg: Config, context_length: int) -> int:
    """The prompt budget: configured, or the model context minus room for the reply."""
    budget = cfg.max_history_tokens or context_length - cfg.max_new_tokens
    if budget <= 0 or budget + cfg.max_new_tokens > context_length:
        raise ValueError(f"max_history_tokens ({budget}) + max_new_tokens ({cfg.max_new_tokens}) "
                         f"must fit the model context ({context_length})")
    return budget


def kv_pressure(cfg: Config, multiprocess: bool):
    """A check the engine runs after each turn: above the soft memory limit it keeps no KV cache idle."""
    from . import procstats
    cgroup = procstats.CgroupMemory.detect()

    def pressure() -> bool:
        budget = procstats.memory_budget(cgroup, cfg.memory_limit_bytes, siblings=multiprocess)
        return budget.limit > 0 and budget.service > cfg.memory_soft_limit_ratio * budget.limit
    return pressure


def init_store(app: Flask, cfg: Config, engine, metrics) -> None:
    """Create the session store under the configured policy and keep its gauges fresh."""
    from .sessions import HistoryPolicy, make_store
    policy = HistoryPolicy(max_turns=cfg.max_history_turns,
                           max_tokens=history_token_budget(cfg, engine.context_length),
                           ttl_s=cfg.session_ttl_s, max_sessions=cfg.max_sessions,
                           trim=cfg.leak_mode != "history",
                           # with KV reuse, trim in blocks so most turns keep their cached prefix
                           trim_to=cfg.history_trim_to if cfg.kv_cache_bytes else 1.0)
    # a turn holds its session from before the queue wait until its commit, so a shared store's
    # lease must outlast both (+30 s for a slow client draining the stream); it is also the longest
    # a crashed worker can keep a session locked (SQLite frees a dead local pid's lease at once)
    lease_s = cfg.queue_timeout_s + cfg.generation_timeout_s + 30.0
    store = make_store(policy, engine.count_tokens, url=cfg.session_store_url(), listener=metrics,
                       lease_s=lease_s)
    app.extensions[extensions.STORE] = store
    metrics.set_store_stats(store.stats())
    stop = threading.Event()
    app.extensions[STOP] = stop
    _start_housekeeping(store, metrics, cfg.metrics_refresh_s, stop)


def shutdown_app(app: Flask) -> None:
    """Stop background threads and release the model, store and metrics (tests, worker exit)."""
    app.extensions[STOP].set()
    for key in (extensions.STORE, extensions.ENGINE, extensions.METRICS):
        obj = app.extensions.get(key)
        if obj is not None:
            obj.close()


def _start_housekeeping(store, metrics, interval_s: float, stop: threading.Event) -> None:
    """Expire idle sessions and refresh the history gauges even when no request comes."""
    def loop() -> None:
        while not stop.wait(interval_s):
            try:
                store.sweep()
                metrics.set_store_stats(store.stats())
            except Exception:  # noqa: BLE001 - keep the loop alive; a failing store shows in logs
                log.exception("session housekeeping failed")

    threading.Thread(target=loop, name="edgechat-housekeeping", daemon=True).start()
