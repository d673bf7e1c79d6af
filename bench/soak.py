"""Soak: a bounded run of mixed traffic against one service process, watching for 5xx, drift and leaks.

    python -m bench.soak                                  # 10 minutes, report every 30 s
    python -m bench.soak --duration 150 --interval 15     # a shorter run
    python -m bench.soak --url http://127.0.0.1:8000 --pid 1234 --key KEY   # drive a running service

Unless ``--url`` is given, the service is started here (``python -m service``, the shipped model, or a
random one at serving sizes before there is one) with two tenants' API keys, a small session capacity
(``--capacity``, so least-recently-used evictions happen all the time), a short idle TTL (so expiry
sweeps run too) and small limits (so the "too large" refusals are cheap to provoke).

``--workers`` concurrent clients, each owning its share of a session pool larger than the capacity, pick
operations at random: chunks appended with the right offset (and, for an evicted session, the 404 that
says so, after which the client starts it again), exact retries (the same answer, byte for byte), chunks
with horizons, new sessions, GETs, resets, deletes, stateless and batch predictions, and bad requests of
every kind (malformed JSON, NaN, ragged rows, negative or stale offsets, too many steps, too long a
horizon, an oversized body, a bad session id, an unknown route, a missing or wrong key). Every answer is
classified against what that request must get; anything else is an error of its class.

Every ``--interval`` seconds a row: requests, p50/p99 latency, statuses, the server's resident memory
(VmRSS of its process) and its live sessions and evictions from /metrics. At the end, errors by class and
a verdict: no 5xx, no unexpected answer, no transport error, and resident memory flat (the median of the
last third of the samples within ``--rss-tolerance`` of the median of the first third, after warm-up).
Exit status 0 when the verdict passes.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import re
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

from bench.common import bench_model, machine
from harness.processes import start_service

KEYS = {"soak-tenant-a-0123456789abcdef": "tenant-a", "soak-tenant-b-0123456789abcdef": "tenant-b"}
MAX_CHUNK_STEPS = 256
MAX_HORIZON = 32
MAX_BODY_BYTES = 256 * 1024

# operation: weight. Chunks dominate, as they do in real traffic.
MIX = {
    "chunk": 34, "retry": 8, "horizon": 8, "create": 4, "get": 6, "reset": 3, "delete": 3,
    "stateless": 4, "batch": 4, "bad": 26,
}
BAD = (
    "malformed_json", "nan", "ragged", "negative_offset", "stale_offset", "too_many_steps", "horizon_too_long",
    "oversized_body", "bad_session_id", "unknown_route", "no_key", "wrong_key", "unknown_session",
)


@dataclass
class _Session:
    position: int = 0
    exists: bool = False
    last_body: bytes | None = None  # the last applied chunk's request, for an exact retry
    last_answer: bytes = b""


@dataclass
class _Tally:
    """What one interval saw."""

    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    unexpected: int = 0
    transport: int = 0


@dataclass
class _Run:
    args: argparse.Namespace
    key: str | None
    interval: _Tally = field(default_factory=_Tally)
    by_class: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    latency_by_class: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    unexpected_examples: list[str] = field(default_factory=list)
    rss_samples: list[float] = field(default_factory=list)  # the server's VmRSS in MB, one a second
    stop_at: float = 0.0

    def record(self, operation: str, status: int | str, latency: float, expected: set[int]) -> None:
        self.interval.latencies.append(latency)
        self.by_class[operation][str(status)] += 1
        self.latency_by_class[operation].append(latency)
        if isinstance(status, str):
            self.interval.transport += 1
            return
        self.interval.statuses[status] += 1
        if status not in expected:
            self.interval.unexpected += 1
            if len(self.unexpected_examples) < 10:
                self.unexpected_examples.append(f"{operation}: {status}, expected {sorted(expected)}")


def _values(rng: random.Random, steps: int) -> list[float]:
    phase = rng.uniform(0, 100)
    return [round(0.5 + 0.3 * math.sin(phase + 0.1 * i) + rng.gauss(0, 0.02), 5) for i in range(steps)]


def _recomputed(session: _Session, answer: bytes) -> bool:
    """An offset-0 retry of a session evicted or expired meanwhile starts it again (the README's offset rules): computed
    anew, in another batch, so equal to float32 rounding rather than byte for byte."""
    assert session.last_body is not None
    if orjson.loads(session.last_body)["offset"] != 0:
        return False
    new, old = orjson.loads(answer), orjson.loads(session.last_answer)
    return bool(new["position"] == old["position"] and new["created"]
                and np.allclose(new["predictions"], old["predictions"], atol=1e-5))


class _Client:
    """One worker: owns its sessions (so no other worker races them) and picks operations at random."""

    def __init__(self, run: _Run, http: httpx.AsyncClient, worker: int, sessions: int, seed: int):
        self.run = run
        self.http = http
        self.rng = random.Random(seed)
        self.key = list(KEYS)[worker % len(KEYS)] if run.key is None else run.key
        self.headers = {"Authorization": f"Bearer {self.key}"}
        self.sessions = {f"soak-w{worker}-s{i}": _Session() for i in range(sessions)}
        self.ids = list(self.sessions)

    async def _call(self, operation: str, method: str, path: str, expected: set[int], *,
                    body: bytes | None = None, headers: dict[str, str] | None = None) -> httpx.Response | None:
        sent = {**self.headers, **({"content-type": "application/json"} if body is not None else {}),
                **(headers or {})}
        began = time.perf_counter()
        try:
            response = await self.http.request(method, path, content=body, headers=sent)
        except httpx.HTTPError as exc:
            self.run.record(operation, type(exc).__name__, time.perf_counter() - began, expected)
            return None
        self.run.record(operation, response.status_code, time.perf_counter() - began, expected)
        return response

    async def loop(self) -> None:
        operations, weights = list(MIX), list(MIX.values())
        while time.monotonic() < self.run.stop_at:
            operation = self.rng.choices(operations, weights)[0]
            await getattr(self, f"_{operation}")()

    # -- operations -------------------------------------------------------------------------------------

    def _pick(self) -> tuple[str, _Session]:
        session_id = self.rng.choice(self.ids)
        return session_id, self.sessions[session_id]

    async def _send_chunk(self, operation: str, session_id: str, session: _Session, horizon: int = 0) -> None:
        values = _values(self.rng, self.rng.randint(1, 64))
        offset = session.position if session.exists else 0
        body = orjson.dumps({"values": values, "offset": offset, "horizon": horizon})
        # 404: evicted or expired meanwhile (capacity is small on purpose); 200 otherwise
        expected = {200, 404} if offset else {200}
        response = await self._call(operation, "POST", f"/v1/sessions/{session_id}/predict", expected, body=body)
        if response is None:
            return
        if response.status_code == 200:
            session.exists, session.position = True, offset + len(values)
            session.last_body, session.last_answer = body, response.content
        elif response.status_code == 404:
            self.sessions[session_id] = _Session()  # start it again next time, from 0

    async def _chunk(self) -> None:
        await self._send_chunk("chunk", *self._pick())

    async def _horizon(self) -> None:
        session_id, session = self._pick()
        await self._send_chunk("horizon", session_id, session, horizon=self.rng.randint(1, MAX_HORIZON))

    async def _create(self) -> None:
        session_id = self.rng.choice(self.ids)
        self.sessions[session_id] = _Session()
        await self._call("create", "DELETE", f"/v1/sessions/{session_id}", {204, 404})
        await self._send_chunk("create", session_id, self.sessions[session_id])

    async def _retry(self) -> None:
        session_id, session = self._pick()
        if session.last_body is None:
            await self._send_chunk("retry", session_id, session)
            return
        response = await self._call("retry", "POST", f"/v1/sessions/{session_id}/predict", {200, 404},
                                    body=session.last_body)
        if response is None:
            return
        if response.status_code == 404:
            self.sessions[session_id] = _Session()
        elif response.content != session.last_answer and not _recomputed(session, response.content):
            self.run.record("retry-answer-differs", 200, 0.0, set())

    async def _get(self) -> None:
        session_id, session = self._pick()
        response = await self._call("get", "GET", f"/v1/sessions/{session_id}", {200, 404})
        if response is not None and response.status_code == 200 and session.exists:
            if response.json()["position"] != session.position:
                self.run.record("get-position-differs", 200, 0.0, set())
        elif response is not None and response.status_code == 404:
            self.sessions[session_id] = _Session()

    async def _reset(self) -> None:
        session_id, _ = self._pick()
        response = await self._call("reset", "POST", f"/v1/sessions/{session_id}/reset", {200})
        if response is not None and response.status_code == 200:
            self.sessions[session_id] = _Session(exists=True)

    async def _delete(self) -> None:
        session_id, _ = self._pick()
        await self._call("delete", "DELETE", f"/v1/sessions/{session_id}", {204, 404})
        self.sessions[session_id] = _Session()

    async def _stateless(self) -> None:
        body = orjson.dumps({"values": _values(self.rng, self.rng.randint(1, 128)), "horizon": 4})
        await self._call("stateless", "POST", "/v1/predict", {200}, body=body)

    async def _batch(self) -> None:
        items: list[dict[str, Any]] = []
        picked: list[tuple[str, int, int]] = []
        for session_id in self.rng.sample(self.ids, 4):
            session = self.sessions[session_id]
            values = _values(self.rng, self.rng.randint(1, 16))
            offset = session.position if session.exists else 0
            items.append({"session_id": session_id, "values": values, "offset": offset})
            picked.append((session_id, len(values), offset))
        response = await self._call("batch", "POST", "/v1/predict/batch", {200}, body=orjson.dumps({"items": items}))
        if response is None or response.status_code != 200:
            return
        for (session_id, steps, offset), result in zip(picked, response.json()["results"], strict=True):
            if "position" in result and "status" not in result:
                self.sessions[session_id] = _Session(exists=True, position=offset + steps)
            else:  # an item's problem: evicted (404); anything else is wrong
                if result.get("status") != 404:
                    self.run.record("batch-item", result.get("status", 0), 0.0, {404})
                self.sessions[session_id] = _Session()

    async def _bad(self) -> None:
        kind = self.rng.choice(BAD)
        session_id, session = self._pick()
        path = f"/v1/sessions/{session_id}/predict"
        label = f"bad:{kind}"
        match kind:
            case "malformed_json":
                await self._call(label, "POST", path, {400}, body=b'{"values": [0.1, 0.2')
            case "nan":
                await self._call(label, "POST", path, {400, 422}, body=b'{"values": [0.1, NaN]}')
            case "ragged":
                await self._call(label, "POST", path, {422}, body=b'{"values": [[0.1], [0.2, 0.3]]}')
            case "negative_offset":
                await self._call(label, "POST", path, {422}, body=b'{"values": [0.1], "offset": -1}')
            case "stale_offset":
                # never applied: 409 (or 404 for a session that is gone); the model of the session stays right
                stale = orjson.dumps({"values": [0.1], "offset": session.position + 7})
                response = await self._call(label, "POST", path, {404, 409}, body=stale)
                if response is not None and response.status_code == 404:
                    self.sessions[session_id] = _Session()
            case "too_many_steps":
                body = orjson.dumps({"values": [0.5] * (MAX_CHUNK_STEPS + 1)})
                await self._call(label, "POST", path, {422}, body=body)
            case "horizon_too_long":
                body = orjson.dumps({"values": [0.5], "horizon": MAX_HORIZON + 1})
                await self._call(label, "POST", path, {422}, body=body)
            case "oversized_body":
                await self._call(label, "POST", path, {413}, body=b'{"values": [' + b"0.5," * (MAX_BODY_BYTES // 4)
                                 + b"0.5]}")
            case "bad_session_id":
                await self._call(label, "POST", "/v1/sessions/no%20spaces%21/predict", {422}, body=b'{"values": [1]}')
            case "unknown_route":
                await self._call(label, "GET", "/v1/nothing-here", {404})
            case "no_key":
                await self._call(label, "GET", f"/v1/sessions/{session_id}", {401}, headers={"Authorization": ""})
            case "wrong_key":
                await self._call(label, "GET", f"/v1/sessions/{session_id}", {401},
                                 headers={"Authorization": "Bearer not-a-key"})
            case "unknown_session":
                await self._call(label, "GET", f"/v1/sessions/never-{self.rng.getrandbits(64):x}", {404})


# -- the service and what it reports ---------------------------------------------------------------------


def _rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


_METRIC = re.compile(r"^(gru_active_sessions|gru_session_evictions_total)(\{[^}]*\})? (\S+)$", re.MULTILINE)


async def _scrape(http: httpx.AsyncClient) -> tuple[int, int]:
    try:
        text = (await http.get("/metrics")).text
    except httpx.HTTPError:
        return -1, -1
    active, evicted = 0.0, 0.0
    for name, _, value in _METRIC.findall(text):
        if name == "gru_active_sessions":
            active = float(value)
        else:
            evicted += float(value)
    return int(active), int(evicted)


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


async def _drive(run: _Run, url: str, pid: int | None, console: Console) -> list[dict[str, Any]]:
    args = run.args
    limits = httpx.Limits(max_connections=args.workers * 2, max_keepalive_connections=args.workers * 2)
    rows: list[dict[str, Any]] = []
    per_worker = max(4, round(args.pool * args.capacity / args.workers))  # pool > capacity: evictions
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        scrape = httpx.AsyncClient(base_url=url, timeout=10,
                                   headers={"Authorization": f"Bearer {run.key or next(iter(KEYS))}"})
        began = time.monotonic()
        run.stop_at = began + args.duration
        clients = [_Client(run, http, w, per_worker, args.seed + w) for w in range(args.workers)]
        tasks = [asyncio.create_task(c.loop()) for c in clients]
        table = Table(title=f"soak: {args.workers} clients, capacity {args.capacity}, every {args.interval:g} s")
        for column in ("t (s)", "requests", "req/s", "p50 ms", "p99 ms", "max ms", "5xx", "unexpected",
                       "transport", "RSS MB", "sessions", "evictions"):
            table.add_column(column, justify="right")
        samples = run.rss_samples
        next_row = began + args.interval
        while time.monotonic() < run.stop_at:
            await asyncio.sleep(min(1.0, max(0.0, run.stop_at - time.monotonic())))
            for task in tasks:  # a client's own bug ends the run at once, not silently at the end
                if task.done() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            rss = _rss_mb(pid)
            if rss is not None:
                samples.append(rss)
            if time.monotonic() >= next_row or time.monotonic() >= run.stop_at:
                next_row += args.interval
                tally, run.interval = run.interval, _Tally()
                active, evicted = await _scrape(scrape)
                elapsed = time.monotonic() - began
                row = {
                    "t": round(elapsed), "requests": len(tally.latencies),
                    "rps": len(tally.latencies) / args.interval,
                    "p50_ms": _percentile(tally.latencies, 50), "p99_ms": _percentile(tally.latencies, 99),
                    "max_ms": max(tally.latencies, default=0.0) * 1000,
                    "5xx": sum(n for s, n in tally.statuses.items() if s >= 500),
                    "unexpected": tally.unexpected, "transport": tally.transport,
                    "rss_mb": rss, "sessions": active, "evictions": evicted,
                }
                rows.append(row)
                table.add_row(
                    str(row["t"]), f"{row['requests']:,}", f"{row['rps']:.0f}", f"{row['p50_ms']:.1f}",
                    f"{row['p99_ms']:.1f}", f"{row['max_ms']:.0f}", str(row["5xx"]), str(row["unexpected"]),
                    str(row["transport"]), f"{rss:.1f}" if rss is not None else "-", str(active), f"{evicted:,}",
                )
                console.print(f"[dim]t={row['t']}s  {row['requests']:,} requests  p99 {row['p99_ms']:.1f} ms"
                              f"  RSS {rss if rss is not None else '-'} MB  5xx {row['5xx']}[/dim]")
        await asyncio.gather(*tasks)
        await scrape.aclose()
    console.print(table)
    return rows


def _verdict(run: _Run, rows: list[dict[str, Any]], console: Console) -> bool:
    args = run.args
    classes = Table(title="answers by request class (status: count)")
    classes.add_column("class")
    classes.add_column("answers")
    classes.add_column("p50 ms", justify="right")
    classes.add_column("p99 ms", justify="right")
    for operation in sorted(run.by_class):
        counts, latencies = run.by_class[operation], run.latency_by_class[operation]
        classes.add_row(operation, ", ".join(f"{s}: {n:,}" for s, n in sorted(counts.items())),
                        f"{_percentile(latencies, 50):.1f}", f"{_percentile(latencies, 99):.1f}")
    console.print(classes)
    total = sum(r["requests"] for r in rows)
    server_errors = sum(r["5xx"] for r in rows)
    unexpected = sum(r["unexpected"] for r in rows)
    transport = sum(r["transport"] for r in rows)
    samples = run.rss_samples
    # warm-up: the first interval (imports, compilation, the session table growing to capacity)
    steady = samples[int(args.interval) :]
    flat, growth = True, float("nan")
    if len(steady) >= 6:
        third = len(steady) // 3
        early, late = statistics.median(steady[:third]), statistics.median(steady[-third:])
        growth = (late - early) / early
        flat = growth <= args.rss_tolerance
        console.print(f"resident memory after warm-up: median {early:.1f} MB in the first third, {late:.1f} MB in"
                      f" the last ({growth:+.1%}; tolerance {args.rss_tolerance:.0%}); max {max(steady):.1f} MB")
    p99s = [r["p99_ms"] for r in rows]
    console.print(f"{total:,} requests in {args.duration:g} s; p99 per interval {min(p99s):.1f}-{max(p99s):.1f} ms;"
                  f" 5xx {server_errors}, unexpected {unexpected}, transport errors {transport}")
    for example in run.unexpected_examples:
        console.print(f"  unexpected: {example}")
    passed = server_errors == 0 and unexpected == 0 and transport == 0 and flat
    console.print(f"[bold]{'PASS' if passed else 'FAIL'}[/bold] on {machine()}")
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=(__doc__ or "").split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600, help="seconds of traffic (default 600)")
    parser.add_argument("--interval", type=float, default=30, help="seconds per report row (default 30)")
    parser.add_argument("--workers", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--capacity", type=int, default=64, help="GRU_MAX_SESSIONS of the started service")
    parser.add_argument("--pool", type=float, default=1.5,
                        help="sessions in use, as a multiple of the capacity (default 1.5: LRU evictions)")
    parser.add_argument("--ttl", type=float, default=20, help="GRU_SESSION_TTL_SECONDS of the started service")
    parser.add_argument("--rss-tolerance", type=float, default=0.05, help="largest resident growth (0.05 = 5%%)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--url", help="drive this running service instead of starting one")
    parser.add_argument("--pid", type=int, help="with --url: the service's pid, to watch its memory")
    parser.add_argument("--key", help="with --url: the API key to send (all clients use it)")
    args = parser.parse_args(argv)
    console = Console()
    run = _Run(args, key=args.key)
    if args.url:
        rows = asyncio.run(_drive(run, args.url, args.pid, console))
        return 0 if _verdict(run, rows, console) else 1
    model_path, description = bench_model()
    with tempfile.TemporaryDirectory(prefix="gru-soak-") as scratch:
        env = {
            "GRU_API_KEYS": ",".join(f"{key}:{tenant}" for key, tenant in KEYS.items()),
            "GRU_MAX_SESSIONS": str(args.capacity), "GRU_SESSION_TTL_SECONDS": str(args.ttl),
            "GRU_MAX_CHUNK_STEPS": str(MAX_CHUNK_STEPS), "GRU_MAX_HORIZON": str(MAX_HORIZON),
            "GRU_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        }
        service = start_service(model_path, Path(scratch), env)
        console.print(f"service pid {service.process.pid} on {service.url}: {description}; log {service.log_path}")
        try:
            rows = asyncio.run(_drive(run, service.url, service.process.pid, console))
        finally:
            service.stop()
        if "Traceback" in service.log_path.read_text(errors="replace"):
            console.print("[bold]the service logged a traceback:[/bold]\n" + service.log_tail(40))
            run.unexpected_examples.append("traceback in the service log")
            rows[-1]["unexpected"] += 1
        return 0 if _verdict(run, rows, console) else 1


if __name__ == "__main__":
    raise SystemExit(main())
