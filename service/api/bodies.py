"""The hot path's body handling: raw bytes -> validated model -> (T, F) float32 array, no detours.

pydantic-core validates straight from the bytes (strict types, no NaN/Infinity); what a schema cannot say
(the model's feature count, the step and horizon limits, float32 range) is checked here.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
from pydantic import BaseModel, JsonValue, TypeAdapter, ValidationError

from service.config import Settings
from service.problems import Problem, invalid
from service.schemas import SessionId

M = TypeVar("M", bound=BaseModel)
_SESSION_ID: TypeAdapter[str] = TypeAdapter(SessionId)


def parse(raw: bytes, model: type[M]) -> M:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise _invalid(exc, ["body"]) from None


def parse_item(item: JsonValue, model: type[M], loc: list[str]) -> M:
    """One element of a parsed body (a batch item), held to the rules ``parse`` holds bytes to: the same
    strict mode accepts and refuses the same JSON values from Python objects as from the bytes."""
    try:
        return model.model_validate(item)
    except ValidationError as exc:
        raise _invalid(exc, loc) from None


def path_session_id(raw: str) -> str:
    """The session id of a hot route's path, refused exactly as FastAPI refuses it on the other
    /v1/sessions routes (the same pydantic rule, so the same problem)."""
    try:
        return _SESSION_ID.validate_python(raw)
    except ValidationError as exc:
        raise _invalid(exc, ["path", "session_id"]) from None


def _invalid(exc: ValidationError, loc: list[str]) -> Problem:
    return invalid([{**e, "loc": (*loc, *e["loc"])} for e in exc.errors(include_url=False, include_input=False)])


def _shape_problem(detail: str, loc: list[str]) -> Problem:
    return Problem(422, "invalid-request", detail, errors=[{"loc": loc, "msg": detail, "type": "value_error"}])


def chunk_array(
    values: list[list[float]] | list[float], horizon: int, features: int, settings: Settings, loc: list[str]
) -> np.ndarray:
    """(T, F) float32 from the request's ``values``, with every limit checked; never partially accepted."""
    where = ".".join(loc)
    steps = len(values)  # at least 1: the schema's min_length
    if steps > settings.max_chunk_steps:
        raise _shape_problem(
            f"{where} has {steps} steps, more than GRU_MAX_CHUNK_STEPS={settings.max_chunk_steps}; split it", loc
        )
    if horizon > settings.max_horizon:
        raise _shape_problem(
            f"horizon {horizon} is over GRU_MAX_HORIZON={settings.max_horizon}", [*loc[:-1], "horizon"]
        )
    try:
        array = np.array(values, dtype=np.float32)
    except ValueError:  # ragged rows
        array = np.empty((steps, 0, 0), dtype=np.float32)
    if array.ndim == 1:
        if features != 1:
            raise _shape_problem(f"{where} is a flat list but the model takes {features} features per step;"
                                 f" send T × {features}", loc)
        array = array.reshape(steps, 1)  # (T, 1)
    elif array.ndim != 2 or array.shape[1] != features:
        raise _shape_problem(f"{where} must be T × {features} (the model's input_features); got rows of"
                             f" {sorted({len(r) for r in values if isinstance(r, list)})} values", loc)
    if not np.isfinite(array).all():
        raise _shape_problem(f"{where} holds numbers beyond float32 range (|x| > 3.4e38)", loc)
    return array
