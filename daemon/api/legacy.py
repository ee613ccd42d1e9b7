"""The legacy text completion route, POST /v1/completions (vLLM, llama.cpp and Ollama serve it):
one prompt, no chat template."""
from __future__ import annotations

import dataclasses
import uuid
from contextlib import ExitStack

from flask import Blueprint, jsonify

from . import logprobs, params, turns, validate
from .auth import protect
from .completions import stream_options, usage
from .errors import invalid
from .openapi import documented

bp = protect(Blueprint("legacy", __name__, url_prefix="/v1"))
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this route


def _prompt(body: dict) -> str:
    value = body.get("prompt")
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str) or not value:
        raise invalid("'prompt' must be a non-empty string (or a list holding one)", "prompt",
                      "missing_field" if value is None else "invalid_type")
    return value


@bp.post("/completions")
@documented(table=params.COMPLETIONS, required=("prompt",), auth="api_key",
            produces=("application/json", "text/event-stream"))
def completions():
    """Continue the prompt as plain text."""
    body, services = turns.read_request(params.COMPLETIONS, "completions")
    engine = services.engine
    prompt = _prompt(body)
    validate.integer(body, "n", 1, 1, 1)
    validate.integer(body, "best_of", 1, 1, 1)
    echo = validate.boolean(body, "echo")
    sampling = turns.sampling_params(body, allow_stop=True, legacy=True,
                                     default_max=DEFAULT_MAX_TOKENS)
    if echo and sampling.top_logprobs is not None:
        raise invalid("logprobs of the echoed prompt are not computed", "echo", "unsupported_parameter")
    sampling = dataclasses.replace(sampling, raw_prompt=True)
    streaming = validate.boolean(body, "stream")
    include_usage = stream_options(body, streaming)
    turns.check_context(turns.count_text(prompt), sampling, "prompt")

    gen = turns.start(prompt, sampling)
    tokenizer, asked = engine.tokenizer, sampling.top_logprobs is not None
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": turns.now(),
            "model": engine.model_id}
    lead = prompt if echo else ""
    if not streaming:
        text = turns.run_stateless(gen, services)
        lp = logprobs.legacy(tokenizer, gen.take_logprobs(final=True)) if asked else None
        return jsonify({**base, "usage": usage(gen.stats), "choices": [
            {"index": 0, "text": lead + text, "logprobs": lp, "finish_reason": gen.stats.finish_reason}]})

    offset = {"chars": 0}

    def event(text: str, finish: str | None = None, entries: list | None = None) -> dict:
        lp = logprobs.legacy(tokenizer, entries or [], offset["chars"]) if asked else None
        offset["chars"] += len(text)
        return {**base, "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": finish}]}

    def tail(g) -> list[dict]:
        turns.observe(g, services, turn=1, history_messages=None)
        rest = g.take_logprobs(final=True) if asked else None
        events = [event("", None, rest)] if rest else []
        events.append(event("", g.stats.finish_reason))
        if include_usage:
            events.append({**base, "choices": [], "usage": usage(g.stats)})
        return events

    head = [event(lead)] if lead else []
    return turns.stream(gen, ExitStack(), turn=1, head=head,
                        delta=lambda piece: [event(piece, None, gen.take_logprobs() if asked else None)],
                        tail=tail)
