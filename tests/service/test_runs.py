"""Runs: a session's queued chunks that continue each other computed as one row and committed once
(``service.batch_queue``, ``service.engine``), each answered exactly as if it had applied alone, in order.

Each scenario queues every chunk before the engine takes a batch, on an engine that forms runs, and compares
with the same chunks sent one at a time to an engine that never does.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import pytest
import torch
from websockets.sync.client import connect

from model import load_checkpoint
from service.engine import Engine
from service.extras import NO_EXTRAS, Extras
from service.metrics import Metrics
from service.refusals import BatchFailed, OffsetMismatch, OutOfRange
from service.sessions.base import session_key
from service.sessions.memory import MemoryStore
from tests.conftest import ServerFactory, make_tiny_model
from tests.service.helpers import new_id, series, stateless
from tests.service.test_model_lifecycle import metric

KEY = session_key("t", "run")
# (values, offset, horizon, extras): one session's chunks, queued together
Step = tuple[np.ndarray, int | None, int, Extras]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("calibrated"), error_scale=1.0)


def _engine(model_dir: Path, max_run_steps: int, timeout: float = 30.0) -> Engine:
    forecaster, meta = load_checkpoint(model_dir, "cpu")
    store = MemoryStore(forecaster.state_size, torch.device("cpu"), max_sessions=100, ttl_seconds=600)
    return Engine(forecaster, meta["version"], store, Metrics(), max_batch_size=64, max_batch_delay_ms=0,
                  max_queue=1000, request_timeout_seconds=timeout, max_run_steps=max_run_steps)


def _batches(engine: Engine) -> tuple[int, int]:
    """How many batches the engine took, and how many chunks they held (``gru_batch_size``)."""
    samples = {s.name: s.value for s in engine.queue._metrics.batch_size.collect()[0].samples}
    return int(samples["gru_batch_size_count"]), int(samples["gru_batch_size_sum"])


async def _queued(engine: Engine, steps: list[Step]) -> list[Any]:
    """Every chunk queued before the engine takes a batch; the answers (parsed) or refusals, in order."""
    futures = [engine.enqueue(KEY, values, offset, horizon, extras=extras) for values, offset, horizon, extras in steps]
    done = await asyncio.gather(*futures, return_exceptions=True)
    return [orjson.loads(a) if isinstance(a, bytes) else a for a in done]


async def _one_by_one(engine: Engine, steps: list[Step]) -> list[Any]:
    out = []
    for values, offset, horizon, extras in steps:
        try:
            out.append(orjson.loads(await engine.predict(KEY, values, offset, horizon, extras=extras)))
        except Exception as refused:  # compared below with what the run gives
            out.append(refused)
    return out


def _both(model: Path, steps: list[Step], max_run_steps: int = 256) -> tuple[list[Any], list[Any], Engine]:
    """The answers queued together (on an engine forming runs), the answers one by one (on one that does
    not), and the first engine, stopped."""
    async def scenario(engine: Engine, feed: Any) -> list[Any]:
        await engine.start()
        try:
            return list(await feed(engine, steps))
        finally:
            await engine.stop()

    runs = _engine(model, max_run_steps)
    together = asyncio.run(scenario(runs, _queued))
    alone = asyncio.run(scenario(_engine(model, 0), _one_by_one))
    return together, alone, runs


def _assert_same(together: list[Any], alone: list[Any]) -> None:
    assert len(together) == len(alone)
    for got, want in zip(together, alone, strict=True):
        if isinstance(want, Exception):
            assert type(got) is type(want) and got.extra == want.extra, (got, want)
            continue
        assert isinstance(got, dict) and set(got) == set(want)
        for name, value in want.items():
            if name in ("predictions", "forecast", "scores"):
                np.testing.assert_allclose(np.array(got[name], dtype=float), np.array(value, dtype=float), atol=1e-5)
            elif name in ("intervals", "forecast_intervals"):
                for level, band in value.items():
                    for side in ("lower", "upper"):
                        np.testing.assert_allclose(got[name][level][side], band[side], atol=1e-5)
            else:
                assert got[name] == value, name


def test_a_session_s_queued_chunks_run_as_one_and_each_answers_as_if_alone(calibrated: Path) -> None:
    """Offsets given and not, intervals and scores on some chunks, a forecast on the last: one batch, one
    row, and every answer (position, created, predictions, its own intervals and scores) as one by one."""
    values = series(40, seed=7)
    cuts = [(0, 5), (5, 8), (13, 1), (14, 12), (26, 14)]
    wants = [Extras(), Extras(levels=(80.0,)), Extras(scores=True), Extras(), Extras(levels=(50.0, 95.0), scores=True)]
    steps: list[Step] = [(values[a: a + n], a if i % 2 == 0 else None, 4 if i == 4 else 0, wants[i])
                         for i, ((a, n), _) in enumerate(zip(cuts, wants, strict=True))]
    together, alone, engine = _both(calibrated, steps)
    _assert_same(together, alone)
    assert [a["position"] for a in together] == [5, 13, 14, 26, 40]
    assert [a["created"] for a in together] == [True, False, False, False, False]
    assert _batches(engine) == (1, 5)  # one batch held all five: they ran as one


def test_a_retry_of_a_run_s_last_chunk_is_exact_and_of_an_earlier_one_a_409(tiny_model: Path) -> None:
    """The session keeps the last chunk's fingerprint and answer, as one by one: retrying it answers the same
    bytes; retrying an earlier chunk of the run is a 409 at the run's end."""
    values = series(24, seed=2)
    steps: list[Step] = [(values[a: a + 8], a, 0, NO_EXTRAS) for a in (0, 8, 16)]
    retries: list[Step] = [steps[2], steps[1]]
    together, alone, _ = _both(tiny_model, steps + retries)
    _assert_same(together, alone)
    assert together[3] == together[2]
    assert isinstance(together[4], OffsetMismatch) and together[4].extra["position"] == 24


