"""``ServerErrors``: answers what escapes the app (hot routes and FastAPI's alike) before a response has
started, where uvicorn would send a bare text/plain 500:

- an unexpected error: 500 problem+json, logged once with the request id;
- a request cancelled by the server's shutdown: 503, retry with the same offset;
- a client that hung up before its body arrived: 499 (nginx's "client closed request"), sent to nobody, so
  the request is recorded as the client's doing, not as our error.
"""

from __future__ import annotations

import asyncio
import logging

from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http_fields import send_problem
from service.middleware.observability import request_id_of
from service.problems import Problem

error_log = logging.getLogger("service.errors")
CLIENT_CLOSED = 499

_STOPPED = Problem(503, "shutting-down", "the service stopped before this request was answered; a chunk may"
                   " have been applied all the same: retry it with the same offset (an applied one returns its"
                   " answer)", headers={"Retry-After": "1", "Connection": "close"})
_INTERNAL = Problem(500, "internal-error", "an unexpected error occurred; it has been logged")


class ServerErrors:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except ClientDisconnect:
            if started:
                raise
            await Response(status_code=CLIENT_CLOSED)(scope, receive, send)  # to nobody: for the record
        except asyncio.CancelledError:  # uvicorn's graceful shutdown ran out of time for this request
            if started:
                raise
            await send_problem(_STOPPED, scope, send)  # and the request ends here
        except Exception:
            if started:
                raise
            error_log.exception("unexpected error", extra={"fields": {
                "request_id": request_id_of(scope), "method": scope["method"], "path": scope["path"][:256]}})
            await send_problem(_INTERNAL, scope, send)
