"""OpenAI-compatible, stateless chat: POST /v1/chat/completions and GET /v1/models."""
from __future__ import annotations

import uuid
from contextlib import ExitStack

from flask import Blueprint, jsonify

from ..services import get_services
from . import turns, validate
from .auth import protect
from .errors import ApiError, invalid

bp = protect(Blueprint("chat", __name__, url_prefix="/v1"))


def _usage(stats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens}


@bp.get("/models")
def models():
    """The one model this worker serves."""
    engine = get_services().engine
    return jsonify({"object": "list", "data": [{"id": engine.model_id, "object": "model",
                                                "created": 0, "owned_by": "edgechat"}]})


@bp.post("/chat/completions")
def completions():
    """Generate a reply to the given messages; nothing is stored server-side."""
    body = validate.json_body()
    engine = get_services().engine
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("'model' must be a string", "model", "invalid_type")
    if model not in (None, "", engine.model_id):
        raise ApiError(404, f"model {model!r} is not served here; GET /v1/models lists "
                            f"{engine.model_id!r}", code="model_not_found", param="model")
    messages = validate.messages(body)
    n = validate.integer(body, "n", 1, 1, 1)
    del n  # only n=1 is supported; validated above
    params = turns.sampling_params(body, allow_stop=True)
    streaming = validate.boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not streaming):
        raise invalid("'stream_options' must be an object and needs stream=true", "stream_options")
    include_usage = validate.boolean(options or {}, "include_usage")
    turns.check_context(engine.count_tokens(messages), params)

    gen = turns.start(messages, params)
    services = get_services()
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", turns.now()
    base = {"id": cid, "created": created, "model": engine.model_id}
    if not streaming:
        try:
            text = turns.drain(gen)
        finally:
            gen.close()
            turns.observe(gen, services, turn=1, history_messages=None)
        return jsonify({**base, "object": "chat.completion", "usage": _usage(gen.stats),
                        "choices": [{"index": 0, "finish_reason": gen.stats.finish_reason,
                                     "message": {"role": "assistant", "content": text}}]})

    chunk = {**base, "object": "chat.completion.chunk"}

    def delta(piece: str) -> dict:
        return {**chunk, "choices": [{"index": 0, "delta": {"content": piece},
                                      "finish_reason": None}]}

    def tail(g) -> list[dict]:
        turns.observe(g, services, turn=1, history_messages=None)
        events = [{**chunk, "choices": [{"index": 0, "delta": {},
                                         "finish_reason": g.stats.finish_reason}]}]
        if include_usage:
            events.append({**chunk, "choices": [], "usage": _usage(g.stats)})
        return events

    head = [{**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                   "finish_reason": None}]}]
    return turns.stream(gen, ExitStack(), turn=1, head=head, delta=delta, tail=tail)
