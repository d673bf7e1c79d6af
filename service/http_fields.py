"""Small HTTP helpers shared by the middleware and the routers: header fields and answering a problem at the
ASGI level, where no router or exception handler is there to do it."""

from __future__ import annotations

from starlette.types import Message, Scope, Send

from service.inflate import Malformed, TooLarge, inflate
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


def decode_body(raw: bytes, coding: bytes, limit: int) -> bytes:
    """The body under ``Content-Encoding: coding`` (one of ``CONTENT_CODINGS``) inflated to ``limit`` bytes at
    most (``service.inflate``): a 413 past it, a 400 for data that is not of its coding."""
    try:
        return inflate(raw, coding, limit)
    except TooLarge:
        raise Problem(413, "body-too-large", f"the decompressed body is over GRU_MAX_BODY_BYTES={limit} bytes;"
                      " send smaller chunks") from None
    except Malformed as exc:
        raise Problem(400, "malformed-encoding", f"the body is not valid {coding.decode()} data ({exc})") from None


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
