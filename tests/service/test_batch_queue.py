"""The batch queue alone, with no model and no store: which chunks form a batch, in what order, and what is
refused or withdrawn (docs/architecture.md, "One chunk, from the socket to the store and back")."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest

from service.batch_queue import BatchQueue, Chunk, settle
from service.metrics import Metrics
from service.refusals import Overloaded, TimedOut

_NO_VALUES = np.zeros((1, 1), dtype=np.float32)


def _queue(metrics: Metrics | None = None, **limits: float) -> BatchQueue:
    options: dict[str, Any] = {"max_batch_size": 4, "max_batch_delay_ms": 0.0, "max_queue": 100,
                               "timeout_seconds": 30.0, **limits}
    return BatchQueue(metrics or Metrics(), **options)


def _run(scenario: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(scenario())  # type: ignore[arg-type]


def _chunk(key: str | None, offset: int | None = None) -> Chunk:
    return Chunk(key, _NO_VALUES, offset, 0)


def _names(batch: list[Chunk] | None) -> list[tuple[str | None, int | None]]:
    assert batch is not None
    return [(c.key, c.offset) for c in batch]


async def _submit_all(queue: BatchQueue, chunks: list[Chunk]) -> list[asyncio.Task[bytes]]:
    tasks = [asyncio.ensure_future(queue.submit(c)) for c in chunks]
    await asyncio.sleep(0)  # every submit has queued its chunk
    return tasks


def test_a_batch_takes_distinct_sessions_oldest_first_and_keeps_the_rest_in_order() -> None:
    async def scenario() -> list[list[tuple[str | None, int | None]]]:
        queue = _queue(max_batch_size=3)
        chunks = [_chunk("a", 0), _chunk("a", 1), _chunk("b", 0), _chunk(None), _chunk("a", 2), _chunk("c", 0)]
        tasks = await _submit_all(queue, chunks)
        batches = [_names(await queue.next_batch()) for _ in range(3)]
        for task in tasks:
            task.cancel()
        return batches

    first, second, third = _run(scenario)
    assert first == [("a", 0), ("b", 0), (None, None)]  # a's second chunk waits; stateless chunks are distinct
    assert second == [("a", 1), ("c", 0)]  # a's chunks stay in arrival order, ahead of newer sessions
    assert third == [("a", 2)]


def test_stateless_chunks_never_hold_each_other_back() -> None:
    async def scenario() -> list[tuple[str | None, int | None]]:
        queue = _queue(max_batch_size=8)
        tasks = await _submit_all(queue, [_chunk(None) for _ in range(5)])
        batch = _names(await queue.next_batch())
        for task in tasks:
            task.cancel()
        return batch

    assert _run(scenario) == [(None, None)] * 5


def test_a_requeued_chunk_goes_before_everything_newer() -> None:
    async def scenario() -> tuple[list[Any], list[Any]]:
        queue = _queue(max_batch_size=2)
        tasks = await _submit_all(queue, [_chunk("a", 0), _chunk("b", 0), _chunk("a", 5), _chunk("c", 0)])
        first = await queue.next_batch()
        assert first is not None
        queue.requeue(first)  # both lost their commit race: judged again before a's later chunk
        again = _names(await queue.next_batch())
        after = _names(await queue.next_batch())
        for task in tasks:
            task.cancel()
        return again, after

    again, after = _run(scenario)
    assert again == [("a", 0), ("b", 0)]
    assert after == [("a", 5), ("c", 0)]


def test_the_queue_holds_exactly_max_queue_chunks_and_counts_the_refusal() -> None:
    metrics = Metrics()

    async def scenario() -> None:
        queue = _queue(metrics, max_queue=2)
        tasks = await _submit_all(queue, [_chunk("a"), _chunk("b")])
        with pytest.raises(Overloaded) as refused:
            await queue.submit(_chunk("c"))
        assert refused.value.retry_after == 1 and len(queue) == 2
        for task in tasks:
            task.cancel()

    _run(scenario)
    assert metrics.rejected.labels(reason="queue_full")._value.get() == 1


def test_a_chunk_not_taken_in_time_is_withdrawn_and_refused() -> None:
    metrics = Metrics()

    async def scenario() -> None:
        queue = _queue(metrics, timeout_seconds=0.05)
        with pytest.raises(TimedOut):
            await queue.submit(_chunk("a", 3))
        assert len(queue) == 0  # a later batch never meets it

    _run(scenario)
    assert metrics.rejected.labels(reason="timeout")._value.get() == 1


def test_a_batch_left_empty_by_timeouts_while_it_filled_is_not_counted_as_one() -> None:
    """The only chunk times out while its batch waits to fill: the batch takes nothing, and used to be
    observed in gru_batch_size as a batch of no chunks."""
    metrics = Metrics()

    async def scenario() -> None:
        queue = _queue(metrics, timeout_seconds=0.05, max_batch_delay_ms=200)
        task = asyncio.ensure_future(queue.submit(_chunk("a")))
        assert await queue.next_batch() == []
        with pytest.raises(TimedOut):
            await task

    _run(scenario)
    assert sum(bucket.get() for bucket in metrics.batch_size._buckets) == 0
    assert sum(bucket.get() for bucket in metrics.queue_wait._buckets) == 0


def test_a_chunk_timed_out_in_a_running_batch_keeps_its_refusal_when_settled_later() -> None:
    async def scenario() -> None:
        queue = _queue(timeout_seconds=0.05)
        task = asyncio.ensure_future(queue.submit(_chunk("a")))
        batch = await queue.next_batch()  # taken: now it is "computing"
        assert batch is not None
        with pytest.raises(TimedOut):
            await task
        settle(batch[0], b"late")  # the consumer finishing it later changes nothing
        assert isinstance(batch[0].future.exception(), TimedOut)

    _run(scenario)


def test_chunks_queued_at_different_times_each_time_out_at_their_own_deadline() -> None:
    """One timer serves the queue: after the oldest chunk expires it waits for the next one's deadline, and
    a chunk answered meanwhile is never refused."""

    async def scenario() -> None:
        queue = _queue(timeout_seconds=0.2)
        first = asyncio.ensure_future(queue.submit(_chunk("a")))
        await asyncio.sleep(0.1)
        answered = asyncio.ensure_future(queue.submit(_chunk("b")))
        second = asyncio.ensure_future(queue.submit(_chunk("c")))
        await asyncio.sleep(0)
        batch = await queue.next_batch()
        assert batch is not None and _names(batch) == [("a", None), ("b", None), ("c", None)]
        settle(batch[1], b"done")  # b is answered; a and c stay in the "running" batch, never settled
        await asyncio.sleep(0.15)  # 0.25 s after a, 0.15 s after c
        assert isinstance(first.exception(), TimedOut) and not second.done()
        assert await answered == b"done"
        with pytest.raises(TimedOut):
            await asyncio.wait_for(second, 1)

    _run(scenario)


def test_a_batch_waits_up_to_the_delay_to_fill_and_no_longer() -> None:
    async def scenario() -> tuple[float, int, float, int]:
        queue = _queue(max_batch_size=3, max_batch_delay_ms=100)
        tasks = await _submit_all(queue, [_chunk("a")])
        asyncio.get_running_loop().call_later(0.02, lambda: tasks.append(asyncio.ensure_future(
            queue.submit(_chunk("b")))))
        began = time.perf_counter()
        partial = await queue.next_batch()  # b joins within the delay; the third never comes
        waited_partial = time.perf_counter() - began
        more = await _submit_all(queue, [_chunk(k) for k in "xyz"])
        began = time.perf_counter()
        full = await queue.next_batch()  # already full: no wait at all
        waited_full = time.perf_counter() - began
        for task in [*tasks, *more]:
            task.cancel()
        assert partial is not None and full is not None
        return waited_partial, len(partial), waited_full, len(full)

    waited_partial, partial, waited_full, full = _run(scenario)
    assert partial == 2 and 0.09 <= waited_partial < 1.0
    assert full == 3 and waited_full < 0.09


def test_a_closed_queue_drains_what_waits_then_ends() -> None:
    async def scenario() -> tuple[list[Any], list[Chunk] | None]:
        queue = _queue(max_batch_size=8, max_batch_delay_ms=10_000)
        tasks = await _submit_all(queue, [_chunk("a"), _chunk("b")])
        queue.close()  # no waiting for the 10 s delay: the batch goes as it is
        drained = _names(await asyncio.wait_for(queue.next_batch(), 1))
        end = await asyncio.wait_for(queue.next_batch(), 1)
        for task in tasks:
            task.cancel()
        return drained, end

    drained, end = _run(scenario)
    assert drained == [("a", None), ("b", None)] and end is None


def test_submit_answers_with_what_the_consumer_settles_and_records_the_wait() -> None:
    metrics = Metrics()

    async def scenario() -> bytes:
        queue = _queue(metrics)
        task = asyncio.ensure_future(queue.submit(_chunk("a")))
        batch = await queue.next_batch()
        assert batch is not None
        settle(batch[0], b'{"ok":true}')
        return await task

    assert _run(scenario) == b'{"ok":true}'
    assert metrics.registry.get_sample_value("gru_batch_size_sum") == 1
    assert metrics.registry.get_sample_value("gru_queue_wait_seconds_count") == 1


def test_places_are_handed_out_in_the_order_asked_as_chunks_leave_and_never_overfill_the_queue() -> None:
    async def scenario() -> tuple[list[int], int, list[int]]:
        queue = _queue(max_queue=2, max_batch_size=1)
        held = [await queue.reserve(0), await queue.reserve(0)]  # the room there was
        assert None not in held and queue.full
        got: list[int] = []

        async def ask(n: int) -> None:
            place = await queue.reserve(None)
            assert place is not None
            got.append(n)
            queue.put(_chunk(f"w{n}"), place)

        waiters = [asyncio.ensure_future(ask(n)) for n in range(4)]
        await asyncio.sleep(0)
        assert await queue.reserve(0) is None  # full, and others asked first
        for i, place in enumerate(held):
            queue.put(_chunk(f"h{i}"), place)
        assert got == [] and len(queue) == 2
        await queue.next_batch()  # one chunk leaves: exactly one place is handed on
        await asyncio.sleep(0)
        first = list(got)
        most = len(queue)
        for _ in range(3):
            await queue.next_batch()
            await asyncio.sleep(0)
            most = max(most, len(queue))
        await asyncio.gather(*waiters)
        return first, most, got

    first, most, order = _run(scenario)
    assert first == [0]
    assert most <= 2
    assert order == [0, 1, 2, 3]


def test_a_place_given_back_unused_goes_to_the_next_in_line_and_patience_runs_out() -> None:
    async def scenario() -> tuple[bool, float, bool]:
        queue = _queue(max_queue=1)
        place = await queue.reserve(0)
        assert place is not None
        began = time.perf_counter()
        timed_out = await queue.reserve(0.05) is None
        waited = time.perf_counter() - began
        later = asyncio.ensure_future(queue.reserve(5))
        await asyncio.sleep(0)
        place.give_back()  # refused before it was queued: the place is not lost
        place.give_back()  # twice is once
        handed = await later
        return timed_out, waited, handed is not None and queue.full

    timed_out, waited, handed = _run(scenario)
    assert timed_out and waited >= 0.05
    assert handed


def test_a_place_in_another_queue_is_not_filled_there_and_stays_its_holder_s() -> None:
    """A chunk routed to another version's engine while its caller waited: that queue judges it as any other
    caller's, and the place it waited for stays reserved until given back."""

    async def scenario() -> tuple[bool, bool, bool, bool]:
        first, second = _queue(max_queue=1), _queue(max_queue=1)
        place = await first.reserve(0)
        assert place is not None
        second.put(_chunk("k0"), place)  # room in the second queue: queued, without the first's place
        refused = False
        try:
            second.put(_chunk("k1"), place)
        except Overloaded:
            refused = True
        still_reserved = first.full and await first.reserve(0) is None
        place.give_back()
        return refused, still_reserved, len(second) == 1, not first.full

    refused, still_reserved, one_queued, freed = _run(scenario)
    assert refused and still_reserved and one_queued and freed


