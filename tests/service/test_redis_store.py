"""The Redis store against a real redis-server: the scenarios every store passes (tests/service/stores.py) and
Redis's own (TTL, lost replies, outages), then two replicas sharing it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import re
import shutil
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from harness.processes import RedisServer, free_port, wait_http
from service.sessions.base import StoreUnavailable
from tests.conftest import Server, ServerFactory, make_tiny_model, start_server
from tests.service import stores
from tests.service.conftest import start_redis
from tests.service.helpers import assert_problem, new_id, position, send, series, stateless
from tests.service.stores import STATE, write

pytest.importorskip("redis")
from redis.exceptions import ResponseError

from service.sessions.redis import _DELETE, PAST_REVISIONS, RedisStore

CONFLICTS = "gru_store_conflicts_total"


def _run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


# -- the store itself ----------------------------------------------------------------------------------


async def _on_redis(redis_server: RedisServer, scenario: Callable[[RedisStore], Awaitable[None]]) -> None:
    store = RedisStore(redis_server.url, STATE, ttl_seconds=60)
    try:
        await scenario(store)
    finally:
        await store.close()


def test_commit_is_compare_and_set_on_the_revision(redis_server: RedisServer) -> None:
    _run(_on_redis(redis_server, stores.commit_is_compare_and_set))


def test_delete_and_recreate_at_the_same_position_fails_a_stale_write(redis_server: RedisServer) -> None:
    _run(_on_redis(redis_server, stores.delete_and_recreate_fails_a_stale_write))


def test_an_end_at_a_revision_spares_a_later_write(redis_server: RedisServer) -> None:
    _run(_on_redis(redis_server, stores.end_at_a_revision_spares_a_later_write))


def test_a_delete_at_a_revision_spares_a_later_write(redis_server: RedisServer) -> None:
    _run(_on_redis(redis_server, stores.delete_at_a_revision_spares_a_later_write))


def test_batch_commit_wins_and_loses_per_session(redis_server: RedisServer) -> None:
    _run(_on_redis(redis_server, stores.batch_commit_wins_and_loses_per_session))


def test_a_peek_reads_the_record_and_its_state(redis_server: RedisServer) -> None:
    _run(_on_redis(redis_server, stores.a_peek_reads_the_record_and_its_state))


def test_a_load_refreshes_the_ttl(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = RedisStore(redis_server.url, STATE, ttl_seconds=30)
        assert (await store.commit([write("t/y", None, 1)], torch.zeros(1, STATE)))[0] is not None
        redis_server.client().pexpire("gru:s:t/y", 500)
        await store.load(["t/y"])
        assert redis_server.client().pttl("gru:s:t/y") > 25_000  # use refreshes the TTL
        await store.close()

    _run(scenario())


def test_a_peek_leaves_the_ttl_alone(redis_server: RedisServer) -> None:
    """The state API's reads (exports, forks' parents) are no use: a backup job must not keep sessions alive."""
    async def scenario() -> None:
        store = RedisStore(redis_server.url, STATE, ttl_seconds=30)
        assert (await store.commit([write("t/y", None, 1)], torch.zeros(1, STATE)))[0] is not None
        redis_server.client().pexpire("gru:s:t/y", 500)
        assert await store.peek("t/y") is not None
        assert 0 < redis_server.client().pttl("gru:s:t/y") <= 500
        await store.close()

    _run(scenario())


def test_commit_retried_after_a_lost_reply_is_not_a_conflict(redis_server: RedisServer) -> None:
    """The script runs, the reply is lost, the client retries: the store must report the write as won."""

    async def scenario() -> None:
        store = RedisStore(redis_server.url, STATE, ttl_seconds=60)
        args = ["1.0", 60_000, "", "rev-1", 4, "v1", 0, b"f", b"{}", b"\0" * 4 * STATE,
                "rev-0", "rev-2", 4, "v1", 0, b"f", b"{}", b"\0" * 4 * STATE]
        first = await store._commit(keys=["gru:s:t/r", "gru:s:t/other"], args=args)
        retried = await store._commit(keys=["gru:s:t/r", "gru:s:t/other"], args=args)
        assert first == retried == [b"1.0", None]  # the won write stays won, the lost one stays lost
        await store.close()

    _run(scenario())


def test_commit_or_reset_retried_after_other_writes_followed_it_is_won_not_run_again(
    redis_server: RedisServer,
) -> None:
    """The script runs, its reply is lost, other replicas write the session before the client's retry arrives:
    the retry must still read as won (a lost race would have the engine apply an append a second time), and
    a reset's retry must not wipe what was written after it."""

    async def scenario() -> None:
        store = RedisStore(redis_server.url, STATE, ttl_seconds=60)
        state = b"\0" * 4 * STATE

        async def run(expected: str, new: str, position: int) -> Any:
            args = ["1.0", 60_000, expected, new, position, "v1", 0, b"f", b"{}", state]
            return (await store._commit(keys=["gru:s:t/p"], args=args))[0]

        assert await run("", "rev-1", 4) == b"1.0"
        for n in range(2, 2 + PAST_REVISIONS):  # PAST_REVISIONS writes after it, each judged on the one before
            assert await run(f"rev-{n - 1}", f"rev-{n}", 4 * n) == b"1.0"
        assert await run("", "rev-1", 4) == b"1.0"  # its retry: won, and nothing written
        assert redis_server.client().hget("gru:s:t/p", "pos") == str(4 * (1 + PAST_REVISIONS)).encode()
        assert await run(f"rev-{1 + PAST_REVISIONS}", "rev-next", 99) == b"1.0"
        assert await run("", "rev-1", 4) is None  # one write more: beyond what a record keeps, a lost race

        existed, _ = await store._reset(keys=["gru:s:t/p"], args=["rev-reset", "v1", "2.0", 60_000])
        assert existed == 1
        assert await run("rev-reset", "rev-after", 8) == b"1.0"
        await store._reset(keys=["gru:s:t/p"], args=["rev-reset", "v1", "3.0", 60_000])  # the reset's retry
        assert redis_server.client().hget("gru:s:t/p", "pos") == b"8"  # the write after the reset stays
        await store.close()

    _run(scenario())


