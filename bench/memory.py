"""Memory per live session in the memory store: resident memory for 100,000 sessions, bytes per session.

    python -m bench.memory
    python -m bench.memory --sessions 200000 --steps 64

In this process: a ``MemoryStore`` sized as the service sizes it (``GRU_MAX_SESSIONS``, default 100,000),
filled the way the engine fills it: batches of 64 new sessions, each loaded, gathered and committed with a
``Write`` that carries the fingerprint and a real answer body (the engine's JSON for a chunk of ``--steps``
one-feature predictions). Resident memory (``/proc/self/statm``) is read before the store exists and after
the last commit; the difference per session is compared with the state itself (``state_size × 4`` bytes).
An itemised count (``sys.getsizeof`` of each record's objects, plus the state tensor's rows) says where the
bytes go.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from bench.common import bench_model, machine
from model import load_checkpoint
from service.config import Settings
from service.rules import fingerprint
from service.schemas import encode_answer
from service.sessions.base import Session, Write, session_key
from service.sessions.memory import MemoryStore

BATCH = 64


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def fill(store: MemoryStore, sessions: int, steps: int, state_size: int, version: str) -> None:
    rng = np.random.default_rng(0)
    for first in range(0, sessions, BATCH):
        ids = [f"sensor-{n:07d}" for n in range(first, min(first + BATCH, sessions))]
        keys = [session_key("default", i) for i in ids]
        records = await store.load(keys)
        store.gather(records, None)  # as the compute thread does; the result is dropped
        values = rng.normal(0.5, 0.1, (len(ids), steps, 1)).astype(np.float32)  # (B, T, 1)
        states = torch.randn(len(ids), state_size)  # (B, S): the batch's new states
        answers = [encode_answer(values[row] + 0.01, None, version, (ids[row], steps, True)) for row in range(len(ids))]
        writes = [
            Write(key=key, expected_revision=None, position=steps, model_version=version, last_offset=0,
                  fingerprint=fingerprint(0, 0, values[row]), row=row, answer=answers[row])
            for row, key in enumerate(keys)
        ]
        committed = await store.commit(writes, states)
        if any(c is None for c in committed):
            raise RuntimeError("a fresh session failed its commit")


def _allocated(make: Callable[[], object]) -> int:
    """Bytes the allocator handed out for what ``make`` returns (orjson over-allocates its output)."""
    tracemalloc.start()
    try:
        kept = make()
        size = tracemalloc.get_traced_memory()[0]
        del kept
        return size
    finally:
        tracemalloc.stop()


def _numbers(r: Session) -> tuple[object, ...]:
    return r.position, r.revision, r.created_at, r.updated_at, r.handle


def itemise(store: MemoryStore) -> dict[str, float]:
    """Average bytes per record, by part (Python object sizes; the shared model_version string excluded)."""
    records: list[Session] = store.records()
    count = len(records)
    parts = {
        "Session object": sum(sys.getsizeof(r) for r in records),
        "key string": sum(sys.getsizeof(r.key) for r in records),
        "answer bytes": sum(sys.getsizeof(r.answer) for r in records),
        "fingerprint bytes": sum(sys.getsizeof(r.fingerprint) for r in records),
        "ints and floats": sum(sum(map(sys.getsizeof, _numbers(r))) for r in records),
        "state tensor rows": store.states.numel() * store.states.element_size(),
    }
    return {name: total / count for name, total in parts.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--steps", type=int, default=8, help="steps in each kept answer")
    args = parser.parse_args(argv)
    console = Console(width=max(Console().width, 100))
    console.print(f"machine: {machine()}")
    torch.set_num_threads(1)
    model_path, description = bench_model(Path(tempfile.mkdtemp(prefix="gru-bench-memory-")))
    forecaster, meta = load_checkpoint(model_path)
    state_size = forecaster.state_size
    state_bytes = state_size * 4
    # GRU_MAX_SESSIONS as the service would read it, at least the sessions we create (no evictions).
    max_sessions = max(Settings(model_path=model_path).max_sessions, args.sessions)
    version = str(meta["version"])

    gc.collect()
    before = rss_bytes()
    store = MemoryStore(state_size, torch.device("cpu"), max_sessions, ttl_seconds=3600)
    asyncio.run(fill(store, args.sessions, args.steps, state_size, version))
    gc.collect()
    after = rss_bytes()
    assert len(store) == args.sessions

    per_session = (after - before) / args.sessions
    parts = itemise(store)
    out = Table(title=f"{args.sessions:,} live sessions in the memory store ({description})")
    out.add_column("what", justify="left")
    out.add_column("bytes", justify="right")
    out.add_row("resident memory before", f"{before:,}")
    out.add_row("resident memory after", f"{after:,}")
    out.add_row("[bold]resident bytes per session[/bold]", f"[bold]{per_session:,.0f}[/bold]")
    out.add_row(f"state (S = {state_size} floats × 4)", f"{state_bytes:,}")
    out.add_row("[bold]bookkeeping per session (resident − state)[/bold]",
                f"[bold]{per_session - state_bytes:,.0f}[/bold]")
    out.add_section()
    for name, value in parts.items():
        out.add_row(f"  itemised: {name}", f"{value:,.0f}")
    accounted = sum(parts.values())
    out.add_row("  itemised total (the rest: dict/OrderedDict entries, allocator)", f"{accounted:,.0f}")
    console.print(out)
    def one_answer() -> bytes:
        return encode_answer(np.zeros((args.steps, 1), np.float32), None, version, ("sensor-0000000", args.steps, True))

    console.print(f"one {args.steps}-step answer from orjson.dumps: {sys.getsizeof(one_answer())} bytes by "
                  f"sys.getsizeof, {_allocated(one_answer):,} bytes allocated (the store keeps an exact-size copy)")
    console.print(f"state tensor capacity {store.states.size(0):,} rows (GRU_MAX_SESSIONS={max_sessions:,})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
