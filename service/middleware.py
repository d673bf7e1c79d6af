"""Pure ASGI middleware (no BaseHTTPMiddleware: it would cost the hot path a task and a copy per request).

- ``BodyLimit``: a body over the limit is refused from its Content-Length before a byte is read (413,
  connection closed); a chunked body is cut off the moment it passes the limit; a body still arriving
  when the request's time (GRU_REQUEST_TIMEOUT_SECONDS) is up gets 408, connection closed: a client
  trickling a byte a second would otherwise hold its connection and task for ever.
- ``Observability``: request id (``X-Request-ID`` honoured and echoed), one JSON log line per request, request
  count and latency by route template and status (a request refused before routing, by auth or the body limit,
  under the template its path matches, so a 401 or 413 on a predict route is counted there). Never logs
  bodies, values or keys. It also answers what escapes the app (hot routes and FastAPI's alike) before a
  response has started: an unexpected error (500, logged once, with the request id) and a request cancelled by
  the server's shutdown (503), both as problem+json with the request id where uvicorn would send a bare
  text/plain 500; and a client that hung up before its body arrived (499, nginx's "client closed request":
  nothing changed, and not counted as our error).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Iterable
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.metrics import Metrics
from service.problems import Problem, route_path

access_log = logging.getLogger("service.access")
error_log = logging.getLogger("service.errors")
CLIENT_CLOSED = 499
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


def decimal_length(value: bytes) -> int | None:
    """A length field (Content-Length, Inference-Header-Content-Length): ASCII digits (``str.isdigit`` also
    takes "²"), whitespace around them and leading zeros allowed; None otherwise, or past 18 significant
    digits, which no body reaches (and ``int()`` raises on 4,300 of them)."""
    value = value.strip()
    digits = value.lstrip(b"0")
    if not value.isdigit() or len(digits) > 18:
        return None
    return int(digits or b"0")


def _too_slow(timeout: float) -> Problem:
    return Problem(408, "body-timeout", f"the body did not arrive within GRU_REQUEST_TIMEOUT_SECONDS={timeout:g};"
                   " send it at once", headers={"Connection": "close"})


_STOPPED = Problem(503, "shutting-down", "the service stopped before this request was answered; a chunk may"
                   " have been applied all the same: retry it with the same offset (an applied one returns its"
                   " answer)", headers={"Retry-After": "1", "Connection": "close"})
_INTERNAL = Problem(500, "internal-error", "an unexpected error occurred; it has been logged")


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
                    await _send_problem(_too_large(self.limit), scope, send)
                    return
                break
        received = 0
        deadline = asyncio.get_running_loop().time() + self.timeout

        async def limited() -> Message:
            nonlocal received
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


async def _send_problem(problem: Problem, scope: Scope, send: Send) -> None:
    response = problem.response(scope)
    await response(scope, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


class RouteTemplates:
    """The app's path templates, for requests that end without a route in their scope: refused before routing
    (API keys, body limit) or served by Starlette routes that do not record one (/docs, /openapi.json)."""

    def __init__(self, templates: Iterable[str]):
        self._compiled = [(compile_path(template)[0], template) for template in templates]

    def match(self, path: str) -> tuple[str, dict[str, str]]:
        """The template ``path`` matches and its parameters; "unmatched" (a bounded metric label) if none."""
        for regex, template in self._compiled:
            if found := regex.match(path):
                return template, found.groupdict()
        return "unmatched", {}


class Observability:
    def __init__(self, app: ASGIApp, metrics: Metrics, templates: RouteTemplates | None = None):
        self.app = app
        self.metrics = metrics
        self.templates = templates or RouteTemplates(())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        request_id = _request_id(scope)
        status = 0  # no response started yet

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            if status:
                raise
            await Response(status_code=CLIENT_CLOSED)(scope, receive, send_with_id)  # to nobody: for the record
        except asyncio.CancelledError:  # uvicorn's graceful shutdown ran out of time for this request
            if status:
                raise
            await _send_problem(_STOPPED, scope, send_with_id)  # and the request ends here
        except Exception:
            if status:
                raise
            error_log.exception("unexpected error", extra={"fields": {
                "request_id": request_id.decode(), "method": scope["method"], "path": scope["path"][:256]}})
            await _send_problem(_INTERNAL, scope, send_with_id)
        finally:
            elapsed = time.perf_counter() - began
            route = scope.get("route")
            if route is not None:
                template, params = route.path, scope.get("path_params", {})
            else:
                template, params = self.templates.match(route_path(scope))
            method = scope["method"]
            status = status or 500  # the app returned without answering: uvicorn sends its own 500
            self.metrics.requests.labels(route=template, method=method, status=str(status)).inc()
            self.metrics.request_duration.labels(route=template, method=method).observe(elapsed)
            if access_log.isEnabledFor(logging.INFO):
                entry: dict[str, Any] = {
                    "request_id": request_id.decode(), "method": method, "route": template,
                    "status": status, "latency_ms": round(elapsed * 1000, 3),
                }
                session = params.get("session_id")
                if session is not None:
                    entry["session"] = session[:128]
                access_log.info("request", extra={"fields": entry})


def _request_id(scope: Scope) -> bytes:
    for name, value in scope["headers"]:
        if name == b"x-request-id" and _REQUEST_ID.fullmatch(value):
            return bytes(value)
    return uuid.uuid4().hex.encode()
