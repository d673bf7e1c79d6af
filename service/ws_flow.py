"""uvicorn's WebSocket protocol with three changes for peers that do not read, one for peers the service holds
back, one for a clean close, one for a handshake it refuses, one for fragmented messages, and a mark for who
closed.

- Pings: uvicorn writes a pong for every ping whatever its write buffer holds, so a peer that pings and never
  reads grew the server without limit. A ping that finds the buffer full stops reading the socket until it
  drains, as an unread answer already does.
- Shutdown, a peer that reads nothing: a close waits for the write buffer to drain, which then is never, and
  a SIGTERM waited a second 30 s (past the grace periods of docker-compose.yml and deploy/k8s). Such a
  connection is cut at once.
- A dead peer (no pong in time) with answers still buffered for it: the same close waited for ever, and the
  connection, its stream and ``gru_streams_open`` stayed. It is cut at once too.
- A live peer held back (a frame waits for the app: the stream's window is full), nothing buffered for it:
  its pong waits unread behind that frame, and the pong deadline dropped it with 1011. The deadline is
  moved on while the service is the one not reading; once it reads again a peer that sent no pong is dropped.
- Shutdown, a drained stream awaiting the peer's reply to its 1001 close: closing the socket then, with the
  chunks the peer kept sending unread in it, makes the kernel reset the connection under the last answers.
  It is left to the reply, or to uvicorn's close timeout (docs/durability.md).
- A handshake websockets cannot take (no Sec-WebSocket-Key, another version, a key that is no base64) is
  refused before the app sees the request: that answer was a text/plain 400 without X-Request-ID. It is a
  problem+json (``invalid-upgrade``, websockets' reason as the detail) with the request's id, as every error.
  So is a head past websockets' own bounds, which httptools' 64 KiB lets through (a request line or a field
  over 8 KiB: 414, 431; over 128 fields: 431; one it cannot parse: 400). Each such refusal is access-logged
  and counted as ``service.head_deadline``'s are, under route ``unmatched`` (no route was looked at), with
  method ``WS``: none was, and a client could send any number unseen.
- Fragments: uvicorn kept a list entry for each fragment of a message, and websockets bounds a message's
  bytes, not its fragments: a peer sending empty continuation frames grew the server without limit. The
  fragments are gathered in one buffer, which holds no more than the message's bytes.
- Who closed: uvicorn's disconnect event gives a code alone, the same whether the peer's close frame sent it
  or uvicorn failed the connection with it (a client may close with 1009 too), and 1005 for a connection lost
  without a close frame. The peer's own close frame puts its code in the scope (``PEER_CLOSED``) for the
  stream's log, which a stream whose send met the closed connection first never reads as an event.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import unquote

import orjson
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.datastructures import Headers
from websockets.exceptions import HeaderLineTooLong, RequestLineTooLong, TooManyHeaders
from websockets.frames import Frame
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from service.metrics import STREAM_METHOD, Metrics
from service.middleware.observability import UNMATCHED, record, request_id_from
from service.problems import PROBLEM_JSON, Problem

PEER_CLOSED = "gru.peer_closed"  # in a stream's scope once the peer's own close frame came: its code


class _Handshake(ServerProtocol):
    """websockets' side of a connection, whose refusals of a handshake are problems."""

    def accept(self, request: Request) -> Response:
        response = super().accept(request)
        return response if response.status_code == 101 else _as_problem(response, request)


def _as_problem(refusal: Response, request: Request) -> Response:
    """websockets' text/plain refusal of ``request`` as a problem+json, its reason the detail and its headers
    kept (a 426's ``Upgrade``), with the request's X-Request-ID (or a new one)."""
    detail = (refusal.body or b"").decode(errors="replace").strip()
    raw = ((name.encode("latin-1"), value.encode("latin-1")) for name, value in request.headers.raw_items())
    return _problem(refusal.status_code, detail, request.path, raw, refusal.headers)


def _problem(status: int, detail: str, target: str, fields: Iterable[tuple[bytes, bytes]],
             headers: Headers | None = None) -> Response:
    """The ``invalid-upgrade`` problem+json answer to a request for ``target`` with these header ``fields``:
    ``headers`` kept but for the body's, its X-Request-ID the request's (or a new one)."""
    body = orjson.dumps(Problem(status, "invalid-upgrade", detail).body(
        {"path": unquote(target.partition("?")[0]), "root_path": ""}))
    headers = Headers(headers or {})
    for name in ("Content-Type", "Content-Length"):
        if name in headers:
            del headers[name]
    headers.update({"Content-Type": PROBLEM_JSON, "Content-Length": str(len(body)),
                    "X-Request-ID": request_id_from(fields).decode()})
    return Response(status, HTTPStatus(status).phrase, headers, body)


