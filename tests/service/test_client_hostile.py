"""service.client against a server that answers badly, and its command line against inputs it cannot use:
each ends in the client's own typed error or one line and a non-zero exit, never a success or a traceback."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.server import ServerConnection, serve

from harness.processes import ROOT
from service.client import AsyncClient, BadAnswer, Client, OffsetConflict, Retry, ServiceError, Unavailable
from tests.conftest import Server
from tests.service.helpers import new_id

FAST = Retry(attempts=2, backoff=0.01, max_delay=0.05)
Answer = tuple[int, dict[str, str], bytes]  # status, headers, body


class _Scripted(BaseHTTPRequestHandler):
    """Answers every request with the server's ``answer``, whatever was asked."""

    protocol_version = "HTTP/1.1"
    server: _ScriptedServer

    def log_message(self, *args: object) -> None:
        pass

    def _reply(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        status, headers, body = self.server.answer
        self.send_response(status)
        for name, value in {"content-length": str(len(body)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = _reply


class _ScriptedServer(ThreadingHTTPServer):
    answer: Answer = (200, {}, b"{}")


@pytest.fixture
def hostile() -> Iterator[_ScriptedServer]:
    running = _ScriptedServer(("127.0.0.1", 0), _Scripted)
    threading.Thread(target=running.serve_forever, daemon=True).start()
    yield running
    running.shutdown()
    running.server_close()


def _url(server: _ScriptedServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def _chunk_answer(**fields: object) -> bytes:
    return json.dumps({"predictions": [[0.5]], "model_version": "v", "position": 1, **fields}).encode()


@pytest.mark.parametrize("answer", [
    (200, {}, b"<html>maintenance</html>"),
    (200, {"content-type": "application/json"}, b"[[0.5]]"),
    (200, {"content-type": "application/json"}, b'{"status": "ok"}'),
    (200, {}, _chunk_answer(predictions=5)),
    (200, {}, _chunk_answer(predictions=[[0.5], [0.6]])),
    (200, {}, _chunk_answer(model_version=None)),
    (302, {"location": "https://elsewhere.example/v1/sessions/s/predict"}, b""),
    (200, {}, _chunk_answer(predictions=[0.5])),
    (200, {}, _chunk_answer(predictions=[["0.5"]])),
    (200, {}, _chunk_answer(predictions=[[]])),
    (200, {}, _chunk_answer(predictions=[[float("nan")]])),
    (200, {}, _chunk_answer(predictions=[[float("inf")]])),
], ids=["not-json", "a-list", "no-fields", "predictions-not-a-list", "a-row-too-many", "no-version", "redirect",
        "a-row-not-a-list", "a-row-of-text", "an-empty-row", "nan", "infinity"])
def test_an_unusable_answer_to_a_chunk_raises_bad_answer_and_keeps_the_position(
        hostile: _ScriptedServer, answer: Answer) -> None:
    hostile.answer = answer
    with Client(_url(hostile), retry=FAST) as client:
        session = client.session("s")
        with pytest.raises(BadAnswer, match="unusable") as raised:
            session.predict([1.0])
        with pytest.raises(BadAnswer):
            client.predict([1.0])
    assert raised.value.status == answer[0]
    assert session.position == 0


def test_predictions_whose_rows_differ_in_width_are_refused(hostile: _ScriptedServer) -> None:
    hostile.answer = (200, {}, _chunk_answer(predictions=[[0.5], [0.5, 0.6]], position=2))
    with Client(_url(hostile), retry=FAST) as client, pytest.raises(BadAnswer, match="not a row of 1 numbers"):
        client.session("s").predict([1.0, 2.0])


def _band(*rows: list[float]) -> dict[str, list[list[float]]]:
    return {"lower": list(rows), "upper": list(rows)}


_FULL = {"forecast": [[0.5], [0.6]], "intervals": {"80": _band([0.5])},
         "forecast_intervals": {"80": _band([0.5], [0.6])}, "scores": [[None]]}


@pytest.mark.parametrize(("asked", "fields"), [
    ({"horizon": 2}, {}),
    ({"horizon": 2}, {"forecast": [[0.5]]}),
    ({"horizon": 2}, {"forecast": [[0.5], [0.5, 0.6]]}),
    ({"horizon": 2}, {"forecast": [[0.5], [None]]}),
    ({}, {"forecast": [[0.5]]}),
    ({"levels": [80]}, {}),
    ({"levels": [80]}, {"intervals": {"95": _band([0.5])}}),
    ({"levels": [80, 95]}, {"intervals": {"80": _band([0.5])}}),
    ({"levels": [80]}, {"intervals": {"80": {"lower": [[0.5]]}}}),
    ({"levels": [80]}, {"intervals": {"80": {"lower": [[0.5]], "upper": [[0.5], [0.6]]}}}),
    ({"levels": [80]}, {"intervals": {"80": _band([0.5, 0.6])}}),
    ({"levels": [80], "horizon": 2}, {**_FULL, "forecast_intervals": {"80": _band([0.5])}}),
    ({"levels": [80], "horizon": 2}, {key: value for key, value in _FULL.items() if key != "forecast_intervals"}),
    ({"scores": True}, {}),
    ({"scores": True}, {"scores": [[0.5, 0.5]]}),
    ({"scores": True}, {"scores": [["0.5"]]}),
    ({"scores": True}, {"scores": [[0.5], [0.5]]}),
], ids=["no-forecast", "forecast-a-step-short", "forecast-row-too-wide", "forecast-null", "forecast-unasked",
        "no-intervals", "intervals-of-another-level", "intervals-a-level-short", "interval-without-upper",
        "interval-a-row-too-many", "interval-row-too-wide", "forecast-interval-a-step-short",
        "no-forecast-intervals", "no-scores", "scores-row-too-wide", "score-of-text", "scores-a-row-too-many"])
def test_an_answer_whose_forecast_intervals_or_scores_are_misshapen_raises_bad_answer(
        hostile: _ScriptedServer, asked: dict[str, Any], fields: dict[str, Any]) -> None:
    """The forecast, intervals and scores of an answer were taken as they came: a proxy or a broken server
    answering a forecast a step short, an interval of another level or scores of another width was a
    success, and whoever read them crashed or read the wrong step."""
    hostile.answer = (200, {}, _chunk_answer(**fields))
    with Client(_url(hostile), retry=FAST) as client:
        session = client.session("s")
        with pytest.raises(BadAnswer, match="unusable"):
            session.predict([1.0], **asked)
        with pytest.raises(BadAnswer, match="unusable"):
            client.predict([1.0], **asked)
    assert session.position == 0


def test_an_answer_with_every_field_asked_in_shape_is_taken(hostile: _ScriptedServer) -> None:
    hostile.answer = (200, {}, _chunk_answer(**_FULL))
    with Client(_url(hostile), retry=FAST) as client:
        answer = client.session("s").predict([1.0], horizon=2, levels=[80], scores=True)
    assert (answer.forecast, answer.intervals, answer.forecast_intervals, answer.scores) == (
        _FULL["forecast"], _FULL["intervals"], _FULL["forecast_intervals"], _FULL["scores"])


def test_a_misshapen_stream_answer_raises_bad_answer_sync_and_async() -> None:
    """The streaming sessions hold an answer's forecast to the chunk's horizon as the HTTP calls do."""
    def answer_a_step_short(connection: ServerConnection) -> None:
        for _ in connection:
            connection.send(_chunk_answer(forecast=[[0.5]]).decode())

    with serve(answer_a_step_short, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.socket.getsockname()[1]}"
        with Client(url, retry=FAST) as client, client.stream_session("s") as session, \
                pytest.raises(BadAnswer, match="forecast"):
            list(session.stream([[1.0]], chunk=1, horizon=2))

        async def run() -> None:
            async with AsyncClient(url, retry=FAST) as client:
                session = await client.stream_session("s")
                async with session:
                    with pytest.raises(BadAnswer, match="forecast"):
                        _ = [answer async for answer in session.stream([[1.0]], chunk=1, horizon=2)]

        asyncio.run(run())


@pytest.mark.parametrize("frame", [
    "<html>maintenance</html>",
    "[[0.5]]",
    json.dumps({"predictions": [[0.5]], "model_version": "v"}),
    json.dumps({"predictions": [[0.5]], "model_version": "v", "position": 7}),
    json.dumps({"predictions": [[0.5], [0.6]], "model_version": "v", "position": 1}),
], ids=["not-json", "a-list", "no-position", "a-position-past-the-chunk", "a-row-too-many"])
def test_an_unusable_stream_answer_raises_bad_answer_sync_and_async(frame: str) -> None:
    """The streaming sessions hold each answer frame to the rule the HTTP calls hold an answer to."""
    def answer_badly(connection: ServerConnection) -> None:
        for _ in connection:
            connection.send(frame)

    with serve(answer_badly, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.socket.getsockname()[1]}"
        with Client(url, retry=FAST) as client, client.stream_session("s") as session:
            with pytest.raises(BadAnswer, match="unusable"):
                list(session.stream([[1.0]], chunk=1))
            assert session.position == 0

        async def run() -> None:
            async with AsyncClient(url, retry=FAST) as client:
                session = await client.stream_session("s")
                async with session:
                    with pytest.raises(BadAnswer, match="unusable"):
                        _ = [answer async for answer in session.stream([[1.0]], chunk=1)]
                    assert session.position == 0

        asyncio.run(run())


@pytest.mark.parametrize("position", [7, 0, None, "1", -1, True])
def test_an_answer_whose_position_does_not_follow_the_chunk_is_refused(hostile: _ScriptedServer,
                                                                       position: object) -> None:
    hostile.answer = (200, {}, _chunk_answer(position=position))
    with Client(_url(hostile), retry=FAST) as client:
        session = client.session("s")
        with pytest.raises(BadAnswer, match="position"):
            session.predict([1.0])
    assert session.position == 0


@pytest.mark.parametrize("position", [None, "1", -1, True, 2.0])
def test_a_session_description_without_a_count_of_steps_is_refused(hostile: _ScriptedServer,
                                                                   position: object) -> None:
    hostile.answer = (200, {}, json.dumps({"session_id": "s", "position": position}).encode())
    with Client(_url(hostile), retry=FAST) as client:
        session = client.session("s")
        with pytest.raises(BadAnswer, match="not a count of steps"):
            session.resync()
        with pytest.raises(BadAnswer, match="not a count of steps"):
            session.fork("t")
    assert session.position == 0


@pytest.mark.parametrize("position", ['"abc"', "null", "2.5"])
def test_a_conflict_without_a_usable_position_is_no_offset_conflict(hostile: _ScriptedServer,
                                                                    position: str) -> None:
    body = f'{{"type": "x/offset-mismatch", "title": "Conflict", "position": {position}}}'.encode()
    hostile.answer = (409, {"content-type": "application/problem+json"}, body)
    with Client(_url(hostile), retry=FAST) as client, pytest.raises(ServiceError) as raised:
        client.session("s").predict([1.0])
    assert not isinstance(raised.value, OffsetConflict)
    assert raised.value.status == 409


@pytest.mark.parametrize("body", [b"", b"<html>maintenance</html>", b"\x08" + b"\0" * 7 + b"{}"],
                         ids=["empty", "a-page", "no-tensors"])
def test_an_export_that_is_no_state_document_is_refused(hostile: _ScriptedServer, csv_file: Path,
                                                        body: bytes) -> None:
    """A 200 whose body is no state document (a proxy's page) was taken as the session's state: the CLI
    saved it and exited 0, and only a later import found the copy useless."""
    hostile.answer = (200, {"etag": '"x"'}, body)
    with Client(_url(hostile), retry=FAST) as client, pytest.raises(BadAnswer, match="no state document"):
        client.session("s").export_state()
    out = csv_file.parent / "s.state"
    run = _cli("export", "--session", "s", "--url", _url(hostile), "--out", str(out))
    _refused_in_one_line(run, "no state document")
    assert not out.exists()


def test_a_body_that_cannot_be_inflated_raises_a_service_error(hostile: _ScriptedServer) -> None:
    hostile.answer = (200, {"content-encoding": "gzip"}, b"not gzip: " + _chunk_answer())
    with Client(_url(hostile), retry=FAST) as client, pytest.raises(ServiceError, match="DecodingError"):
        client.session("s").predict([1.0])


@pytest.mark.parametrize("coding", ["gzip", "gzip, gzip"])
def test_a_compressed_answer_is_inflated_no_further_than_max_answer_bytes(hostile: _ScriptedServer,
                                                                           coding: str) -> None:
    """httpx inflated each piece read whole before the client counted it: 200 KB of gzip (or 500 bytes of it
    gzipped twice) was 200 MB held to refuse an answer over 1 MB."""
    body = b" " * (200 << 20)
    for _ in coding.split(","):
        body = gzip.compress(body)
    hostile.answer = (200, {"content-encoding": coding}, body)
    tracemalloc.start()
    try:
        with Client(_url(hostile), retry=FAST, max_answer_bytes=1_000_000) as client, \
                pytest.raises(BadAnswer, match="over 1000000 bytes, the client's max_answer_bytes"):
            client.session("s").predict([1.0])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000


def test_a_compressed_answer_is_taken_sync_and_async(hostile: _ScriptedServer) -> None:
    hostile.answer = (200, {"content-encoding": "gzip"}, gzip.compress(_chunk_answer()))

    async def predict() -> int | None:
        async with AsyncClient(_url(hostile), retry=FAST) as client:
            return (await (await client.session("s")).predict([1.0])).position

    with Client(_url(hostile), retry=FAST) as client:
        assert client.session("s").predict([1.0]).position == 1
    assert asyncio.run(predict()) == 1


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_an_empty_answer_under_a_content_encoding_is_taken_sync_and_async(hostile: _ScriptedServer,
                                                                         coding: str) -> None:
    """A 204 has no content to inflate, whatever Content-Encoding a proxy left on it: httpx took it, as the
    client did before it inflated answers itself."""
    hostile.answer = (204, {"content-encoding": coding}, b"")

    async def delete() -> None:
        async with AsyncClient(_url(hostile), retry=FAST) as client:
            await (await client.session("s")).delete()

    with Client(_url(hostile), retry=FAST) as client:
        client.session("s").delete()
    asyncio.run(delete())


def test_a_url_without_its_scheme_raises_a_service_error() -> None:
    with Client("127.0.0.1:9", retry=FAST) as client, pytest.raises(ServiceError, match="http://"):
        client.model()


class _Trickling(_Scripted):
    """Answers a chunk correctly, but its body a byte every 0.1 s behind 30 spaces: each read is quick,
    the whole takes 3 s."""

    def _reply(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for piece in [b" "] * 30 + [_chunk_answer()]:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.flush()
            time.sleep(0.1)
        self.wfile.write(b"0\r\n\r\n")

    do_POST = _reply


def test_a_body_trickling_past_the_timeout_is_a_timeout_not_an_answer() -> None:
    trickling = _ScriptedServer(("127.0.0.1", 0), _Trickling)
    threading.Thread(target=trickling.serve_forever, daemon=True).start()
    try:
        with Client(_url(trickling), retry=FAST, timeout=1.0) as client, \
                pytest.raises(Unavailable, match=r"took over 1\.0 s"):
            client.session("s").predict([1.0])
    finally:
        trickling.shutdown()
        trickling.server_close()


class _TricklingHead(_Scripted):
    """Answers a chunk correctly, but its status line and headers a byte every 0.1 s: each read is quick,
    the head alone takes over 10 s."""

    def _reply(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = _chunk_answer()
        head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nx-pad: %s\r\n\r\n" % (len(body), b"a" * 80)
        with contextlib.suppress(OSError):  # the client hangs up once its time is up
            for byte in head:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.1)
            self.wfile.write(body)

    do_POST = _reply


def test_the_async_client_holds_a_trickling_head_to_the_timeout() -> None:
    """The async client's ``timeout`` bounds an attempt's whole answer, but only its body was held to it: a
    status line and headers trickling in held each attempt as long as the server liked (here over 10 s)."""
    trickling = _ScriptedServer(("127.0.0.1", 0), _TricklingHead)
    threading.Thread(target=trickling.serve_forever, daemon=True).start()

    async def predict() -> None:
        async with AsyncClient(_url(trickling), retry=FAST, timeout=1.0) as client:
            await (await client.session("s")).predict([1.0])

    started = time.monotonic()
    try:
        with pytest.raises(Unavailable, match=r"took over 1\.0 s"):
            asyncio.run(predict())
    finally:
        trickling.shutdown()
        trickling.server_close()
    assert time.monotonic() - started < 5  # two attempts of 1 s, and the pause between them


class _Flooding(_Scripted):
    """Answers with a body that does not end: 64 KiB pieces, chunked or under a Content-Length of 1 GiB (the
    server's ``declared``), until the client hangs up or 80 MiB have gone."""

    server: _FloodingServer

    def _reply(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header(*(("content-length", str(1 << 30)) if self.server.declared
                           else ("transfer-encoding", "chunked")))
        self.end_headers()
        piece = b" " * 65536
        with contextlib.suppress(OSError):  # the client hangs up once it has read enough
            for _ in range(80 * 16):
                self.wfile.write(piece if self.server.declared else b"%x\r\n%s\r\n" % (len(piece), piece))

    do_GET = do_POST = _reply


class _FloodingServer(ThreadingHTTPServer):
    def __init__(self, declared: bool) -> None:
        super().__init__(("127.0.0.1", 0), _Flooding)
        self.declared = declared


@pytest.mark.parametrize(("declared", "limit"), [(True, None), (False, 100_000)],
                         ids=["declared-past-the-default", "chunked-past-the-option"])
def test_an_answer_past_max_answer_bytes_is_refused_sync_and_async(declared: bool, limit: int | None) -> None:
    """Neither client bounded what it read of an answer: a hostile or broken server could make it read, and
    hold, a body as long as it liked (here 80 MiB an attempt, then waiting out the timeout for the rest)."""
    flooding = _FloodingServer(declared)
    threading.Thread(target=flooding.serve_forever, daemon=True).start()
    options: dict[str, Any] = {"retry": FAST, **({"max_answer_bytes": limit} if limit else {})}
    bound = limit or 64 * 1024 * 1024

    async def predict() -> None:
        async with AsyncClient(_url(flooding), **options) as client:
            await (await client.session("s")).predict([1.0])

    try:
        with Client(_url(flooding), **options) as client, \
                pytest.raises(BadAnswer, match=f"over {bound} bytes, the client's max_answer_bytes"):
            client.session("s").predict([1.0])
        with pytest.raises(BadAnswer, match=f"over {bound} bytes, the client's max_answer_bytes"):
            asyncio.run(predict())
    finally:
        flooding.shutdown()
        flooding.server_close()


def test_a_stream_answer_past_max_answer_bytes_is_refused_not_resent_sync_and_async() -> None:
    """The WebSocket client took frames of any size (``max_size=None``): a server could make it read and hold
    one as long as it liked. Past the client's ``max_answer_bytes`` the frame is now refused, and not taken
    for a dropped connection to reconnect and resend over."""
    connections = []

    def answer_hugely(connection: ServerConnection) -> None:
        connections.append(connection)
        for _ in connection:
            connection.send(_chunk_answer(padding="x" * 20_000).decode())

    with serve(answer_hugely, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.socket.getsockname()[1]}"
        with Client(url, retry=FAST, max_answer_bytes=10_000) as client, client.stream_session("s") as session, \
                pytest.raises(BadAnswer, match="over 10000 bytes, the client's max_answer_bytes"):
            list(session.stream([[1.0]], chunk=1))

        async def run() -> None:
            async with AsyncClient(url, retry=FAST, max_answer_bytes=10_000) as client:
                session = await client.stream_session("s")
                async with session:
                    with pytest.raises(BadAnswer, match="over 10000 bytes, the client's max_answer_bytes"):
                        _ = [answer async for answer in session.stream([[1.0]], chunk=1)]

        asyncio.run(run())
    assert len(connections) == 2  # one each: no reconnect


# -- the command line --------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.client", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def _refused_in_one_line(run: subprocess.CompletedProcess[str], words: str) -> None:
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    assert words in run.stderr.strip().splitlines()[-1]


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    source = tmp_path / "series.csv"
    source.write_text("x\n0.1\n0.2\n0.3\n")
    return source


def test_cli_names_a_csv_it_cannot_open(server: Server, tmp_path: Path) -> None:
    for missing in (tmp_path / "nowhere.csv", tmp_path):
        run = _cli("stream", "--csv", str(missing), "--session", new_id("cli"), "--url", server.url, "--quiet")
        _refused_in_one_line(run, f"{missing}: cannot read it")


def test_cli_refuses_a_csv_field_past_the_csv_module_limit(server: Server, tmp_path: Path) -> None:
    source = tmp_path / "huge-cell.csv"
    source.write_text("x\n0.1\n" + "2" * 200_000 + "\n")
    run = _cli("stream", "--csv", str(source), "--session", new_id("cli"), "--url", server.url, "--quiet")
    _refused_in_one_line(run, "field larger than field limit")


@pytest.mark.parametrize("option", ["--out", "--plot"])
def test_cli_refuses_an_output_it_cannot_write_before_sending(server: Server, csv_file: Path,
                                                              option: str) -> None:
    session = new_id("cli")
    target = csv_file.parent / "no-such-dir" / "out"
    run = _cli("stream", "--csv", str(csv_file), "--session", session, "--url", server.url, "--quiet",
               option, str(target))
    _refused_in_one_line(run, f"{option} {target}")
    assert run.returncode == 2
    with Client(server.url) as client:
        assert client.session(session, resume=True).position == 0  # nothing was sent


def test_cli_refuses_an_output_that_is_its_own_csv(server: Server, csv_file: Path) -> None:
    """--out naming the input CSV (here by another path) replaced the series with its predictions, exit
    status 0: the input was lost."""
    session = new_id("cli")
    before = csv_file.read_bytes()
    run = _cli("stream", "--csv", str(csv_file), "--session", session, "--url", server.url, "--quiet",
               "--out", str(csv_file.parent / ".." / csv_file.parent.name / csv_file.name))
    _refused_in_one_line(run, "is the --csv file")
    assert run.returncode == 2
    assert csv_file.read_bytes() == before
    with Client(server.url) as client:
        assert client.session(session, resume=True).position == 0  # nothing was sent


def test_cli_explains_a_url_without_its_scheme(csv_file: Path) -> None:
    for command in (["stream", "--csv", str(csv_file), "--quiet"], ["export"]):
        run = _cli(*command, "--session", "s", "--url", "127.0.0.1:9")
        _refused_in_one_line(run, "http://")


@pytest.mark.parametrize(("body", "words"), [
    (b"{}", "feature_names None"),
    (b'{"feature_names": "x"}', "feature_names 'x'"),
    (b'{"feature_names": ["x"]}', "unusable: predictions None"),
    (b'{"feature_names": ["x"], "predictions": [0.1, 0.2, 0.3], "model_version": "v", "position": 3}',
     "unusable: prediction 0.1 is not a row of numbers"),
], ids=["no-features", "features-not-a-list", "no-position", "rows-not-lists"])
def test_cli_against_a_server_without_the_fields_it_needs_exits_in_one_line(
        hostile: _ScriptedServer, csv_file: Path, body: bytes, words: str) -> None:
    hostile.answer = (200, {}, body)  # every call, /v1/model and the session's description included
    run = _cli("stream", "--csv", str(csv_file), "--session", "s", "--url", _url(hostile), "--quiet")
    _refused_in_one_line(run, words)
    assert run.returncode == 1


def test_cli_explains_a_url_it_cannot_parse(csv_file: Path) -> None:
    """A --url httpx cannot parse (a bad port, an unclosed IPv6 bracket) ended in httpx's traceback."""
    for command in (["stream", "--csv", str(csv_file), "--quiet"], ["export"]):
        run = _cli(*command, "--session", "s", "--url", "http://[::1")
        _refused_in_one_line(run, "argument --url: http://[::1")


class _Holding(_Scripted):
    """Reads the request, says so (``server.asked``), then holds the answer back until the test ends."""

    server: _HoldingServer

    def _reply(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.server.asked.set()
        self.server.release.wait(60)

    do_GET = do_POST = do_PUT = _reply


class _HoldingServer(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Holding)
        self.asked = threading.Event()
        self.release = threading.Event()


@pytest.mark.parametrize("command", [["export"], ["import", "--file", "FILE"], ["fork", "--to", "t"]],
                         ids=["export", "import", "fork"])
def test_cli_interrupted_while_waiting_for_the_service_exits_130_in_one_line(
        csv_file: Path, command: list[str]) -> None:
    """Ctrl-C while export, import or fork waited on the service ended in a Python traceback (exit status 1);
    the stream command already ended with a line and 130, as the shell's convention for SIGINT has it."""
    holding = _HoldingServer()
    threading.Thread(target=holding.serve_forever, daemon=True).start()
    argv = [sys.executable, "-m", "service.client", *[str(csv_file) if a == "FILE" else a for a in command],
            "--session", "s", "--url", _url(holding)]
    # A test run in the background of a shell without job control ignores SIGINT, and a child inherits an
    # ignored signal: handled here for the moment of the start, the child gets the default.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        running = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, inherited)
    try:
        assert holding.asked.wait(30), "the command never called the service"
        running.send_signal(signal.SIGINT)
        _, stderr = running.communicate(timeout=30)
    finally:
        running.kill()
        holding.release.set()
        holding.shutdown()
        holding.server_close()
    assert running.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert f"{command[0]} interrupted" in stderr
