"""One JSON error shape (OpenAI's) for every failure; tracebacks are logged, never sent."""
from __future__ import annotations

import logging
import uuid

from flask import Flask, g, jsonify, request
from werkzeug.exceptions import HTTPException

from ..openai_error import error_body
from ..sessions import StoreFailure
from ..server.logs import REQUEST_ID

log = logging.getLogger("edgechat.api")
__all__ = ["ApiError", "error_body", "error_response", "init_app", "invalid", "request_id",
           "store_unavailable"]


class ApiError(Exception):
    """A client-visible failure: raised in views, rendered by the handler below."""

    def __init__(self, status: int, message: str, *, code: str | None = None,
                 param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.retry_after = retry_after


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    """Shorthand for a 400 about one request field."""
    return ApiError(400, message, code=code, param=param)


STORE_RETRY_AFTER_S = 5  # the housekeeping probe runs every metrics_refresh_s (5 s by default)


def store_unavailable(err: StoreFailure, services=None) -> ApiError:
    """503 store_unavailable with Retry-After for a session store failure (counted as rejected).

    services: the app's Services where there is no app context (a streamed body's end)."""
    from ..services import get_services
    (services or get_services()).recorder.on_reject("store_unavailable")
    what = "store" if err.write else "read"
    return ApiError(503, f"the session store cannot {what} now ({err.operation} failed); nothing was "
                         "changed; retry later", code="store_unavailable", retry_after=STORE_RETRY_AFTER_S)


def error_response(err: ApiError):
    """Render an ApiError as a JSON response with its status (and Retry-After when set)."""
    resp = jsonify(error_body(err.status, err.message, err.code, err.param))
    resp.status_code = err.status
    if err.retry_after is not None:
        resp.headers["Retry-After"] = str(err.retry_after)
    return resp


def request_id() -> str:
    """This request's id: the client's X-Request-Id when sane, else a new one."""
    if "request_id" not in g:
        given = request.headers.get("X-Request-Id", "")
        g.request_id = given if 0 < len(given) <= 64 and given.isprintable() else uuid.uuid4().hex
    return g.request_id


def init_app(app: Flask) -> None:
    """Install the handlers that turn every error into the JSON shape."""

    @app.before_request
    def _log_context():
        # every log line of this request (its generation thread's too) carries the id
        REQUEST_ID.set(request_id())

    @app.after_request
    def _tag(resp):
        resp.headers["X-Request-Id"] = request_id()
        # kept while a streamed body is sent and gunicorn logs the access line; gone after
        resp.call_on_close(lambda: REQUEST_ID.set(None))
        return resp

    @app.errorhandler(ApiError)
    def _api_error(err: ApiError):
        return error_response(err)

    @app.errorhandler(StoreFailure)
    def _store_failure(err: StoreFailure):
        # the disk is full or read-only, the database locked, Redis gone: nothing of the request
        # happened; the client may retry once the store is back (housekeeping probes it)
        log.warning("%s (request id %s)", err, request_id())
        return error_response(store_unavailable(err))

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large",
                 415: "unsupported_media_type", 400: "bad_request"}
        message = {413: f"request body exceeds max_body_bytes ({app.config.get('MAX_CONTENT_LENGTH')})"}
        return error_response(ApiError(err.code or 500, message.get(err.code, err.description or err.name),
                                       code=codes.get(err.code)))

    @app.errorhandler(Exception)
    def _unexpected(err: Exception):
        # Anything else is our bug: log the traceback with the request id, send only the id.
        rid = request_id()
        log.exception("unhandled error on %s (request id %s)", request.path, rid)
        return error_response(ApiError(500, f"internal error (request id {rid})", code="internal_error"))
