"""Open Inference Protocol (KServe v2 / Triton REST; docs/interop.md), on the same engine and sessions as v1.

Sequences follow Triton's sequence batcher, mapped onto v1 sessions of the caller's tenant:

- ``sequence_id`` 42 and "42" both name the v1 session "42"; without ``sequence_id`` the call is stateless.
- ``sequence_start``: the chunk starts the session again at 0 from a fresh state, in one commit with its
  result (``restart``), so a refused chunk (queue full, timeout, out of range) leaves the session as it was.
- no ``sequence_start``: the session must exist; the engine checks it when it judges the chunk, atomically
  with the commit (``must_exist``), so a sequence that ended or expired is a 404 and never silently
  restarted from a fresh state.
- ``sequence_end``: the session is deleted after the chunk is answered, if it is still the one the chunk left,
  leaving the chunk's fingerprint and answer for the TTL (``SessionStore.end``): an exact retry of that final
  chunk (same offset, values, horizon, levels, scores, and ``sequence_end``) is answered again, as v1 answers
  a retry of a session's last chunk; anything else finds the sequence ended.
- ``horizon`` adds the output ``forecast``; ``offset`` (our extension) is the v1 offset, for safe retries.

Every error carries the protocol's ``error`` member beside the RFC 9457 fields (tritonclient reads
``error`` from any non-200 answer, whatever its content type).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute

from service.api import repository
from service.api.deps import EngineDep, SettingsDep
from service.api.extras import requested
from service.api.health import require_ready
from service.api.openapi import problem_responses
from service.api.v2_codec import (
    FP32,
    HEADER_LENGTH,
    INPUT,
    OUTPUTS,
    InferRequest,
    encode_infer,
    parse_infer,
    v2_problem,
)
from service.auth import TenantDep
from service.config import Settings
from service.engine import Engine
from service.extras import Extras
from service.models import Registry, ServedModel
from service.problems import describe_errors, route_path
from service.refusals import Refusal, StaleModel, UnknownSession
from service.rules import fingerprint
from service.sessions.base import session_key

log = logging.getLogger("service.v2")
JSON = "application/json"


class _V2Route(APIRoute):
    """A malformed path or parameter is the protocol's 400, not FastAPI's 422 (the ``error`` member every
    problem under /v2 carries is added where problems are rendered, ``Problem.body``)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                raise v2_problem(400, f"invalid request: {describe_errors(exc.errors())}") from None

        return route


# Every v2 route may answer these (the union: 400 for a malformed path or request; 404 unknown model, version
# or sequence; 409/413/415 from infer; 422 when the model's outputs are not finite; 429/503 from the engine
# and the store).
router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"], route_class=_V2Route,
                   responses=problem_responses(400, 404, 408, 409, 413, 415, 422, 429, 503))
ModelName = Annotated[str, Path(description="A model's name, as GET /v1/models lists it")]
ModelVersion = Annotated[str, Path(description="A loaded version: its number (\"2\") or its hash (model_version)")]


def _served(request: Request, name: str, version: str | None) -> tuple[ServedModel, Engine]:
    """The model and the engine of ``version`` (its number or hash; the newest when None), or a 404."""
    registry: Registry = request.app.state.registry
    model = registry.model(name)
    if model is None:
        raise v2_problem(404, f"unknown model {name!r}; this server serves {', '.join(sorted(registry.models))}",
                         kind="model-not-found")
    if version is None:
        return model, model.engine
    loaded = model.find(version)
    if loaded is None:
        served = ", ".join(f"{v.number} ({v.model_version})" for v in model.versions.values())
        raise v2_problem(404, f"model {name!r} has no version {version!r} loaded; loaded: {served}",
                         kind="model-not-found")
    return model, loaded.engine


# -- server and model status -------------------------------------------------------------------------


@router.get("", summary="Server metadata")
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": "gru-service", "version": request.app.version,
            "extensions": ["binary_tensor_data", "sequence", "parameters"]}


@router.get("/health/live", summary="Liveness")
async def live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", summary="Readiness: model loaded and session store reachable")
async def ready(engine: EngineDep) -> dict[str, bool]:
    await require_ready(engine, ready=False)
    return {"ready": True}


