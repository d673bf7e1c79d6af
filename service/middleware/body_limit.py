"""``BodyLimit``: a body over GRU_MAX_BODY_BYTES is refused from its Content-Length before a byte is read (413,
connection closed); a chunked body is cut off the moment it passes the limit; a body still arriving
GRU_REQUEST_TIMEOUT_SECONDS after the app began reading it gets 408, connection closed: a client trickling a
byte a second would otherwise hold its connection and task for ever. The clock starts at the first read, not
at the request's start: a predict call that waits for a queue place (GRU_QUEUE_PATIENCE_SECONDS) leaves its
body unread meanwhile, and that wait is the service's, not the client's."""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http_fields import decimal_length, send_problem
from service.problems import Problem


def _too_slow(timeout: float) -> Problem:
    return Problem(408, "body-timeout", f"the body did not arrive within GRU_REQUEST_TIMEOUT_SECONDS={timeout:g};"
                   " send it at once", headers={"Connection": "close"})


def _too_large(limit: int) -> Problem:
    return Problem(413, "body-too-large", f"the body is over GRU_MAX_BODY_BYTES={limit} bytes; send smaller chunks",
                   headers={"Connection": "close"})


class BodyLimit:
    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_seconds: float):
        self.app = app
        self.limit = max_body_bytes
        self.timeout = body_timeout_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = decimal_length(value)
                if length is None or length > self.limit:
                    await send_problem(_too_large(self.limit), scope, send)
                    return
                break
        received = 0
        deadline: float | None = None  # set by the first read

        async def limited() -> Message:
            nonlocal received, deadline
            if deadline is None:
                deadline = asyncio.get_running_loop().time() + self.timeout
            try:
                async with asyncio.timeout_at(deadline):  # no task per call, unlike wait_for: the hot path
                    message = await receive()
            except TimeoutError:
                raise _too_slow(self.timeout) from None  # answered by the app's Problem handler
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _too_large(self.limit)  # answered by the app's Problem handler
            return message

        await self.app(scope, limited, send)
