"""Request and response models: the documented contract (README, "API (v1)") and the validation of every body.

Validation runs in pydantic-core straight from the raw bytes (``validate_json``; a batch's items from the
parsed envelope, one by one, under the same strict config): strict types (no "1.5" strings or ``true`` for
numbers), no NaN/Infinity, unknown fields refused.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, GetCoreSchemaHandler, JsonValue, StringConstraints
from pydantic_core import core_schema

from service.session_ids import SESSION_ID_PATTERN

SessionId = Annotated[str, StringConstraints(pattern=SESSION_ID_PATTERN)]
# fail_fast: a bad element ends the list's validation, so a 4 MiB body of `{}` costs one error, not a million
# (each of which would be built, listed in the 422 and serialised). min_length: at least one step.
Values = (
    Annotated[list[Annotated[list[float], Field(fail_fast=True)]], Field(min_length=1, fail_fast=True)]
    | Annotated[list[float], Field(min_length=1, fail_fast=True)]
)

_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

_VALUES_DOC = (
    "The chunk's steps, T × F (F = the model's input_features). A flat list is T steps of a single feature."
)
_OFFSET_DOC = (
    "The position this chunk starts at. Equal to the session's position: applied. Equal to the last chunk's "
    "offset with the same values and horizon: that answer again (safe retry). Otherwise 409. Omitted: appended."
)
_HORIZON_DOC = "Steps to forecast past the chunk by feeding predictions back; never moves the session."
_LEVELS_DOC = (
    "Interval levels in percent, each strictly between 0 and 100, distinct, 1 to 4: adds `intervals` around the"
    " predictions (and `forecast_intervals` around a forecast). Needs a calibrated model (else 422)."
)
_SCORES_DOC = (
    "true adds `scores`: each value's conformal p-value against the prediction made before it arrived (1"
    " ordinary, near 0 surprising; null for a series' first K + 1 values (K: the model's `lags`), whose"
    " predictions had no full lag window). Needs a calibrated model (else 422)."
)
Levels = Annotated[list[Annotated[float, Field(gt=0, lt=100)]], Field(min_length=1, max_length=4)]


class ChunkRequest(BaseModel):
    """A chunk for a stateful session."""

    model_config = ConfigDict(
        **_STRICT,
        json_schema_extra={"examples": [{"values": [[0.31], [0.35], [0.42]], "offset": 0, "horizon": 5}]},
    )
    values: Values = Field(description=_VALUES_DOC)
    offset: int | None = Field(None, ge=0, description=_OFFSET_DOC)
    horizon: int = Field(0, ge=0, description=_HORIZON_DOC)
    levels: Levels | None = Field(None, description=_LEVELS_DOC)
    scores: bool = Field(False, description=_SCORES_DOC)


class StatelessRequest(BaseModel):
    """A whole series, run from a fresh state; nothing is kept."""

    model_config = ConfigDict(
        **_STRICT, json_schema_extra={"examples": [{"values": [0.31, 0.35, 0.42, 0.40], "horizon": 3}]}
    )
    values: Values = Field(description=_VALUES_DOC)
    horizon: int = Field(0, ge=0, description=_HORIZON_DOC)
    levels: Levels | None = Field(None, description=_LEVELS_DOC)
    scores: bool = Field(False, description=_SCORES_DOC)


class BatchItem(ChunkRequest):
    """One session's chunk inside a batch call."""

    model_config = ConfigDict(
        **_STRICT,
        json_schema_extra={"examples": [{"session_id": "pump-7", "values": [0.31, 0.35], "offset": 0}]},
    )
    session_id: SessionId = Field(description="Session id, as in the path of /v1/sessions/{session_id}/predict")


class BatchRequest(BaseModel):
    model_config = ConfigDict(
        **_STRICT,
        json_schema_extra={
            "examples": [
                {
                    "items": [
                        {"session_id": "pump-7", "values": [0.31, 0.35], "offset": 0},
                        {"session_id": "pump-8", "values": [[0.12], [0.10]], "horizon": 2},
                    ]
                }
            ]
        },
    )
    items: list[BatchItem] = Field(min_length=1, description="Chunks of any sessions; each is judged on its own")


