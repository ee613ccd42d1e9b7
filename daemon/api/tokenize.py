"""POST /tokenize and POST /detokenize in vLLM's shapes, behind the same keys and size limits as /v1."""
from __future__ import annotations

from flask import Blueprint, jsonify

from ..services import get_services
from . import params, tools, turns, validate
from .auth import protect
from .errors import invalid
from .openapi import documented

bp = protect(Blueprint("tokenize", __name__))


def _fits(tokens: int, param: str) -> None:
    """What is tokenized is bounded like a prompt: past the model's context, 400 without the ids
    (which no request could use), and the tokenizer has read only what the count needed."""
    context = get_services().engine.context_length
    if tokens > context:
        get_services().recorder.on_reject("prompt_too_long")
        raise invalid(f"more than the model's context ({context} tokens) to tokenize", param,
                      "context_length_exceeded")


@bp.post("/tokenize")
@documented(table=params.TOKENIZE, auth="api_key")
def tokenize():
    """Token ids of a prompt (as is) or of messages (through the chat template)."""
    body = validate.json_body()
    params.check(body, params.TOKENIZE, "tokenize", get_services().config)
    turns.check_model(body)
    engine = get_services().engine
    if (body.get("prompt") is None) == (body.get("messages") is None):  # null is absent, as anywhere
        raise invalid("send exactly one of 'prompt' and 'messages'", "prompt", "missing_field")
    wanted = tools.request(body, engine.tokenizer.chat_template)  # checked in both forms, used by messages
    if body.get("prompt") is not None:
        prompt = validate.text(body, "prompt", required=True, allow_empty=True)
        special = validate.boolean(body, "add_special_tokens", True)
        _fits(turns.count_text(prompt), "prompt")
        ids = engine.tokenizer(prompt, add_special_tokens=special)["input_ids"]
    else:
        messages = validate.messages(body)
        rendered = wanted.rendered if wanted else None
        _fits(turns.count_prompt(messages, rendered), "messages")
        ids = engine.encode(messages, rendered,
                            generation_prompt=validate.boolean(body, "add_generation_prompt", True))
    out = {"count": len(ids), "max_model_len": engine.context_length, "tokens": ids}
    if validate.boolean(body, "return_token_strs"):
        out["token_strs"] = engine.tokenizer.convert_ids_to_tokens(ids)
    return jsonify(out)


@bp.post("/detokenize")
@documented(table=params.DETOKENIZE, required=("tokens",), auth="api_key")
def detokenize():
    """The text of token ids."""
    body = validate.json_body()
    params.check(body, params.DETOKENIZE, "detokenize", get_services().config)
    turns.check_model(body)
    engine = get_services().engine
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                            and 0 <= i < len(engine.tokenizer) for i in ids):
        raise invalid(f"'tokens' must be a list of token ids (0..{len(engine.tokenizer) - 1})",
                      "tokens", "invalid_type" if not isinstance(ids, list) else "invalid_value")
    return jsonify({"prompt": engine.tokenizer.decode(ids)})
