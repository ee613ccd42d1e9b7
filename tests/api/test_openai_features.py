"""The honoured chat parameters on the tiny model: logprobs (streamed too), logit_bias, the sampling
extensions, roles; the legacy completions route; models, tokenize, detokenize, CORS."""
from __future__ import annotations

import json
import re

import pytest

from daemon.services import get_services

USER = [{"role": "user", "content": "Tell me about the sea."}]


def events(resp) -> list[dict]:
    """The JSON events of an SSE body, without [DONE]."""
    out = []
    for line in resp.get_data(as_text=True).splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


def test_logprobs_match_the_reply(client):
    resp = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 6,
                                                     "temperature": 0, "logprobs": True,
                                                     "top_logprobs": 3})
    choice = resp.get_json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert "".join(e["token"] for e in content) == choice["message"]["content"]
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry["top_logprobs"]) == 3
        assert entry["logprob"] == pytest.approx(entry["top_logprobs"][0]["logprob"])
        assert entry["logprob"] <= 0 and bytes(entry["bytes"]).decode() == entry["token"]


def test_logprobs_are_streamed_with_their_text(client):
    body = {"messages": USER, "max_tokens": 6, "temperature": 0, "logprobs": True, "stream": True}
    chunks = events(client.post("/v1/chat/completions", json=body))
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    tokens = "".join(e["token"] for c in chunks if c["choices"]
                     for e in c["choices"][0]["logprobs"]["content"])
    assert text and tokens == text
    plain = client.post("/v1/chat/completions", json={**body, "stream": False}).get_json()
    assert plain["choices"][0]["message"]["content"] == text


def test_logit_bias_forces_and_bans_tokens(client, app):
    engine = get_services(app).engine
    word = engine.tokenizer(" sea", add_special_tokens=False)["input_ids"][-1]
    body = {"messages": USER, "max_tokens": 4, "temperature": 0}
    forced = client.post("/v1/chat/completions", json={**body, "logit_bias": {str(word): 100}})
    assert forced.get_json()["choices"][0]["message"]["content"] == " sea" * 4
    plain = client.post("/v1/chat/completions", json={**body, "logprobs": True}).get_json()
    first = plain["choices"][0]["logprobs"]["content"][0]["token"]
    first_id = engine.tokenizer(first, add_special_tokens=False)["input_ids"][0]
    banned = client.post("/v1/chat/completions", json={**body, "logit_bias": {str(first_id): -100},
                                                      "logprobs": True}).get_json()
    assert banned["choices"][0]["logprobs"]["content"][0]["token"] != first


def test_sampling_extensions_change_what_is_sampled(client):
    body = {"messages": USER, "max_tokens": 12, "temperature": 1.5, "seed": 7}
    reply = lambda **extra: client.post("/v1/chat/completions", json={**body, **extra}).get_json()[
        "choices"][0]["message"]["content"]
    plain = reply()
    assert reply() == plain  # same seed, same reply: what differs below is the parameter's doing
    top1 = reply(top_k=1)
    assert top1 == reply(temperature=0) != plain  # top_k 1 is greedy
    assert reply(min_p=1.0) == top1  # only tokens as likely as the best one survive
    assert reply(repetition_penalty=5.0) != plain


@pytest.mark.parametrize("penalty", ["frequency_penalty", "repetition_penalty"])
def test_penalties_break_a_repetition(client, app, penalty):
    word = get_services(app).engine.tokenizer(" sea", add_special_tokens=False)["input_ids"][-1]
    body = {"messages": USER, "max_tokens": 12, "temperature": 0, "logit_bias": {str(word): 12}}
    reply = lambda **extra: client.post("/v1/chat/completions", json={**body, **extra}).get_json()[
        "choices"][0]["message"]["content"]
    assert reply() == " sea" * 12  # the bias alone: one word over and over
    value = {"frequency_penalty": 2.0, "repetition_penalty": 10.0}[penalty]
    assert reply(**{penalty: value}).count(" sea") < 12


@pytest.mark.parametrize("body,code,param", [
    ({"top_logprobs": 2}, "invalid_value", "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "invalid_value", "top_logprobs"),
    ({"logit_bias": {"999999": 1}}, "invalid_value", "logit_bias"),
    ({"logit_bias": {"5": 101}}, "invalid_value", "5"),
    ({"presence_penalty": 3}, "invalid_value", "presence_penalty"),
    ({"min_p": 1.5}, "invalid_value", "min_p"),
    ({"top_k": -2}, "invalid_value", "top_k"),
    ({"repetition_penalty": 0}, "invalid_value", "repetition_penalty"),
    ({"response_format": {"type": "yaml"}}, "invalid_value", "response_format.type"),
    ({"tool_choice": "required"}, "invalid_value", "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "invalid_value",
     "tools[0].function.name"),
])
def test_bad_parameters_are_400_naming_them(client, body, code, param):
    resp = client.post("/v1/chat/completions", json={"messages": USER, **body})
    assert resp.status_code == 400
    error = resp.get_json()["error"]
    assert (error["code"], error["param"]) == (code, param)


def test_developer_is_system_and_tool_messages_render(client):
    tokens = lambda messages: client.post("/tokenize", json={"messages": messages}).get_json()["tokens"]
    system = [{"role": "system", "content": "Be brief."}, *USER]
    developer = [{"role": "developer", "content": "Be brief."}, *USER]
    assert tokens(developer) == tokens(system)
    call = {"id": "call_1", "type": "function",
            "function": {"name": "sea_depth", "arguments": "{\"sea\": \"north\"}"}}
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "95 m"}]
    resp = client.post("/tokenize", json={"messages": history, "return_token_strs": True})
    text = client.post("/detokenize", json={"tokens": resp.get_json()["tokens"]}).get_json()["prompt"]
    assert '<tool_call>\n{"name": "sea_depth", "arguments": {"sea": "north"}}' in text
    assert "<tool_response>\n95 m\n</tool_response>" in text
    reply = client.post("/v1/chat/completions", json={"messages": history, "max_tokens": 3})
    assert reply.status_code == 200


