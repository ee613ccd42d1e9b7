"""Where one HTTP/1.x request ends in a byte stream: the head, then a Content-Length or chunked body.

Pure and incremental, so the worker's event loop can buffer a whole request before a thread sees it
(`daemon.server.worker`). It checks only what framing needs (sizes, the length headers, chunk
syntax); gunicorn's parser still validates the request itself once it is complete.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

MAX_REQUEST_LINE = 4094        # gunicorn's limit_request_line default: longer gets 414
MAX_HEAD_BYTES = 64 * 1024     # the request line and every header: larger gets 431
MAX_CHUNK_LINE = 1024          # a chunk-size line with its extensions
_DIGITS = re.compile(rb"[0-9]{1,18}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")


@dataclass(frozen=True)
class Refusal:
    """Why a request cannot be served, as the client will read it: status, error code, message."""

    status: int
    code: str
    message: str
    reason: str  # the requests_rejected_total label


def _bad(message: str, code: str = "malformed_request") -> Refusal:
    return Refusal(400, code, message, "malformed_request")


class Framer:
    """Feed bytes with `feed`; `end` becomes the offset just past the request once it is complete.

    `refusal` is set instead when the bytes cannot be a request this server accepts. `body_size`
    (declared Content-Length, or chunk data seen so far) is known once the head is complete.
    """

    def __init__(self, max_body: int) -> None:
        self.max_body = max_body
        self.head_end: int | None = None
        self.end: int | None = None
        self.refusal: Refusal | None = None
        self.body_size = 0
        self.chunked = False
        self.expects_continue = False
        self._pos = 0          # chunked: where parsing resumes
        self._need = 0         # chunked: data bytes (+ CRLF) still to skip before the next size line

    @property
    def done(self) -> bool:
        """Complete or refused: nothing more to read for this request."""
        return self.end is not None or self.refusal is not None

    def feed(self, buf: bytes | bytearray) -> None:
        """Re-examine the whole buffer (the bytes of this request so far, plus whatever follows)."""
        if self.done:
            return
        if self.head_end is None:
            self._head(buf)
        if self.head_end is not None and not self.done:
            self._chunks(buf) if self.chunked else self._sized(buf)

    def _head(self, buf) -> None:
        line_end = buf.find(b"\r\n", 0, MAX_REQUEST_LINE + 2)
        if line_end < 0 and len(buf) > MAX_REQUEST_LINE + 1:
            self.refusal = Refusal(414, "uri_too_long", f"the request line exceeds "
                                   f"{MAX_REQUEST_LINE} bytes", "malformed_request")
            return
        end = buf.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES)
        if end < 0:
            if len(buf) >= MAX_HEAD_BYTES:
                self.refusal = Refusal(431, "request_header_fields_too_large",
                                       f"the request head exceeds {MAX_HEAD_BYTES} bytes",
                                       "malformed_request")
            return
        self.head_end = end + 4
        self._framing(bytes(buf[:end]).split(b"\r\n")[1:])
        self._pos = self.head_end

    def _framing(self, lines: list[bytes]) -> None:
        lengths, codings = [], []
        for line in lines:
            name, colon, value = line.partition(b":")
            if not colon:
                continue  # gunicorn's parser refuses it with a precise message
            name, value = name.strip().lower(), value.strip()
            if name == b"content-length":
                lengths.append(value)
            elif name == b"transfer-encoding":
                codings += [c.strip().lower() for c in value.split(b",")]
            elif name == b"expect":
                self.expects_continue = value.lower() == b"100-continue"
        if lengths and codings:
            self.refusal = _bad("a request may not carry both Content-Length and Transfer-Encoding")
        elif codings:
            if codings != [b"chunked"]:
                self.refusal = _bad("Transfer-Encoding must be chunked (alone) or absent",
                                    "unsupported_transfer_encoding")
            self.chunked = True
        elif lengths:
            if len(set(lengths)) != 1 or not _DIGITS.fullmatch(lengths[0]):
                self.refusal = _bad("Content-Length must be one decimal number")
            else:
                self.body_size = int(lengths[0])
                self._too_large(self.body_size)

    def _too_large(self, size: int) -> None:
        if size > self.max_body:
            self.refusal = Refusal(413, "request_too_large", f"request body exceeds max_body_bytes "
                                   f"({self.max_body})", "request_too_large")

    def _sized(self, buf) -> None:
        if len(buf) - self.head_end >= self.body_size:
            self.end = self.head_end + self.body_size

    def _chunks(self, buf) -> None:
        """Walk chunk frames from where the last call stopped; data bytes are skipped, not copied."""
        while not self.done:
            if self._need:
                step = min(self._need, len(buf) - self._pos)
                self._pos += step
                self._need -= step
                if self._need:
                    return
                if buf[self._pos - 2:self._pos] != b"\r\n":
                    self.refusal = _bad("a chunk's data must end with CRLF")
                    return
                continue
            line_end = buf.find(b"\r\n", self._pos, self._pos + MAX_CHUNK_LINE)
            if line_end < 0:
                if len(buf) - self._pos >= MAX_CHUNK_LINE:
                    self.refusal = _bad("chunk-size line too long")
                return
            size_text = bytes(buf[self._pos:line_end]).split(b";", 1)[0].strip()
            if not _HEX.fullmatch(size_text):
                self.refusal = _bad(f"invalid chunk size {size_text[:20]!r}")
                return
            size = int(size_text, 16)
            if size == 0:  # the last chunk: an empty trailer section must follow (trailers refused)
                if len(buf) - (line_end + 2) < 2:
                    return  # parsed again from this size line once more bytes arrive
                if buf[line_end + 2:line_end + 4] != b"\r\n":
                    self.refusal = _bad("trailers are not supported in request bodies",
                                        "trailers_unsupported")
                else:
                    self.end = line_end + 4
                return
            self._pos = line_end + 2
            self.body_size += size
            self._too_large(self.body_size)
            self._need = size + 2
