"""The Redis readiness checks the deployment ships (compose's healthcheck, the prod overlay's readiness probe)
run with the real redis-cli: ready on a real redis-server, not ready on a Redis still loading its data.

A Redis loading its append-only file answers every command with a LOADING error, and redis-cli 7 exits 0 on
an error reply, so `redis-cli ping` alone passed: compose started the api replicas (`service_healthy`) and
Kubernetes sent traffic to a Redis that refused every session command. The loading Redis is a socket that
answers LOADING as Redis does (a real one loads for a moment only, with an append-only file of gigabytes).
"""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from harness.processes import RedisServer, start_redis
from tests.deploy.conftest import DEPLOY, REPO, find_tool

LOADING = b"-LOADING Redis is loading the dataset in memory\r\n"


def _shell(command: list[str]) -> str:
    """The shell line of a check given as ``["CMD-SHELL", line]`` (compose) or ``["sh", "-c", line]`` (Kubernetes)."""
    assert command[:-1] in (["CMD-SHELL"], ["sh", "-c"]), f"the check is not one shell line: {command}"
    return command[-1]


def _checks() -> dict[str, str]:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    prod = list(yaml.safe_load_all((DEPLOY / "k8s" / "overlays" / "prod" / "redis.yaml").read_text()))
    redis = next(d for d in prod if d and d.get("kind") == "StatefulSet")
    container = redis["spec"]["template"]["spec"]["containers"][0]
    return {"compose healthcheck": _shell(compose["services"]["redis"]["healthcheck"]["test"]),
            "prod readiness probe": _shell(container["readinessProbe"]["exec"]["command"])}


def _run(line: str, port: int) -> int:
    """The check's exit status against 127.0.0.1:``port`` (the check itself asks the default address)."""
    find_tool("redis-cli")
    assert line.startswith("redis-cli "), line
    return subprocess.run(["sh", "-c", line.replace("redis-cli ", f"redis-cli -p {port} ", 1)], timeout=10).returncode


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    find_tool("redis-server")
    server = start_redis(Path(tmp_path_factory.mktemp("redis")))
    yield server
    server.stop()


@pytest.fixture
def loading_port() -> Iterator[int]:
    """A port that answers every connection's first command with Redis's LOADING error."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    done = threading.Event()

    def answer() -> None:
        while not done.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.recv(1024)
                connection.sendall(LOADING)

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    done.set()
    thread.join(10)
    listener.close()


@pytest.mark.parametrize("name", sorted(_checks()))
def test_a_redis_check_passes_on_a_ready_redis(name: str, redis: RedisServer) -> None:
    assert _run(_checks()[name], redis.port) == 0


@pytest.mark.parametrize("name", sorted(_checks()))
def test_a_redis_check_fails_while_redis_loads_its_data(name: str, loading_port: int) -> None:
    assert _run(_checks()[name], loading_port) != 0
