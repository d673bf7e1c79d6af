"""RFC 9457 problem details: every error the service gives is ``application/problem+json``.

Routers raise ``Problem``; the engine and the offset rules raise ``service.refusals.Refusal``, which knows no
HTTP and gets its status from the one table here. The handlers turn both, FastAPI's validation errors and
Starlette's HTTP errors into one shape: ``type``, ``title``, ``status``, ``detail`` plus extension members
(``position``, ``errors``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import Scope

from service import refusals

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://gru-service.dev/problems/"

_TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    408: "Request timeout",
    409: "Conflict",
    412: "Precondition failed",
    413: "Request body too large",
    415: "Unsupported media type",
    422: "Invalid request",
    429: "Too many requests",
    431: "Request header fields too large",
    500: "Internal server error",
    503: "Service unavailable",
}


class Problem(Exception):
    """An error answer; ``kind`` becomes the problem ``type`` URI, ``extra`` its extension members."""

    def __init__(
        self,
        status: int,
        kind: str,
        detail: str,
        *,
        headers: Mapping[str, str] | None = None,
        **extra: Any,
    ):
        super().__init__(detail)
        self.status = status
        self.kind = kind
        self.title = _TITLES.get(status, "Error")
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = extra

    def body(self, scope: Scope | None = None) -> dict[str, Any]:
        """The members; answering a request under /v2 also the Open Inference Protocol's ``error`` (all that
        tritonclient reads), whichever layer refused: the HTTP parser (service.head_deadline), body limit,
        auth, routing, the engine or v2 itself."""
        body = {"type": TYPE_BASE + self.kind, "title": self.title, "status": self.status, "detail": self.detail}
        path = route_path(scope) if scope is not None else ""
        if path == "/v2" or path.startswith("/v2/"):
            body["error"] = self.detail
        return body | self.extra

    def response(self, scope: Scope | None = None) -> Response:
        """The answer to the request of ``scope`` (None: no request, such as a batch item's own problem)."""
        return Response(
            orjson.dumps(self.body(scope)), status_code=self.status, media_type=PROBLEM_JSON, headers=self.headers
        )


def route_path(scope: Scope) -> str:
    """The path as the router matches it (without a proxy's root_path prefix)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):] or "/"
    return path


REFUSAL_STATUS: dict[type[refusals.Refusal], int] = {
    refusals.UnknownSession: 404,
    refusals.StaleModel: 409,
    refusals.OffsetMismatch: 409,
    refusals.SessionExists: 409,
    refusals.PreconditionFailed: 412,
    refusals.OutOfRange: 422,
    refusals.Overloaded: 429,
    refusals.ShuttingDown: 503,
    refusals.TimedOut: 503,
    refusals.StoreUnreachable: 503,
    refusals.VersionNotLoaded: 503,
    refusals.BatchFailed: 500,
}


def as_problem(error: Problem | refusals.Refusal) -> Problem:
    """The HTTP answer to a refusal (a ``Problem`` is one already)."""
    if isinstance(error, Problem):
        return error
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return Problem(REFUSAL_STATUS[type(error)], error.kind, error.detail, headers=headers, **error.extra)


_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")  # what a 405's Allow may list (HEAD goes as GET)
MAX_LISTED_ERRORS = 20  # a body of many unknown fields must not buy an answer larger than itself


def field_errors(errors: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic's error list, reduced to what a client needs: where, what, and the rule broken."""
    return [
        {"loc": [str(part) for part in err.get("loc", ())], "msg": err.get("msg", ""), "type": err.get("type", "")}
        for err in errors[:MAX_LISTED_ERRORS]
    ]


def describe_errors(errors: Sequence[Any], limit: int = 5) -> str:
    """The first ``limit`` errors on one line, each where and what: for answers that carry one message and
    no list (the v2 protocol's ``error``)."""
    return "; ".join(f"{'.'.join(str(part) for part in err.get('loc', ())) or 'body'}: {err.get('msg', '')}"
                     for err in errors[:limit])


# Valid JSON that pydantic-core's parser (jiter) does not take, by its message: what the 400 says instead of
# "not JSON". Its limits are fixed: an empty innermost array may be one level deeper, and digits after a
# number's point or its exponent do not count.
_PARSER_LIMITS = (
    ("recursion limit exceeded", "the body nests arrays and objects more than 200 levels deep, more than the"
     " JSON parser takes; send fewer levels"),
    ("number out of range", "the body holds a number of more than 4,300 digits before its point, more than the"
     " JSON parser takes; send it with fewer digits"),
)


def _malformed(fields: list[dict[str, Any]]) -> str:
    """Why a body was not parsed: a parser limit it went past, else that it is no JSON object at all."""
    for message, detail in _PARSER_LIMITS:
        if any(message in e["msg"] for e in fields):
            return detail
    return "the body is not a valid JSON object (NaN and Infinity are not JSON)"


def invalid(errors: Sequence[Any]) -> Problem:
    """422 naming the fields (the first ``MAX_LISTED_ERRORS``), or 400 when the body was not JSON at all
    (every body path ends here)."""
    fields = field_errors(errors)
    if any(e["type"] in ("json_invalid", "json_type") for e in fields):
        return Problem(400, "malformed-json", _malformed(fields), errors=fields)
    where = ", ".join(".".join(e["loc"]) or "body" for e in fields[:5])
    more = f" ({len(errors)} errors, the first {len(fields)} listed)" if len(errors) > len(fields) else ""
    return Problem(422, "invalid-request", f"the request does not match the schema at: {where}{more}",
                   errors=fields)


async def _problem_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Problem | refusals.Refusal)
    return as_problem(exc).response(request.scope)


async def _validation_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return invalid(exc.errors()).response(request.scope)


async def _http_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    detail = exc.detail if isinstance(exc.detail, str) else _TITLES.get(status, "Error")
    if status == 404 and detail == "Not Found":
        detail = f"no route {request.url.path}; see /docs for the API"
    headers = exc.headers
    if status == 405:
        allowed = _allowed_methods(request)
        headers = {**(headers or {}), "Allow": ", ".join(allowed)}
        detail = f"{request.method} is not allowed on {request.url.path}; use {' or '.join(allowed)}"
    kind = {404: "not-found", 405: "method-not-allowed"}.get(status, "http-error")
    return Problem(status, kind, detail, headers=headers).response(request.scope)


def _allowed_methods(request: Request) -> list[str]:
    """Every method the request's path is served with: a path of several routes (GET and DELETE of a
    session) allows them all, where Starlette's 405 names only the first route's. Each method is asked of
    the routes' own matching, which also sees into the routers FastAPI includes."""
    routes = request.app.router.routes
    return [method for method in _METHODS
            if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)]


def install(app: FastAPI) -> None:
    app.add_exception_handler(Problem, _problem_handler)
    app.add_exception_handler(refusals.Refusal, _problem_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
