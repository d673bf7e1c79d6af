"""``/v1/sessions/{session_id}/stream`` (and ``/v1/models/{model}/...``): a WebSocket per session, each text
frame a chunk.

A frame holds a predict body (``values``, ``offset``, ``horizon``, ``levels``, ``scores``), validated exactly
as the POST body is (``service.api.bodies``, ``service.api.extras``); its answer is one text frame holding
exactly the HTTP answer's JSON, or the problem+json object of a refusal, in the order the frames came. A
client may send frames without waiting: up to ``GRU_STREAM_WINDOW`` of one stream wait for the engine, and
beyond that the socket is not read (backpressure: the client's sends stall, nothing is refused). While the
engine's queue is full the stream waits for a place in it, however long, rather than answering 429. A frame
over ``GRU_MAX_BODY_BYTES`` closes the stream with 1009. The caller's tenant is the one the upgrade request
was authenticated as, for the stream's life. Each chunk goes to the engine the HTTP route would give it
(``ServedModel.engine_for``: its pinned version's, else the newest), of the model the registry serves under
the path's name as the chunk is read: a model unloaded while its stream is open answers 404 as HTTP does,
and loaded again it serves the stream's next chunks.

``Streams.drain`` (on SIGTERM, before the server closes connections) stops reading every stream, answers
every frame already read, and closes with 1001 (going away).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

import numpy as np
import orjson
from starlette.routing import WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from service.api.bodies import chunk_array, parse, path_session_id
from service.api.deps import served_model
from service.api.extras import requested
from service.auth import tenant_of
from service.config import Settings
from service.engine import Engine
from service.extras import Extras
from service.http_fields import send_problem
from service.logs import STREAM_SUMMARY
from service.metrics import STREAM_METHOD, Metrics
from service.models import Registry
from service.problems import Problem, as_problem
from service.refusals import Refusal
from service.schemas import ChunkRequest
from service.sessions.base import session_key
from service.ws_flow import PEER_CLOSED

PATH = "/v1/sessions/{session_id}/stream"
MODEL_PATH = "/v1/models/{model}/sessions/{session_id}/stream"
WINDOW_HEADER = b"x-stream-window"  # on the 101 answer: GRU_STREAM_WINDOW
GOING_AWAY = 1001
TOO_BIG = 1009
_LOCATION = ["body", "values"]
_GONE = (WebSocketDisconnect, OSError)  # OSError: uvicorn's ClientDisconnected, a send to a closed peer
# Close codes with which uvicorn's protocol ends a connection itself, when no close frame came from the peer:
# for what the peer sent (a protocol error, text that is not UTF-8, a frame over the size limit), or at its
# shutdown (1012, a drain that ran out of time). The service's close; any other such end is a lost connection.
_PROTOCOL_CLOSES = frozenset({1002, 1007, TOO_BIG, 1012})


async def _unused(websocket: WebSocket) -> None:  # ``Streams`` answers the route; the route only matches
    raise NotImplementedError


ROUTES = [WebSocketRoute(PATH, _unused), WebSocketRoute(MODEL_PATH, _unused)]


class _Counts:
    """The stream's metric series, looked up once (a labelled lookup per frame is a measurable cost)."""

    def __init__(self, metrics: Metrics, route: str):
        self.frames = metrics.stream_frames
        self.latency = metrics.request_duration.labels(route=route, method=STREAM_METHOD)
        self.ok = metrics.requests.labels(route=route, method=STREAM_METHOD, status="200")
        self._requests = metrics.requests
        self._route = route

    def answered(self, status: int, seconds: float) -> None:
        self.frames.answered += 1
        self.latency.observe(seconds)
        (self.ok if status == 200 else self._requests.labels(route=self._route, method=STREAM_METHOD,
                                                             status=str(status))).inc()


