"""Property-based fuzzing of a real gunicorn from its own /openapi.json: no 5xx but load shedding, ever.

Derandomized (the same requests every run), max_tokens at most 4 (the daemon's cap, published in the
document). Two phases: a key that owns none of the known sessions sends anything, valid or not, to
every route; then the owner's key sends only bodies its schema refuses. Afterwards the known
sessions are exactly as they were.
"""
from __future__ import annotations

import json
from urllib.parse import quote

import pytest
import requests
from hypothesis import HealthCheck, given, settings, strategies as st
from jsonschema import Draft202012Validator

from support.schema_strategies import JSON, TEXT, from_schema
from support.servers import Daemon

pytestmark = pytest.mark.e2e
OWNER, OTHER = "owner-key", "other-key"
PHASES = {"other": 1500, "owner": 600}  # examples; requests sent are counted and must reach 2,000
FORBIDDEN = {500, 502, 504}
sent = {"requests": 0, "statuses": {}}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, cache_dir):
    d = Daemon(tmp_path_factory.mktemp("fuzz"), cache_dir, "--api-keys", f"{OWNER},{OTHER}",
               "--max-new-tokens", "4", "--max-sessions", "400", "--max-sessions-per-key", "150")
    with d:
        yield d


@pytest.fixture(scope="module")
def known(daemon):
    """Three sessions of the owner, one turn each: what no fuzzed request may change."""
    auth = {"Authorization": f"Bearer {OWNER}"}
    ids = []
    for i in range(3):
        sid = requests.post(daemon.url + "/v1/sessions", json={"system": f"s{i}"}, headers=auth,
                            timeout=30).json()["id"]
        assert requests.post(f"{daemon.url}/v1/sessions/{sid}/messages", headers=auth, timeout=60,
                             json={"content": "hello", "max_tokens": 2}).status_code == 200
        ids.append(sid)
    return {sid: requests.get(f"{daemon.url}/v1/sessions/{sid}", headers=auth, timeout=30).json()
            for sid in ids}


def operations(daemon) -> list[dict]:
    doc = requests.get(daemon.url + "/openapi.json", timeout=30).json()
    ops = []
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {})
            ops.append({"path": path, "method": method.upper(), "params": op.get("parameters", []),
                        "body": body.get("schema")})
    return ops


def send(daemon, op: dict, path_value: str, query: dict, body: bytes | None, key: str,
         content_type: str) -> requests.Response:
    path = op["path"]
    for param in op["params"]:
        if param["in"] == "path":
            path = path.replace("{" + param["name"] + "}", quote(path_value, safe=""))
    headers = {"Authorization": f"Bearer {key}", "Content-Type": content_type}
    resp = requests.request(op["method"], daemon.url + path, params=query, data=body,
                            headers=headers, timeout=60)
    sent["requests"] += 1
    sent["statuses"][resp.status_code] = sent["statuses"].get(resp.status_code, 0) + 1
    assert resp.status_code not in FORBIDDEN, (op["method"], path, body, resp.text)
    if resp.status_code >= 400:
        error = resp.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, resp.text
    if resp.status_code == 503:
        assert int(resp.headers["Retry-After"]) >= 1
    return resp


def request_parts(ops: list[dict], session_ids: list[str], *, valid_bodies: bool):
    """(operation, path value, query, body bytes, content type)."""
    @st.composite
    def draw(d):
        op = d(st.sampled_from(ops))
        path_value = d(st.sampled_from(session_ids) | TEXT.filter(bool))
        query = {}
        for param in op["params"]:
            if param["in"] == "query" and d(st.booleans()):
                query[param["name"]] = d(from_schema(param["schema"]).map(_query_text) | TEXT)
        if op["body"] is not None and valid_bodies:
            body = d(from_schema(op["body"]).map(_json) | JSON.map(_json)
                     | st.binary(max_size=64))
        elif op["body"] is not None:
            body = d(_invalid(op["body"]))
        else:
            body = d(st.none() | JSON.map(_json))
        content_type = d(st.sampled_from(["application/json"] * 4 + ["text/plain"]))
        return op, path_value, query, body, content_type
    return draw()


def _json(value) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _query_text(value) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _invalid(schema: dict):
    """Bodies the route's schema refuses: wrong JSON, or no JSON at all."""
    validator = Draft202012Validator(schema)
    wrong = st.dictionaries(st.sampled_from(sorted(schema["properties"]) + ["extra"]), JSON,
                            max_size=4).filter(lambda body: not validator.is_valid(body))
    return wrong.map(_json) | JSON.filter(lambda v: not isinstance(v, dict)).map(_json) \
        | st.binary(max_size=64).filter(lambda b: not b.strip().startswith(b"{"))


FUZZ = settings(derandomize=True, database=None, deadline=None, print_blob=True,
                suppress_health_check=list(HealthCheck))


def test_fuzz_a_non_owner_key_changes_nothing_and_gets_no_5xx(daemon, known):
    ops = operations(daemon)

    @settings(FUZZ, max_examples=PHASES["other"])
    @given(request_parts(ops, list(known), valid_bodies=True))
    def run(parts):
        op, path_value, query, body, content_type = parts
        send(daemon, op, path_value, query, body, OTHER, content_type)
    run()
    assert_unchanged(daemon, known)
    codes = sent["statuses"]  # the generated requests reach the model as well as the validators
    assert sum(n for c, n in codes.items() if c < 300) >= 200 and codes.get(400, 0) >= 200, codes


def test_fuzz_the_owner_with_invalid_bodies_changes_nothing_and_gets_no_5xx(daemon, known):
    ops = [op for op in operations(daemon) if op["body"] is not None]

    @settings(FUZZ, max_examples=PHASES["owner"])
    @given(request_parts(ops, list(known), valid_bodies=False))
    def run(parts):
        op, path_value, query, body, content_type = parts
        resp = send(daemon, op, path_value, query, body, OWNER, content_type)
        assert 400 <= resp.status_code < 500, (op["path"], body, resp.text)
    run()
    assert_unchanged(daemon, known)
    assert sent["requests"] >= 2000, sent


def assert_unchanged(daemon, known: dict) -> None:
    for sid, before in known.items():
        now = requests.get(f"{daemon.url}/v1/sessions/{sid}", timeout=30,
                           headers={"Authorization": f"Bearer {OWNER}"})
        assert now.status_code == 200 and now.json() == before
