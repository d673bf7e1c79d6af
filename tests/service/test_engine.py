"""The engine in-process: batching changes no number, the model-version guard, the device the state lives on."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from model import load_checkpoint
from service.batch_queue import Chunk
from service.compute import _surprises
from service.engine import Engine
from service.metrics import Metrics
from service.problems import REFUSAL_STATUS, as_problem
from service.refusals import (
    BatchFailed,
    OffsetMismatch,
    OutOfRange,
    Overloaded,
    Refusal,
    StaleModel,
    StoreUnreachable,
    TimedOut,
    UnknownSession,
)
from service.sessions.base import Session, StoreUnavailable, Write, session_key
from service.sessions.guard import GuardedStore
from service.sessions.memory import MemoryStore
from tests.conftest import make_tiny_model
from tests.service.helpers import Clock, series


def _engine(model_dir: Path, store: MemoryStore | None = None, device: str = "cpu", **limits: float) -> Engine:
    forecaster, meta = load_checkpoint(model_dir, device)
    if store is None:
        store = MemoryStore(forecaster.state_size, torch.device(device), max_sessions=1000, ttl_seconds=600)
    options = {"max_batch_size": 64, "max_batch_delay_ms": 5.0, "max_queue": 1000,
               "request_timeout_seconds": 30.0, **limits}
    return Engine(forecaster, meta["version"], store, Metrics(), **options)  # type: ignore[arg-type]


async def _feed(engine: Engine, chunks: dict[str, list[np.ndarray]]) -> dict[str, list[dict]]:
    """Send every session's chunks in order, all sessions at once; returns the parsed answers."""
    await engine.start()

    async def one(name: str) -> list[dict]:
        # horizons 0, 2 and 4 mixed: only the rows that ask roll out, each as far as it asked
        return [orjson.loads(await engine.predict(session_key("t", name), c, None, 2 * (len(c) % 3)))
                for c in chunks[name]]

    try:
        results = await asyncio.gather(*(one(name) for name in chunks))
    finally:
        await engine.stop()
    return dict(zip(chunks, results, strict=True))


def test_batched_results_equal_unbatched_results(tiny_model: Path) -> None:
    rng = np.random.default_rng(0)
    chunks = {f"s{i}": [series(int(n), seed=i * 10 + j) for j, n in enumerate(rng.integers(1, 20, 4))]
              for i in range(24)}
    batched_engine = _engine(tiny_model, max_batch_size=64, max_batch_delay_ms=20)
    batched = asyncio.run(_feed(batched_engine, chunks))
    single = asyncio.run(_feed(_engine(tiny_model, max_batch_size=1, max_batch_delay_ms=0), chunks))
    assert batched_engine._metrics.batch_size._sum.get() > 0
    for name in chunks:
        for a, b in zip(batched[name], single[name], strict=True):
            assert a["position"] == b["position"]
            np.testing.assert_allclose(a["predictions"], b["predictions"], atol=1e-6)
            assert len(a.get("forecast", [])) == len(b.get("forecast", [])) == 2 * (len(a["predictions"]) % 3)
            np.testing.assert_allclose(a.get("forecast", []), b.get("forecast", []), atol=1e-6)


def test_unequal_lengths_in_one_batch_really_share_it(tiny_model: Path) -> None:
    engine = _engine(tiny_model, max_batch_size=64, max_batch_delay_ms=50)
    chunks = {f"u{i}": [series(1 + 5 * i, seed=i)] for i in range(8)}
    asyncio.run(_feed(engine, chunks))
    histogram = engine._metrics.batch_size
    assert histogram._sum.get() == 8
    assert sum(b.get() for b in histogram._buckets) == 1


