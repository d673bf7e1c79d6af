"""service.client against a real server: offsets tracked, retries that never apply a chunk twice, the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime
import email.utils
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from array import array
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from harness.processes import ROOT
from service.client import (
    AsyncClient,
    AsyncSession,
    BadAnswer,
    Client,
    ModelChanged,
    OffsetConflict,
    PreconditionFailed,
    Retry,
    ServiceError,
    Session,
    SessionExists,
    SessionNotFound,
    Unavailable,
)
from service.client.cli import PredictionsFile, Rows, _earlier_end, read_csv
from tests.conftest import Server, ServerFactory
from tests.service.helpers import new_id, position, send, series, stateless
from tests.service.proxy import LoopbackProxy

FAST = Retry(attempts=4, backoff=0.01, max_delay=0.05)


class DroppingProxy(LoopbackProxy):
    """A loopback TCP proxy that can lose an answer: once armed, the next answer to a POST (a PUT, a DELETE) is not
    relayed and the client's connection is closed. The server has answered, so the chunk was applied; the
    client only sees a dropped connection, exactly the case a retry with the same offset must survive."""

    def __init__(self, target: str):
        super().__init__(target)
        self._lock = threading.Lock()
        self._armed = 0
        self.dropped = 0
        self._sockets: list[socket.socket] = []
        self.start()

    def arm(self, count: int = 1) -> None:
        with self._lock:
            self._armed += count

    def close(self) -> None:
        super().close()
        for sock in self._sockets:
            sock.close()

    def _relay(self, downstream: socket.socket, upstream: socket.socket) -> None:
        self._sockets += [downstream, upstream]
        asked = {"post": False}  # what the connection's request in flight is
        threading.Thread(target=self._pipe, args=(downstream, upstream, False, asked), daemon=True).start()
        threading.Thread(target=self._pipe, args=(upstream, downstream, True, asked), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, answers: bool, asked: dict[str, bool]) -> None:
        try:
            while data := source.recv(65536):
                if not answers and data[:8].split(b" ")[0] in (b"GET", b"POST", b"DELETE", b"PUT", b"HEAD"):
                    asked["post"] = data.startswith((b"POST ", b"PUT ", b"DELETE "))  # a new request, not a body
                if answers:
                    with self._lock:
                        drop = self._armed > 0 and asked["post"]
                        if drop:
                            self._armed -= 1
                            self.dropped += 1
                    if drop:
                        break
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class StallingProxy(LoopbackProxy):
    """A loopback TCP proxy that can hold a body back: once armed, the next request's head is relayed and its
    body is not, so the server, reading it, answers 408 once GRU_REQUEST_TIMEOUT_SECONDS pass (and closes the
    connection); that answer is relayed. The server never had the whole request: nothing was applied."""

    def __init__(self, target: str):
        super().__init__(target)
        self.armed = 0
        self.start()

    def _relay(self, downstream: socket.socket, upstream: socket.socket) -> None:
        threading.Thread(target=self._requests, args=(downstream, upstream), daemon=True).start()
        threading.Thread(target=self._answers, args=(upstream, downstream), daemon=True).start()

    def _requests(self, source: socket.socket, sink: socket.socket) -> None:
        stalled = False  # a head relayed without its body: the rest of what the client sends is dropped
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if stalled:
                    continue
                if self.armed and data.startswith(b"POST "):
                    self.armed -= 1
                    stalled = True
                    data = data[: data.index(b"\r\n\r\n") + 4]  # the head only
                sink.sendall(data)

    @staticmethod
    def _answers(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for end in (source, sink):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)
            end.close()


@pytest.fixture
def proxy(server: Server) -> Iterator[DroppingProxy]:
    running = DroppingProxy(server.url)
    yield running
    running.close()


@pytest.fixture
def api(server: Server) -> Iterator[Client]:
    with Client(server.url, retry=FAST) as connection:
        yield connection


# -- streaming and offsets ---------------------------------------------------------------------------


def test_stream_in_chunks_equals_one_stateless_pass(api: Client, client: httpx.Client) -> None:
    values = series(45, seed=21)
    session = api.session(new_id("client"))
    answers = list(session.stream(values, chunk=8, horizon=3))
    assert [a.position for a in answers] == [8, 16, 24, 32, 40, 45]
    assert answers[0].created and not answers[1].created
    got = [row for answer in answers for row in answer.predictions]
    expected = stateless(client, values, horizon=3)
    np.testing.assert_allclose(got, expected["predictions"], atol=1e-5)
    forecast = answers[-1].forecast
    assert forecast is not None
    np.testing.assert_allclose(forecast, expected["forecast"], atol=1e-5)
    assert session.position == 45 == position(client, session.id)


def test_retry_after_dropped_connection_applies_the_chunk_once(
    server: Server, proxy: DroppingProxy, client: httpx.Client
) -> None:
    values = series(30, seed=22)
    with Client(proxy.url, retry=FAST) as api:
        session = api.session(new_id("client"))
        first = session.predict(values[:10])
        proxy.arm()  # the server applies the next chunk, its answer is lost on the way back
        second = session.predict(values[10:20])
        third = session.predict(values[20:])
    assert proxy.dropped == 1 and api.stats.retries == 1
    assert "RemoteProtocolError" in api.stats.failures[0] or "ReadError" in api.stats.failures[0]
    assert (first.position, second.position, third.position) == (10, 20, 30)
    assert position(client, session.id) == 30  # applied twice would be 40
    got = first.predictions + second.predictions + third.predictions
    np.testing.assert_allclose(got, stateless(client, values)["predictions"], atol=1e-5)


def test_a_408_for_a_body_held_back_is_retried_and_the_chunk_applied_once(
    server_factory: ServerFactory, client: httpx.Client
) -> None:
    """A 408 (the body did not arrive within GRU_REQUEST_TIMEOUT_SECONDS: nothing was applied) raised a
    ServiceError where a resend of the same call goes through: a chunk with its offset, and a stateless
    call, which carries none."""
    server = server_factory(GRU_REQUEST_TIMEOUT_SECONDS="0.5")
    values = series(20, seed=26)
    proxy = StallingProxy(server.url)
    try:
        with Client(proxy.url, retry=FAST) as api:
            session = api.session(new_id("client"))
            first = session.predict(values[:10])
            proxy.armed = 1
            second = session.predict(values[10:])
            proxy.armed = 1
            whole = api.predict(values)
            assert api.stats.retries == 2 and api.stats.failures == ["HTTP 408"] * 2
            assert session.position == 20 == api.session(session.id, resume=True).position
    finally:
        proxy.close()
    np.testing.assert_allclose(first.predictions + second.predictions, whole.predictions, atol=1e-5)
    np.testing.assert_allclose(whole.predictions, stateless(client, values)["predictions"], atol=1e-5)


def test_async_retry_after_dropped_connection_applies_the_chunk_once(
    proxy: DroppingProxy, client: httpx.Client
) -> None:
    values = series(24, seed=23)

    async def run() -> list[list[float]]:
        async with AsyncClient(proxy.url, retry=FAST) as api:
            session = await api.session(new_id("client"))
            got: list[list[float]] = []
            async for answer in session.stream(values, chunk=6):
                got += answer.predictions
                proxy.arm()  # every answer but the last is lost once
            assert api.stats.retries == 3  # chunks 2, 3 and 4 each lost their first answer
            assert session.position == 24 == position(client, session.id)
            return got

    got = asyncio.run(run())
    np.testing.assert_allclose(got, stateless(client, values)["predictions"], atol=1e-5)


def test_a_fork_or_conditional_import_resent_after_a_lost_answer_is_the_one_it_made(
    proxy: DroppingProxy, client: httpx.Client
) -> None:
    """The resend meets what the first attempt did (409 session-exists, 412): the client takes it as its own
    when the session holds that very state, and still refuses anyone else's."""
    values = series(12, seed=54)
    with Client(proxy.url, retry=FAST) as api:
        parent, taken = api.session(new_id("parent")), api.session(new_id("taken"))
        parent.predict(values[:7])
        taken.predict(values[:3])
        proxy.arm()
        branch = parent.fork(new_id("branch"))
        assert branch.position == 7 == position(client, branch.id) and proxy.dropped == 1
        proxy.arm()
        with pytest.raises(SessionExists):
            parent.fork(taken.id)
        assert proxy.dropped == 2 and position(client, taken.id) == 3

        elsewhere = taken.export_state()  # 3 steps
        proxy.arm()
        assert taken.import_state(parent.export_state(), if_match=elsewhere.etag)["position"] == 7
        assert taken.position == 7 == position(client, taken.id) and proxy.dropped == 3
        proxy.arm()
        with pytest.raises(PreconditionFailed):  # a stale tag, and the session holds another state
            branch.import_state(elsewhere, if_match=elsewhere.etag)
        assert proxy.dropped == 4 and position(client, branch.id) == 7
        assert api.stats.retries == 4


