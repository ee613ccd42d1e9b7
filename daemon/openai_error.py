"""The OpenAI error object, one shape for the API's errors and the server's own refusals (imports nothing)."""
from __future__ import annotations

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
         409: "conflict_error", 413: "invalid_request_error", 414: "invalid_request_error",
         415: "invalid_request_error", 429: "rate_limit_error", 431: "invalid_request_error",
         503: "service_unavailable"}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    """{"error": {"message", "type", "param", "code"}} for an HTTP status."""
    kind = TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
