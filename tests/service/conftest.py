"""Fixtures for service tests that need real outside parts (a redis-server process)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import harness.processes
from harness.processes import RedisServer


def start_redis(directory: Path) -> RedisServer:
    """A running redis-server in ``directory``; skips the test where redis-server or the client is absent."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server, or `make system-deps`)")
    pytest.importorskip("redis")
    return harness.processes.start_redis(directory)


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A fresh redis-server per test (`make test` installs the Debian package)."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.kill()
