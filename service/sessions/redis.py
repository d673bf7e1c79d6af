"""Redis session store: any replica serves any session, and a restart of a replica loses nothing.

One hash per session, key ``gru:s:{tenant}/{session_id}``, with a TTL refreshed on every use:

    state    the Forecaster's state vector, S little-endian float32 (absent after a reset: zeros)
    pos      steps consumed              ver      model version the state was built with
    rev      revision token, a fresh random value on every write (the compare-and-set token)
    loff     offset of the last applied chunk (-1: none)
    fp, ans  the last applied chunk's fingerprint and answer, for exact retries
    created, updated   unix seconds (the writing replica's clock)

Every write is one Lua script, so it is atomic: it checks the revision the chunk was judged against and
either writes every field or nothing. A revision is random, never a counter, so a delete or a reset that
brings the session back to the same position still fails a stale write (position alone would be fooled).
The scripts are idempotent: a write whose own new revision is already stored reports success, so a
client-side retry after a lost reply never turns an applied append into a conflict (and a second append).

A batch costs two round trips: one pipeline of HGETALL + PEXPIRE for its keys, one pipeline of commit
scripts. Connection and timeout errors become ``StoreUnavailable`` (the engine answers 503 with
Retry-After); the pool reconnects by itself when Redis is back.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as aioredis
import redis.exceptions as rexc
import torch
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from torch import Tensor

from service.sessions.base import Session, StoreUnavailable, Write

KEY_PREFIX = "gru:s:"
_STATE_DTYPE = np.dtype("<f4")
_T = TypeVar("_T")

# Failures that mean "Redis cannot take this now", not "we sent nonsense": answered 503, retried later.
_UNAVAILABLE = (
    rexc.ConnectionError, rexc.TimeoutError, rexc.OutOfMemoryError, rexc.ReadOnlyError, rexc.ClusterDownError,
    rexc.TryAgainError, OSError,
)

# KEYS[1] session hash.  ARGV: expected revision ('' = must not exist), new revision, position, model
# version, last offset, fingerprint, answer, state bytes, now (unix s), ttl (ms).
# Returns the record's created_at, or false when the revision did not match.
_COMMIT = """
local current = redis.call('HGET', KEYS[1], 'rev')
if current == ARGV[2] then
  return redis.call('HGET', KEYS[1], 'created')
end
if ARGV[1] == '' then
  if current then return false end
elseif current ~= ARGV[1] then
  return false
end
local created = redis.call('HGET', KEYS[1], 'created') or ARGV[9]
redis.call('HSET', KEYS[1], 'rev', ARGV[2], 'pos', ARGV[3], 'ver', ARGV[4], 'loff', ARGV[5], 'fp', ARGV[6],
           'ans', ARGV[7], 'state', ARGV[8], 'created', created, 'updated', ARGV[9])
redis.call('PEXPIRE', KEYS[1], ARGV[10])
return created
"""

# KEYS[1] session hash.  ARGV: new revision, model version, now (unix s), ttl (ms).
# Returns {existed (0/1), created_at}. The state field is dropped: no state means the fresh (zero) state.
_RESET = """
local current = redis.call('HMGET', KEYS[1], 'rev', 'created')
if current[1] == ARGV[1] then
  return {0, current[2]}
end
local created = current[2] or ARGV[3]
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'rev', ARGV[1], 'pos', 0, 'ver', ARGV[2], 'loff', -1, 'fp', '', 'ans', '',
           'created', created, 'updated', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if current[1] then return {1, created} end
