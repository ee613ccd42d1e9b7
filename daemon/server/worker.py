"""The gunicorn worker class: gthread, except that a whole request is read before a thread takes it.

gthread hands a connection to a thread as soon as it is readable, and the thread then reads the head
and body with no deadline: a few clients sending a byte now and then hold every thread, probes
included. Here the worker's event loop reads each request without blocking, under deadlines (the
head within `request_read_timeout_s`; the body within that plus its size at
`request_read_min_rate` bytes/s), and a thread gets only a request that is complete. What cannot be
a request is refused from the loop with the OpenAI error shape (400, 408, 413, 414, 431), as are
gunicorn's own parse errors (`handle_error`). Responses, SSE streams included, are written by the
thread on the real socket as before, so a client that goes away still ends its generation at once.
"""
from __future__ import annotations

import errno
import json
import logging
import selectors
import socket
import time
from functools import partial
from typing import Protocol

from gunicorn import http
from gunicorn.http import errors as http_errors
from gunicorn.workers.gthread import TConn, ThreadWorker

from ..config import Config
from ..openai_error import error_body
from .framing import Framer, Refusal

log = logging.getLogger("edgechat.server")
RECV_BYTES = 64 * 1024
LINGER_S = 1.0                # after a refusal: read and drop what the client still sends, this long
LINGER_BYTES = 4 * 1024 * 1024
BUFFERED_BODIES = 16          # bodies of max_body_bytes being read at once, per worker, at most
SEND_TIMEOUT_S = 60.0         # a response write that makes no progress for this long ends the request
# A request this large may have left the tokenizer's and the JSON parser's freed memory in glibc's
# arenas (a refused 900 KB prompt: hundreds of MB); it is given back once the request has ended.
LARGE_REQUEST_BYTES = 256 * 1024
_CLIENT_ERRORS = {
    http_errors.LimitRequestLine: (414, "uri_too_long"),
    http_errors.LimitRequestHeaders: (431, "request_header_fields_too_large"),
    http_errors.ForbiddenProxyRequest: (403, "forbidden"),
}


class ServerListener(Protocol):
    """What the worker tells the app of its process: refusals (metrics), large requests done."""

    def on_reject(self, reason: str) -> None:
        """One refusal; reason is one of telemetry.labels.REJECT_REASONS."""

    def after_large_request(self) -> None:
        """A request of LARGE_REQUEST_BYTES or more has ended: give freed memory back."""


_listener: ServerListener | None = None


def set_listener(listener: ServerListener | None) -> None:
    """The app of this worker process listens here (create_app, after fork)."""
    global _listener
    _listener = listener


def _count(reason: str) -> None:
    if _listener is not None:
        _listener.on_reject(reason)