def test_chunks_that_do_not_continue_the_run_wait_and_are_judged_after_it(tiny_model: Path) -> None:
    """A wrong offset after a chunk with one ends the run in the queue; after a chunk without one (where
    the queue cannot tell) the engine ends it. Either way the rest is judged after the run applied."""
    values = series(16, seed=4)
    steps: list[Step] = [
        (values[0:4], None, 0, NO_EXTRAS),
        (values[4:8], 5, 0, NO_EXTRAS),  # the run (offset unknown until judged) ends here: 409 at 4
        (values[4:8], 4, 0, NO_EXTRAS),
        (values[8:12], 99, 0, NO_EXTRAS),  # ends the next run in the queue: 409 at 8
        (values[8:12], None, 0, NO_EXTRAS),
        (values[12:16], 12, 2, NO_EXTRAS),  # a forecast: the last chunk of its run
        (values[12:16], 16, 0, NO_EXTRAS),
    ]
    together, alone, _ = _both(tiny_model, steps)
    _assert_same(together, alone)
    assert [a.extra["position"] if isinstance(a, OffsetMismatch) else a["position"] for a in together] == [
        4, 4, 8, 8, 12, 16, 20]


def test_a_run_whose_outputs_are_not_finite_is_judged_chunk_by_chunk(tiny_model: Path) -> None:
    """Which chunk of a run is at fault is unknown: each is judged and computed alone, so the chunks before
    and after the refused one apply as they would have."""
    extreme = np.array([[3e38], [-3e38]], dtype=np.float32)
    steps: list[Step] = [(series(3, seed=1), None, 0, NO_EXTRAS), (extreme, None, 0, NO_EXTRAS),
                         (series(3, seed=2), None, 0, NO_EXTRAS)]
    together, alone, _ = _both(tiny_model, steps)
    _assert_same(together, alone)
    assert isinstance(together[1], OutOfRange) and together[2]["position"] == 6


