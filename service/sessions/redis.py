"""Redis session store: any replica serves any session, and a restart of a replica loses nothing.

One hash per session, key ``gru:s:{tenant}/{session_id}`` (the default model's; another model's sessions
are ``gru:s:{model}:{tenant}/{session_id}``: tenants hold no ":"), with a TTL refreshed on every use:

    state    the Forecaster's state vector, S little-endian float32 (absent after a reset: zeros)
    pos      steps consumed              ver      model version the state was built with
    rev      revision token, a fresh random value on every write (the compare-and-set token)
    loff     offset of the last applied chunk (-1: none)
    fp, ans  the last applied chunk's fingerprint and answer, for exact retries
    created, updated   unix seconds (the writing replica's clock)
    past     the revisions it had before, newest first (``PAST_REVISIONS``), for a retried write's check
    born     the revision of the write (a chunk, an import, a reset) that created it, kept by every later one:
             which session of the key it is (absent: created by an earlier release), for a retried reset or delete

A v2 sequence's end leaves, in place of its session, a hash ``gru:e:{tenant}/{session_id}`` (``gru:e:{model}:...``
for another model) of its final chunk's ``fp`` and ``ans``, with the session TTL: what an exact retry of that
chunk is answered with. It is no session (no ``gru:s:`` key), so nothing else sees it.

Every write runs inside a Lua script, so it is atomic: it checks the revision the chunk was judged against
and either writes every field or nothing. A revision is random, never a counter, so a delete or a reset
that brings the session back to the same position still fails a stale write (position alone would be
fooled). The scripts are idempotent: a write whose own new revision is already stored, or among the
record's ``past`` (another replica wrote after it before the retry came), reports success, so a client-side
retry after a lost reply never turns an applied append into a conflict (and a second append).

A batch costs two round trips, one script call each: one reads every record of the batch (and refreshes
their TTLs), one commits every write; redis-py's per-command cost, not Redis, is what a pipeline of
per-session commands would spend its time on. (A multi-key script needs a standalone Redis, or the primary
of a Sentinel setup, not Redis Cluster.) Connection and timeout errors become ``StoreUnavailable`` (the
engine answers 503 with Retry-After); the pool reconnects by itself when Redis is back, and drops its idle
connections on a READONLY (a failover left them on a replica) so the next call reaches the new primary.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import redis.asyncio as aioredis
import redis.exceptions as rexc
import torch
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from torch import Tensor

from service.sessions.base import LAST_TIME, Ended, Revision, Session, StoreUnavailable, Write, is_unix_time

KEY_PREFIX = "gru:s:"
ENDED_PREFIX = "gru:e:"  # the marks ended v2 sequences leave (``end``)
_STATE_DTYPE = np.dtype("<f4")
_UNREADABLE = b"\0"  # a damaged record's state: of no model's size, so never read as one
_T = TypeVar("_T")

# Failures that mean "Redis cannot take this now", not "we sent nonsense": answered 503, retried later.
_UNAVAILABLE = (
    rexc.ConnectionError, rexc.TimeoutError, rexc.OutOfMemoryError, rexc.ReadOnlyError, rexc.ClusterDownError,
    rexc.TryAgainError, OSError,
)
# Replies redis-py leaves as a plain ResponseError that mean the same: Redis refuses writes it cannot persist
# (MISCONF: a failed RDB save or AOF write, a full disk) or cannot replicate (NOREPLICAS: fewer replicas than
# min-replicas-to-write; MASTERDOWN: a replica that lost its primary), or another client's script holds it
# (BUSY).
_UNAVAILABLE_REPLIES = ("MISCONF ", "NOREPLICAS ", "MASTERDOWN ", "BUSY ")
PAST_REVISIONS = 4  # a record's revisions kept before its own, for retries that another write followed

# Each script first asks a key's TYPE: a key under the prefix that is not a hash (written by something else)
# reads as a session whose revision is '!' and its type, so it is judged a damaged record, and a write or a
# reset judged against it replaces it, instead of every command on it failing with WRONGTYPE.
_REVISION = f"local PAST_REVISIONS = {PAST_REVISIONS}\nlocal LAST_TIME = {LAST_TIME!r}\n" + """
local function revision(key)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'hash' then return redis.call('HGET', key, 'rev') end
  if kind == 'none' then return false end
  return '!' .. kind
end

