"""gunicorn settings for running edgechat without `edgechat serve`: `gunicorn -c deploy/gunicorn.conf.py`.

Only what differs from gunicorn's defaults. Values come from the same EDGECHAT_* settings the daemon
reads (daemon/config.py), so one env file configures both; tests/test_deploy.py checks that this file
and `edgechat serve` hand gunicorn the same options. Nothing here imports torch: this file runs in the
master, which must not run a torch operation before it forks (docs/deploy.md).
"""
from daemon.config import Config
# The hooks `edgechat serve` uses; gunicorn picks them up by name from this module's globals.
from daemon.server_hooks import child_exit, on_starting, post_fork, when_ready, worker_int  # noqa: F401

_cfg = Config.from_env()  # EDGECHAT_* from the environment (systemd EnvironmentFile=, docker --env-file)

# The app factory, called in each worker after fork (preload_app stays off): each worker loads its
# own model copy, so the master never touches torch.
wsgi_app = "daemon:create_app()"

bind = f"[{_cfg.host}]:{_cfg.port}" if ":" in _cfg.host else f"{_cfg.host}:{_cfg.port}"

# One worker by default: each holds a full model copy, and a 2 GB box has room for one 0.5B model.
workers = _cfg.workers
# Threads, not processes, for concurrency: requests queue for the one model inside the worker and
# probes and /metrics keep answering while a turn generates.
worker_class = "gthread"
threads = _cfg.worker_threads

# A worker's heartbeat must survive the longest generation (generation_timeout_s) and, at boot, the
# model load and warm-up that run before its loop starts; 120 s covers a 1 GB model read from eMMC.
timeout = int(_cfg.generation_timeout_s + 120)
# After SIGTERM, in-flight turns get this long to finish before workers are killed.
graceful_timeout = int(_cfg.graceful_timeout_s)

# Leak safety valve (off by default: a leak should be found and fixed, which the alerts are for).
# With EDGECHAT_MAX_REQUESTS=N a worker is replaced after N requests (+ up to JITTER more, so several
# workers do not all restart, and reload the model, at the same moment).
max_requests = _cfg.max_requests
max_requests_jitter = _cfg.max_requests_jitter

proc_name = "edgechat"
# gunicorn >= 25.1 opens a control socket (gunicornc) at $XDG_RUNTIME_DIR/gunicorn.ctl or
# ~/.gunicorn/gunicorn.ctl: unused here, and two instances on one host would fight over it.
# Older gunicorn ignores the setting.
control_socket_disable = True
# accesslog stays at gunicorn's default (off): Prometheus counts requests by route and status
# (edgechat_http_requests_total), and an edge box's SD card should not take a line per request.
loglevel = _cfg.log_level.lower()