def _unparsed(head: bytes) -> tuple[str, list[tuple[bytes, bytes]]]:
    """The target and the header fields of a head websockets could not parse, read leniently: the request
    line and fields uvicorn rebuilt from what httptools parsed, one per CRLF-ended line."""
    line, *lines = head.split(b"\r\n")
    target = line.split(b" ")[1] if line.count(b" ") >= 2 else b""
    fields = [(name.strip(), value.strip()) for name, _, value in (field.partition(b":") for field in lines)]
    return target.decode("latin-1"), fields


class FlowControlledWebSockets(WebSocketsSansIOProtocol):
    """The protocol class to give ``uvicorn.Config(ws=...)``: ``flow_controlled_websockets``'s, which counts."""

    metrics: Metrics | None = None  # the app's, where the handshakes refused here are counted

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.conn = _Handshake(extensions=self.conn.available_extensions, max_size=self.config.ws_max_size,
                               logger=self.conn.logger)
        self.fragments = bytearray()  # a fragmented message's bytes so far, once a continuation came
        self._began = time.perf_counter()
        self._head = b""  # the head uvicorn hands over in one piece: what a refusal of it answers

    def data_received(self, data: bytes) -> None:
        if not self.handshake_initiated and not self._head:
            self._head = data
        super().data_received(data)

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        if self.response.status_code != 101:  # _Handshake's problem, with the request id
            self._record(self.response)

    def handle_handshake_exception(self) -> None:
        """websockets could not parse the head (past its 8 KiB lines or 128 fields, or a line it refuses):
        its answer, text/plain or none, is replaced by the problem, logged and counted."""
        self.conn.data_to_send()  # websockets' own refusal, dropped
        exc = self.conn.handshake_exc
        status = (414 if isinstance(exc, RequestLineTooLong) else
                  431 if isinstance(exc, HeaderLineTooLong | TooManyHeaders) else 400)
        refusal = _problem(status, f"Failed to open a WebSocket connection: {exc}.", *_unparsed(self._head),
                           Headers({"Connection": "close"}))
        self.handshake_complete = True
        self.close_sent = True
        self.transport.write(refusal.serialize())
        self.transport.close()
        self._record(refusal)

    def _record(self, refusal: Response) -> None:
        if self.metrics is not None:
            record(self.metrics, refusal.headers["X-Request-ID"].encode(), STREAM_METHOD, UNMATCHED, {},
                   refusal.status_code, time.perf_counter() - self._began)

    def handle_ping(self) -> None:
        super().handle_ping()
        if not self.writable.is_set():  # the pong joined an undrained buffer: read no more pings for now
            self.transport.pause_reading()

    def handle_cont(self, event: Frame) -> None:
        # The message's fragments so far in one buffer, not a list entry each: websockets bounds a message's
        # bytes (ws_max_size), not its fragments, so empty continuation frames grew that list without end.
        if self.frames:  # the first fragment, as handle_text or handle_bytes keeps it
            self.fragments = bytearray(self.frames.pop())
        self.fragments += event.data
        if event.fin:
            self.frames, self.fragments = [bytes(self.fragments)], bytearray()
            self.send_receive_event_to_app()

    def handle_close(self, event: Frame) -> None:
        if not self.close_sent and self.conn.close_rcvd is not None:  # the peer's own close, not its reply to ours
            # the app's scope: any key, as ASGI allows; its code, for a stream that ends before reading it
            cast(dict[str, Any], self.scope)[PEER_CLOSED] = self.conn.close_rcvd.code
        super().handle_close(event)

    def resume_writing(self) -> None:
        super().resume_writing()
        if not self.read_paused:  # uvicorn's own pause (a message waits for the app) stays until taken
            self.transport.resume_reading()

    def keepalive_timeout(self) -> None:
        if self.read_paused and not self.transport.get_write_buffer_size():  # we hold the pong unread, not the peer
            assert self.ping_timeout is not None  # this timer runs only with one
            self.pong_timer = self.loop.call_later(self.ping_timeout, self.keepalive_timeout)
            return
        super().keepalive_timeout()
        if self.transport.get_write_buffer_size():  # a dead peer reads nothing: its close would wait for ever
            self.transport.abort()

    def shutdown(self) -> None:
        if self.close_sent and self.close_timer is not None and self.writable.is_set():
            self.stop_keepalive()  # our close is out, the peer's reply (or the close timeout) ends the connection
            return
        super().shutdown()
        if not self.writable.is_set():  # the peer reads nothing: its close would wait for ever
            self.transport.abort()


def flow_controlled_websockets(metrics: Metrics) -> type[FlowControlledWebSockets]:
    """The protocol class to give ``uvicorn.Config(ws=...)``: the handshakes it refuses are counted in
    ``metrics`` (the app's)."""
    return type("FlowControlledWebSockets", (FlowControlledWebSockets,), {"metrics": metrics})
