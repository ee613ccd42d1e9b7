"""Field types that both check a value and describe it as JSON Schema, for request fields and queries.

A route's body fields sit in its fate table (`daemon.api.params`), each with one of these as its
`spec`: `params.check` runs the spec, and `daemon.api.openapi` publishes the same spec in
/openapi.json, so the check and the document cannot drift apart. `Described` is for the few fields
whose shape needs code (messages, tools): the route checks them and the spec only describes them.
Caps that come from the configuration (max_new_tokens) are callables of the Config, resolved at
check and at publish time alike.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import invalid

MAX_STOP = 4
Bound = int | float | Callable[[Any], int | float]


def _resolve(bound: Bound | None, cfg: Any):
    return bound(cfg) if callable(bound) else bound


class Field:
    """One value: `check` returns it validated (or raises a 400 naming `param`); `schema` describes it."""

    default: Any = None
    doc: str = ""

    def check(self, value: Any, param: str, cfg: Any) -> Any:
        raise NotImplementedError

    def schema(self, cfg: Any) -> dict:
        raise NotImplementedError

    def described(self, cfg: Any) -> dict:
        """The JSON Schema with its description and default."""
        out = self.schema(cfg)
        if self.doc:
            out["description"] = self.doc
        if self.default is not None:
            out["default"] = self.default
        return out

    def from_text(self, text: str, param: str, cfg: Any) -> Any:
        """A query-string value (a string) as this field's type."""
        return self.check(text, param, cfg)


@dataclass
class Number(Field):
    """A JSON number within [low, high], or (low, high] when low_open."""

    low: float
    high: float
    default: float | None = None
    low_open: bool = False
    doc: str = ""

    def check(self, value, param, cfg):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise invalid(f"'{param}' must be a number", param, "invalid_type")
        # an int beyond float range is out of bounds, not an error: never convert it first
        if isinstance(value, float) and not math.isfinite(value):
            raise invalid(f"'{param}' must be a finite number", param, "invalid_type")
        if value > self.high or value < self.low or (self.low_open and value == self.low):
            bracket = "(" if self.low_open else "["
            shown = value if isinstance(value, float) or abs(value) < 10**12 else "a number that large"
            raise invalid(f"'{param}' must be in {bracket}{self.low}, {self.high}], got {shown}", param)
        return float(value)

    def schema(self, cfg):
        lower = {"exclusiveMinimum": self.low} if self.low_open else {"minimum": self.low}
        return {"type": "number", **lower, "maximum": self.high}


@dataclass
class Integer(Field):
    """A JSON integer within [low, high]; high may depend on the configuration."""

    low: int
    high: Bound
    default: int | None = None
    doc: str = ""
    cap_of: str = ""  # the setting `high` comes from, named in the error

    def check(self, value, param, cfg):
        if isinstance(value, bool) or not isinstance(value, int):
            raise invalid(f"'{param}' must be an integer", param, "invalid_type")
        high = _resolve(self.high, cfg)
        if self.cap_of and value > high:
            raise invalid(f"'{param}' must be <= {high} (the server's {self.cap_of})", param)
        if not self.low <= value <= high:
            shown = value if abs(value) < 10**30 else "an integer that large"
            raise invalid(f"'{param}' must be in [{self.low}, {high}], got {shown}", param)
        return value

    def schema(self, cfg):
        return {"type": "integer", "minimum": self.low, "maximum": _resolve(self.high, cfg)}

    def from_text(self, text, param, cfg):
        try:
            value = int(text)
        except ValueError:
            raise invalid(f"'{param}' must be an integer in [{self.low}, "
                          f"{_resolve(self.high, cfg)}], got {text[:40]!r}", param) from None
        return self.check(value, param, cfg)


@dataclass
class Boolean(Field):
    """A JSON boolean (in a query string: true/false, 1/0, yes/no)."""

    default: bool | None = False
    doc: str = ""

    def check(self, value, param, cfg):
        if not isinstance(value, bool):
            raise invalid(f"'{param}' must be a boolean", param, "invalid_type")
        return value

    def schema(self, cfg):
        return {"type": "boolean"}

    def from_text(self, text, param, cfg):
        words = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
        if text.lower() not in words:
            raise invalid(f"{param} must be true or false, got {text[:40]!r}", param)
        return words[text.lower()]


