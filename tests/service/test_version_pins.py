"""Pins to older versions, one loaded version, state imports against the drain (in-process and real servers)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

import service.models
from service.config import Settings
from service.metrics import Metrics
from service.models import Registry
from service.refusals import Refusal, StaleModel
from service.repository import Repository
from service.session_state import Precondition, SessionStates
from tests.conftest import ServerFactory
from tests.service.helpers import assert_problem, new_id, send, series
from tests.service.test_model_lifecycle import (
    LONG,
    _computing,
    _in_process_registry,
    _position_or_refusal,
    _warm_version_2,
    add_version,
    polled_repository,
    versions,
    wait_for,
)


def test_a_pin_that_keeps_chunks_in_order_is_not_evicted_by_the_pins_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new session's first chunk waits at version 1 (busy with another session's long chunk) as version 2
    is listed: ``ServedModel.add`` pins the session to version 1. Other sessions are then routed to version 1
    until the pins pass their cap (MAX_PINS, made small here). The cap evicted the oldest pin, this one, and
    the session's second chunk went to version 2, created the session there and the first applied on top
    of it (positions 16, 8). A pin whose session has chunks at its version is kept."""
    monkeypatch.setattr(service.models, "MAX_PINS", 2)
    registry = _in_process_registry(tmp_path)
    busy = series(LONG, seed=4)
    chunks = series(16, seed=5).reshape(2, 8, 1)
    others = [f"t/o{i}" for i in range(3)]

    async def scenario() -> list[Any]:
        await registry.start()
        model = registry.models["m"]
        first = model.engine
        for key in others:  # sessions living on version 1
            await first.predict(key, chunks[0], 0, 0)
        list_version_2 = await _warm_version_2(registry)
        other = first.enqueue("t/busy", busy, None, 0)
        while first.queue:  # taken: computing
            await asyncio.sleep(0.001)
        early = first.enqueue("t/s", chunks[0], None, 0)  # waits behind it at version 1
        list_version_2()  # pins t/busy and t/s to version 1
        assert model.engine_for("t/s") is first
        routed = [model.engine.enqueue(key, chunks[1], 8, 0) for key in others]  # at the newest, routed on
        while len(first.queue) < 1 + len(others):  # routed to version 1 (and pinned there), behind t/s
            await asyncio.sleep(0.001)
        late = model.engine_for("t/s").enqueue("t/s", chunks[1], None, 0)
        await asyncio.wait({other, early, late, *routed})
        await registry.stop()
        return [_position_or_refusal(early), _position_or_refusal(late),
                *(_position_or_refusal(f) for f in routed)]

    assert asyncio.run(scenario()) == [8, 16, 16, 16, 16]


def test_with_one_loaded_version_a_new_version_gives_the_old_sessions_409_model_changed(tmp_path: Path) -> None:
    """GRU_MAX_LOADED_VERSIONS=1: version 2 replaces version 1 at once. A session on version 1, including one
    with a chunk waiting at version 1's engine as it goes, gets 409 model-changed (README, "Pin"), no 500, no
    hang, no silent restart; a reset then starts it on version 2."""
    registry = _in_process_registry(tmp_path, max_loaded_versions=1)
    busy = series(LONG, seed=4)
    chunks = series(16, seed=5).reshape(2, 8, 1)

    async def scenario() -> list[Any]:
        await registry.start()
        model = registry.models["m"]
        first = model.engine
        await first.predict("t/a", chunks[0], 0, 0)
        await first.predict("t/b", chunks[0], 0, 0)
        other = first.enqueue("t/busy", busy, 0, 0)
        while first.queue:
            await asyncio.sleep(0.001)
        waiting = first.enqueue("t/b", chunks[1], 8, 0)  # at version 1 as it is unloaded
        add_version(registry.repository.root, "m", 2, seed=1)
        await asyncio.wait_for(registry.poll(), 60)
        assert sorted(model.versions) == [2]
        after = model.engine_for("t/a").enqueue("t/a", chunks[1], 8, 0)
        await asyncio.wait({other, waiting, after}, timeout=60)
        await model.engine.reset("t/a")
        again = await model.engine_for("t/a").predict("t/a", chunks[0], 0, 0)
        await registry.stop()
        return [_position_or_refusal(waiting), _position_or_refusal(after), json.loads(again)["version"]]

    waiting, after, version = asyncio.run(scenario())
    for outcome in (waiting, after):
        assert isinstance(outcome, str) and outcome.startswith("StaleModel"), outcome
    assert version == "2"


