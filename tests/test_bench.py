"""``make bench``'s GRU table runs, and exits 0 only while our outputs match nn.GRU's (it never judges a time);
the load generator counts what it should, and the baseline lets it resynchronise as the service does."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from bench import __main__ as bench_main
from bench import cell, cli_csv, junk, load, naive_server

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def _drive(handler: Handler, **options: Any) -> dict[str, object]:
    """``load.drive`` with chunks of 8 against a scripted server, ``handler`` serving each connection; a
    drive still running after 30 s fails the test (TimeoutError)."""

    async def measure() -> dict[str, object]:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            return await asyncio.wait_for(load.drive(f"http://127.0.0.1:{port}", 8, tag="t", pids=[], **options), 30)

    return asyncio.run(measure())


def test_cell_table_runs_and_checks_outputs(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--shapes", "4,16,1", "2,8,3", "--batches", "1", "5", "--steps", "3", "--rounds", "1",
            "--min-run-time", "0.001", "--threads", "1"]
    threads = torch.get_num_threads()
    try:
        assert cell.main(argv) == 0
    finally:
        torch.set_num_threads(threads)  # main sets the service's count for the whole process
    printed = capsys.readouterr().out
    assert "outputs: all within 1e-05" in printed
    assert printed.count("slower than nn.GRU at") == 3 and "/4 shapes" in printed


def test_gpu_timings_wait_for_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A clock that did not wait timed how fast the host queued kernels (every GPU table before 3ff8c89)."""
    waits: list[None] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *_: waits.append(None))
    cell.clock_for("wall", "cuda")()
    assert len(waits) == 1
    cell.clock_for("wall", "cpu")()
    cell.clock_for("cpu", "cpu")()
    assert len(waits) == 1


