"""The session store protocol: what the engine needs from wherever session states live.

A store keeps, per session key, a ``Session`` record (position, model version, the last chunk's
fingerprint and answer, timestamps, a revision) and an opaque state vector of the Forecaster. Writes are
compare-and-set on the revision, which changes on every write: the engine reads, computes off the event
loop, then commits only if nobody (a reset, a delete, another replica) wrote in between; a lost race is
judged again. Position alone could be fooled by a reset that reaches the same position again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from torch import Tensor

Revision = int | str | bytes  # compare-and-set token: a counter, a Redis token, or a damaged record's raw bytes


@dataclass(slots=True)
class Session:
    """A session's bookkeeping; the state vector itself lives with the store (a slot or bytes)."""

    key: str  # tenant-qualified, see session_key()
    position: int  # steps consumed
    model_version: str
    revision: Revision  # changes on every write; compare-and-set token
    created_at: float  # unix seconds
    updated_at: float
    last_offset: int = -1  # where the last applied chunk started (-1: none yet)
    fingerprint: bytes = b""  # of the last applied chunk: offset, horizon, values
    answer: bytes = b""  # the last applied chunk's response body, returned again to an exact retry
    handle: Any = None  # store-private: a slot index, or the state bytes
    seen_at: float = 0.0  # the memory store's: its last load (0 elsewhere)

    @property
    def last_used(self) -> float:
        """The later of its last write and the last load recorded (the memory store records loads; Redis
        refreshes the key's TTL itself): its expiry counts from here."""
        return max(self.updated_at, self.seen_at)


@dataclass(slots=True)
class Write:
    """A computed chunk to commit: the new bookkeeping, and which row of the batch's states is its state."""

    key: str
    expected_revision: Revision | None  # of the record the chunk was judged against; None: must not exist
    position: int
    model_version: str
    last_offset: int
    fingerprint: bytes
    answer: bytes
    row: int  # index into the ``states`` tensor passed to commit()


@dataclass(frozen=True, slots=True)
class Ended:
    """What a v2 sequence's end leaves of its session for the TTL: the final chunk's fingerprint and answer, so
    that an exact retry of that chunk (its answer lost) is answered again rather than refused as unknown."""

    fingerprint: bytes
    answer: bytes


class StoreUnavailable(Exception):
    """The store cannot be reached; the request is answered 503 and nothing is written. ``reason`` is what
    the client is told (the message, which may name the store's address, goes to the log)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class SessionStore(Protocol):
    @property
    def ttl_seconds(self) -> float:
        """How long an idle session lives."""
        ...

    async def load(self, keys: Sequence[str]) -> list[Session | None]:
        """The live records of ``keys`` (None where absent or expired); refreshes their recency."""
        ...

    async def peek(self, key: str) -> Session | None:
        """The live record of ``key`` as ``load`` reads it, its state included, without counting as use: the
        state API's reads (exports, a fork's parent) must keep no session alive, nor first in line for eviction."""
        ...

    def gather(self, sessions: Sequence[Session | None], device: Any) -> Tensor:
        """(B, S) states of these records, a fresh (zero) state for None; may run off the event loop."""
        ...

    async def commit(self, writes: Sequence[Write], states: Tensor) -> list[Session | None]:
        """Compare-and-set each write; the new record where it won, None where it lost the race."""
        ...

    async def get(self, key: str) -> Session | None: ...

    async def delete(self, key: str, revision: Revision | None = None) -> bool:
        """True if the session existed and is deleted. With a ``revision`` (a DELETE with If-Match, whose tag
        was compared against the session at that revision), only while it is at that very one: a write since
        made another session of it, which stays (False); one gone since is True (a retry of this very delete
        after a lost reply finds it so)."""
        ...

    async def end(self, key: str, revision: Revision) -> bool:
        """Delete the session only while it is at that very ``revision`` (a write since made another session
        of it, which stays), keeping its last chunk as its ``ended`` mark for the TTL; True when it deleted."""
        ...

    async def ended(self, key: str) -> Ended | None:
        """The mark the last ``end`` of ``key`` left, until the TTL (or, in memory, a bound) drops it; it says
        nothing of a session now under ``key``."""
        ...

    async def reset(self, key: str, model_version: str) -> tuple[Session, bool]:
        """Set the session to position 0 with a fresh state; True when it did not exist."""
        ...

    async def version_counts(self, tenant: str | None = None) -> dict[str, int]:
        """Live sessions per model version (hash): what keeps an older version loaded; ``tenant``'s alone when
        given (what that tenant may be told)."""
        ...

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


def session_key(tenant: str, session_id: str) -> str:
    # Session ids cannot contain "/", so tenant/id keys never collide across tenants.
    return f"{tenant}/{session_id}"


def session_id_of(key: str) -> str:
    return key.split("/", 1)[1]


def tenant_of_key(key: str) -> str:
    return key.partition("/")[0]


LAST_TIME = 253402300799.0  # 9999-12-31T23:59:59Z, the last second a datetime holds


def is_unix_time(value: object) -> bool:
    """Whether a stored record's time (read from Redis or a snapshot) is unix seconds: a time of nan, inf or
    1e300 fails every date conversion, and would make its session never expire."""
    return isinstance(value, float | int) and not isinstance(value, bool) and 0 <= value <= LAST_TIME
