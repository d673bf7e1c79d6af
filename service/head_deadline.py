"""uvicorn's HTTP protocol with a deadline for request heads: a connection whose next request head has not
arrived within GRU_REQUEST_TIMEOUT_SECONDS of its opening (or of the last answer) is closed.

uvicorn closes an idle connection only after an answer (``timeout_keep_alive``), and stops that clock at the
first byte of the next request: a client that opens connections and sends nothing, or trickles a head a byte
at a time, held each connection and its file descriptor for ever. The body has its own deadline (the
``BodyLimit`` middleware's 408); this one covers what comes before any ASGI request exists, so the connection
is closed without an answer, as nginx does past ``client_header_timeout``.
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
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.pipeline and not self.transport.is_closing():  # idle now: the next head has its deadline
            self._arm()


def head_deadline_protocol(timeout: float) -> type[HttpToolsProtocol]:
    """The protocol class to give ``uvicorn.run(http=...)``: heads must arrive within ``timeout`` seconds."""
    return type("HeadDeadlineProtocol", (_HeadDeadlineProtocol,), {"head_timeout": timeout})
