"""REST v1 (README, "API (v1)"). Routers parse and answer; the engine judges and computes.

The two predict routes live in service.api.hot (the hot path); the batch route here reads its body raw,
parses the envelope with pydantic-core from the bytes, validates each item on its own (one bad item is that
item's problem, not the call's), and joins the engine's pre-serialised answers.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated

import orjson
from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, JsonValue

from service.api.bodies import chunk_array, parse, parse_item
from service.api.deps import EngineDep, SettingsDep
from service.api.extras import requested
from service.api.openapi import body_schema, problem_responses
from service.auth import TenantDep
from service.problems import Problem, as_problem
from service.refusals import Refusal
from service.schemas import (
    SESSION_ID_PATTERN,
    BatchEnvelope,
    BatchItem,
    BatchRequest,
    BatchResponse,
    ModelInfo,
    ResetResponse,
    SessionInfo,
)
from service.sessions.base import session_key

router = APIRouter(prefix="/v1", tags=["v1"])
SessionIdPath = Annotated[str, Path(pattern=SESSION_ID_PATTERN, description="Client-chosen session id")]
JSON = "application/json"


RAW_BODY_MODELS: list[type[BaseModel]] = [BatchRequest]


@router.get("/model", response_model=ModelInfo, summary="The served model")
async def model_info(request: Request, engine: EngineDep) -> ModelInfo:
    cfg = engine.forecaster.config
    meta = request.app.state.model_meta
    return ModelInfo(
        name=meta["name"], version=engine.model_version, input_features=cfg.num_features,
        output_features=cfg.num_features, feature_names=list(cfg.features), hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers, variant=cfg.variant, lags=cfg.lags, device=str(engine.device),
        training=meta.get("training", {}),
    )


@router.post(
    "/predict/batch", response_model=BatchResponse, summary="Chunks of many sessions in one call",
    openapi_extra=body_schema(BatchRequest), responses=problem_responses(400, 408, 413, 422),
)
async def predict_batch(request: Request, engine: EngineDep, settings: SettingsDep, tenant: TenantDep) -> Response:
    body = parse(await request.body(), BatchEnvelope)
    if len(body.items) > settings.max_batch_items:
        detail = f"{len(body.items)} items, more than GRU_MAX_BATCH_ITEMS={settings.max_batch_items}; split the call"
        raise Problem(422, "invalid-request", detail,
                      errors=[{"loc": ["body", "items"], "msg": detail, "type": "too_long"}])
    features = engine.forecaster.num_features

    async def one(index: int, raw: JsonValue) -> bytes:
        loc = ["body", "items", str(index)]
        try:
            item = parse_item(raw, BatchItem, loc)
            values = chunk_array(item.values, item.horizon, features, settings, [*loc, "values"])
            extras = requested(item.levels, item.scores, engine.forecaster, loc)
            return await engine.predict(session_key(tenant, item.session_id), values, item.offset, item.horizon,
                                        extras=extras)
        except (Problem, Refusal) as refused:
            return orjson.dumps(as_problem(refused).body())

    answers = await asyncio.gather(*(one(i, item) for i, item in enumerate(body.items)))
    return Response(b'{"results":[' + b",".join(answers) + b"]}", media_type=JSON)


def _timestamp(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


# POST /v1/sessions/{session_id}/predict and POST /v1/predict are not here: they are answered by
# service/api/hot.py's HotRoutes middleware before this router is reached (the hot path; docs/architecture.md,
# "Why the predict routes bypass the router"). /docs still lists them, from hot.OPERATIONS.


@router.get("/sessions/{session_id}", response_model=SessionInfo, summary="A session's position and age",
            responses=problem_responses(404, 422, 503))
async def get_session(session_id: SessionIdPath, engine: EngineDep, tenant: TenantDep) -> SessionInfo:
    session, expires = await engine.session_info(session_key(tenant, session_id))
    return SessionInfo(
        session_id=session_id, position=session.position, model_version=session.model_version,
        created_at=_timestamp(session.created_at), updated_at=_timestamp(session.updated_at),
        expires_at=_timestamp(expires),
    )


@router.post("/sessions/{session_id}/reset", response_model=ResetResponse,
             summary="Start the session again at position 0 (creates it if unknown)",
             responses=problem_responses(422, 503))
async def reset_session(session_id: SessionIdPath, engine: EngineDep, tenant: TenantDep) -> ResetResponse:
    created = await engine.reset(session_key(tenant, session_id))
    return ResetResponse(session_id=session_id, position=0, created=created)


@router.delete("/sessions/{session_id}", status_code=204, summary="Forget a session",
               responses=problem_responses(404, 422, 503))
async def delete_session(session_id: SessionIdPath, engine: EngineDep, tenant: TenantDep) -> Response:
    await engine.delete(session_key(tenant, session_id))
    return Response(status_code=204)
