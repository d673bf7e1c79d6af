"""Open Inference Protocol (KServe v2) bodies: an inference request -> one (T, F) chunk, an answer -> bytes.

Both tensor encodings of the protocol, in requests and answers:

- JSON: a tensor's ``data`` is its elements in row-major order, flat or nested to the tensor's shape.
- Binary tensor data extension (what tritonclient sends by default): the body is the JSON header, whose
  length is the ``Inference-Header-Content-Length`` header, followed by the raw little-endian bytes of each
  tensor that carries a ``binary_data_size`` parameter, in the order the tensors are listed. An output is
  answered in binary when its request entry says ``"binary_data": true`` or, with no outputs listed, when
  the request parameter ``binary_data_output`` is true.

Intervals and scores (README, "Intervals and surprise scores") are asked for with the request parameters
``levels`` (1 to 4 percentages) and ``scores`` (true), and answered as extra FP32 outputs: ``lower_<level>``
and ``upper_<level>`` (T × F) around the predictions, ``forecast_lower_<level>`` and ``forecast_upper_<level>``
around a forecast, and ``scores`` (T × F, NaN where a value has nothing to be scored against; null in JSON).

Every failure here is a ``Problem`` (400, the protocol's "bad request"; 413 or 415 for the body's size
or encoding) carrying the protocol's ``error`` member, so tritonclient shows our message. References: the
KServe "Open Inference Protocol" REST spec and Triton's ``binary_data.md`` and ``sequence_extension`` docs.
"""

from __future__ import annotations

import itertools
import math
import reprlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.api.repeated_keys import may_repeat, repeated_key
from service.extras import level_key, repeats_a_level
from service.http_fields import decimal_length
from service.problems import Problem, describe_errors
from service.session_ids import SESSION_ID, SESSION_ID_RULE

INPUT = "values"
PREDICTIONS = "predictions"
FORECAST = "forecast"
OUTPUTS = (PREDICTIONS, FORECAST)
SCORES = "scores"
MAX_LEVELS = 4
FP32 = "FP32"
HEADER_LENGTH = "Inference-Header-Content-Length"
UINT64_MAX = 2**64 - 1
MAX_OFFSET = 2**62  # positions are int64 in the chunk fingerprint; no stream gets near this
_LOOSE = ConfigDict(strict=True, extra="ignore")  # the protocol lets clients add fields we do not use
# Every list stops at its first bad element (``fail_fast``): an error for each, all built to name the first
# few, made a 4 MB body of empty tensors cost 2.4 GB and over a minute of the event loop to refuse. And a
# list longer than the model can take is refused at its count, before any element is looked at: 4 MB of
# valid extra input tensors cost 0.36 s to refuse, 180,000 outputs 0.9 s. The model takes one input of
# 2 or 3 dimensions (the bounds leave a few more, named in the refusal) and answers each output once.
MAX_INPUTS = 8
MAX_DIMS = 8
MAX_OUTPUTS = len(OUTPUTS) + 1 + 4 * MAX_LEVELS  # predictions, forecast, scores, 4 interval bounds a level


def v2_problem(status: int, detail: str, kind: str = "invalid-inference-request", **extra: Any) -> Problem:
    """A refused inference request (the protocol's ``error`` member is added by ``Problem.body`` under /v2)."""
    return Problem(status, kind, detail, **extra)


_QUOTED = reprlib.Repr()  # 6 elements of a list, 4 keys of a dict, ...
_QUOTED.maxstring = 80  # the names and ids of ordinary requests whole


def _quote(value: Any) -> str:
    """A client's value as a refusal shows it: its repr, cut to a few elements and a few dozen characters,
    so that an answer never echoes megabytes of the request (a 4 MB name was answered whole)."""
    return _QUOTED.repr(value)


class _Tensor(BaseModel):
    model_config = _LOOSE
    name: str
    shape: list[int] = Field(fail_fast=True, max_length=MAX_DIMS)
    datatype: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    data: Any = None