def test_bench_entry_point_answers_help_and_refuses_unknown_flags_before_running_anything(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for argv, status in ((["--help"], 0), (["--bogus"], 2)):
        with pytest.raises(SystemExit) as stopped:
            bench_main.main(argv)
        assert stopped.value.code == status
    assert "--load" in capsys.readouterr().out


def test_load_generator_counts_every_answer_that_arrives_in_the_window() -> None:
    """A server answering after 0.25 s, two connections, a window from 0.1 s to 1.2 s: each connection's
    answers arrive at 0.25, 0.5, 0.75 and 1.0 s, so 8 in all. Dropping the answer each connection had in
    flight when the window opened (as the generator once did) reads 6: req/s short by sessions/duration,
    most for the slowest server, which flattered every ratio."""

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            await asyncio.sleep(0.25)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")

    numbers = _drive(slow, sessions=2, duration=1.1, warmup=0.1)
    assert numbers["ok"] == 8, numbers


def test_ws_echo_answers_every_pipelined_frame_of_a_session_stream(tmp_path: Path) -> None:
    """The stream's ceiling (``ws-echo``): the echo app started as the bench starts it, driven as
    ``ours-stream`` is, two frames in flight per session; every frame answered, none refused."""
    proc = load._start("ws-echo", tmp_path, tmp_path, {})
    try:
        numbers = asyncio.run(load.drive(proc.url, 8, sessions=4, duration=0.5, warmup=0.2, tag="t", pids=[],
                                         pipeline=2))
    finally:
        proc.stop()
    assert numbers["ok"] > 0 and numbers["errors"] == {} and numbers["failures"] == 0, numbers
    assert [label for label, _ in load._variants("ws-echo", (1, 2))] == ["ws-echo x1", "ws-echo x2"]


def test_naive_server_tells_a_client_that_lost_track_where_its_session_is() -> None:
    """Without the position in its 409, a load-generator connection that lost an answer would send 409s for
    the rest of a run against the baseline only."""
    async def twice() -> httpx.Response:
        transport = httpx.ASGITransport(app=naive_server.naive_app(hidden=8, layers=1))
        async with httpx.AsyncClient(transport=transport, base_url="http://naive") as client:
            first = await client.post("/v1/sessions/s/predict", json={"values": [1.0, 2.0, 3.0], "offset": 0})
            assert first.status_code == 200
            return await client.post("/v1/sessions/s/predict", json={"values": [1.0], "offset": 0})

    again = asyncio.run(twice())
    assert again.status_code == 409
    assert again.json()["position"] == 3


def test_interval_score_adds_two_over_alpha_times_each_miss_to_the_width() -> None:
    from bench.intervals import score

    scored = score(np.array([0.0, 5.0, -3.0]), np.full(3, -1.0), np.full(3, 1.0), level=80)
    assert scored.coverage == 1 / 3 and scored.width == 2.0
    assert scored.winkler == pytest.approx((2 + (2 + 10 * 4) + (2 + 10 * 2)) / 3)


def test_junk_bodies_are_json_objects_of_unknown_keys_of_the_size_asked() -> None:
    body = junk.junk_object(0.05)
    parsed = json.loads(body)
    assert 50_000 <= len(body) < 50_100
    assert parsed.pop("values") == [0.5]
    assert list(parsed) == [f"k{index}" for index in range(len(parsed))]
    assert all(value == [[[[]]]] for value in parsed.values())


def test_the_cli_csv_bench_reads_a_series_and_prints_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    """``bench.cli_csv`` on a small series: every row read, cut into chunks of 32, in one table."""
    measured = cli_csv.measure(100)
    assert (measured["rows"], measured["chunks"]) == (100, 4)
    assert 0 < measured["imported_kib"] <= measured["peak_kib"]
    assert cli_csv.main(["--rows", "100"]) == 0
    assert "CLI CSV reading" in capsys.readouterr().out


async def _ws_server_frames(reader: asyncio.StreamReader) -> bytes:
    """The payload of the next (masked) client frame; a close frame ends the stream."""
    first, second = await reader.readexactly(2)
    size = await load.ws_payload_size(reader, second)
    mask = await reader.readexactly(4)
    payload = await reader.readexactly(size)
    if first & 0x0F == 0x8:
        raise ConnectionError("closed")
    return bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _ws_server_frame(payload: bytes) -> bytes:
    size = len(payload)
    head = bytes([0x81, size]) if size < 126 else bytes([0x81, 126]) + size.to_bytes(2, "big")
    return head + payload


def test_a_pipelined_stream_resynchronises_after_a_refused_frame() -> None:
    """A stream server that checks offsets as the service does and refuses the very first frame once (a 503
    with the session's position, the chunk not taken): the frame in flight behind it is refused too (its
    offset counted on the first), and then the session must go on from the position reported. Resyncing only
    when no frame was in flight never happens two deep, so every later frame was refused: 0 chunks/s."""

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\r\n")
        position, refused = 0, False
        try:
            while True:
                frame = json.loads(await _ws_server_frames(reader))
                steps = len(frame["values"])
                if not refused or frame["offset"] != position:
                    refused = True
                    status = 503 if frame["offset"] == position else 409
                    answer = {"type": "x", "status": status, "position": position}
                else:
                    position += steps
                    answer = {"position": position}
                writer.write(_ws_server_frame(json.dumps(answer).encode()))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    numbers = _drive(stream, sessions=1, duration=0.3, warmup=0.0, pipeline=2)
    assert numbers["ok"] > 10 and numbers["errors"] == {"503": 1, "409": 1}, numbers


def test_connection_failures_in_the_warm_up_are_not_counted_in_the_window() -> None:
    """The first connection of each session is dropped by the server during the warm-up; the generator
    reconnects. The measured window saw no failure, so its non-200 count must be 0."""
    dropped: set[int] = set()

    async def flaky(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        session = int(head.split(b" ", 2)[1].split(b"/")[3].rsplit(b"-", 1)[1])
        if session not in dropped:
            dropped.add(session)
            writer.close()
            return
        while True:
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()
                return

    numbers = _drive(flaky, sessions=2, duration=0.2, warmup=0.2)
    assert len(dropped) == 2 and numbers["ok"] > 0, numbers
    assert numbers["failures"] == 0, numbers


@pytest.mark.parametrize("pipeline", [0, 2])
def test_a_server_that_stops_answering_is_a_failure_not_a_run_that_never_ends(pipeline: int) -> None:
    """The server takes each connection (and a stream's upgrade) and never answers a chunk: every session
    is given up ``grace`` seconds after the window and counted as a failure."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if pipeline:
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\r\n")
        await reader.read()  # until the client goes

    numbers = _drive(silent, sessions=3, duration=0.2, warmup=0.0, pipeline=pipeline, grace=0.5)
    assert numbers["ok"] == 0 and numbers["failures"] == 3, numbers


def test_a_stream_answer_for_another_chunk_than_the_one_it_is_read_for_is_not_counted() -> None:
    """A stream server that applies every chunk but answers each pair of pipelined frames in reverse order:
    every answer names the position of the other chunk of its pair. The generator pairs each answer with the
    oldest chunk in flight, so it timed each answer against the wrong send and counted all of them as 200s;
    a wrong server must be noticed: none counts, each is a "wrong position"."""

    async def swapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\r\n")
        position = 0
        try:
            while True:
                pair = []
                for wait in (None, 1.0):  # a chunk without a second (the window's last) is answered alone,
                    try:  # wrongly too: with a position no chunk ends at
                        frame = json.loads(await asyncio.wait_for(_ws_server_frames(reader), wait))
                    except TimeoutError:
                        pair[0]["position"] += 1
                        break
                    position += len(frame["values"])
                    pair.append({"session_id": "s", "position": position})
                for answer in reversed(pair):
                    writer.write(_ws_server_frame(json.dumps(answer).encode()))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    numbers = _drive(swapped, sessions=1, duration=0.3, warmup=0.0, pipeline=2)
    errors = numbers["errors"]
    assert numbers["ok"] == 0 and isinstance(errors, dict) and errors.get("wrong position", 0) > 10, numbers


def test_an_http_200_that_did_not_apply_the_chunk_is_not_counted() -> None:
    """A server answering every chunk 200 with the session still at 0 (as if it had ignored the chunk) was
    counted as full throughput: each answer must name the position the chunk ends at."""

    async def ignoring(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0]))
                body = b'{"session_id":"s","position":0,"predictions":[]}'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    numbers = _drive(ignoring, sessions=2, duration=0.3, warmup=0.0)
    errors = numbers["errors"]
    assert numbers["ok"] == 0 and isinstance(errors, dict) and errors.get("wrong position", 0) > 10, numbers


def test_a_table_of_medians_shows_the_median_p99_not_the_p99_of_the_median_throughput_round() -> None:
    """The README's chunk-8 stream x2 rounds: 14,448, 15,504 and 15,456 chunks/s at p99 13.0, 10.6 and 10.2
    ms. "Medians of 3 rounds" showed 15,456 and 10.2 ms: every column of the round whose chunks/s was the
    median, so the p99 shown was the best of the three, not their median (10.6 ms)."""
    rounds = [(14_448, 13.0, 6.0, 0.99), (15_504, 10.6, 8.4, 1.00), (15_456, 10.2, 8.2, 1.02)]
    runs = [{"requests_per_s": rate, "steps_per_s": rate * 8, "p50_ms": p50, "p99_ms": p99, "max_ms": p99 + 1,
             "ok": rate * 8, "errors": {}, "failures": 0, "server_cpu": cpu, "client_cpu": 0.1}
            for rate, p99, p50, cpu in rounds]
    shown = load._median_round(runs)
    assert (shown["requests_per_s"], shown["p99_ms"], shown["p50_ms"], shown["server_cpu"]) == (15_456, 10.6, 8.2, 1.0)
    assert shown["chunks_per_cpu_s"] == pytest.approx(15_456 / 1.02)  # the median of the rounds' own ratios
