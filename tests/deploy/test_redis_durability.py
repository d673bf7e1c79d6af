"""The scale profile's Redis keeps every session across its own restart: a real redis-server started with the
options docker-compose.yml gives it, under the real service (GRU_STORE=redis), SIGTERM, then a new
redis-server on the same data directory.

Only what cannot run here is changed: the data directory (the compose volume's mount point) becomes the test's
own, and the server listens on a free loopback port.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from harness.processes import Process, free_port
from tests.conftest import start_server
from tests.service.helpers import new_id, position, send, series, stateless

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"
CHUNKS = [7, 1, 12, 5]  # 25 steps in, then a restart of Redis, then the rest
STEPS = 40


def compose_redis_argv(data_dir: Path, port: int) -> list[str]:
    """The compose Redis's command, its --dir moved to `data_dir`, on 127.0.0.1:`port`."""
    command = yaml.safe_load(COMPOSE.read_text())["services"]["redis"]["command"]
    assert isinstance(command, list) and command[0] == "redis-server", command
    argv = list(command)
    argv[argv.index("--dir") + 1] = str(data_dir)
    return [*argv, "--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes"]


class ComposeRedis:
    """redis-server as compose runs it; `restart` ends it with `sig` and starts it again on the same data."""

    def __init__(self, binary: str, data_dir: Path) -> None:
        self.argv = compose_redis_argv(data_dir, free_port())
        self.argv[0] = binary
        self.log_path = data_dir / "redis.log"
        self.port = int(self.argv[self.argv.index("--port") + 1])
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=1)
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, self.log_path.read_text(errors="replace")
            try:
                if client.ping() and client.info("persistence")["loading"] == 0:
                    return
            except redis.RedisError:
                pass
            assert time.monotonic() < deadline, "redis-server did not come up"
            time.sleep(0.05)

    def stop(self, sig: int) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(30)


@pytest.fixture
def compose_redis(tmp_path: Path, tool: Callable[[str], str]) -> Iterator[ComposeRedis]:
    pytest.importorskip("redis")
    server = ComposeRedis(tool("redis-server"), tmp_path)
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.process.kill()
        server.process.wait()


@pytest.fixture
def replica(tiny_model: Path, tmp_path: Path, compose_redis: ComposeRedis) -> Iterator[Process]:
    proc = start_server(tiny_model, tmp_path, {"GRU_STORE": "redis", "GRU_REDIS_URL": compose_redis.url})
    yield proc
    proc.stop(signal.SIGKILL)


def test_sessions_survive_a_redis_restart_at_their_exact_positions_and_states(
    compose_redis: ComposeRedis, replica: Process
) -> None:
    sessions = {new_id("durable"): series(STEPS, seed=seed) for seed in range(3)}
    with httpx.Client(base_url=replica.url, timeout=30) as client:
        got: dict[str, list[list[float]]] = {session: [] for session in sessions}
        start = 0
        for size in CHUNKS:
            for session, values in sessions.items():
                answer = send(client, session, values[start : start + size], offset=start)
                assert answer.status_code == 200, answer.text
                got[session].extend(answer.json()["predictions"])
            start += size

        assert compose_redis.stop(signal.SIGTERM) == 0
        compose_redis.start()  # same data directory, same port: the replica reconnects by itself
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the replica did not become ready again"
            time.sleep(0.1)

        for session, values in sessions.items():
            assert position(client, session) == start
            rest = send(client, session, values[start:], offset=start)
            assert rest.status_code == 200, rest.text
            assert rest.json()["position"] == STEPS and rest.json()["created"] is False
            got[session].extend(rest.json()["predictions"])
            # the state came back exactly: the whole stream equals one stateless pass over the series
            np.testing.assert_allclose(np.array(got[session]), stateless(client, values)["predictions"], atol=1e-5)
