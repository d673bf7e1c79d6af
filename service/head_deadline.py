"""uvicorn's HTTP protocol with a deadline for request heads: a connection whose request head has not arrived
within GRU_REQUEST_TIMEOUT_SECONDS of its opening, or of the first byte of a later request's head, is closed.

uvicorn closes an idle connection only after an answer (``timeout_keep_alive``), and stops that clock at the
first byte of the next request: a client that opens connections and sends nothing, or trickles a head a byte
at a time, held each connection and its file descriptor for ever. The body has its own deadline (the
``BodyLimit`` middleware's 408); this one covers what comes before any ASGI request exists, so the connection
is closed without an answer, as nginx does past ``client_header_timeout``. Between requests an idle connection
stays uvicorn's (closed 5 s after its last answer), so a short timeout never races a client reusing it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class _HeadDeadlineProtocol(HttpToolsProtocol):
    head_timeout: float = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._awaiting_head = True  # no request in progress: the next bytes are a head

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
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._disarm()
        self._awaiting_head = False
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # an idle connection is uvicorn's: closed after timeout_keep_alive
        if not self.pipeline:
            self._awaiting_head = True


def head_deadline_protocol(timeout: float) -> type[HttpToolsProtocol]:
    """The protocol class to give ``uvicorn.run(http=...)``: heads must arrive within ``timeout`` seconds."""
    return type("HeadDeadlineProtocol", (_HeadDeadlineProtocol,), {"head_timeout": timeout})
