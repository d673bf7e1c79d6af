"""BatchQueue: where chunks wait for the engine, and how a batch is picked from them.

The queue's rules, as Ray Serve's ``_BatchQueue`` and Text Generation Inference's ``State::next_batch`` keep
theirs apart from the model:

- a batch holds up to ``max_batch_size`` chunks of *distinct* sessions, oldest first; a second chunk of a
  session waits for a later batch and keeps its place ahead of that session's newer chunks, so one session's
  calls apply one at a time, in arrival order;
- a batch waits at most ``max_batch_delay_ms`` to fill (under load the queue fills while a batch computes);
- at ``max_queue`` waiting chunks a new one is refused at once (429), counted where it happens;
- a chunk not answered within ``timeout_seconds`` is withdrawn if still waiting, or dropped when its batch
  finishes; its caller hears so (503) and may retry with the same offset.

It knows no model and no store: a chunk's answer is whatever its consumer sets on its future.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from service.extras import NO_EXTRAS, Extras
from service.metrics import Metrics
from service.refusals import Overloaded, TimedOut


def _new_future() -> asyncio.Future[bytes]:
    return asyncio.get_running_loop().create_future()


@dataclass(slots=True, eq=False)
class Chunk:
    """One request's work: a session's chunk (key set) or a stateless series (key None)."""

    key: str | None
    values: np.ndarray  # (T, F) float32
    offset: int | None
    horizon: int
    must_exist: bool = False  # refuse (404) rather than create an unknown session, judged atomically (v2)
    restart: bool = False  # start the session again from a fresh state at 0, in one commit (v2 sequence_start)
    extras: Extras = NO_EXTRAS  # intervals and scores asked for
    future: asyncio.Future[bytes] = field(default_factory=_new_future)  # its answer (JSON bytes) or refusal
    enqueued: float = field(default_factory=time.perf_counter)


def settle(chunk: Chunk, answer: bytes | None = None, exc: BaseException | None = None) -> None:
    """Answer ``chunk`` (with ``answer``, or refuse it with ``exc``) unless its caller already left."""
    if chunk.future.done():  # timed out and told so
        return
    if exc is not None:
        chunk.future.set_exception(exc)
    else:
        chunk.future.set_result(answer)  # type: ignore[arg-type]


class BatchQueue:
    def __init__(self, metrics: Metrics, *, max_batch_size: int, max_batch_delay_ms: float, max_queue: int,
                 timeout_seconds: float):
        self._metrics = metrics
        self._max_batch = max_batch_size
        self._delay = max_batch_delay_ms / 1000
        self._max_queue = max_queue
        self._timeout = timeout_seconds
        self._waiting: deque[Chunk] = deque()
        self._wake = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._waiting)

    async def submit(self, chunk: Chunk) -> bytes:
        """Queue ``chunk`` and wait for its answer; refused at once when the queue is full."""
        if len(self._waiting) >= self._max_queue:
            self._metrics.rejected.labels(reason="queue_full").inc()
            raise Overloaded(f"{len(self._waiting)} chunks are already waiting; retry shortly", retry_after=1)
        self._waiting.append(chunk)
        self._wake.set()
        # A plain timer rather than wait_for(shield(...)): two fewer tasks per chunk on the hot path.
        timer = asyncio.get_running_loop().call_later(self._timeout, self._expire, chunk)
        try:
            return await chunk.future
        finally:
            timer.cancel()

    def _expire(self, chunk: Chunk) -> None:
        """The chunk's time is up: withdrawn if still waiting; one in a running batch is dropped by its
        consumer (its future is done), so the client's next move never meets it later."""
        if chunk.future.done():
            return
        self._metrics.rejected.labels(reason="timeout").inc()
        if chunk in self._waiting:
            self._waiting.remove(chunk)
        chunk.future.set_exception(TimedOut(
            f"the chunk was not computed within {self._timeout:g} s; retry with the same offset (a retry of an"
            " applied chunk returns its answer)", retry_after=1,
        ))

    def requeue(self, chunks: Iterable[Chunk]) -> None:
        """Put chunks back at the front, in their order, ahead of everything newer (a commit that lost a race
        is judged again before the session's later chunks)."""
        self._waiting.extendleft(reversed(list(chunks)))
        self._wake.set()

    def hand_over(self, chunk: Chunk) -> None:
        """Take a chunk another queue's consumer routed here (another model version's engine), behind what
        waits: its caller still waits on its future, under its first queue's timeout."""
        self._waiting.append(chunk)
        self._wake.set()

    def close(self) -> None:
        """Stop waiting for batches to fill; ``next_batch`` drains what waits, then returns None."""
        self._closed = True
        self._wake.set()

    async def next_batch(self) -> list[Chunk] | None:
        """The next batch, once there is one (waiting up to the batch delay for it to fill); None when the
        queue is closed and empty."""
        while not self._waiting:
            if self._closed:
                return None
            self._wake.clear()
            await self._wake.wait()
        await self._fill()
        batch = self._take()
        now = time.perf_counter()
        for chunk in batch:
            self._metrics.queue_wait.observe(now - chunk.enqueued)
        self._metrics.batch_size.observe(len(batch))
        return batch

    async def _fill(self) -> None:
        deadline = time.perf_counter() + self._delay
        while len(self._waiting) < self._max_batch and not self._closed:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return

    def _take(self) -> list[Chunk]:
        """Up to max_batch chunks of distinct sessions, oldest first; the rest keep their order."""
        batch: list[Chunk] = []
        keys: set[str] = set()
        kept: deque[Chunk] = deque()
        while self._waiting and len(batch) < self._max_batch:
            chunk = self._waiting.popleft()
            if chunk.key is not None and chunk.key in keys:
                kept.append(chunk)
                continue
            if chunk.key is not None:
                keys.add(chunk.key)
            batch.append(chunk)
        self._waiting.extendleft(reversed(kept))
        return batch
