"""What the session-store tests share: builders at test sizes, and the scenarios every store must pass.

test_memory_store.py and test_redis_store.py each run the scenarios on their own store. A memory store
updates its records in place on a commit, so a scenario keeps the revision a write was judged against in a
variable, as the engine does, never reads it back from the record.
"""

from __future__ import annotations

from typing import Any

import torch

from service.sessions.base import Ended, SessionStore, Write
from service.sessions.memory import MemoryStore

STATE = 6  # the state size of the stores under test


def memory_store(**options: Any) -> MemoryStore:
    """A CPU memory store with room for 100 sessions idle up to an hour, starting at two slots so that tests
    see it grow; ``options`` override any of these."""
    settings = {"max_sessions": 100, "ttl_seconds": 3600.0, "initial_capacity": 2, **options}
    return MemoryStore(STATE, torch.device("cpu"), **settings)


def write(key: str, expected: Any, position: int, row: int = 0, answer: bytes = b"{}") -> Write:
    """A chunk's commit at ``position``, judged against revision ``expected`` (None: the session must not
    exist), its state in row ``row`` of the states committed."""
    return Write(key=key, expected_revision=expected, position=position, model_version="v1",
                 last_offset=0, fingerprint=b"f" * 16, answer=answer, row=row)


async def commit_is_compare_and_set(store: SessionStore) -> None:
    states = torch.arange(2 * STATE, dtype=torch.float32).view(2, STATE)
    first, = await store.commit([write("t/a", None, 3, row=1)], states)
    assert first is not None and first.position == 3
    first_revision = first.revision
    again, = await store.commit([write("t/a", None, 4)], states)  # "must not exist" loses
    assert again is None
    loaded, = await store.load(["t/a"])
    assert loaded is not None and loaded.revision == first_revision and loaded.position == 3
    judged = loaded.revision
    torch.testing.assert_close(store.gather([loaded, None], "cpu"), torch.stack([states[1], torch.zeros(STATE)]))
    second, = await store.commit([write("t/a", judged, 7)], states)
    assert second is not None and second.revision != first_revision
    stale, = await store.commit([write("t/a", judged, 9)], states)  # judged against an old one
    assert stale is None
    assert (await store.get("t/a")).position == 7  # type: ignore[union-attr]
    torch.testing.assert_close(store.gather(await store.load(["t/a"]), "cpu"), states[:1])


async def delete_and_recreate_fails_a_stale_write(store: SessionStore) -> None:
    states = torch.ones(1, STATE)
    old, = await store.commit([write("t/b", None, 3)], states)
    assert old is not None and await store.delete("t/b")
    assert not await store.delete("t/b")
    recreated, = await store.commit([write("t/b", None, 3)], states)
    assert recreated is not None and recreated.position == old.position
    lost, = await store.commit([write("t/b", old.revision, 6)], states)
    assert lost is None  # position 3 again, but a new revision: the write judged against `old` is refused
    reset, created = await store.reset("t/b", "v1")
    assert not created and reset.position == 0 and reset.revision != recreated.revision
    lost, = await store.commit([write("t/b", recreated.revision, 6)], states)
    assert lost is None
    loaded, = await store.load(["t/b"])
    assert loaded is not None and loaded.position == 0 and loaded.created_at == recreated.created_at
    assert torch.equal(store.gather([loaded], "cpu"), torch.zeros(1, STATE))  # reset: the fresh state
    _, created = await store.reset("t/new", "v1")
    assert created


async def end_at_a_revision_spares_a_later_write(store: SessionStore) -> None:
    """An end at a revision (a v2 sequence's) removes the session only while it is at that very one: a write
    since (an import over it) made another session of it, which stays, in Redis too, where the replaced
    revision is among the record's past. The session it removes leaves its last chunk as its ended mark."""
    states = torch.ones(1, STATE)
    ended, = await store.commit([write("t/e", None, 3)], states)
    assert ended is not None
    ended_revision = ended.revision
    imported, = await store.commit([write("t/e", ended_revision, 9, answer=b'{"imported":1}')], states)
    assert imported is not None
    assert not await store.end("t/e", ended_revision)
    assert (await store.get("t/e")).position == 9  # type: ignore[union-attr]
    assert await store.ended("t/e") is None
    assert await store.end("t/e", imported.revision)
    assert await store.get("t/e") is None
    assert await store.ended("t/e") == Ended(b"f" * 16, b'{"imported":1}')
    assert not await store.end("t/e", imported.revision)


async def batch_commit_wins_and_loses_per_session(store: SessionStore) -> None:
    seeded, = await store.commit([write("t/x", None, 1)], torch.ones(1, STATE))
    assert seeded is not None
    states = torch.randn(3, STATE)
    results = await store.commit(
        [write("t/x", "not-the-revision", 2, row=0), write("t/y", None, 2, row=1), write("t/z", None, 2, row=2)],
        states)
    assert results[0] is None and results[1] is not None and results[2] is not None
    loaded = await store.load(["t/x", "t/y", "t/z", "t/missing"])
    assert loaded[0] is not None and loaded[0].position == 1 and loaded[3] is None
    expected = torch.stack([torch.ones(STATE), states[1], states[2], torch.zeros(STATE)])
    torch.testing.assert_close(store.gather(loaded, "cpu"), expected)  # the lost write left t/x's state alone


async def a_peek_reads_the_record_and_its_state(store: SessionStore) -> None:
    """``peek`` (the state API's read) finds what ``load`` finds, its state included; whether it counts as use
    (it must not) is each store's own test."""
    states = torch.arange(2 * STATE, dtype=torch.float32).view(2, STATE)
    written, = await store.commit([write("t/p", None, 5, row=1)], states)
    assert written is not None
    peeked = await store.peek("t/p")
    assert peeked is not None and (peeked.position, peeked.revision) == (5, written.revision)
    torch.testing.assert_close(store.gather([peeked], "cpu"), states[1:])
    assert await store.peek("t/absent") is None


async def delete_at_a_revision_spares_a_later_write(store: SessionStore) -> None:
    """A delete at a revision (a DELETE with If-Match) removes the session only while it is at that very one:
    a chunk committed since made another revision of it, which stays; one gone since is deleted all the same."""
    states = torch.ones(1, STATE)
    first, = await store.commit([write("t/d", None, 3)], states)
    assert first is not None
    compared = first.revision
    moved, = await store.commit([write("t/d", compared, 5)], states)
    assert moved is not None
    assert not await store.delete("t/d", compared)
    assert (await store.get("t/d")).position == 5  # type: ignore[union-attr]
    assert await store.delete("t/d", moved.revision)
    assert await store.get("t/d") is None
    assert await store.delete("t/d", moved.revision)  # what a delete at that revision asks for holds
    assert await store.ended("t/d") is None  # a delete leaves no ended mark
