"""What the bench parts share: the machine line, the model they serve, ports, server processes."""

from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_WEIGHTS = ROOT / "model" / "weights" / "default"
# The serving sizes of the issue: one feature, hidden 64, two layers.
HIDDEN, LAYERS = 64, 2


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def revision() -> str:
    """The commit measured, and whether model/ or service/ had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "model", "service"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown revision"
    return f"commit {head}" + (" + uncommitted changes in model/ or service/" if dirty else "")


def machine() -> str:
    """One line naming what produced the numbers."""
    import torch  # here, not at the top: the load generator imports this module and must start fast

    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{os.cpu_count()} cores, {cpu_model()}{gpu}, Python {platform.python_version()},"
            f" torch {torch.__version__}, {platform.system()} {platform.release()}; {revision()}")


def service_threads() -> int:
    """The intra-op threads the service runs with (GRU_TORCH_THREADS alone: the benchmarks need none of the
    other settings, and a value meant for another machine must not stop them)."""
    from service.config import intra_op_threads  # here, not at the top: see machine

    return intra_op_threads(int(os.environ.get("GRU_TORCH_THREADS") or 0))


def bench_model(directory: Path | None = None) -> tuple[Path, str]:
    """The checkpoint the service benchmarks run: the shipped default, else a random one at serving sizes.

    Returns its path and a description for the table caption.
    """
    if (DEFAULT_WEIGHTS / "config.json").is_file():
        return DEFAULT_WEIGHTS, f"shipped model ({DEFAULT_WEIGHTS.relative_to(ROOT)})"
    directory = random_checkpoint(directory or Path(tempfile.mkdtemp(prefix="gru-bench-model-")), hidden=HIDDEN,
                                  layers=LAYERS, lags=12, name="bench")
    return directory, f"random model, hidden {HIDDEN}, {LAYERS} layers (no model/weights/default yet)"


def random_checkpoint(directory: Path, *, hidden: int, layers: int, lags: int, features: tuple[str, ...] = ("x",),
                      seed: int = 0, name: str) -> Path:
    """A random forecaster saved as a checkpoint (the tests' tiny models, the benchmarks' stand-in), with a
    head and autoregression loud enough that a wrong state changes the numbers; seeds give versions."""
    import torch

    from model import Forecaster, ForecasterConfig, save_checkpoint

    torch.manual_seed(seed)
    count = len(features)
    config = ForecasterConfig(features=features, hidden_size=hidden, num_layers=layers, lags=lags,
                              mean=(0.5,) * count, scale=(0.3,) * count, diff_scale=(0.1,) * count)
    forecaster = Forecaster(config)
    with torch.no_grad():
        forecaster.head.weight.normal_(0, 0.5)
        forecaster.autoregression.weight.normal_(0, 0.2)
    save_checkpoint(forecaster, directory, name=name)
    return directory


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Process:
    """A server subprocess on 127.0.0.1:port, its output in a log file."""

    name: str
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    extra: list[Process] = field(default_factory=list)  # helpers stopped with it (redis-server)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        for proc in [self, *self.extra]:
            if proc.process.poll() is None:
                proc.process.send_signal(signal.SIGTERM)
                try:
                    proc.process.wait(15)
                except subprocess.TimeoutExpired:
                    proc.process.kill()
                    proc.process.wait()


def spawn(name: str, argv: list[str], port: int, log_dir: Path, env: dict[str, str] | None = None) -> Process:
    log_path = log_dir / f"{name}-{port}.log"
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                                   stdout=log_file, stderr=subprocess.STDOUT)
    return Process(name, process, port, log_path)


def wait_http(proc: Process, path: str = "/", timeout: float = 60) -> None:
    """Until ``path`` answers anything below 500 (a 404 or 405 is proof of life)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.process.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.process.returncode}:\n{proc.log_tail()}")
        try:
            with urllib.request.urlopen(proc.url + path, timeout=1) as answer:
                if answer.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.1)
    proc.stop()
    raise RuntimeError(f"{proc.name} not ready in {timeout} s:\n{proc.log_tail()}")


def start_service(model_path: Path, log_dir: Path, env: dict[str, str] | None = None) -> Process:
    """``python -m service`` with its default settings (CPU), plus ``env``."""
    port = free_port()
    argv = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port)]
    proc = spawn("service", argv, port, log_dir,
                 {"GRU_MODEL_PATH": str(model_path), "GRU_DEVICE": "cpu", **(env or {})})
    wait_http(proc, "/readyz")
    return proc


def start_redis(log_dir: Path) -> Process:
    """A throwaway redis-server on a free loopback port: no persistence, nothing written to disk."""
    port = free_port()
    proc = spawn("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no", "--protected-mode", "yes"], port, log_dir)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.process.poll() is not None:
            raise RuntimeError(f"redis-server exited:\n{proc.log_tail()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return proc
        except OSError:
            time.sleep(0.05)
    proc.stop()
    raise RuntimeError("redis-server did not answer PING in 10 s")
