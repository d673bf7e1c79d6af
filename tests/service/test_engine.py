"""The engine in-process: batching changes no number, the model-version guard, the device the state lives on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import orjson
import pytest
import torch

from model import load_checkpoint
from service.engine import Engine
from service.metrics import Metrics
from service.problems import REFUSAL_STATUS, as_problem
from service.refusals import Refusal, StaleModel, TimedOut
from service.sessions.base import session_key
from service.sessions.memory import MemoryStore
from tests.conftest import make_tiny_model
from tests.service.helpers import series


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