def _metadata(model: ServedModel, engine: Engine, versions: list[str]) -> dict[str, Any]:
    features = engine.forecaster.num_features
    cfg = engine.forecaster.config
    return {
        "name": model.name,
        "versions": versions,
        "platform": "pytorch",
        "inputs": [{"name": INPUT, "datatype": FP32, "shape": [-1, features]}],
        "outputs": [{"name": name, "datatype": FP32, "shape": [-1, features]} for name in OUTPUTS],
        "parameters": {"feature_names": list(cfg.features), "variant": cfg.variant,
                       "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers},
    }


@router.get("/models/{model_name}", summary="Model metadata: tensors and loaded versions (hashes, newest first)")
async def model_metadata(model_name: ModelName, request: Request) -> dict[str, Any]:
    model, engine = _served(request, model_name, None)
    hashes = [model.versions[n].model_version for n in sorted(model.versions, reverse=True)]
    return _metadata(model, engine, list(dict.fromkeys(hashes)))


@router.get("/models/{model_name}/versions/{model_version}", summary="Model metadata of one version")
async def model_version_metadata(
    model_name: ModelName, model_version: ModelVersion, request: Request
) -> dict[str, Any]:
    model, engine = _served(request, model_name, model_version)
    return _metadata(model, engine, [engine.model_version])


@router.get("/models/{model_name}/ready", summary="Model readiness")
async def model_ready(model_name: ModelName, request: Request) -> dict[str, Any]:
    _served(request, model_name, None)
    return {"name": model_name, "ready": True}


@router.get("/models/{model_name}/versions/{model_version}/ready", summary="Model version readiness")
async def model_version_ready(
    model_name: ModelName, model_version: ModelVersion, request: Request
) -> dict[str, Any]:
    _served(request, model_name, model_version)
    return {"name": model_name, "ready": True}


# -- inference ---------------------------------------------------------------------------------------

_INFER_DOC: dict[str, Any] = {
    "requestBody": {"required": True, "content": {
        JSON: {"example": {
            "inputs": [{"name": INPUT, "shape": [3, 1], "datatype": FP32, "data": [0.31, 0.35, 0.42]}],
            "parameters": {"sequence_id": "pump-7", "sequence_start": True, "horizon": 2},
        }},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}, "description":
                                     f"binary tensor data extension: JSON header of {HEADER_LENGTH} bytes,"
                                     " then the raw tensors"},
    }},
}


async def _infer(request: Request, name: str, version: str | None, settings: Settings, tenant: str) -> Response:
    _served(request, name, version)  # an unknown model or version is refused before its body is read
    body = await request.body()
    # Looked up again once the body is in: while it arrived, a new version may have become the newest and the
    # one looked up been drained, its engine stopped (a stopped engine refuses chunks as at shutdown).
    model, engine = _served(request, name, version)
    lengths = request.headers.getlist(HEADER_LENGTH)  # several lines are one list, which no length parses as
    call = parse_infer(
        body, ", ".join(lengths) if lengths else None, features=engine.forecaster.num_features,
        max_steps=settings.max_chunk_steps, max_horizon=settings.max_horizon,
    )
    parameters: dict[str, Any] = {}
    extras = requested(call.levels, call.scores, engine.forecaster, ["parameters"])
    if call.session_id is None:
        answer = await engine.predict(None, call.values, None, call.horizon, extras=extras)
    else:
        key = session_key(tenant, call.session_id)
        if call.sequence_start:  # queued behind the session's chunks sent before it, wherever they wait
            answer = await model.engine_for(key).predict(key, call.values, 0, call.horizon, restart=True,
                                                         extras=extras)
        else:
            answer = await _continue(model.engine_for(key), key, call, extras)
    decoded = orjson.loads(answer)
    if call.session_id is not None:
        parameters = {"sequence_id": call.sequence_id, "sequence_position": decoded["position"]}
    # Encoded before the sequence ends: an answer that cannot be built (a resent chunk's kept answer, from
    # an imported document, without the outputs asked for) is a 422 that must leave the sequence as it was.
    encoded = encode_infer(call, model.name, decoded, parameters)
    if call.session_id is not None and call.sequence_end:
        await _end(engine, session_key(tenant, call.session_id), answer)
    return Response(encoded.body, media_type=encoded.media_type, headers=encoded.headers)