class _ScreenedItem:
    """A batch item as the envelope reads it: an object of ``BatchItem``'s fields (values not yet judged), or
    None for anything else, an object with an unknown field included. Screened in pydantic-core, stopping at
    the first unknown key, so an item of 150,000 unknown fields never becomes 150,000 Python objects."""

    def __get_pydantic_core_schema__(self, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        known = core_schema.dict_schema(keys_schema=core_schema.literal_schema(sorted(BatchItem.model_fields)),
                                        values_schema=core_schema.any_schema(), fail_fast=True)
        return core_schema.with_default_schema(known, on_error="default", default=None)


class BatchEnvelope(BaseModel):
    """How the batch route reads its body (documented as ``BatchRequest``): the items are only screened here,
    then each is validated as a ``BatchItem`` on its own, so a bad item gets its own problem in ``results``
    and the others are still answered."""

    model_config = ConfigDict(**_STRICT)
    items: list[Annotated[dict[str, JsonValue] | None, _ScreenedItem()]] = Field(min_length=1)


class Band(BaseModel):
    lower: list[list[float]]
    upper: list[list[float]]


class PredictionResponse(BaseModel):
    predictions: list[list[float]] = Field(description="One-step-ahead prediction after each step, T × F_out")
    forecast: list[list[float]] | None = Field(
        None, description="Only with horizon > 0: horizon × F_out; forecast[0] is the last prediction"
    )
    intervals: dict[str, Band] | None = Field(
        None, description="Only with levels: per level (keyed as format(level, 'g')), bounds around predictions"
    )
    forecast_intervals: dict[str, Band] | None = Field(
        None, description="Only with levels and horizon > 0: per level, bounds around the forecast"
    )
    scores: list[list[float | None]] | None = Field(
        None, description="Only with scores: T × F p-values of the arriving values; null where none"
    )
    model_version: str
    model: str | None = Field(None, description="The model that answered (GET /v1/models)")
    version: str | None = Field(None, description="Its version in the model repository")


class SessionPredictResponse(PredictionResponse):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "session_id": "pump-7",
                    "position": 3,
                    "predictions": [[0.33], [0.39], [0.45]],
                    "forecast": [[0.45], [0.47], [0.48], [0.5], [0.51]],
                    "model_version": "3f2a9c1b7d0e",
                    "created": True,
                }
            ]
        }
    )
    session_id: str
    position: int = Field(description="Steps consumed by the session, this chunk included")
    created: bool = Field(description="True when this chunk started the session")
    upgraded: bool | None = Field(None, description="GRU_UPGRADE=replay: true on the chunk that moved the"
                                  " session onto the newest version")


def encode_answer(predictions: np.ndarray, forecast: np.ndarray | None, model_version: str,
                  session: tuple[str, int, bool] | None = None, label: tuple[str, str] | None = None,
                  extras: dict[str, Any] | None = None, upgraded: bool = False) -> bytes:
    """A ``PredictionResponse``, or with ``session`` (id, position, created) a ``SessionPredictResponse``;
    ``label`` (model name, repository version) adds ``model`` and ``version``, ``upgraded`` the flag of a
    session moved onto this version by GRU_UPGRADE=replay,
    as the JSON bytes the engine answers and keeps for exact retries: built once, straight from the arrays
    (orjson; NaN, a score with nothing to score against, is written null), not through the pydantic models
    above, which document it. ``extras``: the intervals and scores asked for, after the forecast."""
    body: dict[str, Any] = {}
    if session is not None:
        body["session_id"], body["position"] = session[0], session[1]
    body["predictions"] = predictions
    if forecast is not None:
        body["forecast"] = forecast
    if extras:
        body.update(extras)
    body["model_version"] = model_version
    if label is not None:
        body["model"], body["version"] = label
    if session is not None:
        body["created"] = session[2]
    if upgraded:
        body["upgraded"] = True
    return orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)


def answer_prefix(session_id: str) -> bytes:
    """How every session answer ``encode_answer`` makes for ``session_id`` begins: its id comes first."""
    return b'{"session_id":' + orjson.dumps(session_id) + b","


class Problem(BaseModel):
    """RFC 9457 problem details, with extension members such as ``position`` or ``errors``."""

    model_config = ConfigDict(extra="allow")
    type: str
    title: str
    status: int
    detail: str


class BatchResponse(BaseModel):
    results: list[SessionPredictResponse | Problem] = Field(description="One answer or problem per item, in order")


class SessionInfo(BaseModel):
    session_id: str
    position: int
    model_version: str
    model: str = Field(description="The session's model")
    version: str | None = Field(description="The loaded version its state belongs to; null: none is loaded")
    created_at: datetime
    updated_at: datetime
    expires_at: datetime


class ForkRequest(BaseModel):
    """Where a fork goes: a new session of the same tenant."""

    model_config = ConfigDict(**_STRICT, json_schema_extra={"examples": [{"to": "pump-7-what-if"}]})
    to: SessionId = Field(description="The new session's id; it must not exist")


class ResetResponse(BaseModel):
    session_id: str
    position: int = 0
    created: bool = Field(description="True when the session did not exist before")


class ModelVersionInfo(BaseModel):
    version: str = Field(description="The version's number in the model repository")
    model_version: str = Field(description="Hash of its weights and config")
    state: str = Field(description="serving: new sessions start here; draining: kept for its pinned sessions")
    sessions: int = Field(description="The caller's tenant's sessions whose state belongs to this version"
                                      " (an admin key's: every tenant's)")


class ModelEntry(BaseModel):
    name: str
    default: bool = Field(description="True for the model behind the routes without /models/{model}")
    versions: list[ModelVersionInfo]


class ModelList(BaseModel):
    models: list[ModelEntry]


class ModelInfo(BaseModel):
    name: str
    version: str
    input_features: int
    output_features: int
    feature_names: list[str]
    hidden_size: int
    num_layers: int
    variant: str
    lags: int
    device: str
    training: dict[str, Any] = Field(default_factory=dict, description="Summary of the training run")
