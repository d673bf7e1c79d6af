"""REST v1 (README, "API (v1)"). Routers parse and answer; the engine judges and computes.

The two predict routes live in service.api.hot (the hot path); the batch route here reads its body raw,
parses the envelope with pydantic-core from the bytes, validates each item on its own (one bad item is that
item's problem, not the call's), and joins the engine's pre-serialised answers.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated

import numpy as np
import orjson
from fastapi import APIRouter, Depends, Header, Path, Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel

from service.api.bodies import chunk_array, parse, parse_item, wrong_item_keys
from service.api.deps import EngineDep, ModelDep, SettingsDep, model_path
from service.api.extras import requested
from service.api.openapi import body_schema, problem_responses
from service.api.preconditions import entity_tags, header_parameter
from service.auth import TenantDep, is_admin
from service.config import Settings
from service.engine import Engine
from service.extras import Extras, answer_values
from service.models import Registry, ServedModel
from service.problems import Problem, as_problem
from service.refusals import Refusal
from service.schemas import (
    BatchEnvelope,
    BatchItem,
    BatchRequest,
    BatchResponse,
    ModelEntry,
    ModelInfo,
    ModelList,
    ModelVersionInfo,
    ResetResponse,
    SessionInfo,
)
from service.session_ids import SESSION_ID_PATTERN
from service.session_state import Precondition, SessionStates
from service.sessions.base import Session, session_key

router = APIRouter(prefix="/v1", tags=["v1"])
SessionIdPath = Annotated[str, Path(pattern=SESSION_ID_PATTERN, description="Client-chosen session id")]
JSON = "application/json"


RAW_BODY_MODELS: list[type[BaseModel]] = [BatchRequest]


def _card(model: ServedModel) -> ModelInfo:
    engine = model.engine
    cfg = engine.forecaster.config
    meta = model.newest.meta
    return ModelInfo(
        name=meta["name"], version=engine.model_version, input_features=cfg.num_features,
        output_features=cfg.num_features, feature_names=list(cfg.features), hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers, variant=cfg.variant, lags=cfg.lags, device=str(engine.device),
        training=meta.get("training", {}),
    )


@router.get("/model", response_model=ModelInfo, summary="The default model's newest version")
async def model_info(model: ModelDep) -> ModelInfo:
    return _card(model)


@router.get("/models", response_model=ModelList, summary="Every served model and its loaded versions",
            responses=problem_responses(503))
async def list_models(request: Request, tenant: TenantDep) -> ModelList:
    """Each version's sessions are the caller's tenant's alone (how many another tenant holds is its own
    business); an admin key, the operator's, counts every tenant's: what keeps a version draining."""
    registry: Registry = request.app.state.registry
    entries = []
    for model in list(registry.models.values()):
        counts = await model.store.version_counts(None if is_admin(request) else tenant)
        versions = [ModelVersionInfo(version=str(v.number), model_version=v.model_version, state=model.state_of(v),
                                     sessions=counts.get(v.model_version, 0) if model.by_hash(v.model_version) is v
                                     else 0)
                    for v in sorted(model.versions.values(), key=lambda v: -v.number)]
        entries.append(ModelEntry(name=model.name, default=model.name == registry.default, versions=versions))
    return ModelList(models=entries)


@router.post(
    "/predict/batch", response_model=BatchResponse, summary="Chunks of many sessions in one call",
    openapi_extra=body_schema(BatchRequest), responses=problem_responses(400, 408, 413, 422, 429),
)
async def predict_batch(request: Request, model: ModelDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    """Every item is validated first (a bad one is its own problem); then the valid ones are queued together,
    in order, or, where the engine queue cannot take them all, the call is refused whole (429) and nothing of
    it applies: a client resends the call as it was, never half of it applied twice."""
    raw_body = await request.body()
    body = parse(raw_body, BatchEnvelope)
    most = batch_items_limit(settings)
    if len(body.items) > most:
        limit = ("GRU_MAX_BATCH_ITEMS" if most == settings.max_batch_items else "GRU_MAX_QUEUE") + f"={most}"
        detail = f"{len(body.items)} items, more than {limit}; split the call"
        raise Problem(422, "invalid-request", detail,
                      errors=[{"loc": ["body", "items"], "msg": detail, "type": "too_long"}])
    features = model.engine.forecaster.num_features
    wrong_keys = wrong_item_keys(raw_body, body.items, BatchItem)

    chunks: list[_Chunk | bytes] = []  # each item's chunk to queue, or its problem's JSON
    for index, raw in enumerate(body.items):
        loc = ["body", "items", str(index)]
        try:
            item = parse_item(raw, BatchItem, loc, wrong_keys.get(index))
            values = chunk_array(item.values, item.horizon, features, settings, [*loc, "values"])
            key = session_key(tenant, item.session_id)
            engine = model.engine_for(key)
            extras = requested(item.levels, item.scores, engine.forecaster, loc)
            chunks.append(_Chunk(engine, key, values, item.offset, item.horizon, extras))
        except (Problem, Refusal) as refused:
            chunks.append(orjson.dumps(as_problem(refused).body()))
    queued = [chunk for chunk in chunks if isinstance(chunk, _Chunk)]
    _check_answer_size(queued, settings)
    for engine, count in Counter(chunk.engine for chunk in queued).items():
        if not engine.queue.has_room(count):
            raise engine.queue.overloaded(count=len(queued))
    # No await from the check to the last enqueue: every chunk finds its place, in the items' order.
    answers: list[asyncio.Future[bytes] | bytes] = []
    for chunk in chunks:
        if isinstance(chunk, bytes):
            answers.append(chunk)
            continue
        try:
            answers.append(chunk.engine.enqueue(chunk.key, chunk.values, chunk.offset, chunk.horizon,
                                                extras=chunk.extras))
        except Refusal as refused:  # shutting down
            answers.append(orjson.dumps(as_problem(refused).body()))

    async def one(answer: asyncio.Future[bytes] | bytes) -> bytes:
        if isinstance(answer, bytes):
            return answer
        try:
            return await answer
        except Refusal as refused:
            return orjson.dumps(as_problem(refused).body())

    results = await asyncio.gather(*(one(answer) for answer in answers))
    return Response(b'{"results":[' + b",".join(results) + b"]}", media_type=JSON)


@dataclass(slots=True, frozen=True)
class _Chunk:
    """A valid batch item, ready to queue at its session's engine."""

    engine: Engine
    key: str
    values: np.ndarray
    offset: int | None
    horizon: int
    extras: Extras

    def answer_size(self) -> int:
        """The numbers this chunk's answer will hold."""
        steps, features = self.values.shape  # (T, F)
        return answer_values(steps, features, self.horizon, self.extras)


