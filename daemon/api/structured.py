"""response_format and forced tool calls as decoding constraints (model/grammar.py, model/schema.py)."""
from __future__ import annotations

from typing import Callable

from ..model.constrain import GrammarConstraint
from ..model import grammar
from ..model.schema import SchemaError, compile_schema
from ..services import get_services
from .errors import invalid

FORMATS = ("text", "json_object", "json_schema")


def _factory(state: grammar.State) -> Callable[[], GrammarConstraint]:
    engine = get_services().engine
    table = engine.token_table()
    return lambda: GrammarConstraint(table, engine.eos_ids, state)


def response_format(body: dict) -> Callable[[], GrammarConstraint] | None:
    """The constraint `response_format` asks for, or None for plain text."""
    value = body.get("response_format")
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in FORMATS:
        raise invalid(f"'response_format.type' must be one of {', '.join(FORMATS)}",
                      "response_format.type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _factory(grammar.start(grammar.OBJECT))
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise invalid("'response_format.json_schema' must be an object with a name and a schema",
                      "response_format.json_schema", "invalid_type")
    try:
        node = compile_schema(spec.get("schema", {}))
    except SchemaError as err:
        raise invalid(f"'response_format.json_schema': {err}", "response_format.json_schema.schema",
                      "unsupported_parameter") from None
    return _factory(grammar.start(node))


def tool_call(tools: list[dict], only: str | None) -> Callable[[], GrammarConstraint]:
    """A constraint forcing one <tool_call> block as Qwen2.5's template spells it, calling `only`
    or any of the tools, with arguments matching the tool's parameters schema."""
    heads = []
    for tool in tools:
        fn = tool["function"]
        if only is not None and fn["name"] != only:
            continue
        try:
            args = compile_schema(fn.get("parameters") or {"type": "object"})
        except SchemaError as err:
            raise invalid(f"tool {fn['name']!r}: {err}; tool_choice 'required' or a named function "
                          "needs parameters decoding can enforce", "tool_choice",
                          "unsupported_parameter") from None
        heads.append((f'"{fn["name"]}", "arguments": '.encode("utf-8"), args))
    node = ("choice", tuple(heads))
    return _factory(grammar.start(node, prefix=b'<tool_call>\n{"name": ', suffix=b"}\n</tool_call>"))
