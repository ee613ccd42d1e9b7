"""Constrained decoding: the grammar on its own, then response_format on the tiny model, whose
random words become JSON (matching the schema) only because of the constraint."""
from __future__ import annotations

import json

import pytest

from daemon.model import grammar
from daemon.model.schema import SchemaError, compile_schema

USER = [{"role": "user", "content": "Describe a person."}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "member": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
        "height": {"anyOf": [{"type": "number"}, {"type": "null"}]},
        "address": {"$ref": "#/$defs/Address"},
    },
    "required": ["name", "age"],
    "$defs": {"Address": {"type": "object", "properties": {"city": {"type": "string",
                                                                    "maxLength": 8}}}},
}


def accepts(node, text: str) -> bool:
    state = grammar.feed(grammar.start(node), text.encode())
    return state is not None and grammar.can_end(state)


@pytest.mark.parametrize("text,ok", [
    ('{}', True), ('{"a": [1, -2.5e3, true, null, "x\\u00e9\\n"], "b": {"c": {}}}', True),
    ('{"a":1,}', False), ('{"a" 1}', False), ('[1]', False), ('{"a": 01}', False),
    ('{"a": "\x01"}', False), ('{"a": tru}', False), ('{"a": 1}  ', False), ('{"é": "ü"}', True),
])
def test_json_object_grammar(text, ok):
    assert accepts(grammar.OBJECT, text) is ok


@pytest.mark.parametrize("doc,ok", [
    ({"name": "Ann", "age": 3, "member": True, "tags": ["a"], "height": None,
      "address": {"city": "Oslo"}}, True),
    ({"name": "Ann", "age": 3.5, "member": True, "tags": [], "height": 1, "address": {"city": ""}},
     False),
    ({"name": "Ann", "age": 3, "member": True, "tags": ["c"], "height": 1, "address": {"city": ""}},
     False),
    ({"name": "A" * 13, "age": 3, "member": True, "tags": [], "height": 1, "address": {"city": ""}},
     False),
    ({"age": 3, "name": "Ann", "member": True, "tags": [], "height": 1, "address": {"city": ""}},
     False),  # the schema's order
])
def test_schema_grammar(doc, ok):
    assert accepts(compile_schema(PERSON), json.dumps(doc)) is ok


@pytest.mark.parametrize("schema,keyword", [
    ({"type": "string", "pattern": "^a"}, "pattern"),
    ({"type": "integer", "minimum": 3}, "minimum"),
    ({"anyOf": [{"type": "object"}, {"type": "object", "properties": {"a": {}}}]}, "anyOf"),
    ({"$ref": "#/$defs/A", "$defs": {"A": {"$ref": "#/$defs/A"}}}, "$ref"),
])
def test_unenforceable_schemas_are_refused(schema, keyword):
    with pytest.raises(SchemaError, match=keyword.replace("$", r"\$")):
        compile_schema(schema)


def reply(client, **body) -> dict:
    resp = client.post("/v1/chat/completions", json={"messages": USER, **body})
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()["choices"][0]


def check_person(doc: dict) -> None:
    assert list(doc) == list(PERSON["properties"])
    assert isinstance(doc["name"], str) and len(doc["name"]) <= 12
    assert isinstance(doc["age"], int) and isinstance(doc["member"], bool)
    assert set(doc["tags"]) <= {"a", "b"} and len(doc["tags"]) <= 3
    assert doc["height"] is None or isinstance(doc["height"], (int, float))
    assert list(doc["address"]) == ["city"] and len(doc["address"]["city"]) <= 8


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_json_schema_replies_match_the_schema(app_factory, seed):
    client = app_factory(max_new_tokens=160).test_client()
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    choice = reply(client, max_tokens=160, temperature=1.0, seed=seed, response_format=fmt)
    assert choice["finish_reason"] == "stop"
    check_person(json.loads(choice["message"]["content"]))
    plain = reply(client, max_tokens=40, temperature=1.0, seed=seed)["message"]["content"]
    with pytest.raises(ValueError):  # the same model unconstrained: random words, not JSON
        json.loads(plain)


def test_json_object_replies_parse(client):
    for seed in (1, 2):
        choice = reply(client, max_tokens=24, temperature=1.0, seed=seed,
                       response_format={"type": "json_object"})
        assert choice["finish_reason"] == "stop"
        assert isinstance(json.loads(choice["message"]["content"]), dict)


def test_json_schema_streamed(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "flag", "schema": {
        "type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}}}}}
    resp = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 24, "seed": 2,
                                                     "stream": True, "response_format": fmt})
    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                   for line in resp.get_data(as_text=True).splitlines()
                   if line.startswith("data: {") and '"choices":[{' in line)
    doc = json.loads(text)
    assert list(doc) == ["ok", "n"] and isinstance(doc["ok"], bool) and isinstance(doc["n"], int)


def test_unsupported_schema_is_400(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string",
                                                                          "pattern": "a+"}}}
    resp = client.post("/v1/chat/completions", json={"messages": USER, "response_format": fmt})
    error = resp.get_json()["error"]
    assert resp.status_code == 400 and error["code"] == "unsupported_parameter"
    assert "pattern" in error["message"]


BIG_ENUM = [f"value-{i:05d}" for i in range(50_000)]


def test_a_big_enum_steps_by_bisection_over_one_shared_tuple():
    node = compile_schema({"type": "string", "enum": BIG_ENUM})
    state = grammar.feed(grammar.start(node), b'"value-0')
    frame = state[-1]
    # every state refers to the compiled tuple itself: no per-step copy of 50,000 alternatives
    assert frame[1] is node[1] and frame[3] - frame[2] == 10_000
    allowed = [b for b in range(256) if grammar.step(state, b) is not None]
    assert allowed == list(b"0123456789") and grammar.feed(grammar.start(node), b'"value-5') is None
    assert accepts(node, '"value-49999"') and accepts(node, '"value-00000"')
    assert not accepts(node, '"value-50000"') and not accepts(node, '"value-0000"')


def test_enum_values_that_prefix_each_other():
    node = compile_schema({"enum": ["ab", "a", "abc", 1, 12]})
    for text, ok in [('"a"', True), ('"ab"', True), ('"abc"', True), ('1', True), ('12', True),
                     ('"abcd"', False), ('123', False), ('"b"', False)]:
        assert accepts(node, text) is ok, text


def test_a_50000_value_enum_is_answered_from_the_enum(app_factory):
    client = app_factory(max_new_tokens=80).test_client()
    fmt = {"type": "json_schema", "json_schema": {"name": "pick", "schema": {
        "type": "object", "properties": {"v": {"type": "string", "enum": BIG_ENUM}}}}}
    choice = reply(client, max_tokens=80, temperature=1.0, seed=3, response_format=fmt)
    assert choice["finish_reason"] == "stop"
    assert json.loads(choice["message"]["content"])["v"] in set(BIG_ENUM)
