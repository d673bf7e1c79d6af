"""A loopback TCP proxy in front of a real server, for tests that lose or cut what travels between them."""

from __future__ import annotations

import socket
import threading


class LoopbackProxy:
    """A TCP proxy on a free loopback port (``url``) in front of ``target`` (``http://host:port``): each
    connection it accepts goes, with a new connection to the target, to ``_relay``, which subclasses write."""

    def __init__(self, target: str):
        host, port = target.removeprefix("http://").rsplit(":", 1)
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def start(self) -> None:
        """Accept connections on a daemon thread until ``close``."""
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            self._relay(downstream, socket.create_connection(self._target))

    def _relay(self, downstream: socket.socket, upstream: socket.socket) -> None:
        raise NotImplementedError
