"""BatchQueue: where chunks wait for the engine, and how a batch is picked from them.

The queue's rules, as Ray Serve's ``_BatchQueue`` and Text Generation Inference's ``State::next_batch`` keep
theirs apart from the model:

- a batch holds up to ``max_batch_size`` chunks of *distinct* sessions, oldest first; one session's calls
  apply in arrival order. A session's later chunks that continue its chunk in the batch (each starting where
  the one before ends: no offset, or the next offset; only the last may ask a forecast) join it as one *run*
  of at most ``max_run_steps`` steps, computed as one row and committed once (a stream's pipelined chunks,
  a backlog after a reconnect); any other keeps its place for a later batch, ahead of the session's newer
  chunks. The engine checks the offsets the queue cannot know (a run's first chunk without one);
- a batch waits at most ``max_batch_delay_ms`` to fill (under load the queue fills while a batch computes):
  with runs, until ``max_batch_size`` sessions wait, or their runs are full;
- at ``max_queue`` waiting chunks a new one is refused at once (429), counted where it happens; a caller
  that can wait before it has parsed anything (a predict call whose body is unread, a stream) asks for a
  place with ``reserve()``: places are handed out one at a time, in the order they were asked for, as
  chunks leave the queue, so a crowd of waiters costs nothing and never overfills it;
- a chunk not answered within ``timeout_seconds`` is withdrawn if still waiting, or dropped when its batch
  finishes; its caller hears so (503) and may retry with the same offset. One whose batch is writing it to
  the store when its time is up gets the write's outcome instead: the write may apply it, and a run keeps
  only its last chunk's answer, so a 503 for an earlier chunk of it could not be retried for its answer.
  Every chunk has the same timeout, so their deadlines come in the order they were queued: one timer, for
  the oldest unanswered, serves them all (a timer and a done-callback per chunk were a measurable share of
  a short chunk's cost). A chunk whose caller left (its future cancelled: a stream closed before it was
  answered) is dropped when a batch meets it, never computed; one past its deadline is refused there even
  if the timer has not come to it (the timer waits on a chunk ahead being written).

It knows no model and no store: a chunk's answer is whatever its consumer sets on its future.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from service.extras import NO_EXTRAS, Extras
from service.metrics import Metrics
from service.refusals import Overloaded, TimedOut

_TIMER_SLACK = 0.001  # seconds: uvloop's timers and clock tick in milliseconds, so one may fire a tick early
_COMMIT_RECHECK = 0.01  # seconds: how often a chunk past its deadline whose batch is writing it is looked at


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
    deadline: float = math.inf  # loop time by which it must be answered, set as it is queued
    # its batch is writing it to the store: its deadline waits for the write, which applies it or not
    committing: bool = False
    counted: bool = False  # its wait and its place in a batch observed: once, whatever batches take it again
    joined: tuple[Chunk, ...] = ()  # taken in a batch: the session's next chunks, run after this one
    alone: bool = False  # never part of a run (its run's outputs were not finite: each chunk is judged alone)

    def continued_by(self, later: Chunk) -> bool:
        """Whether ``later`` (the same session's next chunk) may run right after this one in one run: this
        one asks no forecast, ``later`` does not start the session again, and its offset, where both have
        one (a restart's is 0), is where this one ends."""
        start = 0 if self.restart else self.offset
        return (not self.horizon and not later.restart and not later.alone
                and (later.offset is None or start is None or later.offset == start + len(self.values)))


def settle(chunk: Chunk, answer: bytes | None = None, exc: BaseException | None = None) -> None:
    """Answer ``chunk`` (with ``answer``, or refuse it with ``exc``) unless its caller already left."""
    if chunk.future.done():  # timed out and told so
        return
    if exc is not None:
        chunk.future.set_exception(exc)
    else:
        chunk.future.set_result(answer)  # type: ignore[arg-type]


class Place:
    """A place in the queue, reserved for one chunk: filled by ``BatchQueue.put`` or given back."""

    __slots__ = ("_held", "_queue")

    def __init__(self, queue: BatchQueue):
        self._queue = queue
        self._held = True

    def take(self) -> bool:
        """Whether the place was still held (and is now the chunk's)."""
        held, self._held = self._held, False
        return held

    def fills(self, queue: BatchQueue) -> bool:
        """Whether the place is in ``queue`` and still held (and is now the chunk's). A place in another
        queue (the chunk was routed elsewhere while it waited: a version changed) is left to its holder."""
        return queue is self._queue and self.take()

    def give_back(self) -> None:
        """Unused (the chunk was refused before it was queued): the place goes to the next caller asking."""
        if self.take():
            self._queue._give_back()


class BatchQueue:
    def __init__(self, metrics: Metrics, *, max_batch_size: int, max_batch_delay_ms: float, max_queue: int,
                 timeout_seconds: float, max_run_steps: int = 0):
        self._metrics = metrics
        self._max_batch = max_batch_size
        self._max_run = max_run_steps  # 0: every chunk runs alone
        self._delay = max_batch_delay_ms / 1000
        self._max_queue = max_queue
        self._timeout = timeout_seconds
        self._waiting: deque[Chunk] = deque()
        self._wake = asyncio.Event()
        self._reserved = 0  # places handed out and not yet filled by ``put``
        self._asking: deque[asyncio.Future[None]] = deque()  # callers waiting for a place, oldest first
        self._closed = False
        self._clocked: deque[Chunk] = deque()  # by deadline, oldest first
        self._timer: asyncio.TimerHandle | None = None  # at the oldest deadline of ``_clocked``

    def __len__(self) -> int:
        return len(self._waiting)

    @property
    def full(self) -> bool:
        return len(self._waiting) + self._reserved >= self._max_queue

    def has_room(self, count: int) -> bool:
        """Whether ``count`` chunks put now would all find a place (none taken from a caller waiting for one)."""
        return not self._asking and len(self._waiting) + self._reserved + count <= self._max_queue

    def overloaded(self, reason: str = "queue_full", count: int = 1) -> Overloaded:
        """The refusal of ``count`` chunks (taken together or not at all) that find the queue full, counted
        under ``reason`` (where they were refused)."""
        self._metrics.rejected.labels(reason=reason).inc(count)
        room = max(0, self._max_queue - len(self._waiting) - self._reserved)
        ahead = f"; the call's {count} chunks go together or not at all, {room} places are free" if count > 1 else ""
        return Overloaded(f"{len(self._waiting)} chunks are already waiting{ahead}; retry shortly", retry_after=1)

    def try_reserve(self) -> Place | None:
        """A place at once while there is room and nobody waits before us, else None (``reserve`` waits)."""
        if self.full or self._asking:
            return None
        self._reserved += 1
        return Place(self)

    async def reserve(self, patience: float | None) -> Place | None:
        """A place for a chunk not parsed yet: at once while there is room and nobody waits before us, else
        the first one that frees up after theirs; None if none came within ``patience`` seconds (None:
        wait as long as it takes)."""
        place = self.try_reserve()
        if place is not None:
            return place
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._asking.append(turn)
        try:
            async with asyncio.timeout(patience):
                await turn
        except (TimeoutError, asyncio.CancelledError) as stopped:
            if turn.done() and not turn.cancelled():
                self._give_back()  # handed a place just as the wait ended: it goes to the next in line
            else:
                turn.cancel()
                with contextlib.suppress(ValueError):  # already dropped by _hand_out
                    self._asking.remove(turn)
            if isinstance(stopped, TimeoutError):
                return None
            raise
        return Place(self)

    def _give_back(self) -> None:
        self._reserved -= 1
        self._hand_out()

    def _hand_out(self) -> None:
        """Hand free places to the oldest callers asking for one."""
        while self._asking and len(self._waiting) + self._reserved < self._max_queue:
            turn = self._asking.popleft()
            if not turn.done():
                self._reserved += 1
                turn.set_result(None)

    def put(self, chunk: Chunk, place: Place | None = None) -> asyncio.Future[bytes]:
        """Queue ``chunk`` (in ``place`` if given and in this queue, else refused at once when the queue is
        full) and start its clock; its answer's future."""
        if place is not None and place.fills(self):
            self._reserved -= 1
        elif self.full:
            raise self.overloaded()
        self._waiting.append(chunk)
        self._wake.set()
        self._clock(chunk)
        return chunk.future

    def _clock(self, chunk: Chunk) -> None:
        """Start ``chunk``'s clock; the answered chunks at the front stop being watched."""
        clocked = self._clocked
        while clocked and clocked[0].future.done():
            clocked.popleft()
        loop = asyncio.get_running_loop()
        chunk.deadline = loop.time() + self._timeout
        clocked.append(chunk)
        if self._timer is None:
            self._timer = loop.call_at(clocked[0].deadline, self._expire_due)

    def _expire_due(self) -> None:
        """Expire every unanswered chunk whose time is up; the timer then waits for the next one."""
        self._timer = None
        clocked = self._clocked
        loop = asyncio.get_running_loop()
        now = loop.time() + _TIMER_SLACK
        while clocked:
            chunk = clocked[0]
            if not chunk.future.done():
                if chunk.deadline > now:
                    self._timer = loop.call_at(chunk.deadline, self._expire_due)
                    return
                if chunk.committing:  # answered when the write returns; expired after it if it goes back
                    self._timer = loop.call_at(now + _COMMIT_RECHECK, self._expire_due)
                    return
                self._expire(chunk)
            clocked.popleft()

    async def submit(self, chunk: Chunk) -> bytes:
        """Queue ``chunk`` and wait for its answer; refused at once when the queue is full."""
        return await self.put(chunk)

    def _expire(self, chunk: Chunk) -> None:
        """The chunk's time is up: withdrawn if still waiting; one in a running batch is dropped by its
        consumer (its future is done), so the client's next move never meets it later."""
        if chunk.future.done():
            return
        if chunk in self._waiting:
            self._waiting.remove(chunk)
            self._hand_out()
        self._refuse_late(chunk)

    def _refuse_late(self, chunk: Chunk) -> None:
        """Tell ``chunk``'s caller its time is up (503), counted."""
        self._metrics.rejected.labels(reason="timeout").inc()
        chunk.future.set_exception(TimedOut(
            f"the chunk was not computed within {self._timeout:g} s; retry with the same offset (a retry of an"
            " applied chunk returns its answer)", retry_after=1,
        ))

    def requeue(self, chunks: Iterable[Chunk]) -> None:
        """Put chunks back at the front, in their order, ahead of everything newer (a commit that lost a race
        is judged again before the session's later chunks); a run's chunks go back one by one."""
        self._waiting.extendleft(reversed(_unrun(chunks)))
        self._wake.set()

    def hand_over(self, chunk: Chunk) -> None:
        """Take a chunk another queue's consumer routed here (another model version's engine), behind what
        waits, with the chunks of its run after it: its caller still waits on its future, under its first
        queue's timeout."""
        self._waiting.extend(_unrun([chunk]))
        self._wake.set()

    def keys(self) -> set[str]:
        """The sessions with chunks waiting here (a waiting chunk has no run: runs form as a batch is taken)."""
        return {chunk.key for chunk in self._waiting if chunk.key is not None}

    def withdraw(self, key: str) -> list[Chunk]:
        """Take every waiting chunk of session ``key`` out, in their order (to follow one of them handed to
        another queue, so that no later chunk of the session overtakes it there)."""
        taken = [chunk for chunk in self._waiting if chunk.key == key]
        if taken:
            self._waiting = deque(chunk for chunk in self._waiting if chunk.key != key)
            self._hand_out()
        return taken

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
        self._observe(batch)
        return batch

    def _observe(self, batch: list[Chunk]) -> None:
        """Observe the wait of each chunk taken for the first time, and how many there are as the batch's
        size: a chunk back from a batch (requeued, or handed over to another version's queue) was counted
        there, and a batch that takes none (its chunks timed out while it filled) is not counted at all."""
        fresh = [chunk for first in batch for chunk in (first, *first.joined) if not chunk.counted]
        if not fresh:
            return
        now = time.perf_counter()
        for chunk in fresh:
            chunk.counted = True
            self._metrics.queue_wait.observe(now - chunk.enqueued)
        self._metrics.batch_size.observe(len(fresh))

    async def _fill(self) -> None:
        deadline = time.perf_counter() + self._delay
        while self._batch_room() and not self._closed:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except TimeoutError:
                return

    def _batch_room(self) -> bool:
        """Whether the next batch could take more than waits: fewer chunks wait than it holds or, with runs,
        fewer sessions (a session's second chunk, arriving just after its first, joins its run instead of
        waiting a batch for it) whose runs are not full either (a backlog of few sessions starts at once; a
        chunk asking a forecast ends its run, so it counts as a full one)."""
        waiting = self._waiting
        if len(waiting) < self._max_batch:
            return True
        if not self._max_run:
            return False
        sessions = len({c.key if c.key is not None else id(c) for c in waiting})
        steps = sum(self._max_run if c.horizon else len(c.values) for c in waiting)
        return sessions < self._max_batch and steps < sessions * self._max_run

    def _take(self) -> list[Chunk]:
        """Up to max_batch chunks of distinct sessions, oldest first, each with the chunks of its session that
        continue it within ``max_run_steps`` joined to it (``Chunk.joined``); the rest keep their order. A
        chunk already answered (cancelled by its caller, or timed out in another queue after a hand-over) is
        dropped as it is met: computing it would only stretch its batch, and it could not apply. So is one past
        its deadline that the timer has not refused yet (it waits while a chunk ahead of it is being written),
        refused here: computed, it would be refused during its batch and its result dropped."""
        due = asyncio.get_running_loop().time() + _TIMER_SLACK
        batch: list[Chunk] = []
        runs: dict[str, tuple[Chunk, Chunk, int] | None] = {}  # key -> (first, last, steps); None: it ended
        growing = 0  # runs that may still take a chunk
        kept: deque[Chunk] = deque()
        waiting = self._waiting
        while waiting and (len(batch) < self._max_batch or growing):
            chunk = waiting.popleft()
            if chunk.future.done():  # its caller left (a closed stream cancels its unanswered chunks): not run
                continue
            if chunk.deadline <= due:
                self._refuse_late(chunk)
                continue
            key = chunk.key
            if key is not None and key in runs:
                run = runs[key]
                if run is not None:
                    first, last, steps = run
                    steps += len(chunk.values)
                    if steps <= self._max_run and last.continued_by(chunk):
                        first.joined += (chunk,)
                        runs[key] = (first, chunk, steps)
                        continue
                    runs[key] = None  # the run ends here: the session's later chunks wait for a later batch
                    growing -= 1
                kept.append(chunk)
                continue
            if len(batch) >= self._max_batch:
                kept.append(chunk)
                if key is not None:
                    runs[key] = None
                continue
            batch.append(chunk)
            if key is not None:
                steps = len(chunk.values)
                runs[key] = (chunk, chunk, steps) if self._max_run and not chunk.alone else None
                growing += runs[key] is not None
        waiting.extendleft(reversed(kept))
        self._hand_out()
        return batch


def _unrun(chunks: Iterable[Chunk]) -> list[Chunk]:
    """The chunks with each one's run after it, one by one (the runs undone: formed again when taken)."""
    out: list[Chunk] = []
    for chunk in chunks:
        out.append(chunk)
        if chunk.joined:
            out.extend(chunk.joined)
            chunk.joined = ()
    return out
