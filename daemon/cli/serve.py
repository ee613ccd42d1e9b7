"""`edgechat serve`: run the daemon under gunicorn with the package's server hooks."""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
from urllib.parse import urlsplit

from ..config import ENV_PREFIX, SECRETS, Config, to_env
from ..server import logs
from ..server.options import gunicorn_options
from ..server.hooks import describe
from ..telemetry.multiproc import MULTIPROC_ENV, FolderHeld, claim_dir
from .flags import add_arguments, from_args

log = logging.getLogger("edgechat.serve")
HUB_PROBE_S = 3.0  # how long to try reaching the model hub before calling it unreachable


def add_parsers(sub) -> None:
    """Register `serve` with one flag per config field."""
    p = sub.add_parser("serve", help="serve chat over HTTP (gunicorn)",
                       description="Serve chat over HTTP. Every flag is also an EDGECHAT_* "
                                   "environment variable; flags win.")
    add_arguments(p)
    p.set_defaults(func=run)


def _fail(message: str) -> int:
    log.error(message)
    return 2


def _hub_reachable(timeout: float = HUB_PROBE_S) -> bool:
    """Whether the model hub answers a TCP connect within `timeout` (DNS included)."""
    from huggingface_hub import constants
    url = urlsplit(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def check_model(cfg: Config) -> str | None:
    """Make sure the model can be loaded by workers; returns an error message or None.

    Built-in models are built here in a child process (building runs torch ops, which must never
    happen in the gunicorn master before it forks).
    """
    from ..model.builtin import ensure_built, is_builtin
    hint = "try --model builtin:tiny (generated locally, no download)"
    if is_builtin(cfg.model):
        try:
            ensure_built(cfg.model, cfg.cache_dir, log=log.info, isolate=True)
        except (OSError, RuntimeError) as exc:  # the child's failure, already logged by it
            return f"model: could not build {cfg.model}: {exc}"
        return None
    if os.path.isdir(cfg.model):
        if not os.path.isfile(os.path.join(cfg.model, "config.json")):
            return f"model: folder {cfg.model} has no config.json; {hint}"
        return None
    if cfg.model.startswith((".", "/", "~")) or cfg.model.count("/") > 1:
        return f"model: {cfg.model} is not a folder; {hint}"
    from huggingface_hub import try_to_load_from_cache
    if isinstance(try_to_load_from_cache(cfg.model, "config.json"), str):
        return None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline:
        return (f"model: {cfg.model} is not in the Hugging Face cache (HF_HOME) and "
                f"HF_HUB_OFFLINE is set; stage it (see README) or {hint}")
    if not _hub_reachable():  # fail now, not after the download library's retries
        return (f"model: {cfg.model} is not in the Hugging Face cache (HF_HOME) and the hub cannot "
                f"be reached; stage it (see README) or {hint}")
    return None


def check_store(cfg: Config) -> str | None:
    """Open (create, check, migrate) a SQLite session file once here, before any worker: a corrupt
    or unusable file stops the start with one message, untouched, instead of every worker failing
    on it at once (or migrating it side by side); an error message or None."""
    url = cfg.session_store_url()
    if not url.startswith("sqlite:"):
        return None
    from ..sessions import StoreUnavailable
    from ..sessions.sqlite_schema import open_file, path_from_url
    try:
        open_file(path_from_url(url), busy_timeout_s=5.0).close()
    except StoreUnavailable as exc:
        return str(exc)
    return None


def run(ns: argparse.Namespace) -> int:
    """Validate, prepare the model, export the config to workers, run gunicorn until stopped."""
    try:
        cfg = from_args(ns)
    except ValueError as exc:
        logs.setup("INFO", os.environ.get(ENV_PREFIX + "LOG_FORMAT", "text").strip().lower())
        return _fail(f"invalid configuration: {exc}")
    logs.setup(cfg.log_level, cfg.log_format, cfg.access_log)
    problem = check_model(cfg) or check_store(cfg)
    if problem:
        return _fail(problem)
    # workers get `cfg` itself (forked from here); the environment says the same for anything that
    # reads it, secrets apart: they never reach a worker's environment
    os.environ.update(to_env(cfg))
    for name in SECRETS:
        os.environ.pop(ENV_PREFIX + name.upper(), None)
    os.environ[MULTIPROC_ENV] = cfg.metrics_dir
    try:  # before gunicorn: a held folder is refused like an invalid setting, with exit code 2
        claim_dir(cfg.metrics_dir, describe(cfg.state_dir, [f"{cfg.host}:{cfg.port}"]))
    except FolderHeld as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"metrics_dir: cannot use {cfg.metrics_dir}: {exc.strerror}")
    # OpenMP threads that spin while they wait cut decode 3-5x as soon as anything else wants a
    # core (docs/performance.md); sleeping waiters cost little on an idle box. An operator's value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from gunicorn.app.base import BaseApplication

    class Application(BaseApplication):
        def load_config(self) -> None:
            for key, value in gunicorn_options(cfg).items():
                self.cfg.set(key, value)

        def load(self):
            # runs in each worker after fork (preload_app is off)
            from .. import create_app
            from ..model.engine import ModelLoadError
            try:
                return create_app(cfg)
            except (ModelLoadError, ValueError) as exc:
                # exit code 3 is gunicorn's "worker failed to boot": the master halts non-zero
                log.error("%s", exc)
                sys.exit(3)

    Application().run()
    return 0
