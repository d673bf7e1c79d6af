"""Shutdown and restart against a real server process: what an operator relies on when SIGTERM, SIGINT or
SIGKILL comes while work is in flight (docs/durability.md, "Snapshots of the memory store")."""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from harness.processes import RedisServer
from tests.conftest import ServerFactory
from tests.service.helpers import new_id, send, series
from tests.service.proxy import LoopbackProxy
from tests.service.test_lost_commit_reply import COMMIT_SHA
from tests.service.test_stream import _long_frame, _raw_stream, _send_until_stalled


def test_sigint_during_a_stream_drain_exits_at_once(server_factory: ServerFactory, wide_model: Path) -> None:
    """Ctrl-C twice: the second makes the service exit at once, without the drain (docs/durability.md). A
    stream whose client reads nothing holds the drain to its bound; SIGINT then must not wait it out."""
    bound = 20.0
    server = server_factory(wide_model, GRU_REQUEST_TIMEOUT_SECONDS=str(bound))
    with _raw_stream(server, new_id("deaf-int")) as sock:
        assert _send_until_stalled(sock, _long_frame(3), 100_000) < 100_000  # its answers fill every buffer
        server.process.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert server.process.poll() is None  # the deaf stream holds the drain
        server.process.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        server.process.wait(bound + 15)
        took = time.monotonic() - interrupted
    assert took < 3, f"{took:.1f} s after SIGINT: the drain ({bound:g} s) was waited out"


class CommitDelayingProxy(LoopbackProxy):
    """Relays Redis traffic; while ``delaying`` is set, the reply to a commit script comes ``delay`` s late:
    Redis has applied the write, the service hears so only then (a slow network, a busy Redis)."""

    def __init__(self, target: str, delay: float):
        super().__init__(target)
        self.delay = delay
        self.delaying = threading.Event()
        self.delayed = 0  # replies held back

    def _relay(self, downstream: socket.socket, upstream: socket.socket) -> None:
        committing = threading.Event()
        threading.Thread(target=self._up, args=(downstream, upstream, committing), daemon=True).start()
        threading.Thread(target=self._down, args=(upstream, downstream, committing), daemon=True).start()

    def _up(self, client: socket.socket, redis: socket.socket, committing: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if self.delaying.is_set() and COMMIT_SHA in data:
                    committing.set()
                redis.sendall(data)
        with contextlib.suppress(OSError):
            redis.close()

    def _down(self, redis: socket.socket, client: socket.socket, committing: threading.Event) -> None:
        with contextlib.suppress(OSError):
            while data := redis.recv(65536):
                if committing.is_set():
                    committing.clear()
                    self.delayed += 1
                    time.sleep(self.delay)
                client.sendall(data)
        with contextlib.suppress(OSError):
            client.close()


def test_a_chunk_of_a_run_being_written_when_the_drain_runs_out_is_not_told_503(
    server_factory: ServerFactory, redis_server: RedisServer,
) -> None:
    """Two chunks of a session run as one; their write to Redis is slow and still under way when SIGTERM's
    drain (GRU_REQUEST_TIMEOUT_SECONDS) runs out. The queue's own timeout waits for such a write (a run keeps
    only its last chunk's answer, so a 503 for an earlier chunk that was written could not be retried for its
    answer), but uvicorn cancelled the requests at the end of the drain: each was told 503 "retry with the
    same offset", the write landed all the same, and the retry of the first chunk was a 409 past it."""
    proxy = CommitDelayingProxy(f"http://127.0.0.1:{redis_server.port}", delay=3.0)
    proxy.start()
    url = f"redis://{proxy.url.removeprefix('http://')}/0?socket_timeout=10"
    server = server_factory(GRU_STORE="redis", GRU_REDIS_URL=url, GRU_MAX_BATCH_DELAY_MS="300",
                            GRU_REQUEST_TIMEOUT_SECONDS="1.5")
    session, values = new_id("slow-commit"), series(12, seed=5)
    chunks = [(values[4:8], 4), (values[8:], 8)]
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            assert send(http, session, values[:4], offset=0).status_code == 200  # the scripts are loaded
        proxy.delaying.set()

        def post(chunk: tuple[object, int]) -> httpx.Response:
            with httpx.Client(base_url=server.url, timeout=30) as own:
                return send(own, session, chunk[0], offset=chunk[1])

        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, chunks[0])
            time.sleep(0.05)  # queued in order, within one batch delay: one run
            second = pool.submit(post, chunks[1])
            time.sleep(0.6)  # the run's write is under way
            server.process.send_signal(signal.SIGTERM)
            answers = [first.result(), second.result()]
        server.process.wait(30)
        assert proxy.delayed >= 1, "no commit reply was delayed"
        proxy.delaying.clear()
        again = server_factory(GRU_STORE="redis", GRU_REDIS_URL=url)
        with httpx.Client(base_url=again.url, timeout=30) as http:
            got = []
            for answer, (chunk, offset) in zip(answers, chunks, strict=True):
                if answer.status_code == 503:  # retried with its offset, as the problem says
                    answer = send(http, session, chunk, offset=offset)
                got.append((answer.status_code, answer.json().get("position")))
    finally:
        proxy.close()
    assert got == [(200, 8), (200, 12)], got  # got: [(409, 12), (200, 12)]
