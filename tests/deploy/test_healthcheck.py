"""The image's healthcheck against a real service started as the image starts it, on a port that is not 8000.

The container's command is the Dockerfile's ENTRYPOINT + CMD (with the host narrowed to loopback); its port
comes from GRU_PORT alone, and the healthcheck commands of the Dockerfile and of docker-compose.yml run with
the same environment, as Docker runs them inside the container.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from harness.processes import Process, free_port, spawn, wait_http
from tests.deploy.dockerfile import final, read_instructions

REPO = Path(__file__).resolve().parents[2]


def _dockerfile_healthcheck() -> list[str]:
    (check,) = final(read_instructions(REPO / "Dockerfile"), "HEALTHCHECK")
    return list(json.loads(check[check.index("CMD") + 3:].strip()))


def _compose_healthcheck() -> list[str]:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    test = compose["x-api"]["healthcheck"]["test"]
    assert test[0] == "CMD", test
    return list(test[1:])


def _container_argv() -> list[str]:
    instructions = read_instructions(REPO / "Dockerfile")
    argv = json.loads(final(instructions, "ENTRYPOINT")[-1]) + json.loads(final(instructions, "CMD")[-1])
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    argv[argv.index("--host") + 1] = "127.0.0.1"  # loopback only on a shared machine
    return [sys.executable if word == "python" else word for word in argv]


def _check(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable if word == "python" else word for word in command]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture(scope="module")
def container_env(tiny_model: Path) -> dict[str, str]:
    """The container's environment: its settings, GRU_PORT among them, and nothing of the caller's GRU_."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRU_")}
    port = free_port()
    assert port != 8000
    return {**env, "GRU_MODEL_PATH": str(tiny_model), "GRU_DEVICE": "cpu", "GRU_TORCH_THREADS": "1",
            "GRU_PORT": str(port)}


@pytest.fixture(scope="module")
def container(container_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    port = int(container_env["GRU_PORT"])
    proc = spawn("container", _container_argv(), port, tmp_path_factory.mktemp("container"), container_env)
    try:
        wait_http(proc, "/readyz")
        yield proc
    finally:
        proc.stop(signal.SIGKILL)


@pytest.mark.parametrize("command", [_dockerfile_healthcheck(), _compose_healthcheck()], ids=["Dockerfile", "compose"])
def test_healthcheck_passes_for_a_container_on_a_port_other_than_8000(
    command: list[str], container: Process, container_env: dict[str, str]
) -> None:
    assert container.port != 8000
    done = _check(command, container_env)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("variable", ["http_proxy", "HTTP_PROXY"])
def test_healthcheck_asks_the_service_directly_whatever_proxy_the_environment_names(
    variable: str, container: Process, container_env: dict[str, str]
) -> None:
    """Docker hands its client's proxy settings to containers as HTTP_PROXY; no proxy reaches the container's
    loopback (here: one where nothing listens), so the check must not go through it."""
    env = {k: v for k, v in container_env.items() if k.lower() not in ("no_proxy", "http_proxy")}
    done = _check(_dockerfile_healthcheck(), {**env, variable: f"http://127.0.0.1:{free_port()}"})
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("command", [_dockerfile_healthcheck(), _compose_healthcheck()], ids=["Dockerfile", "compose"])
def test_healthcheck_fails_where_nothing_answers_on_gru_port(
    command: list[str], container: Process, container_env: dict[str, str]
) -> None:
    """The same check, told a port where nothing listens: the service is not there, so unhealthy."""
    done = _check(command, {**container_env, "GRU_PORT": str(free_port())})
    assert done.returncode == 1
    assert "/readyz" in done.stderr


def test_healthcheck_fails_while_the_service_is_not_ready(
    container_env: dict[str, str], tmp_path: Path
) -> None:
    """/readyz answering 503 (here: its Redis unreachable) is unhealthy, not just a closed port."""
    port = free_port()
    env = {**container_env, "GRU_PORT": str(port), "GRU_STORE": "redis",
           "GRU_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    proc = spawn("not-ready", _container_argv(), port, tmp_path, env)
    try:
        wait_http(proc, "/readyz", ready_status=503)
        done = _check(_dockerfile_healthcheck(), env)
        assert done.returncode == 1
        assert "503" in done.stderr
    finally:
        proc.stop(signal.SIGKILL)
