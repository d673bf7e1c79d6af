"""The session contract (README, "API (v1)") against a real server: state, offsets, retries, lifecycle."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import numpy as np
import pytest

from tests.conftest import ServerFactory
from tests.service.helpers import assert_problem, new_id, position, send, series, stateless


@pytest.mark.parametrize("cuts", [[40], [1] * 40, [7, 1, 20, 12], [3, 37], [13, 13, 13, 1]])
def test_chunked_calls_equal_one_stateless_pass(client: httpx.Client, cuts: list[int]) -> None:
    values = series(40, seed=1)
    expected = np.array(stateless(client, values)["predictions"])
    session, start, got = new_id(), 0, []
    for size in cuts:
        response = send(client, session, values[start : start + size], offset=start)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["position"] == start + size
        assert body["created"] == (start == 0)
        got.extend(body["predictions"])
        start += size
    np.testing.assert_allclose(np.array(got), expected, atol=1e-5)


def test_append_without_offset_continues_at_position(client: httpx.Client) -> None:
    values = series(12, seed=2)
    session = new_id()
    first = send(client, session, values[:5]).json()
    second = send(client, session, values[5:]).json()
    assert (first["position"], first["created"]) == (5, True)
    assert (second["position"], second["created"]) == (12, False)
    expected = stateless(client, values)["predictions"]
    np.testing.assert_allclose(first["predictions"] + second["predictions"], expected, atol=1e-5)


def test_retry_of_last_chunk_returns_same_answer(client: httpx.Client) -> None:
    values = series(9, seed=3)
    session = new_id()
    first = send(client, session, values[:4], offset=0, horizon=3)
    retry = send(client, session, values[:4], offset=0, horizon=3)
    assert retry.status_code == 200
    assert retry.content == first.content  # every field, `created` included
    assert position(client, session) == 4
    second = send(client, session, values[4:], offset=4)
    assert send(client, session, values[4:], offset=4).content == second.content
    assert position(client, session) == 9


@pytest.mark.parametrize(
    ("offset", "change"), [(3, "none"), (7, "none"), (0, "values"), (0, "horizon"), (2, "none")]
)
def test_other_offsets_are_409_with_position_and_change_nothing(
    client: httpx.Client, offset: int, change: str
) -> None:
    values = series(12, seed=4)
    session = new_id()
    send(client, session, values[:5], offset=0)
    chunk = values[:5] + (0.5 if change == "values" else 0.0)
    horizon = 2 if change == "horizon" else 0
    body = assert_problem(send(client, session, chunk, offset=offset, horizon=horizon), 409)
    assert body["position"] == 5
    rest = send(client, session, values[5:], offset=5).json()
    expected = stateless(client, values)["predictions"][5:]
    np.testing.assert_allclose(rest["predictions"], expected, atol=1e-5)


def test_unknown_session_with_offset_is_404_and_not_created(client: httpx.Client) -> None:
    session = new_id()
    body = assert_problem(send(client, session, series(3), offset=5), 404)
    assert body["position"] == 0
    assert_problem(client.get(f"/v1/sessions/{session}"), 404)
    assert send(client, session, series(3), offset=0).json()["created"] is True


def test_horizon_forecasts_without_moving_the_session(client: httpx.Client) -> None:
    values = series(10, seed=5)
    session, plain = new_id(), new_id()
    with_horizon = send(client, session, values[:6], offset=0, horizon=4).json()
    without = send(client, plain, values[:6], offset=0).json()
    assert len(with_horizon["forecast"]) == 4
    assert with_horizon["forecast"][0] == with_horizon["predictions"][-1]
    assert "forecast" not in without
    assert with_horizon["position"] == 6
    after_horizon = send(client, session, values[6:], offset=6).json()["predictions"]
    after_plain = send(client, plain, values[6:], offset=6).json()["predictions"]
    assert after_horizon == after_plain


def test_stateless_forecast_matches_session_forecast(client: httpx.Client) -> None:
    values = series(8, seed=6)
    session = send(client, new_id(), values, horizon=5).json()
    assert stateless(client, values, horizon=5)["forecast"] == session["forecast"]


def test_reset_starts_again_at_zero(client: httpx.Client) -> None:
    values = series(10, seed=7)
    session = new_id()
    send(client, session, series(6, seed=99), offset=0)
    reset = client.post(f"/v1/sessions/{session}/reset")
    assert reset.status_code == 200
    assert reset.json() == {"session_id": session, "position": 0, "created": False}
    assert position(client, session) == 0
    again = send(client, session, values, offset=0).json()
    assert again["created"] is False
    np.testing.assert_allclose(again["predictions"], stateless(client, values)["predictions"], atol=1e-5)


def test_reset_of_unknown_session_creates_it(client: httpx.Client) -> None:
    session = new_id()
    assert client.post(f"/v1/sessions/{session}/reset").json() == {
        "session_id": session, "position": 0, "created": True,
    }
    info = client.get(f"/v1/sessions/{session}").json()
    assert info["position"] == 0
    assert info["created_at"] <= info["updated_at"] < info["expires_at"]


def test_delete_forgets_the_session(client: httpx.Client) -> None:
    session = new_id()
    send(client, session, series(4), offset=0)
    assert client.delete(f"/v1/sessions/{session}").status_code == 204
    assert_problem(client.get(f"/v1/sessions/{session}"), 404)
    assert_problem(client.delete(f"/v1/sessions/{session}"), 404)
    assert_problem(send(client, session, series(2), offset=4), 404)


def test_twelve_sessions_fed_concurrently_each_equal_the_stateless_pass(client: httpx.Client) -> None:
    def feed(index: int) -> tuple[list[list[float]], list[list[float]]]:
        values = series(30, seed=100 + index)
        session, got, start = new_id(f"c{index}"), [], 0
        for size in (1, 5, 11, 13):
            body = send(client, session, values[start : start + size], offset=start).json()
            got.extend(body["predictions"])
            start += size
        return got, stateless(client, values)["predictions"]

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        for got, expected in pool.map(feed, range(12)):
            np.testing.assert_allclose(got, expected, atol=1e-5)


def test_forty_concurrent_appends_on_one_session_end_at_the_exact_position(client: httpx.Client) -> None:
    session = new_id()
    chunk = series(3, seed=8)
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        responses = list(pool.map(lambda _: send(client, session, chunk), range(40)))
    assert all(r.status_code == 200 for r in responses)
    positions = sorted(r.json()["position"] for r in responses)
    assert positions == list(range(3, 121, 3))  # each applied once, one at a time
    assert sum(r.json()["created"] for r in responses) == 1
    assert position(client, session) == 120


def test_idle_sessions_expire_after_the_ttl(server_factory: ServerFactory) -> None:
    server = server_factory(GRU_SESSION_TTL_SECONDS="1")
    with httpx.Client(base_url=server.url) as http:
        send(http, "short-lived", series(4), offset=0)
        time.sleep(1.6)
        body = assert_problem(send(http, "short-lived", series(2), offset=4), 404)
        assert "expired" in body["detail"]
        metrics = http.get("/metrics").text
    assert 'gru_session_evictions_total{reason="ttl"} 1.0' in metrics


def test_least_recently_used_session_is_evicted_at_capacity(server_factory: ServerFactory) -> None:
    server = server_factory(GRU_MAX_SESSIONS="3")
    with httpx.Client(base_url=server.url) as http:
        for name in ("a", "b", "c"):
            send(http, name, series(2), offset=0)
        send(http, "a", series(2), offset=2)  # a is now the most recent; b the least
        send(http, "d", series(2), offset=0)
        assert_problem(http.get("/v1/sessions/b"), 404)
        assert [position(http, name) for name in ("a", "c", "d")] == [4, 2, 2]
        assert 'gru_session_evictions_total{reason="capacity"} 1.0' in http.get("/metrics").text
        assert "gru_active_sessions 3.0" in http.get("/metrics").text


def test_kept_answers_are_capacity_too_so_long_chunks_cannot_take_the_memory(server_factory: ServerFactory) -> None:
    """Each session keeps its last answer for exact retries, ~12 bytes a predicted value: 3,000 steps and a
    horizon of 512 is ~42 KB, so a 64 KiB budget holds one such session, and small ones beside it."""
    server = server_factory(GRU_MAX_ANSWER_BYTES="65536")
    with httpx.Client(base_url=server.url, timeout=60) as http:
        send(http, "small", series(2), offset=0)
        for name in ("long-1", "long-2"):
            answer = http.post(f"/v1/sessions/{name}/predict",
                               json={"values": series(3000, seed=5).tolist(), "offset": 0, "horizon": 512})
            assert answer.status_code == 200 and len(answer.content) > 40_000
        assert_problem(http.get("/v1/sessions/small"), 404)  # the least recently used went first
        assert_problem(http.get("/v1/sessions/long-1"), 404)
        assert position(http, "long-2") == 3000
        assert 'gru_session_evictions_total{reason="capacity"} 2.0' in http.get("/metrics").text


PROBLEMS = "https://gru-service.dev/problems/"  # the documented type URIs clients branch on


def test_each_refusal_has_its_documented_problem_type(client: httpx.Client) -> None:
    session = new_id()
    assert send(client, session, series(4), offset=0).status_code == 200
    mismatch = assert_problem(send(client, session, series(2), offset=9), 409)
    assert mismatch["type"] == PROBLEMS + "offset-mismatch" and mismatch["title"] == "Conflict"
    unknown = assert_problem(send(client, new_id(), series(2), offset=3), 404)
    assert unknown["type"] == PROBLEMS + "session-not-found" and unknown["position"] == 0
    no_route = assert_problem(client.get("/v1/nowhere"), 404)
    assert no_route["type"] == PROBLEMS + "not-found"
    wrong_method = assert_problem(client.put(f"/v1/sessions/{session}"), 405)
    assert wrong_method["type"] == PROBLEMS + "method-not-allowed"
    assert position(client, session) == 4


def test_idle_sessions_are_swept_without_being_touched(server_factory: ServerFactory) -> None:
    """Expiry is not only lazy: the sweeper (every TTL/4, at most 10 s) frees idle sessions, so
    gru_active_sessions falls and the eviction is counted although no call asks for the session again."""
    server = server_factory(GRU_SESSION_TTL_SECONDS="1")
    with httpx.Client(base_url=server.url) as http:
        send(http, "forgotten", series(4), offset=0)
        assert "gru_active_sessions 1.0" in http.get("/metrics").text
        deadline = time.monotonic() + 5
        while "gru_active_sessions 0.0" not in (metrics := http.get("/metrics").text):
            assert time.monotonic() < deadline, "the idle session was never swept"
            time.sleep(0.2)
    assert 'gru_session_evictions_total{reason="ttl"} 1.0' in metrics


def test_a_different_chunk_at_the_last_offset_is_told_apart_from_a_wrong_offset(client: httpx.Client) -> None:
    """Resending the last chunk with another horizon (or other values) is no retry: the 409 says a different
    chunk was applied at that offset, not that the offset is wrong; nothing changes."""
    session = new_id()
    values = series(3)
    assert send(client, session, values, offset=0).status_code == 200
    other_horizon = assert_problem(send(client, session, values, offset=0, horizon=2), 409)
    assert other_horizon["detail"].startswith(
        "a different chunk (other values, horizon, levels or scores) was applied at offset 0")
    assert other_horizon["position"] == 3
    assert "a different chunk" in assert_problem(send(client, session, values + 1, offset=0), 409)["detail"]
    wrong = assert_problem(send(client, session, values, offset=1), 409)
    assert wrong["detail"].startswith("offset 1 does not match")
    assert position(client, session) == 3
