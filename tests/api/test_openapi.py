"""/openapi.json: every route, every field of every fate table, and schemas that agree with the checks."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from jsonschema import Draft202012Validator

from daemon.api import fields, params
from daemon.api.openapi import body_schema
from daemon.services import get_services
from support.schema_strategies import JSON, from_schema

# route -> (fate table, required fields): the JSON bodies whose checks and schema must agree
ROUTES = {"/v1/chat/completions": (params.CHAT, ("messages",)),
          "/v1/completions": (params.COMPLETIONS, ("prompt",)),
          "/v1/sessions": (params.SESSION_CREATE, ()),
          "/v1/sessions/{sid}/messages": (params.SESSION_MESSAGE, ("content",)),
          "/tokenize": (params.TOKENIZE, ())}
# what the complex fields (checked by code, described by their spec) are set to when the generated
# part of a body must be accepted
FIXED = {"messages": [{"role": "user", "content": "hi"}], "prompt": "once upon a time",
         "content": "hi", "model": None}  # any other model name is a 404: not a matter of shape
FAST = settings(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@pytest.fixture
def admin_app(app_factory):
    """Every blueprint registered (the admin one needs a key); replies of one token."""
    return app_factory(admin_key="admin", max_new_tokens=1)


@pytest.fixture
def post(admin_app):
    """POST a JSON body to a route ({sid} filled with a fresh session); the status."""
    client = admin_app.test_client()

    def send(route: str, body) -> int:
        if "{sid}" in route:
            route = route.format(sid=client.post("/v1/sessions", json={}).get_json()["id"])
        return client.post(route, json=body).status_code
    return send


def test_every_route_is_documented(admin_app):
    doc = admin_app.test_client().get("/openapi.json").get_json()
    assert doc["openapi"].startswith("3.1")
    listed = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    for rule in admin_app.url_map.iter_rules():
        path = rule.rule.replace("<path:", "<").replace("<", "{").replace(">", "}")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (path, method.lower()) in listed, f"{method} {rule.rule} missing from /openapi.json"
    for ops in doc["paths"].values():
        for op in ops.values():
            assert op["summary"] and "default" in op["responses"]
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            if body:
                Draft202012Validator.check_schema(body["schema"])


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_every_field_of_the_fate_table_is_published(admin_app, route):
    doc = admin_app.test_client().get("/openapi.json").get_json()
    table, required = ROUTES[route]
    schema = doc["paths"][route.replace("{sid}", "{session_id}")]["post"]["requestBody"]["content"][
        "application/json"]["schema"]
    assert set(schema["properties"]) == set(table) and schema.get("required", []) == list(required)
    assert schema["additionalProperties"] is False  # an unknown field is a 400 unknown_field


def test_caps_come_from_the_configuration(admin_app):
    doc = admin_app.test_client().get("/openapi.json").get_json()
    props = doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]["properties"]
    assert props["max_tokens"]["maximum"] == 1 == get_services(admin_app).config.max_new_tokens


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_what_the_schema_refuses_the_route_refuses(admin_app, post, route):
    table, required = ROUTES[route]
    validator = Draft202012Validator(body_schema(table, required, get_services(admin_app).config))
    keys = st.sampled_from(sorted(table) + ["extra"])

    @settings(FAST, max_examples=120)
    @given(st.dictionaries(keys, JSON, max_size=4))
    def check(body):
        if not validator.is_valid(body):
            assert 400 <= post(route, body) < 500, body
    check()


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_what_the_schema_allows_the_route_accepts(admin_app, post, route):
    """Over the fields whose spec checks them (the others are set to a known good value)."""
    table, required = ROUTES[route]
    checked = {name: f for name, f in table.items()
               if f.fate == params.HONOURED and f.spec is not None
               and not isinstance(f.spec, fields.Described) and name != "model"}
    cfg = get_services(admin_app).config
    schema = body_schema(checked, tuple(r for r in required if r in checked), cfg)
    fixed = {k: v for k, v in FIXED.items() if k in table and k not in checked}

    @settings(FAST, max_examples=40)
    @given(from_schema(schema))
    def check(body):
        body = {**body, **fixed}
        # the rules across fields that a per-field schema cannot state
        if body.get("stream_options") is not None:
            body["stream"] = True
        if body.get("top_logprobs") is not None and route != "/v1/completions":
            body["logprobs"] = True
        if route == "/tokenize" and body.get("prompt") is not None:
            body["messages"] = None  # one of prompt and messages
        if route == "/v1/completions" and body.get("echo"):
            body["logprobs"] = None  # the echoed prompt's logprobs are not computed
        assert post(route, body) in (200, 201), body
    check()
