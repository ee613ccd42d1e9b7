"""Bearer-key check for /v1 routes; a session's owner is a digest of the key that created it."""
from __future__ import annotations

import hashlib
import hmac

from flask import Blueprint, g, request

from ..services import get_services
from .errors import ApiError
from .limits import tenant


def owner_of(key: str | None) -> str | None:
    """Stable owner id for a key, so stores never hold the key itself."""
    return None if key is None else hashlib.sha256(key.encode()).hexdigest()[:32]


def _check() -> None:
    """The caller's key (when keys are set), then its request rate (429 when over)."""
    _authenticate()
    try:
        get_services().limits.admit(tenant())
    except ApiError:
        get_services().recorder.on_reject("rate_limited")
        raise


def _authenticate() -> None:
    keys = get_services().config.api_keys
    g.owner = None
    if not keys:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        get_services().metrics.requests_rejected_total.labels(reason="unauthorized").inc()
        raise ApiError(401, "missing bearer key: send 'Authorization: Bearer <key>'",
                       code="missing_api_key")
    # compare against every key in constant time so timing does not reveal a prefix match; as bytes:
    # compare_digest refuses a str with non-ASCII characters (any header may carry them)
    given = token.strip().encode("utf-8", "surrogateescape")
    if not any(hmac.compare_digest(given, k.encode()) for k in keys):
        get_services().metrics.requests_rejected_total.labels(reason="unauthorized").inc()
        raise ApiError(401, "invalid API key", code="invalid_api_key")
    g.owner = owner_of(token.strip())


def bearer_matches(key: str) -> bool:
    """Whether the request's `Authorization: Bearer` token is `key` (constant time, any bytes)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    given = token.strip().encode("utf-8", "surrogateescape")
    return scheme.lower() == "bearer" and hmac.compare_digest(given, key.encode())


def protect(bp: Blueprint) -> Blueprint:
    """Require a valid key on every route of the blueprint when api_keys is set."""
    bp.before_request(_check)
    return bp
