"""Small HTTP helpers shared by the middleware and the routers: header fields and answering a problem at the
ASGI level, where no router or exception handler is there to do it."""

from __future__ import annotations

import zlib

from starlette.types import Message, Scope, Send

from service.problems import Problem


def decimal_length(value: bytes) -> int | None:
    """A length field (Content-Length, Inference-Header-Content-Length): ASCII digits (``str.isdigit`` also
    takes "²"), whitespace around them and leading zeros allowed; None otherwise, or past 18 significant
    digits, which no body reaches (and ``int()`` raises on 4,300 of them)."""
    value = value.strip()
    digits = value.lstrip(b"0")
    if not value.isdigit() or len(digits) > 18:
        return None
    return int(digits or b"0")


CONTENT_CODINGS = {b"gzip": 31, b"x-gzip": 31, b"deflate": 15}  # zlib's wbits for each


def decode_body(raw: bytes, coding: bytes, limit: int) -> bytes:
    """The body under ``Content-Encoding: coding`` (one of ``CONTENT_CODINGS``), inflated to ``limit`` bytes at
    most: a bomb is refused after ``limit + 1`` bytes, never inflated whole."""
    inflater = zlib.decompressobj(CONTENT_CODINGS[coding])
    try:
        body = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise Problem(400, "malformed-encoding", f"the body is not valid {coding.decode()} data ({exc})") from None
    if len(body) > limit or inflater.unconsumed_tail:
        raise Problem(413, "body-too-large", f"the decompressed body is over GRU_MAX_BODY_BYTES={limit} bytes;"
                      " send smaller chunks")
    if not inflater.eof:
        raise Problem(400, "malformed-encoding", f"the body is not valid {coding.decode()} data (truncated)")
    return body


async def send_problem(problem: Problem, scope: Scope, send: Send) -> None:
    """Answer ``problem`` without reading the request's body."""
    response = problem.response(scope)
    await response(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}