return {0, created}
"""

_INFO_FIELDS = ("rev", "pos", "ver", "created", "updated", "loff")


class RedisStore:
    """SessionStore on Redis; the pool is created here and connects lazily, so start-up never needs Redis."""

    def __init__(
        self,
        url: str,
        state_size: int,
        ttl_seconds: float,
        *,
        max_connections: int = 64,
        socket_timeout: float = 2.0,
        connect_timeout: float = 1.0,
        clock: Callable[[], float] = time.time,
    ):
        self.ttl_seconds = ttl_seconds
        self.state_size = state_size
        self._ttl_ms = max(1, round(ttl_seconds * 1000))
        self._clock = clock
        # Query parameters in the URL win over these defaults (e.g. ?socket_timeout=5).
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=socket_timeout,
            socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout,
            # One quick retry replaces a connection Redis closed (a restart); the scripts are idempotent.
            retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1),
            health_check_interval=30,
        )
        self._redis: aioredis.Redis = aioredis.Redis(connection_pool=pool)
        self._commit = self._redis.register_script(_COMMIT)
        self._reset = self._redis.register_script(_RESET)

    @staticmethod
    def redis_key(key: str) -> str:
        return KEY_PREFIX + key

    async def _call(self, operation: Awaitable[_T]) -> _T:
        try:
            return await operation
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"redis: {exc.__class__.__name__}: {exc}") from exc

    # -- the protocol ----------------------------------------------------------------------------------

    async def load(self, keys: Sequence[str]) -> list[Session | None]:
        async def run() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hgetall(self.redis_key(key))
                    pipe.pexpire(self.redis_key(key), self._ttl_ms)
                return await pipe.execute()

        replies = await self._call(run())
        return [_session(key, fields) for key, fields in zip(keys, replies[::2], strict=True)]

    def gather(self, sessions: Sequence[Session | None], device: Any) -> Tensor:
        states = np.zeros((len(sessions), self.state_size), dtype=np.float32)  # (B, S)
        for row, session in enumerate(sessions):
            raw = session.handle if session is not None else None
            if not raw:
                continue
            if len(raw) != self.state_size * _STATE_DTYPE.itemsize:
                raise ValueError(
                    f"session {session.key!r} holds a {len(raw)}-byte state in Redis, expected"  # type: ignore[union-attr]
                    f" {self.state_size} float32 values; reset the session"
                )
            states[row] = np.frombuffer(raw, dtype=_STATE_DTYPE)
        return torch.from_numpy(states).to(device)

    async def commit(self, writes: Sequence[Write], states: Tensor) -> list[Session | None]:
        if not writes:
            return []
        rows = torch.tensor([w.row for w in writes], device=states.device)
        host = states.index_select(0, rows).to("cpu", torch.float32).numpy().astype(_STATE_DTYPE, copy=False)
        now = self._clock()
        revisions = [secrets.token_hex(16) for _ in writes]

        async def run() -> list[Any]:
            async with self._redis.pipeline(transaction=False) as pipe:
                for write, revision, state in zip(writes, revisions, host, strict=True):
                    await self._commit(
                        keys=[self.redis_key(write.key)],
                        args=[
                            write.expected_revision if write.expected_revision is not None else "", revision,
                            write.position, write.model_version, write.last_offset, write.fingerprint,
                            write.answer, state.tobytes(), repr(now), self._ttl_ms,
                        ],
                        client=pipe,
                    )
                return await pipe.execute()

        replies = await self._call(run())
        results: list[Session | None] = []
        for write, revision, state, created in zip(writes, revisions, host, replies, strict=True):
            if created is None:
                results.append(None)
                continue
            results.append(Session(
                write.key, write.position, write.model_version, revision, created_at=float(created),
                updated_at=now, last_offset=write.last_offset, fingerprint=write.fingerprint,
                answer=write.answer, handle=state.tobytes(),
            ))
        return results

    async def get(self, key: str) -> Session | None:
        values = await self._call(self._redis.hmget(self.redis_key(key), list(_INFO_FIELDS)))
        if values[0] is None:
            return None
        return _session(key, dict(zip((f.encode() for f in _INFO_FIELDS), values, strict=True)))

    async def delete(self, key: str) -> bool:
        return bool(await self._call(self._redis.delete(self.redis_key(key))))

    async def reset(self, key: str, model_version: str) -> tuple[Session, bool]:
        now = self._clock()
        revision = secrets.token_hex(16)
        existed, created = await self._call(self._reset(
            keys=[self.redis_key(key)], args=[revision, model_version, repr(now), self._ttl_ms]
        ))
        session = Session(key, 0, model_version, revision, created_at=float(created), updated_at=now)
        return session, not existed

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (rexc.RedisError, OSError):
            return False

    async def close(self) -> None:
        await self._redis.aclose()


def _session(key: str, fields: dict[bytes, bytes | None]) -> Session | None:
    """A record from its hash fields (HGETALL: bytes keys); None for a missing key."""
    revision = fields.get(b"rev")
    if not revision:
        return None
    return Session(
        key,
        position=int(fields[b"pos"] or 0),
        model_version=(fields.get(b"ver") or b"").decode(),
        revision=revision.decode(),
        created_at=float(fields.get(b"created") or 0),
        updated_at=float(fields.get(b"updated") or 0),
        last_offset=int(fields.get(b"loff") or -1),
        fingerprint=fields.get(b"fp") or b"",
        answer=fields.get(b"ans") or b"",
        handle=fields.get(b"state"),
    )
