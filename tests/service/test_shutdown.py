"""Shutdown and restart against a real server process: what an operator relies on when SIGTERM, SIGINT or
SIGKILL comes while work is in flight (docs/durability.md, "Snapshots of the memory store")."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from tests.conftest import ServerFactory
from tests.service.helpers import new_id
from tests.service.test_stream import _long_frame, _raw_stream, _send_until_stalled


def test_sigint_during_a_stream_drain_exits_at_once(server_factory: ServerFactory, wide_model: Path) -> None:
    """Ctrl-C twice: the second makes the service exit at once, without the drain (docs/durability.md). A
    stream whose client reads nothing holds the drain to its bound; SIGINT then must not wait it out."""
    bound = 20.0
    server = server_factory(wide_model, GRU_REQUEST_TIMEOUT_SECONDS=str(bound))
    with _raw_stream(server, new_id("deaf-int")) as sock:
        assert _send_until_stalled(sock, _long_frame(3), 100_000) < 100_000  # its answers fill every buffer
        server.process.send_signal(signal.SIGTERM)
        time.sleep(1)
        assert server.process.poll() is None  # the deaf stream holds the drain
        server.process.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        server.process.wait(bound + 15)
        took = time.monotonic() - interrupted
    assert took < 3, f"{took:.1f} s after SIGINT: the drain ({bound:g} s) was waited out"