class _Stream:
    """One open stream: a reader task takes frames while the window has room, this side answers them in
    order. The window is a count of the frames that may still be read, taken before a frame is read and given
    back once it is answered (a semaphore's two awaited calls a frame cost more than the count's arithmetic)."""

    def __init__(self, websocket: WebSocket, key: str, streams: Streams, count: _Counts, receive: Receive,
                 send: Send):
        self.ws = websocket
        self.key = key
        self.registry: Registry = websocket.app.state.registry  # the model is looked up in it per chunk
        self.model_name: str | None = websocket.path_params.get("model")  # None: the default model
        self.settings = streams.settings
        self.count = count
        # the ASGI receive and send, once accepted (send under Observability's one check a message), not
        # Starlette's WebSocket, whose state checks ran on every frame
        self.receive, self.send = receive, send
        self.room = self.settings.stream_window  # frames the window still takes
        self.freed = asyncio.Event()  # set when an answer gives the window a place back
        self.pending: deque[tuple[float, asyncio.Future[bytes] | Problem | None]] = deque()
        self.ready = asyncio.Event()
        self.close_code: int | None = None  # set when this side ends the stream
        self.frames_in = 0  # read
        self.frames_out = 0  # answered
        self.draining = False
        self.gone = False  # the peer closed: nothing more can be sent
        self.idle = False  # the reader waits for a slot or a frame: safe to cancel, nothing read is lost
        self.reader: asyncio.Task[None] | None = None

    def drain(self) -> None:
        """Read nothing more; what was read is answered, then the stream closes with 1001."""
        self.draining = True
        if self.idle and self.reader is not None:
            self.reader.cancel()

    async def run(self) -> None:
        self.reader = asyncio.create_task(self._read())
        try:
            await self._answer()
        finally:
            self.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reader
            for _, item in self.pending:  # the peer is gone: its unread chunks need not run
                if isinstance(item, asyncio.Future):
                    item.cancel()
        if self.close_code is not None:
            with contextlib.suppress(*_GONE, RuntimeError):
                await self.ws.close(self.close_code)

    async def _read(self) -> None:
        try:
            while not self.draining:
                self.idle = True
                while not self.room:
                    self.freed.clear()
                    await self.freed.wait()
                self.room -= 1
                message = await self.receive()
                self.idle = False
                if message["type"] == "websocket.disconnect":
                    self.gone = True
                    code = message.get("code", 1005)  # 1005: none given
                    # the peer's close, whatever its code (a client may close with 1009), is in the scope
                    if PEER_CLOSED not in self.ws.scope and code in _PROTOCOL_CLOSES:
                        self.close_code = code
                    break
                raw = message.get("bytes")
                if raw is None:
                    raw = message.get("text", "").encode()
                if len(raw) > self.settings.max_body_bytes:  # uvicorn, set up by service.__main__, does this first
                    self.close_code = TOO_BIG
                    break
                self.count.frames.received += 1
                self.frames_in += 1
                received = time.perf_counter()
                try:
                    engine, body, values, extras = self._chunk(raw)
                    place = engine.queue.try_reserve()
                    while place is None:  # the queue is full: this stream reads nothing until a place frees up
                        place = await engine.queue.reserve(None)
                        assert place is not None  # no patience limit: a place or nothing
                        try:  # the versions (or the model) may have changed meanwhile
                            routed = self._engine()
                        except Problem:
                            place.give_back()
                            raise
                        if routed is not engine:  # the place is in the queue the chunk no longer goes to
                            place.give_back()
                            engine, place = routed, routed.queue.try_reserve()
                    try:
                        item: asyncio.Future[bytes] | Problem = engine.enqueue(
                            self.key, values, body.offset, body.horizon, extras=extras, place=place)
                    finally:
                        place.give_back()  # unless the chunk took it
                except (Problem, Refusal) as refused:
                    item = as_problem(refused)
                self.pending.append((received, item))
                self.ready.set()
        except asyncio.CancelledError:
            pass
        finally:
            self.idle = False
            if self.draining and self.close_code is None:
                self.close_code = GOING_AWAY
            self.pending.append((0.0, None))  # the end
            self.ready.set()

    def _chunk(self, raw: bytes) -> tuple[Engine, ChunkRequest, np.ndarray, Extras]:
        """A frame's chunk, validated as the POST body is, and the engine it goes to; a Problem if refused."""
        body = parse(raw, ChunkRequest)
        engine = self._engine()
        values = chunk_array(body.values, body.horizon, engine.forecaster.num_features, self.settings, _LOCATION)
        return engine, body, values, requested(body.levels, body.scores, engine.forecaster, ["body"])

    def _engine(self) -> Engine:
        """The engine the chunk read now goes to. The model is looked up for each chunk, not kept from the
        upgrade: one unloaded through the repository API has stopped engines (every chunk would get a 503
        saying the service shuts down, even after the model is loaded again); a 404 problem when unloaded."""
        model = self.registry.model(self.model_name)  # one dict lookup a chunk: the hot path
        if model is None:
            model = served_model(self.ws)  # raises the HTTP route's 404 problem
        return model.engine_for(self.key)

    async def _answer(self) -> None:
        while True:
            while not self.pending:
                self.ready.clear()
                await self.ready.wait()
            received, item = self.pending[0]
            if item is None or self.gone:
                return
            status = 200
            try:
                if isinstance(item, Problem):
                    raise item
                answer = await item
            except (Problem, Refusal) as refused:
                problem = as_problem(refused)
                status = problem.status
                answer = orjson.dumps(problem.body(self.ws.scope))
            self.pending.popleft()
            try:
                await self.send({"type": "websocket.send", "text": answer.decode()})
            except _GONE:
                return
            self.room += 1
            self.freed.set()
            self.count.answered(status, time.perf_counter() - received)
            self.frames_out += 1

    def summary(self) -> dict[str, int | str | None]:
        """What the stream's access line adds: frames read and answered, and who closed it with what code
        (None: the connection was lost, or the stream ended by an error). The client's close is read from the
        scope, where the protocol put it: an answer's send may meet the closed connection before the reader,
        held back by a full window, reads the close's event. It wins over this side's code: the protocol
        puts it there only when it came before any close of ours, which a drain (1001) then never sent."""
        peer_code: int | None = self.ws.scope.get(PEER_CLOSED)
        code, closed_by = ((peer_code, "client") if peer_code is not None else
                           (self.close_code, "service") if self.close_code is not None else (None, None))
        return {"frames_in": self.frames_in, "frames_out": self.frames_out, "close_code": code,
                "closed_by": closed_by}


