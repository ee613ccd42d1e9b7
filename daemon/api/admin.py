"""Admin endpoints under /debug/memory: tracemalloc top/diff, baseline snapshot, object census, tracing switch.

Registered only when the `admin_key` setting is set (404 otherwise) and guarded by
`Authorization: Bearer <admin key>`. Each answer comes from one worker and names it (`pid` in the body,
X-Edgechat-Pid header); `edgechat diagnose` repeats requests until every worker has answered.
Snapshots and censuses hold the GIL while they walk the heap (a second or two with tracing on):
turns in this worker pause meanwhile.
"""
from __future__ import annotations

import hmac
import os

from flask import Blueprint, jsonify, request

from ..memory import tracing
from ..memory.tracing import Diagnostics
from ..services import get_services
from .errors import ApiError, error_body, invalid
from .openapi import documented
from . import params
from .fields import Boolean, Integer, Query, Text
from .validate import json_body

bp = Blueprint("admin", __name__, url_prefix="/debug/memory")
DEFAULT_LIMIT = 10
MAX_LIMIT = 100
PID_HEADER = "X-Edgechat-Pid"


def _diag() -> Diagnostics:
    return get_services().diagnostics


@bp.before_request
def _authorize() -> None:
    key = get_services().config.admin_key
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        get_services().metrics.requests_rejected_total.labels(reason="unauthorized").inc()
        raise ApiError(401, "missing admin key: send 'Authorization: Bearer <admin key>'",
                       code="missing_admin_key")
    # bytes: compare_digest on str accepts ASCII only, and a key is compared in constant time
    if not hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), key.encode()):
        get_services().metrics.requests_rejected_total.labels(reason="unauthorized").inc()
        raise ApiError(401, "invalid admin key", code="invalid_admin_key")


@bp.errorhandler(ApiError)
def _error(err: ApiError):
    body = error_body(err.status, err.message, err.code, err.param)
    body["pid"] = os.getpid()  # which worker refused: the client counts it as having answered
    resp = jsonify(body)
    resp.status_code = err.status
    if err.retry_after is not None:
        resp.headers["Retry-After"] = str(err.retry_after)
    return resp


@bp.after_request
def _name_the_worker(resp):
    resp.headers[PID_HEADER] = str(os.getpid())
    return resp


LIMIT = Integer(1, MAX_LIMIT, DEFAULT_LIMIT, doc="Entries to return.")
GROUP_BY = Text(choices=tracing.GROUP_BY, default="lineno", doc="How allocations are grouped.")
SITES = Query({"limit": LIMIT, "group_by": GROUP_BY})
CENSUS = Query({"limit": LIMIT, "holders": Boolean(True, doc="Also name what holds new tensors.")})
SWITCH = {"enabled": params.Field(params.HONOURED, "Trace allocations from now on (true), or stop "
                                                  "(false).", spec=Boolean(None))}
ADMIN = "admin_key"


def _query(spec: Query) -> dict:
    return spec.parse(request.args, get_services().config)


def _tracing_off() -> ApiError:
    return ApiError(409, f"tracemalloc is off in worker {os.getpid()}: turn it on with POST "
                         "/debug/memory/tracemalloc {\"enabled\": true} (the other workers follow "
                         "within metrics_refresh_s), `edgechat diagnose URL --tracemalloc on`, or start "
                         "the daemon with EDGECHAT_TRACEMALLOC=1", code="tracemalloc_off")


@bp.get("/top")
@documented(query=SITES, auth=ADMIN)
def top():
    """The allocation sites holding the most traced memory now."""
    limit, group_by = _query(SITES)["limit"], _query(SITES)["group_by"]
    tracer = _diag().tracer
    try:
        entries = tracer.top(limit, group_by)
    except tracing.TracingOff:
        raise _tracing_off() from None
    return jsonify({"pid": os.getpid(), "group_by": group_by, "limit": limit, **tracer.status(),
                    "entries": entries})


@bp.get("/diff")
@documented(query=SITES, auth=ADMIN)
def diff():
    """The allocation sites that grew most since the baseline snapshot."""
    limit, group_by = _query(SITES)["limit"], _query(SITES)["group_by"]
    tracer = _diag().tracer
    try:
        entries = tracer.diff(limit, group_by)
    except tracing.TracingOff:
        raise _tracing_off() from None
    except tracing.NoBaseline:
        raise ApiError(409, f"worker {os.getpid()} has no baseline: POST /debug/memory/snapshot first "
                            "(`edgechat diagnose URL --snapshot`)", code="no_baseline") from None
    return jsonify({"pid": os.getpid(), "group_by": group_by, "limit": limit, **tracer.status(),
                    "entries": entries})


@bp.post("/snapshot")
@documented(auth=ADMIN)
def snapshot():
    """Store the baseline: a tracemalloc snapshot (when tracing) and an object census."""
    diag = _diag()
    base = diag.census.mark()  # first: what the census itself allocates must not count as growth
    traced = diag.tracer.tracing
    if traced:
        diag.tracer.mark()
    return jsonify({"pid": os.getpid(), "tracemalloc_baseline": traced, **diag.tracer.status(),
                    "census": {"taken_at": base.taken_at, "seconds": round(base.seconds, 4),
                               "objects": base.objects,
                               "torch": {"tensors": base.tensors, "bytes": base.tensor_bytes}}})


@bp.get("/census")
@documented(query=CENSUS, auth=ADMIN)
def census():
    """Live objects by type, torch tensor bytes, growth since the baseline and what holds new tensors."""
    query = _query(CENSUS)
    limit, want_holders = query["limit"], query["holders"]
    return jsonify({"pid": os.getpid(), "limit": limit, **_diag().census.report(limit, want_holders)})


@bp.post("/tracemalloc")
@documented(table=SWITCH, required=("enabled",), auth=ADMIN)
def switch():
    """Start or stop tracing, {"enabled": true|false}: here at once, in the other workers of this
    server within metrics_refresh_s (daemon.memory.tracing.SHARED_SWITCH)."""
    body = json_body()
    params.check(body, SWITCH, "debug.tracemalloc", get_services().config)
    enabled = body.get("enabled")
    if enabled is None:
        raise invalid("'enabled' is required: true or false", "enabled", "missing_field")
    tracer = _diag().tracer
    if enabled:
        changed = tracer.start()
        get_services().metrics.track_tracemalloc()
    else:
        changed = tracer.stop()
    return jsonify({"pid": os.getpid(), "changed": changed, **tracer.status()})
