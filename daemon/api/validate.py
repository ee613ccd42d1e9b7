"""Request-body validation shared by the chat routes: every bad field becomes a 400 naming it."""
from __future__ import annotations

import json
import math
from typing import Any

from flask import request

from .errors import ApiError, invalid

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP = 4
MAX_LOGIT_BIAS = 300
MAX_TOP_LOGPROBS = 20
MAX_DEPTH = 32  # JSON nesting accepted in a body; deeper is refused before any field is read


def json_body() -> dict:
    """The request's JSON object, or a 4xx explaining why not (never a 500, whatever the bytes)."""
    if not request.is_json:
        raise ApiError(415, "Content-Type must be application/json", code="unsupported_media_type")
    try:
        body = json.loads(request.get_data(cache=True))
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested past the parser's stack
        raise invalid(f"request body is not valid JSON (UTF-8, nested at most {MAX_DEPTH} levels)",
                      code="invalid_json") from None
    if not isinstance(body, dict):
        raise invalid("request body must be a JSON object", code="invalid_json")
    if _depth(body) > MAX_DEPTH:
        raise invalid(f"request body is nested deeper than {MAX_DEPTH} levels", code="invalid_json")
    try:  # "\ud800" parses as a lone surrogate: no tokenizer, store or log can take it
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise invalid("request body holds a lone UTF-16 surrogate (\\ud800-\\udfff) outside a "
                      "pair; send valid Unicode", code="invalid_unicode") from None
    return body


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion (stops counting past MAX_DEPTH)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if level > MAX_DEPTH:
                return level
            todo.extend((child, level + 1) for child in (item.values() if isinstance(item, dict)
                                                         else item))
    return deepest


def number(body: dict, name: str, default: float, low: float, high: float,
           *, low_open: bool = False) -> float:
    """A JSON number within [low, high] (or (low, high] when low_open)."""
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(f"'{name}' must be a number", name, "invalid_type")
    # an int beyond float range is out of bounds, not an error: never convert it first
    if isinstance(value, float) and not math.isfinite(value):
        raise invalid(f"'{name}' must be a finite number", name, "invalid_type")
    if value > high or value < low or (low_open and value == low):
        bracket = "(" if low_open else "["
        shown = value if isinstance(value, float) or abs(value) < 10**12 else "a number that large"
        raise invalid(f"'{name}' must be in {bracket}{low}, {high}], got {shown}", name)
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


def logit_bias(body: dict, rows: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias: token id (as a string) -> a bias in [-100, 100], ids below `rows`."""
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise invalid(f"'logit_bias' must be an object of at most {MAX_LOGIT_BIAS} token ids",
                      "logit_bias", "invalid_type")
    out = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < rows):
            raise invalid(f"'logit_bias' key {key[:20]!r} is not a token id of this model "
                          f"(0..{rows - 1})", "logit_bias")
        out.append((int(key), number(value, key, 0.0, -100.0, 100.0)))
    return tuple(out)


def top_logprobs(body: dict, *, legacy: bool = False) -> int | None:
    """None when no logprobs are asked; else how many alternatives per token."""
    if legacy:  # /v1/completions: logprobs is the count, 0..5
        return integer(body, "logprobs", None, 0, 5)
    if not boolean(body, "logprobs"):
        if body.get("top_logprobs") is not None:
            raise invalid("'top_logprobs' needs logprobs=true", "top_logprobs")
        return None
    return integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)


def top_k(body: dict) -> int | None:
    """vLLM's top_k: None (the model's default), 0 or -1 (off), or k."""
    value = integer(body, "top_k", None, -1, 1 << 20)
    return None if value is None else max(value, 0)


def _content(value: Any, param: str, *, nullable: bool = False) -> str:
    """Message content: a string, or OpenAI's list of text parts."""
    if value is None and nullable:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in value):
        return "".join(p["text"] for p in value)
    raise invalid(f"'{param}' must be a string or a list of text parts", param, "invalid_type")


def _message(msg: Any, i: int) -> dict:
    if not isinstance(msg, dict):
        raise invalid(f"'messages[{i}]' must be an object", f"messages[{i}]", "invalid_type")
    role = msg.get("role")
    if role not in ROLES:
        raise invalid(f"'messages[{i}].role' must be one of {', '.join(ROLES)}; got {role!r}",
                      f"messages[{i}].role")
    calls = msg.get("tool_calls") if role == "assistant" else None
    if "content" not in msg and not calls:
        raise invalid(f"'messages[{i}].content' is required", f"messages[{i}].content",
                      "missing_field")
    out = {"role": "system" if role == "developer" else role,
           "content": _content(msg.get("content"), f"messages[{i}].content", nullable=bool(calls))}
    if calls:
        from .tools import history_calls  # the tool-call shape lives with the tools
        out["tool_calls"] = history_calls(calls, f"messages[{i}].tool_calls")
    if role == "tool":
        call_id = msg.get("tool_call_id")
        if not isinstance(call_id, str):
            raise invalid(f"'messages[{i}].tool_call_id' must be a string",
                          f"messages[{i}].tool_call_id", "invalid_type")
        out["tool_call_id"] = call_id
    return out


def messages(body: dict) -> list[dict]:
    """OpenAI `messages`: non-empty, known roles, text content; `developer` becomes `system`."""
    value = body.get("messages")
    if value is None:
        raise invalid("'messages' is required", "messages", "missing_field")
    if not isinstance(value, list) or not value:
        raise invalid("'messages' must be a non-empty list", "messages",
                      "invalid_type" if not isinstance(value, list) else "invalid_value")
    out = [_message(msg, i) for i, msg in enumerate(value)]
    if out[-1]["role"] == "assistant" and len(out) == 1:
        raise invalid("'messages' must contain a user message", "messages")
    return out