class _RequestedOutput(BaseModel):
    model_config = _LOOSE
    name: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class _InferRequest(BaseModel):
    model_config = _LOOSE
    id: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    inputs: list[_Tensor] = Field(fail_fast=True, max_length=MAX_INPUTS)
    outputs: list[_RequestedOutput] | None = Field(None, fail_fast=True, max_length=MAX_OUTPUTS)


@dataclass(slots=True)
class InferRequest:
    """What the router needs from a v2 inference request, every limit already checked."""

    id: str | None
    values: np.ndarray  # (T, F) float32
    batched: bool  # the input was [1, T, F]: the outputs get the leading 1 too
    sequence_id: str | int | None  # as sent (echoed in the answer)
    session_id: str | None  # the v1 session id it names
    sequence_start: bool
    sequence_end: bool
    horizon: int
    offset: int | None  # our extension: the v1 offset, for safe retries
    outputs: dict[str, bool]  # output name -> answer it in binary
    levels: list[float] | None  # interval levels asked for (percent)
    scores: bool  # the p-values of the arriving values asked for


# -- the body ------------------------------------------------------------------------------------------


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    cut = decimal_length(header_length.encode("latin-1"))  # Starlette decoded the header as latin-1
    if cut is None or cut > len(body):
        raise v2_problem(400, f"{HEADER_LENGTH} is {_quote(header_length)}, but the body has {len(body)} bytes; it"
                         " must be the length of the JSON header that starts the body")
    return body[:cut], body[cut:]


def _load(header: bytes) -> tuple[dict[str, Any], _InferRequest]:
    """The parsed JSON header, and the request it holds."""
    try:
        document = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise v2_problem(400, f"the inference request is not valid JSON ({exc}; NaN and Infinity are not"
                         " JSON)", kind="malformed-json") from None
    if not isinstance(document, dict):
        raise v2_problem(400, "the inference request must be a JSON object with an `inputs` list")
    try:
        return document, _InferRequest.model_validate(document)
    except ValidationError as exc:
        where = describe_errors(exc.errors(include_url=False, include_input=False))
        raise v2_problem(400, f"the inference request does not match the protocol: {where}") from None


# Past this, a header found to repeat a key is refused without naming it: naming it takes Python's parser, whose
# hook per object cost 1.6 s of the event loop for 4 MB of small objects.
_NAMED_UP_TO = 64 * 1024


def _refuse_repeated_keys(header: bytes, document: dict[str, Any]) -> None:
    """A key given twice in one object is refused, as v1 refuses it: orjson keeps the last, Triton's parser
    the first, so a gateway could read another sequence or other values than the ones applied. The parse kept
    one of each, so a header with no more string delimiters than the parsed document written out again holds
    no repeat; one with more is parsed again, keeping every key, to name the key. The input's data, checked
    to be numbers only, has no string: it is left out of the document written again."""
    tensor = document["inputs"][0]
    numbers = {**tensor, "data": None} if "data" in tensor else tensor
    if not may_repeat(header, {**document, "inputs": [numbers]}):
        return
    if len(header) > _NAMED_UP_TO:
        raise v2_problem(400, "a key is given twice in one object of the inference request; parsers disagree on"
                         " which one counts: send each once")
    try:
        key = repeated_key(header)
    except RecursionError:  # json's parser stops short of orjson's 1,024 levels
        raise v2_problem(400, "the inference request nests too deeply to be checked for keys given twice;"
                         " send fewer levels of nesting") from None
    if key is not None:
        raise v2_problem(400, f"the key {_quote(key)} is given twice in one object of the inference"
                         " request; parsers disagree on which one counts: send it once")


# -- parameters --------------------------------------------------------------------------------------


def _flag(parameters: dict[str, Any], name: str) -> bool:
    value = parameters.get(name, False)
    if not isinstance(value, bool):
        raise v2_problem(400, f"parameter {name} must be true or false, got {_quote(value)}")
    return value


def _count(parameters: dict[str, Any], name: str, maximum: int, limit_name: str) -> int | None:
    value = parameters.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise v2_problem(400, f"parameter {name} must be a whole number ≥ 0, got {_quote(value)}")
    if value > maximum:
        raise v2_problem(400, f"parameter {name}={value} is over {limit_name}={maximum}")
    return value


