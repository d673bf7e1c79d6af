"""The service against a naive server, driven by one load generator; prints req/s, steps/s, p50, p99.

    python -m bench.load                       # every target, chunks of 8 and 64 steps, 10 s each
    python -m bench.load --duration 10 --targets naive ours --chunks 8
    python -m bench.load --client http://127.0.0.1:8000 --chunk 8 --duration 5   # only drive a running server

Each target is started alone as a process on a free loopback port (so two servers never share the CPUs),
then driven by the load generator, a separate process: ``--sessions`` keep-alive HTTP/1.1 connections (raw
asyncio streams on uvloop: httpx would cost more CPU than the servers it measures), each owning one session
and posting chunks of random values in sequence with the correct ``offset``. It runs ``--warmup`` seconds
unmeasured, then ``--duration`` seconds in which every answer counts: a 200 as throughput and latency, any
other status as an error (a 409 resynchronises the session's offset from the problem body). A 200 whose
answer names a ``position`` other than the one its chunk ends at (a server that skipped, repeated or
reordered chunks) counts as an error too, "wrong position", never as throughput; an answer without a
position (the echo targets') is not checked.

Targets, in the order they run:

- ``raw``: an asyncio server answering a fixed 200, no framework: the load generator's ceiling here;
- ``echo``: FastAPI answering the body it got; ``pydantic``: FastAPI + pydantic models, no model;
- ``ws-echo``: the same FastAPI app streamed like ``ours-stream``, each frame answered with itself: the
  ceiling uvicorn's WebSocket protocol and Starlette leave a stream chunk here, at each ``--pipeline`` depth;
- ``naive``: the baseline (bench/naive_server.py): FastAPI + nn.GRU + dict of states behind a lock;
- ``ours``: ``python -m service`` with its default settings and logging (the JSON access line included);
- ``ours-stream``: the same service, each session streamed over its WebSocket (``/v1/sessions/{id}/stream``,
  raw frames on the same asyncio streams), at each ``--pipeline`` depth: chunks in flight per session
  (default 1 and 2: one is the concurrency an HTTP connection has, one request in flight; two pipelines);
- ``ours-redis``: the same with ``GRU_STORE=redis`` on a redis-server the bench starts.

``--service-env GRU_MAX_BATCH_SIZE=16 ...`` sets variables for the ``ours`` targets (to try a setting).

``--overload`` measures something else: ``ours`` with ``GRU_MAX_QUEUE=16``, chunks of 256 steps posted by 8
connections, then by 256 (far more than the queue holds: most are refused 429), and how many 200s a second
each gets; a refusal should cost so little that the 256 keep most of what the 8 get.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

from bench.common import HIDDEN, LAYERS, bench_model, machine
from harness.processes import Process, free_port, spawn, start_redis, start_service, wait_http

TARGETS = ("raw", "echo", "ws-echo", "pydantic", "naive", "ours", "ours-stream", "ours-redis")
CHUNKS = (8, 64)
_BODIES = 1024  # distinct random chunks, shared by the connections, cycled


# -- the load generator (runs in its own process) -----------------------------------------------------------


WRONG_POSITION = "wrong position"  # a 200 answering another chunk than the one it was read for


@dataclass
class _Tally:
    latencies: list[float]
    statuses: dict[int | str, int]  # HTTP status (a stream's problem "status"), or WRONG_POSITION
    failures: int = 0  # connection errors


_POSITION = re.compile(rb'"position":\s*(\d+)')


def _position(answer: bytes) -> int | None:
    """The session position a 200 answer reports (its first ``position`` member), None when it has none."""
    found = _POSITION.search(answer)
    return int(found.group(1)) if found else None


def _chunks(steps: int) -> list[bytes]:
    """JSON arrays of ``steps`` one-feature rows: a noisy sine at a random phase, as a sensor might send."""
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 100, (_BODIES, 1)) + np.arange(steps) * 0.1
    values = np.round(0.5 + 0.3 * np.sin(t) + rng.normal(0, 0.02, t.shape), 5)  # (N, T)
    return [orjson.dumps(row[:, None].tolist()) for row in values]


async def _connection(host: str, port: int, path: str, steps: int, first: int, bodies: list[bytes],
                      clock: dict[str, float], tally: _Tally) -> None:
    prefix = (f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
              "content-length: ").encode()
    reader, writer = await asyncio.open_connection(host, port)
    position = 0
    count = first
    while True:
        began = time.perf_counter()
        if began >= clock["end"]:
            break
        body = b'{"values":' + bodies[count % _BODIES] + b',"offset":' + str(position).encode() + b"}"
        count += 1
        writer.write(prefix + str(len(body)).encode() + b"\r\n\r\n" + body)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            lower = head.lower()
            at = lower.find(b"content-length:")
            if at < 0:
                raise ConnectionError(f"no content-length in {head[:200]!r}")
            answer = await reader.readexactly(int(lower[at + 15:].split(b"\r\n", 1)[0]))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            tally.failures += clock["start"] <= time.perf_counter() <= clock["end"]  # the window's only
            writer.close()
            await asyncio.sleep(0.01)
            reader, writer = await asyncio.open_connection(host, port)
            continue
        ended = time.perf_counter()
        status_or_wrong: int | str = status
        if status == 200:
            reported = _position(answer)
            position += steps
            if reported is not None and reported != position:  # not this chunk's answer: take what it says
                status_or_wrong, position = WRONG_POSITION, reported
        elif status in (404, 409):  # lost track: take the position the problem body reports
            try:
                position = int(json.loads(answer).get("position", 0))
            except (ValueError, AttributeError):
                position = 0
        if b"connection: close" in lower:
            writer.close()
            reader, writer = await asyncio.open_connection(host, port)
        # Every answer that arrives in the window counts, whenever it was sent: dropping the one each connection
        # had in flight at the start would take sessions/duration off req/s, most off the slowest server's.
        if clock["start"] <= ended <= clock["end"]:
            tally.statuses[status_or_wrong] = tally.statuses.get(status_or_wrong, 0) + 1
            if status_or_wrong == 200:
                tally.latencies.append(ended - began)
    writer.close()


def _ws_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One client frame (RFC 6455 5.2), masked with a zero key, so the payload goes as it is."""
    size = len(payload)
    if size < 126:
        head = bytes([0x80 | opcode, 0x80 | size])
    elif size < 65536:
        head = bytes([0x80 | opcode, 0x80 | 126]) + size.to_bytes(2, "big")
    else:
        head = bytes([0x80 | opcode, 0x80 | 127]) + size.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


