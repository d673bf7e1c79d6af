"""Real processes on loopback, for the benchmarks and the tests alike: the service, redis-server, any HTTP server.

One place starts them so that a test and a benchmark run a server the same way; each listens on 127.0.0.1 at a
free port and writes its output to a log file that a failure can quote.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


_PORT_TAKEN = "address already in use"  # uvicorn's start-up error when its port is bound by another socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _end(process: subprocess.Popen[bytes], sig: int, timeout: float) -> int:
    """Signal the process, wait, and kill it if it outlives ``timeout``; its exit status."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@dataclass
class RedisServer:
    """A ``redis-server`` on 127.0.0.1 working in ``directory``: nothing persisted unless ``stop(save=True)``,
    after which ``start()`` on the same object brings the data back on the same port."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def start(self, timeout: float = 10) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                 "no", "--dir", str(self.directory), "--protected-mode", "yes"],
                cwd=self.directory, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited:\n{self.log_path.read_text(errors='replace')}")
            if self._command(b"PING").startswith(b"+PONG"):
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"redis-server did not answer PING on port {self.port} in {timeout} s")

    def _command(self, command: bytes) -> bytes:
        """One inline command's first reply bytes (b"" when nothing answers): no client library needed."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
                sock.sendall(command + b"\r\n")
                return sock.recv(64)
        except OSError:
            return b""

    def client(self) -> Any:
        """A redis-py client, for tests that look at the keys themselves."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, socket_connect_timeout=1)

    def stop(self, save: bool = False) -> None:
        """Shut down; with ``save``, write dump.rdb first so that ``start()`` in this directory has the data."""
        if self.process is None or self.process.poll() is not None:
            return
        self._command(b"SHUTDOWN SAVE" if save else b"SHUTDOWN NOSAVE")
        try:
            self.process.wait(10)  # a signal now could cut the save short
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.process is not None:
            _end(self.process, signal.SIGKILL, 10)


def start_redis(directory: Path) -> RedisServer:
    server = RedisServer(directory)
    server.start()
    return server


@dataclass
class Process:
    """A server subprocess on 127.0.0.1:port, its output in a log file."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    redis: RedisServer | None = None  # the redis-server it was started on, stopped with it

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Signal it (SIGTERM: a graceful drain), wait, kill it past ``timeout``; its exit status."""
        status = _end(self.process, sig, timeout)
        if self.redis is not None:
            self.redis.stop()
        return status


def spawn(name: str, argv: list[str], port: int, log_dir: Path, env: dict[str, str] | None = None) -> Process:
    log_path = log_dir / f"{name}-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                   stdout=log_file, stderr=subprocess.STDOUT)
    return Process(name, process, port, log_path)


def wait_http(proc: Process, path: str, ready_status: int | None = 200, timeout: float = 60) -> None:
    """Until ``path`` answers ``ready_status`` (None: anything below 500, as a 404 is proof of life too)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.process.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.process.returncode}:\n{proc.log_tail()}")
        try:
            with urllib.request.urlopen(proc.url + path, timeout=1) as answer:
                status = answer.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError:
            status = None
        if status is not None and (status == ready_status or (ready_status is None and status < 500)):
            return
        time.sleep(0.1)
    proc.stop(signal.SIGKILL)
    raise RuntimeError(f"{proc.name} not ready in {timeout} s:\n{proc.log_tail()}")


def start_service(model_path: Path, log_dir: Path, env: dict[str, str] | None = None, *, port: int | None = None,
                  wait: bool = True, redis: RedisServer | None = None, retries: int = 2) -> Process:
    """``python -m service`` with its default settings (the GPU where there is one) plus ``env``; with
    ``redis``, on that Redis (stopped with the service). ``wait``: until /readyz says ready.

    A port chosen here is free when chosen, but until the service binds it another socket may take it (a
    connection's ephemeral port, another test worker's server): with ``wait``, a service that could not bind
    it is started again on another, up to ``retries`` times."""
    chosen = port or free_port()
    settings = {"GRU_MODEL_PATH": str(model_path)}
    if redis is not None:
        settings |= {"GRU_STORE": "redis", "GRU_REDIS_URL": redis.url}
    proc = spawn("service", [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(chosen)],
                 chosen, log_dir, {**settings, **(env or {})})
    proc.redis = redis
    if wait:
        try:
            wait_http(proc, "/readyz")
        except RuntimeError:
            if port is None and retries > 0 and _PORT_TAKEN in proc.log():
                return start_service(model_path, log_dir, env, wait=wait, redis=redis, retries=retries - 1)
            raise
    return proc
