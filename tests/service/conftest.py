"""Fixtures for service tests that need real outside parts (a redis-server process)."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@dataclass
class RedisServer:
    """A real ``redis-server`` on 127.0.0.1, nothing persisted unless ``stop(save=True)``."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> None:
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory), "--protected-mode", "no"],
            cwd=self.directory, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(self.directory / 'redis.log').read_text()}")
            try:
                if self.client().ping():
                    return
            except Exception:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server not answering on port {self.port}")

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=1)

    def stop(self, save: bool = False) -> None:
        """Shut down; with ``save``, write dump.rdb first so a restart in this directory has the data."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(Exception):  # the connection drops as it shuts down
            self.client().shutdown(save=save, nosave=not save)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_redis(directory: Path) -> RedisServer:
    """A running redis-server in ``directory``; skips the test where redis-server or the client is absent."""
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed (apt-get install redis-server, or `make system-deps`)")
    pytest.importorskip("redis")
    server = RedisServer(directory)
    server.start()
    return server


def kill_redis(server: RedisServer) -> None:
    if server.process is not None and server.process.poll() is None:
        server.process.kill()
        server.process.wait()


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A fresh redis-server per test (`make test` installs the Debian package)."""
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    kill_redis(server)
