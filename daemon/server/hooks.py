"""gunicorn server hooks, part of the options `edgechat serve` and deploy/gunicorn.conf.py share (options.py).

Each hook says which process runs it. The master must run no torch operation before it forks
(a child forked after a parallel op hangs), so the model is loaded in each worker by create_app,
and nothing here imports torch or prometheus_client at module level.
"""
from __future__ import annotations

import logging
import os

from ..telemetry.multiproc import MULTIPROC_ENV, prepare_dir, worker_exited

log = logging.getLogger("edgechat.server")


def metrics_dir() -> str:
    """The multiprocess metrics folder: PROMETHEUS_MULTIPROC_DIR, else the configured one."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        from ..config import Config
        path = Config.from_env().metrics_dir
    return path


def describe(state_dir: str, bind) -> str:
    """How a daemon is named to another one that finds its metrics folder held."""
    where = ", ".join(bind) if isinstance(bind, (list, tuple)) else str(bind)
    return f"pid {os.getpid()}, state_dir {os.path.abspath(state_dir)}, listening on {where}"


def on_starting(server) -> None:
    """Master, once, before any worker: claim, set up and wipe the multiprocess metrics folder
    (FolderHeld, a RuntimeError gunicorn prints before exiting 1, when another daemon holds it)."""
    from ..config import Config
    path = metrics_dir()
    # must be in the environment before prometheus_client is imported anywhere in this tree
    os.environ[MULTIPROC_ENV] = path
    prepare_dir(path, describe(Config.from_env().state_dir, server.cfg.bind))
    log.info("metrics folder %s (wiped)", path)


def when_ready(server) -> None:
    """Master: listening sockets are open."""
    log.info("edgechat listening on %s", ", ".join(str(s) for s in server.LISTENERS))


def post_fork(server, worker) -> None:
    """Worker, right after fork: the app (and model) load next, in this process."""
    log.info("worker %s forked", worker.pid)


def child_exit(server, worker) -> None:
    """Master, after a worker exited: drop its live gauges, fold its counters into the archive."""
    worker_exited(worker.pid, metrics_dir())


def worker_int(worker) -> None:
    """Worker, on SIGINT/SIGQUIT: say so (gunicorn then exits the worker)."""
    log.info("worker %s interrupted", worker.pid)
