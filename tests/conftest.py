"""Shared fixtures: a tiny model checkpoint and real service processes on 127.0.0.1 and free ports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the fused GRU kernel (model/fused.py) is tested in Triton's interpreter, on CPU tensors;
    # Triton reads this when the kernel is defined, so before anything imports the model.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.common import free_port, random_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def make_tiny_model(directory: Path, features: tuple[str, ...] = ("x",), seed: int = 0, name: str = "tiny") -> Path:
    """A small random forecaster: fast to load, different outputs for different seeds (so, versions)."""
    return random_checkpoint(directory, hidden=16, layers=2, lags=4, features=features, seed=seed, name=name)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@dataclass
class Server:
    """A ``python -m service`` process; ``url`` is its base URL."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(model_path: Path, log_dir: Path, env: dict[str, str] | None = None,
                 port: int | None = None, wait: bool = True) -> Server:
    port = port or free_port()
    full_env = {
        **os.environ,
        "GRU_MODEL_PATH": str(model_path),
        "GRU_DEVICE": os.environ.get("GRU_DEVICE", "cpu"),  # GRU_DEVICE=cuda runs the API tests on a GPU
        "GRU_TORCH_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        **(env or {}),
    }
    log_path = log_dir / f"server-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT,
        )
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    if wait:
        wait_ready(server)
    return server


def refused_start_log(model_path: Path, log_dir: Path, env: dict[str, str]) -> str:
    """Start a server that must refuse to start (exit status 2); its log, which says why."""
    server = start_server(model_path, log_dir, env, wait=False)
    try:
        assert server.process.wait(60) == 2
    finally:
        server.stop()
    return server.log()


def wait_ready(server: Server, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server not ready in {timeout} s:\n{server.log()}")


ServerFactory = Callable[..., Server]


@pytest.fixture
def server_factory(tiny_model: Path, tmp_path: Path) -> Iterator[ServerFactory]:
    """Start servers with extra GRU_ settings: ``server_factory(GRU_SESSION_TTL_SECONDS="1")``."""
    started: list[Server] = []

    def factory(model_path: Path | None = None, port: int | None = None, wait: bool = True,
                **env: str) -> Server:
        server = start_server(model_path or tiny_model, tmp_path, env, port=port, wait=wait)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop(signal.SIGKILL)


@pytest.fixture(scope="session")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One shared server with default settings, for tests that use distinct session ids."""
    running = start_server(tiny_model, tmp_path_factory.mktemp("server"))
    yield running
    running.stop(signal.SIGKILL)


@pytest.fixture
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http
