"""The hot path's body handling: raw bytes -> validated model -> (T, F) float32 array, no detours.

pydantic-core validates straight from the bytes (strict types, no NaN/Infinity); what a schema cannot say
(the model's feature count, the step and horizon limits, float32 range) is checked here. Unknown fields are
looked for first and the first one ends the check: a model refusing them builds one error per field, and a
body of 150,000 of them (3 MB) cost a second of the event loop, every client's latency. A small body (a
stream's chunk), or one of no more strings than the model has fields, is validated first instead, and taken
through that order only when refused: the answer is the same, and a valid one is parsed once.

A key given twice in one object is refused too (422, ``duplicate_key``), in the same pass: pydantic keeps the
last, other parsers the first, so a proxy or a client library could read another offset or chunk than the one
applied here. A validated body, or a batch's screened items, go to that pass only when the repeat screen
(``repeated_keys``, v2's too) doubts them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from functools import cache
from typing import TypeVar, cast

import numpy as np
from pydantic import BaseModel, JsonValue, TypeAdapter, ValidationError
from pydantic_core import PydanticCustomError, SchemaValidator, core_schema

from service.api.repeated_keys import delimiters, may_repeat, written_delimiters
from service.config import Settings
from service.problems import Problem, invalid
from service.schemas import SessionId

M = TypeVar("M", bound=BaseModel)
WrongKey = tuple[str, str]  # a body's key and why it is refused: "extra_forbidden" (unknown) or "duplicate_key"
# A body this small is validated at once, and looked at for unknown keys only if refused: a valid chunk (the
# usual case) is parsed once, not twice, and the most a refused one costs is bounded (keys of 6 bytes: ~290
# errors built, about 50 µs here).
_VALIDATE_FIRST_BYTES = 2048
_SESSION_ID: TypeAdapter[str] = TypeAdapter(SessionId)


def parse(raw: bytes, model: type[M]) -> M:
    if _forbids_extra(model):
        strings = delimiters(raw)  # counted once: the choice of order and the repeat screen both read it
        if len(raw) <= _VALIDATE_FIRST_BYTES or strings <= _most_delimiters(model):
            with contextlib.suppress(ValidationError):  # refused: judged again below, for the same problem
                parsed = model.model_validate_json(raw)
                if not _may_repeat_a_key(strings, parsed):
                    return parsed
    _refuse_key(_first_wrong_key(raw, model), ["body"])
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise _invalid(exc, ["body"]) from None


@cache
def _most_delimiters(model: type[BaseModel]) -> int:
    """The string delimiters of a body of any size validated first: a body of no more than two per field of
    ``model`` has no more keys than fields, so a refused one builds as few errors as a small body's."""
    return 2 * len(model.model_fields)


def _may_repeat_a_key(strings: int, parsed: BaseModel) -> bool:
    """Whether a body the model accepted, of ``strings`` string delimiters, may name a field twice: each key
    it names is a field, two quotes, so a body of no more delimiters than two per field set names none twice
    (a chunk: nothing written again); string values add delimiters, and send the body to the repeat screen
    (``may_repeat``, with the body's count already taken)."""
    return strings > 2 * len(parsed.model_fields_set) and strings > written_delimiters(_fields_set(parsed))


def _fields_set(parsed: BaseModel) -> dict[str, object]:
    """The fields a body set, as parsed: its keys and strings are what the repeat screen counts (a key given
    twice is one field here, and its lost value's strings are gone)."""
    return {name: getattr(parsed, name) for name in parsed.model_fields_set}


def parse_item(item: JsonValue, model: type[M], loc: list[str], wrong_key: WrongKey | None = None) -> M:
    """One element of a parsed body (a batch item), held to the rules ``parse`` holds bytes to: the same
    strict mode accepts and refuses the same JSON values from Python objects as from the bytes. A screened
    item (``BatchEnvelope``) is None where it was refused, and a repeated key was lost as it was parsed:
    ``wrong_key`` says which key is unknown or repeated, if one is."""
    _refuse_key(wrong_key, loc)
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


_REPEATED = "duplicate_key"
_REPEATED_MSG = "the field is given more than once"
_UNKNOWN = "extra_forbidden"


class _Keys:
    """What a key check saw, its validation's context: the fields allowed, the keys of the object being
    checked, and the first key refused of each object checked so far (a batch item, by index; a body is 0)."""

    def __init__(self, fields: frozenset[str]):
        self.fields = fields
        self.seen: set[str] = set()
        self.wrong: dict[int, WrongKey] = {}
        self.index = 0


