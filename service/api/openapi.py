"""OpenAPI for routes that FastAPI does not describe by itself.

The hot predict routes are plain Starlette routes (service.api.hot) and the batch route reads its body raw;
their request and response models still belong in /openapi.json and /docs. ``RawOperation`` describes
such an operation; ``document_raw_routes`` adds the operations and every model they name as components.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from service.problems import PROBLEM_JSON
from service.schemas import Problem as ProblemModel
from service.session_ids import SESSION_ID_PATTERN

REF_TEMPLATE = "#/components/schemas/{model}"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF_TEMPLATE.format(model=model.__name__)}


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The ``openapi_extra`` of a FastAPI route that reads its body raw."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _ref(model)}}}}


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying (the same offset is safe)",
                                 "schema": {"type": "integer", "minimum": 0}}}


def _problem(status: int) -> dict[str, Any]:
    """One problem response; a 429 or 503 also declares the Retry-After header it carries."""
    response: dict[str, Any] = {"description": "Problem", "content": {PROBLEM_JSON: {"schema": _ref(ProblemModel)}}}
    if status in (429, 503):
        response["headers"] = _RETRY_AFTER
    return response


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a FastAPI route for the problem statuses it can answer."""
    return {status: {"model": ProblemModel, **_problem(status)} for status in statuses}


@dataclass(frozen=True)
class RawOperation:
    path: str
    method: str
    summary: str
    description: str
    body: type[BaseModel]
    answer: type[BaseModel]
    problems: tuple[int, ...]
    session_path: bool = field(default=False)  # takes the {session_id} path parameter

    def describe(self) -> dict[str, Any]:
        responses: dict[str, Any] = {
            "200": {"description": "Successful Response",
                    "content": {"application/json": {"schema": _ref(self.answer)}}}
        }
        for status in self.problems:
            responses[str(status)] = _problem(status)
        operation: dict[str, Any] = {
            "tags": ["v1"], "summary": self.summary, "description": self.description,
            "operationId": f"{self.method}_{self.path.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
            **body_schema(self.body), "responses": responses,
        }
        parameters = []
        if "{model}" in self.path:
            parameters.append({"name": "model", "in": "path", "required": True, "schema": {"type": "string"},
                               "description": "A model's name, as GET /v1/models lists it"})
        if self.session_path:
            parameters.append({
                "name": "session_id", "in": "path", "required": True, "description": "Client-chosen session id",
                "schema": {"type": "string", "pattern": SESSION_ID_PATTERN},
            })
        if parameters:
            operation["parameters"] = parameters
        return operation


@dataclass(frozen=True)
class Limits:
    """What this service refuses beyond the models' static rules (configuration and the loaded model),
    stated in the schema so that clients and generated code see the real bounds."""

    steps: int  # GRU_MAX_CHUNK_STEPS
    horizon: int  # GRU_MAX_HORIZON
    items: int  # GRU_MAX_BATCH_ITEMS
    features: int  # the model's input_features


def _add_limits(schemas: dict[str, Any], limits: Limits) -> None:
    """Write ``limits`` into the request components (pydantic's schemas of the models are static)."""
    for name in ("ChunkRequest", "StatelessRequest", "BatchItem"):
        properties = schemas[name]["properties"]
        rows, flat = properties["values"]["anyOf"]  # Values: T × F rows, or a flat list of T
        rows["maxItems"] = flat["maxItems"] = limits.steps
        rows["items"]["minItems"] = rows["items"]["maxItems"] = limits.features
        properties["horizon"]["maximum"] = limits.horizon
    schemas["BatchRequest"]["properties"]["items"]["maxItems"] = limits.items


def document_raw_routes(
    app: FastAPI, operations: list[RawOperation], bodies: list[type[BaseModel]], limits: Limits
) -> None:
    """Extend the app's generated schema with ``operations``, the component schemas of ``bodies``, and
    the ``limits`` their fields have here."""
    models = {m for op in operations for m in (op.body, op.answer)} | set(bodies) | {ProblemModel}

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                                 description=app.description, routes=app.routes)
            _, definitions = models_json_schema(
                [(m, "validation") for m in sorted(models, key=lambda m: m.__name__)], ref_template=REF_TEMPLATE
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components.update(definitions.get("$defs", {}))
            _add_limits(components, limits)
            for op in operations:
                schema.setdefault("paths", {}).setdefault(op.path, {})[op.method] = op.describe()
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
