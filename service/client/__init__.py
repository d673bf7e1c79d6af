"""A small client for the service (httpx only): sessions that track their offset, retries safe by contract.

    from service.client import Client
    with Client("http://localhost:8000") as client:
        answers = list(client.session("pump-7").stream(rows, chunk=32))

Every chunk is sent with the offset it starts at (the session's position as the last answer reported). So
a network error or a 5xx/429 is retried with the same offset: if the server had applied the chunk, the
retry gets the same answer back and nothing is applied twice (the README's offset rules). A 408 is retried
too, for every call: the service (or a proxy) had not received the whole request, so nothing was applied. A 409 raises
``OffsetConflict`` carrying the server's ``position`` (``session.resync()`` adopts it); an expired session
raises ``SessionNotFound``. ``AsyncClient`` is the same with ``await``. ``client.stream_session(id)``
streams over the session's WebSocket instead, pipelined (``service.client.stream``).

A session's state moves as one document: ``session.export_state()`` gives its bytes and ETag,
``other.import_state(state)`` creates or replaces a session with it (here or on another deployment), and
``session.fork("what-if")`` copies it to a new id, ``session.delete(if_match=state.etag)`` deletes it only at
that state. Resent after a lost answer, a fork or an ``if_match`` import or delete meets what its first
attempt did (409, 412); the client takes that as done when the session holds that very state (a delete:
when no session is left), and raises otherwise, as it does for a call whose own request was never resent
(another call's retry on the same client is not its own).

The command line that streams a CSV through a session is ``service.client.cli`` (``python -m service.client``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import json
import math
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from service.extras import level_key
from service.inflate import CONTENT_CODINGS, Malformed, TooLarge, inflate
from service.session_ids import SESSION_ID, SESSION_ID_RULE

INSTALL = "pip install 'gru-service[client]' (in a checkout: pip install -e '.[client]')"


def _run_with_dash_m() -> bool:
    """Whether this process is ``python -m service.client``."""
    argv = sys.orig_argv
    return "-m" in argv and argv[argv.index("-m") + 1:][:1] == [__name__]


try:
    import httpx
except ModuleNotFoundError as missing:
    # python -m service.client imports this package before its __main__: one line and exit 2 there, not a
    # traceback; an import from code gets the same words as its ImportError.
    line = f"service.client needs the client extra ({missing.name} is missing): {INSTALL}"
    if _run_with_dash_m():
        print(line, file=sys.stderr)
        raise SystemExit(2) from None
    raise ModuleNotFoundError(line, name=missing.name) from None

if TYPE_CHECKING:
    from service.client.stream import AsyncStreamSession, StreamSession

# 408: the request's body did not arrive in time, so nothing was applied; safe to resend whatever the call.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
# Errors after which the request may or may not have reached the server: safe to resend with the offset.
RETRY_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
# The most of an answer either client reads: far past any the service gives (4,096 steps of 16 features with a
# forecast, four levels and scores are about 8 MiB of JSON), far short of what a hostile server could send.
DEFAULT_MAX_ANSWER_BYTES = 64 * 1024 * 1024
# The codings an answer may come in: those the client inflates within max_answer_bytes (``_Body``).
ACCEPT_ENCODING = "gzip, deflate"
Values = Sequence[Sequence[float]] | Sequence[float] | Any  # lists, or anything with .tolist() (numpy)
Band = dict[str, list[list[float]]]  # {"lower": rows × F, "upper": rows × F}


# -- errors ------------------------------------------------------------------------------------------


class ServiceError(Exception):
    """The service refused a call; ``problem`` is its RFC 9457 body (type, title, status, detail, ...)."""

    def __init__(self, status: int | None, problem: dict[str, Any], message: str | None = None):
        self.status = status
        self.problem = problem
        self.detail: str = str(problem.get("detail", ""))
        self.kind: str = str(problem.get("type", "")).rsplit("/", 1)[-1]
        super().__init__(message or f"{status} {problem.get('title', 'Error')}: {self.detail}")


class OffsetConflict(ServiceError):
    """409: the session is at ``position``, not where this client thought; nothing was applied."""

    @property
    def position(self) -> int:
        return int(self.problem["position"])


class ModelChanged(OffsetConflict):
    """409: the session was built with another model version; reset it to continue."""


class SessionNotFound(ServiceError):
    """404: the session expired, was deleted or never existed; its state is gone."""


class SessionExists(ServiceError):
    """409: a fork's target session exists already; nothing was changed."""


class PreconditionFailed(ServiceError):
    """412: the session changed since the ETag an import or a delete was conditioned on; nothing was changed."""


class Unavailable(ServiceError):
    """Every attempt failed with a network error, a 5xx, a 429 or a 408; the last failure is the ``__cause__``."""


class BadAnswer(ServiceError):
    """An answer that is no refusal yet cannot be used: not JSON, without the call's fields, a position that
    does not follow the chunk sent, an export that is no state document, a redirect, a body that cannot be
    decoded, a body over the client's ``max_answer_bytes``. Never taken as success: a position believed from
    it would skip or repeat steps."""


