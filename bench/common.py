"""What the bench parts share: the machine line and the model they serve (processes: harness/processes.py)."""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
from pathlib import Path

from harness.checkpoints import random_checkpoint
from harness.processes import ROOT

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
