"""Overload and time limits against a real server: refuse early and cleanly, never half-apply a chunk.

- A full engine queue (GRU_MAX_QUEUE) answers 429 problem+json with Retry-After at once, counts it in
  gru_rejected_total{reason="queue_full_unread"} (refused before the body was read) or {reason="queue_full"},
  and the sessions hold exactly the chunks that were acknowledged.
- A chunk not computed within GRU_REQUEST_TIMEOUT_SECONDS answers 503; the session then holds either none
  of it or all of it, and an exact retry (same offset) settles which, with the same numbers as one pass.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import orjson

from tests.conftest import Server, ServerFactory
from tests.service.helpers import assert_problem, new_id, series, stateless


def _metric(server: Server, name: str, labels: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    wanted = f"{name}{{{labels}}}" if labels else name
    match = re.search(rf"^{re.escape(wanted)} (\S+)$", text, re.MULTILINE)
    assert match, f"{wanted} not in /metrics"
    return float(match.group(1))


def _wait_idle(server: Server, timeout: float = 30) -> None:
    """Until nothing is queued or running: gru_steps_total stops moving for a while."""
    deadline = time.monotonic() + timeout
    last, still = -1.0, 0
    while time.monotonic() < deadline and still < 3:
        steps = _metric(server, "gru_steps_total", 'model="tiny",version="1"')
        still = still + 1 if steps == last else 0
        last = steps
        time.sleep(0.2)


def _fire(server: Server, calls: list[tuple[str, dict[str, Any]]]) -> list[httpx.Response]:
    """All calls at once, one connection each, released together by a barrier."""
    barrier = threading.Barrier(len(calls))

    def call(item: tuple[str, dict[str, Any]]) -> httpx.Response:
        path, body = item
        with httpx.Client(base_url=server.url, timeout=120) as http:
            http.get("/healthz")  # connect before the barrier, so the posts really land together
            barrier.wait()
            return http.post(path, json=body)

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(call, calls))


def _until_answered(http: httpx.Client, session: str, values: np.ndarray, offset: int) -> dict[str, Any]:
    """Exact retries (same offset, same values) until one is answered 200; a 503 is the only other answer."""
    for _ in range(50):
        body = {"values": values.tolist(), "offset": offset}
        response = http.post(f"/v1/sessions/{session}/predict", json=body)
        assert response.status_code in (200, 503), response.text
        if response.status_code == 200:
            return response.json()  # type: ignore[no-any-return]
        time.sleep(0.2)
    raise AssertionError(f"session {session}: no answer in 50 tries")


def test_full_queue_answers_429_at_once_and_sessions_hold_exactly_the_acknowledged_chunks(
    server_factory: ServerFactory, client: httpx.Client
) -> None:
    server = server_factory(GRU_MAX_QUEUE="2", GRU_MAX_BATCH_SIZE="1", GRU_MAX_BATCH_DELAY_MS="0",
                            GRU_QUEUE_PATIENCE_SECONDS="0")  # no wait for a place: refused at once
    sessions = [new_id("load") for _ in range(6)]
    # per session, appended without offsets in any order; at most GRU_MAX_CHUNK_STEPS in all, so one stateless
    # call can check the lot
    lengths = [1024, 700, 900, 800, 600]
    data = {s: series(sum(lengths), seed=i) for i, s in enumerate(sessions)}
    calls, chunks = [], []
    for session in sessions:
        start = 0
        for size in lengths:
            chunk = data[session][start : start + size]
            calls.append((f"/v1/sessions/{session}/predict", {"values": chunk.tolist()}))
            chunks.append((session, chunk))
            start += size
    began = time.perf_counter()
    responses = _fire(server, calls)
    assert time.perf_counter() - began < 60

    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 429}, statuses
    refused = [r for r in responses if r.status_code == 429]
    # at least the queue's two places are taken (refused unread, the rest can all come before a batch runs)
    assert refused and statuses.count(200) >= 2, statuses
    for response in refused:
        body = assert_problem(response, 429)
        assert body["type"].endswith("/overloaded")
        assert int(response.headers["retry-after"]) >= 1
        # refused at the door: answered without waiting for the chunks ahead of it
        assert response.elapsed.total_seconds() < 5
    # counted where refused: at the edge before the body was read, or by the queue itself
    assert (_metric(server, "gru_rejected_total", 'reason="queue_full_unread"')
            + _metric(server, "gru_rejected_total", 'reason="queue_full"')) >= len(refused)

    with httpx.Client(base_url=server.url, timeout=30) as http:
        for session in sessions:
            mine = [(r, chunk) for r, (s, chunk) in zip(responses, chunks, strict=True) if s == session]
            acknowledged = sorted(
                ((r.json()["position"], c, r.json()["predictions"]) for r, c in mine if r.status_code == 200),
                key=lambda item: item[0],
            )
            info = http.get(f"/v1/sessions/{session}")
            if not acknowledged:
                assert info.status_code == 404
                continue
            # position is the sum of the acknowledged chunks, and they were applied back to back, whole
            assert info.json()["position"] == sum(len(chunk) for _, chunk, _ in acknowledged)
            consumed = np.concatenate([chunk for _, chunk, _ in acknowledged])
            ends = [end for end, _, _ in acknowledged]
            assert ends == list(np.cumsum([len(chunk) for _, chunk, _ in acknowledged]))
            got = np.concatenate([np.array(p) for _, _, p in acknowledged])
            np.testing.assert_allclose(got, stateless(client, consumed)["predictions"], atol=1e-4)
    assert httpx.get(server.url + "/readyz").status_code == 200


def test_timeout_answers_503_and_never_leaves_a_chunk_half_applied(
    server_factory: ServerFactory, client: httpx.Client
) -> None:
    server = server_factory(GRU_REQUEST_TIMEOUT_SECONDS="0.1", GRU_MAX_BATCH_SIZE="1",
                            GRU_MAX_BATCH_DELAY_MS="0")
    sessions = [new_id("slow") for _ in range(8)]
    head = {s: series(16, seed=10 + i) for i, s in enumerate(sessions)}
    # short tails finish in time; long ones (~2x the timeout to compute) are often cut off mid-computation
    tail = {s: series(2048 if i % 2 else 256, seed=20 + i) for i, s in enumerate(sessions)}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for session in sessions:  # each session starts at position 16, so "unchanged" is visible
            _until_answered(http, session, head[session], 0)  # the first calls may time out while warming up

    calls = [(f"/v1/sessions/{s}/predict", {"values": tail[s].tolist(), "offset": 16}) for s in sessions]
    responses = _fire(server, calls)
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    timed_out = [s for s, r in zip(sessions, responses, strict=True) if r.status_code == 503]
    assert timed_out, statuses
    for response in responses:
        if response.status_code == 503:
            body = assert_problem(response, 503)
            assert body["type"].endswith("/timeout") and "retry-after" in response.headers
    assert _metric(server, "gru_rejected_total", 'reason="timeout"') >= len(timed_out)
    _wait_idle(server)  # a chunk that was computing when its caller gave up may still commit: let it

    with httpx.Client(base_url=server.url, timeout=30) as http:
        for session in sessions:
            # all or nothing: still at 16, or past the whole tail; never anywhere between
            end = 16 + len(tail[session])
            assert http.get(f"/v1/sessions/{session}").json()["position"] in (16, end)
            answer = _until_answered(http, session, tail[session], 16)  # applies it, or replays its answer
            assert answer["position"] == end
            assert http.get(f"/v1/sessions/{session}").json()["position"] == end
            expected = stateless(client, np.concatenate([head[session], tail[session]]))["predictions"][16:]
            np.testing.assert_allclose(answer["predictions"], expected, atol=1e-4)


def test_a_full_queue_refuses_a_chunk_before_its_body_is_read(server_factory: ServerFactory) -> None:
    # One chunk waits up to a second for its batch to fill, and one waiting chunk fills the queue meanwhile.
    server = server_factory(GRU_MAX_QUEUE="1", GRU_MAX_BATCH_SIZE="64", GRU_MAX_BATCH_DELAY_MS="1000",
                            GRU_QUEUE_PATIENCE_SECONDS="0")
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(httpx.post, server.url + "/v1/predict", json={"values": [0.1, 0.2]}, timeout=30)
        time.sleep(0.3)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            # the headers of a 100-byte body, and no body: refused at once, or the server would wait for it
            sock.sendall(b"POST /v1/sessions/edge/predict HTTP/1.1\r\nhost: x\r\ncontent-type: application/json"
                         b"\r\ncontent-length: 100\r\n\r\n")
            head = sock.recv(65536)
        assert waiting.result().status_code == 200
    assert head.startswith(b"HTTP/1.1 429 "), head
    assert b"retry-after: 1\r\n" in head.lower() and b"application/problem+json" in head
    assert _metric(server, "gru_rejected_total", 'reason="queue_full_unread"') == 1
    assert httpx.get(server.url + "/v1/sessions/edge").status_code == 404


def test_calls_that_find_the_queue_full_wait_unread_for_a_place_and_are_answered(
    server_factory: ServerFactory, client: httpx.Client
) -> None:
    # one place; each chunk's batch waits 0.3 s to fill: the calls must queue up for the place
    server = server_factory(GRU_MAX_QUEUE="1", GRU_MAX_BATCH_SIZE="64", GRU_MAX_BATCH_DELAY_MS="300",
                            GRU_QUEUE_PATIENCE_SECONDS="30")
    values = series(24, seed=3)
    calls = [("/v1/predict", {"values": values[i : i + 8].tolist()}) for i in range(0, 24, 8)] * 2
    responses = _fire(server, calls)
    assert [r.status_code for r in responses] == [200] * 6, [r.text for r in responses]
    for (_, body), response in zip(calls, responses, strict=True):
        assert response.json()["predictions"] == stateless(client, np.array(body["values"]))["predictions"]
    assert _metric(server, "gru_rejected_total", 'reason="queue_full_unread"') == 0
    assert _metric(server, "gru_rejected_total", 'reason="queue_full"') == 0

    # patience runs out: refused, unread, after waiting it
    patient = server_factory(GRU_MAX_QUEUE="1", GRU_MAX_BATCH_SIZE="64", GRU_MAX_BATCH_DELAY_MS="1000",
                             GRU_QUEUE_PATIENCE_SECONDS="0.2")
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(httpx.post, patient.url + "/v1/predict", json={"values": [0.1, 0.2]}, timeout=30)
        time.sleep(0.3)
        refused = httpx.post(patient.url + "/v1/predict", json={"values": [0.1]}, timeout=30)
        assert waiting.result().status_code == 200
    assert_problem(refused, 429)
    assert 0.2 <= refused.elapsed.total_seconds() < 1.0
    assert _metric(patient, "gru_rejected_total", 'reason="queue_full_unread"') == 1


def test_a_body_sent_at_once_is_not_timed_out_by_its_wait_for_a_queue_place(server_factory: ServerFactory) -> None:
    """A call that finds the queue full waits for a place with its body unread. The body's deadline
    (GRU_REQUEST_TIMEOUT_SECONDS) ran from the request's start, so a body too large to sit in the server's
    read buffer, sent at once, got 408 "send it at once" when its place came after that deadline: the
    time went to the queue, not to the client. Here the engine computes a long chunk for seconds while one
    chunk holds the only place and another call waits for it ahead of the large one: that call's place comes
    a full timeout after the large one arrived."""
    server = server_factory(GRU_MAX_QUEUE="1", GRU_MAX_BATCH_DELAY_MS="0", GRU_REQUEST_TIMEOUT_SECONDS="0.5",
                            GRU_QUEUE_PATIENCE_SECONDS="10", GRU_MAX_CHUNK_STEPS="200000")
    large = b'{"values": [0.25]' + b" " * 300_000 + b"}"  # well past uvicorn's 64 KiB read buffer

    def post(body: bytes, after: float) -> httpx.Response:
        time.sleep(after)
        return httpx.post(server.url + "/v1/predict", content=body, timeout=60,
                          headers={"content-type": "application/json"})

    with ThreadPoolExecutor(4) as pool:
        computing = pool.submit(post, orjson.dumps({"values": [0.1] * 180_000}), 0)  # seconds of compute
        holding = pool.submit(post, b'{"values": [0.1]}', 0.2)  # the place, until its 503 at 0.7 s
        ahead = pool.submit(post, b'{"values": [0.2]}', 0.3)  # the next place, until its 503 at 1.2 s
        waiting = pool.submit(post, large, 0.4)  # its place comes at 1.2 s, past 0.4 + 0.5 s
        responses = [f.result() for f in (computing, holding, ahead, waiting)]
    assert all(r.status_code in (200, 503) for r in responses), [r.text for r in responses]  # never 408
