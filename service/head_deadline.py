"""uvicorn's HTTP protocol with bounds on request heads: a deadline, and a size.

A connection whose request head has not arrived within GRU_REQUEST_TIMEOUT_SECONDS of its opening, or of the
first byte of a later request's head, is closed.

uvicorn closes an idle connection only after an answer (``timeout_keep_alive``), and stops that clock at the
first byte of the next request: a client that opens connections and sends nothing, or trickles a head a byte
at a time, held each connection and its file descriptor for ever. The body has its own deadline (the
``BodyLimit`` middleware's 408); this one covers what comes before any ASGI request exists, so the connection
is closed without an answer, as nginx does past ``client_header_timeout``. Between requests an idle connection
stays uvicorn's (closed 5 s after its last answer), so a short timeout never races a client reusing it.

A head (request line and header fields) over ``MAX_HEAD_BYTES`` is answered 431 problem+json and the
connection closed. httptools has no bound of its own (h11, uvicorn's other parser, stops at 16 KiB): it
buffered a 64 MB header whole before any middleware ran, so keyless clients could take the memory of the
process. A head still arriving is counted chunk by chunk (the chunk it began in uncounted, so at most one
read, 256 KiB, is held past the bound); a complete one is measured exactly. The 431 is counted and
access-logged as ``Observability`` does the app's answers, under route ``unmatched`` (no route is looked at),
its latency from the head's first byte. So is the 400 problem+json that replaces uvicorn's text/plain one for
a request httptools cannot parse. Either waits for the answers of requests pipelined before it on the
connection: answers go out in the order of their requests.

A request with an ``Upgrade`` other than websocket (``h2c``, say) cannot be framed: httptools skips its body,
taking what follows the head for another protocol, and uvicorn drops the rest of that read and parses later
reads as new requests, so a body sent after its head ran as requests the client never sent. Such a request
with a body is answered 400 below the app; one without is answered as plain HTTP/1.1 and the connection
closed after it, what followed it unread.

A request awaiting ``100 Continue`` answered before the app asks for its body closes its connection too
(``_close_unless_asked``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import unquote

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from service.http_fields import decimal_length
from service.metrics import Metrics
from service.middleware.observability import UNMATCHED, record, request_id_from
from service.problems import PROBLEM_JSON, Problem

log = logging.getLogger("service.head_deadline")

MAX_HEAD_BYTES = 64 * 1024  # nginx's default buffers take 32 KiB; keys, ids and entity tags are short
_TOO_LARGE = Problem(431, "header-too-large", f"the request line and headers take more than {MAX_HEAD_BYTES}"
                     " bytes; send only the headers this service reads (a key, ids and entity tags are short)")


_MALFORMED = Problem(400, "malformed-request", "the request is not valid HTTP/1.1: its request line, a header"
                     " or its chunked body could not be parsed")


_UNFRAMED = Problem(400, "malformed-request", "a request with an Upgrade other than websocket cannot have a"
                    " body: the upgrade is not taken, and its body could not be told from the next request")


class _HeadRefused(Exception):
    """Raised from the parser's callback to stop parsing a head answered below the app (431, or 400)."""


def _close_unless_asked(cycle: RequestResponseCycle) -> None:
    """A request awaiting ``100 Continue`` that is answered before the app asks for its body (a 401, a 429
    before the body is read) closes its connection: uvicorn kept it open, waiting for that body, and a client
    that sent its next request instead, as it may, had that request read as the body. RFC 9110 section
    10.1.1 asks the server to say whether it closes or reads on; a body asked for is read as before."""
    send = cycle.send

    async def send_closing(message: Any) -> None:  # an ASGI send event
        if message["type"] == "http.response.start" and cycle.waiting_for_100_continue:
            cycle.keep_alive = False  # the answer says "connection: close", and the connection closes after it
        await send(message)

    cycle.send = send_closing  # type: ignore[method-assign]  # run_asgi, not started yet, hands it to the app


