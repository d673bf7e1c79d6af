"""Redis failing over behind one address (a DNS name or a proxy that moves to the new primary, as managed
Redis services do): the connections the service holds still lead to the old primary, now a read-only replica."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from harness.processes import RedisServer
from tests.conftest import ServerFactory
from tests.service.conftest import start_redis
from tests.service.helpers import new_id, send, series
from tests.service.proxy import LoopbackProxy

pytest.importorskip("redis")


class MovableProxy(LoopbackProxy):
    """Relays each connection to the target it had when accepted; ``move`` sends new connections elsewhere
    and leaves the open ones where they are."""

    def move(self, target: RedisServer) -> None:
        self._target = ("127.0.0.1", target.port)

    def _relay(self, downstream: socket.socket, upstream: socket.socket) -> None:
        for source, sink in ((downstream, upstream), (upstream, downstream)):
            threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def test_a_failover_behind_the_same_address_is_503_then_recovers(
    server_factory: ServerFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    """The primary becomes a replica of the new one (READONLY to writes) and the address moves to the new
    one. Each chunk meanwhile is a 503 that changed nothing; then the service must reach the new primary.
    Before, the pool kept its connections to the old primary (pings answer there), so every write got
    READONLY and a 503 for as long as those connections lived: the service never recovered by itself."""
    (tmp_path / "new").mkdir()
    new_primary = start_redis(tmp_path / "new")
    proxy = MovableProxy(f"http://127.0.0.1:{redis_server.port}")
    proxy.start()
    try:
        server = server_factory(GRU_STORE="redis", GRU_REDIS_URL=f"redis://{proxy.url.removeprefix('http://')}/0")
        values, session = series(10, seed=51), new_id("failover")
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert send(http, session, values[:5], offset=0).status_code == 200
            new_primary.client().replicaof("127.0.0.1", redis_server.port)
            deadline = time.monotonic() + 10
            while new_primary.client().info("replication")["master_link_status"] != "up":
                assert time.monotonic() < deadline, "the replica did not sync"
                time.sleep(0.05)
            # The failover: the new primary is promoted, the old one follows it, the address moves.
            new_primary.client().replicaof("no", "one")
            redis_server.client().replicaof("127.0.0.1", new_primary.port)
            proxy.move(new_primary)
            deadline, statuses = time.monotonic() + 10, []
            while (response := send(http, session, values[5:], offset=5)).status_code == 503:
                statuses.append(503)
                assert time.monotonic() < deadline, f"still 503 after {len(statuses)} tries: {response.text}"
                time.sleep(0.1)
            assert response.status_code == 200 and response.json()["position"] == 10, response.text
            keys = [k for k in new_primary.client().keys("gru:s:*") if k.endswith(session.encode())]
            assert len(keys) == 1 and new_primary.client().hget(keys[0], "pos") == b"10"
        assert "Traceback" not in server.log()
    finally:
        proxy.close()
        new_primary.kill()
