"""service.client's streaming sessions against a real server: pipelined chunks, a dropped connection resumed
from the last acknowledged offset, refusals raised; the CLI's --transport ws."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from websockets.sync.server import ServerConnection, serve

from harness.processes import ROOT
from service.client import (
    AsyncClient,
    BadAnswer,
    Client,
    OffsetConflict,
    Prediction,
    Retry,
    ServiceError,
    Unavailable,
)
from tests.conftest import WIDE_FEATURES, Server, ServerFactory, make_tiny_model
from tests.service.helpers import new_id, position, series, stateless
from tests.service.proxy import LoopbackProxy

FAST = Retry(attempts=5, backoff=0.01, max_delay=0.05)


class CuttingProxy(LoopbackProxy):
    """A loopback TCP proxy whose first connection (``every``: each one) is cut (both ways) once it has
    relayed ``budget`` bytes from the server: a stream dropped mid-way, answers lost in flight. Later
    connections relay everything."""

    def __init__(self, target: str, budget: int, every: bool = False):
        super().__init__(target)
        self._budget = budget
        self._every = every
        self.connections = 0
        self.start()

    def _relay(self, downstream: socket.socket, upstream: socket.socket) -> None:
        budget = self._budget if self.connections == 0 or self._every else None
        self.connections += 1
        threading.Thread(target=self._pipe, args=(downstream, upstream, None), daemon=True).start()
        threading.Thread(target=self._pipe, args=(upstream, downstream, budget), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket, budget: int | None) -> None:
        try:
            while data := source.recv(65536):
                if budget is not None:
                    data = data[:budget]
                    budget -= len(data)
                sink.sendall(data)
                if budget == 0:
                    break
        except OSError:
            pass
        for end in (source, sink):  # shut down first: a close alone waits for the other direction's recv
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()


def _check(answers: list[Prediction], lost: list[tuple[int, int]], values: np.ndarray, chunk: int,
           client: httpx.Client) -> None:
    """Every chunk answered once or listed as lost, in order; every answer as a stateless pass has it."""
    ends = sorted([a.position or 0 for a in answers] + [offset + steps for offset, steps in lost])
    assert ends == list(range(chunk, len(values) + 1, chunk))
    want = np.array(stateless(client, values)["predictions"])
    for answer in answers:
        end = answer.position or 0
        np.testing.assert_allclose(answer.predictions, want[end - chunk : end], atol=1e-5)


def test_a_streaming_session_pipelines_and_equals_one_stateless_pass(server: Server, client: httpx.Client) -> None:
    values = series(400, seed=11)
    with Client(server.url, retry=FAST) as api, api.stream_session(new_id("cs"), window=8) as session:
        answers = list(session.stream(values, chunk=8))
    assert [a.position for a in answers] == list(range(8, 401, 8))
    assert session.lost == [] and session.reconnects == 0 and session.position == 400
    _check(answers, [], values, 8, client)


@pytest.mark.parametrize("budget", [0, 700, 5000])
def test_a_dropped_stream_reconnects_and_resumes_from_the_last_acknowledged_offset(
    server: Server, client: httpx.Client, budget: int
) -> None:
    values = series(320, seed=budget)
    proxy = CuttingProxy(server.url, budget=200 + budget)  # the upgrade's answer, then some frames
    session_id = new_id("cut")
    try:
        with Client(proxy.url, retry=FAST) as api, api.stream_session(session_id, window=16) as session:
            answers = list(session.stream(values, chunk=8))
    finally:
        proxy.close()
    assert session.reconnects >= 1 and proxy.connections >= 2
    assert session.position == position(client, session_id) == 320
    _check(answers, session.lost, values, 8, client)


def test_the_async_streaming_session_resumes_the_same_way(server: Server, client: httpx.Client) -> None:
    values = series(240, seed=7)
    proxy = CuttingProxy(server.url, budget=1500)
    session_id = new_id("acut")

    async def run() -> tuple[list[Prediction], list[tuple[int, int]]]:
        async with AsyncClient(proxy.url, retry=FAST) as api:
            session = await api.stream_session(session_id, window=16)
            async with session:
                return [a async for a in session.stream(values, chunk=8)], session.lost

    try:
        answers, lost = asyncio.run(run())
    finally:
        proxy.close()
    assert position(client, session_id) == 240
    _check(answers, lost, values, 8, client)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_answers_received_before_a_drain_closes_the_stream_reach_the_caller(
    server_factory: ServerFactory, tmp_path: Path, asynchronous: bool
) -> None:
    """SIGTERM mid-stream: the service answers every frame it read, then closes with 1001. A send that fails
    on the closed stream must not throw away the answers already received: every chunk the service applied
    is one the caller got an answer for (none listed in ``lost``), as a restart from the snapshot shows."""
    snapshot = {"GRU_SNAPSHOT_PATH": str(tmp_path / "sessions.safetensors")}
    server = server_factory(**snapshot)
    values = series(8 * 20_000, seed=12)
    session_id = new_id("drain")
    answers: list[Prediction] = []
    lost: list[tuple[int, int]] = []

    def run_sync() -> None:
        with Client(server.url, retry=FAST) as api, api.stream_session(session_id, window=16) as session:
            with contextlib.suppress(Unavailable):
                for answer in session.stream(values, chunk=8):
                    answers.append(answer)
                    if len(answers) == 200:
                        server.process.send_signal(signal.SIGTERM)
                    if len(answers) >= 200:  # a slow consumer: the answers and the close wait, queued, for it
                        time.sleep(0.05)
            lost.extend(session.lost)

    async def run_async() -> None:
        async with AsyncClient(server.url, retry=FAST) as api:
            session = await api.stream_session(session_id, window=16)
            async with session:
                with contextlib.suppress(Unavailable):
                    async for answer in session.stream(values, chunk=8):
                        answers.append(answer)
                        if len(answers) == 200:
                            server.process.send_signal(signal.SIGTERM)
                        if len(answers) >= 200:
                            await asyncio.sleep(0.05)
                lost.extend(session.lost)

    if asynchronous:
        asyncio.run(run_async())
    else:
        run_sync()
    assert server.process.wait(45) in (0, -signal.SIGTERM)
    assert lost == [] and [a.position for a in answers] == list(range(8, 8 * len(answers) + 1, 8))
    restarted = server_factory(**snapshot)
    with httpx.Client(base_url=restarted.url, timeout=30) as http:
        assert position(http, session_id) == answers[-1].position


def test_a_streaming_session_whose_answers_never_arrive_gives_up_after_its_attempts(server: Server) -> None:
    """Every reconnect goes through, every answer is cut: the attempts count until an answer arrives, so
    the session raises instead of reconnecting for ever."""
    proxy = CuttingProxy(server.url, budget=1024, every=True)  # the upgrade's 101, then part of an answer
    try:
        with (Client(proxy.url, retry=FAST) as api, api.stream_session(new_id("never")) as session,
              pytest.raises(Unavailable)):
            list(session.stream(series(400, seed=3), chunk=400))
    finally:
        proxy.close()
    assert session.reconnects == FAST.attempts - 1 and proxy.connections == FAST.attempts


def test_a_streaming_session_raises_a_conflict_and_an_auth_refusal(server_factory: ServerFactory) -> None:
    server = server_factory(GRU_API_KEYS="client-stream-key-0123456:acme")
    with Client(server.url, "client-stream-key-0123456", retry=FAST) as api:
        session_id = new_id("conf")
        api.session(session_id).predict(series(5))
        with api.stream_session(session_id) as stale, pytest.raises(OffsetConflict) as conflict:
            list(stale.stream(series(8), chunk=4))  # it starts at 0; the session is at 5
        assert conflict.value.position == 5
    with Client(server.url, "not-the-key-000000000000", retry=FAST) as api, api.stream_session(new_id("no")) as bad:
        with pytest.raises(ServiceError) as refused:
            list(bad.stream(series(4)))
        assert refused.value.status == 401 and refused.value.kind == "unauthorized"


def _scripted_stream(first: str | None, then: str) -> Any:
    """A WebSocket server: on its first connection it answers every frame with ``first`` (None: closes
    unanswered), on later ones with ``then``."""
    connections = [0]

    def handler(connection: ServerConnection) -> None:
        connections[0] += 1
        frame = first if connections[0] == 1 else then
        for _ in connection:
            if frame is None:
                connection.close()
                return
            connection.send(frame)

    return serve(handler, "127.0.0.1", 0)


@pytest.mark.parametrize(("first", "then"), [
    (None, json.dumps({"type": "x/offset-mismatch", "status": 409, "position": None})),  # after a reconnect
    (None, json.dumps({"type": "x/offset-mismatch", "status": 409, "position": "abc"})),
    (json.dumps({"status": "teapot", "detail": "?"}), ""),
    (json.dumps({"status": [503], "detail": "?"}), ""),
], ids=["resent-409-null-position", "resent-409-text-position", "status-text", "status-list"])
def test_a_problem_frame_the_stream_cannot_read_raises_a_service_error(first: str | None, then: str) -> None:
    """A problem frame with a status or a position that is no number crashed the stream with a TypeError
    or a ValueError (a traceback from the CLI)."""
    with _scripted_stream(first, then) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.socket.getsockname()[1]}"
        with Client(url, retry=FAST) as api, api.stream_session("s") as session, pytest.raises(ServiceError):
            list(session.stream([[1.0]], chunk=1))


def test_an_upgrade_answered_408_is_retried() -> None:
    """A 408 (a proxy in front that did not get the whole upgrade request in time: nothing reached the service)
    ended the stream with a ServiceError where the HTTP calls retry it."""
    upgrades: list[int] = []

    def refuse_first(connection: ServerConnection, request: object) -> Any:
        upgrades.append(len(upgrades))
        return connection.respond(408, "request timeout\n") if len(upgrades) == 1 else None

    def handler(connection: ServerConnection) -> None:
        for message in connection:
            chunk = json.loads(message)
            steps = len(chunk["values"])
            connection.send(json.dumps({"session_id": "s", "position": chunk["offset"] + steps,
                                        "predictions": [[0.0]] * steps, "model_version": "v"}))

    with serve(handler, "127.0.0.1", 0, process_request=refuse_first) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.socket.getsockname()[1]}"
        with Client(url, retry=FAST) as api, api.stream_session("s") as session:
            assert [answer.position for answer in session.stream([[1.0]] * 4, chunk=2)] == [2, 4]
    assert len(upgrades) == 2 and session.reconnects == 1


def test_an_upgrade_redirected_is_refused_not_followed_sync_and_async() -> None:
    """The WebSocket client followed a redirect of the upgrade (with the API key, on the same host) where the
    HTTP calls follow none: a proxy's or a wrong URL's 307 had the chunks applied to another session."""
    applied: list[str] = []

    def redirect(connection: ServerConnection, request: Any) -> Any:
        if request.path != "/v1/sessions/s/stream":
            return None
        response = connection.respond(307, "")
        response.headers["Location"] = "/v1/sessions/other/stream"
        return response

    def handler(connection: ServerConnection) -> None:
        for message in connection:
            applied.append(connection.request.path)
            chunk = json.loads(message)
            connection.send(json.dumps({"position": chunk["offset"] + 1, "predictions": [[0.0]],
                                        "model_version": "v"}))

    async def run(url: str) -> None:
        async with AsyncClient(url, retry=FAST) as api, await api.stream_session("s") as session:
            with pytest.raises(BadAnswer, match="redirect"):
                _ = [answer async for answer in session.stream([[1.0]], chunk=1)]

    with serve(handler, "127.0.0.1", 0, process_request=redirect) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.socket.getsockname()[1]}"
        with Client(url, retry=FAST) as api, api.stream_session("s") as session, \
                pytest.raises(BadAnswer, match="redirect"):
            list(session.stream([[1.0]], chunk=1))
        asyncio.run(run(url))
    assert applied == []


def test_a_stream_sends_its_first_chunk_alone_until_an_answer_confirms_where_the_session_is() -> None:
    """A stream starting at 0 on a session the service has at 10 sent a window of chunks at once (offsets 0,
    5, 10, 15) and the one at 10 was applied on top of the session. Its first chunk now goes alone: the 409
    comes back before anything else is sent."""
    received: list[int] = []

    def handler(connection: ServerConnection) -> None:
        for message in connection:
            received.append(json.loads(message)["offset"])
            if len(received) == 1:
                time.sleep(0.2)  # what the client sends meanwhile arrives before the answer
                connection.send(json.dumps({"type": "x/offset-mismatch", "status": 409, "position": 10,
                                            "detail": "the session is at 10"}))

    with serve(handler, "127.0.0.1", 0) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.socket.getsockname()[1]}"
        with Client(url, retry=FAST) as api, api.stream_session("s") as session, pytest.raises(OffsetConflict):
            list(session.stream([[1.0]] * 20, chunk=5))
    assert received == [0]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_client_window_over_the_service_s_takes_every_answer(
    server_factory: ServerFactory, wide_model: Path, asynchronous: bool
) -> None:
    """A client sending past the service's window with large frames hung: the service stopped reading, and
    the client, blocked in its send, stopped reading answers (the sync connection's reader waits for the
    send; the async one pauses at 16 frames). The client keeps to the window the 101 answer announces.
    Frames and answers must outgrow loopback's socket buffers both ways: 96 frames of about 120 KB with
    answers of over a megabyte."""
    server = server_factory(wide_model, GRU_STREAM_WINDOW="1")
    chunks, steps, got = 96, 384, []
    values = series(steps * chunks, seed=8, features=len(WIDE_FEATURES))
    fields = {"levels": [80, 90, 95, 99], "scores": True}

    def streamed() -> None:
        with Client(server.url, retry=FAST) as api, api.stream_session(new_id("ws"), window=chunks) as session:
            got.extend(answer.position for answer in session.stream(values, chunk=steps, **fields))

    async def streamed_async() -> None:
        async with AsyncClient(server.url, retry=FAST) as api:
            session = await api.stream_session(new_id("aws"), window=chunks)
            async with session:
                got.extend([answer.position async for answer in session.stream(values, chunk=steps, **fields)])

    thread = threading.Thread(target=(lambda: asyncio.run(streamed_async())) if asynchronous else streamed,
                              daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), f"the client hangs with {len(got)} answers"
    assert got == [steps * (i + 1) for i in range(chunks)]


def test_cli_streams_a_csv_over_the_websocket(server: Server, client: httpx.Client, tmp_path: Path) -> None:
    values = series(100, seed=9)
    path = tmp_path / "series.csv"
    path.write_text("x\n" + "\n".join(f"{v:.6f}" for v in values[:, 0]) + "\n")
    session_id = new_id("cli-ws")
    done = subprocess.run(
        [sys.executable, "-m", "service.client", "stream", "--csv", str(path), "--session", session_id,
         "--url", server.url, "--chunk", "7", "--transport", "ws", "--window", "4", "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert position(client, session_id) == 100
    rows = list(csv.reader((tmp_path / "series.predictions.csv").open()))
    sent = np.array([[float(v) for v in row[1:2]] for row in rows[1:-1]], dtype=np.float32)
    predicted = np.array([[float(v) for v in row[2:3]] for row in rows[2:]])
    np.testing.assert_allclose(sent, values, atol=1e-6)
    np.testing.assert_allclose(predicted, stateless(client, sent)["predictions"], atol=1e-5)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_streaming_session_starts_at_the_position_it_is_given(server: Server, client: httpx.Client,
                                                                asynchronous: bool) -> None:
    """``stream_session(id, position=...)`` goes on from a position already read (a handle's), not 0."""
    values = series(20, seed=11)
    session_id = new_id("at")
    with Client(server.url, retry=FAST) as api:
        handle = api.session(session_id)
        handle.predict(values[:8])
        if not asynchronous:
            with api.stream_session(session_id, position=handle.position) as stream:
                ends = [answer.position for answer in stream.stream(values[8:], chunk=6)]

    async def run() -> list[int | None]:
        async with AsyncClient(server.url, retry=FAST) as api, await api.stream_session(session_id, position=8) as at:
            return [answer.position async for answer in at.stream(values[8:], chunk=6)]

    if asynchronous:
        ends = asyncio.run(run())
    assert ends == [14, 20] and position(client, session_id) == 20


@pytest.mark.parametrize("session_id", ["a/b", "no spaces allowed", "x?y"])
def test_a_streaming_session_refuses_an_id_that_breaks_the_rule(server: Server, session_id: str) -> None:
    """``stream_session`` checked the id through ``session()``; given a ``position`` it stopped checking, and
    an id with a slash or a query went into the WebSocket's URL as it was (another path on the service)."""

    async def run() -> None:
        async with AsyncClient(server.url, retry=FAST) as api:
            await api.stream_session(session_id)

    with Client(server.url, retry=FAST) as api, pytest.raises(ValueError, match="breaks the rule"):
        api.stream_session(session_id)
    with pytest.raises(ValueError, match="breaks the rule"):
        asyncio.run(run())


@pytest.mark.parametrize(("resume", "position"), [(True, 5), (False, -1)], ids=["both", "negative"])
def test_a_streaming_session_refuses_a_start_it_would_not_keep(server: Server, resume: bool, position: int) -> None:
    """``resume`` with a ``position`` ignored the position (the stream started at the server's), and a
    negative one was sent as every chunk's offset: each is refused before anything is sent."""

    async def run() -> None:
        async with AsyncClient(server.url, retry=FAST) as api:
            await api.stream_session(new_id("start"), resume=resume, position=position)

    with Client(server.url, retry=FAST) as api, pytest.raises(ValueError, match="a stream starts at"):
        api.stream_session(new_id("start"), resume=resume, position=position)
    with pytest.raises(ValueError, match="a stream starts at"):
        asyncio.run(run())


def test_cli_resume_over_the_websocket_reads_the_session_s_position_once(server: Server, client: httpx.Client,
                                                                         tmp_path: Path) -> None:
    """--transport ws --resume read the position twice (for the file, then again for the stream): a session
    moved between the two reads would have the stream send rows from where the first read put them at the
    offset the second gave. It is read once: one GET of the session in the server's access log."""
    values = series(60, seed=10)
    path = tmp_path / "series.csv"
    path.write_text("x\n" + "\n".join(f"{v:.6f}" for v in values[:, 0]) + "\n")
    session_id = new_id("cli-ws-resume")
    with Client(server.url, retry=FAST) as api:
        api.session(session_id).predict(values[:40])
    done = subprocess.run(
        [sys.executable, "-m", "service.client", "stream", "--csv", str(path), "--session", session_id,
         "--url", server.url, "--chunk", "7", "--transport", "ws", "--resume", "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "20 steps from position 40 -> 60" in done.stderr
    lines = [json.loads(line) for line in server.log().splitlines() if session_id in line]
    reads = [line for line in lines if line.get("route") == "/v1/sessions/{session_id}"]
    assert len(reads) == 1, reads
    assert position(client, session_id) == 60


def test_a_streaming_session_takes_answers_over_a_mebibyte_as_http_does(server_factory: ServerFactory,
                                                                         tmp_path: Path) -> None:
    """Intervals at four levels and scores make an answer about ten times its chunk: 4096 steps of three
    features answer over the WebSocket client's default 1 MiB frame limit, and the service sends them."""
    server = server_factory(make_tiny_model(tmp_path / "wide", features=("p", "q", "r"), error_scale=1.0))
    values = series(4096, seed=8, features=3)
    fields = {"levels": [80, 90, 95, 99], "scores": True}

    async def streamed_async() -> list[Prediction]:
        async with AsyncClient(server.url, retry=FAST) as api:
            session = await api.stream_session(new_id("aws"))
            async with session:
                return [a async for a in session.stream(values, chunk=4096, **fields)]

    with Client(server.url, retry=FAST) as api:
        posted = api.session(new_id("http")).predict(values, **fields)
        with api.stream_session(new_id("ws")) as session:
            streamed = list(session.stream(values, chunk=4096, **fields))
    assert len(httpx.post(server.url + "/v1/predict", json={"values": values.tolist(), **fields},
                          timeout=60).content) > 2**20
    for answers in (streamed, asyncio.run(streamed_async())):
        assert [answer.position for answer in answers] == [4096]
        assert (answers[0].predictions, answers[0].intervals, answers[0].scores) == (
            posted.predictions, posted.intervals, posted.scores)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_reconnect_resends_no_more_chunks_than_the_new_connection_s_window(asynchronous: bool) -> None:
    """On a reconnect every unanswered chunk was sent again at once, whatever window the new connection's 101
    announced (a replica or a restart with a smaller GRU_STREAM_WINDOW): past it the service stops reading,
    and with large frames a client blocked in its send waits for ever."""
    windows, early = [4, 1], []

    def announce(connection: ServerConnection, request: object, response: Any) -> None:
        response.headers["X-Stream-Window"] = str(windows[min(len(early), 1)])

    def answer(connection: ServerConnection, message: str | bytes) -> None:
        chunk = json.loads(message)
        steps = len(chunk["values"])
        connection.send(json.dumps({"session_id": "s", "position": chunk["offset"] + steps,
                                    "predictions": [[0.0]] * steps, "model_version": "v"}))

    def handler(connection: ServerConnection) -> None:
        if not early:  # the first connection: one chunk answered, then the window's read and the socket cut
            early.append(0)
            answer(connection, connection.recv())
            for _ in range(windows[0]):
                connection.recv()
            connection.close_socket()
            return
        frames = [connection.recv()]
        with contextlib.suppress(TimeoutError):
            while True:  # what the client sends before its first resent chunk is answered
                frames.append(connection.recv(timeout=0.5))
        early.append(len(frames))
        for frame in frames:
            answer(connection, frame)
        for frame in connection:
            answer(connection, frame)

    with serve(handler, "127.0.0.1", 0, process_response=announce) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.socket.getsockname()[1]}"
        if asynchronous:
            positions = asyncio.run(_async_positions(url, 12))
        else:
            with Client(url, retry=FAST) as api, api.stream_session("s", window=8) as session:
                positions = [answer.position for answer in session.stream([[1.0]] * 12, chunk=1)]
    assert positions == list(range(1, 13))
    assert early[1] == 1, f"{early[1]} chunks sent where the new connection's window takes 1"


async def _async_positions(url: str, steps: int) -> list[int | None]:
    """The positions an async streaming session of session "s", window 8, answers for ``steps`` steps."""
    async with AsyncClient(url, retry=FAST) as api:
        session = await api.stream_session("s", window=8)
        async with session:
            return [answer.position async for answer in session.stream([[1.0]] * steps, chunk=1)]


@pytest.mark.parametrize("kill_after", [0, 37, 49])  # before any answer, mid-stream, after the last send
def test_a_stream_resumes_across_a_sigterm_restart_on_the_same_port_as_one_pass(
    server_factory: ServerFactory, tmp_path: Path, client: httpx.Client, kill_after: int
) -> None:
    """SIGTERM drains the stream (1001) and writes the snapshot; the service comes back on the same port from
    it, and the session resumes there: every chunk answered exactly once, as one stateless pass has it."""
    snapshot = {"GRU_SNAPSHOT_PATH": str(tmp_path / "sessions.safetensors")}
    first = server_factory(**snapshot)
    values = series(8 * 64, seed=21)
    restarted: list[Server] = []

    def restart() -> None:
        assert first.stop(signal.SIGTERM, timeout=45) in (0, -signal.SIGTERM)
        restarted.append(server_factory(port=first.port, **snapshot))

    thread = threading.Thread(target=restart)
    if kill_after == 0:  # the first connect is refused: the service is down until the restart
        assert first.stop(signal.SIGTERM, timeout=45) in (0, -signal.SIGTERM)
        thread = threading.Thread(target=lambda: restarted.append(server_factory(port=first.port, **snapshot)))
        thread.start()
    patient = Retry(attempts=40, backoff=0.05, max_delay=0.5)  # past the restart
    with Client(first.url, retry=patient) as api, api.stream_session(new_id("rst"), window=16) as session:
        answers = []
        for answer in session.stream(values, chunk=8):
            answers.append(answer)
            if len(answers) == kill_after:  # 49: all 64 sent, 15 answers unread
                thread.start()
                time.sleep(1)  # the drain answers what is in flight while this side reads nothing
    thread.join()
    assert session.lost == [] and (session.reconnects >= 1) == (kill_after < 49)
    with httpx.Client(base_url=restarted[0].url, timeout=30) as http:
        assert position(http, session.id) == len(values)
    _check(answers, [], values, 8, client)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_a_stream_whose_service_stops_reading_gives_up_instead_of_hanging(asynchronous: bool) -> None:
    """A service (or a proxy) that answers the first chunk, then reads no more: the client's sends filled
    loopback's socket buffers and then blocked for ever, unbounded by ``timeout`` where every receive is, so
    ``stream`` neither returned nor raised. A send that does not complete in time is a dropped connection:
    reconnected and resent until the attempts run out. Frames of about 1.3 MB, 48 of them, outgrow the buffers."""
    stuck = threading.Event()
    outcome: list[Exception] = []
    values = [[0.5] * 4096] * (64 * 48)

    def handler(connection: ServerConnection) -> None:
        chunk = json.loads(connection.recv())
        steps = len(chunk["values"])
        connection.send(json.dumps({"session_id": "s", "position": chunk["offset"] + steps,
                                    "predictions": [[0.0]] * steps, "model_version": "v"}))
        stuck.wait()  # reads nothing more: max_queue=1 pauses the connection's reader too

    def streamed(url: str) -> None:
        with Client(url, retry=FAST, timeout=1.0) as api, api.stream_session("s") as session:
            list(session.stream(values, chunk=64))

    async def streamed_async(url: str) -> None:
        async with AsyncClient(url, retry=FAST, timeout=1.0) as api, await api.stream_session("s") as session:
            async for _ in session.stream(values, chunk=64):
                pass

    def run(url: str) -> None:
        try:
            if asynchronous:
                asyncio.run(streamed_async(url))
            else:
                streamed(url)
        except Exception as failure:  # handed to the test's thread
            outcome.append(failure)

    with serve(handler, "127.0.0.1", 0, max_size=None, max_queue=1, close_timeout=0.1) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        thread = threading.Thread(target=run, args=(f"http://127.0.0.1:{server.socket.getsockname()[1]}",),
                                  daemon=True)
        thread.start()
        thread.join(30)
        stuck.set()
        assert not thread.is_alive(), "the client hangs in a send the service never reads"
    assert len(outcome) == 1 and isinstance(outcome[0], Unavailable), outcome
