"""JSON Schema (the subset constrained decoding can enforce) compiled to grammar nodes.

Enforced: type (one or a list), properties (all emitted, in order), required, additionalProperties,
items, minItems, maxItems, minLength, maxLength, enum, const, anyOf/oneOf whose branches start with
different characters, $ref into $defs/definitions (not recursive). Annotations (title, description,
default, examples, …) are ignored. Any other keyword raises SchemaError naming it: the caller refuses
the request rather than promise a shape it would not enforce.
"""
from __future__ import annotations

import json
from typing import Any

from .grammar import ANY, first_bytes, literals

ANNOTATIONS = frozenset(("title", "description", "default", "examples", "$schema", "$comment",
                         "$id", "deprecated", "readOnly", "writeOnly", "format", "$defs",
                         "definitions", "strict"))
_TYPE_KEYWORDS = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "minItems", "maxItems"},
    "string": {"minLength", "maxLength"},
    "integer": set(), "number": set(), "boolean": set(), "null": set(),
}
MAX_REF_DEPTH = 8


class SchemaError(ValueError):
    """The schema uses what decoding cannot enforce; the message names the keyword and where."""


def compile_schema(schema: Any) -> tuple:
    """The grammar node for one value matching `schema`."""
    if not isinstance(schema, dict):
        raise SchemaError("the schema must be a JSON object")
    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    return _node(schema, defs, "schema", 0)


def _literal(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _node(schema: Any, defs: dict, where: str, refs: int) -> tuple:
    if schema is True or schema == {}:
        return ANY
    if not isinstance(schema, dict):
        raise SchemaError(f"{where}: a schema must be an object")
    if "$ref" in schema:
        ref = schema["$ref"]
        name = ref.rsplit("/", 1)[-1] if isinstance(ref, str) else None
        if (not isinstance(ref, str) or not ref.startswith(("#/$defs/", "#/definitions/"))
                or name not in defs):
            raise SchemaError(f"{where}.$ref: only local #/$defs/… references are supported")
        if refs >= MAX_REF_DEPTH:
            raise SchemaError(f"{where}.$ref: references nest deeper than {MAX_REF_DEPTH} (recursive?)")
        return _node(defs[name], defs, f"{where}.$ref", refs + 1)
    if "const" in schema:
        return literals((_literal(schema["const"]),))
    if "enum" in schema:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise SchemaError(f"{where}.enum: must be a non-empty list")
        return literals(_literal(v) for v in values)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = schema[key]
            if not isinstance(options, list) or not options:
                raise SchemaError(f"{where}.{key}: must be a non-empty list")
            return _branches([_node(s, defs, f"{where}.{key}[{i}]", refs)
                              for i, s in enumerate(options)], f"{where}.{key}")
    kind = schema.get("type")
    if isinstance(kind, list):
        return _branches([_node({**schema, "type": t}, defs, where, refs) for t in kind],
                         f"{where}.type")
    if kind is None:
        kind = "object" if "properties" in schema else None
    if kind is None:
        unknown = set(schema) - ANNOTATIONS
        if unknown:
            raise SchemaError(f"{where}: keyword {sorted(unknown)[0]!r} without a type is not supported")
        return ANY
    if kind not in _TYPE_KEYWORDS:
        raise SchemaError(f"{where}.type: unknown type {kind!r}")
    unknown = set(schema) - ANNOTATIONS - {"type"} - _TYPE_KEYWORDS[kind]
    if unknown:
        raise SchemaError(f"{where}: keyword {sorted(unknown)[0]!r} is not supported for {kind}")
    return _typed(kind, schema, defs, where, refs)


def _typed(kind: str, schema: dict, defs: dict, where: str, refs: int) -> tuple:
    if kind == "object":
        props = schema.get("properties")
        if not props:
            return ("freeobj",) if schema.get("additionalProperties", True) is not False \
                else literals((b"{}",))
        if not isinstance(props, dict):
            raise SchemaError(f"{where}.properties: must be an object")
        return ("object", tuple((_literal(k) + b":", _node(v, defs, f"{where}.properties.{k}", refs))
                                for k, v in props.items()))
    if kind == "array":
        low, high = _bound(schema, "minItems", where, 0), _bound(schema, "maxItems", where, None)
        return ("array", _node(schema.get("items", True), defs, f"{where}.items", refs), low, high)
    if kind == "string":
        return ("string", _bound(schema, "minLength", where, 0), _bound(schema, "maxLength", where, None))
    if kind in ("integer", "number"):
        return ("number", kind == "integer")
    if kind == "boolean":
        return literals((b"true", b"false"))
    return literals((b"null",))


def _bound(schema: dict, key: str, where: str, default: int | None) -> int | None:
    value = schema.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise SchemaError(f"{where}.{key}: must be a non-negative integer")
    return value


def _branches(nodes: list[tuple], where: str) -> tuple:
    """One node for alternatives: literals merge; others must start with different bytes."""
    if len(nodes) == 1:
        return nodes[0]
    if all(n[0] == "alts" for n in nodes):
        return literals(a for n in nodes for a in n[1])
    seen: set[int] = set()
    for node in nodes:
        first = first_bytes(node)
        if seen & first:
            raise SchemaError(f"{where}: alternatives that start alike (e.g. two objects) are not "
                              "supported")
        seen |= first
    return ("anyof", tuple(nodes))
