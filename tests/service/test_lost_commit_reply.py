"""A run's commit that Redis applied but whose reply was lost: each chunk of the run still gets its answer.

A run keeps only its last chunk's answer in the session, so a 503 for an earlier chunk of a run that was in
fact written could not be retried for its answer (a 409 past it): the engine reads the session back after a
failed commit and answers the chunks of every run whose write it finds there.
"""

from __future__ import annotations

import contextlib
import hashlib
import socket
import threading
import time

import httpx
import orjson
from websockets.sync.client import connect

from harness.processes import RedisServer
from service.sessions.redis import _COMMIT
from tests.conftest import ServerFactory
from tests.service.helpers import new_id, send, series
from tests.service.proxy import LoopbackProxy

COMMIT_SHA = hashlib.sha1(_COMMIT.encode()).hexdigest().encode()


class ReplyCuttingProxy(LoopbackProxy):
    """Relays Redis traffic; while ``cutting`` is set, a connection that sends the commit script is closed
    when Redis replies, the reply dropped: Redis ran the write and the service never hears so. The client's
    own retry after the lost reply is cut the same way."""

    def __init__(self, target: str):
        super().__init__(target)
        self.cutting = threading.Event()
        self.cut = 0  # replies dropped

    def _relay(self, downstream: socket.socket, upstream: socket.socket) -> None:
        committing = threading.Event()
        threading.Thread(target=self._up, args=(downstream, upstream, committing), daemon=True).start()
        threading.Thread(target=self._down, args=(upstream, downstream, committing), daemon=True).start()

    def _up(self, client: socket.socket, redis: socket.socket, committing: threading.Event) -> None:
        try:
            while data := client.recv(65536):
                if self.cutting.is_set() and COMMIT_SHA in data:
                    committing.set()
                redis.sendall(data)
        except OSError:
            pass
        finally:
            _close(redis)

    def _down(self, redis: socket.socket, client: socket.socket, committing: threading.Event) -> None:
        try:
            while data := redis.recv(65536):
                if committing.is_set():
                    self.cut += 1
                    break
                client.sendall(data)
        except OSError:
            pass
        finally:
            _close(client)
            _close(redis)


def _close(sock: socket.socket) -> None:
    """Close ``sock`` so that a thread blocked reading it wakes up."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def _batches(client: httpx.Client) -> tuple[float, float]:
    """``gru_batch_size``'s count and sum: batches taken, and the chunks they held (their runs' too)."""
    samples = dict(line.rsplit(" ", 1) for line in client.get("/metrics").text.splitlines()
                   if line.startswith("gru_batch_size_"))
    return float(samples["gru_batch_size_count"]), float(samples["gru_batch_size_sum"])


def _answered(client: httpx.Client, session: str, values: list[float], offset: int) -> httpx.Response:
    """The chunk resent with its offset until it is not a 503 (the store's outage ends at a ping)."""
    deadline = time.monotonic() + 10
    while (response := client.post(f"/v1/sessions/{session}/predict",
                                   json={"values": values, "offset": offset})).status_code == 503:
        assert time.monotonic() < deadline, response.text
        time.sleep(0.1)
    return response


def test_each_chunk_of_a_run_whose_commit_reply_was_lost_gets_its_answer(
    server_factory: ServerFactory, redis_server: RedisServer
) -> None:
    """Two chunks run as one; Redis applies their write and the reply is lost, twice (the client retries
    once). Each was answered 503 (retry with the same offset), but the retry of the first was a 409: the
    session was past it, and only the last chunk's answer is kept. Now each gets its answer, at once or on
    its retry."""
    proxy = ReplyCuttingProxy(f"http://127.0.0.1:{redis_server.port}")
    proxy.start()
    server = server_factory(GRU_STORE="redis", GRU_REDIS_URL=f"redis://{proxy.url.removeprefix('http://')}/0",
                            GRU_MAX_BATCH_DELAY_MS="200")
    session, values = new_id("lost-reply"), series(12, seed=4)
    chunks = [(values[4:8].ravel().tolist(), 4), (values[8:].ravel().tolist(), 8)]
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert send(http, session, values[:4], offset=0).status_code == 200  # the scripts are loaded
            before = _batches(http)
            proxy.cutting.set()
            with connect(server.url.replace("http://", "ws://") + f"/v1/sessions/{session}/stream",
                         open_timeout=30) as ws:
                for chunk, offset in chunks:
                    ws.send(orjson.dumps({"values": chunk, "offset": offset}).decode())
                first = [orjson.loads(ws.recv(timeout=30)) for _ in chunks]
            proxy.cutting.clear()
            assert proxy.cut >= 1, "no commit reply was cut"
            after = _batches(http)
            assert (after[0] - before[0], after[1] - before[1]) == (1, 2), "the two chunks did not run as one"
            answers = [answer if answer.get("status") != 503 else _answered(http, session, *chunk).json()
                       for answer, chunk in zip(first, chunks, strict=True)]  # a 503 is retried with its offset
            got = [(a.get("status", 200), a["position"]) for a in answers]
            assert got == [(200, 8), (200, 12)], answers  # got: [(409, 12), (200, 12)], the first 503 untrue
    finally:
        proxy.close()
