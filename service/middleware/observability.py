"""``Observability``: the request id (``X-Request-ID`` honoured and echoed, else a new one), request count and
latency by route template and status, and one JSON access-log line per request (a stream's as it ends, with
its frames and close code). A request refused before routing (auth, body limit) is counted under the
template its path matches, so a 401 or 413 on a predict route is counted there, and so is a refused
WebSocket upgrade, under method ``WS`` (an accepted stream's chunks are counted as they are answered,
``service.api.stream``). Every label is from a bounded set: a method outside RFC 9110's and PATCH is counted
as ``other`` (uvicorn passes any of some 35 methods, which took an anonymous caller's 1,100 requests from
1,400 series to 22,700). A head too large for the app to see (``service.head_deadline``'s 431) is counted
and logged by the protocol with ``record``, under route ``unmatched``. Never logs bodies, values or keys."""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Iterable
from typing import Any

from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.logs import STREAM_SUMMARY
from service.metrics import STREAM_METHOD, Metrics
from service.problems import route_path

access_log = logging.getLogger("service.access")
_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
# The messages that start an answer, which carries the request id: HTTP's, a refused upgrade's, an accepted one's.
_STARTS = frozenset(("http.response.start", "websocket.http.response.start", "websocket.accept"))
# the method label's values (RFC 9110's methods, PATCH, and streams'), any other method being "other"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", STREAM_METHOD})
_SCOPE_KEY = "gru.request_id"  # where the inner layers (ServerErrors' log line) find the request id
SWITCHED = 101  # an accepted upgrade's status
UNMATCHED = "unmatched"  # the route label of a path that matches no template, and of a head too large


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
        return UNMATCHED, {}


class Observability:
    def __init__(self, app: ASGIApp, metrics: Metrics, templates: RouteTemplates | None = None):
        self.app = app
        self.metrics = metrics
        self.templates = templates or RouteTemplates(())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        request_id = request_id_from(scope["headers"])
        scope[_SCOPE_KEY] = request_id
        status = 0  # no response started yet
        accepted = False  # a WebSocket upgrade accepted: a stream

        async def send_with_id(message: Message) -> None:
            nonlocal status, accepted
            if message["type"] in _STARTS:
                status = message.get("status", 0)  # an accepted upgrade (101) is counted by its frames instead
                accepted = message["type"] == "websocket.accept"
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - began
            if scope["type"] == "http" or status:  # an upgrade only when refused: answered over HTTP
                self._record(scope, request_id, status or 500, elapsed)  # 0: uvicorn sends a 500
            elif accepted:  # a stream: logged as it ends, with what it did (service.api.stream)
                _log(request_id, STREAM_METHOD, *self._template(scope), SWITCHED, elapsed, scope.get(STREAM_SUMMARY))

    def _record(self, scope: Scope, request_id: bytes, status: int, elapsed: float) -> None:
        template, params = self._template(scope)
        method = scope.get("method", STREAM_METHOD)  # a WebSocket upgrade's scope has none
        record(self.metrics, request_id, method, template, params, status, elapsed)

    def _template(self, scope: Scope) -> tuple[str, dict[str, str]]:
        route = scope.get("route")
        if route is not None:
            return route.path, scope.get("path_params", {})
        return self.templates.match(route_path(scope))


def record(metrics: Metrics, request_id: bytes, method: str, template: str, params: dict[str, str], status: int,
           elapsed: float) -> None:
    """Count an answer and write its access-log line: ``Observability``'s, and the protocol's for the answers
    written below the app (``service.head_deadline``'s 431, under ``UNMATCHED``: no route is looked at)."""
    label = method if method in _METHODS else "other"
    metrics.requests.labels(route=template, method=label, status=str(status)).inc()
    metrics.request_duration.labels(route=template, method=label).observe(elapsed)
    _log(request_id, method, template, params, status, elapsed)


def _log(request_id: bytes, method: str, template: str, params: dict[str, str], status: int, elapsed: float,
         more: dict[str, Any] | None = None) -> None:
    """The access-log line: a request's when answered; a stream's when it ends (status 101, its life as the
    latency, ``more``: its frames and close code)."""
    if not access_log.isEnabledFor(logging.INFO):
        return
    entry: dict[str, Any] = {
        "request_id": request_id.decode(), "method": method, "route": template,
        "status": status, "latency_ms": round(elapsed * 1000, 3),
    }
    session = params.get("session_id")
    if session is not None:
        entry["session"] = session[:128]
    access_log.info("request", extra={"fields": entry | (more or {})})


def request_id_of(scope: Scope) -> str | None:
    """The request id ``Observability`` gave this request (None outside it)."""
    request_id: bytes | None = scope.get(_SCOPE_KEY)
    return None if request_id is None else request_id.decode()


def request_id_from(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The request's id: its X-Request-ID where that is a sane one (``_REQUEST_ID``), else a new one. Also for
    the answers written below the app (``service.head_deadline``'s 431)."""
    for name, value in headers:
        if name.lower() == b"x-request-id" and _REQUEST_ID.fullmatch(value):
            return bytes(value)
    return uuid.uuid4().hex.encode()
