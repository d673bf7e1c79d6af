"""The README's offset rules as a property: random operations against a real server, checked against
a small model of the rules and against one stateless pass over what the session consumed.

Hypothesis drives a state machine per session: chunks of random lengths appended with and without
offsets, exact retries of the last chunk, near-miss retries (same offset, other values or horizon), stale
and future offsets, horizons, resets and deletes, each sent to the session route or as a one-item batch.
After every step the server's position must be the model's; every applied chunk's predictions (and
forecast) must equal the stateless /v1/predict of the whole consumed series; every exact retry must return
the first answer byte for byte.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import orjson
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.conftest import Server

VALUES = st.lists(st.floats(-3, 3, allow_nan=False, width=32), min_size=1, max_size=12)
HORIZONS = st.integers(0, 4)


@dataclass(frozen=True)
class _Chunk:
    start: int
    values: tuple[float, ...]
    horizon: int

    def key(self) -> bytes:
        """What the service fingerprints: start, horizon and the float32 bytes (-0.0 is not 0.0)."""
        return repr((self.start, self.horizon)).encode() + np.array(self.values, dtype=np.float32).tobytes()


class OffsetProtocol(RuleBasedStateMachine):
    """One session on a live server, and the rules' model of it."""

    http: httpx.Client  # set by the test

    @initialize()
    def fresh_session(self) -> None:
        self.session = f"prop-{uuid.uuid4().hex[:12]}"
        self.exists = False
        self.consumed: list[float] = []  # since the last reset: position == len(consumed)
        self.last: _Chunk | None = None  # the last applied chunk
        self.last_answer = b""

    # -- the model of the rules ------------------------------------------------------------------------

    def _expect(self, offset: int | None, chunk: _Chunk) -> str:
        position = len(self.consumed)
        if not self.exists:
            return "apply" if offset in (None, 0) else "404"
        if offset is None or offset == position:
            return "apply"
        if self.last is not None and offset == self.last.start and chunk.key() == self.last.key():
            return "replay"
        return "409"

    def _send(self, offset: int | None, values: list[float], horizon: int, via_batch: bool) -> None:
        position = len(self.consumed)
        start = position if offset is None else offset
        chunk = _Chunk(start, tuple(values), horizon)
        expected = self._expect(offset, chunk)
        body: dict[str, Any] = {"values": values, "horizon": horizon}
        if offset is not None:
            body["offset"] = offset
        if via_batch:
            items = [{"session_id": self.session, **body}]
            response = self.http.post("/v1/predict/batch", json={"items": items})
            assert response.status_code == 200, response.text
            raw = _only_item(response.content)
            status = orjson.loads(raw).get("status", 200)  # a problem carries its status
        else:
            response = self.http.post(f"/v1/sessions/{self.session}/predict", json=body)
            raw, status = response.content, response.status_code
        answer = orjson.loads(raw)

        if expected in ("404", "409"):
            assert status == int(expected), (expected, answer)
            assert answer["position"] == position, answer
            return
        assert status == 200, (expected, answer)
        if expected == "replay":
            assert raw == self.last_answer  # every field, `created` included
            return
        created = not self.exists
        self.consumed.extend(values)
        self.exists = True
        self.last, self.last_answer = _Chunk(position, tuple(values), horizon), raw
        assert (answer["session_id"], answer["position"], answer["created"]) == (
            self.session, len(self.consumed), created)
        reference = self._stateless(horizon)
        predictions = np.array(answer["predictions"])
        np.testing.assert_allclose(predictions, np.array(reference["predictions"])[position:], atol=1e-5)
        if horizon:
            np.testing.assert_allclose(answer["forecast"], reference["forecast"], atol=1e-5)
            np.testing.assert_allclose(answer["forecast"][0], predictions[-1], atol=1e-6)
        else:
            assert "forecast" not in answer

    def _stateless(self, horizon: int) -> dict[str, Any]:
        response = self.http.post("/v1/predict", json={"values": self.consumed, "horizon": horizon})
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    # -- the operations -----------------------------------------------------------------------------------

    @rule(values=VALUES, horizon=HORIZONS, with_offset=st.booleans(), via_batch=st.booleans())
    def next_chunk(self, values: list[float], horizon: int, with_offset: bool, via_batch: bool) -> None:
        self._send(len(self.consumed) if with_offset else None, values, horizon, via_batch)

    @precondition(lambda self: self.last is not None)
    @rule(via_batch=st.booleans())
    def exact_retry(self, via_batch: bool) -> None:
        assert self.last is not None
        self._send(self.last.start, list(self.last.values), self.last.horizon, via_batch)

    @precondition(lambda self: self.last is not None)
    @rule(values=VALUES, horizon=HORIZONS, via_batch=st.booleans())
    def near_miss_retry(self, values: list[float], horizon: int, via_batch: bool) -> None:
        """The last chunk's offset with other values or another horizon: a conflict, not a retry."""
        assert self.last is not None
        self._send(self.last.start, values, horizon, via_batch)

    @precondition(lambda self: self.last is not None)
    @rule(shift=st.integers(1, 4), via_batch=st.booleans())
    def other_horizon_retry(self, shift: int, via_batch: bool) -> None:
        """The last chunk's offset and values with another horizon (random values are never the same ones, so
        near_miss_retry alone never sends this): a conflict, not a retry."""
        assert self.last is not None
        self._send(self.last.start, list(self.last.values), (self.last.horizon + shift) % 5, via_batch)

    @rule(offset=st.integers(0, 60), values=VALUES, horizon=HORIZONS, via_batch=st.booleans())
    def any_offset(self, offset: int, values: list[float], horizon: int, via_batch: bool) -> None:
        self._send(offset, values, horizon, via_batch)

    @rule()
    def reset(self) -> None:
        response = self.http.post(f"/v1/sessions/{self.session}/reset")
        assert response.status_code == 200, response.text
        assert response.json() == {"session_id": self.session, "position": 0, "created": not self.exists}
        self.exists, self.consumed, self.last = True, [], None

    @rule()
    def delete(self) -> None:
        response = self.http.delete(f"/v1/sessions/{self.session}")
        assert response.status_code == (204 if self.exists else 404), response.text
        self.exists, self.consumed, self.last = False, [], None

    @invariant()
    def position_is_the_models(self) -> None:
        response = self.http.get(f"/v1/sessions/{self.session}")
        if self.exists:
            assert response.status_code == 200, response.text
            assert response.json()["position"] == len(self.consumed)
        else:
            assert response.status_code == 404, response.text


def _only_item(batch: bytes) -> bytes:
    """The raw bytes of the only result of a one-item batch answer: ``{"results":[ITEM]}``."""
    prefix, suffix = b'{"results":[', b"]}"
    assert batch.startswith(prefix) and batch.endswith(suffix), batch[:80]
    return batch[len(prefix) : -len(suffix)]


def test_offset_protocol_matches_the_model_and_one_stateless_pass(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        OffsetProtocol.http = http
        run_state_machine_as_test(
            OffsetProtocol,
            settings=settings(max_examples=40, stateful_step_count=30, deadline=None, derandomize=True,
                              database=None, suppress_health_check=[HealthCheck.too_slow]),
        )
