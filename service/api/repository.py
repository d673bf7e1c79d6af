"""The model repository extension of the v2 protocol, as tritonclient speaks it (admin keys only).

- ``POST /v2/repository/index``: every model version on disk, ``READY`` where loaded, else ``UNAVAILABLE``
  with the reason (``{"ready": true}`` lists only the loaded ones);
- ``POST /v2/repository/models/{name}/load``: load the model's newest valid version (a new model, or one
  unloaded before); answers once it serves;
- ``POST /v2/repository/models/{name}/unload``: unload every version of a model; the default model is a 409.

With keys configured, each needs a key from GRU_ADMIN_KEYS: any other key is a 403.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Path, Request, Response

from service.api.openapi import problem_responses
from service.api.v2_codec import v2_problem
from service.auth import require_admin
from service.models import Registry, RegistryRefusal

router = APIRouter(prefix="/v2/repository", tags=["v2 (Open Inference Protocol)"],
                   dependencies=[Depends(require_admin)], responses=problem_responses(400, 403, 404, 409))
ModelName = Annotated[str, Path(description="A model's directory name in GRU_MODEL_REPOSITORY")]


async def _ready_only(request: Request) -> bool:
    """The index body's optional ``ready`` flag (tritonclient sends none, or ``{"ready": true}``)."""
    raw = await request.body()
    if not raw.strip():
        return False
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise v2_problem(400, "the body is not JSON") from None
    ready = body.get("ready", False) if isinstance(body, dict) else None
    if not isinstance(ready, bool):
        raise v2_problem(400, "the body must be an object whose optional \"ready\" is true or false")
    return ready


@router.post("/index", summary="Every model version in the repository, and whether it is loaded")
async def index(request: Request) -> list[dict[str, Any]]:
    registry: Registry = request.app.state.registry
    ready_only = await _ready_only(request)
    on_disk = await asyncio.to_thread(registry.repository.scan)
    entries: list[dict[str, Any]] = []
    for name in sorted(set(on_disk) | set(registry.models)):
        model = registry.models.get(name)
        numbers = {v.version for v in on_disk.get(name, [])} | set(model.versions if model else ())
        for number in sorted(numbers):
            if model is not None and number in model.versions:
                entries.append({"name": name, "version": str(number), "state": "READY"})
            elif not ready_only:
                reason = "unloaded on request" if name in registry.unloaded else "not loaded"
                entries.append({"name": name, "version": str(number), "state": "UNAVAILABLE", "reason": reason})
    return entries


async def _carry_out(action: Awaitable[None]) -> Response:
    try:
        await action
    except RegistryRefusal as refused:
        raise v2_problem(refused.status, refused.detail, kind="model-not-found" if refused.status == 404
                         else "repository-refused") from None
    return Response(status_code=200)


@router.post("/models/{model_name}/load", summary="Load a model's newest valid version")
async def load(model_name: ModelName, request: Request) -> Response:
    registry: Registry = request.app.state.registry
    return await _carry_out(registry.load(model_name))


@router.post("/models/{model_name}/unload", summary="Unload every version of a model (not the default)")
async def unload(model_name: ModelName, request: Request) -> Response:
    registry: Registry = request.app.state.registry
    answer = await _carry_out(registry.unload(model_name))
    await request.app.state.snapshots.forget(model_name)  # its sessions went: a restart must not bring them back
    return answer
