"""What a body of unknown fields costs the service, and what it costs everyone else.

    python -m bench.junk
    python -m bench.junk --megabytes 3 --attackers 4 --duration 5

Starts ``python -m service`` on the bench model and times the answer to one ``--megabytes`` body of unknown
keys (``{"values": [0.5], "k0": [[[[]]]], "k1": ...}``) on each body-reading route (median of ``--repeat``),
with the CPU time the route's body parsing takes for it in this process (thread time: what the event loop
pays, whatever else the machine runs), then a normal session's 8-step chunks alone and while
``--attackers`` clients post such bodies back to back.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from bench.common import bench_model, machine
from harness.processes import start_service
from service.api.bodies import parse, wrong_item_keys
from service.problems import Problem
from service.schemas import BatchEnvelope, BatchItem, ChunkRequest, StatelessRequest


def junk_object(megabytes: float, head: bytes = b'"values": [0.5]') -> bytes:
    """A JSON object of ``head`` and then unknown keys, each holding ``[[[[]]]]``, to about ``megabytes``."""
    parts = [b"{" + head]
    size, index = len(parts[0]), 0
    while size < megabytes * 1_000_000:
        part = b', "k%d": [[[[]]]]' % index
        parts.append(part)
        size += len(part)
        index += 1
    return b"".join(parts) + b"}"


def _parse_cpu(route: str, body: bytes) -> float:
    """Thread CPU seconds of what the route does with ``body`` before its answer: parsing it."""
    began = time.thread_time()
    try:
        if "batch" in route:
            wrong_item_keys(body, parse(body, BatchEnvelope).items, BatchItem)
        else:
            parse(body, ChunkRequest if "sessions" in route else StatelessRequest)
    except Problem:
        pass
    return time.thread_time() - began


def _timed(http: httpx.Client, path: str, body: bytes) -> tuple[float, int]:
    began = time.perf_counter()
    response = http.post(path, content=body, headers={"content-type": "application/json"})
    return time.perf_counter() - began, response.status_code


def _session_latencies(http: httpx.Client, session: str, duration: float) -> list[float]:
    """Chunks of 8 steps in sequence for ``duration`` seconds; each one's latency in seconds."""
    latencies: list[float] = []
    position = int(http.post(f"/v1/sessions/{session}/reset").json()["position"])
    stop = time.perf_counter() + duration
    while time.perf_counter() < stop:
        elapsed, status = _timed(http, f"/v1/sessions/{session}/predict",
                                 b'{"values": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], "offset": %d}' % position)
        assert status == 200, status
        position += 8
        latencies.append(elapsed)
    return latencies


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.junk", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--attackers", type=int, default=4)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args(argv)
    console = Console()
    log_dir = Path(tempfile.mkdtemp(prefix="gru-bench-junk-"))
    model_path, model_name = bench_model(log_dir)
    junk = junk_object(args.megabytes)
    bodies = {
        "/v1/predict": junk,
        "/v1/sessions/{id}/predict": junk,
        "/v1/predict/batch, top level": junk_object(args.megabytes, b'"items": [{"session_id": "j", "values": [0.5]}]'),
        "/v1/predict/batch, in an item": b'{"items": [' + junk_object(args.megabytes, b'"session_id": "j", '
                                                                        b'"values": [0.5]') + b"]}",
    }
    service = start_service(model_path, log_dir, {"GRU_MAX_BODY_BYTES": str(int(args.megabytes * 2_000_000))})
    try:
        with httpx.Client(base_url=service.url, timeout=60) as http:
            table = Table(title=f"one {len(junk) / 1e6:.1f} MB body of {junk.count(b'[[[[') :,} unknown keys,"
                                f" median of {args.repeat}")
            for column in ("route", "status", "answered in ms", "parsing, CPU ms"):
                table.add_column(column, justify="right" if column != "route" else "left")
            for route, body in bodies.items():
                path = route.split(",")[0].replace("{id}", "junk")
                answers = [_timed(http, path, body) for _ in range(args.repeat)]
                cpu = statistics.median(_parse_cpu(route, body) for _ in range(args.repeat))
                table.add_row(route, str(answers[0][1]), f"{statistics.median(t for t, _ in answers) * 1000:,.1f}",
                              f"{cpu * 1000:,.1f}")
            console.print(table)

            alone = _session_latencies(http, "bystander", args.duration)
            stop = threading.Event()

            def attack() -> None:
                with httpx.Client(base_url=service.url, timeout=60) as own:
                    while not stop.is_set():
                        _timed(own, "/v1/predict", junk)

            attackers = [threading.Thread(target=attack) for _ in range(args.attackers)]
            for thread in attackers:
                thread.start()
            try:
                crowded = _session_latencies(http, "bystander", args.duration)
            finally:
                stop.set()
                for thread in attackers:
                    thread.join()
        latency = Table(title="another session's 8-step chunks, ms")
        for column in ("while", "chunks", "p50", "p99"):
            latency.add_column(column, justify="right" if column != "while" else "left")
        for label, runs in (("alone", alone), (f"{args.attackers} clients post junk", crowded)):
            quantiles = statistics.quantiles(runs, n=100)
            latency.add_row(label, str(len(runs)), f"{statistics.median(runs) * 1000:.1f}",
                            f"{quantiles[98] * 1000:.1f}")
        console.print(latency)
        console.print(f"{model_name}; {machine()}")
    finally:
        service.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
