"""Every request field's fate, declared once per route: honoured, accepted and ignored, or refused.

The routes check bodies against these tables (`check`), the docs list them, and a test holds the
chat table against the openai SDK's own parameter type, so a new SDK field fails CI until sorted.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from . import fields
from .errors import invalid
from .validate import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, ROLES

log = logging.getLogger("edgechat.api")

HONOURED, IGNORED, REFUSED = "honoured", "ignored", "refused"


@dataclass(frozen=True)
class Field:
    """One request field: its fate, what edgechat does with it (docs), and its type (`spec`): checked
    by `check` for an honoured field and published in /openapi.json, one declaration for both."""

    fate: str
    note: str
    # for a refused field: values that change nothing and are therefore let through (n=1, …)
    harmless: Callable[[Any], bool] | None = None
    spec: fields.Field | None = None


def _h(note: str, spec: fields.Field | None = None) -> Field:
    return Field(HONOURED, note, spec=spec)


def _i(note: str) -> Field:
    return Field(IGNORED, note)


def _r(note: str, harmless: Callable[[Any], bool] | None = None,
       spec: fields.Field | None = None) -> Field:
    return Field(REFUSED, note, harmless, spec)


def _cap(cfg) -> int:
    return cfg.max_new_tokens


_PENALTY = fields.Number(-2.0, 2.0, 0.0)
_TOKENS = fields.Integer(1, _cap, cap_of="max_new_tokens")
_TEXT_PARTS = {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}}
_MESSAGES = fields.Described({"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["role"],
    "properties": {"role": {"enum": list(ROLES)},
                   "content": {"oneOf": [{"type": "string"}, _TEXT_PARTS, {"type": "null"}]},
                   "tool_calls": {"type": "array"}, "tool_call_id": {"type": "string"},
                   "name": {"type": "string"}}}})
_TOOLS = fields.Described({"type": "array", "items": {"type": "object"}})
_STREAM_OPTIONS = fields.Body({"include_usage": fields.Boolean(doc="A last chunk with the token "
                                                                   "counts.")}, closed=False)


_SAMPLING = {
    "temperature": _h("0..2; 0 is greedy.", fields.Number(0.0, 2.0, 1.0)),
    "top_p": _h("(0, 1].", fields.Number(0.0, 1.0, 1.0, low_open=True)),
    "seed": _h("Same seed, same request, same reply.", fields.Integer(0, 2**63 - 1)),
    "presence_penalty": _h("-2..2, over the tokens of the reply.", _PENALTY),
    "frequency_penalty": _h("-2..2, over the tokens of the reply.", _PENALTY),
    "logit_bias": _h("Token id -> -100..100 added to its logit; at most 300 entries.",
                     fields.Described({"type": "object", "maxProperties": MAX_LOGIT_BIAS,
                                       "additionalProperties": {"type": "number", "minimum": -100,
                                                                "maximum": 100}})),
    "top_k": _h("Extension (vLLM): keep the k most likely tokens; 0 or -1 = off.",
                fields.Integer(-1, 1 << 20)),
    "min_p": _h("Extension (vLLM): drop tokens below min_p times the top probability.",
                fields.Number(0.0, 1.0, 0.0)),
    "repetition_penalty": _h("Extension (vLLM, transformers): > 0, over prompt and reply; 1 = off.",
                             fields.Number(0.0, 10.0, low_open=True)),
}

CHAT: Mapping[str, Field] = {
    "messages": _h("system, developer (as system), user, assistant (with tool_calls) and tool "
                   "messages; content as a string or text parts.", _MESSAGES),
    "model": _h("The served model's name (GET /v1/models), or absent.",
                fields.Text(allow_empty=True)),
    "max_tokens": _h("At most the server's max_new_tokens.", _TOKENS),
    "max_completion_tokens": _h("Same as max_tokens; wins when both are sent.", _TOKENS),
    "stop": _h("A string or up to 4 strings; the reply ends before the first one.", fields.Stop()),
    "stream": _h("Server-sent events, OpenAI's chunk shape.", fields.Boolean()),
    "stream_options": _h("include_usage: a last chunk with the token counts; needs stream.",
                         _STREAM_OPTIONS),
    "n": _r("One choice per request.", lambda v: v == 1, fields.Described({"const": 1})),
    "logprobs": _h("The chosen tokens' log probabilities, streamed too.", fields.Boolean()),
    "top_logprobs": _h("0..20 alternatives per token; needs logprobs.",
                       fields.Integer(0, MAX_TOP_LOGPROBS)),
    "response_format": _h("text, json_object or json_schema: decoding constrained to valid JSON "
                          "(to the schema's supported keywords for json_schema).",
                          fields.Described({"type": "object", "required": ["type"], "properties": {
                              "type": {"enum": ["text", "json_object", "json_schema"]}}})),
    "tools": _h("Function tools, rendered by the model's chat template; <tool_call> output "
                "becomes tool_calls.", _TOOLS),
    "tool_choice": _h("none, auto, required or a named function.",
                      fields.Described({"oneOf": [{"enum": ["none", "auto", "required"]},
                                                  {"type": "object"}]})),
    "parallel_tool_calls": _h("false: at most one tool call per reply.", fields.Boolean()),
    **_SAMPLING,
    "user": _i("An end-user id for abuse tracking; not used."),
    "metadata": _i("Stored completions only; nothing is stored."),
    "store": _i("Nothing is stored."),
    "service_tier": _i("One tier."),
    "safety_identifier": _i("An end-user id for abuse tracking; not used."),
    "prompt_cache_key": _i("Prefix caching is automatic (the KV pool)."),
    "prompt_cache_retention": _i("Prefix caching is automatic (the KV pool)."),
    "prompt_cache_options": _i("Prefix caching is automatic (the KV pool)."),
    "prediction": _i("A speed hint; the reply is the same without it."),
    "verbosity": _i("A length hint for models trained on it."),
    "functions": _r("Deprecated by OpenAI; send tools."),
    "function_call": _r("Deprecated by OpenAI; send tool_choice."),
    "audio": _r("Text only.", lambda v: v is None),
    "modalities": _r("Text only.", lambda v: v == ["text"]),
    "reasoning_effort": _r("The model does not reason in a separate channel."),
    "web_search_options": _r("No web search."),
    "moderation": _r("No moderation runs here."),
}

COMPLETIONS: Mapping[str, Field] = {
    "prompt": _h("One string (or a list holding one); no chat template is applied.",
                 fields.Described({"oneOf": [{"type": "string", "minLength": 1},
                                             {"type": "array", "minItems": 1, "maxItems": 1,
                                              "items": {"type": "string", "minLength": 1}}]})),
    "model": CHAT["model"],
    "max_tokens": _h("At most the server's max_new_tokens; 16 when absent, as OpenAI.", _TOKENS),
    "stop": CHAT["stop"],
    "stream": CHAT["stream"],
    "stream_options": CHAT["stream_options"],
    "echo": _h("The prompt is prepended to the text.", fields.Boolean()),
    "logprobs": _h("0..5: the legacy logprobs object (tokens, token_logprobs, top_logprobs, "
                   "text_offset).", fields.Integer(0, 5)),
    "n": CHAT["n"],
    "best_of": _r("One candidate per request.", lambda v: v == 1, fields.Described({"const": 1})),
    "suffix": _r("No fill-in-the-middle."),
    "user": CHAT["user"],
    **_SAMPLING,
}

SESSION_MESSAGE: Mapping[str, Field] = {
    "content": _h("The user's message.", fields.Text()),
    "max_tokens": CHAT["max_tokens"],
    "max_completion_tokens": CHAT["max_completion_tokens"],
    "stream": _h("Server-sent events: text deltas, then the turn's summary.", fields.Boolean()),
    "logprobs": CHAT["logprobs"],
    "top_logprobs": CHAT["top_logprobs"],
    **_SAMPLING,
}

SESSION_CREATE: Mapping[str, Field] = {"system": _h("The system prompt, kept for the session's life; "
                                                   "it must leave room for a message.", fields.Text())}

TOKENIZE: Mapping[str, Field] = {
    "model": CHAT["model"],
    "prompt": _h("Text to tokenize as is (vLLM's completion form); at most the model's context.",
                 fields.Text(allow_empty=True)),
    "messages": _h("A conversation, tokenized through the chat template (vLLM's chat form).",
                   _MESSAGES),
    "add_special_tokens": _h("Prompt form: add the tokenizer's special tokens (default true).",
                             fields.Boolean(True)),
    "add_generation_prompt": _h("Chat form: open the assistant turn (default true).",
                                fields.Boolean(True)),
    "tools": _h("Chat form: tools as rendered for the template.", _TOOLS),
    "return_token_strs": _h("Also return each token as text.", fields.Boolean()),
}

DETOKENIZE: Mapping[str, Field] = {
    "model": CHAT["model"],
    "tokens": _h("Token ids to turn back into text.",
                 fields.Described({"type": "array", "items": {"type": "integer", "minimum": 0}})),
}

_logged: set[tuple[str, str]] = set()


def check(body: dict, table: Mapping[str, Field], route: str, cfg: Any) -> None:
    """400 unknown_field for a field the table lacks, 400 unsupported_parameter for a refused one
    (unless null or harmless), 400 naming an honoured field its spec refuses; an ignored one is
    logged once per process at DEBUG."""
    unknown = sorted(set(body) - set(table))
    if unknown:
        shown = [u[:40] for u in unknown[:5]]
        raise invalid(f"unknown field(s): {', '.join(shown)}", shown[0], "unknown_field")
    for name, value in body.items():
        spec = table[name]
        if value is None:
            continue
        if spec.fate == HONOURED:
            if spec.spec is not None:
                spec.spec.check(value, name, cfg)
            continue
        if spec.fate == REFUSED:
            if spec.harmless is not None and spec.harmless(value):
                continue
            raise invalid(f"'{name}' is not supported here: {spec.note}", name, "unsupported_parameter")
        if (route, name) not in _logged:
            _logged.add((route, name))
            log.debug("%s: field %r accepted and ignored (%s)", route, name, spec.note)


def markdown(table: Mapping[str, Field]) -> str:
    """A table's fates as a Markdown table (docs/api.md)."""
    rows = ["| field | fate | what edgechat does |", "| --- | --- | --- |"]
    order = {HONOURED: 0, IGNORED: 1, REFUSED: 2}
    for name, spec in sorted(table.items(), key=lambda kv: (order[kv[1].fate], kv[0])):
        rows.append(f"| `{name}` | {spec.fate} | {spec.note} |")
    return "\n".join(rows) + "\n"


def document() -> str:
    """The fate tables of docs/api.md."""
    parts = []
    for title, table in (("POST /v1/chat/completions", CHAT), ("POST /v1/completions", COMPLETIONS),
                         ("POST /v1/sessions/{id}/messages", SESSION_MESSAGE)):
        parts.append(f"### {title}\n\n{markdown(table)}")
    return "\n".join(parts)


if __name__ == "__main__":
    print(document(), end="")