def test_tokenize_and_detokenize_round_trip(client, app):
    resp = client.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True})
    body = resp.get_json()
    assert body["count"] == len(body["tokens"]) == len(body["token_strs"]) > 1
    assert body["max_model_len"] == get_services(app).engine.context_length
    back = client.post("/detokenize", json={"tokens": body["tokens"]}).get_json()
    assert back == {"prompt": "Hello world"}
    assert client.post("/detokenize", json={"tokens": [-1]}).status_code == 400
    assert client.post("/tokenize", json={}).status_code == 400


def test_tokenize_sits_behind_the_keys_and_size_limit(app_factory):
    client = app_factory(api_keys=("k1",), max_body_bytes=256).test_client()
    assert client.post("/tokenize", json={"prompt": "hi"}).status_code == 401
    ok = client.post("/tokenize", json={"prompt": "hi"}, headers={"Authorization": "Bearer k1"})
    assert ok.status_code == 200
    big = client.post("/tokenize", json={"prompt": "x" * 1000}, headers={"Authorization": "Bearer k1"})
    assert big.status_code == 413


def test_served_model_name_everywhere(app_factory):
    app = app_factory(served_model_name="edge-mini")
    client = app.test_client()
    assert [m["id"] for m in client.get("/v1/models").get_json()["data"]] == ["edge-mini"]
    card = client.get("/v1/models/edge-mini").get_json()
    assert card["max_model_len"] == get_services(app).engine.context_length
    assert client.get("/v1/models/other").status_code == 404
    reply = client.post("/v1/chat/completions", json={"messages": USER, "model": "edge-mini",
                                                      "max_tokens": 2}).get_json()
    assert reply["model"] == "edge-mini"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert re.search(r'^edgechat_model_info\{[^}]*\bmodel="edge-mini"', metrics, re.M), metrics


def test_legacy_completions(client, app):
    no_eos = {str(t): -100 for t in get_services(app).engine.eos_ids}  # five tokens, whatever the model's near-ties
    body = {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0, "logprobs": 2, "logit_bias": no_eos}
    resp = client.post("/v1/completions", json=body).get_json()
    choice = resp["choices"][0]
    assert resp["object"] == "text_completion" and resp["usage"]["completion_tokens"] == 5
    assert "".join(choice["logprobs"]["tokens"]) == choice["text"]
    assert all(len(top) == 2 for top in choice["logprobs"]["top_logprobs"])
    echoed = client.post("/v1/completions", json={**body, "logprobs": None, "echo": True}).get_json()
    assert echoed["choices"][0]["text"] == "Once upon a time" + choice["text"]
    streamed = events(client.post("/v1/completions", json={**body, "stream": True}))
    assert "".join(c["choices"][0]["text"] for c in streamed if c["choices"]) == choice["text"]
    assert streamed[-1]["choices"][0]["finish_reason"] == "length"
    resp = client.post("/v1/completions", json={"prompt": "x", "suffix": "y"})
    assert resp.get_json()["error"]["code"] == "unsupported_parameter"


def test_cors_is_opt_in(app_factory):
    origin = {"Origin": "https://app.example"}
    closed = app_factory().test_client()
    assert "Access-Control-Allow-Origin" not in closed.get("/v1/models", headers=origin).headers
    client = app_factory(cors_origins=("https://app.example",), api_keys=("k1",)).test_client()
    pre = client.options("/v1/chat/completions", headers={
        **origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 204  # before auth: a browser sends no key with a preflight
    assert pre.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Authorization" in pre.headers["Access-Control-Allow-Headers"]
    resp = client.get("/v1/models", headers={**origin, "Authorization": "Bearer k1"})
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    other = client.get("/v1/models", headers={"Origin": "https://evil.example",
                                             "Authorization": "Bearer k1"})
    assert "Access-Control-Allow-Origin" not in other.headers


def test_sessions_share_the_fates(client):
    sid = client.post("/v1/sessions", json={}).get_json()["id"]
    url = f"/v1/sessions/{sid}/messages"
    turn = client.post(url, json={"content": "Hi", "max_tokens": 4, "temperature": 0, "top_k": 5,
                                  "logprobs": True, "top_logprobs": 1}).get_json()
    assert "".join(e["token"] for e in turn["logprobs"]["content"]) == turn["message"]["content"]
    refused = client.post(url, json={"content": "Hi", "tools": []})
    assert refused.get_json()["error"]["code"] == "unknown_field"
    assert client.get(f"/v1/sessions/{sid}").get_json()["turns"] == 1  # the refusal changed nothing
