"""The request framer the worker's event loop reads with: where a request ends, and what it refuses."""
from __future__ import annotations

import pytest

from daemon.server.framing import MAX_HEAD_BYTES, MAX_REQUEST_LINE, Framer

HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"


def frame(data: bytes, max_body: int = 1000, step: int | None = None) -> Framer:
    """Feed `data` whole, or `step` bytes at a time as a slow client would send it."""
    framer, buf = Framer(max_body), bytearray()
    for i in range(0, len(data), step or max(len(data), 1)):
        buf += data[i:i + (step or len(data))]
        framer.feed(buf)
    return framer


@pytest.mark.parametrize("step", [None, 1, 7])
@pytest.mark.parametrize("data", [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    HEAD + b"Content-Length: 2\r\n\r\n{}",
    HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
    HEAD + b"Transfer-Encoding: chunked\r\n\r\n1;ext=1\r\n{\r\n1\r\n}\r\n0\r\n\r\n",
])
def test_a_complete_request_ends_where_its_framing_says(data, step):
    framer = frame(data + b"GET /next HTTP/1.1\r\n", step=step)  # pipelined bytes stay outside
    assert framer.refusal is None and framer.end == len(data)


@pytest.mark.parametrize("data", [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
    HEAD + b"Content-Length: 10\r\n\r\n{}",
    HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\n{}",
    HEAD + b"Transfer-Encoding: chunked\r\n\r\n0\r\n",
])
def test_an_incomplete_request_waits(data):
    framer = frame(data, step=3)
    assert not framer.done


@pytest.mark.parametrize("data,status,code", [
    (b"GET /" + b"a" * MAX_REQUEST_LINE + b" HTTP/1.1\r\n", 414, "uri_too_long"),
    (b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * MAX_HEAD_BYTES, 431, "request_header_fields_too_large"),
    (HEAD + b"Content-Length: 1001\r\n\r\n", 413, "request_too_large"),
    (HEAD + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400, "malformed_request"),
    (HEAD + b"Content-Length: -1\r\n\r\n", 400, "malformed_request"),
    (HEAD + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "malformed_request"),
    (HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n", 400, "unsupported_transfer_encoding"),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "malformed_request"),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n-1\r\n", 400, "malformed_request"),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}XX", 400, "malformed_request"),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX-Trailer: 1\r\n\r\n", 400, "trailers_unsupported"),
    (HEAD + b"Transfer-Encoding: chunked\r\n\r\n3e9\r\n", 400 + 13, "request_too_large"),
])
def test_what_cannot_be_a_request_is_refused_early(data, status, code):
    framer = frame(data, step=5)
    assert framer.refusal is not None and (framer.refusal.status, framer.refusal.code) == (status, code)
    assert framer.end is None


def test_expect_continue_is_noticed():
    framer = frame(HEAD + b"Content-Length: 2\r\nExpect: 100-continue\r\n\r\n")
    assert framer.expects_continue and framer.body_size == 2 and not framer.done
