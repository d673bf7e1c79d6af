"""uvicorn's WebSocket protocol, for peers that do not read what the service writes them.

- Pings: uvicorn writes the pong for each ping at once, whatever its write buffer holds, so a peer that sent
  pings and never read grew the server by as much as it sent (190 MB in 10 s on loopback), without limit.
  Here a ping that finds the buffer over its high-water mark stops reading the socket until the buffer
  drains: such a peer's sends stall, as those of one that never reads its answers already do.
- Shutdown: uvicorn closes each connection once ``service.api.stream``'s drain is over, and waits for it to
  go; a close waits for the write buffer to drain, which for such a peer is never, so a SIGTERM took another
  30 s (61 s in all, past the grace periods of docker-compose.yml and deploy/k8s: the SIGKILL came before
  the snapshot). Here a connection whose buffer is still full then is cut at once.
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

    def shutdown(self) -> None:
        super().shutdown()
        if not self.writable.is_set():  # the peer reads nothing: its close would wait for ever
            self.transport.abort()
