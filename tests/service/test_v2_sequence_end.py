"""A v2 ``sequence_end`` deletes the sequence its chunk ended, and nothing written to that id after the chunk;
an exact retry of that final chunk is answered again, as v1 answers a retry of a session's last chunk.

The delete runs after the chunk's commit, so another writer (an import, another client) can reach the session
in between; a Redis proxy holds the service's first store command after the final chunk's commit so that the
test writes exactly there.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest

from harness.processes import RedisServer
from service.sessions.redis import _COMMIT
from tests.conftest import ServerFactory
from tests.service.helpers import new_id, position, send, series, stateless
from tests.service.proxy import LoopbackProxy

COMMIT_SHA = hashlib.sha1(_COMMIT.encode()).hexdigest().encode()


class HoldingProxy(LoopbackProxy):
    """Relays Redis traffic; once armed, holds the first command sent after the next commit script call until
    ``release`` is set (``holding`` says it is held)."""

    def __init__(self, target: str):
        super().__init__(target)
        self.holding = threading.Event()
        self.release = threading.Event()
        self._lock = threading.Lock()
        self._armed = False
        self._after_commit = False

    def arm(self) -> None:
        with self._lock:
            self._armed = True

    def _relay(self, downstream: socket.socket, upstream: socket.socket) -> None:
        threading.Thread(target=self._pipe, args=(downstream, upstream, True), daemon=True).start()
        threading.Thread(target=self._pipe, args=(upstream, downstream, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, to_redis: bool) -> None:
        try:
            while data := source.recv(65536):
                if to_redis and self._hold(data):
                    self.holding.set()
                    self.release.wait(30)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            sink.close()

    def _hold(self, data: bytes) -> bool:
        """Whether ``data`` is the first command after the armed commit."""
        with self._lock:
            if self._armed and COMMIT_SHA in data:
                self._armed, self._after_commit = False, True
                return False
            held, self._after_commit = self._after_commit, False
            return held


def test_a_sequence_end_leaves_a_session_imported_after_its_chunk(
    server_factory: ServerFactory, redis_server: RedisServer
) -> None:
    """The final chunk commits; an import then replaces the session (200); the sequence's end must not
    delete the imported session, which is no longer the sequence the chunk ended."""
    proxy = HoldingProxy(f"http://127.0.0.1:{redis_server.port}")
    proxy.start()
    server = server_factory(GRU_STORE="redis", GRU_REDIS_URL=f"redis://{proxy.url.removeprefix('http://')}/0")
    sequence, donor = new_id("ending"), new_id("donor")
    tensor = {"name": "values", "shape": [3, 1], "datatype": "FP32", "data": series(3).ravel().tolist()}
    try:
        with httpx.Client(base_url=server.url, timeout=30) as http, \
                httpx.Client(base_url=server.url, timeout=30) as other, ThreadPoolExecutor(1) as pool:
            name = http.get("/v1/model").json()["name"]
            url = f"/v2/models/{name}/infer"
            started = http.post(url, json={"inputs": [tensor], "parameters": {"sequence_id": sequence,
                                                                                "sequence_start": True}})
            assert started.status_code == 200, started.text
            assert send(http, donor, series(7, seed=3), offset=0).status_code == 200
            document = http.get(f"/v1/sessions/{donor}/state").content

            proxy.arm()
            ending = pool.submit(other.post, url, json={"inputs": [tensor], "parameters": {
                "sequence_id": sequence, "sequence_end": True}})
            assert proxy.holding.wait(30), "the final chunk never committed"
            imported = http.put(f"/v1/sessions/{sequence}/state", content=document,
                                headers={"content-type": "application/octet-stream"})
            assert imported.status_code == 200, imported.text  # it replaced the sequence, at position 6
            proxy.release.set()
            assert ending.result().status_code == 200, ending.result().text
            assert position(http, sequence) == 7
    finally:
        proxy.release.set()
        proxy.close()


def _chunk(values: np.ndarray, sequence: str, **parameters: Any) -> dict[str, Any]:
    tensor = {"name": "values", "shape": list(values.shape), "datatype": "FP32", "data": values.ravel().tolist()}
    return {"inputs": [tensor], "parameters": {"sequence_id": sequence, **parameters}}


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_an_exact_retry_of_a_sequences_final_chunk_gets_its_answer_and_nothing_else_does(
    store: str, server_factory: ServerFactory, request: pytest.FixtureRequest
) -> None:
    """The final chunk's answer is lost and the client resends the very same request: it was a 404 (the
    sequence was gone). It gets the same answer byte for byte; the ended sequence stays ended for everything
    else (another chunk, a continuation, v1), and a new start starts afresh."""
    env = {}
    if store == "redis":
        env = {"GRU_STORE": "redis", "GRU_REDIS_URL": request.getfixturevalue("redis_server").url}
    server = server_factory(**env)
    sequence, values = new_id("ending"), series(7, seed=5)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        url = f"/v2/models/{http.get('/v1/model').json()['name']}/infer"
        assert http.post(url, json=_chunk(values[:4], sequence, sequence_start=True)).status_code == 200
        final = _chunk(values[4:], sequence, offset=4, sequence_end=True, horizon=2)
        answered = http.post(url, json=final)
        assert answered.status_code == 200, answered.text
        retried = http.post(url, json=final)
        assert retried.status_code == 200, retried.text  # got: 404 sequence-not-found
        assert retried.content == answered.content

        assert http.get(f"/v1/sessions/{sequence}").status_code == 404  # not brought back by the retry
        for other in (_chunk(values[4:] + 1, sequence, offset=4, sequence_end=True, horizon=2),
                      _chunk(values[4:], sequence, offset=4, horizon=2),
                      _chunk(values[4:], sequence, sequence_end=True, horizon=2),
                      _chunk(values[4:], sequence, offset=7, sequence_end=True)):
            refused = http.post(url, json=other)
            assert refused.status_code == 404 and refused.json()["type"].endswith("/sequence-not-found")
        assert send(http, sequence, values[4:], offset=4).status_code == 404  # v1 sees no session either

        restarted = http.post(url, json=_chunk(values[4:], sequence, sequence_start=True))
        assert restarted.status_code == 200
        predictions = restarted.json()["outputs"][0]
        assert predictions["name"] == "predictions"
        np.testing.assert_allclose(np.reshape(predictions["data"], (3, 1)), stateless(http, values[4:])["predictions"],
                                   atol=1e-5)
        assert position(http, sequence) == 3
