"""Pins to older versions, and their cap (in-process, the real registry and engines)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import service.models
from tests.service.helpers import series
from tests.service.test_model_lifecycle import (
    LONG,
    _in_process_registry,
    _position_or_refusal,
    _warm_version_2,
)


def test_a_pin_that_keeps_chunks_in_order_is_not_evicted_by_the_pins_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new session's first chunk waits at version 1 (busy with another session's long chunk) as version 2
    is listed: ``ServedModel.add`` pins the session to version 1. Other sessions are then routed to version 1
    until the pins pass their cap (MAX_PINS, made small here). The cap evicted the oldest pin, this one, and
    the session's second chunk went to version 2, created the session there and the first applied on top
    of it (positions 16, 8). A pin whose session has chunks at its version is kept."""
    monkeypatch.setattr(service.models, "MAX_PINS", 2)
    registry = _in_process_registry(tmp_path)
    busy = series(LONG, seed=4)
    chunks = series(16, seed=5).reshape(2, 8, 1)
    others = [f"t/o{i}" for i in range(3)]

    async def scenario() -> list[Any]:
        await registry.start()
        model = registry.models["m"]
        first = model.engine
        for key in others:  # sessions living on version 1
            await first.predict(key, chunks[0], 0, 0)
        list_version_2 = await _warm_version_2(registry)
        other = first.enqueue("t/busy", busy, None, 0)
        while first.queue:  # taken: computing
            await asyncio.sleep(0.001)
        early = first.enqueue("t/s", chunks[0], None, 0)  # waits behind it at version 1
        list_version_2()  # pins t/busy and t/s to version 1
        assert model.engine_for("t/s") is first
        routed = [model.engine.enqueue(key, chunks[1], 8, 0) for key in others]  # at the newest, routed on
        while len(first.queue) < 1 + len(others):  # routed to version 1 (and pinned there), behind t/s
            await asyncio.sleep(0.001)
        late = model.engine_for("t/s").enqueue("t/s", chunks[1], None, 0)
        await asyncio.wait({other, early, late, *routed})
        await registry.stop()
        return [_position_or_refusal(early), _position_or_refusal(late),
                *(_position_or_refusal(f) for f in routed)]

    assert asyncio.run(scenario()) == [8, 16, 16, 16, 16]
