"""Every request field has a fate: the tables against the openai SDK, and each fate's behaviour."""
from __future__ import annotations

import typing

import pytest

from daemon.api import params
from support import REPO_ROOT

USER = [{"role": "user", "content": "hi"}]


def _sdk_fields(module) -> set[str]:
    """Every field of the SDK's create-parameters type (stream comes from its subclasses)."""
    fields = set(typing.get_type_hints(module.CompletionCreateParamsBase))
    return fields | set(typing.get_type_hints(module.CompletionCreateParamsStreaming))


def test_every_chat_field_of_the_sdk_has_a_fate():
    from openai.types.chat import completion_create_params
    sdk = _sdk_fields(completion_create_params)
    missing = sdk - set(params.CHAT)
    assert not missing, f"new openai SDK fields: sort each into daemon/api/params.py CHAT: {missing}"
    extensions = set(params.CHAT) - sdk
    assert extensions == {"top_k", "min_p", "repetition_penalty"}


def test_every_legacy_completions_field_of_the_sdk_has_a_fate():
    from openai.types import completion_create_params
    sdk = _sdk_fields(completion_create_params)
    assert not sdk - set(params.COMPLETIONS), sdk - set(params.COMPLETIONS)


def test_fate_tables_are_in_the_api_docs():
    doc = (REPO_ROOT / "docs" / "api.md").read_text()
    assert params.document() in doc, "regenerate: python -m daemon.api.params"


@pytest.mark.parametrize("field,value", [
    ("functions", [{"name": "f"}]), ("function_call", "auto"), ("audio", {"voice": "x"}),
    ("modalities", ["text", "audio"]), ("reasoning_effort", "high"),
    ("web_search_options", {}), ("moderation", {}), ("n", 2),
])
def test_refused_fields_answer_unsupported_parameter(client, field, value):
    resp = client.post("/v1/chat/completions", json={"messages": USER, field: value})
    assert resp.status_code == 400
    error = resp.get_json()["error"]
    assert (error["code"], error["param"]) == ("unsupported_parameter", field)


@pytest.mark.parametrize("field,value", [
    ("user", "u-1"), ("metadata", {"a": "b"}), ("store", False), ("service_tier", "auto"),
    ("safety_identifier", "s"), ("prompt_cache_key", "k"), ("prediction", {"type": "content",
                                                                            "content": "x"}),
    ("verbosity", "low"), ("n", 1), ("modalities", ["text"]), ("audio", None),
])
def test_ignored_and_harmless_fields_are_accepted(client, field, value):
    resp = client.post("/v1/chat/completions",
                       json={"messages": USER, "max_tokens": 2, "temperature": 0, field: value})
    assert resp.status_code == 200, resp.get_json()


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": USER, "frobnicate": 1}),
    ("/v1/completions", {"prompt": "hi", "frobnicate": 1}),
    ("/v1/sessions", {"frobnicate": 1}),
    ("/tokenize", {"prompt": "hi", "frobnicate": 1}),
])
def test_unknown_fields_answer_unknown_field_everywhere(client, path, body):
    resp = client.post(path, json=body)
    assert resp.status_code == 400
    assert resp.get_json()["error"]["code"] == "unknown_field"
