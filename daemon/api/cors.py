"""Opt-in CORS (cors_origins): a browser app on another origin may call the API with its key."""
from __future__ import annotations

from flask import Flask, Response, request

ALLOW_HEADERS = "Authorization, Content-Type, X-Request-Id"
ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
MAX_AGE_S = 600


def init_app(app: Flask, origins: tuple[str, ...]) -> None:
    """Answer preflights (before auth: browsers send no key with them) and tag allowed origins."""
    if not origins:
        return
    any_origin = "*" in origins

    def allowed() -> str | None:
        origin = request.headers.get("Origin")
        if origin and (any_origin or origin in origins):
            return "*" if any_origin else origin
        return None

    @app.before_request
    def _preflight():
        if request.method == "OPTIONS" and request.headers.get("Access-Control-Request-Method"):
            resp = Response(status=204)
            if allowed():
                resp.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
                resp.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
                resp.headers["Access-Control-Max-Age"] = str(MAX_AGE_S)
            return resp
        return None

    @app.after_request
    def _tag(resp):
        origin = allowed()
        if origin:
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Access-Control-Expose-Headers"] = "X-Request-Id, Retry-After"
            if not any_origin:
                resp.headers.add("Vary", "Origin")
        return resp
