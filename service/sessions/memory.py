"""In-process session store: states in one preallocated device tensor, a session is a slot.

Row 0 is the fresh (all-zero) state, shared by every session that has not stored a state yet, so a batch
gathers new and old sessions with one ``index_select``. The tensor doubles when full, up to ``max_sessions+1``
rows. Records sit in an ``OrderedDict`` kept in recency order: the least recently used session is evicted at
capacity, and idle ones expire after ``ttl_seconds`` (checked on access and by ``sweep()``). A load for a
batch counts as use, as a write does (the Redis store's load refreshes the key's TTL too), so recency order
is expiry order and the sweep stops at the first live session; ``get`` and ``peek`` (the state API's read)
are no use. Capacity is counted in sessions and, with ``max_answer_bytes``, in the bytes of the answers kept
for exact retries: an answer grows with its chunk and horizon (53 KB at 4,096 steps and a horizon of 512),
so a session count alone would let one client's long chunks take a pod's memory. With ``tenant_max_sessions``
and ``tenant_max_answer_bytes`` a tenant at its own bound evicts its own least recently used sessions first,
so one tenant creating sessions fast cannot push out another's (the store-wide bounds still hold over everyone).
The marks ended v2 sequences leave (``end``) are kept apart, oldest first, for the TTL from their end and within
bounds of their own as large as the sessions' (``max_sessions`` marks, ``max_answer_bytes`` of their answers):
they hold no state, and a mark dropped early costs only a final chunk's resend its answer (a 404 instead).
Under a tenant bound the marks have the same per tenant: a tenant ending sequences fast drops its own oldest
marks, never another tenant's. Snapshots carry the marks with the time of their end, so a graceful restart
neither forgets them nor extends their TTL.
Every mutation of the records happens on the event loop; ``gather`` may run on the engine's compute thread and
only reads.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from service.sessions.base import Ended, Revision, Session, Write, tenant_of_key

EvictionHook = Callable[[str, int], None]  # (reason, count)
EndedMark = tuple[str, float, Ended]  # (key, when its sequence ended, the mark)
# The most the store allocates before its first session: 1,024 rows of a state of a few hundred floats, but
# only a handful of a state of a million (a checkpoint with huge lags), which would otherwise be gigabytes at
# load; the tensor doubles as sessions arrive either way.
INITIAL_STATE_BYTES = 4 << 20


class MemoryStore:
    def __init__(
        self,
        state_size: int,
        device: torch.device,
        max_sessions: int,
        ttl_seconds: float,
        on_evict: EvictionHook | None = None,
        initial_capacity: int = 1024,
        clock: Callable[[], float] = time.time,
        max_answer_bytes: int | None = None,
        tenant_max_sessions: int | None = None,
        tenant_max_answer_bytes: int | None = None,
    ):
        self.ttl_seconds = ttl_seconds
        self.max_sessions = max_sessions
        self.max_answer_bytes = max_answer_bytes
        self.tenant_max_sessions = tenant_max_sessions
        self.tenant_max_answer_bytes = tenant_max_answer_bytes
        self._answer_bytes = 0  # the kept answers' total
        # Each tenant's keys in recency order and its answers' bytes, kept only under a tenant bound (about 90
        # bytes a session otherwise spent for nothing).
        self._tenants: dict[str, _Tenant] | None = (
            {} if tenant_max_sessions is not None or tenant_max_answer_bytes is not None else None
        )
        self._clock = clock
        self._on_evict = on_evict or (lambda reason, count: None)
        self._records: OrderedDict[str, Session] = OrderedDict()
        self._ended: OrderedDict[str, tuple[float, Ended]] = OrderedDict()  # key: (when it ended, its mark)
        self._ended_bytes = 0  # the marks' answers' total
        # Each tenant's marks, oldest first, and their answers' bytes: kept, as ``_tenants``, under a tenant bound.
        self._ended_tenants: dict[str, _Tenant] | None = {} if self._tenants is not None else None
        rows = min(initial_capacity, max_sessions, max(1, INITIAL_STATE_BYTES // (4 * max(state_size, 1))))
        self._slots = _Slots(state_size, device, rows, max_sessions)
        self._revision = 0

    def __len__(self) -> int:
        return len(self._records)

    @property
    def states(self) -> Tensor:
        return self._slots.states

    def _next_revision(self) -> int:
        self._revision += 1
        return self._revision

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.last_used > self.ttl_seconds

    def _drop(self, key: str) -> Session:
        session = self._records.pop(key)
        self._answer_bytes -= len(session.answer)
        _uncount(self._tenants, key, len(session.answer))
        if session.handle:
            self._slots.release(session.handle)
        return session

    def _insert(self, session: Session) -> None:
        self._records[session.key] = session
        self._answer_bytes += len(session.answer)
        _count(self._tenants, session.key, len(session.answer))

    def _add_answer(self, key: str, change: int) -> None:
        self._answer_bytes += change
        if self._tenants is not None:
            self._tenants[tenant_of_key(key)].answer_bytes += change

    def _touch(self, key: str) -> None:
        """``key`` becomes the most recently used, in the store and in its tenant."""
        self._records.move_to_end(key)
        if self._tenants is not None:
            self._tenants[tenant_of_key(key)].keys.move_to_end(key)

    def _live(self, key: str, now: float) -> Session | None:
        session = self._records.get(key)
        if session is None:
            return None
        if self._expired(session, now):
            self._drop(key)
            self._on_evict("ttl", 1)
            return None
        return session

    def sweep(self) -> int:
        """Drop every expired session (oldest first, so it stops at the first live one); returns the count."""
        now = self._clock()
        expired = 0
        while self._records:
            key, session = next(iter(self._records.items()))
            if not self._expired(session, now):
                break
            self._drop(key)
            expired += 1
        if expired:
            self._on_evict("ttl", expired)
        while self._ended and now - next(iter(self._ended.values()))[0] > self.ttl_seconds:
            self._forget_ended(next(iter(self._ended)))
        return expired

    def _evict(self, key: str, reason: str, now: float) -> str:
        """Drop ``key`` at a bound; returns the reason to count it under: ``ttl`` for a session already past
        its TTL (one the sweep had not reached yet), as a bound's count is of live sessions pushed out, which
        the capacity alert reads as a store too small."""
        return "ttl" if self._expired(self._drop(key), now) else reason

    def _make_room(self, key: str) -> None:
        """Room for ``key`` if it is new: its tenant's least recently used session at the tenant's bound, else
        the store's at the store's."""
        if key in self._records:
            return
        tenant = self._tenants.get(tenant_of_key(key)) if self._tenants is not None else None
        if self.tenant_max_sessions is not None and tenant is not None and len(tenant.keys) >= self.tenant_max_sessions:
            self._on_evict(self._evict(next(iter(tenant.keys)), "tenant_quota", self._clock()), 1)
        elif len(self._records) >= self.max_sessions:
            self._on_evict(self._evict(next(iter(self._records)), "capacity", self._clock()), 1)

    def _trim_answers(self, keep: set[str] | None) -> None:
        """Least recently used first, while the kept answers pass their budget: each writing tenant's own first,
        from its own sessions, down to one (those just written too: a tenant whose one batch passes its
        budget must not make the store evict another's); then the store's, never one of ``keep`` (the
        sessions just written: an answer over the whole budget is kept, alone), and not for what a tenant
        holds beyond its own budget (``_overshoot``). ``keep`` None (a restore): every tenant's, down to the
        most recently used session, kept alone as serving keeps one whose answer is over the whole budget."""
        now = self._clock()
        evicted: Counter[str] = Counter()  # per reason counted
        if self.tenant_max_answer_bytes is not None and self._tenants is not None:
            tenants = self._tenants
            for name in set(tenants) if keep is None else {tenant_of_key(key) for key in keep}:
                tenant = tenants.get(name)
                while (tenant is not None and tenant.answer_bytes > self.tenant_max_answer_bytes
                       and len(tenant.keys) > 1):
                    evicted[self._evict(next(iter(tenant.keys)), "tenant_quota", now)] += 1
                    tenant = tenants.get(name)
        overshoot = self._overshoot()  # summed once; each drop below corrects it by its own tenant's change
        while (self.max_answer_bytes is not None and self._answer_bytes > self.max_answer_bytes
               and self._answer_bytes - overshoot > self.max_answer_bytes and len(self._records) > 1):
            key = next(iter(self._records))
            if keep is not None and key in keep:
                break
            owner = tenant_of_key(key)
            before = self._over_budget(owner)
            evicted[self._evict(key, "capacity", now)] += 1
            overshoot += self._over_budget(owner) - before
        for reason, count in evicted.items():
            self._on_evict(reason, count)

    def _overshoot(self) -> int:
        """The bytes by which tenants pass their own answer budgets: each such tenant is down to one session
        (its trim above), whose answer alone passes the budget (a chunk's answer is bounded by the chunk limits
        and the model's features, not by any budget). That is the tenant's own doing, so the store's bound does
        not count it: another tenant's sessions are never evicted to make room for it."""
        return sum(self._over_budget(name) for name in self._tenants or ())

    def _over_budget(self, name: str) -> int:
        """The bytes of kept answers by which tenant ``name`` passes its own budget (0 within it, or unbounded)."""
        tenant = self._tenants.get(name) if self._tenants is not None else None
        if tenant is None or self.tenant_max_answer_bytes is None:
            return 0
        return max(tenant.answer_bytes - self.tenant_max_answer_bytes, 0)

    async def load(self, keys: Sequence[str]) -> list[Session | None]:
        now = self._clock()
        found = []
        for key in keys:
            session = self._live(key, now)
            if session is not None:
                session.seen_at = now
                self._touch(key)
            found.append(session)
        return found

    def gather(self, sessions: Sequence[Session | None], device: Any = None) -> Tensor:
        return self._slots.read([(s.handle or 0) if s is not None else 0 for s in sessions])  # 0: fresh state

    async def commit(self, writes: Sequence[Write], states: Tensor) -> list[Session | None]:
        now = self._clock()
        results: list[Session | None] = []
        won: list[tuple[int, Session, int]] = []  # (where in results, session, row of states)
        for write in writes:
            current = self._live(write.key, now)
            if (current.revision if current is not None else None) != write.expected_revision:
                results.append(None)
                continue
            if current is None:
                self._make_room(write.key)
                current = Session(write.key, 0, write.model_version, 0, created_at=now, updated_at=now)
                self._insert(current)
            if not current.handle:
                current.handle = self._slots.allocate()
            current.position = write.position
            current.model_version = write.model_version
            current.last_offset = write.last_offset
            current.fingerprint = write.fingerprint
            self._add_answer(write.key, len(write.answer) - len(current.answer))
            current.answer = bytes(memoryview(write.answer))  # exact size: orjson's buffer holds ~4 KiB
            current.updated_at = now
            current.revision = self._next_revision()
            self._touch(write.key)
            won.append((len(results), current, write.row))
            results.append(current)
        # At a GRU_MAX_SESSIONS below the batch size, a new session can evict one this same commit wrote: that
        # write lost after all (its slot may already be another's), so it is judged again like any other.
        rows: list[int] = []
        slots: list[int] = []
        for at, session, row in won:
            if self._records.get(session.key) is session:
                rows.append(row)
                slots.append(session.handle or 0)
            else:
                results[at] = None
        if rows:
            self._slots.write(slots, states[torch.tensor(rows, device=states.device)])
        # the sessions written: a lost write's key is none (its record, at the front of the recency order
        # after a rival write, stopped the trim at once and kept the store over its budget)
        self._trim_answers({session.key for at, session, _ in won if results[at] is not None})
        return results

    async def get(self, key: str) -> Session | None:
        return self._live(key, self._clock())

    async def peek(self, key: str) -> Session | None:
        """``get``: a record here holds its state's slot, and neither read counts as use."""
        return await self.get(key)

    async def delete(self, key: str, revision: Revision | None = None) -> bool:
        current = self._live(key, self._clock())
        if current is None:
            return revision is not None  # gone since its revision was read: what a delete at it asks holds
        if revision is not None and current.revision != revision:
            return False
        self._drop(key)
        return True

    async def end(self, key: str, revision: Revision) -> bool:
        now = self._clock()
        current = self._live(key, now)
        if current is None or current.revision != revision:
            return False
        self._drop(key)
        self._mark(key, now, Ended(current.fingerprint, current.answer))
        return True

    def _mark(self, key: str, when: float, mark: Ended) -> None:
        """Keep ``mark`` as ``key``'s newest, ended at ``when``; the oldest marks go past the bounds."""
        if key in self._ended:
            self._forget_ended(key)
        self._ended[key] = (when, mark)
        self._ended_bytes += len(mark.answer)
        _count(self._ended_tenants, key, len(mark.answer))
        if self._ended_tenants is not None:  # the tenant's own oldest marks first, down to this one
            tenant = self._ended_tenants[tenant_of_key(key)]
            while len(tenant.keys) > 1 and (
                    (self.tenant_max_sessions is not None and len(tenant.keys) > self.tenant_max_sessions)
                    or (self.tenant_max_answer_bytes is not None
                        and tenant.answer_bytes > self.tenant_max_answer_bytes)):
                self._forget_ended(next(iter(tenant.keys)))
        while len(self._ended) > self.max_sessions or (
                self.max_answer_bytes is not None and self._ended_bytes > self.max_answer_bytes):
            self._forget_ended(next(iter(self._ended)))

    async def ended(self, key: str) -> Ended | None:
        mark = self._ended.get(key)
        if mark is None:
            return None
        if self._clock() - mark[0] > self.ttl_seconds:
            self._forget_ended(key)
            return None
        return mark[1]

    def _forget_ended(self, key: str) -> None:
        _, mark = self._ended.pop(key)
        self._ended_bytes -= len(mark.answer)
        _uncount(self._ended_tenants, key, len(mark.answer))

    async def reset(self, key: str, model_version: str) -> tuple[Session, bool]:
        now = self._clock()
        current = self._live(key, now)
        if current is not None:
            self._drop(key)
        else:
            self._make_room(key)
        created_at = current.created_at if current is not None else now
        session = Session(key, 0, model_version, self._next_revision(), created_at=created_at, updated_at=now)
        self._insert(session)
        return session, current is None

    def records(self) -> list[Session]:
        """Live records, least recently used first (for snapshots)."""
        return list(self._records.values())

    def ended_marks(self) -> list[EndedMark]:
        """The marks of ended sequences still within their TTL, oldest first, with when each ended (for
        snapshots)."""
        now = self._clock()
        return [(key, when, mark) for key, (when, mark) in self._ended.items() if now - when <= self.ttl_seconds]

    def restore(self, sessions: Sequence[Session], rows: Sequence[int], states: Tensor,
                ended: Sequence[EndedMark] = ()) -> None:
        """Put back records read from a snapshot, least recently used first; ``rows[i]`` is session i's row
        of ``states`` (-1: the fresh state). Revisions are new; the states are copied in one call. ``ended``:
        the marks of ended sequences, oldest first, each with the time of its end, so its TTL still counts
        from there; kept within the marks' bounds as ``end`` keeps them (the newest stay)."""
        slot_rows: dict[int, int] = {}  # a slot freed by an eviction here and reused: the later row wins
        for session, row in zip(sessions, rows, strict=True):
            self._make_room(session.key)
            if session.key in self._records:
                self._drop(session.key)
            session.revision = self._next_revision()
            session.handle = None
            if row >= 0:
                session.handle = self._slots.allocate()
                slot_rows[session.handle] = row
            self._insert(session)
        if slot_rows:
            self._slots.write(list(slot_rows), states[torch.tensor(list(slot_rows.values()), device=states.device)])
        self._trim_answers(None)  # a snapshot from a larger budget: its oldest go
        for key, when, mark in ended:
            self._mark(key, when, mark)

    async def version_counts(self, tenant: str | None = None) -> dict[str, int]:
        now = self._clock()
        return dict(Counter(s.model_version for s in self._records.values()
                            if not self._expired(s, now) and tenant in (None, tenant_of_key(s.key))))

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        return None


@dataclass(slots=True)
class _Tenant:
    keys: OrderedDict[str, None] = field(default_factory=OrderedDict)  # least recently used first
    answer_bytes: int = 0


def _count(tenants: dict[str, _Tenant] | None, key: str, answer_bytes: int) -> None:
    """``key``, with its answer's bytes, as its tenant's most recent (a session's, or an ended mark's)."""
    if tenants is not None:
        tenant = tenants.setdefault(tenant_of_key(key), _Tenant())
        tenant.keys[key] = None
        tenant.answer_bytes += answer_bytes


def _uncount(tenants: dict[str, _Tenant] | None, key: str, answer_bytes: int) -> None:
    """``key`` and its answer's bytes no longer its tenant's; a tenant left with none is forgotten."""
    if tenants is not None:
        name = tenant_of_key(key)
        tenant = tenants[name]
        del tenant.keys[key]
        tenant.answer_bytes -= answer_bytes
        if not tenant.keys:
            del tenants[name]


class _Slots:
    """The states, one row a session: a tensor on the model's device that doubles when full, up to
    ``max_rows`` sessions; row 0 is the fresh (all-zero) state and never handed out."""

    def __init__(self, state_size: int, device: torch.device, rows: int, max_rows: int):
        self.states = torch.zeros(rows + 1, state_size, device=device)  # (capacity + 1, S)
        self._max_rows = max_rows
        self._free: list[int] = list(range(rows, 0, -1))

    def allocate(self) -> int:
        if not self._free:
            old = self.states
            rows = min(2 * (old.size(0) - 1), self._max_rows) + 1
            grown = old.new_zeros(rows, old.size(1))
            grown[: old.size(0)] = old
            self._free = list(range(rows - 1, old.size(0) - 1, -1))
            self.states = grown
        return self._free.pop()

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def read(self, slots: Sequence[int]) -> Tensor:
        return self.states.index_select(0, torch.tensor(slots, device=self.states.device))  # (B, S)

    def write(self, slots: Sequence[int], states: Tensor) -> None:
        """Row i of ``states`` into slot ``slots[i]``, in one call."""
        self.states.index_copy_(0, torch.tensor(slots, device=self.states.device), states.to(self.states))