def _run_names(batch: list[Chunk] | None) -> list[list[tuple[str | None, int | None]]]:
    """Each chunk of the batch with the chunks joined to it (its run)."""
    assert batch is not None
    return [_names([c, *c.joined]) for c in batch]


def test_a_session_s_chunks_that_continue_each_other_join_its_run_even_past_a_full_batch() -> None:
    """Runs form from the whole queue, the batch's sessions only: a session that missed the full batch keeps
    all its chunks, in order, for the next one; stateless chunks never join; a restart, a chunk after one
    asking a forecast, or at another offset ends its session's run; max_run_steps bounds it."""
    async def scenario() -> tuple[list[Any], list[Any], list[Any]]:
        queue = _queue(max_batch_size=2, max_run_steps=3)
        forecast = Chunk("b", _NO_VALUES, 1, 4)
        restart = Chunk("a", _NO_VALUES, None, 0, restart=True)
        chunks = [_chunk("a", 0), _chunk("b", 0), _chunk("c", 0), _chunk("a", 1), forecast, _chunk("c", 1),
                  _chunk("b", 2), _chunk("a", None), restart, _chunk(None), _chunk("a", 9), _chunk(None)]
        tasks = await _submit_all(queue, chunks)
        batches = [_run_names(await queue.next_batch()) for _ in range(3)]
        for task in tasks:
            task.cancel()
        return batches[0], batches[1], batches[2]

    first, second, third = _run(scenario)
    assert first == [[("a", 0), ("a", 1), ("a", None)], [("b", 0), ("b", 1)]]
    assert second == [[("c", 0), ("c", 1)], [("b", 2)]]
    assert third == [[("a", None)], [(None, None)]]  # the restart, then a stateless chunk