async def _continue(engine: Engine, key: str, call: InferRequest, extras: Extras) -> bytes:
    """A chunk after the first: the sequence must exist (Triton refuses an unknown correlation id too), unless
    the chunk is an exact retry of the final chunk of the sequence that ended there (``_retried_end``). Both
    refusals say what to do in v2's terms: a sequence starts again with ``sequence_start``."""
    sequence_id = call.sequence_id
    try:
        return await engine.predict(key, call.values, call.offset, call.horizon, must_exist=True, extras=extras)
    except UnknownSession:
        if (answer := await _retried_end(engine, key, call, extras)) is not None:
            return answer
        raise v2_problem(404, f"sequence {sequence_id!r} is not active (never started, ended or expired);"
                         " send its first chunk with sequence_start=true", kind="sequence-not-found",
                         sequence_id=sequence_id) from None
    except StaleModel as refused:
        raise v2_problem(409, f"sequence {sequence_id!r} was started with another model version; the service"
                         f" now runs {engine.model_version}: send this chunk with sequence_start=true to start the"
                         " sequence again", kind=refused.kind, sequence_id=sequence_id, **refused.extra) from None


async def _retried_end(engine: Engine, key: str, call: InferRequest, extras: Extras) -> bytes | None:
    """The kept answer when ``call`` resends, with its offset (as a v1 retry needs), the final chunk that ended
    the sequence at ``key``; None for any other chunk, which finds the sequence ended."""
    if not call.sequence_end or call.offset is None:
        return None
    ended = await engine.store.ended(key)
    if ended is None or ended.fingerprint != fingerprint(call.offset, call.horizon, call.values, extras):
        return None
    return ended.answer


async def _end(engine: Engine, key: str, answer: bytes) -> None:
    """``sequence_end``: forget the session, if it is still the one this chunk left, leaving the chunk's answer
    as its ended mark (``_retried_end``). The session keeps the chunk's
    ``answer`` (for an exact retry), so one holding another was written since (an import, a new sequence under
    the id) and is not the sequence that ended: it stays. The delete is at the revision read, so a write
    between the read and the delete stays too. The chunk is already applied and answered, so a failed delete
    is logged, not returned: a client retrying it would apply the chunk twice. The session then expires."""
    try:
        session = await engine.store.peek(key)  # a read, no use: a session that stays is not refreshed by it
        if session is not None and session.answer == answer:
            await engine.store.end(key, session.revision)
    except Refusal as refused:
        log.warning("sequence_end: session not deleted (%s); it will expire", refused.detail)


@router.post("/models/{model_name}/infer", summary="Inference (JSON or binary tensors, sequences)",
             openapi_extra=_INFER_DOC)
async def infer(model_name: ModelName, request: Request, settings: SettingsDep, tenant: TenantDep) -> Response:
    return await _infer(request, model_name, None, settings, tenant)


@router.post("/models/{model_name}/versions/{model_version}/infer", summary="Inference on one model version",
             openapi_extra=_INFER_DOC)
async def infer_version(
    model_name: ModelName, model_version: ModelVersion, request: Request, settings: SettingsDep, tenant: TenantDep,
) -> Response:
    return await _infer(request, model_name, model_version, settings, tenant)


async def unknown(request: Request) -> Response:
    """Anything else under /v2 (model config, statistics, shared memory): not served; a served path with
    another method, the repository extension's included, is a 405 (this route would otherwise take it,
    matching every path)."""
    here, path = route_path(request.scope), request.path_params["path"]
    served = [route for route in (*router.routes, *repository.router.routes) if isinstance(route, APIRoute)
              and route.path_regex.match(here)]
    allowed = sorted({method for route in served for method in route.methods or ()})
    if allowed:
        raise v2_problem(405, f"{request.method} is not allowed on /v2/{path}; use {' or '.join(allowed)}",
                         kind="method-not-allowed", headers={"Allow": ", ".join(allowed)})
    raise v2_problem(404, f"{request.method} /v2/{path} is not served here; this server implements the v2"
                     " health, metadata and infer endpoints", kind="not-found")


# Every method (a Starlette route with an empty list of methods takes any): a method it did not list was left
# to Starlette's 405, whose Allow named this route's methods, as it matches every path (PROPFIND on
# /v2/health/live: "GET, POST, PUT, PATCH, DELETE"; on an unserved path a 405, where other methods get 404).
router.add_route(f"{router.prefix}/{{path:path}}", unknown, methods=[], include_in_schema=False)
