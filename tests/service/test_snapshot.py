"""Snapshots of the memory store: the file format in process, then graceful and hard restarts of a server.

The memory store itself is tested in test_memory_store.py.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from service.sessions.base import Write
from service.sessions.memory import MemoryStore
from service.sessions.snapshot import restore, save, snapshot_model
from service.snapshots import follow_the_default
from tests.conftest import ServerFactory, refused_start_log
from tests.service.helpers import Clock, assert_problem, new_id, position, send, series, stateless
from tests.service.stores import STATE, memory_store, write
from tests.service.test_model_lifecycle import metric, sample, wait_for


def _fill(store: MemoryStore) -> torch.Tensor:
    """Three sessions with states and answers, one reset (no state row), in a known recency order."""
    states = torch.randn(3, STATE)

    async def run() -> None:
        writes = [Write(f"t/s{i}", None, 3 + i, "v1", i, bytes([i]) * 16, f'{{"answer":{i}}}'.encode(), i)
                  for i in range(3)]
        assert all(await store.commit(writes, states))
        await store.reset("t/fresh", "v1")

    asyncio.run(run())
    return states


def test_snapshot_round_trip_keeps_every_record_and_state(tmp_path: Path) -> None:
    store = memory_store()
    states = _fill(store)
    path = tmp_path / "sessions.safetensors"
    assert asyncio.run(save(store, path, "v1")) == 4
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    restored = memory_store()
    assert restore(restored, path, "v1", STATE) == 4
    assert [s.key for s in restored.records()] == [s.key for s in store.records()]  # recency order kept
    for before, after in zip(store.records(), restored.records(), strict=True):
        fields = ("position", "model_version", "last_offset", "fingerprint", "answer", "created_at",
                  "updated_at")
        assert [getattr(after, f) for f in fields] == [getattr(before, f) for f in fields]
    got = restored.gather(restored.records())
    torch.testing.assert_close(got, torch.cat([states, torch.zeros(1, STATE)]))


def test_snapshot_of_an_empty_store_round_trips(tmp_path: Path) -> None:
    """No sessions means no answer bytes at all: still a valid snapshot (a fresh service stopped at once)."""
    path = tmp_path / "sessions.safetensors"
    assert asyncio.run(save(memory_store(), path, "v1")) == 0
    restored = memory_store()
    assert restore(restored, path, "v1", STATE) == 0
    assert restored.records() == []


def test_restore_drops_expired_sessions_and_keeps_the_newest_at_capacity(tmp_path: Path) -> None:
    store = memory_store()
    _fill(store)
    path = tmp_path / "snap"
    asyncio.run(save(store, path, "v1"))
    small = memory_store(max_sessions=2)
    assert restore(small, path, "v1", STATE) == 2
    assert [s.key for s in small.records()] == ["t/s2", "t/fresh"]
    later = memory_store(ttl_seconds=10.0)
    assert restore(later, path, "v1", STATE, clock=lambda: time.time() + 60) == 0


def test_restore_from_a_larger_answer_budget_keeps_the_newest_within_it(tmp_path: Path) -> None:
    """A snapshot written under a larger GRU_MAX_ANSWER_BYTES loses its least recently used on restore."""
    big = memory_store()
    for key in ("t/x", "t/y", "t/z"):
        asyncio.run(big.commit([write(key, None, 1, answer=b"a" * 40)], torch.zeros(1, STATE)))
    path = tmp_path / "snap"
    asyncio.run(save(big, path, "v1"))
    small = memory_store(max_answer_bytes=100)
    assert restore(small, path, "v1", STATE) == 2
    assert [s.key for s in small.records()] == ["t/y", "t/z"]


def test_restore_keeps_a_session_whose_one_answer_is_over_the_budget(tmp_path: Path) -> None:
    """While serving, a session whose one answer passes GRU_MAX_ANSWER_BYTES is kept, alone (its chunk was
    answered); the restore's trim, keeping none, dropped it: a graceful restart lost an acknowledged chunk."""
    store = memory_store(max_answer_bytes=100)
    for key in ("t/x", "t/big"):
        asyncio.run(store.commit([write(key, None, 1, answer=b"a" * (40 if key == "t/x" else 150))],
                                 torch.zeros(1, STATE)))
    assert [s.key for s in store.records()] == ["t/big"]  # serving keeps it alone
    path = tmp_path / "snap"
    asyncio.run(save(store, path, "v1"))
    restored = memory_store(max_answer_bytes=100)
    assert restore(restored, path, "v1", STATE) == 1
    assert [s.key for s in restored.records()] == ["t/big"]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_snapshot_is_set_aside_with_a_log_line(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = memory_store()
    _fill(store)
    path = tmp_path / "snap"
    asyncio.run(save(store, path, "v1"))
    data = path.read_bytes()
    damaged = {"garbage": b"\x00not a snapshot" * 50, "truncated": data[: len(data) - 40], "empty": b""}
    path.write_bytes(damaged[damage])
    fresh = memory_store()
    with caplog.at_level(logging.WARNING, "service.snapshot"):
        assert restore(fresh, path, "v1", STATE) == 0
    assert len(fresh) == 0 and not path.exists()
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == ["snap.corrupt"]
    assert "snapshot is corrupt" in caplog.text


@pytest.mark.parametrize(("version", "state_size"), [("other-model", STATE), ("v1", STATE + 1)])
def test_snapshot_of_other_model_or_size_is_set_aside(tmp_path: Path, version: str, state_size: int) -> None:
    store = memory_store()
    _fill(store)
    path = tmp_path / "snap"
    asyncio.run(save(store, path, "v1"))
    other = MemoryStore(state_size, torch.device("cpu"), 100, 3600.0)
    assert restore(other, path, version, state_size) == 0
    assert len(other) == 0 and [p.name.split("-")[0] for p in tmp_path.iterdir()] == ["snap.incompatible"]


def test_a_default_switch_moves_each_file_to_its_models_path_and_leaves_files_naming_none(tmp_path: Path) -> None:
    """GRU_DEFAULT_MODEL a -> b: a's file at GRU_SNAPSHOT_PATH goes to a's own path, over a file left there
    before (older: a wrote GRU_SNAPSHOT_PATH since), and b's own file to GRU_SNAPSHOT_PATH. A file of an
    earlier release names no model: it stays, the default's by its path (test_model_lifecycle.py restarts
    real servers across such switches)."""
    base, own = tmp_path / "sessions.safetensors", {m: tmp_path / f"sessions.{m}.safetensors" for m in "ab"}
    store = memory_store()
    _fill(store)
    asyncio.run(save(memory_store(), own["a"], "v1", "a"))  # left from when a was not the default
    asyncio.run(save(store, base, "v1", "a"))
    asyncio.run(save(memory_store(), own["b"], "v1", "b"))
    follow_the_default(base, "b")
    assert (snapshot_model(base), snapshot_model(own["a"]), own["b"].exists()) == ("b", "a", False)
    assert restore(memory_store(), own["a"], "v1", STATE) == 4  # the newer of a's two files
    asyncio.run(save(store, base, "v1"))  # an earlier release's
    follow_the_default(base, "a")
    assert snapshot_model(base) is None and snapshot_model(own["a"]) == "a"


# -- real servers --------------------------------------------------------------------------------------


def test_sigterm_while_eight_clients_append_loses_no_acknowledged_chunk(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    path = tmp_path / "state" / "sessions.safetensors"
    first = server_factory(GRU_SNAPSHOT_PATH=str(path))
    clients, size, steps = 8, 3, 6000
    ids = [new_id() for _ in range(clients)]
    data = [series(steps, seed=20 + i) for i in range(clients)]
    acked = [0] * clients
    got: list[dict[int, list[Any]]] = [{} for _ in range(clients)]
    failures: list[str] = []

    def stream(i: int) -> None:
        with httpx.Client(base_url=first.url, timeout=30) as http:
            start = 0
            while start < steps:
                try:
                    response = send(http, ids[i], data[i][start : start + size], offset=start)
                except httpx.TransportError:
                    return  # the server stopped taking work: this chunk was not acknowledged
                if response.status_code != 200:
                    if response.status_code != 503:
                        failures.append(response.text)
                    return
                got[i][start] = response.json()["predictions"]
                start += size
                acked[i] = start

    workers = [threading.Thread(target=stream, args=(i,)) for i in range(clients)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 30
    while min(acked) < 10 * size:
        assert time.monotonic() < deadline, acked
        time.sleep(0.01)
    # uvicorn drains, runs the lifespan shutdown, then re-raises the signal: exit status -SIGTERM (or 0)
    assert first.stop(signal.SIGTERM) in (0, -signal.SIGTERM), first.log()
    assert "Application shutdown complete" in first.log()
    for worker in workers:
        worker.join(30)
    assert not failures, failures
    assert max(acked) < steps, "the clients finished before the SIGTERM; make the series longer"
    assert "snapshot written" in first.log()

    second = server_factory(GRU_SNAPSHOT_PATH=str(path))
    assert '"sessions":8,' in second.log().split("snapshot restored")[1].splitlines()[0]
    with httpx.Client(base_url=second.url, timeout=30) as http:
        for i in range(clients):
            assert position(http, ids[i]) >= acked[i]  # every acknowledged chunk survived the restart
            # Go on from the last answer this client saw: a chunk applied but never acknowledged comes back as
            # an exact retry, anything else applies; the whole stream must equal one stateless pass.
            end = acked[i] + 10 * size
            for start in range(acked[i], end, size):
                response = send(http, ids[i], data[i][start : start + size], offset=start)
                assert response.status_code == 200, response.text
                got[i][start] = response.json()["predictions"]
            predictions = np.concatenate([got[i][s] for s in range(0, end, size)])
            np.testing.assert_allclose(predictions, stateless(http, data[i][:end])["predictions"], atol=1e-5)


def test_sigterm_answers_a_chunk_still_waiting_for_its_batch_and_keeps_it(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    path = tmp_path / "sessions.safetensors"
    # A lone chunk waits up to a second for its batch to fill: it is surely in flight when SIGTERM comes.
    first = server_factory(GRU_SNAPSHOT_PATH=str(path), GRU_MAX_BATCH_DELAY_MS="1000")
    values = series(9, seed=40)
    session = new_id()
    answer: list[httpx.Response] = []
    with httpx.Client(base_url=first.url, timeout=30) as http:
        worker = threading.Thread(target=lambda: answer.append(send(http, session, values[:6], offset=0)))
        worker.start()
        time.sleep(0.5)  # the chunk is read and waiting in the engine (half of its batch delay left)
        assert first.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
        worker.join(10)
    assert answer and answer[0].status_code == 200, answer  # drained: answered, not dropped
    log = first.log()
    assert log.index('"status":200') < log.index("snapshot written")
    second = server_factory(GRU_SNAPSHOT_PATH=str(path))
    with httpx.Client(base_url=second.url, timeout=30) as http:
        assert position(http, session) == 6
        rest = send(http, session, values[6:], offset=6)
        got = answer[0].json()["predictions"] + rest.json()["predictions"]
        np.testing.assert_allclose(np.array(got), stateless(http, values)["predictions"], atol=1e-5)


def test_periodic_snapshot_survives_a_hard_kill(server_factory: ServerFactory, tmp_path: Path) -> None:
    path = tmp_path / "sessions.safetensors"
    first = server_factory(GRU_SNAPSHOT_PATH=str(path), GRU_SNAPSHOT_INTERVAL_SECONDS="0.2")
    values = series(20, seed=30)
    session = new_id()
    with httpx.Client(base_url=first.url, timeout=30) as http:
        answers = [send(http, session, values[:12], offset=0), send(http, session, values[12:16], offset=12)]
        assert all(r.status_code == 200 for r in answers)
        written = first.log().count("snapshot written")
        deadline = time.monotonic() + 10
        while first.log().count("snapshot written") < written + 2:  # one surely began after both chunks
            assert time.monotonic() < deadline, first.log()
            time.sleep(0.1)
    first.stop(signal.SIGKILL)
    second = server_factory(GRU_SNAPSHOT_PATH=str(path))
    with httpx.Client(base_url=second.url, timeout=30) as http:
        assert position(http, session) == 16
        retry = send(http, session, values[12:16], offset=12)
        assert retry.content == answers[1].content  # the exact retry survives the restart too
        last = send(http, session, values[16:], offset=16)
        assert last.status_code == 200
        got = answers[0].json()["predictions"] + answers[1].json()["predictions"] + last.json()["predictions"]
        np.testing.assert_allclose(np.array(got), stateless(http, values)["predictions"], atol=1e-5)


def test_files_set_aside_within_one_second_are_all_kept(tmp_path: Path) -> None:
    path = tmp_path / "sessions.safetensors"
    for n in range(3):  # a restart loop: each start finds a damaged file and sets it aside
        path.write_bytes(b"not a snapshot %d" % n)
        assert restore(memory_store(), path, "v1", STATE) == 0
    kept = sorted(p.read_bytes() for p in tmp_path.glob("sessions.safetensors.corrupt-*"))
    assert kept == [b"not a snapshot 0", b"not a snapshot 1", b"not a snapshot 2"]


def test_a_snapshot_interval_without_a_path_says_it_writes_nothing(server_factory: ServerFactory) -> None:
    """GRU_SNAPSHOT_INTERVAL_SECONDS alone (the path forgotten) was ignored without a word: an operator who
    meant periodic snapshots had none, and learnt it at the first restart."""
    server = server_factory(GRU_SNAPSHOT_INTERVAL_SECONDS="5")
    assert "GRU_SNAPSHOT_INTERVAL_SECONDS is ignored" in server.log()


def test_corrupt_snapshot_file_starts_empty_with_log_line(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    path = tmp_path / "sessions.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    server = server_factory(GRU_SNAPSHOT_PATH=str(path))
    assert "snapshot is corrupt, set aside" in server.log()
    assert not path.exists() and len(list(tmp_path.glob("sessions.safetensors.corrupt-*"))) == 1
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert_problem(http.get(f"/v1/sessions/{new_id()}"), 404)
        assert send(http, new_id(), series(5), offset=0).json()["created"] is True


@pytest.mark.parametrize("where", ["a directory", "an unwritable place"])
def test_a_snapshot_path_that_cannot_be_written_stops_start_up(tiny_model: Path, tmp_path: Path, where: str) -> None:
    """Found at shutdown instead, it would lose every session the snapshot is there to keep."""
    target = tmp_path if where == "a directory" else Path("/proc/gru.snapshot")  # procfs takes no new files
    log = refused_start_log(tiny_model, tmp_path, {"GRU_SNAPSHOT_PATH": str(target)})
    assert f"GRU_SNAPSHOT_PATH={target}" in log
    assert tmp_path.is_dir()  # not set aside as a "corrupt snapshot"


def _rewrite(path: Path, **replace: torch.Tensor) -> None:
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    save_file({**tensors, **replace}, str(path), metadata=metadata)


@pytest.mark.parametrize("damage", ["nan state", "row past the states"])
def test_a_snapshot_with_a_bad_state_or_row_is_set_aside_as_corrupt(tmp_path: Path, damage: str) -> None:
    """A NaN state restored as is fails every chunk of its session; a row one past the last passed the bound
    check and then stopped the start with an IndexError (a snapshot must never stop a start)."""
    store = memory_store()
    states = _fill(store)
    path = tmp_path / "snap"
    asyncio.run(save(store, path, "v1"))
    if damage == "nan state":
        states[0, 0] = float("nan")
        _rewrite(path, states=states)
    else:
        with safe_open(str(path), framework="pt") as file:
            entries = orjson.loads(file.get_tensor("index").numpy().tobytes())
        entries[0][9] = len(states)
        _rewrite(path, index=torch.frombuffer(bytearray(orjson.dumps(entries)), dtype=torch.uint8))
    fresh = memory_store()
    assert restore(fresh, path, "v1", STATE) == 0
    assert len(fresh) == 0 and [p.name.split("-")[0] for p in tmp_path.iterdir()] == ["snap.corrupt"]


def test_restore_keeps_a_session_created_long_ago_but_used_recently(tmp_path: Path) -> None:
    """Expiry on restore counts from the last use, as everywhere else: a deploy must not drop every session
    older than the TTL."""
    clock = Clock(0.0)
    store = memory_store(ttl_seconds=10.0, clock=clock)

    async def fill() -> None:
        first, = await store.commit([write("t/old", None, 1)], torch.zeros(1, STATE))
        assert first is not None
        clock.now = 8.0
        assert (await store.commit([write("t/old", first.revision, 2)], torch.zeros(1, STATE)))[0] is not None

    asyncio.run(fill())
    path = tmp_path / "snap"
    asyncio.run(save(store, path, "v1"))
    later = memory_store(ttl_seconds=10.0)
    assert restore(later, path, "v1", STATE, clock=lambda: 15.0) == 1  # used 7 s ago, made 15 s ago


def test_restore_keeps_a_session_kept_alive_by_chunks_that_wrote_nothing(tmp_path: Path) -> None:
    """A 409 or an exact retry refreshes a session's TTL without writing it (docs/durability.md, "Expiry
    detail"); a restart within the TTL of that refresh must keep the session, and its expiry with it."""
    clock = Clock(0.0)
    store = memory_store(ttl_seconds=10.0, clock=clock)

    async def fill() -> None:
        assert (await store.commit([write("t/kept", None, 1)], torch.zeros(1, STATE)))[0] is not None
        clock.now = 8.0
        await store.load(["t/kept"])  # a chunk judged 409 or an exact retry: read, not written

    asyncio.run(fill())
    path = tmp_path / "snap"
    asyncio.run(save(store, path, "v1"))
    later = memory_store(ttl_seconds=10.0, clock=lambda: 15.0)
    assert restore(later, path, "v1", STATE, clock=lambda: 15.0) == 1  # written 15 s ago, reached 7 s ago
    assert [s.last_used for s in later.records()] == [8.0]  # it expires at 18, as it would have without the restart


def test_a_snapshot_written_before_seen_times_were_kept_still_restores(tmp_path: Path) -> None:
    """A file without the ``seen`` tensor (the previous release's) is read, its sessions last used when
    last written: a deploy of this release keeps every session."""
    store = memory_store()
    _fill(store)
    path = tmp_path / "snap"
    asyncio.run(save(store, path, "v1"))
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
        tensors = {name: file.get_tensor(name) for name in file.keys() if name != "seen"}  # noqa: SIM118
    save_file(tensors, str(path), metadata=metadata)
    restored = memory_store()
    assert restore(restored, path, "v1", STATE) == 4
    assert [s.last_used for s in restored.records()] == [s.updated_at for s in store.records()]


def _end_sequences(store: MemoryStore, clock: Clock, keys: list[str]) -> None:
    """Each of ``keys`` a session ended (as a v2 sequence's end leaves it), 10 s after the one before."""

    async def run() -> None:
        for i, key in enumerate(keys):
            written, = await store.commit([write(key, None, 1, answer=f'{{"end":{i}}}'.encode())],
                                          torch.zeros(1, STATE))
            assert written is not None and await store.end(key, written.revision)
            clock.now += 10

    asyncio.run(run())


def test_ended_marks_restore_with_their_age_and_within_the_stores_bounds(tmp_path: Path) -> None:
    """The marks of ended sequences were not in the snapshot: a restart forgot them all. Restored, each keeps
    the time of its end (its TTL counts from there, not from the restart), and a store with room for fewer
    keeps the newest."""
    clock = Clock(1_000.0)
    store = memory_store(ttl_seconds=100.0, clock=clock)
    _end_sequences(store, clock, ["t/a", "t/b", "t/c"])  # ended at 1000, 1010, 1020
    path = tmp_path / "snap"
    asyncio.run(save(store, path, "v1"))
    clock.now = 1_095.0
    restored = memory_store(ttl_seconds=100.0, max_sessions=2, clock=clock)
    restore(restored, path, "v1", STATE, clock=clock)
    assert asyncio.run(restored.ended("t/a")) is None  # the oldest, past the bound
    assert asyncio.run(restored.ended("t/b")) == asyncio.run(store.ended("t/b"))
    assert asyncio.run(restored.ended("t/c")) == asyncio.run(store.ended("t/c"))
    clock.now = 1_115.0  # t/b ended 105 s ago, t/c 95 s ago
    assert asyncio.run(restored.ended("t/b")) is None
    assert asyncio.run(restored.ended("t/c")) is not None
    clock.now = 1_111.0
    later = memory_store(ttl_seconds=100.0, clock=clock)
    restore(later, path, "v1", STATE, clock=clock)  # restored after t/a's and t/b's TTL: only t/c's is left
    assert [asyncio.run(later.ended(key)) is not None for key in ("t/a", "t/b", "t/c")] == [False, False, True]


def test_a_snapshot_whose_ended_mark_lies_far_ahead_is_set_aside(tmp_path: Path) -> None:
    """A mark's end time is a session time like ``updated_at``: one a week ahead would outlive its TTL by a week."""
    clock = Clock(time.time())
    store = memory_store(clock=clock)
    _end_sequences(store, clock, ["t/ended"])
    path = tmp_path / "snap"
    asyncio.run(save(store, path, "v1"))
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    entries = orjson.loads(tensors["ended"].numpy().tobytes())
    entries[0][1] = time.time() + 7 * 86400
    tensors["ended"] = torch.frombuffer(bytearray(orjson.dumps(entries)), dtype=torch.uint8)
    save_file(tensors, str(path), metadata=metadata)
    restored = memory_store(clock=clock)
    assert restore(restored, path, "v1", STATE, clock=clock) == 0
    assert asyncio.run(restored.ended("t/ended")) is None
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == ["snap.corrupt"]


def test_a_snapshot_written_before_ended_marks_were_kept_still_restores(tmp_path: Path) -> None:
    """A file without the marks' tensors (the previous release's) restores its sessions, and no marks."""
    clock = Clock(time.time())
    store = memory_store(clock=clock)
    _fill(store)
    _end_sequences(store, clock, ["t/ended"])
    path = tmp_path / "snap"
    asyncio.run(save(store, path, "v1"))
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
        tensors = {name: file.get_tensor(name) for name in file.keys() if not name.startswith("ended")}  # noqa: SIM118
    save_file(tensors, str(path), metadata=metadata)
    restored = memory_store()
    assert restore(restored, path, "v1", STATE, clock=clock) == 4
    assert asyncio.run(restored.ended("t/ended")) is None


def test_sigterm_writes_a_final_snapshot_when_an_interval_is_set(server_factory: ServerFactory,
                                                                  tmp_path: Path) -> None:
    """With periodic snapshots on, chunks acknowledged after the last one still survive a graceful restart."""
    path = tmp_path / "sessions.safetensors"
    first = server_factory(GRU_SNAPSHOT_PATH=str(path), GRU_SNAPSHOT_INTERVAL_SECONDS="3600")
    session = new_id()
    with httpx.Client(base_url=first.url, timeout=30) as http:
        assert send(http, session, series(5), offset=0).status_code == 200
    assert first.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    second = server_factory(GRU_SNAPSHOT_PATH=str(path))
    with httpx.Client(base_url=second.url, timeout=30) as http:
        assert position(http, session) == 5


def test_a_snapshot_path_that_is_a_symlink_is_written_through_to_its_target(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """GRU_SNAPSHOT_PATH a link into a volume (the container's own file system is lost with it): the rename
    replaced the link with a file beside it, so the volume never got a snapshot and a new pod lost every
    session."""
    volume, image = tmp_path / "volume", tmp_path / "image"
    volume.mkdir()
    image.mkdir()
    link = image / "sessions.safetensors"
    link.symlink_to(volume / "sessions.safetensors")
    first = server_factory(GRU_SNAPSHOT_PATH=str(link))
    session = new_id()
    with httpx.Client(base_url=first.url, timeout=30) as http:
        assert send(http, session, series(5), offset=0).status_code == 200
    assert first.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert link.is_symlink()
    second = server_factory(GRU_SNAPSHOT_PATH=str(volume / "sessions.safetensors"))  # a new pod, the same volume
    with httpx.Client(base_url=second.url, timeout=30) as http:
        assert position(http, session) == 5


def test_a_full_disk_at_shutdown_is_one_error_line_and_the_last_snapshot_stays(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """A full disk (here the file size limit, which fails writes as a full disk does) is a condition a
    service meets, not a bug: one line says so, without a traceback, and the snapshot written before stays
    whole for the restart."""
    path = tmp_path / "sessions.safetensors"
    first = server_factory(GRU_SNAPSHOT_PATH=str(path))
    kept, lost = new_id(), new_id()
    with httpx.Client(base_url=first.url, timeout=30) as http:
        assert send(http, kept, series(5), offset=0).status_code == 200
    assert first.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    second = server_factory(GRU_SNAPSHOT_PATH=str(path))
    with httpx.Client(base_url=second.url, timeout=30) as http:
        for i in range(100):  # a snapshot of some 100 KB
            assert send(http, f"{lost}-{i}", series(64, seed=i), offset=0).status_code == 200
    limit = second.log_path.stat().st_size + 16_384  # room for the log, none for the snapshot
    resource.prlimit(second.process.pid, resource.RLIMIT_FSIZE, (limit, limit))
    assert second.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    failed = [line for line in second.log().splitlines() if "final snapshot failed" in line]
    assert len(failed) == 1 and "Traceback" not in failed[0], second.log_tail()
    assert [p.name for p in tmp_path.glob("sessions.safetensors*")] == [path.name]  # no temporary file left
    third = server_factory(GRU_SNAPSHOT_PATH=str(path))
    with httpx.Client(base_url=third.url, timeout=30) as http:
        assert position(http, kept) == 5


def test_failed_and_good_periodic_snapshots_are_counted_for_alerts(server_factory: ServerFactory,
                                                                  tmp_path: Path) -> None:
    """A failed write was only logged: nothing for Prometheus to alert on (deploy/prometheus/rules/alerts.yml,
    GruSnapshotFailing) while a crash would lose every change since the last good snapshot."""
    server = server_factory(GRU_SNAPSHOT_PATH=str(tmp_path / "sessions.safetensors"),
                            GRU_SNAPSHOT_INTERVAL_SECONDS="0.3")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for i in range(100):  # a snapshot of some 100 KB
            assert send(http, new_id(f"many{i}"), series(64, seed=i), offset=0).status_code == 200

        def written() -> float:
            return metric(http, "gru_snapshot_last_success_timestamp_seconds", model="tiny")

        wait_for(lambda: written() > time.time() - 5)
        assert metric(http, "gru_snapshot_failures_total", model="tiny") == 0
        limit = server.log_path.stat().st_size + 65_536  # room for the log, none for the snapshot
        _, hard = resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (limit, hard))  # the soft one: undone below
        wait_for(lambda: metric(http, "gru_snapshot_failures_total", model="tiny") >= 2)
        last_good = written()
        assert time.time() - last_good > 0.3  # no write succeeded since
        resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (hard, hard))
        wait_for(lambda: written() > last_good)  # writable again: the next interval writes it


def test_the_last_snapshot_time_is_the_restored_files_and_absent_before_any(server_factory: ServerFactory,
                                                                          tmp_path: Path) -> None:
    """gru_snapshot_last_success_timestamp_seconds read 0 from every start until the first write: an alert on
    the snapshot's age fired at each start, a dashboard showed 1970. Before any snapshot is known there is no
    sample; after a restore, the restored file's write time (its mtime: the rename keeps the written file's)."""
    path = tmp_path / "sessions.safetensors"
    name = "gru_snapshot_last_success_timestamp_seconds"
    first = server_factory(GRU_SNAPSHOT_PATH=str(path))
    with httpx.Client(base_url=first.url, timeout=30) as http:
        assert sample(http, name, model="tiny") is None  # got: 0.0
        assert send(http, new_id(), series(5), offset=0).status_code == 200
    assert first.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    written = path.stat().st_mtime
    second = server_factory(GRU_SNAPSHOT_PATH=str(path))
    with httpx.Client(base_url=second.url, timeout=30) as http:
        assert sample(http, name, model="tiny") == pytest.approx(written, abs=1e-3)


def _rewrite_index(path: Path, edit: Callable[[list[Any]], None]) -> None:
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    entries = orjson.loads(tensors["index"].numpy().tobytes())
    edit(entries)
    tensors["index"] = torch.frombuffer(bytearray(orjson.dumps(entries)), dtype=torch.uint8)
    save_file(tensors, str(path), metadata=metadata)


@pytest.mark.parametrize("when", [1e300, float("inf"), "nan", time.time() + 7 * 86400],
                         ids=["1e300", "inf", "nan-string", "a-week-ahead"])  # the same ids in every worker
def test_a_snapshot_whose_times_are_no_times_is_set_aside(tmp_path: Path, when: Any) -> None:
    """The index's times went through float() unchecked (1e300, "inf", "nan" all passed): such a session never
    expired, and being least recently used it stopped the sweep before every expired session behind it. A
    time past now by more than a day is no time either."""
    store = memory_store()
    for key in ("t/a", "t/b", "t/c"):
        assert asyncio.run(store.commit([write(key, None, 1)], torch.zeros(1, STATE)))[0] is not None
    path = tmp_path / "snap"
    asyncio.run(save(store, path, "v1"))

    def future(entries: list) -> None:
        entries[0][4] = when  # t/a's updated_at

    _rewrite_index(path, future)
    clock = Clock(time.time())
    restored = memory_store(ttl_seconds=10.0, clock=clock)
    assert restore(restored, path, "v1", STATE, clock=clock) == 0
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == ["snap.corrupt"]


def test_a_snapshot_whose_seen_time_lies_far_ahead_is_set_aside(tmp_path: Path) -> None:
    """A session's ``seen`` time is a session time like ``updated_at``: one a week ahead of the clock made the
    session live a week past its TTL, and, least recently used, stopped the sweep before every expired one."""
    store = memory_store()
    for key in ("t/a", "t/b", "t/c"):
        assert asyncio.run(store.commit([write(key, None, 1)], torch.zeros(1, STATE)))[0] is not None
    path = tmp_path / "snap"
    asyncio.run(save(store, path, "v1"))
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
        tensors = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118
    tensors["seen"][0] = time.time() + 7 * 86400  # t/a's
    save_file(tensors, str(path), metadata=metadata)
    clock = Clock(time.time())
    restored = memory_store(ttl_seconds=10.0, clock=clock)
    assert restore(restored, path, "v1", STATE, clock=clock) == 0
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == ["snap.corrupt"]



def test_the_temporary_file_of_a_write_cut_short_is_removed_at_start(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """A process killed while it writes a snapshot (an OOM kill, likeliest then: the write is the peak of its
    memory) leaves the write's temporary file, as large as a snapshot, named as ``save`` names it. Nothing
    removed it: each such crash left another on the volume, until the disk was full and no snapshot could be
    written. The next start removes it, and nothing else beside the snapshot."""
    path = tmp_path / "sessions.safetensors"
    leftover = tmp_path / "sessions.safetensors.tmp-4242-1733450000000"
    leftover.write_bytes(b"\0" * 4096)
    other = tmp_path / "sessions.other.safetensors.tmp-4242-1733450000000"  # another model's: not this one's
    other.write_bytes(b"\0")
    server = server_factory(GRU_SNAPSHOT_PATH=str(path))
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/readyz").status_code == 200
    assert not leftover.exists() and other.exists()
    assert "removed the temporary file of a snapshot write cut short" in server.log()


def test_a_snapshot_position_past_int64_is_set_aside_not_a_failed_batch(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """A position in the index went through unbounded (Python's int has none): restored, the session's next
    chunk failed its whole engine batch with a 500 where the chunk fingerprint packs it as an int64, every
    chunk until a reset. Such a file is damaged: set aside, and the service starts with no sessions."""
    path = tmp_path / "sessions.safetensors"
    first = server_factory(GRU_SNAPSHOT_PATH=str(path))
    session = new_id()
    with httpx.Client(base_url=first.url, timeout=30) as http:
        assert send(http, session, series(5), offset=0).status_code == 200
    assert first.stop(signal.SIGTERM) in (0, -signal.SIGTERM)

    def far(entries: list[Any]) -> None:
        entries[0][1] = 2**63  # the session's position

    _rewrite_index(path, far)
    second = server_factory(GRU_SNAPSHOT_PATH=str(path))
    with httpx.Client(base_url=second.url, timeout=30) as http:
        assert send(http, session, series(3)).status_code == 200  # a new session: the damaged one is gone
    assert "snapshot is corrupt, set aside" in second.log()
    assert len(list(tmp_path.glob("sessions.safetensors.corrupt-*"))) == 1


def test_a_retry_of_an_ended_sequences_final_chunk_is_answered_after_a_graceful_restart(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """A v2 sequence ends, its final answer is lost, a deploy restarts the service (SIGTERM, snapshot), and the
    client resends that final request: the mark its end left was not in the snapshot, so the retry was a 404
    (sequence-not-found) where the same request before the restart got its answer again."""
    path = tmp_path / "sessions.safetensors"
    first = server_factory(GRU_SNAPSHOT_PATH=str(path))
    sequence, values = new_id("ending"), series(7, seed=5)

    def chunk(part: np.ndarray, **parameters: Any) -> dict[str, Any]:
        tensor = {"name": "values", "shape": list(part.shape), "datatype": "FP32", "data": part.ravel().tolist()}
        return {"inputs": [tensor], "parameters": {"sequence_id": sequence, **parameters}}

    final = chunk(values[4:], offset=4, sequence_end=True, horizon=2)
    with httpx.Client(base_url=first.url, timeout=30) as http:
        url = f"/v2/models/{http.get('/v1/model').json()['name']}/infer"
        assert http.post(url, json=chunk(values[:4], sequence_start=True)).status_code == 200
        answered = http.post(url, json=final)
        assert answered.status_code == 200, answered.text
    assert first.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    second = server_factory(GRU_SNAPSHOT_PATH=str(path))
    with httpx.Client(base_url=second.url, timeout=30) as http:
        retried = http.post(url, json=final)
        assert retried.status_code == 200, retried.text  # got: 404 sequence-not-found
        assert retried.content == answered.content
        assert http.get(f"/v1/sessions/{sequence}").status_code == 404  # still ended, not brought back
        other = http.post(url, json=chunk(values[4:] + 1, offset=4, sequence_end=True, horizon=2))
        assert other.status_code == 404 and other.json()["type"].endswith("/sequence-not-found")
