"""Request-body validation shared by the chat routes: every bad field becomes a 400 naming it."""
from __future__ import annotations

import math
from typing import Any

from flask import request

from .errors import ApiError, invalid

ROLES = ("system", "user", "assistant")
MAX_STOP = 4


def json_body() -> dict:
    """The request's JSON object, or a 4xx explaining why not."""
    if not request.is_json:
        raise ApiError(415, "Content-Type must be application/json", code="unsupported_media_type")
    body = request.get_json(silent=True)
    if body is None:
        raise invalid("request body is not valid JSON", code="invalid_json")
    if not isinstance(body, dict):
        raise invalid("request body must be a JSON object", code="invalid_json")
    return body


def number(body: dict, name: str, default: float, low: float, high: float,
           *, low_open: bool = False) -> float:
    """A JSON number within [low, high] (or (low, high] when low_open)."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(f"'{name}' must be a number", name, "invalid_type")
    if value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise invalid(f"'{name}' must be in {bracket}{low}, {high}], got {value}", name)
    return float(value)


def integer(body: dict, name: str, default: int | None, low: int, high: int) -> int | None:
    """A JSON integer within [low, high]."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{name}' must be an integer", name, "invalid_type")
    if not low <= value <= high:
        raise invalid(f"'{name}' must be in [{low}, {high}], got {value}", name)
    return value


def boolean(body: dict, name: str, default: bool = False) -> bool:
    """A JSON boolean."""
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(f"'{name}' must be a boolean", name, "invalid_type")
    return value


def text(body: dict, name: str, *, required: bool, allow_empty: bool = False) -> str | None:
    """A JSON string (non-empty unless allowed)."""
    value = body.get(name)
    if value is None:
        if required:
            raise invalid(f"'{name}' is required", name, "missing_field")
        return None
    if not isinstance(value, str):
        raise invalid(f"'{name}' must be a string", name, "invalid_type")
    if not allow_empty and not value.strip():
        raise invalid(f"'{name}' must not be empty", name)
    return value


def max_tokens(body: dict, cap: int) -> int:
    """max_completion_tokens / max_tokens, at most the server's cap; the cap when absent."""
    for name in ("max_completion_tokens", "max_tokens"):
        if body.get(name) is not None:
            value = integer(body, name, None, 1, 1 << 31)
            if value > cap:
                raise invalid(f"'{name}' must be <= {cap} (the server's max_new_tokens)", name)
            return value
    return cap


def stop_list(body: dict) -> tuple[str, ...]:
    """OpenAI's `stop`: a string or a list of up to 4 non-empty strings."""
    value = body.get("stop")
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if (not isinstance(value, list) or len(value) > MAX_STOP
            or not all(isinstance(s, str) and s for s in value)):
        raise invalid(f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings",
                      "stop", "invalid_type")
    return tuple(value)


def _content(value: Any, index: int) -> str:
    """Message content: a string, or OpenAI's list of text parts."""
    param = f"messages[{index}].content"
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in value):
        return "".join(p["text"] for p in value)
    raise invalid(f"'{param}' must be a string or a list of text parts", param, "invalid_type")


def messages(body: dict) -> list[dict]:
    """OpenAI `messages`: non-empty, known roles, string content, ending with a user turn."""
    value = body.get("messages")
    if value is None:
        raise invalid("'messages' is required", "messages", "missing_field")
    if not isinstance(value, list) or not value:
        raise invalid("'messages' must be a non-empty list", "messages",
                      "invalid_type" if not isinstance(value, list) else "invalid_value")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise invalid(f"'messages[{i}]' must be an object", f"messages[{i}]", "invalid_type")
        role = msg.get("role")
        if role not in ROLES:
            raise invalid(f"'messages[{i}].role' must be one of {', '.join(ROLES)}; got {role!r}",
                          f"messages[{i}].role")
        if "content" not in msg:
            raise invalid(f"'messages[{i}].content' is required", f"messages[{i}].content",
                          "missing_field")
        out.append({"role": role, "content": _content(msg["content"], i)})
    if out[-1]["role"] == "assistant" and len(out) == 1:
        raise invalid("'messages' must contain a user message", "messages")
    return out
