"""What escapes the app before a response has started is answered by ``ServerErrors`` as problem+json with the
request id ``Observability`` gave it, and logged once: an unexpected error (500) and a request cancelled by the server's
shutdown (503). The middleware runs here around a real ASGI app that fails, as uvicorn would drive it."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import httpx
import pytest
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from service import refusals
from service.logs import JsonFormatter
from service.metrics import Metrics
from service.middleware import Observability, ServerErrors
from service.problems import as_problem


async def _fails(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("a bug")


async def _cancelled(scope: Scope, receive: Receive, send: Send) -> None:
    raise asyncio.CancelledError


def _stack(app: ASGIApp, metrics: Metrics) -> Observability:
    """The two middlewares as service.app stacks them around an app."""
    return Observability(ServerErrors(app), metrics)


async def _call(app: Observability) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.post("/v1/predict", headers={"X-Request-ID": "trace-7"}, content=b"{}")


@pytest.mark.parametrize(("app", "status", "kind"), [(_fails, 500, "internal-error"),
                                                     (_cancelled, 503, "shutting-down")])
def test_what_escapes_the_app_is_answered_as_a_problem_with_the_request_id(
    app: object, status: int, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    with caplog.at_level(logging.ERROR, logger="service.errors"):
        response = asyncio.run(_call(_stack(app, metrics)))  # type: ignore[arg-type]
    assert response.status_code == status
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["x-request-id"] == "trace-7"
    assert response.json()["type"].endswith("/" + kind)
    sample = metrics.requests.labels(route="unmatched", method="POST", status=str(status))
    assert sample._value.get() == 1
    errors = [r for r in caplog.records if r.name == "service.errors"]
    assert len(errors) == (1 if status == 500 else 0)
    if errors:
        assert errors[0].fields["request_id"] == "trace-7" and errors[0].exc_info  # type: ignore[attr-defined]


async def _client_gone(scope: Scope, receive: Receive, send: Send) -> None:
    raise ClientDisconnect


def test_a_client_gone_mid_body_is_recorded_as_499_not_as_our_error(caplog: pytest.LogCaptureFixture) -> None:
    metrics = Metrics()
    with caplog.at_level(logging.ERROR, logger="service.errors"):
        response = asyncio.run(_call(_stack(_client_gone, metrics)))
    assert response.status_code == 499
    assert metrics.requests.labels(route="unmatched", method="POST", status="499")._value.get() == 1
    assert not [r for r in caplog.records if r.name == "service.errors"]


# README "Errors": status and problem type of everything the engine and the offset rules refuse.
_REFUSALS = [
    (refusals.UnknownSession, 404, "session-not-found"),
    (refusals.StaleModel, 409, "model-changed"),
    (refusals.OffsetMismatch, 409, "offset-mismatch"),
    (refusals.OutOfRange, 422, "out-of-range"),
    (refusals.Overloaded, 429, "overloaded"),
    (refusals.ShuttingDown, 503, "shutting-down"),
    (refusals.TimedOut, 503, "timeout"),
    (refusals.StoreUnreachable, 503, "store-unavailable"),
    (refusals.BatchFailed, 500, "internal-error"),
]


@pytest.mark.parametrize(("refusal", "status", "kind"), _REFUSALS, ids=[k for _, _, k in _REFUSALS])
def test_each_refusal_is_answered_with_its_documented_status_and_type(
    refusal: type[refusals.Refusal], status: int, kind: str
) -> None:
    retry_after = 2 if status in (429, 503) else None
    response = as_problem(refusal("why", retry_after=retry_after, position=3)).response()
    body = json.loads(bytes(response.body))
    assert (response.status_code, body["status"]) == (status, status)
    assert body["type"] == "https://gru-service.dev/problems/" + kind
    assert body["detail"] == "why" and body["position"] == 3 and body["title"]
    assert response.headers.get("retry-after") == (None if retry_after is None else "2")


def test_json_log_lines_carry_level_logger_fields_and_traceback() -> None:
    try:
        raise RuntimeError("a bug")
    except RuntimeError:
        record = logging.LogRecord("service.errors", logging.ERROR, __file__, 1, "unexpected %s", ("error",),
                                   sys.exc_info())
    record.fields = {"request_id": "trace-9"}
    entry = json.loads(JsonFormatter().format(record))
    assert (entry["level"], entry["logger"], entry["msg"]) == ("error", "service.errors", "unexpected error")
    assert entry["request_id"] == "trace-9" and entry["ts"].endswith("Z")
    assert "RuntimeError: a bug" in entry["exc"] and "Traceback" in entry["exc"]
