"""uvicorn's WebSocket protocol, reading a peer's pings only while the peer reads the pongs they get.

uvicorn writes the pong for each ping at once, whatever its write buffer holds: a peer that sent pings and
never read grew the server's buffer by as much as it sent (190 MB in 10 s on loopback), without limit. Here
a ping that finds the buffer over its high-water mark stops reading the socket until the buffer drains, so
such a peer's sends stall and it costs at most that buffer and one read, as one that never reads its
answers already does (the app's sends wait for the buffer; service.api.stream's window bounds the rest).
"""

from __future__ import annotations

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


class FlowControlledWebSockets(WebSocketsSansIOProtocol):
    """The protocol class to give ``uvicorn.Config(ws=...)``."""

    def handle_ping(self) -> None:
        super().handle_ping()
        if not self.writable.is_set():  # the pong joined an undrained buffer: read no more pings for now
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if not self.read_paused:  # uvicorn's own pause (a message waits for the app) stays until taken
            self.transport.resume_reading()