def _levels(parameters: dict[str, Any]) -> list[float] | None:
    """``levels``: 1 to 4 distinct numbers strictly between 0 and 100 (percent)."""
    value = parameters.get("levels")
    if value is None:
        return None
    if (not isinstance(value, list) or not 1 <= len(value) <= MAX_LEVELS
            or not all(isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < 100 for v in value)):
        raise v2_problem(400, f"parameter levels must be a list of 1 to {MAX_LEVELS} numbers strictly between 0"
                         f" and 100 (percent), got {_quote(value)}")
    if repeats_a_level(value):
        raise v2_problem(400, f"parameter levels {value} repeats a level (outputs are named by format(level, 'g'),"
                         " 6 significant digits); ask for each once")
    return [float(v) for v in value]


def _interval_outputs(levels: list[float] | None, horizon: int) -> list[str]:
    names = []
    for level in levels or ():
        key = level_key(level)
        names += [f"lower_{key}", f"upper_{key}"]
        if horizon:
            names += [f"forecast_lower_{key}", f"forecast_upper_{key}"]
    return names


def _sequence(parameters: dict[str, Any]) -> tuple[str | int | None, str | None]:
    """``sequence_id`` (uint64 or string) -> the v1 session id it names: 42 and "42" are the same session."""
    if "sequence_id" not in parameters:
        return None, None
    value = parameters["sequence_id"]
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise v2_problem(400, f"parameter sequence_id must be a uint64 or a string, got {_quote(value)}")
    if isinstance(value, int) and not 0 < value <= UINT64_MAX:
        raise v2_problem(400, f"parameter sequence_id {value} is not a uint64 > 0 (0 means no sequence: omit"
                         " it for a stateless call)")
    session_id = str(value)
    if not SESSION_ID.fullmatch(session_id):
        raise v2_problem(400, f"parameter sequence_id {_quote(value)} breaks the v1 session id rule: {SESSION_ID_RULE}")
    return value, session_id


# -- the input tensor --------------------------------------------------------------------------------


def _flatten(data: Any, shape: list[int]) -> list[Any]:
    """Row-major elements of ``data``, flat or nested to ``shape``: the lists at nesting level i number
    shape[0] × … × shape[i] and have one length (the last level may hold the remaining dimensions flat).
    Rows nested to another shape of the same total (ragged, or transposed: F lists of T numbers for [T, F])
    are refused, not cut into rows that each mix values of several steps."""
    if not isinstance(data, list):
        raise v2_problem(400, f"input {INPUT} data must be a list of numbers (flat or nested), got"
                         f" {type(data).__name__}")
    flat: list[Any] = data
    for level in range(len(shape) - 1):
        if not any(isinstance(item, list) for item in flat):
            break
        if not all(isinstance(item, list) for item in flat):
            raise v2_problem(400, f"input {INPUT} data mixes numbers and lists; nest it evenly or flat")
        if len({len(item) for item in flat}) > 1:
            raise v2_problem(400, f"input {INPUT} data is ragged (lists of different lengths at one level);"
                             " nest it evenly to the tensor's shape or send it flat")
        if len(flat) != math.prod(shape[: level + 1]):
            raise v2_problem(400, f"input {INPUT} data is nested to another shape than {shape} (its level"
                             f" {level} has {len(flat)} lists); nest it to the tensor's shape or send it flat")
        flat = list(itertools.chain.from_iterable(flat))
    return flat


