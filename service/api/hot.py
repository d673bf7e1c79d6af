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
from service.api.stream import MODEL_PATH as STREAM_MODEL_PATH
from service.api.stream import PATH as STREAM_PATH
from service.api.stream import ROUTES as STREAM_ROUTES
from service.api.stream import Streams
from service.auth import tenant_of
from service.batch_queue import BatchQueue
from service.http_fields import send_problem
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
PLACE = "gru.place"  # the queue place HotRoutes reserved for the call, in its scope
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
    answer = await engine.predict(key, values, body.offset, body.horizon, extras=extras, place=request.scope[PLACE])
    return Response(answer, media_type=JSON)


async def predict(request: Request) -> Response:
    model, body, values = await _read(request, StatelessRequest)
    extras = requested(body.levels, body.scores, model.engine.forecaster, ["body"])
    answer = await model.engine.predict(None, values, None, body.horizon, extras=extras, place=request.scope[PLACE])
    return Response(answer, media_type=JSON)


ROUTES = [
    Route("/v1/sessions/{session_id}/predict", predict_session, methods=["POST"]),
    Route("/v1/predict", predict, methods=["POST"]),
    Route("/v1/models/{model}/sessions/{session_id}/predict", predict_session, methods=["POST"]),
    Route("/v1/models/{model}/predict", predict, methods=["POST"]),
]


class HotRoutes:
    """Innermost user middleware: answers the predict routes before FastAPI's exception middleware, exit
    stack and router (one regex match instead of walking every route), and the stream route's WebSocket
    (``service.api.stream``; any other upgrade is a 404 problem, a plain HTTP request to a stream path a 426);
    passes everything else on.

    A predict call gets its place in the queue of the engine its chunk goes to (the model's, by
    ``ServedModel.engine_for``) here, before its body is read or parsed: at once
    while there is room, else it waits, unread, up to ``GRU_QUEUE_PATIENCE_SECONDS`` for the first place
    that frees up (in arrival order), and is refused after that with the queue's 429 (counted as
    ``queue_full_unread``). Under overload a waiting call costs nothing, a refusal next to nothing, and
    clients that re-post at once on a 429 are slowed to one refusal per patience each, so the CPU goes to
    the chunks that are accepted.

    Outside it still run the body limit, auth, metrics and access log, and Starlette's server-error
    middleware; a ``Problem`` or an engine ``Refusal`` is answered here, any other exception (a client gone
    mid-body included) by ``service.middleware.ServerErrors``.
    """

    def __init__(self, app: ASGIApp, streams: Streams, patience: float):
        self.app = app
        self.streams = streams
        self.patience = patience

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
                    request = Request(scope, receive)
                    queue = _queue_of(request)
                    place = await queue.reserve(self.patience)
                    if place is None:
                        raise queue.overloaded("queue_full_unread")
                    scope[PLACE] = place
                    try:
                        response = await route.endpoint(request)
                    finally:
                        place.give_back()  # unless its chunk took it
                except (Problem, Refusal) as refused:
                    response = as_problem(refused).response(scope)
                await response(scope, receive, send)
                return
            as_upgrade = {**scope, "type": "websocket"}  # a WebSocketRoute matches only an upgrade's scope
            for stream_route in STREAM_ROUTES:
                if stream_route.matches(as_upgrade)[0] == Match.FULL:
                    scope["route"] = stream_route  # the template, for metrics and logs
                    await send_problem(Problem(
                        426, "upgrade-required", f"{scope['path']} is a WebSocket stream: connect with an"
                        " upgrade request (GET, Upgrade: websocket), one text frame per chunk",
                        headers={"Upgrade": "websocket", "Connection": "Upgrade"}), scope, send)
                    return
        elif scope["type"] == "websocket":
            for stream_route in STREAM_ROUTES:
                match, child_scope = stream_route.matches(scope)
                if match == Match.FULL:
                    scope.update(child_scope, route=stream_route)
                    await self.streams.serve(scope, receive, send)
                    return
            # the streams are the only WebSocket routes: any other upgrade gets the HTTP 404's problem
            await send_problem(Problem(404, "not-found", f"no WebSocket route {scope['path']}; streams are at"
                                       f" {STREAM_PATH} and {STREAM_MODEL_PATH}"), scope, send)
            return
        await self.app(scope, receive, send)


def _queue_of(request: Request) -> BatchQueue:
    """The queue the call's chunk will go to, known from its path and key alone (404 for an unknown model);
    the endpoint routes the chunk again once its body is read, in case a version changed meanwhile."""
    model = served_model(request)
    session_id = request.path_params.get("session_id")
    key = session_key(tenant_of(request), session_id) if session_id is not None else None
    return model.engine_for(key).queue


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
