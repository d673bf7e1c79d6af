"""The harness that starts the real services for tests and benchmarks (``harness.processes``)."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import harness.processes
from harness.processes import start_service


def test_a_port_taken_before_the_service_binds_it_is_chosen_again(tiny_model: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``free_port`` gives a port free at that moment; a socket that takes it before the service binds it (two
    test workers start servers side by side) made the start fail with "address already in use"."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        chosen: Iterator[int] = iter([busy])
        free = harness.processes.free_port
        monkeypatch.setattr(harness.processes, "free_port", lambda: next(chosen, 0) or free())
        server = start_service(tiny_model, tmp_path, {"GRU_TORCH_THREADS": "1"})
        try:
            assert server.port != busy
            with urllib.request.urlopen(server.url + "/readyz", timeout=10) as answer:
                assert answer.status == 200
        finally:
            server.stop()
    assert "address already in use" in (tmp_path / f"service-{busy}.log").read_text()
