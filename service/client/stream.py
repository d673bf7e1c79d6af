"""Streaming sessions: chunks pipelined over the session's WebSocket (``/v1/sessions/{id}/stream``).

    with Client(url) as client, client.stream_session("pump-7") as session:
        for answer in session.stream(rows, chunk=8):
            ...

Up to ``window`` chunks are sent before their answers arrive, each with the offset it starts at. When the
connection drops (or a frame or the upgrade is refused with a 408, a 429 or a 5xx) the session reconnects
with backoff and resends every chunk not yet answered, from the last acknowledged offset, no more at once than the new
connection's window takes (``Unavailable`` once ``retry.attempts`` tries in a row have had no answer): the
service applies each once (the README's offset rules). A chunk the service had applied but whose answer was
lost with the connection, and is not the last it applied, comes back as a 409 naming a position past it: its
steps are in the session, its answer is gone; it is listed in ``lost`` ((offset, steps) pairs) and the
stream goes on.
A send that fails (the service closed the stream: a drain's 1001) does not reconnect at once: the answers the
connection had already received would go with it, and their chunks, resent, would come back as ``lost``. The
frame stays unanswered; the next receive reads what the old connection holds, then fails on it and reconnects.
A send is bounded by ``timeout`` as a receive is: one that cannot complete in time (a service that stops reading
lets the socket's buffers fill) drops the connection, and fails as above.
Each answer frame is held to the HTTP calls' rule (``unusable_answer``): one that breaks it is a ``BadAnswer``.
``AsyncStreamSession`` is the same with ``await``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection as AsyncConnection
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import InvalidStatus, PayloadTooBig, WebSocketException
from websockets.headers import build_host
from websockets.http11 import Request, Response
from websockets.sync.client import ClientConnection, connect
from websockets.uri import parse_uri

from service.client import (
    DEFAULT_MAX_ANSWER_BYTES,
    RETRY_STATUSES,
    BadAnswer,
    Prediction,
    Retry,
    ServiceError,
    Unavailable,
    Values,
    _chunks,
    chunk_fields,
    problem_error,
    unusable_answer,
)

DEFAULT_WINDOW = 64
_DROPPED = (WebSocketException, OSError, TimeoutError)  # the connection failed; resend what is unanswered
_FATAL_CLOSE = {1008: 401, 1009: 413}  # closes that a reconnect would only repeat


@dataclass(slots=True)
class _Sent:
    offset: int
    steps: int
    frame: str
    asked: dict[str, Any]  # the chunk's horizon, levels and scores, which shape its answer
    resent: bool = False  # sent again on a new connection: its first answer may have been lost


class _Retryable(Exception):
    """A problem frame that a resend may cure (408, 429, 5xx)."""


class _Window:
    """What a streaming session has sent and not had answered, and how an answer moves it: the part the
    sync and the async session share; they differ only in how they send, receive and wait."""

    def __init__(self, url: str, api_key: str | None, session_id: str, position: int, window: int, retry: Retry,
                 max_answer_bytes: int):
        if window < 1:
            raise ValueError("window must be at least 1")
        self.url = url.replace("http://", "ws://", 1).replace("https://", "wss://", 1).rstrip("/")
        self.url += f"/v1/sessions/{session_id}/stream"
        uri = parse_uri(self.url)
        self._target = (uri.resource_name, build_host(uri.host, uri.port, uri.secure))  # path and Host asked
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.id = session_id
        self.position = position  # the session's position as the last answer reported
        self.window = window
        self.retry = retry
        self.max_answer_bytes = max_answer_bytes  # the connection's max_size: a longer frame ends the stream
        self.unanswered: deque[_Sent] = deque()
        self._held: deque[str] = deque()  # unanswered frames a reconnect sends once the window has room
        self.lost: list[tuple[int, int]] = []
        self.reconnects = 0
        self._failures = 0  # failures since the last answer: a reconnect that goes through is no progress
        self._next = position  # where the next chunk starts
        # No answer yet, so the session's position is only assumed: one chunk goes alone until one comes. A
        # window of chunks sent at a wrong start would have the one whose offset meets the session applied.
        self._confirmed = False
        self.stopping = False  # ``stop()``: no more chunks are sent

    def stop(self) -> None:
        """Send no more chunks: ``stream`` ends once those already sent are answered (the CLI, stopped by a
        signal, so keeps the answer of every chunk the service applied). Safe from a signal handler."""
        self.stopping = True

    def _frame(self, rows: list[Any], fields: dict[str, Any]) -> str:
        sent = _Sent(self._next, len(rows), json.dumps({"values": rows, "offset": self._next, **fields}),
                     fields)
        self.unanswered.append(sent)
        self._next += sent.steps
        return sent.frame

    @property
    def _full(self) -> bool:
        return len(self.unanswered) >= (self.window if self._confirmed else 1)

    def _take(self, text: str | bytes) -> Prediction | None:
        """The answer to the oldest unanswered chunk; None when its answer was lost with a connection."""
        try:
            answer = json.loads(text)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise BadAnswer(None, {"detail": f"not a JSON object: {text[:200]!r}"}, "stream answer unusable")
        status = answer.get("status")
        sent = self.unanswered[0]
        if status is None:
            if (why := unusable_answer(answer, sent.steps, sent.offset, sent.asked, self.id)) is not None:
                raise BadAnswer(None, {"detail": why}, f"stream answer unusable: {why}")
            prediction = Prediction.from_json(answer)
            self._answered()
            return prediction
        if type(status) is not int:
            raise BadAnswer(None, {"detail": f"problem frame status {status!r}"}, "stream answer unusable")
        if status in RETRY_STATUSES:
            raise _Retryable(f"problem frame {status}: {answer.get('detail', '')}")
        position = answer.get("position")
        if status == 409 and sent.resent and type(position) is int and position >= sent.offset + sent.steps:
            self._answered()
            self.lost.append((sent.offset, sent.steps))
            return None
        raise problem_error(status, answer)

    def _answered(self) -> None:
        """The oldest chunk is done with: the session is past it."""
        sent = self.unanswered.popleft()
        self._failures = 0
        self._confirmed = True
        self.position = sent.offset + sent.steps

    def _redirected(self, request: Request | None) -> BadAnswer | None:
        """The error for a connection that a redirect of the upgrade took elsewhere (websockets follows them, to
        another session's stream too; the HTTP calls follow none), or None: no chunk may go there."""
        arrived = (request.path, request.headers.get("Host")) if request is not None else self._target
        if arrived == self._target:
            return None
        why = f"a redirect to {arrived[1]}{arrived[0]}; the client follows none: give it the service's URL"
        return BadAnswer(None, {"detail": why}, f"stream upgrade unusable: {why}")

    def _fit(self, response: Response | None) -> None:
        """Keep no more chunks in flight than the service reads ahead (its 101 answer's ``X-Stream-Window``):
        past it the service stops reading, and a send blocked on that stops this side's reading too (the
        sync connection's reader waits for the send; the async one pauses at 16 frames): both would wait."""
        announced = response.headers.get("X-Stream-Window", "") if response is not None else ""
        if announced.isascii() and announced.isdigit() and int(announced) > 0:
            self.window = min(self.window, int(announced))

    def _resend(self) -> list[str]:
        """The unanswered frames to send again on a new connection now: as many as its window takes (it may
        announce a smaller one than the last); the rest are held until answers make room (``_room_made``)."""
        for sent in self.unanswered:
            sent.resent = True
        frames = [sent.frame for sent in self.unanswered]
        self._held = deque(frames[self.window :])
        return frames[: self.window]

    def _room_made(self) -> list[str]:
        """The held frames that the window has room for now."""
        room = self.window - (len(self.unanswered) - len(self._held))
        return [self._held.popleft() for _ in range(min(room, len(self._held)))]

    def _pause(self, failure: BaseException) -> float:
        """Seconds before the next reconnect, or the error to give up with once ``retry.attempts`` tries in a
        row have had no answer."""
        if isinstance(failure, InvalidStatus) and failure.response.status_code not in RETRY_STATUSES:
            response = failure.response
            try:
                problem = json.loads(response.body or b"{}")
            except ValueError:
                problem = {"detail": (response.body or b"").decode(errors="replace")[:500]}
            raise problem_error(response.status_code, problem)
        if isinstance(failure.__cause__, PayloadTooBig):  # ours: a resend would only have it sent again
            why = f"a frame over {self.max_answer_bytes} bytes, the client's max_answer_bytes"
            raise BadAnswer(None, {"detail": why}, f"stream answer unusable: {why}; raise it if the service's"
                            " answers are that large")
        code = getattr(getattr(failure, "rcvd", None), "code", None)
        if code in _FATAL_CLOSE:
            raise ServiceError(_FATAL_CLOSE[code], {"detail": f"the service closed the stream with {code}"})
        attempt = self._failures
        self._failures += 1
        if attempt >= self.retry.attempts - 1:
            raise Unavailable(None, {"detail": str(failure)},
                              f"gave up after {self.retry.attempts} attempts; last: {failure!r}") from failure
        self.reconnects += 1
        return self.retry.delay(attempt, None)


class StreamSession(_Window):
    """A session streamed over its WebSocket, chunks pipelined up to ``window`` ahead of their answers."""

    def __init__(self, url: str, api_key: str | None, session_id: str, *, position: int = 0,
                 window: int = DEFAULT_WINDOW, retry: Retry | None = None, timeout: float = 30.0,
                 max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES):
        super().__init__(url, api_key, session_id, position, window, retry or Retry(), max_answer_bytes)
        self.timeout = timeout
        self._ws: ClientConnection | None = None

    def __enter__(self) -> StreamSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    def stream(self, values: Values, chunk: int = 32, horizon: int = 0, *, levels: Sequence[float] = (),
               scores: bool = False) -> Iterator[Prediction]:
        """The series in chunks of ``chunk`` steps, one answer per chunk (none for a chunk in ``lost``);
        ``levels`` and ``scores`` as ``Session.predict`` takes them."""
        fields = chunk_fields(horizon, levels, scores)
        for rows in _chunks(values, chunk):
            while self._full:
                yield from self._receive()
            if self.stopping:
                break
            self._send(self._frame(rows, fields))
        while self.unanswered:
            yield from self._receive()

    def _send(self, frame: str) -> None:
        try:
            ws = self._connection()
        except _DROPPED as failure:
            self._reconnect(failure)  # which sends this frame too
            return
        with contextlib.suppress(*_DROPPED):  # the stream failed under it: the next receive resends it
            ws.send(frame)

    def _receive(self) -> Iterator[Prediction]:
        try:
            ws = self._connection()
            prediction = self._take(ws.recv(timeout=self.timeout))
        except (*_DROPPED, _Retryable) as failure:
            self._reconnect(failure)
            return
        with contextlib.suppress(*_DROPPED):  # as in _send: the next receive fails, and the reconnect resends
            for frame in self._room_made():
                ws.send(frame)
        if prediction is not None:
            yield prediction

    def _connection(self) -> ClientConnection:
        if self._ws is None:
            # entered as a context (websockets 16+ deprecates a bare connect()); closed by close() or a reconnect;
            # frames up to max_answer_bytes, not websockets' 1 MiB: an answer with intervals is many times its chunk
            ws = connect(self.url, additional_headers=self.headers, open_timeout=self.timeout,
                         compression=None, max_size=self.max_answer_bytes).__enter__()
            if (refused := self._redirected(ws.request)) is not None:
                ws.close()
                raise refused
            # bounds each send (whose sendall has no timeout of its own); the reader selects before it reads, so
            # an idle connection never times out: a send past it closes the connection (ConnectionClosedError)
            ws.socket.settimeout(self.timeout)
            self._ws = ws
            self._fit(ws.response)
        return self._ws

    def _reconnect(self, failure: BaseException) -> None:
        while True:  # until a reconnect goes through, or ``_pause`` gives up
            time.sleep(self._pause(failure))
            if self._ws is not None:
                self._ws.close_socket()
                self._ws = None
            try:
                ws = self._connection()
                for frame in self._resend():
                    ws.send(frame)
                return
            except _DROPPED as again:
                failure = again


class AsyncStreamSession(_Window):
    """``StreamSession`` for asyncio."""

    def __init__(self, url: str, api_key: str | None, session_id: str, *, position: int = 0,
                 window: int = DEFAULT_WINDOW, retry: Retry | None = None, timeout: float = 30.0,
                 max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES):
        super().__init__(url, api_key, session_id, position, window, retry or Retry(), max_answer_bytes)
        self.timeout = timeout
        self._ws: AsyncConnection | None = None

    async def __aenter__(self) -> AsyncStreamSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._ws is not None:
            await self._ws.close()
            self._ws = None

    async def stream(self, values: Values, chunk: int = 32, horizon: int = 0, *, levels: Sequence[float] = (),
                     scores: bool = False) -> AsyncIterator[Prediction]:
        fields = chunk_fields(horizon, levels, scores)
        for rows in _chunks(values, chunk):
            while self._full:
                if (prediction := await self._receive()) is not None:
                    yield prediction
            if self.stopping:
                break
            await self._send(self._frame(rows, fields))
        while self.unanswered:
            if (prediction := await self._receive()) is not None:
                yield prediction

    async def _send(self, frame: str) -> None:
        try:
            ws = await self._connection()
        except _DROPPED as failure:
            await self._reconnect(failure)  # which sends this frame too
            return
        with contextlib.suppress(*_DROPPED):  # the stream failed under it: the next receive resends it
            await self._put(ws, frame)

    async def _receive(self) -> Prediction | None:
        try:
            async with asyncio.timeout(self.timeout):
                ws = await self._connection()
                prediction = self._take(await ws.recv())
        except (*_DROPPED, _Retryable) as failure:
            await self._reconnect(failure)
            return None
        with contextlib.suppress(*_DROPPED):  # as in _send: the next receive fails, and the reconnect resends
            for frame in self._room_made():
                await self._put(ws, frame)
        return prediction

    async def _put(self, ws: AsyncConnection, frame: str) -> None:
        """``ws.send`` within ``timeout``: past it (a service that stops reading lets the buffers fill, and the
        send waits on them for ever) the connection is dropped, so that what follows fails at once."""
        try:
            async with asyncio.timeout(self.timeout):
                await ws.send(frame)
        except TimeoutError:
            ws.transport.abort()
            raise

    async def _connection(self) -> AsyncConnection:
        if self._ws is None:
            ws = await async_connect(self.url, additional_headers=self.headers, open_timeout=self.timeout,
                                     compression=None, max_size=self.max_answer_bytes)
            if (refused := self._redirected(ws.request)) is not None:
                await ws.close()
                raise refused
            self._ws = ws
            self._fit(ws.response)
        return self._ws

    async def _reconnect(self, failure: BaseException) -> None:
        while True:  # until a reconnect goes through, or ``_pause`` gives up
            await asyncio.sleep(self._pause(failure))
            if self._ws is not None:
                self._ws.transport.abort()
                self._ws = None
            try:
                ws = await self._connection()
                for frame in self._resend():
                    await self._put(ws, frame)
                return
            except _DROPPED as again:
                failure = again