def test_a_run_goes_back_to_the_queue_chunk_by_chunk_and_forms_again() -> None:
    async def scenario() -> tuple[list[Any], list[Any]]:
        queue = _queue(max_run_steps=10)
        tasks = await _submit_all(queue, [_chunk("a", 0), _chunk("a", 1), _chunk("a", 2)])
        first = await queue.next_batch()
        assert first is not None
        queue.requeue(first)
        again = await queue.next_batch()
        assert again is not None and not any(c.joined for c in first[1:])
        queue.hand_over(again[0])
        handed = await queue.next_batch()
        for task in tasks:
            task.cancel()
        return _run_names(again), _run_names(handed)

    again, handed = _run(scenario)
    assert again == handed == [[("a", 0), ("a", 1), ("a", 2)]]


def test_with_runs_a_batch_waits_for_as_many_sessions_unless_their_runs_are_full() -> None:
    """Two chunks of one session do not fill a batch of two: it waits for a second session (whose chunk
    arrives later) or the delay; chunks enough to fill the waiting sessions' runs start it at once, and so
    do chunks asking forecasts (each ends its run)."""
    async def scenario() -> tuple[float, list[Any], float, list[Any]]:
        queue = _queue(max_batch_size=2, max_batch_delay_ms=5000, max_run_steps=3)
        tasks = await _submit_all(queue, [_chunk("a", 0), _chunk("a", 1)])
        asyncio.get_running_loop().call_later(0.05, lambda: tasks.append(asyncio.ensure_future(
            queue.submit(_chunk("b", 0)))))
        began = time.perf_counter()
        first = _run_names(await queue.next_batch())
        waited_first = time.perf_counter() - began
        tasks += await _submit_all(queue, [_chunk("c", k) for k in range(4)])  # a backlog: c's run is full
        began = time.perf_counter()
        backlog = _run_names(await queue.next_batch())
        waited_backlog = time.perf_counter() - began
        other = _queue(max_batch_size=3, max_batch_delay_ms=5000, max_run_steps=3)
        asking = [Chunk("d", _NO_VALUES, 0, 2), Chunk("d", _NO_VALUES, 1, 2), Chunk("e", _NO_VALUES, 0, 2)]
        tasks += await _submit_all(other, asking)  # each asks a forecast: no run can grow
        began = time.perf_counter()
        forecasts = _run_names(await other.next_batch())
        waited_forecasts = time.perf_counter() - began
        for task in tasks:
            task.cancel()
        return waited_first, first, max(waited_backlog, waited_forecasts), [*backlog, *forecasts]

    waited_first, first, waited_full, full = _run(scenario)
    assert first == [[("a", 0), ("a", 1)], [("b", 0)]] and 0.04 <= waited_first < 4
    assert full == [[("c", 0), ("c", 1), ("c", 2)], [("d", 0)], [("e", 0)]] and waited_full < 1