def _judged_key(key: str, info: core_schema.ValidationInfo) -> str:
    """A key of the object being checked; one that is no field, or one named before, is noted and ends the
    object (``fail_fast``): pydantic-core sees every key of a JSON object, where a dict keeps one of each."""
    keys = cast(_Keys, info.context)
    kind = _UNKNOWN if key not in keys.fields else _REPEATED if key in keys.seen else None
    if kind is not None:
        keys.wrong[keys.index] = key, kind
        raise PydanticCustomError(kind, kind)
    keys.seen.add(key)
    return key


def _next_item(item: object, info: core_schema.ValidationInfo) -> object:
    """The end of a batch item, however its check ended: its keys are forgotten for the next one."""
    keys = cast(_Keys, info.context)
    keys.seen.clear()
    keys.index += 1
    return item


# Fails on every value, but on a small part of it: a refused value is copied into its error, and a batch's
# "items" holding one item of 150,000 unknown keys cost more to copy than to parse. Lists fail at their first
# element, objects at their first key.
_FAILS_AT_ONCE = core_schema.list_schema(
    core_schema.dict_schema(keys_schema=core_schema.str_schema(max_length=0), fail_fast=True), fail_fast=True)
# An object whose keys are judged one by one, stopping at the first refused; values are skipped (parsed by
# pydantic-core, never made Python objects).
_KEYED_OBJECT = core_schema.dict_schema(
    keys_schema=core_schema.with_info_after_validator_function(_judged_key, core_schema.str_schema()),
    values_schema=core_schema.with_default_schema(_FAILS_AT_ONCE, on_error="omit"), fail_fast=True,
)
_BODY_KEYS = SchemaValidator(_KEYED_OBJECT)
# ``{"items": [...]}``: each item judged as a body is, and None however its check ends (so an item of 150,000
# keys costs one parse, and the next item is still checked).
_ITEM_KEYS = SchemaValidator(core_schema.typed_dict_schema(
    {"items": core_schema.typed_dict_field(core_schema.list_schema(core_schema.with_info_after_validator_function(
        _next_item, core_schema.with_default_schema(_KEYED_OBJECT, on_error="default", default=None))))},
    extra_behavior="ignore",
))


def wrong_item_keys(raw: bytes, items: Sequence[JsonValue], model: type[BaseModel]) -> dict[int, WrongKey]:
    """The first unknown or repeated key of each item of a batch body that has one, by index (the items'
    parse kept one of each key, and made None of an item with an unknown one). Only a body with such an item,
    or one the repeat screen doubts, is parsed again to find them: one pass with a call per key, a third of a
    valid batch's parse."""
    keys = _Keys(_field_names(model))
    if None not in items and not may_repeat(raw, {"items": items}):
        return keys.wrong
    with contextlib.suppress(ValidationError):  # no list of items: the envelope's own validation says so
        _ITEM_KEYS.validate_json(raw, context=keys)
    return keys.wrong


def _first_wrong_key(raw: bytes, model: type[BaseModel]) -> WrongKey | None:
    """The body's first key that ``model`` does not have, or that it names again; None also where the body is
    no JSON object at all, which the model's own validation then answers."""
    keys = _Keys(_field_names(model))
    with contextlib.suppress(ValidationError):
        _BODY_KEYS.validate_json(raw, context=keys)
    return keys.wrong.get(0)


def _refuse_key(wrong: WrongKey | None, loc: list[str]) -> None:
    if wrong is not None:
        key, kind = wrong
        msg = _REPEATED_MSG if kind == _REPEATED else "Extra inputs are not permitted"
        raise invalid([{"loc": [*loc, _shown(key)], "msg": msg, "type": kind}])


_SHOWN_KEY_CHARS = 80  # of a refused key: an ordinary one whole


def _shown(key: str) -> str:
    """A refused key as its 422 names it, in ``loc`` and so in ``detail`` too: whole up to 80 characters, else
    its start and end around "..." (as v2 quotes a value), never all of a 4 MiB key twice (8.4 MB)."""
    if len(key) <= _SHOWN_KEY_CHARS:
        return key
    head = (_SHOWN_KEY_CHARS - 3) // 2
    return f"{key[:head]}...{key[len(key) - (_SHOWN_KEY_CHARS - 3 - head):]}"


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