async def ws_payload_size(reader: asyncio.StreamReader, second: int) -> int:
    """The payload length a frame's second byte gives, read on where it is extended (RFC 6455 5.2)."""
    size = second & 0x7F
    if size == 126:
        return int.from_bytes(await reader.readexactly(2), "big")
    if size == 127:
        return int.from_bytes(await reader.readexactly(8), "big")
    return size


async def _ws_message(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """The next data frame from the server; pings answered on the way, a close raised as ConnectionError."""
    while True:
        first, second = await reader.readexactly(2)
        payload = await reader.readexactly(await ws_payload_size(reader, second))
        opcode = first & 0x0F
        if opcode == 0x9:
            writer.write(_ws_frame(payload, 0xA))
        elif opcode == 0x8:
            raise ConnectionError(f"closed by the server: {payload[:2].hex()}")
        elif opcode in (0x1, 0x2):
            return payload


async def _ws_open(host: str, port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write((f"GET {path} HTTP/1.1\r\nhost: {host}:{port}\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                  "sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"no upgrade: {head[:100]!r}")
    return reader, writer


async def _stream_connection(host: str, port: int, path: str, steps: int, first: int, bodies: list[bytes],
                             clock: dict[str, float], tally: _Tally, pipeline: int) -> None:
    """One session's WebSocket, ``pipeline`` chunks in flight: each answer read sends the next chunk."""
    reader, writer = await _ws_open(host, port, path)
    position = 0  # where the next chunk starts
    count = first
    sent: list[tuple[float, int]] = []  # (send time, position it ends at) of the chunks in flight, oldest first
    stale = 0  # chunks in flight sent before the last resync: refused too, their position not to be taken
    while True:
        while len(sent) < pipeline and time.perf_counter() < clock["end"]:
            body = b'{"values":' + bodies[count % _BODIES] + b',"offset":' + str(position).encode() + b"}"
            count += 1
            position += steps
            writer.write(_ws_frame(body))
            sent.append((time.perf_counter(), position))
        if not sent:
            break
        try:
            answer = await _ws_message(reader, writer)
        except (OSError, asyncio.IncompleteReadError, ConnectionError):
            tally.failures += clock["start"] <= time.perf_counter() <= clock["end"]  # the window's only
            writer.close()
            return
        ended, (began, ends_at) = time.perf_counter(), sent.pop(0)
        status: int | str = 200
        behind_resync = stale > 0
        stale -= behind_resync
        if answer.startswith(b'{"type"'):  # a problem frame: take the position it reports
            problem = json.loads(answer)
            status = int(problem.get("status", 0))
            if "position" in problem and not behind_resync:
                position = int(problem["position"])
                stale = len(sent)  # their offsets counted on the refused chunk: each is refused in turn
        elif (reported := _position(answer)) is not None and reported != ends_at:
            status = WRONG_POSITION  # answers come in the order of the frames: this one is not its chunk's
        if clock["start"] <= ended <= clock["end"]:
            tally.statuses[status] = tally.statuses.get(status, 0) + 1
            if status == 200:
                tally.latencies.append(ended - began)
    writer.write(_ws_frame(b"\x03\xe8", 0x8))
    writer.close()


async def _cpu_window(clock: dict[str, float], pids: list[int], out: dict[str, float]) -> None:
    """CPU seconds the servers (``pids``) and this generator spend inside the measured window."""
    await asyncio.sleep(max(0.0, clock["start"] - time.perf_counter()))
    servers, own = sum(_cpu_seconds(pid) for pid in pids), time.process_time()
    await asyncio.sleep(max(0.0, clock["end"] - time.perf_counter()))
    out["server_cpu"] = sum(_cpu_seconds(pid) for pid in pids) - servers
    out["client_cpu"] = time.process_time() - own


async def _bounded(connection: Coroutine[Any, Any, None], clock: dict[str, float], tally: _Tally,
                   grace: float) -> None:
    """One session's connection, stopped ``grace`` seconds after the window ends: a server that stops
    answering (or never answers a connect or an upgrade) is one failure, not a run that never ends."""
    try:
        async with asyncio.timeout(clock["end"] + grace - time.perf_counter()):
            await connection
    except TimeoutError:
        tally.failures += 1


async def drive(url: str, steps: int, sessions: int, duration: float, warmup: float, tag: str,
                pids: list[int], pipeline: int = 0, grace: float = 30.0) -> dict[str, object]:
    """Run the load against ``url``; returns the measured window's numbers. ``pipeline`` > 0: over each
    session's WebSocket stream instead, that many chunks in flight. A connection still waiting ``grace``
    seconds after the window is given up and counted as a failure."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    bodies = _chunks(steps)
    now = time.perf_counter()
    clock = {"start": now + warmup, "end": now + warmup + duration}
    tally = _Tally([], {})
    cpu: dict[str, float] = {}
    if pipeline:
        connections = [_stream_connection(host, port, f"/v1/sessions/bench-{tag}-{steps}-{i}/stream", steps, 37 * i,
                                          bodies, clock, tally, pipeline) for i in range(sessions)]
    else:
        connections = [_connection(host, port, f"/v1/sessions/bench-{tag}-{steps}-{i}/predict", steps, 37 * i,
                                   bodies, clock, tally) for i in range(sessions)]
    await asyncio.gather(_cpu_window(clock, pids, cpu), *(_bounded(c, clock, tally, grace) for c in connections))
    ok = tally.statuses.get(200, 0)
    latencies = np.array(tally.latencies) * 1000
    return {
        "requests_per_s": ok / duration,
        "steps_per_s": ok * steps / duration,
        "p50_ms": float(np.percentile(latencies, 50)) if ok else float("nan"),
        "p99_ms": float(np.percentile(latencies, 99)) if ok else float("nan"),
        "max_ms": float(latencies.max()) if ok else float("nan"),
        "ok": ok,
        "errors": {str(k): v for k, v in tally.statuses.items() if k != 200},
        "failures": tally.failures,
        "server_cpu": cpu["server_cpu"] / duration,  # share of one core
        "client_cpu": cpu["client_cpu"] / duration,
    }


def _client_main(args: argparse.Namespace) -> int:
    coroutine = drive(args.client, args.chunk, args.sessions, args.duration, args.warmup, args.tag, args.pids,
                      args.pipeline[0] if args.pipeline else 0)
    try:
        import uvloop

        result = uvloop.run(coroutine)
    except ImportError:
        result = asyncio.run(coroutine)
    print(json.dumps(result))
    return 0


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # finished children: the load generators
    return usage.ru_utime + usage.ru_stime


def run_client(url: str, steps: int, sessions: int, duration: float, warmup: float, tag: str,
               server_pids: list[int] | None = None, pipeline: int = 0) -> dict[str, object]:
    """The load generator as a separate process, so it never shares an interpreter (or GIL) with a server.

    It also reports the CPU share (of one core) that ``server_pids`` and itself used in the measured window.
    ``pipeline`` > 0: it streams over WebSockets (the ``ours-stream`` target) with that many chunks in flight.
    """
    argv = [sys.executable, "-m", "bench.load", "--client", url, "--chunk", str(steps),
            "--sessions", str(sessions), "--duration", str(duration), "--warmup", str(warmup), "--tag", tag,
            "--pipeline", str(pipeline), "--pids", *map(str, server_pids or [])]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=warmup + duration + 120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- wrk, as a second opinion -------------------------------------------------------------------------------

# One connection per wrk thread (-t N -c N), so a thread's Lua state is its connection's session: it posts
# with the right offset and takes the position a 404/409 problem reports.
WRK_SCRIPT = r"""
local counter = 0
function setup(thread)
  thread:set("id", counter)
  counter = counter + 1
end
function init(args)
  steps = tonumber(args[1])
  path = "/v1/sessions/wrk-" .. args[2] .. "-" .. steps .. "-" .. id .. "/predict"
  position, n, bodies = 0, 0, {}
  for k = 1, 256 do
    local rows = {}
    for s = 1, steps do
      rows[s] = string.format("[%.5f]", 0.5 + 0.3 * math.sin((k * 13 + s + id) * 0.1) + 0.02 * math.random())
    end
    bodies[k] = "[" .. table.concat(rows, ",") .. "]"
  end
end
function request()
  n = n + 1
  local body = '{"values":' .. bodies[n % 256 + 1] .. ',"offset":' .. position .. '}'
  return wrk.format("POST", path, {["Content-Type"] = "application/json"}, body)
end
function response(status, headers, body)
  if status == 200 then
    position = position + steps
  else
    local at = body:match('"position"%s*:%s*(%d+)')
    if at then position = tonumber(at) end
  end
end
"""


def _wrk_ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(url: str, steps: int, sessions: int, duration: float, warmup: float, tag: str,
            server_pids: list[int] | None = None) -> dict[str, object]:
    """The same load from wrk (C, epoll): a check that our Python generator is not what limits the numbers."""
    script = Path(tempfile.mkdtemp(prefix="gru-bench-wrk-")) / "sessions.lua"
    script.write_text(WRK_SCRIPT)

    def wrk(seconds: float, run_tag: str) -> str:
        argv = ["wrk", f"-t{sessions}", f"-c{sessions}", f"-d{max(1, round(seconds))}s", "--latency",
                "-s", str(script), url, "--", str(steps), run_tag]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"wrk failed: {done.stderr[-1000:]}")
        return done.stdout

    if warmup > 0:
        wrk(warmup, f"{tag}w")
    pids = server_pids or []
    cpu_before, client_before = sum(_cpu_seconds(pid) for pid in pids), _children_cpu()
    began = time.perf_counter()
    out = wrk(duration, tag)
    wall = time.perf_counter() - began
    total, seconds, unit = re.search(r"(\d+) requests in ([\d.]+)(m?s)", out).groups()  # type: ignore[union-attr]
    elapsed = float(seconds) / (1000 if unit == "ms" else 1)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    ok = int(total) - (int(bad.group(1)) if bad else 0)
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    return {
        "requests_per_s": ok / elapsed, "steps_per_s": ok * steps / elapsed,
        "p50_ms": _wrk_ms(latency["50"]), "p99_ms": _wrk_ms(latency["99"]), "ok": ok,
        "errors": {"non-2xx": int(bad.group(1))} if bad else {},
        "failures": sum(map(int, socket.groups())) if socket else 0,
        "server_cpu": (sum(_cpu_seconds(pid) for pid in pids) - cpu_before) / wall,
        "client_cpu": (_children_cpu() - client_before) / wall,
    }


# -- the orchestration --------------------------------------------------------------------------------------


def _start(target: str, model_path: Path, log_dir: Path, env: dict[str, str]) -> Process:
    naive = [sys.executable, "-m", "bench.naive_server", "--host", "127.0.0.1"]
    if target in ("raw", "echo", "ws-echo", "pydantic", "naive"):
        port = free_port()
        mode = "echo" if target == "ws-echo" else target
        proc = spawn(target, [*naive, "--port", str(port), "--mode", mode, "--hidden", str(HIDDEN),
                              "--layers", str(LAYERS)], port, log_dir)
        wait_http(proc, "/", ready_status=None)
        return proc
    if target in ("ours", "ours-stream"):
        return start_service(model_path, log_dir, env)
    redis = start_redis(log_dir)
    try:
        return start_service(model_path, log_dir, env, redis=redis)
    except Exception:
        redis.stop()
        raise


def _service_device(url: str) -> str:
    """Where the service runs its model (its GRU_DEVICE defaults to the GPU where there is one)."""
    try:
        with urllib.request.urlopen(url + "/v1/model", timeout=5) as answer:
            return str(json.load(answer)["device"])
    except (OSError, ValueError, KeyError) as exc:  # an API key set through --service-env, say
        return f"a device it did not say ({exc})"


def _model_sizes(model_path: Path) -> tuple[int, int]:
    config = json.loads((model_path / "config.json").read_text())
    model = config.get("model", config)
    return int(model.get("hidden_size", HIDDEN)), int(model.get("num_layers", LAYERS))


@dataclass
class Result:
    target: str
    steps: int
    numbers: dict[str, Any] | None  # medians over the rounds (see _median_round)
    note: str = ""
    rounds: int = 0


_MEDIANS = ("requests_per_s", "steps_per_s", "p50_ms", "p99_ms", "server_cpu", "client_cpu", "chunks_per_cpu_s")


def _median_round(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """What the table shows for several rounds: each rate, percentile and CPU share its own median over the
    rounds (the p99 of the round with the median req/s is any round's p99, the best one's as often as not);
    the counts (ok, errors, failures) and max_ms those of the round with the median req/s."""
    runs = [{**r, "chunks_per_cpu_s": r["requests_per_s"] / max(r["server_cpu"], 1e-9)} for r in runs]
    middle = statistics.median_low([r["requests_per_s"] for r in runs])
    shown = dict(next(r for r in runs if r["requests_per_s"] == middle))
    for key in _MEDIANS:
        shown[key] = statistics.median(r[key] for r in runs)
    return shown


def table(results: list[Result], sessions: int, duration: float) -> Table:
    rounds = max((r.rounds for r in results), default=1)
    title = f"{sessions} sessions over {sessions} keep-alive connections, {duration:g} s measured"
    if rounds > 1:
        title += f", median of {rounds} rounds"
    out = Table(title=title)
    for name in ("chunk", "server", "chunks/s", "steps/s", "p50 ms", "p99 ms", "non-200", "ours/naive chunks/s",
                 "p99 ours/naive", "stream/HTTP chunks/s", "server CPU", "chunks/CPU-s", "client CPU"):
        out.add_column(name, justify="right")
    for steps in sorted({r.steps for r in results}):
        rows = [r for r in results if r.steps == steps]
        naive = next((r.numbers for r in rows if r.target == "naive" and r.numbers), None)
        http = next((r.numbers for r in rows if r.target == "ours" and r.numbers), None)
        for r in rows:
            if r.numbers is None:
                out.add_row(str(steps), r.target, f"[yellow]{r.note}[/yellow]", *[""] * 10)
                continue
            n = r.numbers
            errors = sum(n["errors"].values()) + n["failures"]
            ratio = p99_ratio = over_http = ""
            if naive and r.target.startswith("ours"):
                ratio = f"{n['requests_per_s'] / naive['requests_per_s']:.1f}x"
                p99_ratio = f"{n['p99_ms'] / naive['p99_ms']:.2f}x"
            if http and r.target.startswith("ours-stream"):
                over_http = f"{n['requests_per_s'] / http['requests_per_s']:.1f}x"
            out.add_row(str(steps), r.target, f"{n['requests_per_s']:,.0f}", f"{n['steps_per_s']:,.0f}",
                        f"{n['p50_ms']:.1f}", f"{n['p99_ms']:.1f}", str(errors), ratio, p99_ratio, over_http,
                        f"{n['server_cpu']:.0%}", f"{n['chunks_per_cpu_s']:,.0f}",
                        f"{n['client_cpu']:.0%}")
        out.add_section()
    return out


def _short(numbers: dict[str, Any]) -> str:
    errors = sum(numbers["errors"].values()) + numbers["failures"]
    n = numbers
    return (f"{n['requests_per_s']:8,.0f} req/s  p50 {n['p50_ms']:7.1f} ms  p99 {n['p99_ms']:7.1f} ms"
            f"  non-200 {errors}  server CPU {n['server_cpu']:.0%}  client CPU {n['client_cpu']:.0%}")


def measure(targets: list[str], chunks: list[int], sessions: int, duration: float, warmup: float, rounds: int,
            console: Console, driver: Callable[..., dict[str, Any]] = run_client,
            service_env: dict[str, str] | None = None, pipelines: Sequence[int] = (1, 2)) -> list[Result]:
    """Every target alone, one after the other, ``rounds`` times over (interleaved, so a busy minute on the
    machine does not land on one target only); ``ours-stream`` at each depth in ``pipelines``, a row each."""
    log_dir = Path(tempfile.mkdtemp(prefix="gru-bench-load-"))
    model_path, description = bench_model(log_dir / "model")
    hidden, layers = _model_sizes(model_path)
    console.print(f"model: {description}; hidden {hidden}, {layers} layers; the naive server: "
                  f"nn.GRU(1, {HIDDEN}, {LAYERS}); server logs in {log_dir}")
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    notes: dict[str, str] = {}
    for round_ in range(rounds):
        for target in targets:
            if target in notes:
                continue
            try:
                with console.status(f"starting {target}"):
                    proc = _start(target, model_path, log_dir, service_env or {})
            except Exception as exc:  # a target that cannot start gets a note; the others still run
                lines = str(exc).strip().splitlines()
                notes[target] = f"did not start: {lines[-1][:100] if lines else type(exc).__name__}"
                console.print(f"{target}: {notes[target]}")
                continue
            try:
                if target.startswith("ours") and round_ == 0:
                    console.print(f"{target} serves on {_service_device(proc.url)}")
                pids = [proc.process.pid, *([proc.redis.process.pid] if proc.redis and proc.redis.process else [])]
                for steps in chunks:
                    for label, streamed in _variants(target, pipelines):
                        with console.status(f"{label}: chunks of {steps}, {warmup:g} + {duration:g} s"):
                            tag = f"{label.replace(' ', '')}-{round_}"  # sessions of their own per depth
                            numbers = driver(proc.url, steps, sessions, duration, warmup, tag, pids, **streamed)
                        runs.setdefault((label, steps), []).append(numbers)
                        console.print(f"round {round_ + 1} {label:>14} chunk {steps:>3}: {_short(numbers)}")
            finally:
                proc.stop()
    results = []
    for steps in chunks:
        for target in targets:
            for label, _ in _variants(target, pipelines):
                if target in notes:
                    results.append(Result(label, steps, None, notes[target]))
                else:
                    got = runs[(label, steps)]
                    results.append(Result(label, steps, _median_round(got), rounds=len(got)))
    return results


def _variants(target: str, pipelines: Sequence[int]) -> list[tuple[str, dict[str, int]]]:
    """The rows one target gives: a stream's one per pipeline depth ("ours-stream x2"), others one."""
    if target not in ("ours-stream", "ws-echo"):
        return [(target, {})]
    return [(f"{target} x{depth}", {"pipeline": depth}) for depth in pipelines]


OVERLOAD_STEPS = 256
OVERLOAD_QUEUE = "16"


def overload(connections: list[int], duration: float, warmup: float, console: Console) -> Table:
    """200s a second from ``ours`` (GRU_MAX_QUEUE=16) with each count of connections posting 256-step chunks,
    one server for all of them, the fewest connections first."""
    log_dir = Path(tempfile.mkdtemp(prefix="gru-bench-overload-"))
    model_path, _ = bench_model(log_dir / "model")
    proc = start_service(model_path, log_dir, {"GRU_MAX_QUEUE": OVERLOAD_QUEUE})
    out = Table(title=f"overload: chunks of {OVERLOAD_STEPS} steps, GRU_MAX_QUEUE={OVERLOAD_QUEUE},"
                      f" {duration:g} s measured")
    for name in ("connections", "200/s", "429/s", "p50 ms (200)", "p99 ms (200)", "other non-200",
                 "200/s vs the fewest", "server CPU"):
        out.add_column(name, justify="right")
    try:
        first = None
        for count in connections:
            with console.status(f"overload: {count} connections"):
                n: dict[str, Any] = run_client(proc.url, OVERLOAD_STEPS, count, duration, warmup,
                                               f"overload{count}", [proc.process.pid])
            refused = n["errors"].get("429", 0)
            first = first or n
            other = sum(n["errors"].values()) - refused + n["failures"]
            out.add_row(str(count), f"{n['requests_per_s']:,.0f}", f"{refused / duration:,.0f}",
                        f"{n['p50_ms']:.1f}", f"{n['p99_ms']:.1f}", str(other),
                        f"{n['requests_per_s'] / max(first['requests_per_s'], 1e-9):.0%}", f"{n['server_cpu']:.0%}")
            console.print(f"overload {count:>4} connections: {_short(n)}  429/s {refused / duration:,.0f}")
    finally:
        proc.stop()
    return out


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each run")
    parser.add_argument("--sessions", type=int, default=64, help="sessions = connections")
    parser.add_argument("--chunks", type=int, nargs="+", default=list(CHUNKS), help="steps per chunk")
    parser.add_argument("--targets", nargs="+", choices=TARGETS, default=list(TARGETS))
    parser.add_argument("--rounds", type=int, default=1, help="repeat all; the table shows medians")
    parser.add_argument("--service-env", nargs="*", default=[], metavar="GRU_X=V",
                        help="extra environment for the service targets")
    parser.add_argument("--pipeline", type=int, nargs="+",
                        help="ours-stream: chunks in flight per session, a row per depth (default 1 2); with"
                             " --client, streams over WebSockets with the first (default: HTTP)")
    parser.add_argument("--overload", type=int, nargs="*", metavar="CONNECTIONS",
                        help="measure overload instead: 200s/s at each count of connections (e.g. 8 256)")
    parser.add_argument("--wrk", action="store_true", help="drive with wrk instead (a second opinion)")
    parser.add_argument("--client", help="only drive this running server (prints JSON)")
    parser.add_argument("--chunk", type=int, default=8, help="with --client: steps per chunk")
    parser.add_argument("--tag", default=str(os.getpid()), help="with --client: part of the session ids")
    parser.add_argument("--pids", type=int, nargs="*", default=[], help="with --client: server processes")
    args = parser.parse_args(argv)
    if args.client:
        return _client_main(args)

    console = Console(width=max(Console().width, 150))
    console.print(f"machine: {machine()}")
    console.print(f"load average before: {_load()} (other work on the machine skews every number below).")
    console.print("server CPU, client CPU: share of one core each used in the measured window; req/CPU-s: requests per"
                  " second of server CPU, the column least moved by other work on the machine")
    if args.overload is not None:
        console.print(overload(args.overload or [8, 256], args.duration, args.warmup, console))
        console.print(f"load average after: {_load()}")
        return 0
    driver: Callable[..., dict[str, Any]] = run_client
    streams = [target for target in args.targets if target in ("ours-stream", "ws-echo")]
    if args.wrk and streams:
        console.print(f"--wrk drives HTTP only: {', '.join(streams)} left out")
        args.targets = [target for target in args.targets if target not in streams]
    if args.wrk:
        if shutil.which("wrk") is None:
            console.print("--wrk: wrk is not installed (apt-get install wrk)")
            return 2
        driver = run_wrk
        console.print("load generator: wrk, one thread per connection, offsets tracked in Lua")
    service_env = dict(item.split("=", 1) for item in args.service_env)
    if service_env:
        console.print(f"service environment: {service_env}")
    results = measure(args.targets, args.chunks, args.sessions, args.duration, args.warmup, args.rounds,
                      console, driver, service_env, args.pipeline or (1, 2))
    console.print(table(results, args.sessions, args.duration))
    console.print(f"load average after: {_load()}")
    for r in results:
        if r.numbers is None:
            console.print(f"{r.target} (chunk {r.steps}): {r.note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
