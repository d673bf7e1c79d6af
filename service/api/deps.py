"""Dependencies shared by the routers, as ``Annotated`` aliases.

A route under ``/v1/models/{model}/...`` serves that model; the same route without the prefix serves the
default model (``GRU_DEFAULT_MODEL``). The engine is the model's newest version's: new sessions start there,
and it hands a pinned session's chunk to its version's engine.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from service.config import Settings
from service.engine import Engine
from service.models import Registry, ServedModel
from service.problems import Problem


def served_model(request: Request) -> ServedModel:
    """The model a request names in its path (the default without one); 404 problem when unknown."""
    registry: Registry = request.app.state.registry
    name = request.path_params.get("model")
    model = registry.model(name)
    if model is None:
        raise Problem(404, "model-not-found", f"model {name!r} is not served here; GET /v1/models lists those"
                      " that are", model=name)
    return model


async def get_model(request: Request) -> ServedModel:
    return served_model(request)


async def get_engine(request: Request) -> Engine:
    return served_model(request).engine


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def model_path(model: Annotated[str, Path(description="A model's name, as GET /v1/models lists it")]) -> None:
    """Documents ``{model}`` on the per-model routes (the lookup itself is ``served_model``)."""


ModelDep = Annotated[ServedModel, Depends(get_model)]
EngineDep = Annotated[Engine, Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