def test_async_fork_resent_after_a_lost_answer_is_the_one_it_made(proxy: DroppingProxy, client: httpx.Client
                                                                   ) -> None:
    async def run() -> int:
        async with AsyncClient(proxy.url, retry=FAST) as api:
            parent = await api.session(new_id("parent"))
            await parent.predict(series(5, seed=55))
            proxy.arm()
            return (await parent.fork(new_id("branch"))).position

    assert asyncio.run(run()) == 5 and proxy.dropped == 1


class HeldForkTransport(httpx.AsyncHTTPTransport):
    """The real transport, holding a fork's request back until some request has gone out a second time (a
    resend): the client's retry count then moves while the fork is under way, as on a busy shared client."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: set[tuple[str, str]] = set()
        self.resent = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/fork"):
            await self.resent.wait()
        elif (request.method, request.url.path) in self.sent:
            self.resent.set()
        self.sent.add((request.method, request.url.path))
        return await super().handle_async_request(request)


def test_a_fork_not_resent_refuses_an_existing_session_while_another_call_retries(
    proxy: DroppingProxy, client: httpx.Client
) -> None:
    """A fork to a session that exists raises ``SessionExists``, even one holding the parent's very state,
    when its own request was never resent: another call's resend on the shared client is not the fork's."""

    async def run(taken_id: str) -> None:
        transport = HeldForkTransport()
        async with AsyncClient(proxy.url, retry=FAST, transport=transport) as api:
            parent, other = await api.session(new_id("parent")), await api.session(new_id("other"))
            await parent.predict(series(5, seed=56))
            await (await api.session(taken_id)).import_state(await parent.export_state())  # the parent's very state
            proxy.arm()  # the other call's first answer is lost: it is resent while the fork is held
            fork, chunk = await asyncio.gather(parent.fork(taken_id), other.predict(series(3, seed=57)),
                                               return_exceptions=True)
            assert chunk.position == 3 and api.stats.retries == 1 and proxy.dropped == 1
            assert isinstance(fork, SessionExists)

    taken_id = new_id("taken")
    asyncio.run(run(taken_id))
    assert position(client, taken_id) == 5


def test_conflict_reports_the_server_position_and_resync_continues(api: Client, client: httpx.Client) -> None:
    values = series(20, seed=24)
    session_id = new_id("client")
    api.session(session_id).predict(values[:12])
    stale = api.session(session_id)  # a second handle, still at 0
    with pytest.raises(OffsetConflict) as caught:
        stale.predict(values[12:])
    assert caught.value.position == 12 and caught.value.status == 409
    assert caught.value.kind == "offset-mismatch"
    assert "position 12" in str(caught.value) and caught.value.problem["session_id"] == session_id
    assert position(client, session_id) == 12  # nothing applied
    assert stale.resync() == 12
    rest = stale.predict(values[12:])
    np.testing.assert_allclose(rest.predictions, stateless(client, values)["predictions"][12:], atol=1e-5)
    resumed = api.session(session_id, resume=True)
    assert resumed.position == 20


def test_lost_session_raises_not_found_instead_of_restarting(api: Client, client: httpx.Client) -> None:
    session = Session(api, new_id("client"), position=30)  # as if its state had expired
    with pytest.raises(SessionNotFound) as caught:
        session.predict(series(5))
    assert caught.value.status == 404 and caught.value.problem["position"] == 0
    assert client.get(f"/v1/sessions/{session.id}").status_code == 404
    assert api.session(session.id, resume=True).position == 0


def test_reset_and_delete(api: Client, client: httpx.Client) -> None:
    session = api.session(new_id("client"))
    session.predict(series(7))
    session.reset()
    assert session.position == 0 == position(client, session.id)
    assert session.predict(series(3)).position == 3
    session.delete()
    session.delete()  # already gone: still fine
    assert client.get(f"/v1/sessions/{session.id}").status_code == 404


def test_a_conditional_delete_deletes_only_the_session_at_its_tag(proxy: DroppingProxy,
                                                                   client: httpx.Client) -> None:
    """``delete(if_match=...)``: a stale ETag is PreconditionFailed and the session stays; the current one
    deletes it, also when its answer is lost and the resend finds no session (412: no session has a tag)."""
    with Client(proxy.url, retry=FAST) as api:
        session = api.session(new_id("client"))
        session.predict(series(5))
        stale = session.export_state()
        session.predict(series(2))
        with pytest.raises(PreconditionFailed):
            session.delete(if_match=stale.etag)
        assert session.position == 7 == position(client, session.id)
        session.delete(if_match=session.export_state().etag)
        assert session.position == 0 and client.get(f"/v1/sessions/{session.id}").status_code == 404

        lost = api.session(new_id("client"))
        lost.predict(series(3))
        proxy.arm()
        lost.delete(if_match=lost.export_state().etag)
        assert proxy.dropped == 1 and api.stats.retries == 1
        assert client.get(f"/v1/sessions/{lost.id}").status_code == 404


def test_async_conditional_delete_deletes_only_the_session_at_its_tag(server: Server, client: httpx.Client) -> None:
    async def run(session_id: str) -> None:
        async with AsyncClient(server.url, retry=FAST) as api:
            session = await api.session(session_id)
            await session.predict(series(4))
            stale = await session.export_state()
            await session.predict(series(1))
            with pytest.raises(PreconditionFailed):
                await session.delete(if_match=stale.etag)
            assert position(client, session_id) == 5
            await session.delete(if_match=(await session.export_state()).etag)

    session_id = new_id("client")
    asyncio.run(run(session_id))
    assert client.get(f"/v1/sessions/{session_id}").status_code == 404


def test_refusals_raise_with_the_problem_details(api: Client) -> None:
    with pytest.raises(ServiceError) as caught:
        api.session(new_id("client")).predict([[0.1, 0.2]])  # the model takes one feature
    assert caught.value.status == 422 and caught.value.kind == "invalid-request"
    assert caught.value.problem["errors"] and "features" in caught.value.detail
    with pytest.raises(ValueError, match="breaks the rule"):
        api.session("no spaces allowed")
    with pytest.raises(ValueError, match="empty"):
        api.predict([])


def test_stateless_predict(api: Client, client: httpx.Client) -> None:
    values = series(9, seed=25)
    answer = api.predict(values, horizon=2)
    assert answer.position is None and answer.forecast is not None and len(answer.forecast) == 2
    np.testing.assert_allclose(answer.predictions, stateless(client, values)["predictions"], atol=1e-5)
    assert api.model()["version"] == answer.model_version


# -- retry policy, without a server ---------------------------------------------------------------------


def _scripted(statuses: list[int], seen: list[dict[str, object]]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append({"body": json.loads(request.content), "auth": request.headers.get("authorization")})
        status = statuses[len(seen) - 1]
        if status != 200:
            return httpx.Response(status, headers={"Retry-After": "0"}, json={
                "type": "https://gru-service.dev/problems/timeout", "title": "Service unavailable",
                "status": status, "detail": "not computed in time; retry with the same offset"})
        return httpx.Response(200, json={"session_id": "s", "position": 5, "predictions": [[0.0]] * 2,
                                         "model_version": "v", "created": False})
    return httpx.MockTransport(handle)


def test_5xx_and_429_are_retried_with_the_same_offset() -> None:
    seen: list[dict[str, object]] = []
    transport = _scripted([503, 429, 502, 200], seen)
    with Client("http://service", api_key="k" * 20, retry=FAST, transport=transport) as api:
        session = Session(api, "s", position=3)
        answer = session.predict([0.1, 0.2])
    assert [s["body"] for s in seen] == [{"values": [0.1, 0.2], "offset": 3, "horizon": 0}] * 4
    assert all(s["auth"] == "Bearer " + "k" * 20 for s in seen)
    assert api.stats.retries == 3 and answer.position == session.position == 5


def test_gives_up_with_the_last_problem() -> None:
    seen: list[dict[str, object]] = []
    with Client("http://service", retry=FAST, transport=_scripted([503] * 4, seen)) as api, \
            pytest.raises(Unavailable) as caught:
        Session(api, "s").predict([0.1])
    assert len(seen) == FAST.attempts and caught.value.status == 503
    assert "gave up after 4 attempts" in str(caught.value) and caught.value.kind == "timeout"


def test_model_change_is_a_conflict_of_its_own() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(409, json={"type": "https://gru-service.dev/problems/model-changed",
                                         "title": "Conflict", "status": 409, "detail": "reset to continue",
                                         "position": 7})
    with Client("http://service", transport=httpx.MockTransport(handle)) as api, \
            pytest.raises(ModelChanged) as caught:
        Session(api, "s").predict([0.1])
    assert caught.value.position == 7 and isinstance(caught.value, OffsetConflict)


# -- the command line --------------------------------------------------------------------------------


def _write_csv(path: Path, values: np.ndarray) -> None:
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["time", "x"])
        for step, (value,) in enumerate(values.tolist()):
            writer.writerow([f"2024-01-01T00:{step // 60:02d}:{step % 60:02d}", value])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.client", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def test_cli_streams_a_csv_writes_predictions_and_a_plot(server: Server, client: httpx.Client,
                                                         tmp_path: Path) -> None:
    values = series(40, seed=26)
    source, out, picture = tmp_path / "series.csv", tmp_path / "out.csv", tmp_path / "out.png"
    _write_csv(source, values)
    session = new_id("cli")
    done = _cli("stream", "--csv", str(source), "--session", session, "--chunk", "9", "--url", server.url,
                "--out", str(out), "--plot", str(picture))
    assert done.returncode == 0, done.stderr
    assert f"40 steps from position 0 -> 40; predictions in {out}" in done.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 41 and rows[0]["predicted_x"] == "" and rows[-1]["x"] == ""
    np.testing.assert_allclose([float(r["x"]) for r in rows[:-1]], values[:, 0], atol=1e-6)
    predicted = [float(r["predicted_x"]) for r in rows[1:]]  # row t holds the prediction for step t
    np.testing.assert_allclose(predicted, np.ravel(stateless(client, values)["predictions"]), atol=1e-5)
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert position(client, session) == 40

    again = _cli("stream", "--csv", str(source), "--session", session, "--url", server.url, "--out", str(out))
    assert again.returncode == 1 and "--resume" in again.stderr and "at 40" in again.stderr

    with source.open("a") as file:  # the series grew: --resume sends only the new rows
        file.write("2024-01-01T01:00:00,0.5\n2024-01-01T01:00:01,0.6\n")
    resumed = _cli("stream", "--csv", str(source), "--session", session, "--url", server.url,
                   "--out", str(out), "--resume", "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert "2 steps from position 40 -> 42" in resumed.stderr
    extended = list(csv.DictReader(out.open()))  # the file of the first run, continued
    assert [r["step"] for r in extended] == [str(step) for step in range(43)]
    assert extended[40]["x"] == "0.5" and extended[40]["predicted_x"] == rows[40]["predicted_x"]


def test_cli_explains_a_csv_it_cannot_use(server: Server, tmp_path: Path) -> None:
    source = tmp_path / "two.csv"
    source.write_text("a,b\n1,2\n3,4\n")
    done = _cli("stream", "--csv", str(source), "--session", new_id("cli"), "--url", server.url)
    assert done.returncode != 0 and "--columns" in done.stderr
    picked = _cli("stream", "--csv", str(source), "--session", new_id("cli"), "--url", server.url,
                  "--columns", "b", "--quiet", "--out", str(tmp_path / "b.csv"))
    assert picked.returncode == 0, picked.stderr
    assert (tmp_path / "b.csv").read_text().splitlines()[0] == "step,b,predicted_b"


def _read(path: Path) -> tuple[list[str], list[list[float]]]:
    """``read_csv`` for a one-feature model ("temp"), its rows as lists."""
    names, rows = read_csv(path, ["temp"], None)
    return names, rows.tolist()


def test_csv_rows_are_read_in_place_or_refused_by_line(tmp_path: Path) -> None:
    """A row skipped or taken for a header would shift every later step against the file's time axis."""
    path = tmp_path / "s.csv"
    path.write_text("2020-01-01,52.0\n2020-01-02,52.5\n\n\n")  # no header; blank lines at the end only
    assert _read(path) == (["column1"], [[52.0], [52.5]])
    path.write_text("date,1001\n2020-01-01,5\n2020-01-02,6\n")  # a header whose column name is a number
    assert _read(path) == (["1001"], [[5.0], [6.0]])
    path.write_text("\ufefftemp\n1.5\n", encoding="utf-8")  # a spreadsheet's byte-order mark
    assert _read(path) == (["temp"], [[1.5]])
    path.write_text("time,temp\n1,52.0\n\n3,53.0\n")
    with pytest.raises(SystemExit, match=r"s\.csv:3: empty row"):
        read_csv(path, ["temp"], None)
    for bad in ("nan", "inf", "-Infinity", "x"):
        path.write_text(f"temp\n1.0\n{bad}\n")
        with pytest.raises(SystemExit, match=r"s\.csv:3: not a finite number in column\(s\) temp"):
            read_csv(path, ["temp"], None)