class _HeadDeadlineProtocol(HttpToolsProtocol):
    head_timeout: float = 30.0
    metrics: Metrics  # the app's, where the answers written here are counted

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._awaiting_head = True  # no request in progress: the next bytes are a head
        self._heads = 0  # heads begun on this connection
        self._in_head = False  # a head begun and not yet complete
        self._head_bytes = 0  # of the head in progress, in the reads after the one it began in
        self._head_began = 0.0  # perf_counter() at the head's first byte
        self._refused = False
        self._held: bytes | None = None  # a refusal waiting for the answers of the requests before it

    def _arm(self) -> None:
        self._disarm()
        self._head_deadline = self.loop.call_later(self.head_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _too_slow(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a connection that sends nothing at all

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._awaiting_head and self._head_deadline is None:  # the first bytes of a later request's head
            self._arm()
        if self._refused:  # answered below the app, or unframed: the rest is dropped (see _answer_below_app)
            return
        in_head, heads = self._in_head, self._heads
        super().data_received(data)
        if in_head and self._in_head and heads == self._heads:  # the whole read was of one unfinished head
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES and not self._refused:
                self._refuse_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._heads += 1
        self._in_head = True
        self._head_bytes = 0
        self._head_began = time.perf_counter()

    def on_headers_complete(self) -> None:
        self._disarm()
        self._awaiting_head = False
        self._in_head = False
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)  # ": ", CRLF
        if size > MAX_HEAD_BYTES:
            self._refuse_head()
            raise _HeadRefused  # stops the parser; uvicorn takes it for a malformed request (see below)
        unframed = self.parser.should_upgrade() and not self._should_upgrade()  # see the module's docstring
        if unframed and any(name == b"transfer-encoding" or (name == b"content-length" and decimal_length(value) != 0)
                            for name, value in self.headers):
            self._answer_below_app(_UNFRAMED, b"400 Bad Request")
            raise _HeadRefused
        super().on_headers_complete()
        if unframed:
            self.cycle.keep_alive = False  # answered with "connection: close"
            self._refused = True  # what follows is dropped unread (see data_received)
        elif self.expect_100_continue and not self.parser.should_upgrade():
            _close_unless_asked(self.cycle)

    def send_400_response(self, msg: str) -> None:
        """httptools could not parse the request; uvicorn's own answer is a text/plain 400 with no request
        id, neither logged nor counted. A head is answered 400 problem+json instead, counted and logged as a
        431 is. A chunked body that breaks off mid-way gets the same answer unless the app has begun its
        own, and the connection is closed: the app, which has the request, hears a disconnect and logs it."""
        if self._refused:  # the parser stopped at _HeadRefused, already answered
            return
        if self._in_head:
            self._answer_below_app(_MALFORMED, b"400 Bad Request")
            return
        answer, request_id = self._problem_answer(_MALFORMED, b"400 Bad Request")
        if not (self.cycle is not None and self.cycle.response_started):
            self.transport.write(answer)
        # the app's access line says only that the client went (499), and uvicorn's warning is dropped
        # (service.logs): this line says why
        log.warning("a chunked body could not be parsed: answered 400 and closed",
                    extra={"fields": {"request_id": request_id.decode("ascii")}})
        self.transport.close()

    def _refuse_head(self) -> None:
        self._answer_below_app(_TOO_LARGE, b"431 Request Header Fields Too Large")

    def _answer_below_app(self, problem: Problem, status_line: bytes) -> None:
        """Answer a head with ``problem``, count and access-log it (route ``unmatched``: no route is looked
        at), and end our side. What the client still sends is read and dropped until it closes or the head
        deadline does: closing at once would leave its bytes unread, and the kernel answers those with a
        reset, which can destroy the answer before the client reads it."""
        self._refused = True
        answer, request_id = self._problem_answer(problem, status_line)
        if self._answering():
            self._held = answer  # written by on_response_complete, after the answers it follows
        else:
            self._end_with(answer)
        record(self.metrics, request_id, self._method(), UNMATCHED, {}, problem.status,
               time.perf_counter() - self._head_began)

    def _answering(self) -> bool:
        """Whether requests pipelined before this head are still being answered: answers go out in the
        order of their requests (RFC 9112 section 9.3.2), and one written after ours would follow its end."""
        return bool(self.pipeline) or (self.cycle is not None and not self.cycle.response_complete)

    def _end_with(self, answer: bytes) -> None:
        """Write the refusal, end our side, and give the client until the head deadline to close."""
        self.transport.write(answer)
        self.transport.write_eof()
        self._arm()

    def _method(self) -> str:
        """The refused head's method; "" when its request line broke off before a whole method. httptools
        then reports DELETE (its method 0) or a valid prefix ("POST" of "POSTX"); a method is whole once
        the request target has begun."""
        if not getattr(self, "url", b""):
            return ""
        return self.parser.get_method().decode("ascii", "replace")

    def _problem_answer(self, problem: Problem, status_line: bytes) -> tuple[bytes, bytes]:
        """The problem+json answer that closes the connection, with the request id of the head read so far
        (or a new one); and that id."""
        body = orjson.dumps(problem.body(self._target()))
        head = [b"HTTP/1.1 " + status_line + b"\r\n"]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        request_id = request_id_from(self.headers)
        head.append(b"x-request-id: " + request_id + b"\r\n")
        head += [b"content-type: " + PROBLEM_JSON.encode() + b"\r\n",
                 b"content-length: " + str(len(body)).encode() + b"\r\n", b"connection: close\r\n\r\n"]
        return b"".join(head) + body, request_id

    def _target(self) -> dict[str, str]:
        """As much of a scope as ``Problem.body`` reads: the path of the request line read so far (empty when
        none is), so that a problem under /v2 carries the protocol's ``error`` as the app's do."""
        url: bytes = getattr(self, "url", b"")  # set once a request line begins
        target = url.partition(b"?")[0].partition(b"#")[0]  # by hand: parse_url refuses URLs over 64 KiB
        if not target.startswith(b"/"):  # the absolute form (http://host/path), or no request line
            try:
                target = httptools.parse_url(url).path or b""
            except httptools.HttpParserInvalidURLError:
                target = b""
        path = unquote(target.decode("ascii", "replace"))  # as uvicorn decodes the scope's path
        return {"path": self.root_path + path, "root_path": self.root_path}

    def on_response_complete(self) -> None:
        super().on_response_complete()  # an idle connection is uvicorn's: closed after timeout_keep_alive
        if not self.pipeline:
            self._awaiting_head = True
        if self._held is not None and not self._answering() and not self.transport.is_closing():
            answer, self._held = self._held, None
            self._end_with(answer)


def head_deadline_protocol(timeout: float, metrics: Metrics) -> type[HttpToolsProtocol]:
    """The protocol class to give ``uvicorn.run(http=...)``: heads must arrive within ``timeout`` seconds; the
    431s and 400s it answers itself are counted in ``metrics`` (the app's)."""
    return type("HeadDeadlineProtocol", (_HeadDeadlineProtocol,), {"head_timeout": timeout, "metrics": metrics})