class Streams:
    """Every open stream of the app: opens them (the upgrade checked, the tenant fixed) and drains them."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings = settings
        self.metrics = metrics
        self.counts = {route.path: _Counts(metrics, route.path) for route in ROUTES}
        self.draining = False
        self._open: set[_Stream] = set()
        self._closed = asyncio.Event()

    async def serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer an upgrade to a stream route (``scope`` holds the route and its path parameters); an unknown
        model is refused with 404, as on HTTP."""
        websocket = WebSocket(scope, receive, send)
        try:
            if self.draining:
                raise Problem(503, "shutting-down", "the service is shutting down; reconnect to another replica",
                              headers={"Retry-After": "1"})
            served_model(websocket)  # a 404 for an unknown model, before the upgrade
            session_id = path_session_id(scope["path_params"]["session_id"])
        except Problem as refused:
            await send_problem(refused, scope, send)
            return
        # The window, for the client to keep no more chunks in flight: one that sends past it while it does not
        # read (a blocked send stops websockets' readers) waits for the service, which waits for it to read.
        await websocket.accept(headers=[(WINDOW_HEADER, str(self.settings.stream_window).encode())])
        key = session_key(tenant_of(websocket), session_id)
        stream = _Stream(websocket, key, self, self.counts[scope["route"].path], receive, send)
        self._open.add(stream)
        self.metrics.streams_open.inc()
        try:
            await stream.run()
        finally:
            scope[STREAM_SUMMARY] = stream.summary()
            self._open.discard(stream)
            self.metrics.streams_open.dec()
            if not self._open:
                self._closed.set()

    async def drain(self, timeout: float) -> None:
        """Stop reading every stream, answer what was read, close each with 1001; at most ``timeout`` s."""
        self.draining = True
        for stream in list(self._open):
            stream.drain()
        if self._open:
            self._closed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._closed.wait()