def test_cli_refuses_a_value_past_float32_by_its_line_before_sending(server: Server, client: httpx.Client,
                                                                     tmp_path: Path) -> None:
    """The service refuses such a chunk with a 422 that names no row; the CLI names the line, and sends
    nothing rather than stop the session midway through the file."""
    source = tmp_path / "series.csv"
    source.write_text("temp\n" + "0.5\n" * 40 + "1e39\n" + "0.5\n" * 5)
    session = new_id("cli")
    done = _cli("stream", "--csv", str(source), "--session", session, "--chunk", "8", "--url", server.url,
                "--quiet", "--out", str(tmp_path / "out.csv"))
    assert done.returncode == 1, done.stderr
    assert f"{source}:42: a number past float32's range (|x| > 3.4e38) in column(s) temp" in done.stderr, done.stderr
    assert _position_or_zero(client, session) == 0
    source.write_text("temp\n3.4028235e38\n-3.4028235e38\n")  # float32's largest: taken
    assert read_csv(source, ["temp"], None)[1].tolist() == [[3.4028235e38], [-3.4028235e38]]


def test_cli_keeps_the_answers_it_got_before_a_refusal(server: Server, client: httpx.Client,
                                                        tmp_path: Path) -> None:
    values = series(20, seed=27)
    values[12, 0] = 3e38  # float32, but beyond what the model can answer: the third chunk is refused
    source, out = tmp_path / "series.csv", tmp_path / "out.csv"
    _write_csv(source, values)
    session = new_id("cli")
    done = _cli("stream", "--csv", str(source), "--session", session, "--chunk", "5", "--url", server.url,
                "--out", str(out), "--quiet")
    assert done.returncode == 1 and "not finite numbers" in done.stderr, done.stderr
    assert f"steps 0 to 9 and their predictions are in {out}" in done.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["step"] for r in rows] == [str(step) for step in range(11)]
    assert position(client, session) == 10


