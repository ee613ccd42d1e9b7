"""`edgechat serve`: run the daemon under gunicorn with the package's server hooks."""
from __future__ import annotations

import argparse
import os
import sys

from .. import config as config_mod


def add_parsers(sub) -> None:
    """Register `serve` with one flag per config field."""
    p = sub.add_parser("serve", help="serve chat over HTTP (gunicorn)",
                       description="Serve chat over HTTP. Every flag is also an EDGECHAT_* "
                                   "environment variable; flags win.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    config_mod.add_arguments(p)
    p.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"edgechat: {message}", file=sys.stderr)
    return 2


def check_model(cfg: config_mod.Config) -> str | None:
    """Make sure the model can be loaded by workers; returns an error message or None.

    Built-in models are built here in a child process (building runs torch ops, which must never
    happen in the gunicorn master before it forks).
    """
    from ..builtin_models import ensure_built, is_builtin
    hint = "try --model builtin:tiny (generated locally, no download)"
    if is_builtin(cfg.model):
        try:
            ensure_built(cfg.model, cfg.cache_dir, isolate=True)
        except (OSError, RuntimeError) as exc:  # the child's failure, already logged by it
            return f"model: could not build {cfg.model}: {exc}"
        return None
    if os.path.isdir(cfg.model):
        if not os.path.isfile(os.path.join(cfg.model, "config.json")):
            return f"model: folder {cfg.model} has no config.json; {hint}"
        return None
    if cfg.model.startswith((".", "/", "~")) or cfg.model.count("/") > 1:
        return f"model: {cfg.model} is not a folder; {hint}"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline:
        from huggingface_hub import try_to_load_from_cache
        if not isinstance(try_to_load_from_cache(cfg.model, "config.json"), str):
            return (f"model: {cfg.model} is not in the Hugging Face cache (HF_HOME) and "
                    f"HF_HUB_OFFLINE is set; stage it (see README) or {hint}")
    return None


def gunicorn_options(cfg: config_mod.Config) -> dict:
    """gunicorn settings derived from the config (what differs from gunicorn's defaults)."""
    from .. import server_hooks as hooks
    return {
        "bind": f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}",
        "workers": cfg.workers,
        "worker_class": "gthread",
        "threads": cfg.worker_threads,
        # the heartbeat must survive model load + warm-up, which happen before the worker loop
        "timeout": int(cfg.generation_timeout_s + 120),
        "graceful_timeout": int(cfg.graceful_timeout_s),
        "max_requests": cfg.max_requests,
        "max_requests_jitter": cfg.max_requests_jitter,
        "proc_name": "edgechat",
        # gunicorn 27's control socket is unused here and would clash between daemons on one host
        "control_socket_disable": True,
        "accesslog": None,
        "loglevel": cfg.log_level.lower(),
        "on_starting": hooks.on_starting,
        "when_ready": hooks.when_ready,
        "post_fork": hooks.post_fork,
        "child_exit": hooks.child_exit,
        "worker_int": hooks.worker_int,
    }


def run(ns: argparse.Namespace) -> int:
    """Validate, prepare the model, export the config to workers, run gunicorn until stopped."""
    try:
        cfg = config_mod.from_args(ns)
    except ValueError as exc:
        return _fail(f"invalid configuration: {exc}")
    problem = check_model(cfg)
    if problem:
        return _fail(problem)
    # workers rebuild the same Config from the environment (flags already merged in)
    os.environ.update(config_mod.to_env(cfg))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = cfg.metrics_dir
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
            from ..engine import ModelLoadError
            try:
                return create_app(cfg)
            except (ModelLoadError, ValueError) as exc:
                # exit code 3 is gunicorn's "worker failed to boot": the master halts non-zero
                print(f"edgechat: {exc}", file=sys.stderr)
                sys.exit(3)

    Application().run()
    return 0