@dataclass
class Text(Field):
    """A JSON string, non-empty (not only whitespace) unless allow_empty; one of `choices` if given."""

    allow_empty: bool = False
    choices: tuple[str, ...] = ()
    default: str | None = None
    doc: str = ""

    def check(self, value, param, cfg):
        if not isinstance(value, str):
            raise invalid(f"'{param}' must be a string", param, "invalid_type")
        if self.choices and value not in self.choices:
            raise invalid(f"'{param}' must be one of {', '.join(self.choices)}, got {value[:40]!r}",
                          param)
        if not self.allow_empty and not value.strip():
            raise invalid(f"'{param}' must not be empty", param)
        return value

    def schema(self, cfg):
        if self.choices:
            return {"type": "string", "enum": list(self.choices)}
        return {"type": "string"} if self.allow_empty else {"type": "string", "pattern": r"\S"}


@dataclass
class Stop(Field):
    """OpenAI's `stop`: a string or a list of up to MAX_STOP non-empty strings; a tuple either way."""

    doc: str = "Text that ends the reply where it appears (not included)."

    def check(self, value, param, cfg):
        items = [value] if isinstance(value, str) else value
        if (not isinstance(items, list) or len(items) > MAX_STOP
                or not all(isinstance(s, str) and s for s in items)):
            raise invalid(f"'{param}' must be a string or a list of at most {MAX_STOP} non-empty "
                          "strings", param, "invalid_type")
        return tuple(items)

    def schema(self, cfg):
        word = {"type": "string", "minLength": 1}
        return {"oneOf": [word, {"type": "array", "items": word, "maxItems": MAX_STOP}]}


@dataclass
class Described(Field):
    """A field whose value the route checks itself (its shape needs code): here only its schema."""

    shape: dict | Callable[[Any], dict] = field(default_factory=dict)
    doc: str = ""

    def check(self, value, param, cfg):
        return value

    def schema(self, cfg):
        return dict(self.shape(cfg) if callable(self.shape) else self.shape)


@dataclass
class Body(Field):
    """A JSON object of named fields; `closed` refuses unknown ones (open bodies ignore them)."""

    fields: dict[str, Field]
    required: tuple[str, ...] = ()
    closed: bool = True
    doc: str = ""
    default: Any = None

    def check(self, value, param, cfg):
        if not isinstance(value, dict):
            raise invalid(f"'{param}' must be an object", param, "invalid_type")
        return self._values(value, f"{param}.", cfg)

    def parse(self, body: dict, cfg: Any) -> dict:
        """Every declared field of a request body, validated, defaults filled in."""
        return self._values(body, "", cfg)

    def _values(self, body: dict, prefix: str, cfg: Any) -> dict:
        unknown = sorted(set(body) - set(self.fields)) if self.closed else []
        if unknown:
            raise invalid(f"unknown field(s): {', '.join(u[:40] for u in unknown[:5])}",
                          prefix + unknown[0][:40], "unknown_field")
        out = {}
        for name, spec in self.fields.items():
            value = body.get(name)
            if value is None:
                if name in self.required:
                    raise invalid(f"'{prefix}{name}' is required", prefix + name, "missing_field")
                out[name] = spec.default
            else:
                out[name] = spec.check(value, prefix + name, cfg)
        return out

    def schema(self, cfg):
        props = {n: f.described(cfg) if n in self.required else nullable(f.described(cfg))
                 for n, f in self.fields.items()}
        out = {"type": "object", "properties": props, "additionalProperties": not self.closed}
        if self.required:
            out["required"] = list(self.required)
        return out


def nullable(schema: dict) -> dict:
    """An optional field also takes JSON null, meaning absent (OpenAI clients send it for defaults)."""
    out = dict(schema)
    if "const" in out:
        out = {"oneOf": [{"const": out.pop("const")}, {"type": "null"}], **out}
    elif "enum" in out:
        out["enum"] = [*out["enum"], None]
    elif "oneOf" in out:
        out["oneOf"] = [*out["oneOf"], {"type": "null"}]
    elif isinstance(out.get("type"), str) and out["type"] != "null":
        out["type"] = [out["type"], "null"]
    return out  # a schema without a type ({}: anything) takes null already


@dataclass
class Query:
    """A route's query-string parameters: parsed from request.args, published as OpenAPI parameters."""

    fields: dict[str, Field] = field(default_factory=dict)

    def parse(self, args, cfg: Any) -> dict:
        """Each declared parameter, converted and validated; absent ones take their defaults."""
        return {name: spec.default if args.get(name) is None else spec.from_text(args[name], name, cfg)
                for name, spec in self.fields.items()}