-- Whether a write (or reset) whose new revision is ``new`` has already run on this record: ``new`` is its
-- revision, or one of the last it had (``past``): a retry after a lost reply, which another replica's write
-- may have followed before it arrived. Without ``past`` that retry would read as a lost race, and the engine
-- would judge its chunk again: an append applied twice.
local function applied(key, current, new)
  if current == new then return true end
  if not current or current:sub(1, 1) == '!' then return false end
  local past = redis.call('HGET', key, 'past')
  return past ~= false and string.find(' ' .. past .. ' ', ' ' .. new .. ' ', 1, true) ~= nil
end

-- A record's ``created`` worth keeping when it is replaced: unix seconds a date can hold (``is_unix_time``),
-- else false. Any number would do for tonumber, and a nan, inf or 1e308 kept left the record damaged; so
-- would what tonumber reads and Python's float does not (hexadecimal, text after a NUL byte): decimal only.
local function kept_time(value)
  local seconds = tonumber(value)
  if seconds and seconds >= 0 and seconds <= LAST_TIME and string.find(value, '^%s*[%d%.eE%+%-]+%s*$') then
    return value
  end
  return false
end

-- The ``past`` of the record that replaces one whose revision is ``current``: that revision, then the
-- newest of its own past, PAST_REVISIONS in all.
local function history(key, current)
  if not current or current:sub(1, 1) == '!' then return '' end
  local kept = {current}
  for earlier in string.gmatch(redis.call('HGET', key, 'past') or '', '%S+') do
    if #kept >= PAST_REVISIONS then break end
    kept[#kept + 1] = earlier
  end
  return table.concat(kept, ' ')
end
"""

# KEYS: the batch's session hashes.  ARGV[1]: ttl (ms), or 0 to read without refreshing it (a peek).
# Returns each hash's fields (flat; empty when absent) and refreshes the TTL of those that exist.
_LOAD = _REVISION + """
local found = {}
for i, key in ipairs(KEYS) do
  local current = revision(key)
  if not current then
    found[i] = {}
  elseif current:sub(1, 1) == '!' then
    found[i] = {'rev', current}
  else
    found[i] = redis.call('HGETALL', key)
    if ARGV[1] ~= '0' then redis.call('PEXPIRE', key, ARGV[1]) end
  end
end
return found
"""

# The scripts that write declare it (``#!lua``, Redis 7): Redis then refuses one whole, before it writes
# anything, when it is out of memory under noeviction (OOM) or short of replicas. Undeclared, the first write
# decides, and a DEL (which Redis lets through when full) let the rest of the script write past maxmemory.
_WRITES = "#!lua\n"

# KEYS: one session hash per write.  ARGV[1] now (unix s), ARGV[2] ttl (ms), then 8 per write: expected
# revision ('' = must not exist), new revision, position, model version, last offset, fingerprint, answer,
# state bytes.  Returns per write the record's created_at, or false where the revision did not match.
# A write finding its own new revision stored, now or among the record's last (``applied``), has run before
# (a retry after a lost reply): won. ``past`` is read only when the revision is neither: a record still at
# the expected revision has never had the write's, so the usual commit reads it once, for ``history``.
_COMMIT = _WRITES + _REVISION + """
local now, ttl = ARGV[1], ARGV[2]
local results = {}
for i, key in ipairs(KEYS) do
  local a = 2 + (i - 1) * 8
  local expected, new = ARGV[a + 1], ARGV[a + 2]
  local current = revision(key)
  if current == new then
    results[i] = redis.call('HGET', key, 'created')
  elseif (expected == '' and not current) or (current and current == expected) then
    local created = current and current:sub(1, 1) ~= '!' and kept_time(redis.call('HGET', key, 'created'))
    local past = history(key, current)
    local born = false
    if not created then
      created, born = now, new
      redis.call('DEL', key)
    end
    if born then redis.call('HSET', key, 'born', born) end
    redis.call('HSET', key, 'rev', new, 'pos', ARGV[a + 3], 'ver', ARGV[a + 4], 'loff', ARGV[a + 5],
               'fp', ARGV[a + 6], 'ans', ARGV[a + 7], 'state', ARGV[a + 8], 'created', created, 'updated', now,
               'past', past)
    redis.call('PEXPIRE', key, ttl)
    results[i] = created
  elseif applied(key, current, new) then
    results[i] = redis.call('HGET', key, 'created')
  else
    results[i] = false
  end
end
return results
"""

# KEYS[1] session hash.  ARGV: new revision, model version, now (unix s), ttl (ms).
# Returns {existed (0/1), created_at}. The state field is dropped: no state means the fresh (zero) state.
# ``born`` is the revision of the write that created the record, kept by later resets and chunks, so a retry
# of a reset already applied answers ``existed`` as its first run did (it created the record if it is ``born``).
_RESET = _WRITES + _REVISION + """
local current = {revision(KEYS[1]), false, false}
if current[1] and current[1]:sub(1, 1) ~= '!' then
  current[2] = redis.call('HGET', KEYS[1], 'created')
  current[3] = redis.call('HGET', KEYS[1], 'born')
end
if applied(KEYS[1], current[1], ARGV[1]) then
  if current[3] == ARGV[1] then return {0, current[2]} end
  return {1, current[2]}
end
local created = kept_time(current[2]) or ARGV[3]
local past = history(KEYS[1], current[1])
local born = current[3]
if not current[1] then born = ARGV[1] end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'rev', ARGV[1], 'pos', 0, 'ver', ARGV[2], 'loff', -1, 'fp', '', 'ans', '',
           'created', created, 'updated', ARGV[3], 'past', past)
