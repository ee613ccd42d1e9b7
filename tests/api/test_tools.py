"""Tool calling as Qwen2.5's template defines it, with scripted model output (the built-in models
say random words), through the openai SDK over HTTP; and the SDK's other documented calls."""
from __future__ import annotations

import json

import pytest

from daemon.api import tools as tool_api

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
USER = [{"role": "user", "content": "Weather in Oslo and Bergen?"}]
TWO_CALLS = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n'
             '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bergen"}}\n'
             '</tool_call>')


@pytest.fixture
def sdk(live_app):
    from openai import OpenAI
    app, url = live_app(max_new_tokens=400)
    return app, OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_tool_calls_parsed_from_the_reply(sdk, scripted):
    app, client = sdk
    scripted(app, TWO_CALLS)
    out = client.chat.completions.create(model="builtin:tiny", messages=USER, tools=[WEATHER, CLOCK])
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    calls = choice.message.tool_calls
    assert [c.function.name for c in calls] == ["get_weather", "get_weather"]
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Oslo"}, {"city": "Bergen"}]
    assert len({c.id for c in calls}) == 2


def test_tool_calls_streamed_as_deltas(sdk, scripted):
    app, client = sdk
    scripted(app, TWO_CALLS)
    stream = client.chat.completions.create(model="builtin:tiny", messages=USER, tools=[WEATHER],
                                            stream=True)
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            calls.setdefault(call.index, {"name": "", "arguments": ""})
            calls[call.index]["name"] += call.function.name or ""
            calls[call.index]["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content.strip() == "Let me check."
    assert "<tool_call>" not in content
    assert [json.loads(c["arguments"])["city"] for c in calls.values()] == ["Oslo", "Bergen"]


def test_parallel_tool_calls_false_keeps_one(sdk, scripted):
    app, client = sdk
    scripted(app, TWO_CALLS)
    out = client.chat.completions.create(model="builtin:tiny", messages=USER, tools=[WEATHER],
                                         parallel_tool_calls=False)
    assert len(out.choices[0].message.tool_calls) == 1


def test_a_reply_without_calls_is_plain_text(sdk, scripted):
    app, client = sdk
    scripted(app, "It is sunny. <tool_call>not json</tool_call>")
    out = client.chat.completions.create(model="builtin:tiny", messages=USER, tools=[WEATHER])
    assert out.choices[0].finish_reason == "stop" and not out.choices[0].message.tool_calls
    assert out.choices[0].message.content == "It is sunny. <tool_call>not json</tool_call>"


def test_tool_results_go_back_to_the_model(sdk, scripted):
    app, client = sdk
    scripted(app, "Oslo: 4 degrees.")
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4 degrees"}]
    out = client.chat.completions.create(model="builtin:tiny", messages=history, tools=[WEATHER])
    assert out.choices[0].message.content == "Oslo: 4 degrees."
    assert out.usage.prompt_tokens > 100  # the tools and the tool exchange are in the prompt


def test_forced_tool_call_on_the_real_model(sdk):
    """tool_choice required / named: decoding is constrained to one call with valid arguments, so
    even the random tiny model produces a parseable call."""
    _, client = sdk
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        out = client.chat.completions.create(model="builtin:tiny", messages=USER, tools=[WEATHER, CLOCK],
                                             tool_choice=choice, temperature=0.8, seed=3,
                                             max_tokens=96)
        calls = out.choices[0].message.tool_calls
        assert out.choices[0].finish_reason == "tool_calls", out.choices[0].message.content
        assert len(calls) == 1
        if isinstance(choice, dict):
            assert calls[0].function.name == "get_weather"
        args = json.loads(calls[0].function.arguments)
        assert isinstance(args, dict)


def test_the_sdk_documented_calls(sdk):
    _, client = sdk
    card = client.models.retrieve("builtin:tiny")
    assert card.id == "builtin:tiny" and card.model_extra["max_model_len"] > 0
    out = client.chat.completions.create(model="builtin:tiny", messages=USER, max_tokens=5,
                                         temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert "".join(t.token for t in content) == out.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 for t in content)
    fmt = {"type": "json_object"}
    out = client.chat.completions.create(model="builtin:tiny", messages=USER, max_tokens=24,
                                         response_format=fmt)
    assert isinstance(json.loads(out.choices[0].message.content), dict)
    legacy = client.completions.create(model="builtin:tiny", prompt="Once", max_tokens=4)
    assert legacy.choices[0].text and legacy.usage.completion_tokens == 4


@pytest.mark.parametrize("pieces", [[TWO_CALLS], list(TWO_CALLS), [TWO_CALLS[:20], TWO_CALLS[20:]]])
def test_stream_splitter_is_chunking_blind(pieces):
    req = tool_api.ToolRequest([WEATHER], "auto", True)
    splitter = tool_api.StreamSplitter(req)
    text = "".join(splitter.feed(p)[0] for p in pieces) + splitter.finish()
    assert text.strip() == "Let me check."
    assert [json.loads(c["function"]["arguments"]) for c in splitter.calls] == [
        {"city": "Oslo"}, {"city": "Bergen"}]
