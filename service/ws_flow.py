"""uvicorn's WebSocket protocol, for peers that do not read what the service writes them, and for a close
that must not reset the connection under the answers before it.

- Pings: uvicorn writes the pong for each ping at once, whatever its write buffer holds, so a peer that sent
  pings and never read grew the server by as much as it sent (190 MB in 10 s on loopback), without limit.
  Here a ping that finds the buffer over its high-water mark stops reading the socket until the buffer
  drains: such a peer's sends stall, as those of one that never reads its answers already do.
- Shutdown: uvicorn closes each connection once ``service.api.stream``'s drain is over, and waits for it to
  go; a close waits for the write buffer to drain, which for such a peer is never, so a SIGTERM took another
  30 s (61 s in all, past the grace periods of docker-compose.yml and deploy/k8s: the SIGKILL came before
  the snapshot). Here a connection whose buffer is still full then is cut at once.
- The drain's close: a drained stream has sent its last answers and its 1001 close frame, and uvicorn waits
  for the peer's close reply (reading and dropping the chunks the peer sent meanwhile). uvicorn's shutdown
  then closed the socket at once, with those chunks still unread in it: the kernel answers that with a reset,
  and a client whose reply to the close then failed lost the answers it had not yet handed to its
  application (the websockets library drops the events of a read whose reply cannot be sent). Here a
  connection awaiting that reply is left to it, or to uvicorn's close timeout (10 s).
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
        if self.close_sent and self.close_timer is not None and self.writable.is_set():
            self.stop_keepalive()  # our close is out, the peer's reply (or the close timeout) ends the connection
            return
        super().shutdown()
        if not self.writable.is_set():  # the peer reads nothing: its close would wait for ever
            self.transport.abort()