def test_a_reset_retried_after_a_lost_reply_says_created_as_its_first_run_did(redis_server: RedisServer) -> None:
    """The connections retry a command once after a lost reply, sending the very same script call. The retry of
    a reset over an existing session read as already applied and answered ``created: true`` (existed 0), also
    when a chunk followed the reset before the retry came; a reset that created its session must still say so."""

    async def scenario() -> None:
        store = RedisStore(redis_server.url, STATE, ttl_seconds=60)
        assert (await store.commit([write("t/old", None, 3)], torch.ones(1, STATE)))[0] is not None
        for key, existed in (("gru:s:t/old", 1), ("gru:s:t/new", 0)):
            args = [f"rev-reset-{existed}", "v1", "2.0", 60_000]
            first, _ = await store._reset(keys=[key], args=args)
            retried, _ = await store._reset(keys=[key], args=args)  # the connection's retry, reply lost
            after = ["2.5", 60_000, args[0], f"rev-after-{existed}", 2, "v1", 0, b"f", b"{}", b"\0" * 4 * STATE]
            assert (await store._commit(keys=[key], args=after))[0] is not None  # a chunk follows the reset
            late, _ = await store._reset(keys=[key], args=args)  # the retry arrives after it
            assert (first, retried, late) == (existed, existed, existed), key
            assert redis_server.client().hget(key, "pos") == b"2"  # the retries wrote nothing
        await store.close()

    _run(scenario())


def test_unreachable_redis_is_store_unavailable_and_not_ready() -> None:
    async def scenario() -> None:
        store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", STATE, ttl_seconds=60)
        assert not await store.ping()
        with pytest.raises(StoreUnavailable):
            await store.load(["t/a"])
        with pytest.raises(StoreUnavailable):
            await store.commit([write("t/a", None, 1)], torch.zeros(1, STATE))
        with pytest.raises(StoreUnavailable):
            await store.reset("t/a", "v1")
        await store.close()

    _run(scenario())


# -- two replicas sharing one Redis --------------------------------------------------------------------


def _replicas(server_factory: ServerFactory, redis_server: RedisServer, **env: str) -> tuple[Server, Server]:
    """Two service processes on one Redis, started side by side (start-up is most of a test's time)."""
    settings = {"GRU_STORE": "redis", "GRU_REDIS_URL": redis_server.url, **env}
    pair = server_factory(wait=False, **settings), server_factory(wait=False, **settings)
    for server in pair:
        wait_http(server, "/readyz")
    return pair


