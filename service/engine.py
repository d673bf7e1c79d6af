"""Engine: judges each chunk against its session, computes a batch, commits the results.

Routers ``await engine.predict(...)`` and never see a batch; the model never sees asyncio. The parts, each in
its own module (docs/architecture.md draws them):

- ``service.batch_queue``: where chunks wait, and which of them form the next batch;
- ``service.rules``: the offset rules, one pure function judging a chunk against its session's record;
- ``service.compute``: the batch through the model, on the compute thread;
- the store (``service.sessions``), wrapped by ``GuardedStore`` so it knows when it is down.

One worker task takes a batch, loads its sessions, judges each chunk, computes every chunk to apply as one
batch, then commits with compare-and-set; a chunk whose session changed meanwhile (reset, delete, another
replica) goes back to the front of the queue and is judged again. A run (a chunk with the session's next
chunks joined to it by the queue) is judged by its first chunk, computed as one row and committed as one
write, as if its chunks had applied one after another: each gets the answer it would have got alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from model import Forecaster
from service.batch_queue import BatchQueue, Chunk, Place, settle
from service.compute import BatchCompute, Computed
from service.extras import NO_EXTRAS, Extras
from service.metrics import Metrics
from service.refusals import (
    BatchFailed,
    OutOfRange,
    ShuttingDown,
    StaleModel,
    StoreUnreachable,
    UnknownSession,
    VersionNotLoaded,
)
from service.rules import Apply, Replay, fingerprint, judge
from service.schemas import encode_answer
from service.sessions.base import Revision, Session, SessionStore, Write, session_id_of

log = logging.getLogger("service.engine")
# Where a judged chunk belongs: True when the router took it to another engine (the session's version's).
Router = Callable[[Chunk, "Session | None"], bool]


@dataclass(slots=True)
class _Run:
    """Chunks judged to apply, one after another (one chunk, or a run of one session's): the record their
    state starts from (None: a fresh state), the first one's verdict, and the revision the commit expects
    (the record judged against; None: the session must not exist)."""

    chunks: list[Chunk]
    session: Session | None
    verdict: Apply
    revision: Revision | None
    prior: np.ndarray | None = None  # replay: raw values run first from a fresh state, not answered
    steps: int = 0  # of the chunks, together

    def __post_init__(self) -> None:
        self.steps = len(self.chunks[0].values)

    @property
    def chunk(self) -> Chunk:
        """The last chunk: the one whose fingerprint and answer the session keeps."""
        return self.chunks[-1]

    @property
    def values(self) -> np.ndarray:
        if self.prior is None and len(self.chunks) == 1:
            return self.chunks[0].values
        return np.concatenate([*([] if self.prior is None else [self.prior]), *(c.values for c in self.chunks)])

    def join(self, chunk: Chunk) -> None:
        """Run ``chunk`` after the others."""
        self.chunks.append(chunk)
        self.steps += len(chunk.values)

    @property
    def primed(self) -> int:
        """Leading rows of ``values`` that are not the chunk's: computed, not answered."""
        return 0 if self.prior is None else len(self.prior)


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
        max_run_steps: int = 0,
        label: tuple[str, str] | None = None,
        replay: bool = False,
        surprise_p: float = 0.01,
    ):
        self.forecaster = forecaster
        self.model_version = model_version
        self.label = label  # (model name, repository version) every answer names, when served from one
        self.router: Router | None = None  # set by the model registry (service.models): where a chunk goes
        # set by the registry: whether a session of this version hash may be of a version newer than any loaded
        # here (another replica loaded it first), which no engine here may judge, replay or answer 409 for
        self.unplaced: Callable[[str], bool] | None = None
        self.replay = replay  # GRU_UPGRADE=replay: a session of another version is moved onto this one
        self.store = store
        self.compute = BatchCompute(forecaster, surprise_p)
        self.device = self.compute.device
        self.queue = BatchQueue(metrics, max_batch_size=max_batch_size, max_batch_delay_ms=max_batch_delay_ms,
                                max_queue=max_queue, timeout_seconds=request_timeout_seconds,
                                max_run_steps=max_run_steps)
        self._metrics = metrics
        model, version = label or ("", "")
        self._steps = metrics.steps.labels(model=model, version=version)
        self._forward_time = metrics.forward_time.labels(model=model, version=version)
        self._surprises = metrics.surprises.labels(model=model)
        self._scored = metrics.scored_values.labels(model=model)
        self._worker: asyncio.Task[None] | None = None
        self._running: list[Chunk] = []  # the batch at work, its runs' chunks too; not those it handed on
        # Sessions written by this engine's commits, ever: a drain that counts sessions while one commits may
        # miss a session created on this version, so it keeps a version whose engine wrote since its count began
        self.written = 0
        self._stopping = False

    async def start(self) -> None:
        await self.compute.warm_up()
        self._worker = asyncio.create_task(self._run(), name="gru-engine")

    def refuse_new(self) -> None:
        """Refuse new chunks (503); those queued and those other engines hand over are still taken."""
        self._stopping = True

    @property
    def busy(self) -> bool:
        """Whether chunks wait here or a batch is at work."""
        return bool(self.queue) or bool(self._running)

    @property
    def writing(self) -> bool:
        """Whether the batch at work is writing chunks to the store: the write may apply them, whatever
        becomes of their callers, so a caller cut off now would be told less than the truth."""
        return any(chunk.committing for chunk in self._running)

    async def stop(self) -> None:
        """Refuse new work, finish every chunk already accepted, then release the compute thread."""
        self.refuse_new()
        self.queue.close()
        if self._worker is not None:
            await self._worker
        self.compute.close()

    # -- the API routers use ---------------------------------------------------------------------------

    async def predict(
        self, key: str | None, values: np.ndarray, offset: int | None, horizon: int, *,
        must_exist: bool = False, restart: bool = False, extras: Extras = NO_EXTRAS, place: Place | None = None,
    ) -> bytes:
        """The JSON answer for one chunk (a session's when ``key`` is set, else stateless).

        ``must_exist``: an unknown session is a 404 instead of being created, checked when the chunk is judged
        (a session deleted meanwhile makes the commit lose its race and the chunk judged again, so 404).
        ``restart``: the chunk starts the session again at 0 from a fresh state, whatever it held, in the same
        commit as its result, so a refused chunk (queue full, timeout, out of range) leaves the session as
        it was, which a reset followed by the chunk would not.
        ``extras``: intervals and scores to add to the answer (the routes refuse them without a calibration).
        """
        return await self.enqueue(key, values, offset, horizon, must_exist=must_exist, restart=restart,
                                  extras=extras, place=place)

    def enqueue(
        self, key: str | None, values: np.ndarray, offset: int | None, horizon: int, *,
        must_exist: bool = False, restart: bool = False, extras: Extras = NO_EXTRAS, place: Place | None = None,
    ) -> asyncio.Future[bytes]:
        """``predict`` without the wait: the chunk is queued (or refused) before this returns, so a caller's
        chunks keep the order of its calls; the future holds the answer or the refusal. ``place``: one the
        caller reserved (``queue.reserve``), which the chunk fills."""
        if self._stopping:
            raise ShuttingDown("the service is shutting down; retry on another replica", retry_after=1)
        return self.queue.put(Chunk(key, values, offset, horizon, must_exist=must_exist, restart=restart,
                                    extras=extras), place)

    def keys_in_flight(self) -> set[str]:
        """The sessions with chunks here, waiting or in the batch at work: a chunk of theirs sent to another
        engine now could be judged before those (``ServedModel.add``)."""
        return self.queue.keys() | {chunk.key for chunk in self._running if chunk.key is not None}

    async def session_info(self, key: str) -> tuple[Session, float]:
        """The session, and when it expires (epoch seconds) if nothing reaches it before."""
        session = await self.store.get(key)
        if session is None:
            raise _unknown(key)
        return session, session.last_used + self.store.ttl_seconds

    async def delete(self, key: str) -> None:
        if not await self.store.delete(key):
            raise _unknown(key)

    async def reset(self, key: str) -> bool:
        _, created = await self.store.reset(key, self.model_version)
        return created

    # -- the worker ------------------------------------------------------------------------------------

    async def _run(self) -> None:
        while (batch := await self.queue.next_batch()) is not None:
            self._running = [part for chunk in batch for part in (chunk, *chunk.joined)]  # _judge unjoins
            try:
                await self._process(batch)
            except Exception:  # a bug: fail the requests this batch still holds, keep serving the others
                log.exception("engine batch failed")
                for chunk in self._running:  # not those routed or queued again: another batch answers them
                    settle(chunk, exc=BatchFailed("the batch failed; it has been logged"))
            finally:
                self._running = []

    async def _process(self, batch: list[Chunk]) -> None:
        runs = await self._judge(batch)
        if not runs:
            return
        began = time.perf_counter()
        computed = await self.compute.run([r.values for r in runs], [r.chunk.horizon for r in runs],
                                          [r.session for r in runs], self.store.gather,
                                          [[(len(c.values), c.extras) for c in r.chunks] for r in runs],
                                          [r.primed for r in runs])
        self._forward_time.observe(time.perf_counter() - began)
        self._steps.inc(sum(r.steps for r in runs))
        await self._commit(runs, computed)

    async def _judge(self, batch: list[Chunk]) -> list[_Run]:
        """Load the batch's sessions and judge each chunk: the runs to compute; the others are answered, and
        the chunks of a run that do not continue what applies go back to the queue, to be judged alone."""
        stateful = [c for c in batch if c.key is not None]
        sessions: list[Session | None] = []
        if stateful:
            try:
                sessions = await self.store.load([c.key for c in stateful])  # type: ignore[misc]
            except StoreUnreachable as refusal:
                for chunk in stateful:
                    for part in (chunk, *chunk.joined):
                        settle(part, exc=refusal)
                    chunk.joined = ()
                batch = [c for c in batch if c.key is None]
        record_of = dict(zip((c.key for c in stateful), sessions, strict=False))
        runs: list[_Run] = []
        back: list[Chunk] = []  # joined chunks that do not run now: judged again, first, in the next batch
        routed: set[int] = set()  # the chunks gone to another engine: no longer in flight here
        for chunk in batch:
            if chunk.key is None:
                if not chunk.future.done():  # its caller left while the sessions loaded: not computed
                    runs.append(_Run([chunk], None, Apply(start=0, created=False), None))
                continue
            session = record_of.get(chunk.key)
            joined = chunk.joined  # the router hands them over with it
            if self.router is not None and self.router(chunk, session):
                routed.update(map(id, (chunk, *joined)))
                continue  # another version's engine judges it, and the chunks joined to it
            later, chunk.joined = joined, ()
            run = self._judge_first(chunk, session)
            if run is not None:
                runs.append(run)
            if later:
                taken = _continue(run, later) if run is not None else 0
                back.extend(c for c in later[taken:] if not c.future.done())
        if routed or back:  # no longer this batch's: another engine's, or the queue's
            gone = routed | set(map(id, back))
            self._running = [chunk for chunk in self._running if id(chunk) not in gone]
        if back:
            self.queue.requeue(back)
        return runs

    def _judge_first(self, chunk: Chunk, session: Session | None) -> _Run | None:
        """The run ``chunk`` starts if it applies to ``session``; None when it is answered (an exact retry)
        or refused."""
        assert chunk.key is not None
        if chunk.future.done():  # its caller left (or timed out) while the sessions loaded: never computed
            return None
        revision = session.revision if session is not None else None
        if chunk.restart:  # in place of whatever the session held, judged against it for the commit
            return _Run([chunk], None, Apply(start=0, created=session is None), revision)
        if session is None and chunk.must_exist:
            settle(chunk, exc=_unknown(chunk.key))
            return None
        if (session is not None and session.model_version != self.model_version and self.unplaced is not None
                and self.unplaced(session.model_version)):
            settle(chunk, exc=VersionNotLoaded(
                f"session {session_id_of(chunk.key)!r} is on model version {session.model_version}, which this"
                " replica has not loaded yet (another replica serves it, having polled the repository at another"
                " time); nothing was changed, retry shortly", retry_after=1))
            return None
        verdict = judge(chunk.key, chunk.offset, chunk.horizon, chunk.values, session, self.model_version,
                        chunk.extras)
        if isinstance(verdict, StaleModel) and self.replay and session is not None:
            replayed = judge(chunk.key, chunk.offset, chunk.horizon, chunk.values, session,
                             session.model_version, chunk.extras)
            if not isinstance(replayed, Apply):
                verdict = replayed
            elif (kept := self._kept_values(session)) is not None:  # run it after the values the state keeps
                return _Run([chunk], None, replayed, revision, kept)
        if isinstance(verdict, Apply):
            return _Run([chunk], session, verdict, revision)
        if isinstance(verdict, Replay):
            settle(chunk, verdict.answer)
        else:
            settle(chunk, exc=verdict)
        return None

    async def _commit(self, runs: list[_Run], computed: Computed) -> None:
        """Answer stateless chunks; compare-and-set the others and answer those that won; those that lost
        their race go back to the front of the queue."""
        writes: list[Write] = []
        pending: list[tuple[_Run, list[bytes], int]] = []  # the run, its chunks' answers, its row in ``computed``
        again: list[Chunk] = []  # runs not to commit now, their chunks judged again
        for row, run in enumerate(runs):
            chunks = run.chunks
            if chunks[0].future.done() or (len(chunks) > 1 and any(c.future.done() for c in chunks)):
                again.extend(c for c in chunks if not c.future.done())  # a caller timed out and was told so:
                continue  # its chunk must not apply later
            if not computed.finite[row]:
                if len(chunks) > 1:  # which chunk is at fault is unknown: each is judged and computed alone
                    for chunk in chunks:
                        chunk.alone = True
                    again.extend(chunks)
                    continue
                settle(chunks[0], exc=OutOfRange(
                    "the model's outputs for this chunk are not finite numbers: its values lie far outside the"
                    " range the model was trained on; nothing was changed (if every chunk of a session gets"
                    " this, an earlier chunk left such values in its state: reset it)"))
                continue
            answers = self._answers(run, computed.predictions[row], computed.forecasts[row], computed.extras[row])
            last = chunks[-1]
            if last.key is None:
                settle(last, answers[0])
                continue
            start = run.verdict.start + run.steps - len(last.values)  # where the last chunk applies
            writes.append(Write(
                key=last.key, expected_revision=run.revision, position=start + len(last.values),
                model_version=self.model_version, last_offset=start,
                fingerprint=fingerprint(start, last.horizon, last.values, last.extras), answer=answers[-1], row=row,
            ))
            pending.append((run, answers, row))
        if writes:
            committing = [chunk for run, _, _ in pending for chunk in run.chunks]
            for chunk in committing:  # past its deadline from here on, a chunk waits for the write's outcome
                chunk.committing = True
            try:
                committed = await self.store.commit(writes, computed.states)
            except StoreUnreachable as refusal:  # the write may have applied all the same, its reply lost
                found = await self._found(writes)  # a lone chunk too: the session's next may apply on it
                if found is None:  # not read back: the write's outcome is unknown, which the 503 says
                    refusal = StoreUnreachable(
                        "the session store became unreachable while this chunk was being written: it may have been"
                        " applied or not; retry with the same offset (a retry of an applied chunk returns its"
                        " answer)", retry_after=refusal.retry_after)
                committed = found if found is not None else [None] * len(writes)
                for (run, _, _), won in zip(pending, committed, strict=True):
                    for chunk in run.chunks if won is None else ():
                        settle(chunk, exc=refusal)
            finally:
                for chunk in committing:
                    chunk.committing = False
            surprising = scored = 0  # values that arrived in a session with a p-value [under GRU_SURPRISE_P]
            conflicts = 0
            for (run, answers, row), won in zip(pending, committed, strict=True):
                if won is None:  # the session changed under us: judge these again (those timed out are dropped)
                    retried = [chunk for chunk in run.chunks if not chunk.future.done()]
                    again.extend(retried)
                    conflicts += bool(retried)
                    continue
                self.written += 1
                for chunk, answer in zip(run.chunks, answers, strict=True):
                    settle(chunk, answer)
                surprising += computed.surprises[row]
                scored += computed.scored[row]
            if surprising:
                self._surprises.inc(surprising)
            if scored:
                self._scored.inc(scored)
            if conflicts:
                self._metrics.store_conflicts.inc(conflicts)
        if again:  # ahead of everything newer
            self.queue.requeue(again)

    async def _found(self, writes: list[Write]) -> list[Session | None] | None:
        """After a commit that failed: each write's record where the store holds it all the same (Redis ran it
        and the reply was lost), else None; None when the store still does not answer. A run keeps
        only its last chunk's answer, so a 503 for an earlier chunk of a run that was written could not be
        retried for its answer (a 409 past it); nor could a lone chunk's once the session's next chunk, queued
        behind it, applied on top of it: a write found written is answered from what was computed."""
        try:
            if not await self.store.ping():
                return None
            records = await self.store.load([write.key for write in writes])
        except StoreUnreachable:
            return None
        return [record if record is not None and _holds(record, write) else None
                for record, write in zip(records, writes, strict=True)]

    def _answers(self, run: _Run, predictions: np.ndarray, forecast: np.ndarray | None,
                 extras: list[dict[str, Any] | None]) -> list[bytes]:
        """Each chunk's answer, as if it had applied alone: its own predictions and position; the forecast
        is the last chunk's, the first's alone may have created (or upgraded) the session."""
        answers: list[bytes] = []
        at, start, last = 0, run.verdict.start, len(run.chunks) - 1
        created, upgraded = run.verdict.created, run.prior is not None
        for part, chunk in enumerate(run.chunks):
            steps = len(chunk.values)
            session = None if chunk.key is None else (session_id_of(chunk.key), start + steps, created)
            answers.append(encode_answer(predictions[at: at + steps], forecast if part == last else None,
                                         self.model_version, session, self.label, extras[part], upgraded=upgraded))
            at += steps
            start += steps
            created = upgraded = False  # the first chunk alone created or moved the session
        return answers

    def _kept_values(self, session: Session) -> np.ndarray | None:
        """The raw values a session's state keeps (its last min(position, K) inputs; docs/architecture.md,
        "State layout"), which prime this version's state in place of the other version's hidden state; None
        for a state of another size (an earlier model's layout), which cannot be read and stays a 409."""
        cfg = self.forecaster.config
        hidden = cfg.num_layers * cfg.hidden_size
        try:
            state = self.store.gather([session], "cpu")[0].cpu().numpy()  # a memory store keeps its device
        except ValueError:
            return None
        window = state[hidden: hidden + cfg.lags * cfg.num_features].reshape(cfg.lags, cfg.num_features)
        return np.ascontiguousarray(window[cfg.lags - min(session.position, cfg.lags):], dtype=np.float32)


def _continue(run: _Run, later: tuple[Chunk, ...]) -> int:
    """Join to ``run`` the chunks of ``later`` that continue it (each at the position where the one before
    ends, its caller still waiting); how many, from the first."""
    end = run.verdict.start + run.steps
    for count, chunk in enumerate(later):
        if chunk.future.done() or (chunk.offset is not None and chunk.offset != end):
            return count
        run.join(chunk)
        end += len(chunk.values)
    return len(later)


def _holds(record: Session, write: Write) -> bool:
    """Whether ``record`` is what ``write`` wrote: its last chunk, applied where the write put it."""
    return (record.position, record.last_offset, record.fingerprint, record.model_version) == (
        write.position, write.last_offset, write.fingerprint, write.model_version)


def _unknown(key: str) -> UnknownSession:
    return UnknownSession.gone(session_id_of(key))