def json_response(status: int, message: str, code: str, retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 response carrying the OpenAI error object; the connection closes after it."""
    body = json.dumps(error_body(status, message, code)).encode()
    reason = {400: "Bad Request", 403: "Forbidden", 408: "Request Timeout", 413: "Content Too Large",
              414: "URI Too Long", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
              503: "Service Unavailable"}.get(status, "Error")
    head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json",
            f"Content-Length: {len(body)}", "Connection: close"]
    if retry_after is not None:
        head.append(f"Retry-After: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class Conn(TConn):
    """A client connection and the request being read on it (event loop state)."""

    def __init__(self, cfg, sock, client, server, max_body: int) -> None:
        super().__init__(cfg, sock, client, server)
        self.max_body = max_body
        self.buf = bytearray()
        self.framer = Framer(max_body)
        self.request = b""
        self.deadline = 0.0
        self.reserved = 0          # body bytes this request may still buffer (the worker's budget)
        self.linger_until = 0.0    # > 0: refused; draining what the client still sends
        self.drained = 0

    def peer(self) -> str:
        """host:port of the client, for logs."""
        client = self.client
        return f"{client[0]}:{client[1]}" if isinstance(client, tuple) else str(client)


class EdgeWorker(ThreadWorker):
    """gthread with requests read whole, under deadlines, by the event loop; JSON for every refusal."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        settings = Config.from_env()
        self.max_body = settings.max_body_bytes
        self.read_timeout_s = settings.request_read_timeout_s
        self.min_rate = settings.request_read_min_rate
        self.body_budget = BUFFERED_BODIES * self.max_body
        self.reserved_total = 0
        self.reading: set[Conn] = set()

    # -- event loop: reading ------------------------------------------------------------------------

    def accept(self, listener) -> None:
        """A new connection: read its first request in the loop."""
        try:
            sock, addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = Conn(self.cfg, sock, addr, listener.getsockname(), self.max_body)
        self._await_request(conn, time.monotonic() + self.read_timeout_s)

    def _await_request(self, conn: Conn, idle_deadline: float) -> None:
        conn.sock.setblocking(False)
        conn.deadline = idle_deadline
        self.reading.add(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._readable, conn))
        if conn.buf:  # pipelined bytes are already here: they may hold a whole request
            self._progress(conn, b"")

    def _readable(self, conn: Conn, _sock) -> None:
        if conn.linger_until:
            self._drain(conn)
            return
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._eof(conn)
            return
        self._progress(conn, data)

    def _progress(self, conn: Conn, data: bytes) -> None:
        fresh = not conn.buf
        conn.buf += data
        had_head = conn.framer.head_end is not None
        conn.framer.feed(conn.buf)
        framer, now = conn.framer, time.monotonic()
        if fresh and data:  # the first byte of a request starts its head's deadline
            conn.deadline = now + self.read_timeout_s
        if framer.refusal is not None:
            self._refuse(conn, framer.refusal)
            return
        if framer.head_end is not None and not had_head and not self._start_body(conn, now):
            return
        if framer.end is not None:
            self._dispatch(conn)

    def _start_body(self, conn: Conn, now: float) -> bool:
        """Head complete: reserve the body in the worker's budget, set its deadline; False if refused."""
        framer = conn.framer
        if framer.end is None:
            want = self.max_body if framer.chunked else framer.body_size
            if self.reserved_total + want > self.body_budget:
                self._refuse(conn, Refusal(503, "server_busy", "too many request bodies are being "
                                           "received; retry shortly", "read_busy"), retry_after=1)
                return False
            conn.reserved = want
            self.reserved_total += want
            # a body gets the head's allowance again plus its size at the minimum rate (a chunked
            # body, of unknown size, the largest one's)
            conn.deadline = now + self.read_timeout_s + want / self.min_rate
            if framer.expects_continue:
                self._send(conn, b"HTTP/1.1 100 Continue\r\n\r\n")
        return True

    def _dispatch(self, conn: Conn) -> None:
        """A whole request: hand it to a thread; the bytes after it stay for the next one."""
        end = conn.framer.end
        conn.request = bytes(conn.buf[:end])
        del conn.buf[:end]
        conn.framer = Framer(self.max_body)
        self._unreserve(conn)
        self._forget(conn)
        self.enqueue_req(conn)

    def _eof(self, conn: Conn) -> None:
        """The client closed its side: a request cut short is refused, nothing is run."""
        if conn.buf and conn.framer.head_end is not None:
            self._refuse(conn, Refusal(400, "incomplete_body", "the connection closed before the "
                                       "body was complete (shorter than its Content-Length)",
                                       "malformed_request"))
        elif conn.buf:
            self._refuse(conn, Refusal(400, "incomplete_request", "the connection closed inside "
                                       "the request head", "malformed_request"))
        else:
            self._close(conn)

    def _refuse(self, conn: Conn, refusal: Refusal, retry_after: int | None = None) -> None:
        log.info("refused request from %s: %s %s (%s)", conn.peer(), refusal.status, refusal.code,
                 refusal.message)
        _count(refusal.reason)
        self._unreserve(conn)
        self._send(conn, json_response(refusal.status, refusal.message, refusal.code, retry_after))
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        # drop what the client still sends for a moment, so closing does not reset the connection
        # before it has read the refusal
        conn.linger_until = time.monotonic() + LINGER_S
        conn.deadline = conn.linger_until

    def _drain(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        conn.drained += len(data)
        if not data or conn.drained > LINGER_BYTES:
            self._close(conn)

    @staticmethod
    def _send(conn: Conn, payload: bytes) -> None:
        """Best effort from the loop: a small payload fits the socket buffer; a stuck peer loses it."""
        try:
            conn.sock.send(payload)
        except OSError:
            pass

    def _unreserve(self, conn: Conn) -> None:
        self.reserved_total -= conn.reserved
        conn.reserved = 0

    def _forget(self, conn: Conn) -> None:
        self.reading.discard(conn)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _close(self, conn: Conn) -> None:
        self._unreserve(conn)
        self._forget(conn)
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self) -> None:
        """Each loop turn: 408 for requests past their deadline, idle connections closed quietly."""
        now = time.monotonic()
        for conn in [c for c in self.reading if c.deadline <= now or (not self.alive and not c.buf)]:
            if conn.linger_until or not conn.buf:
                self._close(conn)
            else:
                what = "head" if conn.framer.head_end is None else "body"
                self._refuse(conn, Refusal(408, "request_timeout", f"the request {what} did not "
                                           f"arrive in time; send requests at once", "read_timeout"))

    # -- threads: handling ---------------------------------------------------------------------------

    def handle(self, conn: Conn):
        """In a thread: parse the complete request from memory and run the app; True = keep alive."""
        req = None
        try:
            conn.sock.setblocking(True)
            conn.sock.settimeout(SEND_TIMEOUT_S)
            req = next(http.get_parser(self.cfg, [conn.request], conn.client))
            req._expected_100_continue = False  # the loop answered it, and the body is all here
            keep = self.handle_request(req, conn)
            req = None  # nothing of the request stays referenced: what it used can be given back
            if len(conn.request) >= LARGE_REQUEST_BYTES and _listener is not None:
                conn.request = b""
                _listener.after_large_request()
            return keep
        except StopIteration:
            return False
        except http_errors.NoMoreData as exc:  # an OSError, but the request is at fault
            self.handle_error(req, conn.sock, conn.client, exc)
        except OSError as exc:  # the client went away while we answered
            log.debug("connection from %s ended: %s", conn.peer(), exc)
        except Exception as exc:  # noqa: BLE001 - gunicorn's parse errors and app failures: answered
            self.handle_error(req, conn.sock, conn.client, exc)
        return False

    def finish_request(self, conn: Conn, fs) -> None:
        """In the loop, after a thread: wait for the next request on a kept-alive connection."""
        try:
            keep = (not fs.cancelled()) and fs.result() and self.alive
        except Exception:  # noqa: BLE001 - handle() answers its own errors; close in any case
            keep = False
        conn.request = b""
        if keep:
            self._await_request(conn, time.monotonic() + self.cfg.keepalive)
        else:
            self.nr_conns -= 1
            conn.close()

    def handle_error(self, req, client, addr, exc) -> None:
        """gunicorn's parse errors (and anything else) as the OpenAI error shape, never HTML."""
        status, code = 500, "internal_error"
        if isinstance(exc, (http_errors.InvalidResponseHeader, http_errors.InvalidResponseHeaderName,
                            http_errors.ConfigurationProblem)):
            pass  # the app's or the setup's fault, not the client's
        elif isinstance(exc, tuple(_CLIENT_ERRORS)):
            status, code = next(v for k, v in _CLIENT_ERRORS.items() if isinstance(exc, k))
        elif isinstance(exc, (http_errors.ParseException, http_errors.NoMoreData)):
            status, code = 400, "malformed_request"
        peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        if status == 500:
            log.exception("error handling a request from %s", peer)
            message = "internal error"
        else:
            log.info("refused request from %s: %s %s (%s)", peer, status, code, exc)
            _count("malformed_request")
            message = {414: "the request line is too long",
                       431: "too many request headers, or one too large"}.get(status, "")
            message = f"{message or 'malformed request'} ({exc})"
        try:
            client.sendall(json_response(status, message, code))
        except OSError:
            log.debug("could not send the error to %s", peer)