if born then redis.call('HSET', KEYS[1], 'born', born) end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if current[1] then return {1, created} end
return {0, created}
"""

# KEYS[1] session hash.  ARGV[1]: the revision it had when the delete began, ARGV[3]: its ``born`` then ('':
# none).  Deletes it only if it is still that session: the same ``born``, or (a record of an earlier release)
# that revision now or lately (``applied``). Chunks committed in between, however many, leave the same session,
# deleted with them; a retry after a lost reply must not delete a session another write created since (its
# ``born`` and its past are its own). Returns 1. With ARGV[2] '1' (a DELETE with If-Match, its tag compared at
# ARGV[1]): only while it has that very revision, not one it had (a chunk since moved it past the tag), and
# returns 0 while it has another; a session gone by then returns 1, as what the delete asked for holds: so does
# the connection's retry after a lost reply, which finds its own delete done (0 made that a 412 "absent, nothing
# was changed").
_DELETE = _WRITES + _REVISION + """
local current = revision(KEYS[1])
if ARGV[2] == '1' then
  if not current then return 1 end
  if current ~= ARGV[1] then return 0 end
elseif not current then
  return 1
elseif not applied(KEYS[1], current, ARGV[1]) then
  if ARGV[3] == '' or current:sub(1, 1) == '!' or redis.call('HGET', KEYS[1], 'born') ~= ARGV[3] then return 1 end
end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS[1] session hash, KEYS[2] its ended mark.  ARGV[1]: the one revision to end, ARGV[2]: ttl (ms).  Deletes
# the session only while it has that very revision, not one it had (a write since, an import say, made another
# session of it), and keeps its last chunk's fingerprint and answer as the mark; returns 1 when it deleted. A
# retry after a lost reply finds nothing and returns 0: the caller (a sequence's end) only needs it gone.
_END = _WRITES + _REVISION + """
if revision(KEYS[1]) ~= ARGV[1] then return 0 end
local last = redis.call('HMGET', KEYS[1], 'fp', 'ans')
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('HSET', KEYS[2], 'fp', last[1] or '', 'ans', last[2] or '')
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
"""