def _error(response: httpx.Response) -> ServiceError:
    try:
        problem = response.json()
        if not isinstance(problem, dict):
            raise ValueError
    except ValueError:
        problem = {"status": response.status_code, "title": response.reason_phrase,
                   "detail": response.text[:500]}
    return problem_error(response.status_code, problem)


def problem_error(status: int, problem: dict[str, Any]) -> ServiceError:
    """The error for a problem+json body: of an HTTP answer, or a stream's problem frame."""
    kind = str(problem.get("type", "")).rsplit("/", 1)[-1]
    if status == 409 and type(problem.get("position")) is int:  # a position to resync to, or no conflict
        return (ModelChanged if kind == "model-changed" else OffsetConflict)(status, problem)
    if status == 404 and kind == "session-not-found":
        return SessionNotFound(status, problem)
    if status == 409 and kind == "session-exists":
        return SessionExists(status, problem)
    if status == 412:
        return PreconditionFailed(status, problem)
    return ServiceError(status, problem)


# -- answers and retry policy ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prediction:
    """One answer: the one-step-ahead prediction after every step sent, and the forecast, intervals and
    scores if asked for."""

    predictions: list[list[float]]  # T × F_out
    forecast: list[list[float]] | None  # horizon × F_out
    model_version: str
    position: int | None = None  # sessions only: steps consumed, this chunk included
    created: bool | None = None  # sessions only: this chunk started the session
    session_id: str | None = None
    intervals: dict[str, Band] | None = None  # per level ("80"): lower and upper, T × F_out
    forecast_intervals: dict[str, Band] | None = None  # per level: horizon × F_out
    scores: list[list[float | None]] | None = None  # T × F: each value's p-value; None: unscored

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Prediction:
        return cls(body["predictions"], body.get("forecast"), body["model_version"], body.get("position"),
                   body.get("created"), body.get("session_id"), body.get("intervals"),
                   body.get("forecast_intervals"), body.get("scores"))


@dataclass(frozen=True, slots=True)
class Retry:
    """Exponential backoff with jitter; a ``Retry-After`` header is honoured up to ``max_delay``."""

    attempts: int = 10  # tries in all, the first included: 16 to 21 s of waiting, past a service restart
    backoff: float = 0.1  # seconds before the first retry; doubles each time
    max_delay: float = 5.0

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        wait = self.backoff * 2.0 ** min(attempt, 64) * random.uniform(0.5, 1.0)  # 2**1100 is past float
        if response is not None:
            wait = max(wait, _retry_after(response.headers.get("retry-after", "")))
        return min(wait, self.max_delay)


def _retry_after(value: str) -> float:
    """The seconds a ``Retry-After`` asks for, as a count or as an HTTP-date (RFC 9110: what proxies send);
    0 for garbage. NaN stays NaN, which ``max`` then passes over."""
    with contextlib.suppress(ValueError):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return 0.0
    if when.tzinfo is None:  # "-0000": a date in UTC whose zone is not said
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp() - time.time()


def _rows(values: Values) -> list[Any]:
    rows = values.tolist() if hasattr(values, "tolist") else list(values)
    if not rows:
        raise ValueError("values is empty; send at least one step")
    return rows


def _chunks(values: Values, chunk: int) -> Iterator[list[Any]]:
    """``values`` a chunk at a time, each made a list as it is sent: a long series (a list, a numpy array, the
    CLI's rows) is never copied whole. Anything else (an iterator, a deque) is listed first."""
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1 step, got {chunk}")
    if not isinstance(values, list | tuple) and not hasattr(values, "tolist"):
        values = _rows(values)
    if not len(values):
        raise ValueError("values is empty; send at least one step")
    for start in range(0, len(values), chunk):
        yield _rows(values[start : start + chunk])


def _check_start(resume: bool, position: int) -> None:
    """A stream starts at a position given or at the server's (``resume``), not both: one would be ignored."""
    if position < 0 or (resume and position):
        raise ValueError(f"a stream starts at a position >= 0 or, with resume, at the server's; got position"
                         f" {position}{' and resume' if resume else ''}")