def test_a_run_holds_at_most_max_run_steps(tiny_model: Path) -> None:
    values = series(20, seed=3)
    steps: list[Step] = [(values[a: a + 4], a, 0, NO_EXTRAS) for a in range(0, 20, 4)]
    together, alone, engine = _both(tiny_model, steps, max_run_steps=8)
    _assert_same(together, alone)
    assert _batches(engine) == (3, 5)  # 4 + 4, 4 + 4, 4


def test_a_batch_that_fails_answers_every_chunk_of_its_runs_at_once(tiny_model: Path) -> None:
    """A batch that raises (a bug, a device error; here a chunk of the wrong width, which the routes refuse
    before it is queued) fails each of its chunks with a 500, the chunks joined to a run included: none is
    left to wait out the request timeout (a stream answers in order: it would stall behind it)."""
    engine = _engine(tiny_model, 256, timeout=1.0)

    async def scenario() -> list[Any]:
        await engine.start()
        try:
            futures = [engine.enqueue(KEY, series(4), 0, 0), engine.enqueue(KEY, series(4, features=2), 4, 0)]
            return list(await asyncio.gather(*futures, return_exceptions=True))
        finally:
            await engine.stop()

    answers = asyncio.run(scenario())
    assert [type(a) for a in answers] == [BatchFailed, BatchFailed], answers


def test_a_stream_s_pipelined_chunks_on_redis_run_together_and_match_a_stateless_pass(
    server_factory: ServerFactory, redis_server: Any, tiny_model: Path
) -> None:
    """Through the service: a stream sends 60 chunks at once, the engine forms runs of them (fewer batches
    than chunks), and the answers continue each other exactly, on the Redis store."""
    server = server_factory(GRU_STORE="redis", GRU_REDIS_URL=redis_server.url, GRU_MAX_BATCH_DELAY_MS="20")
    values = series(180, seed=9)
    session = new_id("runs")
    url = server.url.replace("http://", "ws://") + f"/v1/sessions/{session}/stream"
    with connect(url, open_timeout=30) as ws:
        for start in range(0, 180, 3):
            ws.send(orjson.dumps({"values": values[start: start + 3].tolist(), "offset": start}).decode())
        answers = [orjson.loads(ws.recv(timeout=60)) for _ in range(60)]
    assert [a["position"] for a in answers] == list(range(3, 183, 3))
    with httpx.Client(base_url=server.url, timeout=30) as client:
        want = stateless(client, values)["predictions"]
        np.testing.assert_allclose(np.concatenate([a["predictions"] for a in answers]), want, atol=1e-5)
        batches = [line for line in client.get("/metrics").text.splitlines() if line.startswith("gru_batch_size_")]
    count = next(float(line.split()[-1]) for line in batches if line.startswith("gru_batch_size_count"))
    assert count < 60


def test_a_chunk_that_goes_back_to_the_queue_is_counted_once_in_the_batch_metrics(
    server_factory: ServerFactory,
) -> None:
    """A stream's second chunk joins the run of its first (which has no offset, so the queue cannot tell),
    and the engine sends it back to the queue when its offset turns out wrong: judged again alone, a 409.
    Its wait and its place in a batch were observed once more when the next batch took it: two chunks
    counted as three in gru_queue_wait_seconds and gru_batch_size."""
    server = server_factory(GRU_MAX_BATCH_DELAY_MS="300")  # both frames are queued before a batch is taken
    values = series(5, seed=3)
    url = server.url.replace("http://", "ws://") + f"/v1/sessions/{new_id('back')}/stream"
    with connect(url, open_timeout=30) as ws:
        ws.send(orjson.dumps({"values": values[:3].tolist()}).decode())
        ws.send(orjson.dumps({"values": values[3:].tolist(), "offset": 7}).decode())  # the run ends at 3
        answers = [orjson.loads(ws.recv(timeout=60)) for _ in range(2)]
    assert [answers[0]["position"], answers[1]["status"], answers[1]["position"]] == [3, 409, 3]
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert metric(client, "gru_queue_wait_seconds_count") == 2
        assert metric(client, "gru_batch_size_sum") == 2
