"""The hot path's body handling: raw bytes -> validated model -> (T, F) float32 array, no detours.

pydantic-core validates straight from the bytes (strict types, no NaN/Infinity); what a schema cannot say
(the model's feature count, the step and horizon limits, float32 range) is checked here. Unknown fields are
looked for first and the first one ends the check: a model refusing them builds one error per field, and a
body of 150,000 of them (3 MB) cost a second of the event loop, every client's latency. A small body (a
stream's chunk) is validated first instead, and taken through that order only when refused: the answer is the
same, and a valid one is parsed once.
"""

from __future__ import annotations

import contextlib
from functools import cache
from typing import TypeVar

import numpy as np
from pydantic import BaseModel, JsonValue, TypeAdapter, ValidationError
from pydantic_core import SchemaValidator, core_schema

from service.config import Settings
from service.problems import Problem, invalid
from service.schemas import SessionId

M = TypeVar("M", bound=BaseModel)
# A body this small is validated at once, and looked at for unknown keys only if refused: a valid chunk (the
# usual case) is parsed once, not twice, and the most a refused one costs is bounded (keys of 6 bytes: ~290
# errors built, about 50 µs here).
_VALIDATE_FIRST_BYTES = 2048
_SESSION_ID: TypeAdapter[str] = TypeAdapter(SessionId)


def parse(raw: bytes, model: type[M]) -> M:
    if len(raw) <= _VALIDATE_FIRST_BYTES and _forbids_extra(model):
        with contextlib.suppress(ValidationError):  # refused: judged again below, for the same problem
            return model.model_validate_json(raw)
    _refuse_unknown_field(_first_unknown_field(raw, model), ["body"])
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise _invalid(exc, ["body"]) from None


def parse_item(item: JsonValue, model: type[M], loc: list[str], unknown_field: str | None = None) -> M:
    """One element of a parsed body (a batch item), held to the rules ``parse`` holds bytes to: the same
    strict mode accepts and refuses the same JSON values from Python objects as from the bytes. A screened
    item (``BatchEnvelope``) is None where it was refused: ``unknown_field`` then says why, if that was why."""
    _refuse_unknown_field(unknown_field, loc)
    try:
        return model.model_validate(item)
    except ValidationError as exc:
        raise _invalid(exc, loc) from None


@cache
def _forbids_extra(model: type[BaseModel]) -> bool:
    """Whether ``model`` refuses unknown keys itself: then a body it accepts has none to look for."""
    return model.model_config.get("extra") == "forbid"


@cache
def _field_names(model: type[BaseModel]) -> frozenset[str]:
    return frozenset(field.alias or name for name, field in model.model_fields.items())


@cache
def _key_check(model: type[BaseModel]) -> SchemaValidator:
    """A JSON object whose keys are ``model``'s fields, stopping at the first that is not; values are skipped
    (parsed by pydantic-core, never made Python objects)."""
    return SchemaValidator(core_schema.dict_schema(
        keys_schema=core_schema.literal_schema(sorted(_field_names(model))),
        values_schema=core_schema.with_default_schema(_FAILS_AT_ONCE, on_error="omit"),
        fail_fast=True,
    ))


# Fails on every value, but on a small part of it: a refused value is copied into its error, and a batch's
# "items" holding one item of 150,000 unknown keys cost more to copy than to parse. Lists fail at their first
# element, objects at their first key.
_FAILS_AT_ONCE = core_schema.list_schema(
    core_schema.dict_schema(keys_schema=core_schema.str_schema(max_length=0), fail_fast=True), fail_fast=True)


@cache
def _item_key_check(model: type[BaseModel]) -> SchemaValidator:
    """``{"items": [...]}`` whose items are objects of ``model``'s fields, each item stopping at its first
    unknown key (so one error per item at most)."""
    item = core_schema.dict_schema(
        keys_schema=core_schema.literal_schema(sorted(_field_names(model))),
        values_schema=core_schema.with_default_schema(core_schema.none_schema(), on_error="omit"), fail_fast=True,
    )
    return SchemaValidator(core_schema.typed_dict_schema(
        {"items": core_schema.typed_dict_field(core_schema.list_schema(item))}, extra_behavior="ignore"
    ))


def unknown_item_fields(raw: bytes, model: type[BaseModel]) -> dict[int, str]:
    """The first unknown field of each item of a batch body that has one, by index. Call it on a body whose
    item count is already within bounds: it builds one error per refused item."""
    try:
        _item_key_check(model).validate_json(raw)
    except ValidationError as exc:
        return {int(error["loc"][1]): str(error["loc"][2])
                for error in exc.errors(include_url=False, include_input=False)
                if error["type"] == "literal_error" and len(error["loc"]) == 4}
    return {}


def _first_unknown_field(raw: bytes, model: type[BaseModel]) -> str | None:
    """The body's first key that ``model`` does not have; None also where the body is no JSON object at all,
    which the model's own validation then answers."""
    try:
        _key_check(model).validate_json(raw)
    except ValidationError as exc:
        error = exc.errors(include_url=False, include_input=False)[0]  # fail_fast: the only one
        if error["type"] == "literal_error":
            return str(error["loc"][0])
    return None


def _refuse_unknown_field(key: str | None, loc: list[str]) -> None:
    if key is not None:
        raise invalid([{"loc": [*loc, key], "msg": "Extra inputs are not permitted",
                        "type": "extra_forbidden"}])


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


_WITHIN_FLOAT32 = 3.4e38  # below float32's largest value (3.4028e38): the cast of a smaller one is finite


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
        array = np.array(values, dtype=np.float64)  # the parsed numbers, exactly (Python floats)
    except ValueError:  # ragged rows
        array = np.empty((steps, 0, 0))
    if array.ndim == 1:
        if features != 1:
            raise _shape_problem(f"{where} is a flat list but the model takes {features} features per step;"
                                 f" send T × {features}", loc)
        array = array.reshape(steps, 1)  # (T, 1)
    elif array.ndim != 2 or array.shape[1] != features:
        raise _shape_problem(f"{where} must be T × {features} (the model's input_features); got rows of"
                             f" {sorted({len(r) for r in values if isinstance(r, list)})} values", loc)
    if np.abs(array).max() < _WITHIN_FLOAT32:  # T × F, F >= 1: never empty
        return array.astype(np.float32)
    with np.errstate(over="ignore"):  # near float32's limit: a value beyond it becomes inf, refused below
        narrowed = array.astype(np.float32)
    if not np.isfinite(narrowed).all():
        raise _shape_problem(f"{where} holds numbers beyond float32 range (|x| > 3.4e38)", loc)
    return narrowed