def test_session_built_with_another_model_is_refused_until_reset(tmp_path: Path) -> None:
    first = make_tiny_model(tmp_path / "a", seed=1)
    second = make_tiny_model(tmp_path / "b", seed=2)
    old = _engine(first)
    store = old.store
    new = _engine(second, store=store)  # type: ignore[arg-type]
    key = session_key("t", "pump")
    values = series(4)

    async def scenario() -> None:
        await old.start()
        await old.predict(key, values, 0, 0)
        await old.stop()
        await new.start()
        try:
            with pytest.raises(StaleModel) as refused:
                await new.predict(key, values, 4, 0)
            assert as_problem(refused.value).status == 409
            assert refused.value.kind == "model-changed" and refused.value.extra["position"] == 4
            assert (await store.get(key)).position == 4  # type: ignore[union-attr]
            await new.reset(key)
            answer = orjson.loads(await new.predict(key, values, 0, 0))
            assert answer["model_version"] == new.model_version and answer["position"] == 4
        finally:
            await new.stop()

    asyncio.run(scenario())


def test_a_chunk_that_timed_out_while_computing_never_applies_after_the_client_moved_on(tiny_model: Path) -> None:
    """The 503 came while the chunk was computing (4,096 steps and a 512-step forecast take about 130 ms
    here, the timeout is 30 ms); the client then starts its session again, or deletes it. The chunk is
    dropped when its batch finishes: it used to win the commit on a deleted session (which then came back
    holding it) and, after losing the race to a reset, to be judged again and applied on top of it."""
    engine = _engine(tiny_model, max_batch_delay_ms=0, request_timeout_seconds=0.03)
    again, gone = session_key("t", "again"), session_key("t", "gone")

    async def scenario() -> None:
        await engine.start()
        try:
            refused = await asyncio.gather(*(engine.predict(key, series(4096), 0, 512) for key in (again, gone)),
                                           return_exceptions=True)
            assert all(isinstance(answer, TimedOut) for answer in refused), refused
            await engine.reset(again)
            await engine.reset(gone)
            await engine.delete(gone)
        finally:
            await engine.stop()  # the batch, and anything it would have queued again, runs to its end
        assert (await engine.store.get(again)).position == 0  # type: ignore[union-attr]
        assert await engine.store.get(gone) is None

    asyncio.run(scenario())


class _SlowCommitStore(MemoryStore):
    """A memory store whose commit takes a round trip, as Redis's script call does."""

    commit_delay = 0.0

    async def commit(self, writes: Sequence[Write], states: torch.Tensor) -> list[Session | None]:
        await asyncio.sleep(self.commit_delay)
        return await super().commit(writes, states)


def test_a_chunk_whose_deadline_passes_while_its_run_is_written_gets_the_write_s_answer(tiny_model: Path) -> None:
    """A run of two chunks is written as the first one's deadline passes. The first was told it timed out
    (503: retry with the same offset), yet the write applied it, and a run keeps only its last chunk's
    answer: its retry was a 409, its answer lost. A chunk being written now waits for the write."""
    forecaster, _ = load_checkpoint(tiny_model, "cpu")
    store = _SlowCommitStore(forecaster.state_size, torch.device("cpu"), max_sessions=100, ttl_seconds=600)
    store.commit_delay = 0.6  # the write ends 0.6 s to 1.2 s in: past the first deadline (1.0 s), not the second's
    engine = _engine(tiny_model, store, max_batch_delay_ms=600, request_timeout_seconds=1.0, max_run_steps=256)
    key = session_key("t", "slow-commit")
    values = series(8, seed=5)

    async def scenario() -> list[bytes | BaseException]:
        await engine.start()
        try:
            first = engine.enqueue(key, values[:4], 0, 0)
            await asyncio.sleep(0.5)  # joins the first one's run: the batch waits 600 ms to fill
            second = engine.enqueue(key, values[4:], 4, 0)
            return await asyncio.gather(first, second, return_exceptions=True)
        finally:
            await engine.stop()

    answers = asyncio.run(scenario())
    assert [orjson.loads(a)["position"] if isinstance(a, bytes) else a for a in answers] == [4, 8]


