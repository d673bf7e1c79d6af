"""The memory store in process: the scenarios every store passes (tests/service/stores.py), expiry, then what
is its own: slots in one state tensor, capacity in sessions and in kept answer bytes, eviction counts."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from service.sessions.memory import INITIAL_STATE_BYTES, MemoryStore
from tests.service import stores
from tests.service.helpers import Clock
from tests.service.stores import STATE, memory_store, write


def _run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


def _counting(**options: Any) -> tuple[MemoryStore, list[tuple[str, int]]]:
    """A store and the evictions it reports, as (reason, count)."""
    evicted: list[tuple[str, int]] = []
    return memory_store(on_evict=lambda reason, count: evicted.append((reason, count)), **options), evicted


# -- what the Redis store does too (tests/service/test_redis_store.py) --------------------------------------


def test_commit_is_compare_and_set_on_the_revision() -> None:
    _run(stores.commit_is_compare_and_set(memory_store()))


def test_delete_and_recreate_at_the_same_position_fails_a_stale_write() -> None:
    _run(stores.delete_and_recreate_fails_a_stale_write(memory_store()))


def test_an_end_at_a_revision_spares_a_later_write() -> None:
    _run(stores.end_at_a_revision_spares_a_later_write(memory_store()))


def test_a_delete_at_a_revision_spares_a_later_write() -> None:
    _run(stores.delete_at_a_revision_spares_a_later_write(memory_store()))


def test_batch_commit_wins_and_loses_per_session() -> None:
    _run(stores.batch_commit_wins_and_loses_per_session(memory_store()))


def test_a_peek_reads_the_record_and_its_state() -> None:
    _run(stores.a_peek_reads_the_record_and_its_state(memory_store()))


def test_sessions_expire_after_their_ttl_counted_from_the_last_commit() -> None:
    clock = Clock()
    store = memory_store(ttl_seconds=30, clock=clock)

    async def scenario() -> None:
        first, = await store.commit([write("t/e", None, 2)], torch.zeros(1, STATE))
        assert first is not None
        clock.now += 20
        assert (await store.commit([write("t/e", first.revision, 4)], torch.zeros(1, STATE)))[0] is not None
        clock.now += 29  # 49 s since it was made, 29 s since its last commit
        assert (await store.get("t/e")).position == 4  # type: ignore[union-attr]
        clock.now += 2
        assert await store.load(["t/e"]) == [None] and await store.get("t/e") is None
        assert not await store.delete("t/e")

    _run(scenario())


# -- the memory store's own: slots, capacity, eviction ------------------------------------------------------


def test_states_grow_past_the_initial_capacity_up_to_max_sessions_and_keep_every_state() -> None:
    """Two slots at first, doubled when full, never past max_sessions + 1 rows (row 0 is the fresh state)."""
    store, evicted = _counting(max_sessions=5)
    states = torch.randn(7, STATE)

    async def scenario() -> None:
        for row in range(7):
            assert (await store.commit([write(f"t/{row}", None, 1, row=row)], states))[0] is not None
        kept = await store.load([f"t/{row}" for row in range(7)])
        assert [s is not None for s in kept] == [False, False, True, True, True, True, True]
        torch.testing.assert_close(store.gather(kept[2:]), states[2:])

    _run(scenario())
    assert store.states.shape == (6, STATE) and len(store) == 5
    assert evicted == [("capacity", 1), ("capacity", 1)]


def test_a_huge_state_starts_with_few_rows_and_grows_as_sessions_arrive() -> None:
    """1,024 rows of a state of a million floats would be 4 GB before the first session: the store starts
    within INITIAL_STATE_BYTES instead, and still takes every session up to max_sessions."""
    size = 1_000_000
    store = MemoryStore(size, torch.device("cpu"), max_sessions=100, ttl_seconds=60)
    assert store.states.numel() * 4 <= INITIAL_STATE_BYTES + size * 4  # its rows, and row 0's fresh state
    assert memory_store(initial_capacity=1024).states.shape == (101, STATE)  # a small state: as before

    async def scenario() -> None:
        for n in range(3):
            state = torch.full((1, size), float(n))
            assert (await store.commit([write(f"t/{n}", None, 1)], state))[0] is not None
        torch.testing.assert_close(store.gather(await store.load(["t/0", "t/1", "t/2"]))[:, :3],
                                   torch.tensor([[0.0] * 3, [1.0] * 3, [2.0] * 3]))

    _run(scenario())


def test_a_deleted_session_frees_its_slot_for_the_next_without_an_eviction() -> None:
    store, evicted = _counting(max_sessions=2)
    states = torch.randn(3, STATE)

    async def scenario() -> None:
        await store.commit([write("t/a", None, 1, row=0), write("t/b", None, 1, row=1)], states)
        assert await store.delete("t/a")
        assert (await store.commit([write("t/c", None, 1, row=2)], states))[0] is not None
        torch.testing.assert_close(store.gather(await store.load(["t/b", "t/c"])), states[1:])

    _run(scenario())
    assert store.states.shape == (3, STATE) and evicted == []


def test_reset_of_a_new_session_at_capacity_evicts_the_least_recently_used() -> None:
    store, evicted = _counting(max_sessions=2)

    async def scenario() -> None:
        for key in ("t/a", "t/b"):
            await store.commit([write(key, None, 1)], torch.zeros(1, STATE))
        await store.reset("t/b", "v1")  # an existing session: nothing to make room for
        assert evicted == []
        _, created = await store.reset("t/c", "v1")
        assert created and [s.key for s in store.records()] == ["t/b", "t/c"]

    _run(scenario())
    assert evicted == [("capacity", 1)]


def test_sweep_drops_the_expired_sessions_and_counts_them_as_ttl_evictions() -> None:
    clock = Clock(0.0)
    store, evicted = _counting(ttl_seconds=15, clock=clock)

    async def scenario() -> None:
        for key in ("t/a", "t/b", "t/c"):
            await store.commit([write(key, None, 1)], torch.zeros(1, STATE))
            clock.now += 10  # made at 0, 10 and 20

    _run(scenario())
    assert store.sweep() == 2  # at 30: a and b idle over 15 s
    assert [s.key for s in store.records()] == ["t/c"] and evicted == [("ttl", 2)]
    assert store.sweep() == 0 and evicted == [("ttl", 2)]


def test_a_load_counts_as_use_so_the_sweep_meets_sessions_in_the_order_they_expire() -> None:
    """a made at 0, b at 10, a loaded at 25 (its chunk judged, applied or not): at 45 b has expired and a has
    not; at 56 a has. Were a load no use, a would expire at 31 behind b, live until 40, and linger."""
    clock = Clock(0.0)
    store, evicted = _counting(ttl_seconds=30, clock=clock)

    async def scenario() -> None:
        await store.commit([write("t/a", None, 1)], torch.zeros(1, STATE))
        clock.now = 10
        await store.commit([write("t/b", None, 1)], torch.zeros(1, STATE))
        clock.now = 25
        assert [s.key if s else None for s in await store.load(["t/a"])] == ["t/a"]
        clock.now = 45
        assert store.sweep() == 1 and [s.key for s in store.records()] == ["t/a"]
        assert (await store.get("t/a")) is not None
        clock.now = 56
        assert store.sweep() == 1 and store.records() == []

    _run(scenario())
    assert evicted == [("ttl", 1), ("ttl", 1)]


def test_a_peek_is_no_use_so_a_peeked_session_still_goes_first_and_expires_on_time() -> None:
    """The state API's reads (exports, forks' parents) go through ``peek``: a backup job exporting sessions must
    neither keep them alive nor shield them from eviction."""
    clock = Clock(0.0)
    store, evicted = _counting(max_sessions=2, ttl_seconds=30, clock=clock)

    async def scenario() -> None:
        for at, key in ((0, "t/old"), (10, "t/new")):
            clock.now = at
            assert (await store.commit([write(key, None, 1)], torch.zeros(1, STATE)))[0] is not None
        clock.now = 20
        assert await store.peek("t/old") is not None
        assert (await store.commit([write("t/newest", None, 1)], torch.zeros(1, STATE)))[0] is not None
        assert [s.key for s in store.records()] == ["t/new", "t/newest"]  # old went first all the same
        clock.now = 39
        assert await store.peek("t/new") is not None
        clock.now = 41  # 31 s after its commit, 2 s after its peek
        assert await store.peek("t/new") is None

    _run(scenario())
    assert evicted == [("capacity", 1), ("ttl", 1)]


def test_kept_answers_past_their_budget_evict_the_least_recently_used_sessions() -> None:
    """One client's long chunks keep answers of tens of KB each (53 KB at 4,096 steps, horizon 512): counted
    in sessions only, 20,000 of them took a 1 Gi pod's memory. Never the session just written, even alone
    over the budget."""
    store, evicted = _counting(max_answer_bytes=100)

    async def commit(key: str, size: int) -> None:
        assert all(await store.commit([write(key, None, 1, answer=b"a" * size)], torch.zeros(1, STATE)))

    for key in ("t/a", "t/b", "t/c"):
        _run(commit(key, 40))
    assert [s.key for s in store.records()] == ["t/b", "t/c"] and evicted == [("capacity", 1)]
    _run(commit("t/huge", 500))
    assert [s.key for s in store.records()] == ["t/huge"]


def test_a_session_evicted_by_its_own_commit_reports_a_lost_write() -> None:
    """GRU_MAX_SESSIONS below the batch: the third new session evicts the first, written by the same commit.
    It was reported as won, and its freed slot, taken by the third, got two rows in one copy."""
    store = memory_store(max_sessions=2)
    states = torch.arange(3 * STATE, dtype=torch.float32).reshape(3, STATE)
    writes = [write(f"t/{name}", None, 1, row=row) for row, name in enumerate("abc")]
    results = _run(store.commit(writes, states))
    assert [r.key if r is not None else None for r in results] == [None, "t/b", "t/c"]
    torch.testing.assert_close(store.gather(store.records()), states[1:])


def test_a_session_loaded_for_a_batch_is_not_the_one_its_batch_evicts() -> None:
    """Loading refreshes recency: with a and b stored, a the older, a batch that loads a and creates c must
    evict b (evicting a would make a's own write in that batch lose, and its chunk be judged as unknown)."""
    store = memory_store(max_sessions=2)

    async def scenario() -> None:
        for key in ("t/a", "t/b"):
            assert (await store.commit([write(key, None, 1)], torch.zeros(1, STATE)))[0] is not None
        await store.load(["t/a", "t/c"])
        assert (await store.commit([write("t/c", None, 1)], torch.zeros(1, STATE)))[0] is not None
        assert [s.key for s in store.records()] == ["t/a", "t/c"]

    _run(scenario())


def test_a_session_found_expired_on_access_is_counted_as_a_ttl_eviction() -> None:
    """Not only the sweeper counts TTL evictions: so does the access that finds a session expired."""
    clock = Clock()
    store, evicted = _counting(ttl_seconds=60, clock=clock)

    async def scenario() -> None:
        await store.commit([write("t/old", None, 1)], torch.zeros(1, STATE))
        clock.now += 61
        assert await store.load(["t/old"]) == [None]

    _run(scenario())
    assert evicted == [("ttl", 1)]


@pytest.mark.parametrize("bound", [{"max_sessions": 2}, {"tenant_max_sessions": 2}, {"max_answer_bytes": 100}],
                         ids=["GRU_MAX_SESSIONS", "GRU_TENANT_MAX_SESSIONS", "GRU_MAX_ANSWER_BYTES"])
def test_an_expired_session_dropped_at_a_bound_is_counted_as_a_ttl_eviction(bound: dict[str, int]) -> None:
    """Between two sweeps a full store still holds sessions past their TTL; the new session that pushed out
    such a one was counted as a capacity (or tenant_quota) eviction, which the GruSessionCapacityEvictions
    alert reads as live sessions lost for want of room."""
    clock = Clock()
    store, evicted = _counting(ttl_seconds=60, clock=clock, **bound)

    async def scenario() -> None:
        for key in ("t/a", "t/b"):
            assert (await store.commit([write(key, None, 1, answer=b"a" * 40)], torch.zeros(1, STATE)))[0]
        clock.now += 61  # a and b expired; no sweep has run yet
        assert (await store.commit([write("t/c", None, 1, answer=b"a" * 40)], torch.zeros(1, STATE)))[0]

    _run(scenario())
    assert "t/a" not in [s.key for s in store.records()]
    assert evicted == [("ttl", 1)]


def test_a_lost_write_does_not_shield_older_sessions_from_the_answers_budget() -> None:
    """A write that lost its race (its session written meanwhile by another batch, an import, a reset) is no
    session "just written": its key at the front of the recency order stopped the trim at once, and the store
    stayed over GRU_MAX_ANSWER_BYTES with older sessions left to evict (never evicted, at any later commit
    that lost a write the same way)."""
    store, evicted = _counting(max_answer_bytes=100)

    async def scenario() -> None:
        zero = torch.zeros(1, STATE)
        a, = await store.commit([write("t/a", None, 1, answer=b"a" * 10)], zero)
        judged = a.revision  # a batch judges a chunk of t/a against this revision
        assert (await store.commit([write("t/a", judged, 2, answer=b"a" * 10)], zero))[0]  # a rival write
        assert (await store.commit([write("t/b", None, 1, answer=b"b" * 40)], zero))[0]
        results = await store.commit([write("t/a", judged, 2, answer=b"a" * 10),
                                      write("t/c", None, 1, row=1, answer=b"c" * 70)], torch.zeros(2, STATE))
        assert results[0] is None and results[1] is not None

    _run(scenario())
    assert sum(len(s.answer) for s in store.records()) <= 100
    assert [s.key for s in store.records()] == ["t/c"] and evicted == [("capacity", 2)]