def _input_array(tensor: _Tensor, binary: bytes, features: int, max_steps: int) -> tuple[np.ndarray, int]:
    """The (T, F) float32 chunk of the ``values`` tensor and how many binary bytes it took."""
    if tensor.datatype != FP32:  # shown bare, as the protocol's names (FP64, BYTES) are: 16 characters at most
        raise v2_problem(400, f"input {INPUT} has datatype {tensor.datatype:.16}; the model takes {FP32}")
    shape = tensor.shape
    if len(shape) == 3 and shape[0] == 1:
        steps, width = shape[1], shape[2]
    elif len(shape) == 2:
        steps, width = shape
    else:
        raise v2_problem(400, f"input {INPUT} has shape {shape}; send [T, {features}] or [1, T, {features}]")
    if width != features:
        raise v2_problem(400, f"input {INPUT} has shape {shape}: {width} features per step, the model takes"
                         f" {features}; send [T, {features}]")
    if steps < 1:
        raise v2_problem(400, f"input {INPUT} has shape {shape}, no steps; send at least one")
    if steps > max_steps:
        raise v2_problem(400, f"input {INPUT} has {steps} steps, more than GRU_MAX_CHUNK_STEPS={max_steps};"
                         " split it into several calls of one sequence")
    count = steps * width
    size = tensor.parameters.get("binary_data_size")
    if size is not None and tensor.data is not None:  # which holds the values? refused rather than guessed
        raise v2_problem(400, f"input {INPUT} has both data and a binary_data_size parameter; send one of them")
    if size is not None:
        if isinstance(size, bool) or not isinstance(size, int) or size != count * 4:
            raise v2_problem(400, f"input {INPUT} binary_data_size is {_quote(size)}; shape {shape} of {FP32} is"
                             f" {count * 4} bytes")
        if size > len(binary):
            raise v2_problem(400, f"input {INPUT} announces {size} bytes of binary data, but the body holds"
                             f" {len(binary)} after the JSON header")
        array = np.frombuffer(binary, dtype="<f4", count=count).astype(np.float32)
        taken = size
    else:
        if tensor.data is None:
            raise v2_problem(400, f"input {INPUT} has neither data nor a binary_data_size parameter")
        unbatched = len(shape) == 3 and isinstance(tensor.data, list) and len(tensor.data) != 1
        flat = _flatten(tensor.data, shape[1:] if unbatched else shape)  # [1, T, F] nested as T rows of F too
        if len(flat) != count:
            raise v2_problem(400, f"input {INPUT} has {len(flat)} elements of data, its shape {shape} needs"
                             f" {count}")
        if not all(type(item) is float or type(item) is int for item in flat):
            raise v2_problem(400, f"input {INPUT} data must be numbers only (no strings, booleans or null)")
        with np.errstate(over="ignore"):  # beyond FP32 becomes inf, refused below (no warning in the log)
            array = np.array(flat, dtype=np.float32)
        taken = 0
    array = array.reshape(steps, width)  # (T, F)
    if not np.isfinite(array).all():
        raise v2_problem(400, f"input {INPUT} holds NaN, Infinity or numbers beyond FP32 range (> 3.4e38)")
    return array, taken


def _requested(request: _InferRequest, horizon: int, levels: list[float] | None, scores: bool) -> dict[str, bool]:
    binary_default = _flag(request.parameters, "binary_data_output")
    extra = [*_interval_outputs(levels, horizon), *([SCORES] if scores else [])]
    if not request.outputs:
        names = [PREDICTIONS, FORECAST] if horizon else [PREDICTIONS]
        return dict.fromkeys([*names, *extra], binary_default)
    outputs: dict[str, bool] = {}
    for output in request.outputs:
        if output.name not in (*OUTPUTS, *extra):
            raise v2_problem(400, f"unknown output {_quote(output.name)}; the model answers {', '.join(OUTPUTS)} (and"
                             " with the parameters levels and scores, their intervals and scores)")
        if output.name in outputs:  # answered once, in JSON or binary as one of its entries says: a guess
            raise v2_problem(400, f"output {output.name!r} is requested twice; list each output once")
        if output.name == FORECAST and not horizon:
            raise v2_problem(400, "output forecast needs the request parameter horizon > 0")
        if output.parameters.get("classification"):
            raise v2_problem(400, "the classification extension is not supported; outputs are regressions")
        binary = output.parameters.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise v2_problem(400, f"output {output.name} parameter binary_data must be true or false")
        outputs[output.name] = binary
    return outputs


