"""``ContentEncoding``: a request body sent with ``Content-Encoding: gzip`` (or ``deflate``) is inflated, at most
to GRU_MAX_BODY_BYTES, before any route reads it, so every route takes compressed bodies alike (tritonclient
compresses its v2 requests); any other coding is a 415, never read as if it were plain. Plain bodies (no
header, or ``identity``) pass through untouched: one look at the headers."""

from __future__ import annotations

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http_fields import decode_body, send_problem
from service.inflate import CONTENT_CODINGS
from service.problems import Problem


def _unsupported(coding: bytes) -> Problem:
    return Problem(415, "unsupported-encoding", f"Content-Encoding {coding.decode('latin-1')!r} is not supported;"
                   " send gzip, deflate or an uncompressed body")


class ContentEncoding:
    def __init__(self, app: ASGIApp, max_body_bytes: int):
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # Several Content-Encoding lines are one list (RFC 9110), as on one line: more than one coding is a 415
        lines = [value for name, value in scope["headers"] if name == b"content-encoding"]
        if not lines:
            await self.app(scope, receive, send)
            return
        coding = b",".join(lines).strip().lower()
        if coding in (b"", b"identity"):
            await self.app(scope, receive, send)
            return
        try:
            if coding not in CONTENT_CODINGS:
                raise _unsupported(coding)
            body = decode_body(await _read(receive), coding, self.limit)
        except Problem as refused:  # the body limit's 408/413 included: no route is there to answer them
            await send_problem(refused, scope, send)
            return
        headers = [(n, v) for n, v in scope["headers"] if n not in (b"content-encoding", b"content-length")]
        scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        delivered = False

        async def decoded() -> Message:
            nonlocal delivered
            if delivered:
                return await receive()  # after the body: the disconnect, when it comes
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, decoded, send)


async def _read(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)
