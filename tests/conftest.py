"""Shared fixtures: a tiny model checkpoint and real service processes on 127.0.0.1 and free ports."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the fused GRU kernel (model/fused.py) is tested in Triton's interpreter, on CPU tensors;
    # Triton reads this when the kernel is defined, so before anything imports the model.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from harness.checkpoints import random_checkpoint
from harness.processes import Process as Server
from harness.processes import start_service


def make_tiny_model(directory: Path, features: tuple[str, ...] = ("x",), seed: int = 0, name: str = "tiny",
                    error_scale: float | None = None) -> Path:
    """A small random forecaster: fast to load, different outputs for different seeds (so, versions);
    calibrated with errors spread over [0, error_scale] when that is given."""
    return random_checkpoint(directory, hidden=16, layers=2, lags=4, features=features, seed=seed, name=name,
                             error_scale=error_scale)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


WIDE_FEATURES = tuple(f"f{n}" for n in range(32))


@pytest.fixture(scope="session")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model over 32 features, calibrated: a frame or an answer of a given size in 32 times fewer steps,
    and the model's time goes by steps, so tests that must fill socket buffers with them do it fast."""
    return make_tiny_model(tmp_path_factory.mktemp("wide-model"), features=WIDE_FEATURES, error_scale=1.0)


def start_server(model_path: Path, log_dir: Path, env: dict[str, str] | None = None,
                 port: int | None = None, wait: bool = True) -> Server:
    """The service as the tests run it: one torch thread, on GRU_DEVICE (cuda runs the API tests on a GPU)."""
    settings = {"GRU_DEVICE": os.environ.get("GRU_DEVICE", "cpu"), "GRU_TORCH_THREADS": "1", **(env or {})}
    return start_service(model_path, log_dir, settings, port=port, wait=wait)


def refused_start_log(model_path: Path, log_dir: Path, env: dict[str, str]) -> str:
    """Start a server that must refuse to start (exit status 2); its log, which says why."""
    server = start_server(model_path, log_dir, env, wait=False)
    try:
        assert server.process.wait(60) == 2
    finally:
        server.stop()
    return server.log()


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