def _check_answer_size(queued: list[_Chunk], settings: Settings) -> None:
    """A 422 for a call whose answer would hold more numbers than GRU_MAX_BATCH_ANSWER_VALUES, before any of
    it is queued: each item is bounded by the chunk limits, but 256 of them with every extra answered 170 MB
    in one body, held whole in memory (README, "Errors")."""
    count = sum(chunk.answer_size() for chunk in queued)
    most = settings.max_batch_answer_values
    if count > most:
        raise Problem(422, "batch-answer-too-large",
                      f"the answer would hold {count} numbers (predictions, intervals, scores, forecasts of its"
                      f" valid items), more than GRU_MAX_BATCH_ANSWER_VALUES={most}; split the call or ask fewer"
                      " extras", limit=most, count=count)


def batch_items_limit(settings: Settings) -> int:
    """The most items one batch call may hold: GRU_MAX_BATCH_ITEMS, and no more than the engine queue takes
    at once (GRU_MAX_QUEUE), since a call is queued whole or not at all."""
    return min(settings.max_batch_items, settings.max_queue)


def _timestamp(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def describe(model: ServedModel, session_id: str, session: Session, expires: float) -> SessionInfo:
    """The ``GET /v1/sessions/{id}`` body of a session that expires at ``expires`` if nothing reaches it."""
    pinned = model.by_hash(session.model_version)
    return SessionInfo(
        session_id=session_id, position=session.position, model_version=session.model_version,
        model=model.name, version=str(pinned.number) if pinned is not None else None,
        created_at=_timestamp(session.created_at), updated_at=_timestamp(session.updated_at),
        expires_at=_timestamp(expires),
    )


# POST /v1/sessions/{session_id}/predict and POST /v1/predict are not here: they are answered by
# service/api/hot.py's HotRoutes middleware before this router is reached (the hot path; docs/architecture.md,
# "Why the predict routes bypass the router"). /docs still lists them, from hot.OPERATIONS. A session's state
# (export, import, fork: GET/PUT /v1/sessions/{session_id}/state, POST .../fork) is in service/api/state.py.


@router.get("/sessions/{session_id}", response_model=SessionInfo, summary="A session's position and age",
            responses=problem_responses(404, 422, 503))
async def get_session(session_id: SessionIdPath, model: ModelDep, tenant: TenantDep) -> SessionInfo:
    return describe(model, session_id, *await model.engine.session_info(session_key(tenant, session_id)))


@router.post("/sessions/{session_id}/reset", response_model=ResetResponse,
             summary="Start the session again at position 0 (creates it if unknown)",
             responses=problem_responses(422, 503))
async def reset_session(session_id: SessionIdPath, engine: EngineDep, tenant: TenantDep) -> ResetResponse:
    created = await engine.reset(session_key(tenant, session_id))
    return ResetResponse(session_id=session_id, position=0, created=created)


_DELETE_IF_MATCH = header_parameter("if-match", "Delete only the session at one of these entity tags (its state's"
                                    " `ETag`; 412 otherwise, and when there is none); `*`: only if it exists")
_DELETE_IF_NONE_MATCH = header_parameter("if-none-match", "Delete the session only if it is at none of these entity"
                                         " tags (compared weakly; 412 otherwise); `*`: 412 whenever it exists")


@router.delete("/sessions/{session_id}", status_code=204, summary="Forget a session",
               description="With `If-Match`, only while the session is at a listed entity tag (compared strongly,"
                           " as an import's); with `If-None-Match`, only while it is at none (compared weakly):"
                           " else 412 `precondition-failed`, and nothing is changed.",
               openapi_extra={"parameters": [_DELETE_IF_MATCH, _DELETE_IF_NONE_MATCH]},
               responses=problem_responses(400, 404, 412, 422, 429, 503))
async def delete_session(
    session_id: SessionIdPath, model: ModelDep, tenant: TenantDep,
    if_match: Annotated[list[str] | None, Header(include_in_schema=False)] = None,  # every field line
    if_none_match: Annotated[list[str] | None, Header(include_in_schema=False)] = None,
) -> Response:
    """Without a precondition: 204, or 404 for no session. With If-Match or If-None-Match (RFC 9110 13.1.1,
    13.1.2, in the order of 13.2.2), the session state API's judgement (``SessionStates.delete``): its tags,
    its 412, and a delete at the revision compared only."""
    key = session_key(tenant, session_id)
    precondition = Precondition(entity_tags(if_match, "If-Match", weak=False),
                                entity_tags(if_none_match, "If-None-Match", weak=True))
    if precondition.unconditional:
        await model.engine.delete(key)
    else:
        await SessionStates(model).delete(key, precondition)
    return Response(status_code=204)


def per_model(source: APIRouter) -> APIRouter:
    """Every route of ``source`` again under ``/v1/models/{model}/...``, serving that model (the card,
    ``/v1/model``, at ``/v1/models/{model}``; the list of models has no per-model form)."""
    routes = APIRouter(prefix="/v1/models/{model}", tags=["v1"], dependencies=[Depends(model_path)])
    for route in source.routes:
        if not isinstance(route, APIRoute) or route.path == "/v1/models":
            continue
        path = route.path.removeprefix("/v1")
        routes.add_api_route(
            "" if path == "/model" else path, route.endpoint,
            methods=list(route.methods or ()), response_model=route.response_model, response_class=route.response_class,
            status_code=route.status_code, summary=f"{route.summary} (one model)", description=route.description,
            responses={**route.responses, **problem_responses(404)}, openapi_extra=route.openapi_extra,
        )
    return routes


model_router = per_model(router)
