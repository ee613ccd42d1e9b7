"""OpenAI-compatible, stateless chat: POST /v1/chat/completions, GET /v1/models and /v1/models/{id}."""
from __future__ import annotations

import dataclasses
import uuid
from contextlib import ExitStack

from flask import Blueprint, jsonify

from ..services import get_services
from . import logprobs, params, structured, tools, turns, validate
from .auth import protect
from .errors import ApiError, invalid
from .openapi import documented

bp = protect(Blueprint("chat", __name__, url_prefix="/v1"))
KEYED = "api_key"


def usage(stats) -> dict:
    """OpenAI's usage object for finished generation stats."""
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens}


def _card() -> dict:
    engine = get_services().engine
    return {"id": engine.model_id, "object": "model", "created": 0, "owned_by": "edgechat",
            "max_model_len": engine.context_length}


@bp.get("/models")
@documented(auth=KEYED)
def models():
    """The one model this worker serves."""
    return jsonify({"object": "list", "data": [_card()]})


@bp.get("/models/<path:model_id>")
@documented(auth=KEYED)
def model(model_id: str):
    """The model card, with its context length (max_model_len, as vLLM)."""
    card = _card()
    if model_id not in (card["id"], get_services().config.model):
        raise ApiError(404, f"model {model_id[:200]!r} is not served here; GET /v1/models lists "
                            f"{card['id']!r}", code="model_not_found", param="model")
    return jsonify(card)


def stream_options(body: dict, streaming: bool) -> bool:
    """include_usage from stream_options (which needs stream=true)."""
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not streaming):
        raise invalid("'stream_options' must be an object and needs stream=true", "stream_options")
    return validate.boolean(options or {}, "include_usage")


@bp.post("/chat/completions")
@documented(table=params.CHAT, required=("messages",), auth=KEYED,
            produces=("application/json", "text/event-stream"))
def completions():
    """Generate a reply to the given messages; nothing is stored server-side."""
    body, services = turns.read_request(params.CHAT, "chat.completions")
    engine = services.engine
    messages = validate.messages(body)
    validate.integer(body, "n", 1, 1, 1)
    wanted = tools.request(body, engine.tokenizer.chat_template)
    sampling = turns.sampling_params(body, allow_stop=True)
    constraint = structured.response_format(body)
    if wanted is not None and wanted.forced is not None:
        if constraint is not None:
            raise invalid("response_format and a forced tool call cannot both shape the reply",
                          "response_format", "unsupported_parameter")
        constraint = structured.tool_call(wanted.tools, wanted.forced or None)
    if constraint is not None:
        sampling = dataclasses.replace(sampling, constraint=constraint)
    rendered = wanted.rendered if wanted is not None else None
    streaming = validate.boolean(body, "stream")
    include_usage = stream_options(body, streaming)
    turns.check_context(turns.count_prompt(messages, rendered), sampling)

    gen = turns.start(messages, sampling, rendered)
    tokenizer, asked = engine.tokenizer, sampling.top_logprobs is not None
    parse = wanted if rendered else None
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", turns.now()
    base = {"id": cid, "created": created, "model": engine.model_id}

    def finish_reason(stats, calls: list) -> str:
        return "tool_calls" if calls and stats.finish_reason == "stop" else stats.finish_reason

    if not streaming:
        text = turns.run_stateless(gen, services)
        content, calls = tools.split(text, parse) if parse else (text, [])
        message = {"role": "assistant", "content": content or (None if calls else "")}
        if calls:
            message["tool_calls"] = calls
        choice = {"index": 0, "finish_reason": finish_reason(gen.stats, calls), "message": message,
                  "logprobs": logprobs.chat(tokenizer, gen.take_logprobs(final=True)) if asked else None}
        return jsonify({**base, "object": "chat.completion", "usage": usage(gen.stats),
                        "choices": [choice]})

    chunk = {**base, "object": "chat.completion.chunk"}
    splitter = tools.StreamSplitter(parse) if parse else None

    def event(delta: dict, finish: str | None = None, lp: list | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        if asked:
            choice["logprobs"] = logprobs.chat(tokenizer, lp or [])
        return {**chunk, "choices": [choice]}

    def pieces(text: str, calls: list, lp: list | None) -> list[dict]:
        out = []
        if text or (lp and not calls):
            out.append(event({"content": text}, lp=lp))
        for call in calls:
            index = splitter.calls.index(call)
            out.append(event({"tool_calls": [{"index": index, **call}]}))
        return out

    def delta(piece: str) -> list[dict]:
        lp = gen.take_logprobs() if asked else None
        text, calls = splitter.feed(piece) if splitter else (piece, [])
        return pieces(text, calls, lp)

    def tail(g) -> list[dict]:
        turns.observe(g, services, turn=1, history_messages=None)
        rest = g.take_logprobs(final=True) if asked else None
        events = pieces(splitter.finish() if splitter else "", [], rest)
        calls = splitter.calls if splitter else []
        events.append(event({}, finish_reason(g.stats, calls)))
        if include_usage:
            events.append({**chunk, "choices": [], "usage": usage(g.stats)})
        return events

    head = [event({"role": "assistant", "content": ""})]
    return turns.stream(gen, ExitStack(), turn=1, head=head, delta=delta, tail=tail)
