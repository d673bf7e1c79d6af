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
MAX_GZIP_MEMBERS = 64  # gzip data may be members end to end (RFC 1952); a body of many tiny ones is refused


def decode_body(raw: bytes, coding: bytes, limit: int) -> bytes:
    """The body under ``Content-Encoding: coding`` (one of ``CONTENT_CODINGS``), inflated to ``limit`` bytes at
    most: a bomb is refused after ``limit + 1`` bytes, never inflated whole. Gzip data is every member of it;
    anything after the data (after a deflate stream, or not a gzip member) is malformed, never ignored."""
    wbits, parts, size, rest = CONTENT_CODINGS[coding], [], 0, raw
    for _ in range(MAX_GZIP_MEMBERS if wbits == 31 else 1):
        inflater = zlib.decompressobj(wbits)
        try:
            part = inflater.decompress(rest, limit + 1 - size)
        except zlib.error as exc:
            raise _malformed(coding, str(exc)) from None
        parts.append(part)
        size += len(part)
        if size > limit or inflater.unconsumed_tail:
            raise Problem(413, "body-too-large", f"the decompressed body is over GRU_MAX_BODY_BYTES={limit} bytes;"
                          " send smaller chunks")
        if not inflater.eof:
            raise _malformed(coding, "truncated")
        rest = inflater.unused_data
        if not rest:
            return b"".join(parts)
    raise _malformed(coding, f"data after its end, or more than {MAX_GZIP_MEMBERS} gzip members")


def _malformed(coding: bytes, why: str) -> Problem:
    return Problem(400, "malformed-encoding", f"the body is not valid {coding.decode()} data ({why})")


async def send_problem(problem: Problem, scope: Scope, send: Send) -> None:
    """Answer ``problem`` without reading the request's body. A WebSocket upgrade is refused with it as its
    HTTP answer where the server can send one (the ASGI denial-response extension; uvicorn can), else closed
    before it opens with 1008 (policy violation), which a client sees as a 403."""
    if scope["type"] == "websocket" and "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    response = problem.response(scope)
    await response(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}