@pytest.fixture(scope="module")
def shared(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    """One Redis and two replicas for the tests that only use their own session ids."""
    redis_server = start_redis(tmp_path_factory.mktemp("redis-shared"))
    logs = tmp_path_factory.mktemp("replicas")
    env = {"GRU_STORE": "redis", "GRU_REDIS_URL": redis_server.url}
    pair = start_server(tiny_model, logs, env, wait=False), start_server(tiny_model, logs, env, wait=False)
    try:
        for server in pair:
            wait_http(server, "/readyz")
        yield pair
    finally:
        for server in pair:
            server.stop(signal.SIGKILL)
        redis_server.kill()


def _metric(client: httpx.Client, sample: str) -> float:
    match = re.search(rf"^{re.escape(sample)} (\S+)$", client.get("/metrics").text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_alternating_chunks_between_replicas_equal_one_stateless_pass(shared: tuple[Server, Server]) -> None:
    a, b = shared
    values = series(60, seed=3)
    with httpx.Client(base_url=a.url, timeout=30) as ca, httpx.Client(base_url=b.url, timeout=30) as cb:
        expected = np.array(stateless(ca, values, horizon=4)["forecast"])
        reference = np.array(stateless(cb, values)["predictions"])
        session, start, got, last = new_id(), 0, [], {}
        for i, size in enumerate([7, 1, 12, 5, 20, 15]):
            client = (ca, cb)[i % 2]
            horizon = 4 if start + size == 60 else 0
            response = send(client, session, values[start : start + size], offset=start, horizon=horizon)
            assert response.status_code == 200, response.text
            last = response.json()
            assert last["position"] == start + size and last["created"] == (start == 0)
            got.extend(last["predictions"])
            start += size
        np.testing.assert_allclose(np.array(got), reference, atol=1e-5)
        np.testing.assert_allclose(np.array(last["forecast"]), expected, atol=1e-5)
        assert position(ca, session) == position(cb, session) == 60


def test_exact_retry_on_the_other_replica_gets_the_same_answer_and_a_stale_offset_a_409(
    shared: tuple[Server, Server]
) -> None:
    a, b = shared
    values = series(20, seed=4)
    with httpx.Client(base_url=a.url, timeout=30) as ca, httpx.Client(base_url=b.url, timeout=30) as cb:
        session = new_id()
        first = send(ca, session, values[:8], offset=0)
        second = send(ca, session, values[8:14], offset=8, horizon=3)
        assert first.status_code == second.status_code == 200
        retry = send(cb, session, values[8:14], offset=8, horizon=3)
        assert retry.status_code == 200 and retry.content == second.content  # every field, `created` too
        stale = assert_problem(send(cb, session, values[:8], offset=0), 409)  # not the last chunk: a conflict
        assert stale["position"] == 14
        ahead = assert_problem(send(cb, session, values[14:], offset=15), 409)
        assert ahead["position"] == 14
        assert_problem(send(cb, new_id(), values[:3], offset=5), 404)
        assert position(cb, session) == 14


def test_sixty_appends_racing_across_replicas_end_at_exact_position(shared: tuple[Server, Server]) -> None:
    a, b = shared
    chunk = series(3, seed=5)
    count, size = 60, len(chunk)
    session = new_id()
    limits = httpx.Limits(max_connections=30)
    with httpx.Client(base_url=a.url, timeout=30, limits=limits) as ca, \
            httpx.Client(base_url=b.url, timeout=30, limits=limits) as cb:
        conflicts_before = _metric(ca, CONFLICTS) + _metric(cb, CONFLICTS)
        with concurrent.futures.ThreadPoolExecutor(30) as pool:
            answers = list(pool.map(lambda i: send((ca, cb)[i % 2], session, chunk), range(count)))
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers if r.status_code != 200]
        bodies = [r.json() for r in answers]
        # Each append applied exactly once, at its own position, with the predictions of that place.
        assert sorted(body["position"] for body in bodies) == [size * (i + 1) for i in range(count)]
        probe = series(4, seed=6)
        whole = np.concatenate([np.tile(chunk, (count, 1)), probe])
        expected = np.array(stateless(ca, whole)["predictions"])
        for body in bodies:
            end = body["position"]
            np.testing.assert_allclose(np.array(body["predictions"]), expected[end - size : end], atol=1e-5)
        final = send(cb, session, probe, offset=count * size)
        assert final.status_code == 200, final.text
        np.testing.assert_allclose(np.array(final.json()["predictions"]), expected[-len(probe):], atol=1e-5)
        conflicts = _metric(ca, CONFLICTS) + _metric(cb, CONFLICTS) - conflicts_before
    assert conflicts >= 1  # the race did happen, and every loser was judged again


def test_sigkill_of_one_replica_mid_stream_the_other_goes_on_exactly(
    server_factory: ServerFactory, redis_server: RedisServer
) -> None:
    a, b = _replicas(server_factory, redis_server)
    values = series(400, seed=7)
    session, size = new_id(), 4
    got: dict[int, list[Any]] = {}
    sent_to_a = threading.Event()
    with httpx.Client(base_url=b.url, timeout=30) as cb:
        def stream() -> None:
            ca = httpx.Client(base_url=a.url, timeout=30)
            clients = [ca, cb]
            for start in range(0, len(values), size):
                while True:  # on a dead replica, send the same chunk with the same offset to the other
                    try:
                        response = send(clients[0], session, values[start : start + size], offset=start)
                        break
                    except httpx.TransportError:
                        clients.pop(0)
                assert response.status_code == 200, response.text
                got[start] = response.json()["predictions"]
                if start >= 40:
                    sent_to_a.set()
            ca.close()

        worker = threading.Thread(target=stream)
        worker.start()
        assert sent_to_a.wait(30)
        a.stop(signal.SIGKILL)
        worker.join(60)
        assert not worker.is_alive() and len(got) == len(values) // size
        expected = np.array(stateless(cb, values)["predictions"])
        np.testing.assert_allclose(np.concatenate([got[s] for s in sorted(got)]), expected, atol=1e-5)
        assert position(cb, session) == len(values)


def test_redis_down_is_503_and_not_ready_then_correct_after_it_returns(
    server_factory: ServerFactory, redis_server: RedisServer
) -> None:
    a, b = _replicas(server_factory, redis_server)
    values = series(30, seed=8)
    with httpx.Client(base_url=a.url, timeout=30) as ca, httpx.Client(base_url=b.url, timeout=30) as cb:
        session = new_id()
        first = send(ca, session, values[:10], offset=0)
        assert first.status_code == 200
        redis_server.stop(save=True)  # dump.rdb, so the restarted Redis has the session again
        down = assert_problem(send(cb, session, values[10:20], offset=10), 503)
        assert "store" in down["type"]
        assert str(redis_server.port) not in down["detail"]  # the store's address is for the log, not clients
        assert int(send(ca, session, values[10:20]).headers["retry-after"]) > 0
        not_ready = ca.get("/readyz")
        assert assert_problem(not_ready, 503)["type"].endswith("/not-ready")
        assert not_ready.headers["retry-after"] == "2"
        assert_problem(cb.get(f"/v1/sessions/{session}"), 503)
        assert_problem(cb.post(f"/v1/sessions/{session}/reset"), 503)
        redis_server.start()
        deadline = time.monotonic() + 10
        while cb.get("/readyz").status_code != 200 or ca.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the replicas did not become ready again"
            time.sleep(0.1)
        assert position(cb, session) == 10  # nothing half-written while Redis was away
        outage = [line for line in b.log().splitlines() if "session store unreachable" in line]
        assert len(outage) == 1 and str(redis_server.port) in outage[0]  # once, with the cause
        assert "session store reachable again" in b.log()
        second, third = send(cb, session, values[10:20], offset=10), send(ca, session, values[20:], offset=20)
        assert second.status_code == third.status_code == 200, (second.text, third.text)
        got = first.json()["predictions"] + second.json()["predictions"] + third.json()["predictions"]
        np.testing.assert_allclose(np.array(got), stateless(ca, values)["predictions"], atol=1e-5)


def test_hung_redis_is_waited_out_once_then_sessions_get_503_at_once_and_stateless_calls_go_on(
    server_factory: ServerFactory, redis_server: RedisServer
) -> None:
    """A Redis that stops answering (SIGSTOP: a stall or a partition, not a refused connection) costs the
    first batch its timeout; after that, chunks of sessions are refused without touching the store, so
    no batch waits on it (stateless chunks included), until a ping answers again."""
    server = server_factory(GRU_STORE="redis", GRU_REDIS_URL=redis_server.url + "?socket_timeout=0.5")
    assert redis_server.process is not None
    values = series(20, seed=11)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        session = new_id("hung")
        assert send(http, session, values[:10], offset=0).status_code == 200
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            for _ in range(5):
                assert_problem(send(http, session, values[10:], offset=10), 503)
            assert_problem(http.get(f"/v1/sessions/{session}"), 503)
            assert_problem(http.post(f"/v1/sessions/{session}/reset"), 503)
            # one wait, not one per call: the rest were refused without a call to Redis
            assert _metric(http, 'gru_store_errors_total{operation="load"}') == 1
            assert _metric(http, 'gru_store_errors_total{operation="get"}') == 0
            assert http.post("/v1/predict", json={"values": values.tolist()}).status_code == 200
            assert_problem(http.get("/readyz"), 503)  # its failed ping keeps the outage in the error rate
            assert _metric(http, 'gru_store_errors_total{operation="ping"}') >= 1
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 10
        while http.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "not ready again after Redis came back"
            time.sleep(0.1)
        assert send(http, session, values[10:], offset=10).status_code == 200


def test_sessions_expire_by_their_redis_ttl(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = RedisStore(redis_server.url, STATE, ttl_seconds=0.3)
        assert (await store.commit([write("t/e", None, 2)], torch.zeros(1, STATE)))[0] is not None
        assert 0 < redis_server.client().pttl("gru:s:t/e") <= 300
        await asyncio.sleep(0.5)
        assert await store.load(["t/e"]) == [None] and await store.get("t/e") is None
        await store.close()

    _run(scenario())


def test_replicas_export_no_session_count_of_their_own(shared: tuple[Server, Server]) -> None:
    """Redis holds the sessions and expires them itself: a replica's gauge would only ever read 0."""
    for server in shared:
        text = httpx.get(server.url + "/metrics", timeout=10).text
        assert "gru_active_sessions" not in text and "gru_session_evictions" not in text
        assert "gru_store_errors_total" in text


def test_a_new_model_refuses_the_old_ones_sessions_in_each_protocols_terms(
    server_factory: ServerFactory, redis_server: RedisServer, tmp_path: Path
) -> None:
    """A replica on a new model meets sessions an older model built (a rolling upgrade): 409 model-changed
    until they start again. The advice was v1's reset URL on v2 too, where a sequence restarts with
    sequence_start."""
    settings = {"GRU_STORE": "redis", "GRU_REDIS_URL": redis_server.url}
    old = server_factory(**settings)
    new = server_factory(make_tiny_model(tmp_path / "newer", seed=1), **settings)
    session, values = new_id("upgrade"), series(6, seed=31)
    with httpx.Client(base_url=old.url, timeout=30) as http:
        assert send(http, session, values, offset=0).status_code == 200
    with httpx.Client(base_url=new.url, timeout=30) as http:
        v1 = assert_problem(send(http, session, values, offset=6), 409)
        assert v1["type"].endswith("/model-changed") and v1["detail"].endswith("reset the session to continue")
        name = http.get("/v1/model").json()["name"]
        tensor = {"name": "values", "shape": [6, 1], "datatype": "FP32", "data": values.ravel().tolist()}
        infer = {"inputs": [tensor], "parameters": {"sequence_id": session}}
        v2 = http.post(f"/v2/models/{name}/infer", json=infer)
        assert v2.status_code == 409 and v2.json()["type"].endswith("/model-changed")
        assert "sequence_start=true" in v2.json()["error"] and "/v1/" not in v2.json()["error"]
        started = http.post(f"/v2/models/{name}/infer", json={
            "inputs": [tensor], "parameters": {"sequence_id": session, "sequence_start": True}})
        assert started.status_code == 200 and started.json()["parameters"]["sequence_position"] == 6


# -- what else Redis may hold or answer ----------------------------------------------------------------


def _wait_until(condition: Callable[[], bool], what: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_damaged_records_under_the_prefix_are_409s_to_reset_never_500s(
    server_factory: ServerFactory, redis_server: RedisServer
) -> None:
    """A key under the service's prefix that is not a hash, or a hash whose fields do not parse (garbage, or
    another program's), is a damaged session: a chunk or an export on it is a 409 that says so, and a reset,
    an import or a delete replaces it. Before, every call on it failed with WRONGTYPE or ValueError: a 500
    (the batch it was in failing whole), and /v1/models failed on a string key."""
    server = server_factory(GRU_STORE="redis", GRU_REDIS_URL=redis_server.url)
    redis = redis_server.client()
    damaged = {"string": new_id("str"), "pos": new_id("pos"), "ver": new_id("ver"), "created": new_id("created")}
    redis.set(f"gru:s:default/{damaged['string']}", "garbage")
    redis.hset(f"gru:s:default/{damaged['pos']}", mapping={"rev": "r", "pos": "abc"})
    redis.hset(f"gru:s:default/{damaged['ver']}", mapping={"rev": "r", "pos": 1, "ver": b"\xff\xfe"})
    redis.hset(f"gru:s:default/{damaged['created']}", mapping={"rev": "r", "pos": 1, "created": "zz"})
    values = series(3, seed=41)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for session in damaged.values():
            refused = assert_problem(send(http, session, values, offset=1), 409)
            assert refused["type"].endswith("/model-changed") and "damaged record" in refused["detail"]
            assert "damaged record" in http.get(f"/v1/sessions/{session}").json()["model_version"]
            assert_problem(http.get(f"/v1/sessions/{session}/state"), 409)
        assert http.get("/v1/models").status_code == 200
        for session in (damaged["string"], damaged["created"]):
            assert http.post(f"/v1/sessions/{session}/reset").json()["position"] == 0
            started = send(http, session, values, offset=0)
            assert started.status_code == 200 and started.json()["position"] == 3, started.text
        assert http.delete(f"/v1/sessions/{damaged['pos']}").status_code == 204
        assert send(http, damaged["pos"], values, offset=0).json()["created"] is True
    assert "Traceback" not in server.log()


def test_a_field_that_parses_but_fits_no_session_is_a_damaged_record_not_a_500(
    server_factory: ServerFactory, redis_server: RedisServer
) -> None:
    """Fields that parse but fit no session were read as if they did, and failed later: a 500 for a chunk, an
    export, a fork and an import. A state of 4·S + 1 to 4·S + 3 bytes holds S whole floats, so it passed for
    this model's layout and failed when gathered; a pos or loff past int64 parsed (Python's int has no bound)
    and failed where it was packed (the chunk fingerprint, the entity tag). Each is a damaged record: 409
    model-changed, and an import replaces it (README, "Session state")."""
    server = server_factory(GRU_STORE="redis", GRU_REDIS_URL=redis_server.url)
    redis = redis_server.client()
    values, donor = series(4, seed=44), new_id("donor")
    damage: dict[str, Callable[[bytes], bytes]] = {
        "state": lambda state: state + b"\0", "pos": lambda _: b"9" * 23, "loff": lambda _: b"9" * 23,
    }
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert send(http, donor, values, offset=0).status_code == 200
        document = http.get(f"/v1/sessions/{donor}/state").content
        for field, damaged in damage.items():
            session = new_id(field)
            assert send(http, session, values[:2], offset=0).status_code == 200
            key = f"gru:s:default/{session}"
            redis.hset(key, field, damaged(redis.hget(key, field)))
            assert_problem(send(http, session, values[2:], offset=2), 409)
            assert_problem(http.get(f"/v1/sessions/{session}/state"), 409)
            assert_problem(http.post(f"/v1/sessions/{session}/fork", json={"to": new_id("branch")}), 409)
            replaced = http.put(f"/v1/sessions/{session}/state", content=document,
                                headers={"content-type": "application/octet-stream", "If-Match": "*"})
            assert replaced.status_code == 200, replaced.text
            assert position(http, session) == 4
    assert "Traceback" not in server.log()


def test_a_reset_or_an_import_replaces_a_record_whose_created_time_is_no_time(
    server_factory: ServerFactory, redis_server: RedisServer
) -> None:
    """A created of nan, inf, 1e308 or -5 parses as a number but is no time, so the record reads as damaged:
    409, "reset it". The reset and the import kept that created all the same (any number passed), so after
    a reset every chunk was still that 409, and the import answered a 500 (its answer's timestamp). Lua's
    tonumber also reads hexadecimal ("0x10", "0x1p4") and stops at a NUL byte, which Python's float, reading
    the record back, refuses: those must not pass for times either."""
    server = server_factory(GRU_STORE="redis", GRU_REDIS_URL=redis_server.url)
    redis = redis_server.client()
    values, donor = series(4, seed=45), new_id("donor")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert send(http, donor, values, offset=0).status_code == 200
        document = http.get(f"/v1/sessions/{donor}/state").content
        for created in (b"nan", b"inf", b"1e308", b"-5", b"0x10", b"0x1p4", b"5\x00"):
            reset, imported = new_id("reset"), new_id("imported")
            for session in (reset, imported):
                assert send(http, session, values[:2], offset=0).status_code == 200
                redis.hset(f"gru:s:default/{session}", "created", created)
                assert_problem(send(http, session, values[2:], offset=2), 409)
            assert http.post(f"/v1/sessions/{reset}/reset").status_code == 200
            assert send(http, reset, values[:3], offset=0).status_code == 200, created
            replaced = http.put(f"/v1/sessions/{imported}/state", content=document,
                                headers={"content-type": "application/octet-stream"})
            assert replaced.status_code == 200, replaced.text
            assert send(http, imported, values[:1], offset=4).status_code == 200, created
    assert "Traceback" not in server.log()


def test_an_import_replaces_a_damaged_record_whose_revision_is_not_utf8(
    server_factory: ServerFactory, redis_server: RedisServer
) -> None:
    """An import replaces a damaged session whatever bytes its revision holds. One that is not UTF-8 was read
    back altered (decoded with replacement characters), so the import's compare-and-set never matched it:
    429 "changed 8 times" without a precondition, 412 with If-Match: *, for as long as the record stayed."""
    server = server_factory(GRU_STORE="redis", GRU_REDIS_URL=redis_server.url)
    redis = redis_server.client()
    plain, guarded, donor = new_id("rev"), new_id("rev"), new_id("donor")
    for session in (plain, guarded):
        redis.hset(f"gru:s:default/{session}", mapping={"rev": b"\xff\xfe", "pos": "abc"})
    octet = {"content-type": "application/octet-stream"}
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert send(http, donor, series(4, seed=43), offset=0).status_code == 200
        document = http.get(f"/v1/sessions/{donor}/state").content
        imported = http.put(f"/v1/sessions/{plain}/state", content=document, headers=octet)
        assert imported.status_code == 200, imported.text
        replaced = http.put(f"/v1/sessions/{guarded}/state", content=document, headers={**octet, "If-Match": "*"})
        assert replaced.status_code == 200, replaced.text
        assert [position(http, session) for session in (plain, guarded)] == [4, 4]
    assert "Traceback" not in server.log()


def test_redis_refusing_writes_it_cannot_persist_is_503_then_recovers(
    server_factory: ServerFactory, redis_server: RedisServer
) -> None:
    """A Redis whose RDB save fails (a full or vanished disk) refuses writes with MISCONF until it can save
    again: that is the store being unavailable (503, Retry-After, not ready), not a 500."""
    server = server_factory(GRU_STORE="redis", GRU_REDIS_URL=redis_server.url)
    redis = redis_server.client()
    values, session = series(10, seed=42), new_id("misconf")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert send(http, session, values[:5], offset=0).status_code == 200
        redis.config_set("save", "3600 1")
        shutil.rmtree(redis_server.directory)  # the save's temporary file cannot be created
        redis.bgsave()
        _wait_until(lambda: redis.info("persistence")["rdb_last_bgsave_status"] == "err", "the save did not fail")
        refused = send(http, session, values[5:], offset=5)
        assert_problem(refused, 503)["type"].endswith("/store-unavailable")
        assert int(refused.headers["retry-after"]) > 0
        assert_problem(http.post(f"/v1/sessions/{session}/reset"), 503)
        assert_problem(http.get("/readyz"), 503)
        redis.config_set("save", "")  # nothing to persist: Redis takes writes again
        _wait_until(lambda: http.get("/readyz").status_code == 200, "not ready again")
        applied = send(http, session, values[5:], offset=5)
        assert applied.status_code == 200 and applied.json()["position"] == 10, applied.text
    assert "Traceback" not in server.log()


def test_redis_busy_with_another_clients_script_is_503_then_recovers(
    server_factory: ServerFactory, redis_server: RedisServer
) -> None:
    """A script of another client that runs past busy-reply-threshold makes Redis answer BUSY to everyone
    until it ends: 503 while it lasts, not a 500."""
    server = server_factory(GRU_STORE="redis", GRU_REDIS_URL=redis_server.url)
    redis = redis_server.client()
    redis.config_set("busy-reply-threshold", 50)
    values, session = series(10, seed=43), new_id("busy")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert send(http, session, values[:5], offset=0).status_code == 200
        blocker = redis_server.client()

        def spin() -> None:
            with contextlib.suppress(ResponseError):  # "Script killed by user"
                blocker.eval("while true do end", 0)

        spinning = threading.Thread(target=spin)
        spinning.start()

        def busy() -> bool:
            try:
                redis.ping()
            except ResponseError as exc:
                return str(exc).startswith("BUSY")
            return False

        try:
            _wait_until(busy, "the script did not make Redis busy")
            refused = send(http, session, values[5:], offset=5)
            assert_problem(refused, 503)["type"].endswith("/store-unavailable")
            assert int(refused.headers["retry-after"]) > 0
        finally:
            redis.script_kill()
            spinning.join(10)
        _wait_until(lambda: http.get("/readyz").status_code == 200, "not ready again")
        applied = send(http, session, values[5:], offset=5)
        assert applied.status_code == 200 and applied.json()["position"] == 10, applied.text
    assert "Traceback" not in server.log()


# A primary with min-replicas-to-write whose replicas are gone refuses writes with NOREPLICAS, as a
#    Redis that cannot persist refuses them with MISCONF: the store is unavailable (503), not a bug (500).
def test_redis_refusing_writes_for_want_of_replicas_is_503_not_500(
    server_factory: ServerFactory, redis_server: RedisServer
) -> None:
    server = server_factory(GRU_STORE="redis", GRU_REDIS_URL=redis_server.url)
    redis = redis_server.client()
    values, session = series(10, seed=71), new_id("norepl")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert send(http, session, values[:5], offset=0).status_code == 200
        redis.config_set("min-replicas-to-write", 1)  # no replica is connected: every write is refused
        refused = send(http, session, values[5:], offset=5)
        assert_problem(refused, 503)  # got: 500 internal-error (ResponseError NOREPLICAS escaped)
        assert_problem(http.post(f"/v1/sessions/{session}/reset"), 503)


# docs/durability.md: "With noeviction, every chunk gets 503 (nothing written) while memory is full." The
#    commit and reset scripts DEL the key before HSET for a new session; DEL is a write without the deny-oom
#    flag, after which Redis lets the rest of the script write past maxmemory.
def test_a_full_noeviction_redis_writes_nothing_new_sessions_and_resets_included(redis_server: RedisServer) -> None:
    async def scenario() -> None:
        store = RedisStore(redis_server.url, STATE, ttl_seconds=60)
        redis = redis_server.client()
        try:
            old, = await store.commit([write("t/old", None, 1)], torch.ones(1, STATE))
            assert old is not None
            redis.config_set("maxmemory-policy", "noeviction")
            redis.config_set("maxmemory", 1)  # full
            with pytest.raises(StoreUnavailable):  # an existing session alone: refused, as documented
                await store.commit([write("t/old", old.revision, 2)], torch.ones(1, STATE))
            with pytest.raises(StoreUnavailable):  # both were written, 400 KB past maxmemory
                await store.commit([write("t/new", None, 1, answer=b"x" * 200_000),
                                    write("t/old", old.revision, 2, row=1, answer=b"y" * 200_000)],
                                   torch.ones(2, STATE))
            with pytest.raises(StoreUnavailable):
                await store.reset("t/other", "v1")
            redis.config_set("maxmemory", 0)
            assert [s.position if s else None for s in await store.load(["t/new", "t/old", "t/other"])] == [
                None, 1, None]
        finally:
            redis.config_set("maxmemory", 0)
            await store.close()

    asyncio.run(scenario())


# A key under the prefix whose name is not UTF-8 (another program's garbage) makes version_counts raise
#    UnicodeDecodeError: GET /v1/models is a 500, and the registry's drain never counts sessions again.
def test_a_key_under_the_prefix_with_a_non_utf8_name_does_not_break_the_model_list(
    server_factory: ServerFactory, redis_server: RedisServer
) -> None:
    server = server_factory(GRU_STORE="redis", GRU_REDIS_URL=redis_server.url)
    redis_server.client().hset(b"gru:s:\xff\xfe/x", mapping={"rev": "r", "ver": "v"})
    with httpx.Client(base_url=server.url, timeout=30) as http:
        listed = http.get("/v1/models")
        assert listed.status_code == 200, listed.text  # got: 500
    assert "Traceback" not in server.log()


# A damaged record whose timestamp parses as a float but is not a time (nan, inf, 1e300) reads as a valid
#    session: GET /v1/sessions/{id} is a 500 (datetime.fromtimestamp), where a damaged record is a 409.
def test_a_record_with_a_nan_timestamp_is_no_500(server_factory: ServerFactory, redis_server: RedisServer) -> None:
    server = server_factory(GRU_STORE="redis", GRU_REDIS_URL=redis_server.url)
    session = new_id("nan")
    redis_server.client().hset(f"gru:s:default/{session}",
                               mapping={"rev": "r", "pos": 1, "ver": "v", "created": "nan", "updated": "1e300"})
    with httpx.Client(base_url=server.url, timeout=30) as http:
        info = http.get(f"/v1/sessions/{session}")
        assert info.status_code in (200, 409), info.text  # got: 500
    assert "Traceback" not in server.log()


# The store's connections retry a command once after a lost reply ("the scripts are idempotent"), but
#    delete is a bare DEL: run, reply lost, and the retry deletes whatever was written in between. Here a
#    chunk creates the session again (and would be answered 200) before the DEL's retry arrives: the retry
#    wipes that acknowledged chunk. (A reset's or a commit's retry is guarded by the record's ``past``.)
def test_a_delete_retried_after_a_lost_reply_does_not_delete_a_session_created_since(
    redis_server: RedisServer,
) -> None:
    key, target = "t/d", b"gru:s:t/d"
    deleting = hashlib.sha1(_DELETE.encode()).hexdigest()  # how the delete's command names its script

    async def scenario() -> None:
        direct = RedisStore(redis_server.url, STATE, ttl_seconds=60)  # another replica
        created: list[object] = []

        async def recreate() -> None:  # the other replica's chunk at offset 0, committed and answered
            session, = await direct.commit([write(key, None, 3)], torch.ones(1, STATE))
            created.append(session)

        dropped = asyncio.Event()

        async def relay(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", redis_server.port)
            sent_del = asyncio.Event()

            async def up() -> None:
                while data := await client_r.read(65536):
                    if (b"DEL" in data or deleting.encode() in data) and target in data and not dropped.is_set():
                        sent_del.set()  # a bare DEL, as before, or the delete script by its SHA1
                    server_w.write(data)
                    await server_w.drain()
                server_w.close()

            async def down() -> None:
                while data := await server_r.read(65536):
                    if sent_del.is_set() and not dropped.is_set() and data.startswith(b":1"):  # it ran; reply lost
                        dropped.set()
                        await recreate()
                        client_w.transport.abort()
                        server_w.close()
                        return
                    client_w.write(data)
                    await client_w.drain()
                client_w.close()

            await asyncio.gather(up(), down(), return_exceptions=True)

        proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
        port = proxy.sockets[0].getsockname()[1]
        store = RedisStore(f"redis://127.0.0.1:{port}/0", STATE, ttl_seconds=60)
        try:
            assert (await store.commit([write(key, None, 1)], torch.ones(1, STATE)))[0] is not None
            await store.delete(key)  # the client's DELETE, answered 204 (or 404): either way it is done
            assert dropped.is_set() and created and created[0] is not None  # the new session was acknowledged
            alive, = await direct.load([key])
            assert alive is not None and alive.position == 3  # got: None, the retried DEL removed it
        finally:
            await store.close()
            await direct.close()
            proxy.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("chunks", [1, PAST_REVISIONS + 1], ids=["one-chunk", "past-the-history"])
def test_a_delete_deletes_the_session_however_many_chunks_it_took_while_it_ran(redis_server: RedisServer,
                                                                               chunks: int) -> None:
    """Delete reads the revision, then deletes that session only. Chunks of it committed in between (another
    replica's) changed the revision: with one, the DELETE was answered 204 and the session lived on at its new
    position; with one more than the PAST_REVISIONS a record keeps (another replica streaming while this one's
    event loop was busy), the revision read was out of that history, with the same result."""
    key = f"t/busy-{chunks}"

    async def scenario() -> None:
        store = RedisStore(redis_server.url, STATE, ttl_seconds=60)
        other = RedisStore(redis_server.url, STATE, ttl_seconds=60)  # another replica
        try:
            first, = await store.commit([write(key, None, 1)], torch.ones(1, STATE))
            assert first is not None
            read_revision = store._revision_of

            async def then_chunks(**arguments: Any) -> Any:  # the revision is read, then chunks commit
                revision = await read_revision(**arguments)
                latest = first.revision
                for position in range(2, chunks + 2):
                    written, = await other.commit([write(key, latest, position)], torch.ones(1, STATE))
                    assert written is not None
                    latest = written.revision
                return revision

            store._revision_of = then_chunks  # type: ignore[assignment]
            assert await store.delete(key)
            assert (await other.load([key]))[0] is None  # got: the session at position chunks + 1
        finally:
            await store.close()
            await other.close()

    asyncio.run(scenario())


def test_a_delete_at_a_revision_retried_after_a_lost_reply_says_it_deleted(redis_server: RedisServer) -> None:
    """A DELETE with If-Match runs the delete script at the revision its tag was compared at; the reply is
    lost and the connection runs the script again (its one retry). The retry found the session gone and said
    it had not deleted it: the client got 412 "absent ... nothing was changed" for a delete that was done."""
    key = "t/lost"

    async def scenario() -> None:
        store = RedisStore(redis_server.url, STATE, ttl_seconds=60)
        try:
            first, = await store.commit([write(key, None, 1)], torch.ones(1, STATE))
            assert first is not None
            deleting = store._delete

            async def reply_lost(**arguments: Any) -> Any:  # it runs, then the connection's retry runs it again
                await deleting(**arguments)
                return await deleting(**arguments)

            store._delete = reply_lost  # type: ignore[assignment]
            assert await store.delete(key, first.revision)  # got: False, read as a precondition failed
            assert await store.get(key) is None
        finally:
            await store.close()

    asyncio.run(scenario())
