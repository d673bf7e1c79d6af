"""Overload and time limits against a real server: refuse early and cleanly, never half-apply a chunk.

- A full engine queue (GRU_MAX_QUEUE) answers 429 problem+json with Retry-After at once, counts it in
  gru_rejected_total{reason="queue_full"}, and the sessions hold exactly the chunks that were acknowledged.
- A chunk not computed within GRU_REQUEST_TIMEOUT_SECONDS answers 503; the session then holds either none
  of it or all of it, and an exact retry (same offset) settles which, with the same numbers as one pass.
"""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np

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
    server = server_factory(GRU_MAX_QUEUE="2", GRU_MAX_BATCH_SIZE="1", GRU_MAX_BATCH_DELAY_MS="0")
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
    assert refused and statuses.count(200) >= 3, statuses
    for response in refused:
        body = assert_problem(response, 429)
        assert body["type"].endswith("/overloaded")
        assert int(response.headers["retry-after"]) >= 1
        # refused at the door: answered without waiting for the chunks ahead of it
        assert response.elapsed.total_seconds() < 5
    assert _metric(server, "gru_rejected_total", 'reason="queue_full"') >= len(refused)

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
