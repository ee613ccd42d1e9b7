"""The gunicorn options edgechat runs under, owned here: `edgechat serve` and deploy/gunicorn.conf.py both use them.

Only what differs from gunicorn's defaults. Nothing here imports torch: the master reads this and
must not run a torch operation before it forks.
"""
from __future__ import annotations

from ..config import Config
from . import hooks, logs

# The app factory, called in each worker after fork (preload_app stays off): each worker loads its
# own model copy, so the master never touches torch.
WSGI_APP = "daemon:create_app()"
WORKER_CLASS = "daemon.server.worker.EdgeWorker"
# gunicorn picks hooks up by these names (from a config module's globals, or cfg.set)
HOOKS = {"on_starting": hooks.on_starting, "when_ready": hooks.when_ready,
         "post_fork": hooks.post_fork, "child_exit": hooks.child_exit, "worker_int": hooks.worker_int}


def bind_address(cfg: Config) -> str:
    """host:port, with brackets around an IPv6 host."""
    return f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}"


def request_threads(cfg: Config) -> int:
    """Threads per worker: what the model takes (max_batch running + queue_limit waiting) + worker_threads."""
    return cfg.worker_threads + cfg.queue_limit + cfg.max_batch


def gunicorn_options(cfg: Config) -> dict:
    """gunicorn settings derived from the config, hooks included."""
    return {
        "bind": bind_address(cfg),
        # One worker by default: each holds a full model copy, and a 2 GB box has room for one 0.5B model.
        "workers": cfg.workers,
        # gthread whose event loop reads each request whole, under deadlines, before a thread takes
        # it (server/worker.py): slow clients hold a connection, never a thread.
        "worker_class": WORKER_CLASS,
        # Threads, not processes, for concurrency: a thread for each turn the model can hold
        # (max_batch running, queue_limit waiting), so a burst beyond it reaches the queue and gets
        # its 503 instead of waiting unseen for a thread, and worker_threads more for everything
        # else (probes, /metrics, sessions) while turns generate.
        "threads": request_threads(cfg),
        # A worker's heartbeat must survive the longest generation and, at boot, the model load and
        # warm-up that run before its loop starts; 120 s covers a 1 GB model read from eMMC.
        "timeout": int(cfg.generation_timeout_s + 120),
        # After SIGTERM, in-flight turns get this long to finish before workers are killed.
        "graceful_timeout": int(cfg.graceful_timeout_s),
        # Leak safety valve (off by default: a leak should be found and fixed, which the alerts are
        # for). With max_requests N a worker is replaced after N requests (+ up to the jitter more,
        # so several workers do not all restart, and reload the model, at the same moment).
        "max_requests": cfg.max_requests,
        "max_requests_jitter": cfg.max_requests_jitter,
        "proc_name": "edgechat",
        # gunicorn >= 25.1 opens a control socket at $XDG_RUNTIME_DIR/gunicorn.ctl: unused here, and
        # two instances on one host would fight over it. Older gunicorn ignores the setting.
        "control_socket_disable": True,
        # Every line, gunicorn's own included, through edgechat's handler and format (logs.py), in
        # the master and the workers. The access log is off unless access_log: Prometheus counts
        # requests by route and status (edgechat_http_requests_total), and an edge box's SD card
        # should not take a line per request.
        "logconfig_dict": logs.dict_config(cfg.log_level, cfg.log_format, cfg.access_log),
        "access_log_format": logs.ACCESS_FORMAT,
        "loglevel": cfg.log_level.lower(),
        **HOOKS,
    }