# KEYS[1] session hash: its revision ('!' and its type for a key of another type; false: none) and its
# ``born`` (false: none).
_REVISION_OF = _REVISION + """
local current = revision(KEYS[1])
if current and current:sub(1, 1) ~= '!' then return {current, redis.call('HGET', KEYS[1], 'born')} end
return {current, false}
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
        namespace: str = "",
    ):
        self.ttl_seconds = ttl_seconds
        self._prefix = KEY_PREFIX + (f"{namespace}:" if namespace else "")
        self._ended_prefix = ENDED_PREFIX + (f"{namespace}:" if namespace else "")
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
        self._load = self._redis.register_script(_LOAD)
        self._commit = self._redis.register_script(_COMMIT)
        self._reset = self._redis.register_script(_RESET)
        self._delete = self._redis.register_script(_DELETE)
        self._end = self._redis.register_script(_END)
        self._revision_of = self._redis.register_script(_REVISION_OF)

    def redis_key(self, key: str) -> str:
        return self._prefix + key

    async def _call(self, operation: Awaitable[_T]) -> _T:
        try:
            return await operation
        except _UNAVAILABLE as exc:
            if isinstance(exc, rexc.ReadOnlyError):
                await self._forget_replica()
            kind = f"redis: {exc.__class__.__name__}"
            raise StoreUnavailable(f"{kind}: {exc}", kind) from exc
        except rexc.ResponseError as exc:
            if str(exc).startswith(_UNAVAILABLE_REPLIES):
                raise StoreUnavailable(f"redis: {exc}", f"redis: {str(exc).split(maxsplit=1)[0]}") from exc
            raise

    async def _forget_replica(self) -> None:
        """READONLY: the connection leads to a replica, the primary it reached before a failover that moved
        the URL's address to another (DNS, a managed Redis, a proxy). Pings answer there, so the pool would
        keep it and every write would be refused for as long as it lives: the idle connections are closed
        (the one that was refused is idle again by now), and the next call connects to the address anew."""
        with contextlib.suppress(rexc.RedisError, OSError):
            await self._redis.connection_pool.disconnect(inuse_connections=False)

    # -- the protocol ----------------------------------------------------------------------------------

    async def load(self, keys: Sequence[str]) -> list[Session | None]:
        return await self._read(keys, self._ttl_ms)

    async def peek(self, key: str) -> Session | None:
        session, = await self._read([key], 0)
        return session

    async def _read(self, keys: Sequence[str], ttl_ms: int) -> list[Session | None]:
        """The records of ``keys`` in one script call, their TTLs refreshed to ``ttl_ms`` (0: left alone)."""
        if not keys:
            return []
        found = await self._call(self._load(keys=[self.redis_key(k) for k in keys], args=[ttl_ms]))
        sessions = [_session(key, dict(zip(flat[::2], flat[1::2], strict=True)))
                    for key, flat in zip(keys, found, strict=True)]
        for session in sessions:
            self._mark_other_layout(session)
        return sessions

    def _mark_other_layout(self, session: Session | None) -> None:
        """A state of another size (written by a model whose state is laid out otherwise) cannot be
        continued: its record names that layout as part of its model version, so the chunk is judged a
        409 model-changed that says to reset the session, instead of failing when its state is gathered."""
        if session is None or not session.handle or session.handle is _UNREADABLE:
            return
        size = len(session.handle)  # in bytes: one to three past S floats is no state of S floats either
        if size != self.state_size * _STATE_DTYPE.itemsize:
            session.model_version = (f"{session.model_version} (a state of {size / _STATE_DTYPE.itemsize:g}"
                                     f" floats, not {self.state_size})")

    def gather(self, sessions: Sequence[Session | None], device: Any) -> Tensor:
        states = np.zeros((len(sessions), self.state_size), dtype=np.float32)  # (B, S)
        for row, session in enumerate(sessions):
            if session is None or not session.handle:  # new, or reset: the fresh state
                continue
            raw: bytes = session.handle
            if len(raw) != self.state_size * _STATE_DTYPE.itemsize:
                raise ValueError(
                    f"session {session.key!r} holds a {len(raw)}-byte state in Redis, expected"
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
        args: list[Any] = [repr(now), self._ttl_ms]
        for write, revision, state in zip(writes, revisions, host, strict=True):
            expected = write.expected_revision if write.expected_revision is not None else ""
            args += [expected, revision, write.position, write.model_version, write.last_offset,
                     write.fingerprint, write.answer, state.tobytes()]
        # One script for the batch: one command to send and one reply to parse, whatever the batch size.
        replies = await self._call(self._commit(keys=[self.redis_key(w.key) for w in writes], args=args))
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
        try:
            values: list[Any] = await self._call(self._redis.hmget(self.redis_key(key), list(_INFO_FIELDS)))
        except rexc.ResponseError as exc:
            if not str(exc).startswith("WRONGTYPE"):
                raise
            kind: Any = await self._call(self._redis.type(self.redis_key(key)))  # b"string", b"list", ...
            return _session(key, {b"rev": b"!" + kind})
        return _session(key, dict(zip((f.encode() for f in _INFO_FIELDS), values, strict=True)))

    async def delete(self, key: str, revision: Revision | None = None) -> bool:
        """Whether there was a session to delete. Two steps, each safe to retry (the connections retry once
        after a lost reply): the session's revision and ``born``, then a delete of that session only (however
        many chunks it took in between; not one created since). With ``revision``
        (the one a DELETE's If-Match was compared at) one step: a delete only at that very revision."""
        redis_key = self.redis_key(key)
        if revision is not None:
            return bool(await self._call(self._delete(keys=[redis_key], args=[revision, 1])))
        revision, born = await self._call(self._revision_of(keys=[redis_key]))
        if revision is None:
            return False
        await self._call(self._delete(keys=[redis_key], args=[revision, 0, born or b""]))
        return True

    async def end(self, key: str, revision: Revision) -> bool:
        keys = [self.redis_key(key), self._ended_prefix + key]
        return bool(await self._call(self._end(keys=keys, args=[revision, self._ttl_ms])))

    async def ended(self, key: str) -> Ended | None:
        try:
            last: list[Any] = await self._call(self._redis.hmget(self._ended_prefix + key, ["fp", "ans"]))
        except rexc.ResponseError as exc:  # a key of another type there, not written by this service: no mark
            if not str(exc).startswith("WRONGTYPE"):
                raise
            return None
        return None if last[1] is None else Ended(last[0] or b"", last[1])

    async def reset(self, key: str, model_version: str) -> tuple[Session, bool]:
        now = self._clock()
        revision = secrets.token_hex(16)
        existed, created = await self._call(self._reset(
            keys=[self.redis_key(key)], args=[revision, model_version, repr(now), self._ttl_ms]
        ))
        session = Session(key, 0, model_version, revision, created_at=float(created), updated_at=now)
        return session, not existed

    async def version_counts(self, tenant: str | None = None) -> dict[str, int]:
        """A SCAN of this namespace's keys (``tenant``'s alone when given) and one pipelined HGET each:
        O(sessions), for the registry's periodic drain check and the model listing, never the hot path."""
        # Tenants are [A-Za-z0-9._-] (service.keys): nothing in one is a SCAN glob's special character.
        match = self._prefix + (f"{tenant}/" if tenant is not None else "") + "*"
        counts: Counter[str] = Counter()
        batch: list[bytes] = []

        async def tally() -> None:
            async with self._redis.pipeline(transaction=False) as pipe:
                for key in batch:
                    pipe.hget(key, "ver")
                for version in await pipe.execute(raise_on_error=False):
                    if isinstance(version, bytes):  # not None (gone), nor the error of a key of another type
                        counts[version.decode(errors="replace")] += 1
            batch.clear()

        async def scan() -> None:
            async for key in self._redis.scan_iter(match=match, count=1000):
                if b":" not in key[len(self._prefix):].split(b"/", 1)[0]:  # not another model's (any bytes)
                    batch.append(key)
                if len(batch) >= 1000:
                    await tally()
            await tally()

        await self._call(scan())
        return dict(counts)

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except (rexc.RedisError, OSError):
            return False

    async def close(self) -> None:
        await self._redis.aclose()


def _session(key: str, fields: dict[bytes, bytes | None]) -> Session | None:
    """A record from its hash fields (HGETALL: bytes keys); None for a missing key. A record this service
    cannot read (a key of another type, a field that does not parse: garbage, or another program's) is
    named a damaged record in its model version, so a chunk on it is a 409 that says to reset it, and its
    state is one no model reads (an export is a 409 too)."""
    revision = fields.get(b"rev")
    if not revision:
        return None
    try:
        if revision.startswith(b"!"):
            raise ValueError(f"a Redis {revision[1:].decode()}, not a hash")
        return Session(
            key,
            position=_whole(fields.get(b"pos"), 0),
            model_version=(fields.get(b"ver") or b"").decode(),
            revision=revision.decode(),
            created_at=_timestamp(fields.get(b"created")),
            updated_at=_timestamp(fields.get(b"updated")),
            last_offset=_whole(fields.get(b"loff"), -1),
            fingerprint=fields.get(b"fp") or b"",
            answer=fields.get(b"ans") or b"",
            handle=fields.get(b"state"),
        )
    except ValueError as exc:  # UnicodeDecodeError included
        # The revision as stored, not decoded: a write replacing the record (a reset, an import) must send
        # these very bytes back to its compare-and-set, and garbage need not be UTF-8.
        return Session(key, position=0, model_version=f"(a damaged record in Redis: {exc})",
                       revision=revision, created_at=0.0, updated_at=0.0, handle=_UNREADABLE)


def _whole(raw: bytes | None, absent: int) -> int:
    """A record's position or offset (``absent`` when it has none); ValueError past int64, which the chunk
    fingerprint and every answer pack them into (Python's int has no bound of its own)."""
    value = int(raw or absent)
    if not -(2**63) <= value < 2**63:
        raise ValueError(f"a whole number of {len(str(value))} digits")
    return value


def _timestamp(raw: bytes | None) -> float:
    """A record's time (unix seconds); ValueError for one that is no time a date can hold (nan, inf, 1e300)."""
    value = float(raw or 0)
    if not is_unix_time(value):
        raise ValueError(f"a time of {value!r}")
    return value
