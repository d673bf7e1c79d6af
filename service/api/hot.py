"""The two predict routes, as plain Starlette endpoints: the service's hot path.

Every chunk a client streams comes through here, so it skips what FastAPI adds per request (dependency
resolution, which inspects each dependency on every call, and response re-validation), a large share of
the CPU per chunk under load (docs/architecture.md, docs/bench.md). What remains is the
contract itself: the body validated by pydantic-core straight from the bytes (service.api.bodies), the
engine's pre-serialised JSON answered as is. The schema in /docs is the same (service.api.openapi).
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api.bodies import chunk_array, parse, path_session_id
from service.api.deps import served_model
from service.api.extras import requested
from service.api.openapi import RawOperation
from service.auth import tenant_of
from service.models import ServedModel
from service.problems import Problem, as_problem, invalid
from service.refusals import Refusal
from service.schemas import (
    ChunkRequest,
    PredictionResponse,
    SessionPredictResponse,
    StatelessRequest,
)
from service.sessions.base import session_key

JSON = "application/json"
_LOCATION = ["body", "values"]


Body = TypeVar("Body", ChunkRequest, StatelessRequest)


async def _read(request: Request, schema: type[Body]) -> tuple[ServedModel, Body, np.ndarray]:
    """The model, the validated body, and its values as the model's float32 input."""
    model = served_model(request)
    body = parse(await request.body(), schema)
    features = model.engine.forecaster.num_features
    values = chunk_array(body.values, body.horizon, features, request.app.state.settings, _LOCATION)
    return model, body, values


async def predict_session(request: Request) -> Response:
    try:
        session_id = path_session_id(request.path_params["session_id"])
    except Problem as wrong_id:  # answer as FastAPI would: a body that is not JSON first, else every error
        try:
            await _read(request, ChunkRequest)
        except Problem as wrong_body:
            if wrong_body.status != 422:
                raise
            raise invalid([*wrong_id.extra["errors"], *wrong_body.extra["errors"]]) from None
        raise
    model, body, values = await _read(request, ChunkRequest)
    key = session_key(tenant_of(request), session_id)
    engine = model.engine_for(key)
    extras = requested(body.levels, body.scores, engine.forecaster, ["body"])
    answer = await engine.predict(key, values, body.offset, body.horizon, extras=extras)
    return Response(answer, media_type=JSON)


async def predict(request: Request) -> Response:
    model, body, values = await _read(request, StatelessRequest)
    extras = requested(body.levels, body.scores, model.engine.forecaster, ["body"])
    return Response(await model.engine.predict(None, values, None, body.horizon, extras=extras), media_type=JSON)


ROUTES = [
    Route("/v1/sessions/{session_id}/predict", predict_session, methods=["POST"]),
    Route("/v1/predict", predict, methods=["POST"]),
    Route("/v1/models/{model}/sessions/{session_id}/predict", predict_session, methods=["POST"]),
    Route("/v1/models/{model}/predict", predict, methods=["POST"]),
]


class HotRoutes:
    """Innermost user middleware: answers the predict routes before FastAPI's exception middleware, exit
    stack and router (one regex match instead of walking every route), and passes everything else on.

    Outside it still run the body limit, auth, metrics and access log, and Starlette's server-error
    middleware; a ``Problem`` or an engine ``Refusal`` is answered here, any other exception (a client gone
    mid-body included) by ``service.middleware.ServerErrors``.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for route in ROUTES:
                match, child_scope = route.matches(scope)
                if match == Match.NONE:
                    continue
                scope.update(child_scope, route=route)  # the route template, for metrics and logs
                try:
                    if match == Match.PARTIAL:  # the path of a predict route, another method
                        raise Problem(405, "method-not-allowed", f"{scope['method']} is not allowed on"
                                      f" {scope['path']}; use POST", headers={"Allow": "POST"})
                    response = await route.endpoint(Request(scope, receive))
                except (Problem, Refusal) as refused:
                    response = as_problem(refused).response(scope)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


_DEFAULT_OPERATIONS = [
    RawOperation(
        "/v1/sessions/{session_id}/predict", "post", "Feed a session the next chunk of its series",
        "Applies the chunk at the session's position and answers the one-step-ahead prediction after every "
        "step, plus a forecast when `horizon` > 0. `offset` makes retries safe: see the README's offset rules.",
        ChunkRequest, SessionPredictResponse, (400, 404, 408, 409, 413, 422, 429, 503), session_path=True,
    ),
    RawOperation(
        "/v1/predict", "post", "Predict a whole series from a fresh state (nothing kept)",
        "Stateless: the series runs from a fresh state and nothing is stored.",
        StatelessRequest, PredictionResponse, (400, 408, 413, 422, 429, 503),
    ),
]
# The same two routes per model, under /v1/models/{model}/ (404 for an unknown model).
OPERATIONS = [*_DEFAULT_OPERATIONS, *(
    dataclasses.replace(op, path=op.path.replace("/v1/", "/v1/models/{model}/", 1),
                        problems=tuple(sorted({*op.problems, 404})))
    for op in _DEFAULT_OPERATIONS
)]