def _check_id(session_id: str) -> str:
    if not SESSION_ID.fullmatch(session_id):
        raise ValueError(f"session id {session_id!r} breaks the rule: {SESSION_ID_RULE}")
    return session_id


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _checked(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        raise _error(response)
    unchanged = response.status_code == 304 and "if-none-match" in response.request.headers  # a conditional export
    if response.status_code >= 300 and not unchanged:  # no route of the API redirects: a proxy or a wrong URL does
        location = response.headers.get("location", "nowhere")
        raise _bad(response, f"a redirect to {location}; the client follows none: give it the service's URL")
    return response


def _bad(response: httpx.Response, why: str) -> BadAnswer:
    problem = {"status": response.status_code, "title": response.reason_phrase, "detail": why}
    return BadAnswer(response.status_code, problem, f"{response.status_code} answer to"
                     f" {response.request.method} {response.request.url.path} unusable: {why}")


def _answer(response: httpx.Response) -> dict[str, Any]:
    if not response.content:
        return {}
    try:
        body = response.json()
    except ValueError:
        raise _bad(response, f"not JSON: {response.text[:200]!r}") from None
    if not isinstance(body, dict):
        raise _bad(response, f"JSON {type(body).__name__}, not an object")
    return body


def _position(response: httpx.Response, body: dict[str, Any]) -> int:
    """The ``position`` of a session's answer, a count of steps."""
    position = body.get("position")
    if (why := _not_a_count(position)) is not None:
        raise _bad(response, why)
    assert isinstance(position, int)  # _not_a_count saw to it
    return position


def _not_a_count(position: Any) -> str | None:
    """Why ``position`` (from an answer) is no count of steps; None when it is one."""
    if type(position) is not int or position < 0:
        return f"position {position!r} is not a count of steps"
    return None


def unusable_answer(body: dict[str, Any], steps: int, offset: int | None, asked: dict[str, Any],
                    session_id: str | None = None) -> str | None:
    """Why ``body`` is no answer to a chunk of ``steps`` sent at ``offset`` (None: stateless) of session
    ``session_id`` asking for ``asked`` (its ``chunk_fields``), or None when it is one: one prediction a step,
    the forecast, intervals and scores asked for in their shapes (``_not_extras``), a model version, and for a
    session's chunk its session's id where it names one (a proxy that mixes answers up is caught) and the
    position just past it. The HTTP calls and the streaming sessions hold answers to the same rule."""
    if session_id is not None and body.get("session_id", session_id) != session_id:
        return f"an answer for session {str(body.get('session_id'))[:80]!r}, not {session_id!r}"
    predictions = body.get("predictions")
    if (why := _not_rows("prediction", predictions, steps)) is not None:
        return why
    assert isinstance(predictions, list)  # _not_rows saw to it
    if (why := _not_extras(body, steps, len(predictions[0]), asked)) is not None:
        return why
    if not isinstance(body.get("model_version"), str):
        return "no model_version"
    if offset is not None:
        position = body.get("position")
        if (why := _not_a_count(position)) is not None:
            return why
        if position != offset + steps:
            return (f"position {position} after {steps} step(s) sent at offset {offset}; the session should be at"
                    f" {offset + steps}")
    return None


def _finite(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _not_rows(what: str, rows: Any, count: int, width: int | None = None, blanks: bool = False) -> str | None:
    """Why ``rows`` (an answer's ``what``s) are not ``count`` rows of finite numbers, ``width`` wide (None: as
    wide as the first), with nulls too where ``blanks``; None when they are: a row that is a number, text,
    empty or NaN (which the service never answers) would be taken as a prediction, or crash whoever reads it."""
    if not isinstance(rows, list) or len(rows) != count:
        return f"{what}s {str(rows)[:80]} are not {count} row(s), as the chunk asked"
    if width is None:
        width = len(rows[0]) if rows and isinstance(rows[0], list) else 0
    for row in rows:
        if not isinstance(row, list) or not row or not all(_finite(v) or (blanks and v is None) for v in row):
            return f"{what} {str(row)[:80]} is not a row of numbers"
        if len(row) != width:
            return f"{what} {str(row)[:80]} is not a row of {width} numbers, as the first prediction is"
    return None


def _not_extras(body: dict[str, Any], steps: int, width: int, asked: dict[str, Any]) -> str | None:
    """Why the forecast, intervals and scores of ``body`` are not those ``asked`` (a chunk's horizon, levels
    and scores) makes, each ``width`` wide, or None when they are: a forecast of ``horizon`` rows, per level
    asked (keyed as the service keys it) lower and upper bounds of the predictions' and the forecast's
    shape, scores of ``steps`` rows (null where a value has none), and none of them unasked."""
    horizon = asked.get("horizon", 0)
    levels = {level_key(level) for level in asked.get("levels", ())}
    # (field, what its rows are called, "" for bands; how many rows, None where not asked for)
    shapes = (("forecast", "forecast step", horizon if horizon else None),
              ("intervals", "", steps if levels else None),
              ("forecast_intervals", "", horizon if levels and horizon else None),
              ("scores", "score row", steps if asked.get("scores") else None))
    for name, row, rows in shapes:
        value = body.get(name)
        if value is None or rows is None:
            if value is not None:
                return f"{name} {str(value)[:80]}, which the chunk did not ask for"
            if rows is not None:
                return f"no {name}, which the chunk asked for"
            continue
        why = (_not_bands(name, value, levels, rows, width) if not row
               else _not_rows(row, value, rows, width, blanks=name == "scores"))
        if why is not None:
            return why
    return None


def _not_bands(name: str, bands: Any, levels: set[str], rows: int, width: int) -> str | None:
    """Why ``bands`` (an answer's ``name``) are not a lower and an upper bound, ``rows`` × ``width``, for each
    of ``levels`` and no other; None when they are."""
    if not isinstance(bands, dict) or set(bands) != levels:
        return f"{name} {str(bands)[:80]} are not for levels {sorted(levels)}, those asked"
    for level, band in bands.items():
        if not isinstance(band, dict):
            return f"{name}[{level!r}] {str(band)[:80]} is no lower and upper bound"
        for side in ("lower", "upper"):
            if (why := _not_rows(f"{name}[{level!r}] {side} bound", band.get(side), rows, width)) is not None:
                return why
    return None


def _prediction(response: httpx.Response, call: _Call, session_id: str | None = None) -> Prediction:
    """The answer to a chunk ``call`` sent (``unusable_answer``'s rule)."""
    sent = call.body or {}
    body = _answer(response)
    if (why := unusable_answer(body, len(sent["values"]), sent.get("offset"), sent, session_id)) is not None:
        raise _bad(response, why)
    return Prediction.from_json(body)


@dataclass(frozen=True, slots=True)
class State:
    """A session's exported state: the document (safetensors bytes) and its ETag."""

    document: bytes
    etag: str

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_bytes(self.document)

    @property
    def last_offset(self) -> int:
        """Where the session's last applied chunk began (-1: none since it started or was reset): the one
        chunk whose answer an exact retry can ask for again. ValueError for a document that has none."""
        try:
            return int(_contents(self.document)[2])
        except _NO_STATE as exc:
            raise ValueError(f"a state document without a last_offset: {exc!r}") from None


def _document(state: State | bytes) -> bytes:
    """The state document of an export, or the bytes given as one."""
    return state.document if isinstance(state, State) else state


def _same_session(document: bytes, other: bytes) -> bool:
    """Whether two state documents hold the same session whatever its id and times: model version,
    position, last chunk and state. A fork or conditional import resent after a lost answer meets what its
    first attempt did (409, 412): this tells that apart from someone else's session."""
    try:
        return _contents(document) == _contents(other)
    except _NO_STATE:
        return False


def _no_state(document: bytes) -> str | None:
    """Why an export's body is no state document (safetensors with the state and the metadata a session
    goes on from), or None when it is one: a proxy's page answered with a 200 is no session's state."""
    try:
        _contents(document)
    except _NO_STATE as exc:
        return f"no state document ({type(exc).__name__}: {exc}): {document[:80]!r}"
    return None


_NO_STATE = (ValueError, KeyError, TypeError, IndexError)  # what ``_contents`` raises for bytes of no state document


def _contents(document: bytes) -> tuple[Any, ...]:
    length = int.from_bytes(document[:8], "little")
    header = json.loads(document[8 : 8 + length])
    data = document[8 + length :]
    meta = header["__metadata__"]
    tensors = [data[slice(*header[name]["data_offsets"])] for name in ("state", "fingerprint")]
    return meta["model_version"], meta["position"], meta["last_offset"], *tensors


@dataclass(frozen=True, slots=True)
class _Call:
    """One HTTP call of the API, as both clients send it."""

    method: str
    path: str
    body: dict[str, Any] | None = None
    content: bytes | None = None
    headers: dict[str, str] | None = None

    def options(self) -> dict[str, Any]:
        return {"json": self.body, "content": self.content, "headers": self.headers}


@dataclass
class _Stats:
    retries: int = 0  # resends after a network error or a ``RETRY_STATUSES`` answer
    failures: list[str] = field(default_factory=list)  # why, most recent last (capped)

    def note(self, why: str) -> None:
        self.retries += 1
        self.failures = [*self.failures[-19:], why]


def _in_time(response: httpx.Response, deadline: float, timeout: float) -> None:
    """Raise a timeout, retried like any other, once the sync client's answer body runs past its call's
    ``timeout``: httpx bounds each read only, so a body that trickles in or never ends would hold the call
    forever. (The async client bounds the whole answer with ``asyncio.timeout``; sync httpx has no such
    bound, so the sync client's head is held to the timeout per read only.)"""
    if time.monotonic() > deadline:
        raise httpx.ReadTimeout(f"the answer took over {timeout} s", request=response.request)


class _Body:
    """An answer's body as either client reads it, refused (``BadAnswer``, never retried) once past ``limit``
    bytes: from its Content-Length before a byte is read, as its pieces come, and as it is inflated (gzip or
    deflate, ``service.inflate``), never further than the limit: a hostile or broken server could otherwise make
    the client read, and hold, as much as it liked (httpx inflates each piece whole, 64 KiB of gzip into 64 MiB).
    A coding the client did not ask for (``ACCEPT_ENCODING``) is an ``httpx.DecodingError``."""

    def __init__(self, response: httpx.Response, limit: int):
        self.response = response
        self.limit = limit
        self.data = bytearray()
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise self._over(f"its Content-Length is {declared}")
        # an answer read whole already (a test transport's, which httpx makes that way) is inflated already
        self.inflated = response.is_stream_consumed
        listed = [] if self.inflated else response.headers.get_list("content-encoding", split_commas=True)
        self.codings = [coding.strip().lower().encode() for coding in listed]
        self.codings = [coding for coding in self.codings if coding not in (b"", b"identity")]
        if unasked := [coding for coding in self.codings if coding not in CONTENT_CODINGS]:
            raise httpx.DecodingError(f"Content-Encoding {b', '.join(unasked).decode(errors='replace')!r} is"
                                      f" none the client asked for ({ACCEPT_ENCODING})", request=response.request)

    def add(self, piece: bytes) -> None:
        """Another piece of the body as it came (``iter_raw``: before inflating)."""
        self.data += piece
        if len(self.data) > self.limit:
            raise self._over(f"{len(self.data)} read so far")

    def _over(self, how: str) -> BadAnswer:
        return _bad(self.response, f"its body is over {self.limit} bytes, the client's max_answer_bytes ({how});"
                                   " raise it if the service's answers are that large")

    def whole(self) -> httpx.Response:
        """The response with its body as read, inflated (no Content-Encoding left to undo)."""
        content = bytes(self.data)
        try:  # no content (a 204, whatever coding a proxy names) has nothing to inflate: httpx takes it as empty
            for coding in reversed(self.codings if content else []):  # the last applied is undone first
                content = inflate(content, coding, self.limit)
        except TooLarge:
            raise self._over("inflated") from None
        except Malformed as exc:
            raise httpx.DecodingError(f"not valid {coding.decode()} data ({exc})",
                                      request=self.response.request) from None
        headers = [(name, value) for name, value in self.response.headers.multi_items()
                   if name.lower() not in ("content-encoding", "content-length")]
        return httpx.Response(self.response.status_code, headers=headers, content=content,
                              request=self.response.request, extensions=self.response.extensions)


def _unsent(call: _Call, error: httpx.HTTPError) -> ServiceError:
    """A call that no retry can help (a URL without http://, a body that cannot be decoded), as our error."""
    why = f"{type(error).__name__}: {error}"
    return ServiceError(None, {"detail": why}, f"{call.method} {call.path} failed: {why}")


def _why(error: Exception | None, response: httpx.Response | None) -> str:
    if error is not None:
        return f"{type(error).__name__}: {error}"
    return f"HTTP {response.status_code if response is not None else '?'}"


class _Tries:
    """One call's attempts: the retry loop of both clients, which differ only in how they send and wait.

    Iterating yields the pause before each attempt (0 before the first); the caller reports each attempt's
    outcome with ``failed`` or ``settled`` and, when the iteration ends, raises ``give_up()``. Each resend is
    noted in every one of ``stats``: the client's, and the calling session's own where it keeps one.
    """

    def __init__(self, retry: Retry, *stats: _Stats):
        self.retry = retry
        self.stats = stats
        self.error: Exception | None = None
        self.response: httpx.Response | None = None

    def __iter__(self) -> Iterator[float]:
        for attempt in range(self.retry.attempts):
            pause = 0.0
            if attempt:
                for stats in self.stats:
                    stats.note(_why(self.error, self.response))
                pause = self.retry.delay(attempt - 1, self.response)
            self.error = self.response = None
            yield pause

    def failed(self, error: Exception) -> None:
        self.error = error

    def settled(self, response: httpx.Response) -> bool:
        """Whether this answer is final (anything but a ``RETRY_STATUSES`` one)."""
        self.response = response
        return response.status_code not in RETRY_STATUSES

    def give_up(self) -> Unavailable:
        response, error = self.response, self.error
        status = response.status_code if response is not None else None
        problem = _error(response).problem if response is not None else {"detail": _why(error, None)}
        return Unavailable(status, problem,
                           f"gave up after {self.retry.attempts} attempts; last: {_why(error, response)}"
                           + (f" ({problem.get('detail')})" if response is not None else ""))


def chunk_fields(horizon: int, levels: Sequence[float], scores: bool) -> dict[str, Any]:
    """A predict body's fields besides values and offset; levels and scores only when asked, so a body
    that asks for neither is what it always was (an exact retry compares them)."""
    return {"horizon": horizon, **({"levels": list(levels)} if levels else {}), **({"scores": True} if scores else {})}


def _stateless(values: Values, horizon: int, levels: Sequence[float], scores: bool) -> _Call:
    return _Call("POST", "/v1/predict", {"values": _rows(values), **chunk_fields(horizon, levels, scores)})


_T = TypeVar("_T")
_P = ParamSpec("_P")
# A call of several requests, written once for both clients: it yields each request and is sent its answer, or
# thrown the ``ServiceError`` that refused it; what it returns is the call's (``Session._run``).
_Steps = Generator[_Call, httpx.Response, _T]
# What makes one: given the call's own ``_Stats`` (its resends alone, whatever else shares the client) and
# the call's arguments.
_Maker = Callable[Concatenate[_Stats, _P], _Steps[_T]]


def _next_call(steps: _Steps[Any], answer: httpx.Response | ServiceError | None) -> _Call:
    """The next request of ``steps``, handed the last one's answer or refusal (None: there was none yet);
    StopIteration, with what ``steps`` returns, once it makes no more."""
    if answer is None:
        return next(steps)
    if isinstance(answer, ServiceError):
        return steps.throw(answer)
    return steps.send(answer)


class _Calls:
    """What ``Client`` and ``AsyncClient`` share: the retry policy and its count, how they connect, and the
    bound on an answer's size."""

    def __init__(self, retry: Retry | None, api_key: str | None, timeout: float, max_answer_bytes: int):
        self.retry = retry or Retry()
        self.stats = _Stats()
        self._api_key = api_key
        self._timeout = timeout
        self._max_answer_bytes = max_answer_bytes

    @staticmethod
    def _http_options(base_url: str, api_key: str | None, timeout: float) -> dict[str, Any]:
        headers = {"Accept-Encoding": ACCEPT_ENCODING, **_headers(api_key)}
        return {"base_url": base_url, "headers": headers, "timeout": timeout}


class _SessionCalls:
    """What a session sends and how an answer moves it, for both the sync and the async handle; the calls of
    several requests as ``_Steps``, which each handle's ``_run`` carries out."""

    client: _Calls

    def __init__(self, session_id: str, position: int = 0):
        self.id = session_id
        self.position = position
        self._path = f"/v1/sessions/{session_id}"

    def _chunk(self, values: Values, horizon: int, levels: Sequence[float], scores: bool) -> _Call:
        body = {"values": _rows(values), "offset": self.position, **chunk_fields(horizon, levels, scores)}
        return _Call("POST", f"{self._path}/predict", body)

    def _describe(self) -> _Call:
        return _Call("GET", self._path)

    def _export(self, unless: State | None = None) -> _Call:
        headers = {"If-None-Match": unless.etag} if unless is not None and unless.etag else {}
        return _Call("GET", f"{self._path}/state", headers=headers)

    def _import(self, state: State | bytes, if_match: str | None) -> _Call:
        document = _document(state)
        headers = {"Content-Type": "application/octet-stream", **({"If-Match": if_match} if if_match else {})}
        return _Call("PUT", f"{self._path}/state", content=document, headers=headers)

    def _delete(self, if_match: str | None) -> _Call:
        return _Call("DELETE", self._path, headers={"If-Match": if_match} if if_match else None)

    def _fork(self, to: str) -> _Call:
        return _Call("POST", f"{self._path}/fork", {"to": _check_id(to)})

    def _exported(self, response: httpx.Response, unless: State | None = None) -> State:
        if response.status_code == 304 and unless is not None:  # the session is still at ``unless``
            return unless
        if (why := _no_state(response.content)) is not None:
            raise _bad(response, why)
        return State(response.content, response.headers.get("etag", ""))

    def _adopt(self, response: httpx.Response) -> dict[str, Any]:
        """The session description in ``response``; the handle moves to its position."""
        description = _answer(response)
        position = _position(response, description)
        if description.get("session_id", self.id) != self.id:
            raise _bad(response, f"a description of session {str(description.get('session_id'))[:80]!r}, not"
                                 f" {self.id!r}")
        self.position = position
        return description

    def _advance(self, response: httpx.Response, call: _Call) -> Prediction:
        prediction = _prediction(response, call, self.id)
        assert prediction.position is not None  # _prediction saw it follow the chunk
        self.position = prediction.position
        return prediction

    def _deleting(self, sent: _Stats, if_match: str | None) -> _Steps[None]:
        """``delete``: a session already gone is fine (a resent delete's first try went through); resent after
        a lost answer, a conditional delete that finds no session met its own first attempt (412)."""
        try:
            yield self._delete(if_match)
        except SessionNotFound:
            pass
        except PreconditionFailed:
            if not sent.retries or (yield from self._existing()):
                raise
        self.position = 0

    def _existing(self) -> _Steps[bool]:
        """Whether the service has the session now."""
        try:
            _answer((yield self._describe()))
        except SessionNotFound:
            return False
        return True

    def _importing(self, sent: _Stats, state: State | bytes, if_match: str | None) -> _Steps[dict[str, Any]]:
        """``import_state``: resent after a lost answer, a conditional import meets its own first attempt (412);
        done when the session holds that very state."""
        try:
            return self._adopt((yield self._import(state, if_match)))
        except PreconditionFailed:
            if not sent.retries or not _same_session(_document(state), (yield from self._exporting())):
                raise
        return self._adopt((yield self._describe()))  # a lost answer's import: ours

    def _exporting(self) -> _Steps[bytes]:
        """The session's state document now."""
        return self._exported((yield self._export())).document

    def _forking(self, sent: _Stats, copy: _SessionCalls) -> _Steps[None]:
        """``fork`` to ``copy`` (a handle on the new session): resent after a lost answer, a fork meets its own
        first attempt (409); done when both sessions hold the same state."""
        try:
            copy._adopt((yield self._fork(copy.id)))
        except SessionExists:
            if not sent.retries or not _same_session((yield from self._exporting()),
                                                     (yield from copy._exporting())):
                raise
            copy._adopt((yield copy._describe()))  # a lost answer's fork: ours


# -- sync --------------------------------------------------------------------------------------------


class Client(_Calls):
    """The service at ``base_url``; ``api_key`` is sent as ``Authorization: Bearer``. ``timeout`` bounds each
    attempt of a call, its whole body included (a body that trickles in is a timeout, retried); its head is
    held to it per read only, as sync httpx offers no bound on a whole answer (``AsyncClient``'s is whole).
    ``max_answer_bytes`` bounds an answer's body (a stream's frame too): past it the call raises ``BadAnswer``."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, *,
                 timeout: float = 30.0, retry: Retry | None = None,
                 transport: httpx.BaseTransport | None = None, max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES):
        super().__init__(retry, api_key, timeout, max_answer_bytes)
        self._http = httpx.Client(**self._http_options(base_url, api_key, timeout), transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One call, resent with the same body after network errors, 5xx, 429 and 408; the JSON answer or a
        ``ServiceError``. Only use it for calls that are safe to repeat (every call of this API is)."""
        return _answer(self.send(_Call(method, path, body)))

    def send(self, call: _Call, *also: _Stats) -> httpx.Response:
        """``request`` for any body and answer: the response, once it is final and not an error; each resend
        is counted in ``stats`` and in ``also`` (a session call's own count)."""
        tries = _Tries(self.retry, self.stats, *also)
        for pause in tries:
            if pause:
                time.sleep(pause)
            try:
                response = self._fetch(call)
            except RETRY_ERRORS as exc:
                tries.failed(exc)
                continue
            except httpx.HTTPError as exc:
                raise _unsent(call, exc) from exc
            if tries.settled(response):
                return _checked(response)
        raise tries.give_up() from tries.error

    def _fetch(self, call: _Call) -> httpx.Response:
        deadline = time.monotonic() + self._timeout
        with self._http.stream(call.method, call.path, **call.options()) as response:
            body = _Body(response, self._max_answer_bytes)
            for piece in response.iter_bytes() if body.inflated else response.iter_raw():
                _in_time(response, deadline, self._timeout)
                body.add(piece)
        return body.whole()

    def model(self) -> dict[str, Any]:
        return self.request("GET", "/v1/model")

    def predict(self, values: Values, horizon: int = 0, *, levels: Sequence[float] = (),
                scores: bool = False) -> Prediction:
        """A whole series from a fresh state; nothing is kept. ``levels`` (percent) adds intervals,
        ``scores`` each value's p-value (a calibrated model only)."""
        call = _stateless(values, horizon, levels, scores)
        return _prediction(self.send(call), call)

    def session(self, session_id: str, *, resume: bool = False) -> Session:
        """A session handle starting at position 0, or, with ``resume``, where the server has it (0 if
        unknown)."""
        session = Session(self, _check_id(session_id))
        if resume:
            with contextlib.suppress(SessionNotFound):
                session.resync()
        return session

    def stream_session(self, session_id: str, *, window: int = 64, resume: bool = False,
                       position: int = 0) -> StreamSession:
        """The session over its WebSocket, chunks pipelined ``window`` ahead (``service.client.stream``);
        starting at ``position`` (one a handle has read already: no second read to race a writer), or, with
        ``resume``, where the server has it."""
        from service.client.stream import StreamSession  # websockets is loaded only by those who stream

        _check_start(resume, position)
        if resume:
            position = self.session(session_id, resume=True).position
        return StreamSession(str(self._http.base_url), self._api_key, _check_id(session_id), position=position,
                             window=window, retry=self.retry, timeout=self._timeout,
                             max_answer_bytes=self._max_answer_bytes)


class Session(_SessionCalls):
    """One session: ``predict`` sends the next chunk at ``position`` and moves it by the answer."""

    client: Client

    def __init__(self, client: Client, session_id: str, position: int = 0):
        super().__init__(session_id, position)
        self.client = client

    def predict(self, values: Values, horizon: int = 0, *, levels: Sequence[float] = (),
                scores: bool = False) -> Prediction:
        call = self._chunk(values, horizon, levels, scores)
        return self._advance(self.client.send(call), call)

    def stream(self, values: Values, chunk: int = 32, horizon: int = 0, *, levels: Sequence[float] = (),
               scores: bool = False) -> Iterator[Prediction]:
        """The series in chunks of ``chunk`` steps, one answer per chunk."""
        for rows in _chunks(values, chunk):
            yield self.predict(rows, horizon, levels=levels, scores=scores)

    def info(self) -> dict[str, Any]:
        return self.client.request("GET", self._path)

    def resync(self) -> int:
        """Adopt the server's position (after an ``OffsetConflict``, say) and return it."""
        self._adopt(self.client.send(self._describe()))
        return self.position

    def reset(self) -> None:
        self.client.request("POST", f"{self._path}/reset")
        self.position = 0

    def delete(self, if_match: str | None = None) -> None:
        """Forget the session (one already gone is fine). ``if_match`` (an ETag): only while the session is at
        that very state, else ``PreconditionFailed`` and nothing is deleted."""
        self._run(self._deleting, if_match)

    def export_state(self, unless: State | None = None) -> State:
        """The session's state document and its ETag; ``unless`` (an earlier export): that very object while
        the session has not changed since (the service answers 304 without the document)."""
        return self._exported(self.client.send(self._export(unless)), unless)

    def import_state(self, state: State | bytes, if_match: str | None = None) -> dict[str, Any]:
        """Create or replace this session with an exported state; its description (the handle moves to its
        position). ``if_match`` (an ETag): only over that very state, else ``PreconditionFailed``."""
        return self._run(self._importing, state, if_match)

    def fork(self, to: str) -> Session:
        """A copy of this session as the new session ``to`` (``SessionExists`` if it exists), as a handle."""
        copy = Session(self.client, to)
        self._run(self._forking, copy)
        return copy

    def _run(self, make: _Maker[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Send each request of the steps ``make`` makes and hand them the answer or the refusal; what they
        return. They are given the call's own count of resends: the client's is shared by every call."""
        sent = _Stats()
        steps = make(sent, *args, **kwargs)
        answer: httpx.Response | ServiceError | None = None
        while True:
            try:
                call = _next_call(steps, answer)
            except StopIteration as done:
                return done.value
            try:
                answer = self.client.send(call, sent)
            except ServiceError as refused:
                answer = refused


# -- async -------------------------------------------------------------------------------------------


class AsyncClient(_Calls):
    """``Client`` for asyncio: the same calls, awaited; ``timeout`` bounds each attempt's whole answer, its head
    too (``asyncio.timeout``)."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, *,
                 timeout: float = 30.0, retry: Retry | None = None,
                 transport: httpx.AsyncBaseTransport | None = None,
                 max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES):
        super().__init__(retry, api_key, timeout, max_answer_bytes)
        self._http = httpx.AsyncClient(**self._http_options(base_url, api_key, timeout), transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return _answer(await self.send(_Call(method, path, body)))

    async def send(self, call: _Call, *also: _Stats) -> httpx.Response:
        tries = _Tries(self.retry, self.stats, *also)
        for pause in tries:
            if pause:
                await asyncio.sleep(pause)
            try:
                response = await self._fetch(call)
            except RETRY_ERRORS as exc:
                tries.failed(exc)
                continue
            except httpx.HTTPError as exc:
                raise _unsent(call, exc) from exc
            if tries.settled(response):
                return _checked(response)
        raise tries.give_up() from tries.error

    async def _fetch(self, call: _Call) -> httpx.Response:
        """One attempt, its whole answer, head and body, read within ``timeout``: httpx bounds each read only,
        so an answer that trickles in would hold the call as long as the server liked."""
        try:
            async with asyncio.timeout(self._timeout):
                async with self._http.stream(call.method, call.path, **call.options()) as response:
                    body = _Body(response, self._max_answer_bytes)
                    async for piece in response.aiter_bytes() if body.inflated else response.aiter_raw():
                        body.add(piece)
        except TimeoutError:
            raise httpx.ReadTimeout(f"the answer took over {self._timeout} s") from None
        return body.whole()

    async def model(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/model")

    async def predict(self, values: Values, horizon: int = 0, *, levels: Sequence[float] = (),
                      scores: bool = False) -> Prediction:
        call = _stateless(values, horizon, levels, scores)
        return _prediction(await self.send(call), call)

    async def session(self, session_id: str, *, resume: bool = False) -> AsyncSession:
        session = AsyncSession(self, _check_id(session_id))
        if resume:
            with contextlib.suppress(SessionNotFound):
                await session.resync()
        return session

    async def stream_session(self, session_id: str, *, window: int = 64, resume: bool = False,
                             position: int = 0) -> AsyncStreamSession:
        from service.client.stream import AsyncStreamSession  # websockets is loaded only by those who stream

        _check_start(resume, position)
        if resume:
            position = (await self.session(session_id, resume=True)).position
        return AsyncStreamSession(str(self._http.base_url), self._api_key, _check_id(session_id),
                                  position=position, window=window, retry=self.retry, timeout=self._timeout,
                                  max_answer_bytes=self._max_answer_bytes)


class AsyncSession(_SessionCalls):
    """``Session`` for asyncio."""

    client: AsyncClient

    def __init__(self, client: AsyncClient, session_id: str, position: int = 0):
        super().__init__(session_id, position)
        self.client = client

    async def predict(self, values: Values, horizon: int = 0, *, levels: Sequence[float] = (),
                      scores: bool = False) -> Prediction:
        call = self._chunk(values, horizon, levels, scores)
        return self._advance(await self.client.send(call), call)

    async def stream(self, values: Values, chunk: int = 32, horizon: int = 0, *, levels: Sequence[float] = (),
                     scores: bool = False) -> AsyncIterator[Prediction]:
        for rows in _chunks(values, chunk):
            yield await self.predict(rows, horizon, levels=levels, scores=scores)

    async def info(self) -> dict[str, Any]:
        return await self.client.request("GET", self._path)

    async def resync(self) -> int:
        self._adopt(await self.client.send(self._describe()))
        return self.position

    async def reset(self) -> None:
        await self.client.request("POST", f"{self._path}/reset")
        self.position = 0

    async def delete(self, if_match: str | None = None) -> None:
        await self._run(self._deleting, if_match)

    async def export_state(self, unless: State | None = None) -> State:
        return self._exported(await self.client.send(self._export(unless)), unless)

    async def import_state(self, state: State | bytes, if_match: str | None = None) -> dict[str, Any]:
        return await self._run(self._importing, state, if_match)

    async def fork(self, to: str) -> AsyncSession:
        copy = AsyncSession(self.client, to)
        await self._run(self._forking, copy)
        return copy

    async def _run(self, make: _Maker[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        sent = _Stats()
        steps = make(sent, *args, **kwargs)
        answer: httpx.Response | ServiceError | None = None
        while True:
            try:
                call = _next_call(steps, answer)
            except StopIteration as done:
                return done.value
            try:
                answer = await self.client.send(call, sent)
            except ServiceError as refused:
                answer = refused
