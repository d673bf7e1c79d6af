"""Engine: the only owner of the model and the device; batches chunks across sessions.

Layering as in Text Generation Inference and Ray Serve's batch queue: routers ``await engine.predict(...)``
and never see a batch; the model never sees asyncio. One worker task on the event loop:

1. takes up to ``max_batch_size`` waiting chunks of *distinct* sessions, in arrival order (a second chunk
   of a session waits for the next batch, so one session's calls apply one at a time, in order), waiting
   at most ``max_batch_delay_ms`` for the batch to fill;
2. loads their records and judges each against the offset rules (service.rules);
3. runs every chunk to apply as one batch on the compute thread: sorted longest first, the batch shrinking
   as short chunks end, states gathered from and new states committed to the store by row;
4. commits with compare-and-set; a chunk whose session changed meanwhile (reset, delete, another replica)
   goes back to the front of the queue and is judged again.

Compute never runs on the event loop: the worker hands each batch to a single-thread executor, as a few
large torch calls, so the GIL is handed back and forth a few times per batch, not per step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from model import Forecaster
from service.metrics import Metrics
from service.refusals import (
    BatchFailed,
    OutOfRange,
    Overloaded,
    ShuttingDown,
    StoreUnreachable,
    TimedOut,
    UnknownSession,
)
from service.rules import Apply, Replay, fingerprint, judge
from service.schemas import encode_answer
from service.sessions.base import Session, SessionStore, StoreUnavailable, Write, session_id_of

log = logging.getLogger("service.engine")
STORE_PROBE_SECONDS = 0.5  # while the store is down, how often it is pinged
_T = TypeVar("_T")


@dataclass(slots=True, eq=False)
class Chunk:
    """One request's work: a session's chunk (key set) or a stateless series (key None)."""

    key: str | None
    values: np.ndarray  # (T, F) float32
    offset: int | None
    horizon: int
    future: asyncio.Future[bytes]
    enqueued: float = field(default_factory=time.perf_counter)
    must_exist: bool = False  # refuse (404) rather than create an unknown session, judged atomically (v2)
    restart: bool = False  # start the session again from a fresh state at 0, in one commit (v2 sequence_start)


@dataclass(slots=True)
class _Run:
    """A chunk judged to apply: the record its state starts from (None: a fresh state), the verdict, and
    the revision its commit expects (the record judged against; None: the session must not exist)."""

    chunk: Chunk
    session: Session | None
    verdict: Apply
    revision: int | str | None


@dataclass(slots=True)
class _Computed:
    predictions: list[np.ndarray]  # per run, (T, F) float32
    forecasts: list[np.ndarray | None]  # per run, (horizon, F) float32
    states: Tensor  # (B, S), row i = run i
    finite: list[bool]  # per run: predictions, forecast and new state all finite


class Engine:
    def __init__(
        self,
        forecaster: Forecaster,
        model_version: str,
        store: SessionStore,
        metrics: Metrics,
        *,
        max_batch_size: int,
        max_batch_delay_ms: float,
        max_queue: int,
        request_timeout_seconds: float,
    ):
        self.forecaster = forecaster
        self.model_version = model_version
        self.store = store
        self.device = next(forecaster.parameters()).device
        self._metrics = metrics
        self._max_batch = max_batch_size
        self._delay = max_batch_delay_ms / 1000
        self._max_queue = max_queue
        self._timeout = request_timeout_seconds
        self._waiting: deque[Chunk] = deque()
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gru-compute")
        self._worker: asyncio.Task[None] | None = None
        self._stopping = False
        self._store_down: StoreUnavailable | None = None  # set from a store failure until a ping answers
        self._probe: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._warm_up)
        self._worker = asyncio.create_task(self._run(), name="gru-engine")

    def _warm_up(self) -> None:
        """Pay the one-off costs before the first client does: TorchScript's profiling runs on CPU, the
        Triton kernel's compilation on a GPU (about a second per model; cached on disk afterwards).

        Triton builds a small C launcher on first use and needs a C compiler for it: where that (or
        anything else of the kernel's) fails, the GPU serves through the TorchScript recurrence instead of
        failing every request, and the log says so.
        """
        try:
            self._exercise_model()
        except Exception:
            gru = self.forecaster.gru
            if not gru.use_fused or self.device.type != "cuda":
                raise
            log.warning("fused GRU kernel unavailable on %s; serving with the TorchScript recurrence",
                        self.device, exc_info=True)
            gru.use_fused = False
            self._exercise_model()

    def _exercise_model(self) -> None:
        with torch.inference_mode():
            x = torch.zeros(2, 2, self.forecaster.num_features, device=self.device)
            for _ in range(3):  # the TorchScript profiling executor optimises after its second run
                state = self.forecaster.initial_state(2)
                y, state = self.forecaster.predict(x, state, [2, 1])  # ragged, then equal rows in rollout
                self.forecaster.rollout(state, y[:, -1], 2)

    async def stop(self) -> None:
        """Refuse new work, finish every chunk already accepted, then release the compute thread."""
        self._stopping = True
        self._wake.set()
        if self._worker is not None:
            await self._worker
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        self._executor.shutdown(wait=True)

    # -- the API routers use ---------------------------------------------------------------------------

    async def predict(
        self, key: str | None, values: np.ndarray, offset: int | None, horizon: int, *,
        must_exist: bool = False, restart: bool = False,
    ) -> bytes:
        """The JSON answer for one chunk (a session's when ``key`` is set, else stateless).

        ``must_exist``: an unknown session is a 404 instead of being created, checked when the chunk is judged
        (a session deleted meanwhile makes the commit lose its race and the chunk judged again, so 404).
        ``restart``: the chunk starts the session again at 0 from a fresh state, whatever it held, in the same
        commit as its result, so a refused chunk (queue full, timeout, out of range) leaves the session as
        it was, which a reset followed by the chunk would not.
        """
        if self._stopping:
            raise ShuttingDown("the service is shutting down; retry on another replica", retry_after=1)
        if len(self._waiting) >= self._max_queue:
            self._metrics.rejected.labels(reason="queue_full").inc()
            raise Overloaded(f"{len(self._waiting)} chunks are already waiting; retry shortly", retry_after=1)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        chunk = Chunk(key, values, offset, horizon, future, must_exist=must_exist, restart=restart)
        self._waiting.append(chunk)
        self._wake.set()
        # A plain timer rather than wait_for(shield(...)): two fewer tasks per chunk on the hot path.
        timer = loop.call_later(self._timeout, self._expire, chunk)
        try:
            return await future
        finally:
            timer.cancel()

    def _expire(self, chunk: Chunk) -> None:
        """The chunk's time is up: a chunk still waiting is withdrawn, one in a running batch is dropped when
        its batch finishes (``_finish``), so the client's next move (a retry, a reset, a delete) never meets
        it later. Only a chunk whose commit is already under way may still apply; a retry with the same
        offset then gets its answer."""
        if chunk.future.done():
            return
        self._metrics.rejected.labels(reason="timeout").inc()
        if chunk in self._waiting:
            self._waiting.remove(chunk)
        chunk.future.set_exception(TimedOut(
            f"the chunk was not computed within {self._timeout:g} s; retry with the same offset (a retry of an"
            " applied chunk returns its answer)", retry_after=1,
        ))

    async def session_info(self, key: str) -> tuple[Session, float]:
        """The session, and when it expires (epoch seconds) if nothing reaches it before."""
        session = await self._store_call(self.store.get(key), "get")
        if session is None:
            raise _unknown(key)
        return session, session.updated_at + self.store.ttl_seconds

    async def delete(self, key: str) -> None:
        if not await self._store_call(self.store.delete(key), "delete"):
            raise _unknown(key)

    async def reset(self, key: str) -> bool:
        _, created = await self._store_call(self.store.reset(key, self.model_version), "reset")
        return created

    async def store_reachable(self) -> bool:
        """A ping (``/readyz``, and the probe during an outage): an answer ends an outage, so ready and
        serving sessions agree; a failure is counted, so an outage shows in the store error rate
        throughout, not only at its first failed call."""
        if await self.store.ping():
            self._store_down = None
            return True
        self._metrics.store_errors.labels(operation="ping").inc()
        return False

    async def _store_call(self, call: Coroutine[Any, Any, _T], operation: str) -> _T:
        if self._store_down is not None:
            call.close()  # never awaited: the outage answers for it
            raise _store_down(self._store_down)
        try:
            return await call
        except StoreUnavailable as exc:
            raise self._store_failed(exc, operation) from exc

    def _store_failed(self, exc: StoreUnavailable, operation: str) -> StoreUnreachable:
        """Count the failure and declare an outage. Until a ping answers, every session call is refused at
        once (``_store_call``) instead of waiting out the store's timeouts: a hung Redis held each batch,
        stateless chunks included, for 8 to 24 s."""
        self._metrics.store_errors.labels(operation=operation).inc()
        self._store_down = exc
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._await_store(), name="gru-store-probe")
        return _store_down(exc)

    async def _await_store(self) -> None:
        while self._store_down is not None and not await self.store_reachable():
            await asyncio.sleep(STORE_PROBE_SECONDS)

    # -- the worker ------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            if not self._waiting:
                if self._stopping:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._fill()
            batch = self._take()
            try:
                await self._process(batch)
            except Exception:  # a bug: fail this batch's requests, keep serving the others
                log.exception("engine batch failed")
                for chunk in batch:
                    _settle(chunk, exc=BatchFailed("the batch failed; it has been logged"))

    async def _fill(self) -> None:
        """Wait up to the batch delay for a full batch; under load the queue fills while we compute."""
        deadline = time.perf_counter() + self._delay
        while len(self._waiting) < self._max_batch and not self._stopping:
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

    async def _process(self, batch: list[Chunk]) -> None:
        now = time.perf_counter()
        for chunk in batch:
            self._metrics.queue_wait.observe(now - chunk.enqueued)
        self._metrics.batch_size.observe(len(batch))
        stateful = [c for c in batch if c.key is not None]
        try:
            keys: list[str] = [c.key for c in stateful]  # type: ignore[misc]
            sessions = await self._store_call(self.store.load(keys), "load") if stateful else []
        except StoreUnreachable as refusal:
            for chunk in stateful:
                _settle(chunk, exc=refusal)
            sessions = []
            batch = [c for c in batch if c.key is None]
        record_of = dict(zip((c.key for c in stateful), sessions, strict=False))
        runs: list[_Run] = []
        for chunk in batch:
            session = record_of.get(chunk.key) if chunk.key is not None else None
            revision = session.revision if session is not None else None
            if chunk.key is None:
                runs.append(_Run(chunk, None, Apply(start=0, created=False), None))
                continue
            if chunk.restart:  # in place of whatever the session held, judged against it for the commit
                runs.append(_Run(chunk, None, Apply(start=0, created=session is None), revision))
                continue
            if session is None and chunk.must_exist:
                _settle(chunk, exc=_unknown(chunk.key))
                continue
            verdict = judge(chunk.key, chunk.offset, chunk.horizon, chunk.values, session, self.model_version)
            if isinstance(verdict, Apply):
                runs.append(_Run(chunk, session, verdict, revision))
            elif isinstance(verdict, Replay):
                _settle(chunk, verdict.answer)
            else:
                _settle(chunk, exc=verdict)
        if not runs:
            return
        loop = asyncio.get_running_loop()
        began = time.perf_counter()
        computed = await loop.run_in_executor(self._executor, self._compute, runs)
        self._metrics.forward_time.observe(time.perf_counter() - began)
        self._metrics.steps.inc(sum(len(r.chunk.values) for r in runs))
        await self._finish(runs, computed)

    async def _finish(self, runs: list[_Run], computed: _Computed) -> None:
        writes: list[Write] = []
        pending: list[tuple[_Run, bytes]] = []
        for row, run in enumerate(runs):
            chunk = run.chunk
            if chunk.future.done():  # its caller timed out and was told so: it must not apply later
                continue
            if not computed.finite[row]:
                _settle(chunk, exc=OutOfRange(
                    "the model's outputs for this chunk are not finite numbers: its values lie far outside the"
                    " range the model was trained on; nothing was changed (if every chunk of a session gets"
                    " this, an earlier chunk left such values in its state: reset it)"))
                continue
            answer = self._answer(run, computed.predictions[row], computed.forecasts[row])
            if chunk.key is None:
                _settle(chunk, answer)
                continue
            start = run.verdict.start
            writes.append(Write(
                key=chunk.key,
                expected_revision=run.revision,
                position=start + len(chunk.values),
                model_version=self.model_version,
                last_offset=start,
                fingerprint=fingerprint(start, chunk.horizon, chunk.values),
                answer=answer,
                row=row,
            ))
            pending.append((run, answer))
        if not writes:
            return
        try:
            committed = await self._store_call(self.store.commit(writes, computed.states), "commit")
        except StoreUnreachable as refusal:
            for run, _ in pending:
                _settle(run.chunk, exc=refusal)
            return
        lost = [run.chunk for (run, _), won in zip(pending, committed, strict=True)
                if won is None and not run.chunk.future.done()]  # timed out while committing: dropped
        for (run, answer), won in zip(pending, committed, strict=True):
            if won is not None:
                _settle(run.chunk, answer)
        if lost:  # the session changed under us: judge these again, ahead of everything newer
            self._metrics.store_conflicts.inc(len(lost))
            self._waiting.extendleft(reversed(lost))
            self._wake.set()

    def _answer(self, run: _Run, predictions: np.ndarray, forecast: np.ndarray | None) -> bytes:
        chunk = run.chunk
        session = None
        if chunk.key is not None:
            session = (session_id_of(chunk.key), run.verdict.start + len(chunk.values), run.verdict.created)
        return encode_answer(predictions, forecast, self.model_version, session)

    # -- the compute thread ----------------------------------------------------------------------------

    def _compute(self, runs: Sequence[_Run]) -> _Computed:
        """One batch through the model: a few large torch calls, no per-step Python."""
        count = len(runs)
        order = sorted(range(count), key=lambda i: -len(runs[i].chunk.values))  # longest first
        lengths = [len(runs[i].chunk.values) for i in order]
        features = self.forecaster.num_features
        padded = np.zeros((count, lengths[0], features), dtype=np.float32)  # (B, T_max, F)
        for row, i in enumerate(order):
            padded[row, : lengths[row]] = runs[i].chunk.values
        with torch.inference_mode():
            x = torch.from_numpy(padded).to(self.device)
            states = self.store.gather([runs[i].session for i in order], self.device)  # (B, S)
            same_length = lengths[0] == lengths[-1]
            y, new_states = self.forecaster.predict(x, states, None if same_length else lengths)
            ends = torch.tensor(lengths, device=self.device) - 1
            last = y[torch.arange(count, device=self.device), ends]  # (B, F): prediction after each last step
            horizons = [runs[i].chunk.horizon for i in order]
            wanting = [row for row, horizon in enumerate(horizons) if horizon]  # rows that asked for a forecast
            forecast_host = np.empty((0, 0, features), dtype=np.float32)
            if wanting:  # only those rows roll out, as far as the longest horizon among them
                pick = torch.tensor(wanting, device=self.device)
                forecast = self.forecaster.rollout(new_states[pick], last[pick], max(horizons))  # (b, h, F)
                forecast_host = forecast.cpu().numpy()
            inverse = torch.tensor(np.argsort(order), device=self.device)
            y_host = y.cpu().numpy()
            states_out = new_states.index_select(0, inverse)  # back to request order
            finite_states: list[bool] = torch.isfinite(states_out).all(dim=1).tolist()
        predictions: list[np.ndarray] = [np.empty(0)] * count
        forecasts: list[np.ndarray | None] = [None] * count
        for row, i in enumerate(order):
            predictions[i] = np.ascontiguousarray(y_host[row, : lengths[row]])
        for picked, row in enumerate(wanting):
            forecasts[order[row]] = np.ascontiguousarray(forecast_host[picked, : horizons[row]])
        finite = [state_ok and _all_finite(predictions[i], forecasts[i]) for i, state_ok in enumerate(finite_states)]
        return _Computed(predictions, forecasts, states_out, finite)


def _all_finite(*arrays: np.ndarray | None) -> bool:
    return all(array is None or bool(np.isfinite(array).all()) for array in arrays)


def _settle(chunk: Chunk, answer: bytes | None = None, exc: BaseException | None = None) -> None:
    if chunk.future.done():  # its caller timed out and left
        return
    if exc is not None:
        chunk.future.set_exception(exc)
    else:
        chunk.future.set_result(answer)  # type: ignore[arg-type]


def _unknown(key: str) -> UnknownSession:
    session_id = session_id_of(key)
    return UnknownSession(f"session {session_id!r} does not exist (expired, deleted or never created)",
                          session_id=session_id)


def _store_down(exc: Exception) -> StoreUnreachable:
    return StoreUnreachable(f"the session store is unreachable ({exc}); nothing was changed, retry shortly",
                            retry_after=2)
