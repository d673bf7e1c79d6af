"""A steady load while a new model version loads beside the serving one; prints p50/p99 per phase and the
memory the version costs.

    python -m bench.version_load                    # 10 s per phase, 32 sessions, chunks of 8 steps

The service serves a repository holding the shipped model as version 1 (polled every 0.5 s). The load
generator (bench.load's, a separate process) streams ``--sessions`` sessions in three phases of
``--duration`` seconds, the same sessions throughout: (1) steady, on version 1 alone; (2) while version 2
(the shipped weights, slightly perturbed: another hash) is published into the repository a second into the
phase, found by the poll, loaded and warmed on worker threads; (3) after it, the sessions still pinned to
version 1 (served by version 1's engine beside version 2's). The load takes a fraction of phase 2, so the
slowest answer is printed beside p99. The service's resident memory is read before and after the load.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from bench.common import DEFAULT_WEIGHTS, machine
from bench.load import run_client
from harness.processes import start_service
from model.checkpoint import load_checkpoint, publishing, save_checkpoint


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _versions(url: str) -> list[str]:
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as answer:
        (model,) = json.loads(answer.read())["models"]
    return [v["version"] for v in model["versions"]]


def _publish(repository: Path, seed: int) -> None:
    """The shipped weights, each nudged by 1e-4 noise, published as the model's next version."""
    forecaster, meta = load_checkpoint(DEFAULT_WEIGHTS)
    torch.manual_seed(seed)
    with torch.no_grad():
        for parameter in forecaster.parameters():
            parameter.add_(torch.randn_like(parameter) * 1e-4)
    with publishing(repository, "temps") as publication:
        save_checkpoint(forecaster, publication.staging, name="temps", training=meta.get("training", {}))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.version_load", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--sessions", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=8)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        repository = Path(scratch) / "repo"
        _publish(repository, seed=1)
        server = start_service(DEFAULT_WEIGHTS, Path(scratch), {
            "GRU_MODEL_REPOSITORY": str(repository), "GRU_REPOSITORY_POLL_SECONDS": "0.5"})
        try:
            pid = server.process.pid
            phases: list[tuple[str, dict[str, Any]]] = []

            def drive(warmup: float) -> dict[str, Any]:
                return run_client(server.url, args.chunk, args.sessions, args.duration, warmup, "versions", [pid])

            phases.append(("1. steady, version 1 alone", drive(warmup=2.0)))
            before = _rss_mib(pid)
            loaded: dict[str, float] = {}

            def publish_and_wait() -> None:
                time.sleep(1.0)
                began = time.perf_counter()
                _publish(repository, seed=2)
                while "2" not in _versions(server.url):
                    time.sleep(0.05)
                loaded["seconds"] = time.perf_counter() - began

            publisher = threading.Thread(target=publish_and_wait)
            publisher.start()
            phases.append(("2. version 2 published and loaded", drive(warmup=0.0)))
            publisher.join()
            after = _rss_mib(pid)
            phases.append(("3. after, sessions pinned to 1", drive(warmup=0.0)))
        finally:
            server.stop()
    table = Table(title=f"steady load while a version loads ({args.sessions} sessions, chunks of {args.chunk})")
    # A phase's load generator starts each session at offset 0: its first chunk gets a 409 with the position
    # to resend from (one per session after the first phase); anything else would be a failed request.
    for column in ("phase", "req/s", "p50 ms", "p99 ms", "max ms", "409 resync", "other non-200", "server CPU"):
        table.add_column(column, justify="right")
    for name, numbers in phases:
        errors = dict(numbers["errors"])
        resync = errors.pop("409", 0)
        table.add_row(name, f"{numbers['requests_per_s']:.0f}", f"{numbers['p50_ms']:.2f}",
                      f"{numbers['p99_ms']:.2f}", f"{numbers['max_ms']:.1f}", str(resync),
                      str(sum(errors.values()) + numbers["failures"]), f"{numbers['server_cpu']:.2f}")
    console = Console()
    console.print(table)
    console.print(f"version 2 serving {loaded.get('seconds', float('nan')):.2f} s after its publication began;"
                  f" resident memory {before:.0f} -> {after:.0f} MiB (+{after - before:.1f} MiB for the version)")
    console.print(machine())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