def parse_infer(
    body: bytes, header_length: str | None, *, features: int, max_steps: int, max_horizon: int
) -> InferRequest:
    """Decode and check one v2 inference request (its Content-Encoding already undone by the middleware)."""
    header, binary = _split(body, header_length)
    document, request = _load(header)
    names = [tensor.name for tensor in request.inputs]
    if names != [INPUT]:
        raise v2_problem(400, f"the model takes one input named {INPUT!r}, got {_quote(names)}")
    values, taken = _input_array(request.inputs[0], binary, features, max_steps)
    if taken != len(binary):
        raise v2_problem(400, f"the body has {len(binary) - taken} bytes after the JSON header that no input"
                         " claims with binary_data_size")
    parameters = request.parameters
    sequence_id, session_id = _sequence(parameters)
    sequence_start, sequence_end = _flag(parameters, "sequence_start"), _flag(parameters, "sequence_end")
    if session_id is None and (sequence_start or sequence_end):
        raise v2_problem(400, "sequence_start and sequence_end need a sequence_id")
    horizon = _count(parameters, "horizon", max_horizon, "GRU_MAX_HORIZON") or 0
    offset = _count(parameters, "offset", MAX_OFFSET, "the largest position")
    if offset is not None and session_id is None:
        raise v2_problem(400, "parameter offset needs a sequence_id (a stateless call has no position)")
    if sequence_start and offset:  # a start is at 0 by definition
        raise v2_problem(400, f"parameter offset is {offset}, but sequence_start puts the chunk at 0; omit the"
                         " offset or send 0")
    levels, scores = _levels(parameters), _flag(parameters, SCORES)
    outputs = _requested(request, horizon, levels, scores)
    _refuse_repeated_keys(header, document)  # last: only a request taken otherwise needs it, data checked
    return InferRequest(
        id=request.id, values=values, batched=len(request.inputs[0].shape) == 3, sequence_id=sequence_id,
        session_id=session_id, sequence_start=sequence_start, sequence_end=sequence_end, horizon=horizon,
        offset=offset, outputs=outputs, levels=levels, scores=scores,
    )


# -- the answer --------------------------------------------------------------------------------------


@dataclass(slots=True)
class Encoded:
    body: bytes
    headers: dict[str, str]
    media_type: str


def encode_infer(
    request: InferRequest, model_name: str, answer: dict[str, Any], parameters: dict[str, Any]
) -> Encoded:
    """The v2 answer from the engine's v1 answer: each requested output as JSON data or binary bytes."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for name, binary in request.outputs.items():
        array = _output(answer, name)  # (T, F_out) or (horizon, F_out)
        shape = [1, *array.shape] if request.batched else list(array.shape)
        tensor: dict[str, Any] = {"name": name, "datatype": FP32, "shape": shape}
        if binary:
            blob = array.astype("<f4").tobytes()
            tensor["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            tensor["data"] = array.reshape(-1)  # row-major, flat
        outputs.append(tensor)
    if not isinstance(answer.get("model_version"), str):
        raise _unreplayable("model_version")
    document: dict[str, Any] = {"model_name": model_name, "model_version": answer["model_version"]}
    if request.id is not None:
        document["id"] = request.id
    if parameters:
        document["parameters"] = parameters
    document["outputs"] = outputs
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return Encoded(header, {}, "application/json")
    return Encoded(b"".join([header, *blobs]), {HEADER_LENGTH: str(len(header))}, "application/octet-stream")


def _output(answer: dict[str, Any], name: str) -> np.ndarray:
    """An output's rows in the engine's v1 answer (a null score becomes NaN): ``forecast_lower_80`` is
    ``forecast_intervals["80"]["lower"]``. The answer to an exact retry is the one kept with the session,
    which an imported state document may have forged: one without the output as rows of numbers is refused."""
    try:
        if name in (*OUTPUTS, SCORES):
            data = answer[name]
        else:
            band, _, key = name.rpartition("_")
            where, _, side = band.rpartition("_")
            data = answer["forecast_intervals" if where == "forecast" else "intervals"][key][side]
        array = np.asarray(data, dtype=np.float32)
    except (KeyError, TypeError, ValueError):
        raise _unreplayable(name) from None
    if array.ndim != 2:
        raise _unreplayable(name)
    return array


def _unreplayable(member: str) -> Problem:
    return v2_problem(422, f"the answer kept for this resent chunk (from an imported state document) has no valid"
                      f" {member}, so it cannot be answered again; start the sequence again with"
                      " sequence_start=true, or import an exported document", kind="invalid-state")
