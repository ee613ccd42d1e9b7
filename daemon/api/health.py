"""Liveness and readiness probes for systemd, load balancers and the soak tool."""
from __future__ import annotations

import os

from flask import Blueprint, jsonify

from ..services import get_services
from ..telemetry.multiproc import write_failures

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """Alive: the worker answers HTTP."""
    return jsonify({"status": "ok", "pid": os.getpid()})


@bp.get("/readyz")
def readyz():
    """Ready: model loaded and warmed up, the wait queue not full, and the session store answering
    reads (whether it takes writes is reported apart: `session_store.writable`)."""
    services = get_services()
    cfg, engine = services.config, services.engine
    waiting = engine.queue_depth()
    checks = {"model_loaded": bool(engine.ready), "queue_not_full": waiting < cfg.queue_limit,
              "session_store": bool(services.store.healthy())}
    pressure = services.watchdog
    if pressure is not None:  # above the hard memory limit turns get 503: take the worker out of rotation
        checks["memory_below_hard_limit"] = not pressure.refusing
    ready = all(checks.values())
    choice = engine.choice
    body = {"ready": ready, "checks": checks, "model": engine.model_id, "dtype": engine.dtype,
            "decode": {"dtype": engine.dtype, "quantize": engine.quantize, "kernel": engine.kernel,
                       "chosen": choice.source, "step_ms": choice.step_ms, **engine.decode_path},
            "queue_depth": waiting, "batch": engine.batch(), "pid": os.getpid()}
    # reads gate readiness; failed writes are reported, not gating: stateless completions still
    # work, and readiness must not flap with every read that succeeds between failed writes
    body["session_store"] = {"writable": services.store.writable,
                             "last_error": services.store.last_error()}
    # this worker's metric values lost to a full metrics folder (it keeps serving: not gating)
    body["metrics_write_failures"] = write_failures()
    if cfg.leak_mode != "off":
        body["leak_mode"] = cfg.leak_mode
    if pressure is not None:
        body["memory_pressure_level"] = pressure.level
    return jsonify(body), 200 if ready else 503