def test_with_one_loaded_version_a_served_session_gets_409_then_resets_onto_the_new_one(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    repository, server = polled_repository(server_factory, tmp_path, GRU_MAX_LOADED_VERSIONS="1")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        session = new_id()
        assert send(client, session, series(3)).json()["version"] == "1"
        add_version(repository, "m", 2, seed=1)
        wait_for(lambda: list(versions(client, "m")) == ["2"])
        stale = assert_problem(send(client, session, series(3, seed=1), offset=3), 409)
        assert stale["type"].endswith("model-changed") and "reset" in stale["detail"]
        assert client.post(f"/v1/sessions/{session}/reset").status_code in (200, 201)
        assert send(client, session, series(3, seed=1), offset=0).json()["version"] == "2"


def test_an_exact_retry_of_a_chunk_answered_by_an_unloaded_version_gets_its_answer(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """GRU_MAX_LOADED_VERSIONS=1: a client lost the answer to a session's last chunk, applied by version 1, and
    resends it after version 2 replaced version 1. The exact retry got 409 model-changed, though it needs no
    model (its answer is kept with the session) and "a retry with the same offset is always safe": the answer
    was lost for good. It gets that answer, byte for byte; the next chunk is the 409 that says to reset."""
    repository, server = polled_repository(server_factory, tmp_path, GRU_MAX_LOADED_VERSIONS="1")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        session = new_id()
        first = send(client, session, series(3), offset=0)
        assert first.json()["version"] == "1"
        add_version(repository, "m", 2, seed=1)
        wait_for(lambda: list(versions(client, "m")) == ["2"])
        retried = send(client, session, series(3), offset=0)
        assert (retried.status_code, retried.content) == (200, first.content), retried.text
        stale = assert_problem(send(client, session, series(3, seed=1), offset=3), 409)
        assert stale["type"].endswith("model-changed")


def test_an_import_onto_a_draining_version_during_a_drain_keeps_that_version(tmp_path: Path) -> None:
    """Versions 1 and 2 drain (no session) while 3 serves. The drain counts sessions, then unloads version 1
    (an await: its engine finishes) and then version 2 on the same count. A state document of version 2 is
    imported (PUT .../state) in between: version 2 was unloaded under the session just imported, answered
    201, whose next chunk then got 409 model-changed. A version an import wrote to since the count is kept
    for the next count."""
    registry = _in_process_registry(tmp_path, max_loaded_versions=3)
    chunks = series(16, seed=5).reshape(2, 8, 1)

    async def scenario() -> Any:
        await registry.start()
        model = registry.models["m"]
        await model.engine.predict("t/one", chunks[0], 0, 0)  # keeps version 1 loaded until deleted
        (await _warm_version_2(registry))()
        await model.engine.predict("t/s", chunks[0], 0, 0)  # on version 2
        document = await SessionStates(model).export("t/s")
        add_version(registry.repository.root, "m", 3, seed=2)
        await registry.poll()
        assert sorted(model.versions) == [1, 2, 3]
        await model.store.delete("t/one")
        await model.store.delete("t/s")
        draining = asyncio.ensure_future(registry.refresh_counts())
        while 1 in model.versions and not draining.done():  # counted; version 1 going
            await asyncio.sleep(0)
        assert not draining.done()
        written = await SessionStates(model).put("t/s", document, Precondition())
        assert written.created
        await draining
        listed = sorted(model.versions)
        chunk = model.engine_for("t/s").enqueue("t/s", chunks[1], 8, 0)
        await asyncio.wait({chunk})
        await registry.stop()
        return listed, _position_or_refusal(chunk)

    assert asyncio.run(scenario()) == ([2, 3], 16)


def test_an_import_of_a_version_no_longer_loaded_is_refused_with_409(tmp_path: Path) -> None:
    """The other order: once the drain unloaded version 2, its document is refused (409), nothing imported."""
    registry = _in_process_registry(tmp_path, max_loaded_versions=3)
    chunks = series(8, seed=5).reshape(1, 8, 1)

    async def scenario() -> Any:
        await registry.start()
        model = registry.models["m"]
        (await _warm_version_2(registry))()
        await model.engine.predict("t/s", chunks[0], 0, 0)
        document = await SessionStates(model).export("t/s")
        add_version(registry.repository.root, "m", 3, seed=2)
        await registry.poll()
        await model.store.delete("t/s")
        await registry.refresh_counts()
        assert sorted(model.versions) == [3]
        try:
            await SessionStates(model).put("t/s", document, Precondition())
        except StaleModel as refused:
            outcome: Any = refused.status if hasattr(refused, "status") else "StaleModel"
        else:
            outcome = "imported"
        present = await model.store.get("t/s")
        await registry.stop()
        return outcome, present

    outcome, present = asyncio.run(scenario())
    assert outcome != "imported" and present is None


@pytest.mark.parametrize("at_work", [False, True], ids=["waiting", "computing"])
def test_with_one_loaded_version_a_new_session_s_chunks_keep_their_order_across_an_update(
    tmp_path: Path, at_work: bool
) -> None:
    """GRU_MAX_LOADED_VERSIONS=1: a new session appending without offsets has its first chunk at version 1
    (waiting behind another session's long chunk, or computing) as a poll lists version 2, which unloads
    version 1 at once; the session sends its second chunk once version 2 serves. The second went to
    version 2 and created the session there, and the first applied on top of it (positions 16, 8; the
    computing one lost its creation, was judged again and applied after). Now the second queues behind the
    first wherever it is: waiting, both move on to version 2 in order; computing, the first creates the
    session on version 1 as it goes (GRU_MAX_LOADED_VERSIONS unloads whatever a version holds) and the
    second gets 409 model-changed, as that version's sessions do."""
    registry = _in_process_registry(tmp_path, max_loaded_versions=1)
    busy = series(LONG, seed=4)
    chunks = series(LONG + 8 if at_work else 16, seed=5)
    first_chunk, second_chunk = chunks[:-8], chunks[-8:]

    async def scenario() -> list[Any]:
        await registry.start()
        model = registry.models["m"]
        first = model.engine
        waits = []
        if not at_work:
            waits.append(first.enqueue("t/busy", busy, None, 0))
            while first.queue:
                await asyncio.sleep(0.001)
        early = first.enqueue("t/s", first_chunk, None, 0)
        while at_work and first.queue:
            await asyncio.sleep(0.001)
        add_version(registry.repository.root, "m", 2, seed=1)
        polling = asyncio.ensure_future(registry.poll())
        while model.newest.number == 1 and not polling.done():
            await asyncio.sleep(0.001)
        late = model.engine_for("t/s").enqueue("t/s", second_chunk, None, 0)
        await asyncio.wait({*waits, early, late, polling})
        await registry.stop()
        return [_position_or_refusal(early), _position_or_refusal(late)]

    early, late = asyncio.run(scenario())
    assert early == len(first_chunk)
    if at_work:
        assert isinstance(late, str) and late.startswith("StaleModel"), late
    else:
        assert late == len(chunks)


def test_a_session_a_draining_version_creates_while_the_drain_counts_keeps_that_version(tmp_path: Path) -> None:
    """A new session's first chunk is computing on version 1 as version 2 is listed. A drain counts
    sessions, and the count takes a while (a Redis SCAN over many keys), during which version 1's engine
    commits the chunk, creating the session on version 1: the count, begun before, missed it, and version 1,
    no longer holding a chunk when the count came back, was unloaded under it; the session's next chunk got
    409 model-changed. A version that committed since the count began is kept for the next count, as one a
    state import wrote to is."""
    registry = _in_process_registry(tmp_path)
    values = series(LONG + 8, seed=3)

    async def scenario() -> Any:
        model, first = await _computing(registry, "t/s", values[:LONG])
        (await _warm_version_2(registry))()
        count = model.raw_store.version_counts

        async def slow_count(tenant: str | None = None) -> dict[str, int]:
            counted = await count(tenant)  # what the scan saw, before the chunk committed
            await asyncio.wait({first})  # the scan goes on over the other keys meanwhile
            return counted

        model.raw_store.version_counts = slow_count  # type: ignore[method-assign]
        await registry.refresh_counts()
        model.raw_store.version_counts = count  # type: ignore[method-assign]
        listed = sorted(model.versions)
        second = model.engine_for("t/s").enqueue("t/s", values[LONG:], LONG, 0)
        await asyncio.wait({second})
        await registry.stop()
        return listed, _position_or_refusal(first), _position_or_refusal(second)

    assert asyncio.run(scenario()) == ([1, 2], LONG, LONG + 8)


def _two_replicas(repository: Path, redis_url: str, **settings: Any) -> tuple[Registry, Registry]:
    """Two replicas' registries on one Redis, opened on a repository holding version 1 of model "m"."""
    add_version(repository, "m", 1)
    both = Settings(model_repository=repository, device="cpu", store="redis", redis_url=redis_url, **settings)
    ahead, behind = (Registry(both, Repository(root=repository), torch.device("cpu"), Metrics()) for _ in "ab")
    ahead.open()
    behind.open()
    return ahead, behind


def test_a_replica_not_yet_polled_does_not_replay_a_session_back_onto_its_older_version(
    tmp_path: Path, redis_server: Any
) -> None:
    """Two replicas on one Redis with GRU_UPGRADE=replay; one has polled and loaded version 2, the other not
    yet. A session's chunk on the first moves it to version 2; its next chunk, on the second, was replayed
    back onto version 1 there ("upgraded": true, version 1), and would move forward again on the first: the
    session's state was rebuilt from its kept values at every switch of replica. The lagging replica now
    refuses it with a 503 to retry (elsewhere, or once it has the version), and leaves it on version 2."""
    repository = tmp_path / "repo"
    ahead, behind = _two_replicas(repository, redis_server.url, repository_poll_seconds=0, upgrade="replay")
    chunks = series(24, seed=5).reshape(3, 8, 1)

    async def scenario() -> Any:
        await ahead.start()
        await behind.start()
        await behind.models["m"].engine.predict("t/s", chunks[0], 0, 0)  # on version 1
        add_version(repository, "m", 2, seed=1)
        await ahead.poll()
        moved = json.loads(await ahead.models["m"].engine.predict("t/s", chunks[1], 8, 0))
        try:
            outcome: Any = json.loads(await behind.models["m"].engine.predict("t/s", chunks[2], 16, 0))
        except Refusal as refused:
            outcome = (type(refused).__name__, refused.retry_after is not None)
        kept = await ahead.models["m"].store.get("t/s")
        await behind.poll()  # the version is there now: the session goes on
        later = json.loads(await behind.models["m"].engine.predict("t/s", chunks[2], 16, 0))
        await ahead.stop()
        await behind.stop()
        assert kept is not None
        return ((moved["version"], moved.get("upgraded")), outcome,
                (kept.position, kept.model_version == ahead.models["m"].newest.model_version),
                (later["version"], later["position"]))

    moved, outcome, kept, later = asyncio.run(scenario())
    assert moved == ("2", True)
    assert isinstance(outcome, tuple) and outcome[1], outcome
    assert kept == (16, True)
    assert later == ("2", 24)


def test_a_replica_that_drained_a_version_serves_a_session_a_lagging_replica_starts_on_it(
    tmp_path: Path, redis_server: Any
) -> None:
    """Two replicas on one Redis (pin): the first polls, loads version 2 and drains version 1, which no session
    needs; the second, not polled yet, starts a session on version 1. That session's next chunk on the first
    was 409 model-changed, whose advice (reset) loses it, though the first's next poll loads version 1 again
    for it (a version sessions are pinned to). It is now a 503 to retry, and after the poll it goes on there."""
    repository = tmp_path / "repo"
    # polls on (the next one loads version 1 back), called here: none comes by itself within the hour
    ahead, behind = _two_replicas(repository, redis_server.url, repository_poll_seconds=3600)
    chunks = series(16, seed=7).reshape(2, 8, 1)

    async def scenario() -> Any:
        await ahead.start()
        await behind.start()
        add_version(repository, "m", 2, seed=1)
        await ahead.poll()  # version 2 loaded, version 1 drained: no session needs it
        drained = sorted(ahead.models["m"].versions)
        started = json.loads(await behind.models["m"].engine.predict("t/s", chunks[0], 0, 0))
        try:
            outcome: Any = json.loads(await ahead.models["m"].engine_for("t/s").predict("t/s", chunks[1], 8, 0))
        except Refusal as refused:
            outcome = (type(refused).__name__, refused.retry_after is not None)
        await ahead.poll()  # loads version 1 again for the session
        later = json.loads(await ahead.models["m"].engine_for("t/s").predict("t/s", chunks[1], 8, 0))
        await ahead.stop()
        await behind.stop()
        return drained, started["version"], outcome, (later["version"], later["position"])

    drained, started, outcome, later = asyncio.run(scenario())
    assert (drained, started) == ([2], "1")
    assert outcome == ("VersionNotLoaded", True), outcome
    assert later == ("1", 16)


def _v2_chunk(values: np.ndarray, **parameters: Any) -> dict[str, Any]:
    """A v2 infer body of ``values``, with the request ``parameters`` (sequence_id, sequence_start, ...)."""
    return {"inputs": [{"name": "values", "shape": list(values.shape), "datatype": "FP32",
                        "data": values.ravel().tolist()}], "parameters": parameters}


def _v2_infer(client: httpx.Client, version: str | None, body: dict[str, Any]) -> httpx.Response:
    """POST ``body`` to model m's infer, at ``/versions/{version}`` when a version is given."""
    return client.post("/v2/models/m/infer" if version is None else f"/v2/models/m/versions/{version}/infer",
                       json=body)


def _answered(response: httpx.Response) -> tuple[str, np.ndarray]:
    """A 200 infer answer's ``model_version`` and predictions."""
    assert response.status_code == 200, response.text
    answer = response.json()
    return answer["model_version"], np.array(answer["outputs"][0]["data"])


def test_a_version_in_a_v2_url_runs_a_stateless_call_and_a_sequence_runs_on_the_version_that_built_it(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """docs/interop.md, "Versions in the URL": a stateless call runs on the version its URL names; a sequence
    starts on the newest version, as every new session does (a version is draining once a newer one serves),
    and runs on the version that built it, whichever version's infer its chunks are sent to. The answer's
    ``model_version`` names the version that ran the chunk. A URL naming a version not loaded (unloaded
    mid-sequence included) is a 404; a sequence whose version was unloaded is 409 model-changed."""
    repository, server = polled_repository(server_factory, tmp_path, GRU_MAX_LOADED_VERSIONS="2")
    values = series(6)
    head, tail = values[:3], values[3:]
    old, new = new_id(), new_id()
    with httpx.Client(base_url=server.url, timeout=30) as client:
        h1, _ = _answered(_v2_infer(client, None, _v2_chunk(head, sequence_id=old, sequence_start=True)))
        add_version(repository, "m", 2, seed=1)
        wait_for(lambda: "2" in versions(client, "m"))  # version 1 stays, draining, for the sequence on it
        h2 = versions(client, "m")["2"]["model_version"]
        alone = {v: _answered(_v2_infer(client, v, _v2_chunk(values))) for v in ("1", "2")}
        assert [alone[v][0] for v in ("1", "2")] == [h1, h2] and h1 != h2
        started = _answered(_v2_infer(client, "1", _v2_chunk(head, sequence_id=new, sequence_start=True)))
        continued = _answered(_v2_infer(client, "1", _v2_chunk(tail, sequence_id=new)))
        assert started[0] == continued[0] == h2  # started on the newest, and stays there
        np.testing.assert_allclose(np.concatenate([started[1], continued[1]]), alone["2"][1], atol=1e-5)
        kept = _answered(_v2_infer(client, "2", _v2_chunk(tail, sequence_id=old)))
        assert kept[0] == h1  # version 1 built it: sent to version 2's infer, it still runs there
        np.testing.assert_allclose(kept[1], alone["1"][1][3:], atol=1e-5)

        add_version(repository, "m", 3, seed=2)  # beyond GRU_MAX_LOADED_VERSIONS=2: version 1 goes
        wait_for(lambda: list(versions(client, "m")) == ["3", "2"])
        gone = assert_problem(_v2_infer(client, "1", _v2_chunk(tail, sequence_id=old, offset=6)), 404)
        assert "no version '1' loaded" in gone["detail"]
        stale = assert_problem(_v2_infer(client, None, _v2_chunk(tail, sequence_id=old, offset=6)), 409)
        assert stale["type"].endswith("model-changed") and "sequence_start=true" in stale["detail"]
        assert _answered(_v2_infer(client, "3", _v2_chunk(tail, sequence_id=new)))[0] == h2