def test_a_chunk_whose_deadline_passed_behind_a_write_is_refused_not_computed(tiny_model: Path) -> None:
    """One timer watches the deadlines, and it waits for a chunk being written (its write may apply it): a
    chunk queued behind that one and timed out meanwhile was still taken by the next batch, computed, then
    refused (503) and its result dropped; under overload, compute spent on answers nobody reads."""
    forecaster, _ = load_checkpoint(tiny_model, "cpu")
    store = _SlowCommitStore(forecaster.state_size, torch.device("cpu"), max_sessions=100, ttl_seconds=600)
    store.commit_delay = 0.5  # the first chunk's write ends 0.5 s in: past the second one's deadline (0.4 s)
    engine = _engine(tiny_model, store, max_batch_delay_ms=0, request_timeout_seconds=0.3)

    async def scenario() -> list[bytes | BaseException]:
        await engine.start()
        try:
            written = engine.enqueue(session_key("t", "written"), series(3), 0, 0)
            await asyncio.sleep(0.1)  # its batch is computing or writing
            late = engine.enqueue(session_key("t", "late"), series(4096), 0, 0)
            return await asyncio.gather(written, late, return_exceptions=True)
        finally:
            await engine.stop()

    written, late = asyncio.run(scenario())
    assert isinstance(written, bytes) and orjson.loads(written)["position"] == 3
    assert isinstance(late, TimedOut), late
    assert engine._steps._value.get() == 3  # the written chunk's steps alone


class _FaultyGatherStore(_SlowCommitStore):
    """A slow-committing memory store on which gathering the state of session ``poisoned`` raises (as a device
    running out of memory would), once a commit has begun: the failing batch then fails while another
    engine's write is under way."""

    poisoned = ""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.writing = threading.Event()  # set by every commit: gather runs on a compute thread

    def gather(self, sessions: Sequence[Session | None], device: Any = None) -> torch.Tensor:
        if any(s is not None and s.key == self.poisoned for s in sessions):
            self.writing.wait(5)
            raise RuntimeError("out of memory gathering the states")
        return super().gather(sessions, device)

    async def commit(self, writes: Sequence[Write], states: torch.Tensor) -> list[Session | None]:
        self.writing.set()
        return await super().commit(writes, states)