def _steps(out: Path) -> list[str]:
    return [row["step"] for row in csv.DictReader(out.open())]


def _position_or_zero(client: httpx.Client, session: str) -> int:
    answer = client.get(f"/v1/sessions/{session}")
    return int(answer.json()["position"]) if answer.status_code == 200 else 0


def _resume_completes(server: Server, client: httpx.Client, source: Path, out: Path, session: str,
                      values: np.ndarray, chunk: int = 5) -> None:
    """`--resume` ends with one file: every step of ``values``, each prediction as one stateless pass's."""
    resumed = _cli("stream", "--csv", str(source), "--session", session, "--chunk", str(chunk), "--url",
                   server.url, "--out", str(out), "--quiet", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _steps(out) == [str(step) for step in range(len(values) + 1)]
    predicted = [float(row["predicted_x"]) for row in list(csv.DictReader(out.open()))[1:]]
    np.testing.assert_allclose(predicted, np.ravel(stateless(client, values)["predictions"]), atol=1e-5)


def _file_behind_the_session(server: Server, client: httpx.Client, tmp_path: Path, values: np.ndarray,
                             lost: int) -> tuple[Path, Path, str]:
    """A CLI run over the first 10 rows, then ``lost`` chunks of 5 applied whose answers its file never got
    (a stream cut off with a chunk in flight leaves one), and the CSV grown to every row of ``values``."""
    source, out = tmp_path / "series.csv", tmp_path / "out.csv"
    _write_csv(source, values[:10])
    session = new_id("cli")
    first = _cli("stream", "--csv", str(source), "--session", session, "--chunk", "5", "--url", server.url,
                 "--out", str(out), "--quiet")
    assert first.returncode == 0, first.stderr
    for offset in range(10, 10 + 5 * lost, 5):
        chunk = {"values": values[offset:offset + 5].tolist(), "offset": offset}
        assert client.post(f"/v1/sessions/{session}/predict", json=chunk).status_code == 200
    _write_csv(source, values)
    return source, out, session


def test_cli_resume_recovers_the_answer_of_the_chunk_in_flight_when_interrupted(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    """Interrupted while a chunk was in flight, a stream leaves a file one chunk short of the session (the
    service applied the chunk; its answer was never read). --resume used to rewrite the file from the
    session's position, losing every earlier row; it now asks for that chunk's answer again (an exact
    retry) and leaves one file, every step in it."""
    values = series(20, seed=28)
    source, out, session = _file_behind_the_session(server, client, tmp_path, values, lost=1)
    _resume_completes(server, client, source, out, session, values)
    assert position(client, session) == 20


def test_cli_resume_refuses_to_overwrite_a_file_it_cannot_complete(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    """Two chunks applied past the file's end: only the last one's answer can be asked for again."""
    source, out, session = _file_behind_the_session(server, client, tmp_path, series(20, seed=29), lost=2)
    before = out.read_bytes()
    refused = _cli("stream", "--csv", str(source), "--session", session, "--url", server.url, "--out", str(out),
                   "--quiet", "--resume")
    assert refused.returncode == 1
    assert f"{out} ends at step 10 but session {session} is at 20" in refused.stderr
    assert out.read_bytes() == before
    assert position(client, session) == 20


@pytest.mark.parametrize(("stop", "transport"), [
    (signal.SIGINT, "http"), (signal.SIGTERM, "http"), (signal.SIGKILL, "http"), (signal.SIGINT, "ws"),
    (signal.SIGTERM, "ws")], ids=["Ctrl-C", "SIGTERM", "SIGKILL", "Ctrl-C-ws", "SIGTERM-ws"])
def test_cli_stopped_in_any_way_leaves_a_file_that_resumes(
    server: Server, client: httpx.Client, tmp_path: Path, stop: signal.Signals, transport: str
) -> None:
    """SIGTERM (docker stop, systemd) used to end the client without saving, and SIGKILL (the OOM killer)
    still did when the file was written only at the end: it stayed where the run before left it, more than
    a chunk behind the session, and could not be resumed. Ctrl-C and SIGTERM also end without a traceback.
    Over the WebSocket a stop ended with up to a window of chunks applied past the file's end, which
    --resume could not complete: the chunks already sent are now answered and written first."""
    values = series(3000, seed=30)
    source, out = tmp_path / "series.csv", tmp_path / "out.csv"
    _write_csv(source, values)
    session = new_id("cli")
    argv = [sys.executable, "-m", "service.client", "stream", "--csv", str(source), "--session", session,
            "--chunk", "1", "--url", server.url, "--out", str(out), "--quiet", "--transport", transport]
    # A test run started in the background of a shell without job control ignores SIGINT, and a child
    # inherits an ignored signal: handled here for the moment of the start, the child gets the default.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        running = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, inherited)
    deadline = time.monotonic() + 30
    while _position_or_zero(client, session) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    running.send_signal(stop)
    _, stderr = running.communicate(timeout=30)
    if stop == signal.SIGKILL:
        assert running.returncode == -stop
        assert 20 <= len(_steps(out)) <= position(client, session) + 1  # written as it went
    else:
        assert running.returncode == 128 + stop, stderr
        assert "Traceback" not in stderr and "--resume goes on from there" in stderr
    _resume_completes(server, client, source, out, session, values, chunk=500)


def test_predictions_file_interrupted_mid_write_keeps_the_old_one(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """With --resume the file holds earlier runs' rows; a second Ctrl-C while it was rewritten in place
    truncated it."""
    out = tmp_path / "out.csv"
    truth = [[float(i)] for i in range(105)]
    first = PredictionsFile(out, ["x"], truth[:100], 0)
    first.append([[0.5]] * 100)
    first.close()
    before = out.read_bytes()
    real_writer = csv.writer

    class Interrupted:
        """A writer stopped by Ctrl-C at its 50th row: the earlier rows are copied one at a time."""

        def __init__(self, file: object) -> None:
            self.rows = real_writer(file)  # type: ignore[arg-type]
            self.written = 0

        def writerow(self, row: list[object]) -> None:
            self.written += 1
            if self.written == 50:
                raise KeyboardInterrupt
            self.rows.writerow(row)

    monkeypatch.setattr(csv, "writer", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        PredictionsFile(out, ["x"], truth, 100, _earlier_end(out, ["x"], truth) == 100).append([[0.5]] * 5)
    assert out.read_bytes() == before
    assert [path.name for path in tmp_path.iterdir()] == ["out.csv"]


def test_a_row_cut_short_is_no_row(tmp_path: Path) -> None:
    """A crash mid-append can leave a last line without its end; --resume must not read 0.12 for 0.1234."""
    out = tmp_path / "out.csv"
    whole = PredictionsFile(out, ["x"], [[1.0], [2.0], [3.0]], 0)
    whole.append([[0.1234], [0.5678]])
    whole.close()
    with out.open("a") as file:
        file.write("3,3.0,0.12")
    assert _earlier_end(out, ["x"], [[1.0], [2.0], [3.0]]) == 2


def test_a_session_streams_a_deque_and_an_iterator(server: Server, client: httpx.Client) -> None:
    """Values are sliced a chunk at a time where they can be; a deque (a Sequence that cannot be sliced) was
    refused with a TypeError once slicing came in."""
    values = series(12, seed=4)[:, 0].tolist()
    with Client(server.url, retry=FAST) as api:
        for given in (deque(values), iter(values)):
            answers = list(api.session(new_id("client")).stream(given, chunk=5))
            assert [answer.position for answer in answers] == [5, 10, 12]


def test_retry_after_is_honoured_up_to_max_delay() -> None:
    retry = Retry(attempts=3, backoff=0.01, max_delay=2.0)
    assert retry.delay(0, httpx.Response(429, headers={"Retry-After": "1.5"})) == 1.5
    assert retry.delay(0, httpx.Response(503, headers={"Retry-After": "60"})) == 2.0
    assert retry.delay(30, None) == 2.0  # backoff doubling is capped too


def test_retry_after_as_an_http_date_is_honoured_too() -> None:
    """RFC 9110 lets Retry-After be a date (proxies in front of the service send one): it is waited for, not
    taken for garbage and retried at once."""
    retry = Retry(attempts=3, backoff=0.001, max_delay=30.0)
    in_ten = email.utils.format_datetime(datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=10),
                                         usegmt=True)
    assert 8.0 <= retry.delay(0, httpx.Response(503, headers={"Retry-After": in_ten})) <= 10.0
    gone = "Thu, 01 Jan 1970 00:00:00 GMT"  # past, a negative count or garbage: the backoff
    for past in (gone, "-3", "soon", "nan"):
        assert retry.delay(0, httpx.Response(429, headers={"Retry-After": past})) <= 0.001


def test_async_reset_moves_the_handle_to_zero(server: Server, client: httpx.Client) -> None:
    async def run() -> int | None:
        async with AsyncClient(server.url, retry=FAST) as api:
            session = await api.session(new_id("client"))
            await session.predict(series(7))
            await session.reset()
            assert session.position == 0
            return (await session.predict(series(3))).position
    assert asyncio.run(run()) == 3


@pytest.mark.parametrize("transport", ["http", "ws"])
def test_cli_without_resume_leaves_a_session_that_is_not_at_zero_as_it_is(
    server: Server, client: httpx.Client, tmp_path: Path, transport: str
) -> None:
    """A plain run starts at step 0; a session elsewhere is refused (409, exit 1) and needs --resume or
    --reset. Over the WebSocket the CLI used to start where the service had the session, and wrote the CSV
    on top of its 10 steps; a window of chunks sent at once would also have had the one whose offset met
    the session applied, so a stream sends its first chunk alone until an answer confirms where it is."""
    session = new_id("cli")
    send(client, session, series(10, seed=1), offset=0)
    source, out = tmp_path / "series.csv", tmp_path / "out.csv"
    _write_csv(source, series(20, seed=2))
    done = _cli("stream", "--csv", str(source), "--session", session, "--url", server.url, "--out", str(out),
                "--quiet", "--chunk", "5", "--transport", transport)
    assert position(client, session) == 10
    assert done.returncode == 1 and "--resume" in done.stderr, done.stderr


@pytest.mark.parametrize("transport", ["http", "ws"])
def test_cli_resume_with_nothing_left_to_send_succeeds(
    server: Server, client: httpx.Client, tmp_path: Path, transport: str
) -> None:
    """Over the WebSocket an empty rest of the CSV was sent as a stream of no values: refused, exit 1."""
    session = new_id("cli")
    source, out = tmp_path / "series.csv", tmp_path / "out.csv"
    _write_csv(source, series(10, seed=3))
    first = _cli("stream", "--csv", str(source), "--session", session, "--url", server.url, "--out", str(out),
                 "--quiet", "--chunk", "5")
    assert first.returncode == 0, first.stderr
    again = _cli("stream", "--csv", str(source), "--session", session, "--url", server.url, "--out", str(out),
                 "--quiet", "--chunk", "5", "--resume", "--transport", transport)
    assert again.returncode == 0, again.stderr
    assert position(client, session) == 10 and _steps(out) == [str(step) for step in range(11)]


def test_resume_reads_the_earlier_predictions_a_row_at_a_time(tmp_path: Path) -> None:
    """--resume read the earlier predictions file whole (every cell a str in a list per row) and copied it
    again: memory grew with the series. It is now read and copied a row at a time."""
    steps = 200_000
    truth = Rows(array("d", range(steps)), 1)
    out = tmp_path / "out.csv"
    whole = PredictionsFile(out, ["x"], truth, 0)
    whole.append([[0.123456789]] * (steps - 1))
    whole.close()
    before = out.read_bytes()
    tracemalloc.start()
    try:
        end = _earlier_end(out, ["x"], truth)
        resumed = PredictionsFile(out, ["x"], truth, steps - 1, end == steps - 1)
        resumed.open()
        resumed.close()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.read_bytes() == before  # the same rows, copied
    assert peak < 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_cli_reset_starts_the_session_again(server: Server, client: httpx.Client, tmp_path: Path) -> None:
    source, out, session = tmp_path / "s.csv", tmp_path / "out.csv", new_id("cli")
    _write_csv(source, series(12, seed=40))
    assert _cli("stream", "--csv", str(source), "--session", session, "--url", server.url, "--out", str(out),
                "--quiet").returncode == 0
    again = _cli("stream", "--csv", str(source), "--session", session, "--url", server.url, "--out", str(out),
                 "--quiet", "--reset", "--chunk", "5")  # not an exact retry of the first run's chunk
    assert again.returncode == 0, again.stderr
    assert "12 steps from position 0 -> 12" in again.stderr and position(client, session) == 12


def test_cli_resume_refuses_a_csv_shorter_than_the_session(server: Server, client: httpx.Client,
                                                           tmp_path: Path) -> None:
    source, out, session = tmp_path / "s.csv", tmp_path / "out.csv", new_id("cli")
    _write_csv(source, series(12, seed=41))
    assert _cli("stream", "--csv", str(source), "--session", session, "--url", server.url, "--out", str(out),
                "--quiet").returncode == 0
    _write_csv(source, series(8, seed=41))
    before = out.read_bytes()
    shorter = _cli("stream", "--csv", str(source), "--session", session, "--url", server.url, "--out", str(out),
                   "--quiet", "--resume")
    assert shorter.returncode == 1 and "past the 8 rows" in shorter.stderr
    assert out.read_bytes() == before


def test_cli_resumed_run_refused_midway_keeps_the_earlier_rows(server: Server, client: httpx.Client,
                                                               tmp_path: Path) -> None:
    values = series(25, seed=42)
    values[17, 0] = 3e38  # the resumed run's second chunk is refused
    source, out, session = tmp_path / "s.csv", tmp_path / "out.csv", new_id("cli")
    _write_csv(source, values[:10])
    assert _cli("stream", "--csv", str(source), "--session", session, "--chunk", "5", "--url", server.url,
                "--out", str(out), "--quiet").returncode == 0
    _write_csv(source, values)
    resumed = _cli("stream", "--csv", str(source), "--session", session, "--chunk", "5", "--url", server.url,
                   "--out", str(out), "--quiet", "--resume")
    assert resumed.returncode == 1 and "steps 10 to 14" in resumed.stderr
    assert _steps(out) == [str(step) for step in range(16)] and position(client, session) == 15


def test_cli_resume_does_not_extend_a_file_of_other_columns(server: Server, tmp_path: Path) -> None:
    source, out, session = tmp_path / "s.csv", tmp_path / "out.csv", new_id("cli")
    _write_csv(source, series(10, seed=43))
    assert _cli("stream", "--csv", str(source), "--session", session, "--url", server.url, "--out", str(out),
                "--quiet").returncode == 0
    rows = list(csv.reader(out.open()))
    rows[0] = ["step", "y", "predicted_y"]  # another run's file, of another column
    with out.open("w", newline="") as file:
        csv.writer(file).writerows(rows)
    _write_csv(source, series(14, seed=43))
    resumed = _cli("stream", "--csv", str(source), "--session", session, "--url", server.url, "--out", str(out),
                   "--quiet", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert next(iter(csv.reader(out.open()))) == ["step", "x", "predicted_x"]
    assert _steps(out) == [str(step) for step in range(10, 15)]  # a new file, not y's rows under x's header


def test_rows_index_and_slice_as_the_lists_they_hold() -> None:
    """The CLI's rows are one flat array: every index and slice (views, and slices of them) reads as the
    same on a list of lists."""
    table = [[float(i), float(-i)] for i in range(7)]
    rows = Rows(array("d", [v for row in table for v in row]), 2)
    bounds = [None, *range(-9, 10)]
    for start in bounds:
        for stop in bounds:
            view, expected = rows[start:stop], table[start:stop]
            assert view.tolist() == expected and len(view) == len(expected)
            assert [view[i] for i in range(-len(view), len(view))] == expected + expected
            assert view[1:-1].tolist() == expected[1:-1]
    for outside in (7, -8):
        with pytest.raises(IndexError):
            rows[outside]
    with pytest.raises(ValueError, match="step 1"):
        rows[::2]


def test_model_feature_picked_by_name_among_other_numeric_columns(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("pressure,temp\n1.0,52.0\n2.0,52.5\n")
    assert _read(path) == (["temp"], [[52.0], [52.5]])


def test_cli_killed_before_its_first_answer_leaves_a_file_resume_completes(
    server: Server, client: httpx.Client, proxy: DroppingProxy, tmp_path: Path
) -> None:
    """The file used to be written at the first answer: killed while the first chunk was in flight (applied,
    never answered), a stream left no file, or an older run's, and --resume started the file at the
    session's position, the first chunk's rows lost. The head of the file is now written before anything
    is sent."""
    values = series(20, seed=44)
    source, out, session = tmp_path / "s.csv", tmp_path / "out.csv", new_id("cli")
    _write_csv(source, values)
    out.write_text("step,x,predicted_x\n0,9.0,\n1,9.0,0.5\n")  # an older run's file, of another series
    proxy.arm(1000)  # every answer lost: the client retries the first chunk until it is killed
    argv = [sys.executable, "-m", "service.client", "stream", "--csv", str(source), "--session", session,
            "--chunk", "5", "--url", proxy.url, "--out", str(out), "--quiet"]
    running = subprocess.Popen(argv, cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while (_position_or_zero(client, session) < 5 or proxy.dropped < 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    running.kill()
    running.wait(30)
    assert _steps(out) == ["0"] and position(client, session) == 5
    _resume_completes(server, client, source, out, session, values)


def test_cli_resume_recovers_a_chunk_whose_rows_were_cut_short(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    """An append cut short (a kill in the middle of a long write) leaves the file ending inside the chunk in
    flight; retrying from the file's end is no exact retry, so --resume retries from where the session's
    last chunk began."""
    values = series(20, seed=45)
    source, out, session = _file_behind_the_session(server, client, tmp_path, values, lost=1)
    with out.open("a", newline="") as file:  # the lost chunk's first two rows reached the file
        csv.writer(file).writerows([[step, values[step, 0].item(), 0.5] for step in (11, 12)])
    _resume_completes(server, client, source, out, session, values)


def test_cli_resume_recovers_the_series_last_short_chunk_whose_rows_were_cut_short(
    server: Server, client: httpx.Client, tmp_path: Path
) -> None:
    """The series' last chunk is shorter than --chunk: cut short in its append, it began neither at the
    file's end nor one --chunk before the session, and --resume refused a file it can complete."""
    values = series(13, seed=46)
    source, out, session = _file_behind_the_session(server, client, tmp_path, values, lost=0)
    chunk = {"values": values[10:].tolist(), "offset": 10}  # the last 3 steps, sent as one chunk of 3
    assert client.post(f"/v1/sessions/{session}/predict", json=chunk).status_code == 200
    with out.open("a", newline="") as file:  # the first of its rows reached the file
        csv.writer(file).writerow([11, values[11, 0].item(), 0.5])
    _resume_completes(server, client, source, out, session, values)


def test_cli_resume_does_not_extend_a_file_of_another_series(server: Server, client: httpx.Client,
                                                             tmp_path: Path) -> None:
    """--out naming another series' predictions (same columns): its rows are not kept under this series."""
    first, second = series(10, seed=46), series(14, seed=47)
    source, out = tmp_path / "s.csv", tmp_path / "out.csv"
    _write_csv(source, first)
    assert _cli("stream", "--csv", str(source), "--session", new_id("cli"), "--url", server.url, "--out",
                str(out), "--quiet").returncode == 0
    session = new_id("cli")
    assert client.post(f"/v1/sessions/{session}/predict", json={"values": second[:10].tolist()}).status_code == 200
    _write_csv(source, second)
    resumed = _cli("stream", "--csv", str(source), "--session", session, "--url", server.url, "--out", str(out),
                   "--quiet", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert _steps(out) == [str(step) for step in range(10, 15)]



@pytest.mark.parametrize("missing", ["httpx", "matplotlib"])
def test_the_cli_without_the_client_extra_names_the_install_command_in_one_line(
    tmp_path: Path, missing: str
) -> None:
    """Without httpx (the CLI cannot start) or matplotlib (asked for --plot): one line, exit 2, no traceback."""
    hidden = tmp_path / "hidden" / missing
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text(f'raise ModuleNotFoundError("No module named {missing}", name="{missing}")\n')
    source = tmp_path / "series.csv"
    source.write_text("x\n0.5\n0.6\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden.parent), str(ROOT)])}
    done = subprocess.run([sys.executable, "-m", "service.client", "stream", "--csv", str(source), "--session", "s",
                           "--url", "http://127.0.0.1:1", "--plot", str(tmp_path / "p.png")],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "pip install 'gru-service[client]'" in done.stderr and missing in done.stderr


def _other_session(request: httpx.Request) -> httpx.Response:
    """A proxy or load balancer answering with another session's answer, well formed otherwise."""
    return httpx.Response(200, json={"session_id": "someone-else", "position": 1, "predictions": [[0.0]],
                                     "model_version": "v", "created": True})


def test_an_answer_for_another_session_is_not_taken_as_success_sync() -> None:
    """Neither the sync nor the async client compared an answer's session id with the handle's."""
    with Client("http://service", retry=FAST, transport=httpx.MockTransport(_other_session)) as api:
        session = Session(api, "mine")
        with pytest.raises(BadAnswer):
            session.predict([0.1])
        assert session.position == 0


def test_an_answer_for_another_session_is_not_taken_as_success_async() -> None:
    async def run() -> None:
        async with AsyncClient("http://service", retry=FAST, transport=httpx.MockTransport(_other_session)) as api:
            session = AsyncSession(api, "mine")
            with pytest.raises(BadAnswer):
                await session.predict([0.1])
            assert session.position == 0
    asyncio.run(run())


def test_a_description_of_another_session_is_not_adopted() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"session_id": "someone-else", "position": 40, "model_version": "v"})
    with Client("http://service", retry=FAST, transport=httpx.MockTransport(handle)) as api:
        session = Session(api, "mine")
        with pytest.raises(BadAnswer):
            session.resync()
        assert session.position == 0


def test_many_attempts_give_up_with_unavailable_not_overflow() -> None:
    """Retrying for a long time: past 1024 attempts ``backoff * 2**attempt`` overflowed a float."""
    calls = 0

    def handle(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(503, json={"status": 503, "detail": "busy"})
    retry = Retry(attempts=1100, backoff=0.0, max_delay=0.0)
    with Client("http://service", retry=retry, transport=httpx.MockTransport(handle)) as api, \
            pytest.raises(Unavailable):
        Session(api, "s").predict([0.1])


def test_a_negative_chunk_size_is_refused_not_a_stream_that_sends_nothing() -> None:
    """``range(0, n, -1)`` is empty: the series was silently not sent."""
    sent: list[bytes] = []

    def handle(request: httpx.Request) -> httpx.Response:
        sent.append(request.content)
        return httpx.Response(200, json={"session_id": "s", "position": 3, "predictions": [[0.0]] * 3,
                                         "model_version": "v"})
    with Client("http://service", retry=FAST, transport=httpx.MockTransport(handle)) as api, \
            pytest.raises(ValueError):
        list(Session(api, "s").stream([0.1, 0.2, 0.3], chunk=-1))
    assert sent == []
