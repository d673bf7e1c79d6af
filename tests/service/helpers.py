"""Small helpers for tests against a live server."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import numpy as np

from harness.processes import Process

PROBLEM_JSON = "application/problem+json"


def access_line(server: Process, request_id: str) -> dict[str, Any]:
    """The one log line of a request: written just after its answer is sent (a stream's as it ends), so
    waited for."""
    deadline = time.monotonic() + 5
    while not (lines := [json.loads(line) for line in server.log().splitlines() if request_id in line]):
        assert time.monotonic() < deadline, f"no log line for {request_id}"
        time.sleep(0.05)
    assert len(lines) == 1, lines
    return lines[0]  # type: ignore[no-any-return]


def new_id(prefix: str = "s") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def series(steps: int, seed: int = 0, features: int = 1) -> np.ndarray:
    """A wavy, trending series with noise: every part of the model (GRU, lags, scaling) gets exercised."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps, dtype=np.float64)[:, None]
    base = 0.5 + 0.3 * np.sin(t / 3.0 + np.arange(features)) + 0.01 * t
    return (base + 0.05 * rng.standard_normal((steps, features))).astype(np.float32)


def stateless(client: httpx.Client, values: np.ndarray, horizon: int = 0) -> dict[str, Any]:
    response = client.post("/v1/predict", json={"values": values.tolist(), "horizon": horizon})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def send(client: httpx.Client, session_id: str, values: np.ndarray, **fields: Any) -> httpx.Response:
    return client.post(f"/v1/sessions/{session_id}/predict", json={"values": values.tolist(), **fields})


def position(client: httpx.Client, session_id: str) -> int:
    response = client.get(f"/v1/sessions/{session_id}")
    assert response.status_code == 200, response.text
    return int(response.json()["position"])


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers
    body = response.json()
    assert body["status"] == status
    assert body["type"] and body["title"] and body["detail"]
    return body  # type: ignore[no-any-return]


class Clock:
    """A clock that moves only when a test moves it (``clock.now += 50``)."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
