"""Hypothesis strategies for the JSON Schema subset the daemon publishes (daemon.api.validate's fields).

Types (one, or a list), enum/const, oneOf, numeric bounds, string minLength/pattern \\S, array bounds, object
properties/required/additionalProperties: what /openapi.json uses, nothing more (an unknown keyword
fails loudly, so a new kind of field gets a strategy here before a fuzz run silently skips it).
"""
from __future__ import annotations

from hypothesis import strategies as st

KNOWN = {"type", "enum", "const", "oneOf", "minimum", "maximum", "exclusiveMinimum", "minLength",
         "pattern", "items", "minItems", "maxItems", "properties", "required",
         "additionalProperties", "maxProperties", "description", "default"}
NOTES = {"description", "default"}
TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**6, 10**6)
                    | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(TEXT, inner, max_size=3), max_leaves=6)


def from_schema(schema: dict) -> st.SearchStrategy:
    """Values valid under `schema`."""
    unknown = set(schema) - KNOWN
    if unknown:
        raise ValueError(f"no strategy for schema keywords {sorted(unknown)}")
    if not set(schema) - NOTES:  # {}: any JSON value
        return JSON
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "oneOf" in schema:
        return st.one_of([from_schema(s) for s in schema["oneOf"]])
    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"]: each type with the same keywords
        return st.one_of([from_schema({**schema, "type": k}) for k in kind])
    if kind == "null":
        return st.none()
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        low = schema.get("minimum", schema.get("exclusiveMinimum"))
        return st.floats(low, schema.get("maximum"), exclude_min="exclusiveMinimum" in schema,
                         allow_nan=False) | (st.integers(int(low) + 1, int(schema["maximum"]))
                                             if "maximum" in schema and low is not None
                                             and int(low) + 1 <= schema["maximum"] else st.nothing())
    if kind == "string":
        text = st.text(st.characters(codec="utf-8"), min_size=schema.get("minLength", 0), max_size=40)
        return text.filter(lambda s: s.strip()) if schema.get("pattern") == r"\S" else text
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {})), min_size=schema.get("minItems", 0),
                        max_size=schema.get("maxItems", 4))
    if kind == "object":
        props = schema.get("properties", {})
        required = set(schema.get("required", ()))
        fixed = st.fixed_dictionaries({k: from_schema(props[k]) for k in sorted(required)},
                                      optional={k: from_schema(v) for k, v in props.items()
                                                if k not in required})
        extra_schema = schema.get("additionalProperties", True)
        if extra_schema is False:
            return fixed
        values = JSON if extra_schema is True else from_schema(extra_schema)
        extra = st.dictionaries(TEXT.filter(lambda k: k not in props), values,
                                max_size=min(2, schema.get("maxProperties", 2)))
        return st.tuples(fixed, extra).map(lambda pair: {**pair[1], **pair[0]})
    raise ValueError(f"no strategy for schema {schema}")
