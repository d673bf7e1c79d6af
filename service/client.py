"""A small client for the service (httpx only): sessions that track their offset, retries safe by contract.

    from service.client import Client
    with Client("http://localhost:8000") as client:
        answers = list(client.session("pump-7").stream(rows, chunk=32))

Every chunk is sent with the offset it starts at (the session's position as the last answer reported). So
a network error or a 5xx/429 is retried with the same offset: if the server had applied the chunk, the
retry gets the same answer back and nothing is applied twice (DESIGN §4). A 409 raises ``OffsetConflict``
carrying the server's ``position`` (``session.resync()`` adopts it); an expired session raises
``SessionNotFound``. ``AsyncClient`` is the same with ``await``.

The command line streams a CSV through a session (needs the ``client`` extra for the progress bar and plot):

    python -m service.client stream --csv series.csv --session pump-7 [--chunk 32] [--url URL]
        [--out predictions.csv] [--plot out.png] [--columns a,b] [--api-key KEY] [--reset | --resume]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import math
import os
import random
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

SESSION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# Errors after which the request may or may not have reached the server: safe to resend with the offset.
RETRY_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)
Values = Sequence[Sequence[float]] | Sequence[float] | Any  # lists, or anything with .tolist() (numpy)


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


class Unavailable(ServiceError):
    """Every attempt failed with a network error, a 5xx or a 429; the last failure is the ``__cause__``."""


def _error(response: httpx.Response) -> ServiceError:
    try:
        problem = response.json()
        if not isinstance(problem, dict):
            raise ValueError
    except ValueError:
        problem = {"status": response.status_code, "title": response.reason_phrase,
                   "detail": response.text[:500]}
    kind = str(problem.get("type", "")).rsplit("/", 1)[-1]
    status = response.status_code
    if status == 409 and "position" in problem:
        return (ModelChanged if kind == "model-changed" else OffsetConflict)(status, problem)
    if status == 404 and kind == "session-not-found":
        return SessionNotFound(status, problem)
    return ServiceError(status, problem)


# -- answers and retry policy ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Prediction:
    """One answer: the one-step-ahead prediction after every step sent, and the forecast if asked for."""

    predictions: list[list[float]]  # T × F_out
    forecast: list[list[float]] | None  # horizon × F_out
    model_version: str
    position: int | None = None  # sessions only: steps consumed, this chunk included
    created: bool | None = None  # sessions only: this chunk started the session
    session_id: str | None = None

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Prediction:
        return cls(body["predictions"], body.get("forecast"), body["model_version"], body.get("position"),
                   body.get("created"), body.get("session_id"))


@dataclass(frozen=True, slots=True)
class Retry:
    """Exponential backoff with jitter; a ``Retry-After`` header is honoured up to ``max_delay``."""

    attempts: int = 10  # tries in all, the first included: 16 to 21 s of waiting, past a service restart
    backoff: float = 0.1  # seconds before the first retry; doubles each time
    max_delay: float = 5.0

    def delay(self, attempt: int, response: httpx.Response | None) -> float:
        wait = self.backoff * 2**attempt * random.uniform(0.5, 1.0)
        if response is not None:
            with contextlib.suppress(ValueError):
                wait = max(wait, float(response.headers.get("retry-after", 0)))
        return min(wait, self.max_delay)


def _rows(values: Values) -> list[Any]:
    rows = values.tolist() if hasattr(values, "tolist") else list(values)
    if not rows:
        raise ValueError("values is empty; send at least one step")
    return rows


def _check_id(session_id: str) -> str:
    if not SESSION_ID.fullmatch(session_id):
        raise ValueError(f"session id {session_id!r} must match {SESSION_ID.pattern}")
    return session_id


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _answer(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        raise _error(response)
    body: dict[str, Any] = response.json() if response.content else {}
    return body


@dataclass
class _Stats:
    retries: int = 0  # resends after a network error, a 5xx or a 429
    failures: list[str] = field(default_factory=list)  # why, most recent last (capped)

    def note(self, why: str) -> None:
        self.retries += 1
        self.failures = [*self.failures[-19:], why]


def _why(error: Exception | None, response: httpx.Response | None) -> str:
    if error is not None:
        return f"{type(error).__name__}: {error}"
    return f"HTTP {response.status_code if response is not None else '?'}"


class _Tries:
    """One call's attempts: the retry loop of both clients, which differ only in how they send and wait.

    Iterating yields the pause before each attempt (0 before the first); the caller reports each attempt's
    outcome with ``failed`` or ``settled`` and, when the iteration ends, raises ``give_up()``.
    """

    def __init__(self, retry: Retry, stats: _Stats):
        self.retry = retry
        self.stats = stats
        self.error: Exception | None = None
        self.response: httpx.Response | None = None

    def __iter__(self) -> Iterator[float]:
        for attempt in range(self.retry.attempts):
            pause = 0.0
            if attempt:
                self.stats.note(_why(self.error, self.response))
                pause = self.retry.delay(attempt - 1, self.response)
            self.error = self.response = None
            yield pause

    def failed(self, error: Exception) -> None:
        self.error = error

    def settled(self, response: httpx.Response) -> bool:
        """Whether this answer is final (anything but a 5xx or a 429)."""
        self.response = response
        return response.status_code not in RETRY_STATUSES

    def give_up(self) -> Unavailable:
        response, error = self.response, self.error
        status = response.status_code if response is not None else None
        problem = _error(response).problem if response is not None else {"detail": _why(error, None)}
        return Unavailable(status, problem,
                           f"gave up after {self.retry.attempts} attempts; last: {_why(error, response)}"
                           + (f" ({problem.get('detail')})" if response is not None else ""))


class _SessionCalls:
    """What a session sends and how an answer moves it, for both the sync and the async handle."""

    def __init__(self, session_id: str, position: int = 0):
        self.id = session_id
        self.position = position

    def _chunk(self, values: Values, horizon: int) -> tuple[str, str, dict[str, Any]]:
        body = {"values": _rows(values), "offset": self.position, "horizon": horizon}
        return "POST", f"/v1/sessions/{self.id}/predict", body

    def _advance(self, answer: dict[str, Any]) -> Prediction:
        prediction = Prediction.from_json(answer)
        self.position = int(prediction.position or 0)
        return prediction

    def _chunks(self, values: Values, chunk: int) -> Iterator[list[list[float]]]:
        rows = _rows(values)
        for start in range(0, len(rows), chunk):
            yield rows[start : start + chunk]


# -- sync --------------------------------------------------------------------------------------------


class Client:
    """The service at ``base_url``; ``api_key`` is sent as ``Authorization: Bearer``."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, *,
                 timeout: float = 30.0, retry: Retry | None = None,
                 transport: httpx.BaseTransport | None = None):
        self.retry = retry or Retry()
        self.stats = _Stats()
        self._http = httpx.Client(base_url=base_url, headers=_headers(api_key), timeout=timeout,
                                  transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One call, resent with the same body after network errors, 5xx and 429; the JSON answer or a
        ``ServiceError``. Only use it for calls that are safe to repeat (every call of this API is)."""
        tries = _Tries(self.retry, self.stats)
        for pause in tries:
            if pause:
                time.sleep(pause)
            try:
                response = self._http.request(method, path, json=body)
            except RETRY_ERRORS as exc:
                tries.failed(exc)
                continue
            if tries.settled(response):
                return _answer(response)
        raise tries.give_up() from tries.error

    def model(self) -> dict[str, Any]:
        return self.request("GET", "/v1/model")

    def predict(self, values: Values, horizon: int = 0) -> Prediction:
        """A whole series from a fresh state; nothing is kept."""
        body = {"values": _rows(values), "horizon": horizon}
        return Prediction.from_json(self.request("POST", "/v1/predict", body))

    def session(self, session_id: str, *, resume: bool = False) -> Session:
        """A session handle starting at position 0, or, with ``resume``, where the server has it (0 if
        unknown)."""
        session = Session(self, _check_id(session_id))
        if resume:
            with contextlib.suppress(SessionNotFound):
                session.resync()
        return session


class Session(_SessionCalls):
    """One session: ``predict`` sends the next chunk at ``position`` and moves it by the answer."""

    def __init__(self, client: Client, session_id: str, position: int = 0):
        super().__init__(session_id, position)
        self.client = client

    def predict(self, values: Values, horizon: int = 0) -> Prediction:
        return self._advance(self.client.request(*self._chunk(values, horizon)))

    def stream(self, values: Values, chunk: int = 32, horizon: int = 0) -> Iterator[Prediction]:
        """The series in chunks of ``chunk`` steps, one answer per chunk."""
        for rows in self._chunks(values, chunk):
            yield self.predict(rows, horizon)

    def info(self) -> dict[str, Any]:
        return self.client.request("GET", f"/v1/sessions/{self.id}")

    def resync(self) -> int:
        """Adopt the server's position (after an ``OffsetConflict``, say) and return it."""
        self.position = int(self.info()["position"])
        return self.position

    def reset(self) -> None:
        self.client.request("POST", f"/v1/sessions/{self.id}/reset")
        self.position = 0

    def delete(self) -> None:
        with contextlib.suppress(SessionNotFound):  # a retried delete whose first try went through
            self.client.request("DELETE", f"/v1/sessions/{self.id}")
        self.position = 0


# -- async -------------------------------------------------------------------------------------------


class AsyncClient:
    """``Client`` for asyncio: the same calls, awaited."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", api_key: str | None = None, *,
                 timeout: float = 30.0, retry: Retry | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        self.retry = retry or Retry()
        self.stats = _Stats()
        self._http = httpx.AsyncClient(base_url=base_url, headers=_headers(api_key), timeout=timeout,
                                       transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        tries = _Tries(self.retry, self.stats)
        for pause in tries:
            if pause:
                await asyncio.sleep(pause)
            try:
                response = await self._http.request(method, path, json=body)
            except RETRY_ERRORS as exc:
                tries.failed(exc)
                continue
            if tries.settled(response):
                return _answer(response)
        raise tries.give_up() from tries.error

    async def model(self) -> dict[str, Any]:
        return await self.request("GET", "/v1/model")

    async def predict(self, values: Values, horizon: int = 0) -> Prediction:
        body = {"values": _rows(values), "horizon": horizon}
        return Prediction.from_json(await self.request("POST", "/v1/predict", body))

    async def session(self, session_id: str, *, resume: bool = False) -> AsyncSession:
        session = AsyncSession(self, _check_id(session_id))
        if resume:
            with contextlib.suppress(SessionNotFound):
                await session.resync()
        return session


class AsyncSession(_SessionCalls):
    """``Session`` for asyncio."""

    def __init__(self, client: AsyncClient, session_id: str, position: int = 0):
        super().__init__(session_id, position)
        self.client = client

    async def predict(self, values: Values, horizon: int = 0) -> Prediction:
        return self._advance(await self.client.request(*self._chunk(values, horizon)))

    async def stream(self, values: Values, chunk: int = 32, horizon: int = 0) -> AsyncIterator[Prediction]:
        for rows in self._chunks(values, chunk):
            yield await self.predict(rows, horizon)

    async def info(self) -> dict[str, Any]:
        return await self.client.request("GET", f"/v1/sessions/{self.id}")

    async def resync(self) -> int:
        self.position = int((await self.info())["position"])
        return self.position

    async def reset(self) -> None:
        await self.client.request("POST", f"/v1/sessions/{self.id}/reset")
        self.position = 0

    async def delete(self) -> None:
        with contextlib.suppress(SessionNotFound):
            await self.client.request("DELETE", f"/v1/sessions/{self.id}")
        self.position = 0


# -- the command line --------------------------------------------------------------------------------


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _blank(row: list[str]) -> bool:
    return not any(cell.strip() for cell in row)


def _shape(cell: str) -> str:
    """A cell with its runs of letters and of digits each reduced to one mark: 2020-01-01 and 2021-12-31
    look alike, "date" does not."""
    return re.sub(r"[0-9]+", "9", re.sub(r"[^\W\d_]+", "a", cell.strip()))


def read_csv(
    path: Path, features: Sequence[str], columns: Sequence[str] | None
) -> tuple[list[str], list[list[float]]]:
    """(column names, rows) of the model's inputs from a CSV, with or without a header row.

    Columns: ``columns`` if given; else the model's feature names when the header has them all; else the
    numeric columns, if there are as many as the model takes features."""
    with path.open(newline="", encoding="utf-8-sig") as file:  # a spreadsheet's byte-order mark is no text
        reader = csv.reader(file)
        table = [(reader.line_num, row) for row in reader]
    while table and _blank(table[-1][1]):  # blank lines at the end are no rows
        table.pop()
    if not table:
        raise SystemExit(f"{path} is empty")
    blank = next((line for line, row in table if _blank(row)), None)
    if blank is not None:  # skipping it would shift every later step against the file's time axis
        raise SystemExit(f"{path}:{blank}: empty row; fill or remove it (the service takes evenly spaced steps)")
    first = table[0][1]
    second = table[1][1] if len(table) > 1 else []
    # A header: a cell that is not a number over one that is, or over text of another shape (a column named
    # "date" over 2020-01-01; a headerless date column has one shape in every row). One row: any text.
    has_header = (any(_number(a) is None and (_number(b) is not None or _shape(a) != _shape(b))
                      for a, b in zip(first, second, strict=False))
                  if second else any(_number(cell) is None for cell in first))
    header = [cell.strip() for cell in first] if has_header else [f"column{i}" for i in range(len(first))]
    data = table[1:] if has_header else table
    if not data:
        raise SystemExit(f"{path} has a header and no rows")
    if columns:
        missing = [c for c in columns if c not in header]
        if missing:
            raise SystemExit(f"{path} has no column {', '.join(missing)}; it has {', '.join(header)}")
        picked = [header.index(c) for c in columns]
    elif all(f in header for f in features):
        picked = [header.index(f) for f in features]
    else:
        row = data[0][1]
        picked = [i for i in range(len(header)) if i < len(row) and _number(row[i]) is not None]
    if len(picked) != len(features):
        raise SystemExit(f"the model takes {len(features)} feature(s) ({', '.join(features)}); {path} has"
                         f" {len(picked)} numeric column(s) ({', '.join(header[i] for i in picked)}): choose"
                         " with --columns")
    rows: list[list[float]] = []
    for line, row in data:
        try:
            values = [float(row[i]) for i in picked]
        except (ValueError, IndexError):
            values = []
        if len(values) != len(picked) or not all(map(math.isfinite, values)):
            where = ", ".join(header[i] for i in picked)
            raise SystemExit(f"{path}:{line}: not a finite number in column(s) {where}")
        rows.append(values)
    return [header[i] for i in picked], rows


def _progress() -> Any:
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
    except ImportError:  # the client extra is not installed: no bar
        return None
    return Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                    TimeRemainingColumn(), transient=False)


def _header(names: Sequence[str]) -> list[str]:
    return ["step", *names, *(f"predicted_{n}" for n in names)]


def _earlier_rows(path: Path, names: Sequence[str]) -> list[list[str]]:
    """The rows of an earlier run's predictions file for these columns; none if there is no such file."""
    if not path.exists():
        return []
    with path.open(newline="") as file:
        earlier = list(csv.reader(file))
    if not earlier or earlier[0] != _header(names) or not all(row and row[0].isdigit() for row in earlier[1:]):
        return []
    return earlier[1:]


def write_predictions(path: Path, names: Sequence[str], truth: Sequence[Sequence[float]],
                      predictions: Sequence[Sequence[float]], start: int) -> None:
    """One row per step: the truth, and the prediction *for* that step (made after the step before). The
    last row is the prediction for the step after the series. A resumed stream (``start`` > 0) keeps the
    rows before ``start`` of the run before it, and that run's prediction for step ``start``: a stream cut
    off and resumed leaves one file."""
    rows: list[list[Any]] = []
    carried: list[Any] = [""] * len(names)  # the prediction for step ``start``, made by the run before
    if start > 0:
        earlier = [row for row in _earlier_rows(path, names) if int(row[0]) <= start]
        if earlier and int(earlier[-1][0]) == start:
            rows, carried = [*earlier[:-1]], earlier[-1][1 + len(names):]
    for i in range(len(truth) + 1):
        actual = list(truth[i]) if i < len(truth) else [""] * len(names)
        predicted = list(predictions[i - 1]) if i >= 1 else carried
        rows.append([start + i, *actual, *predicted])
    # Beside it, then renamed over it: with --resume the file holds earlier runs' rows too, and an
    # interruption mid-write (a second Ctrl-C) must leave the old file, not half of the new one.
    written = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with written.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(_header(names))
            writer.writerows(rows)
        os.replace(written, path)
    finally:
        written.unlink(missing_ok=True)


def _recover_lost_answer(session: Session, path: Path, names: Sequence[str], rows: Sequence[Sequence[float]]
                         ) -> tuple[int, list[list[float]]]:
    """Where a resumed stream's file starts again, and the answers it lacks up to the session's position.

    A stream interrupted (Ctrl-C, a dropped network) while a chunk was in flight leaves a file that ends one
    chunk before the session: the service applied the chunk, the client never read its answer. Sent again as
    it was (same offset, same values) it is an exact retry, which the service answers again. Anything else
    (more than the last chunk missing) cannot be asked for again: refused rather than leave a gap in the file
    or overwrite it.
    """
    earlier = _earlier_rows(path, names)
    if not earlier or int(earlier[-1][0]) >= session.position:
        return session.position, []
    end, position = int(earlier[-1][0]), session.position
    session.position = end
    try:
        answer = session.predict(rows[end:position])
    except OffsetConflict:
        session.position = position
        raise SystemExit(f"{path} ends at step {end} but session {session.id} is at {position}, and only the"
                         f" last chunk's answer can be asked for again: --out another file keeps this one,"
                         " --reset starts the session again") from None
    return end, answer.predictions


def plot(path: Path, names: Sequence[str], truth: Sequence[Sequence[float]],
         predictions: Sequence[Sequence[float]], start: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(names)
    fig, axes = plt.subplots(count, 1, figsize=(11, 3 * count), squeeze=False, sharex=True)
    steps = range(start, start + len(truth))
    for j, (name, ax) in enumerate(zip(names, axes[:, 0], strict=True)):
        ax.plot(steps, [row[j] for row in truth], label="truth", linewidth=1.2)
        ax.plot(range(start + 1, start + len(predictions) + 1), [row[j] for row in predictions],
                label="one-step prediction", linewidth=1.0, alpha=0.85)
        ax.set_ylabel(name)
        ax.legend(loc="upper left")
    axes[-1, 0].set_xlabel("step")
    fig.suptitle("truth vs one-step-ahead prediction")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def stream_csv(args: argparse.Namespace) -> int:
    with Client(args.url, args.api_key, timeout=args.timeout) as client:
        model = client.model()
        names, rows = read_csv(args.csv, model["feature_names"], args.columns)
        session = client.session(args.session, resume=args.resume)
        if args.reset:
            session.reset()
        if session.position > len(rows):
            raise SystemExit(f"session {args.session} is at position {session.position}, past the {len(rows)}"
                             f" rows of {args.csv}")
        out = args.out or args.csv.with_name(args.csv.stem + ".predictions.csv")
        start, predictions = _recover_lost_answer(session, out, names, rows) if args.resume else (0, [])
        todo = rows[start:]
        progress = _progress() if not args.quiet else None
        task = progress.add_task(f"session {args.session}", total=len(todo)) if progress else None
        try:
            if progress:
                progress.start()
                progress.update(task, advance=len(predictions))
            for offset in range(len(predictions), len(todo), args.chunk):
                try:
                    answer = session.predict(todo[offset : offset + args.chunk])
                except ModelChanged as exc:
                    raise SystemExit(f"{exc}\nthe session's state is from another model version: --reset to"
                                     " start it again with this one") from None
                except OffsetConflict as exc:
                    raise SystemExit(f"{exc}\nthe session is at {exc.position}: --resume to continue from"
                                     " there, --reset to start again") from None
                predictions.extend(answer.predictions)
                if progress:
                    progress.update(task, advance=len(answer.predictions))
        except (ServiceError, httpx.HTTPError, SystemExit, KeyboardInterrupt):
            if predictions:  # keep what was answered: a --resume run extends the file
                write_predictions(out, names, todo[: len(predictions)], predictions, start)
                print(f"steps {start} to {start + len(predictions) - 1} and their predictions are in {out};"
                      " --resume goes on from there", file=sys.stderr)
            raise
        finally:
            if progress:
                progress.stop()
    write_predictions(out, names, todo, predictions, start)
    message = f"{len(todo)} steps from position {start} -> {session.position}; predictions in {out}"
    if args.plot:
        plot(args.plot, names, todo, predictions, start)
        message += f", plot in {args.plot}"
    if client.stats.retries:
        message += f" ({client.stats.retries} retried call(s))"
    print(message, file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.client", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    stream = commands.add_parser("stream", help="stream a CSV through a session, write its predictions")
    stream.add_argument("--csv", type=Path, required=True, help="input series, one row a step")
    stream.add_argument("--session", required=True, help="session id (^[A-Za-z0-9._:-]{1,128}$)")
    stream.add_argument("--chunk", type=int, default=32, help="steps per call (default 32)")
    stream.add_argument("--url", default=os.environ.get("GRU_URL", "http://127.0.0.1:8000"),
                        help="service base URL (default $GRU_URL or http://127.0.0.1:8000)")
    stream.add_argument("--api-key", default=os.environ.get("GRU_API_KEY"), help="default $GRU_API_KEY")
    stream.add_argument("--out", type=Path, help="predictions CSV (default FILE.predictions.csv);"
                        " --resume extends it when it ends where the session is")
    stream.add_argument("--plot", type=Path, help="also draw truth vs prediction to this PNG")
    stream.add_argument("--columns", type=lambda s: [c.strip() for c in s.split(",")],
                        help="comma-separated CSV columns to send (default: the model's feature names)")
    stream.add_argument("--timeout", type=float, default=30.0, help="seconds per call")
    stream.add_argument("--quiet", action="store_true", help="no progress bar")
    start = stream.add_mutually_exclusive_group()
    start.add_argument("--reset", action="store_true", help="reset the session first")
    start.add_argument("--resume", action="store_true", help="continue from the server's position")
    args = parser.parse_args(argv)
    if args.chunk < 1:
        parser.error("--chunk must be at least 1")
    # A stop from outside (docker stop, systemd, a closed terminal) saves the answers as Ctrl-C does: a file
    # left more than a chunk behind its session could not be resumed. An ignored signal stays ignored (nohup).
    for stop in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if stop is not None and signal.getsignal(stop) == signal.SIG_DFL:
            signal.signal(stop, _interrupt)
    try:
        return stream_csv(args)
    except (ServiceError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:  # what was answered is saved (stream_csv said where): no traceback
        return 128 + (stop.signum if isinstance(stop, _Stopped) else signal.SIGINT)


class _Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, handled as Ctrl-C is."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum: int, frame: object) -> None:
    raise _Stopped(signum)


if __name__ == "__main__":
    sys.exit(main())