def test_a_failed_batch_fails_only_the_chunks_it_still_holds(tmp_path: Path) -> None:
    """The compute raises on a batch after its judging sent one chunk to another version's engine and put a
    run's next chunk back in the queue. Both were failed with the batch (500): the routed one while the
    other engine was writing it, so its caller was told it failed while its session advanced; the queued
    one, never computed with the batch, was then dropped. Each gets its own answer now."""
    old_model, old_meta = load_checkpoint(make_tiny_model(tmp_path / "a", seed=1), "cpu")
    new_model, new_meta = load_checkpoint(make_tiny_model(tmp_path / "b", seed=2), "cpu")
    store = _FaultyGatherStore(old_model.state_size, torch.device("cpu"), max_sessions=100, ttl_seconds=600)
    options: dict[str, Any] = {"max_batch_size": 8, "max_batch_delay_ms": 20, "max_queue": 100,
                               "request_timeout_seconds": 30.0, "max_run_steps": 64}
    old = Engine(old_model, old_meta["version"], store, Metrics(), **options)
    new = Engine(new_model, new_meta["version"], store, Metrics(), **options)

    def route(chunk: Chunk, session: Session | None) -> bool:
        """The sessions of the newer version go to its engine (as ``ServedModel.route`` pins them)."""
        if session is None or session.model_version != new.model_version:
            return False
        new.queue.hand_over(chunk)
        return True

    old.router = route
    broken, routed, retried = (session_key("t", name) for name in ("broken", "routed", "retried"))
    values = series(6, seed=4)

    async def scenario() -> list[bytes | BaseException]:
        await old.start()
        await new.start()
        try:
            await old.predict(broken, values[:3], 0, 0)
            await old.predict(retried, values[:3], 0, 0)
            await new.predict(routed, values[:3], 0, 0)
            store.poisoned, store.commit_delay = broken, 0.2
            store.writing.clear()
            chunks = [old.enqueue(broken, values[3:], 3, 0), old.enqueue(routed, values[3:], 3, 0),
                      old.enqueue(retried, values[:3], 0, 0),  # an exact retry: answered, its run's next chunk
                      old.enqueue(retried, values[3:], 3, 0)]  # goes back to the queue
            return await asyncio.gather(*chunks, return_exceptions=True)
        finally:
            await old.stop()
            await new.stop()

    answers = asyncio.run(scenario())
    assert isinstance(answers[0], BatchFailed)
    assert [orjson.loads(a)["position"] if isinstance(a, bytes) else a for a in answers[1:]] == [6, 3, 6]
    records = [asyncio.run(store.get(key)) for key in (broken, routed, retried)]
    assert [record.position if record else None for record in records] == [3, 6, 6]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_replay_reads_the_values_a_memory_store_keeps_on_any_device(tmp_path: Path, device: str) -> None:
    """GRU_UPGRADE=replay primes the new version with the raw values the session's state keeps. The memory
    store keeps its states on the model's device, so on a GPU reading them as numpy raised a TypeError and
    failed the whole batch (500) for every chunk of a session from an older version."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    old_model, old_meta = load_checkpoint(make_tiny_model(tmp_path / "a", seed=1), device)
    new_model, new_meta = load_checkpoint(make_tiny_model(tmp_path / "b", seed=2), device)
    store = MemoryStore(old_model.state_size, torch.device(device), max_sessions=10, ttl_seconds=600)
    options: dict[str, Any] = {"max_batch_size": 8, "max_batch_delay_ms": 0, "max_queue": 100,
                               "request_timeout_seconds": 30.0}
    old = Engine(old_model, old_meta["version"], store, Metrics(), **options)
    new = Engine(new_model, new_meta["version"], store, Metrics(), replay=True, **options)
    key, values = session_key("t", "moved"), series(12, seed=3)

    async def scenario() -> dict[str, Any]:
        await old.start()
        await new.start()
        try:
            await old.predict(key, values[:8], 0, 0)
            return orjson.loads(await new.predict(key, values[8:], 8, 0))
        finally:
            await old.stop()
            await new.stop()

    answer = asyncio.run(scenario())
    assert (answer["position"], answer["upgraded"]) == (12, True)


def test_a_chunk_whose_outputs_are_not_finite_is_refused_alone_in_its_batch(tiny_model: Path) -> None:
    """The batch's outputs are checked whole; a value that is not finite sends the check row by row, so the
    chunks beside the refused one are answered as they would be alone."""
    engine = _engine(tiny_model, max_batch_delay_ms=50)
    extreme = np.array([[3e38], [-3e38]], dtype=np.float32)
    keys = [session_key("t", f"row{i}") for i in range(3)]

    async def scenario() -> list[bytes | BaseException]:
        await engine.start()
        try:
            chunks = [series(2, seed=1), extreme, series(2, seed=2)]
            calls = [engine.predict(key, values, 0, 4) for key, values in zip(keys, chunks, strict=True)]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await engine.stop()

    first, refused, last = asyncio.run(scenario())
    assert isinstance(refused, OutOfRange)
    alone = asyncio.run(_feed(_engine(tiny_model), {"row0": [series(2, seed=1)], "row2": [series(2, seed=2)]}))
    for answer, name in ((first, "row0"), (last, "row2")):  # _feed asks a horizon of 4 of 2-step chunks
        assert isinstance(answer, bytes)
        got = orjson.loads(answer)
        np.testing.assert_allclose(got["predictions"], alone[name][0]["predictions"], atol=1e-6)
        np.testing.assert_allclose(got["forecast"], alone[name][0]["forecast"], atol=1e-6)


def test_surprises_count_only_the_values_a_chunk_is_answered_for() -> None:
    """Per row: p-values under the bound from its first answered step (after the replayed ones) on; NaN (no
    score, or past the row's end) never counts."""
    nan = np.nan
    p_values = np.array([
        [[0.001], [0.5], [0.002], [nan]],  # 2 under 0.01
        [[0.001], [0.003], [0.004], [0.2]],  # the first 2 steps primed: 1 counts
        [[nan], [nan], [nan], [nan]],
        [[0.009], [0.005], [0.01], [0.0]],  # 0.01 is not under 0.01; the first step primed: 2 count
    ], dtype=np.float32)
    assert _surprises(p_values, 0.01, [0, 2, 0, 1]) == [2, 1, 0, 2]
    assert _surprises(p_values, 0.01, [0, 0, 0, 0]) == [2, 3, 0, 3]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_model_and_states_live_on_the_gpu(tiny_model: Path) -> None:
    engine = _engine(tiny_model, device="cuda")
    store = engine.store
    assert isinstance(store, MemoryStore)
    chunks = {f"g{i}": [series(8, seed=i), series(3, seed=i + 50)] for i in range(4)}
    on_gpu = asyncio.run(_feed(engine, chunks))
    assert store.states.device.type == "cuda"
    assert next(engine.forecaster.parameters()).device.type == "cuda"
    on_cpu = asyncio.run(_feed(_engine(tiny_model), chunks))
    for name in chunks:
        for a, b in zip(on_gpu[name], on_cpu[name], strict=True):
            np.testing.assert_allclose(a["predictions"], b["predictions"], atol=1e-4)


def test_every_refusal_has_exactly_one_http_status_and_its_own_kind() -> None:
    refusals = Refusal.__subclasses__()
    assert set(refusals) == set(REFUSAL_STATUS)
    assert len({refusal.kind for refusal in refusals}) == len(refusals)
    answer = as_problem(refusals[0]("why", retry_after=2, position=3))
    assert answer.headers == {"Retry-After": "2"} and answer.body()["position"] == 3


def test_appends_of_one_session_apply_in_arrival_order_even_when_a_batch_fills(tiny_model: Path) -> None:
    """A session's second chunk, held back from a batch that already has its first, must stay ahead of its
    third (docs/architecture.md: one session's chunks are applied one at a time, in arrival order)."""
    engine = _engine(tiny_model, max_batch_size=2, max_batch_delay_ms=0)
    x, y, z = (session_key("t", n) for n in "xyz")
    order = [(x, 1), (x, 2), (y, 1), (z, 1), (x, 3)]  # x's chunks have 1, 2 and 3 steps

    async def scenario() -> list[dict]:
        await engine.start()
        try:
            tasks = [asyncio.ensure_future(engine.predict(key, series(n, seed=n), None, 0)) for key, n in order]
            return [orjson.loads(a) for a in await asyncio.gather(*tasks)]
        finally:
            await engine.stop()

    answers = asyncio.run(scenario())
    assert [answers[i]["position"] for i in (0, 1, 4)] == [1, 3, 6]


def test_chunks_whose_caller_left_while_queued_never_reach_the_model(tiny_model: Path) -> None:
    """A stream that closes cancels its unanswered chunks (``_Stream.run``): up to GRU_STREAM_WINDOW of them,
    each up to GRU_MAX_CHUNK_STEPS long. They used to be taken all the same, each the first of its session in
    a batch of its own (too long to join a run), run through the model and dropped at the commit: every batch
    as long as theirs, and a reconnected client's resent chunks queued behind them."""
    engine = _engine(tiny_model, max_batch_delay_ms=0, max_run_steps=64)
    gone, live = session_key("t", "gone"), session_key("t", "live")

    async def scenario() -> dict:
        await engine.start()
        try:
            left = [engine.enqueue(gone, series(200, seed=i), None, 4) for i in range(4)]
            for future in left:  # queued, then the stream closed before the engine took them
                future.cancel()
            resent = engine.enqueue(gone, series(200), 0, 0)  # the client reconnects and resends
            answer = orjson.loads(await engine.predict(live, series(3), 0, 0))
            assert orjson.loads(await resent)["position"] == 200
            return answer
        finally:
            await engine.stop()

    assert asyncio.run(scenario())["position"] == 3
    assert engine._steps._value.get() == 203  # the two live chunks' steps, nothing of the four left behind
    assert len(engine.queue) == 0


def test_queue_holds_exactly_max_queue_chunks(tiny_model: Path) -> None:
    """GRU_MAX_QUEUE=2 admits two waiting chunks and refuses the third, at once."""
    engine = _engine(tiny_model, max_queue=2)  # not started: nothing leaves the queue

    async def scenario() -> None:
        waiting = [asyncio.ensure_future(engine.predict(None, series(2), None, 0)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded):
            await asyncio.wait_for(engine.predict(None, series(2), None, 0), 1)
        for task in waiting:
            task.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        engine.compute.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("move", ["reset", "delete"])
def test_a_reset_or_delete_while_a_chunk_computes_makes_its_commit_lose(tiny_model: Path, move: str) -> None:
    """The memory store's commit compares revisions: a long chunk at offset 4 is computing when the session
    is reset (or deleted); its commit loses and it is judged again, a 409 at position 0 after the reset (a
    404 after the delete), and the session is never moved to 4 + 4096 on top of the reset."""
    engine = _engine(tiny_model, max_batch_delay_ms=0)
    key = session_key("t", "raced")

    async def scenario() -> None:
        await engine.start()
        try:
            await engine.predict(key, series(4), 0, 0)
            chunk = asyncio.ensure_future(engine.predict(key, series(4096), 4, 512))
            while len(engine.queue):
                await asyncio.sleep(0)
            await asyncio.sleep(0.01)  # taken and computing (about 100 ms of work)
            assert not chunk.done()
            await (engine.reset(key) if move == "reset" else engine.delete(key))
            with pytest.raises(OffsetMismatch if move == "reset" else UnknownSession):
                await chunk
        finally:
            await engine.stop()
        session = await engine.store.get(key)
        assert (session.position if session else None) == (0 if move == "reset" else None)

    asyncio.run(scenario())


def test_expires_at_counts_from_the_last_use_not_from_creation(tiny_model: Path) -> None:
    """A chunk that loads the session uses it, applied or refused (as the Redis store's load refreshes the
    key's TTL); updated_at stays the last applied chunk's."""
    clock = Clock()
    forecaster, _ = load_checkpoint(tiny_model, "cpu")
    engine = _engine(tiny_model, store=MemoryStore(forecaster.state_size, torch.device("cpu"), 100,
                                                   ttl_seconds=60, clock=clock))
    key = session_key("t", "aging")

    async def scenario() -> None:
        await engine.start()
        try:
            await engine.predict(key, series(2), 0, 0)
            clock.now += 50
            await engine.predict(key, series(2), 2, 0)
            session, expires = await engine.session_info(key)
            assert session.created_at == 1_000 and session.updated_at == 1_050
            assert expires == 1_050 + 60
            clock.now += 20
            with pytest.raises(OffsetMismatch):
                await engine.predict(key, series(2), 0, 0)
            session, expires = await engine.session_info(key)
            assert session.updated_at == 1_050 and expires == 1_070 + 60
        finally:
            await engine.stop()

    asyncio.run(scenario())


class _LostReplyStore(MemoryStore):
    """A memory store whose next commit applies its writes and then raises, as a Redis script call does whose
    reply is lost on the way back."""

    lose_next = False

    async def commit(self, writes: Sequence[Write], states: torch.Tensor) -> list[Session | None]:
        results = await super().commit(writes, states)
        if self.lose_next:
            self.lose_next = False
            raise StoreUnreachable("the connection to the store was lost", retry_after=1)
        return results


def test_a_lone_chunk_whose_commit_reply_was_lost_is_not_told_503_under_the_next_chunk(tiny_model: Path) -> None:
    """A session's chunk runs alone (runs off) and its write applies, its reply lost; the session's next
    chunk, pipelined behind it, then applies on top of it. The first was told 503 (retry with the same
    offset), but its retry was a 409 past the second: its answer lost, as for a run's earlier chunk. A failed
    commit of a lone chunk is read back too, and a chunk found written answered."""
    forecaster, _ = load_checkpoint(tiny_model, "cpu")
    store = _LostReplyStore(forecaster.state_size, torch.device("cpu"), max_sessions=100, ttl_seconds=600)
    engine = _engine(tiny_model, store, max_batch_delay_ms=0)
    key = session_key("t", "lost-lone")
    values = series(8, seed=3)

    async def scenario() -> list[Any]:
        await engine.start()
        try:
            await engine.predict(key, values[:2], 0, 0)
            store.lose_next = True
            queued = [engine.enqueue(key, values[2:5], 2, 0), engine.enqueue(key, values[5:], 5, 0)]
            answers: list[Any] = await asyncio.gather(*queued, return_exceptions=True)
            if isinstance(answers[0], StoreUnreachable):  # a 503 is retried with its offset
                try:
                    answers[0] = await engine.predict(key, values[2:5], 2, 0)
                except Refusal as refused:
                    answers[0] = refused
            return answers
        finally:
            await engine.stop()

    answers = asyncio.run(scenario())
    got = [orjson.loads(a)["position"] if isinstance(a, bytes) else type(a).__name__ for a in answers]
    assert got == [5, 8], got  # was ['OffsetMismatch', 8]: the first chunk's answer lost


class _UnconfirmedStore(MemoryStore):
    """A memory store whose commits apply their writes and then fail, and which answers no ping: a Redis that
    ran the script and went away before its reply, still away when the write is read back."""

    async def commit(self, writes: Sequence[Write], states: torch.Tensor) -> list[Session | None]:
        await super().commit(writes, states)
        raise StoreUnavailable("connection reset by 10.0.0.7:6379", "connection lost")

    async def ping(self) -> bool:
        return False


def test_a_chunk_whose_write_cannot_be_read_back_is_not_told_nothing_changed(tiny_model: Path) -> None:
    """The write applied, its reply lost, and the store is still away when it is read back: the chunk's
    503 said the store's refusal of a call it never ran ("nothing was changed"), yet the session holds the
    chunk. Its outcome is unknown, and the 503 says so."""
    forecaster, _ = load_checkpoint(tiny_model, "cpu")
    inner = _UnconfirmedStore(forecaster.state_size, torch.device("cpu"), max_sessions=100, ttl_seconds=600)
    engine = _engine(tiny_model, GuardedStore(inner, Metrics()), max_batch_delay_ms=0)  # type: ignore[arg-type]
    key = session_key("t", "unconfirmed")

    async def scenario() -> StoreUnreachable:
        await engine.start()
        try:
            with pytest.raises(StoreUnreachable) as refused:
                await engine.predict(key, series(3), 0, 0)
            return refused.value
        finally:
            await engine.stop()

    refusal = asyncio.run(scenario())
    held = asyncio.run(inner.get(key))
    assert held is not None and held.position == 3  # it applied
    assert "nothing was changed" not in refusal.detail, refusal.detail
    assert "may have been applied" in refusal.detail and "same offset" in refusal.detail, refusal.detail


class _SlowLoadStore(MemoryStore):
    """A memory store whose load takes a round trip, as Redis's does; ``loading`` is set while one waits."""

    load_delay = 0.2

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.loading = asyncio.Event()

    async def load(self, keys: Sequence[str]) -> list[Session | None]:
        self.loading.set()
        await asyncio.sleep(self.load_delay)
        return await super().load(keys)


def test_chunks_whose_caller_left_while_their_batch_loaded_never_reach_the_model(tiny_model: Path) -> None:
    """A chunk taken into a batch whose sessions are loading (a Redis round trip) and cancelled meanwhile (its
    stream closed) was still judged, computed with the batch, and dropped at the commit: steps for nothing,
    and a batch longer for every chunk in it. Stateless chunks too."""
    forecaster, _ = load_checkpoint(tiny_model, "cpu")
    store = _SlowLoadStore(forecaster.state_size, torch.device("cpu"), max_sessions=100, ttl_seconds=600)
    engine = _engine(tiny_model, store, max_batch_delay_ms=0, max_run_steps=64)
    gone, live = session_key("t", "gone"), session_key("t", "live")

    async def scenario() -> int:
        await engine.start()
        try:
            left = [engine.enqueue(gone, series(200), 0, 0), engine.enqueue(None, series(100), None, 0)]
            answer = engine.enqueue(live, series(3), 0, 0)
            await store.loading.wait()  # all three are in the batch, its sessions loading
            for future in left:
                future.cancel()
            return int(orjson.loads(await answer)["position"])
        finally:
            await engine.stop()

    assert asyncio.run(scenario()) == 3
    assert engine._steps._value.get() == 3  # the live chunk's steps alone
