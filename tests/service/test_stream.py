"""The WebSocket stream (/v1/sessions/{id}/stream) against a real server and a real client (``websockets``).

Frames are predict bodies answered in order with exactly what the HTTP route answers; a client pipelines,
reconnects and resends from its last acknowledged offset; refusals are problem frames on a stream that stays
usable; the window bounds what the server holds; SIGTERM answers what was read and closes with 1001.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import struct
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from harness.processes import RedisServer
from tests.conftest import WIDE_FEATURES, Server, ServerFactory
from tests.service.helpers import access_line, new_id, send, series, stateless
from tests.service.test_model_lifecycle import add_version, polled_repository, versions, wait_for

KEYS = "stream-key-acme-0123456789:acme,stream-key-other-012345678:other"


def _ws_url(server: Server, session: str) -> str:
    return server.url.replace("http://", "ws://") + f"/v1/sessions/{session}/stream"


def _open(server: Server, session: str, **options: Any) -> ClientConnection:
    return connect(_ws_url(server, session), open_timeout=30, **options)


def _frame(values: np.ndarray, offset: int | None = None, horizon: int = 0) -> str:
    body: dict[str, Any] = {"values": values.tolist(), "horizon": horizon}
    if offset is not None:
        body["offset"] = offset
    return json.dumps(body)


def _answer(ws: ClientConnection) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(ws.recv(timeout=60))
    return answer


def _metrics(server: Server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


def _chunks(values: np.ndarray, sizes: list[int]) -> list[tuple[int, np.ndarray]]:
    """(offset, chunk) pairs cutting ``values`` into ``sizes``."""
    cut, start = [], 0
    for size in sizes:
        cut.append((start, values[start : start + size]))
        start += size
    return cut


def test_a_stream_answers_what_http_answers_and_matches_a_stateless_pass(server: Server,
                                                                           client: httpx.Client) -> None:
    values = series(60, seed=3)
    chunks = _chunks(values, [7, 1, 12, 20, 20])
    streamed, posted = new_id("ws"), new_id("http")
    with _open(server, streamed) as ws:
        for offset, chunk in chunks:
            ws.send(_frame(chunk, offset, horizon=3))
        answers = [_answer(ws) for _ in chunks]
    for (offset, chunk), answer in zip(chunks, answers, strict=True):
        http = client.post(f"/v1/sessions/{posted}/predict",
                           json={"values": chunk.tolist(), "offset": offset, "horizon": 3}).json()
        assert set(answer) == set(http)
        assert answer["position"] == http["position"] == offset + len(chunk)
        assert answer["created"] == http["created"] == (offset == 0)
        assert answer["session_id"] == streamed and answer["model_version"] == http["model_version"]
        np.testing.assert_allclose(answer["predictions"], http["predictions"], atol=1e-6)
        np.testing.assert_allclose(answer["forecast"], http["forecast"], atol=1e-6)
    got = np.concatenate([np.array(a["predictions"]) for a in answers])
    np.testing.assert_allclose(got, stateless(client, values)["predictions"], atol=1e-5)


def test_500_pipelined_chunks_are_answered_in_order_with_exact_positions(server: Server,
                                                                          client: httpx.Client) -> None:
    values = series(1000, seed=5)
    chunks = _chunks(values, [2] * 500)
    session = new_id("pipe")
    with _open(server, session) as ws:
        sender = threading.Thread(target=lambda: [ws.send(_frame(c, o)) for o, c in chunks])
        sender.start()
        answers = [_answer(ws) for _ in chunks]
        sender.join()
    assert [a["position"] for a in answers] == [o + 2 for o, _ in chunks]
    got = np.concatenate([np.array(a["predictions"]) for a in answers])
    np.testing.assert_allclose(got, stateless(client, values[:1000])["predictions"], atol=1e-5)


@pytest.mark.parametrize("read_before_drop", range(9))
def test_reconnecting_and_resending_from_the_last_acknowledged_offset_resumes_exactly(
    server: Server, client: httpx.Client, read_before_drop: int
) -> None:
    values = series(64, seed=read_before_drop)
    chunks = _chunks(values, [8] * 8)
    session = new_id("resume")
    with _open(server, session) as ws:  # every chunk sent; the answers after the first few never read
        for offset, chunk in chunks:
            ws.send(_frame(chunk, offset))
        acknowledged = [_answer(ws) for _ in range(read_before_drop)]
    unacknowledged = chunks[read_before_drop:]
    with _open(server, session) as ws:
        for offset, chunk in unacknowledged:
            ws.send(_frame(chunk, offset))
        resent = [_answer(ws) for _ in unacknowledged]
    answered = {a["position"]: a for a in acknowledged}
    for (offset, chunk), answer in zip(unacknowledged, resent, strict=True):
        if answer.get("status") == 409:  # applied before the drop, its answer lost with the connection
            assert answer["type"].endswith("/offset-mismatch")
            assert answer["position"] >= offset + len(chunk)
        else:  # applied now, or an exact retry of the last chunk applied before the drop
            assert answer["position"] == offset + len(chunk)
            answered[answer["position"]] = answer
    assert client.get(f"/v1/sessions/{session}").json()["position"] == 64
    want = np.array(stateless(client, values)["predictions"])
    for end, answer in answered.items():
        np.testing.assert_allclose(answer["predictions"], want[end - 8 : end], atol=1e-5)


def test_a_pinned_session_streamed_as_a_new_version_arrives_applies_its_chunks_in_order(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """The first frames go to the newest version, which hands them on one by one to the version the session
    is pinned to; the frames read after that go there directly and must not overtake them (values appended
    out of order; 409s for a client that sends offsets)."""
    repository, server = polled_repository(server_factory, tmp_path)
    values = series(2 + 2 * 200, seed=6)
    chunks = _chunks(values[2:], [2] * 200)
    appended, placed = new_id("append"), new_id("offsets")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for session in (appended, placed):
            assert send(client, session, values[:2], offset=0).json()["version"] == "1"
        add_version(repository, "m", 2, seed=1)
        wait_for(lambda: "2" in versions(client, "m"))
    answers = {}
    for session, frames in ((appended, [_frame(c) for _, c in chunks]),
                            (placed, [_frame(c, 2 + o) for o, c in chunks])):
        with _open(server, session) as ws:
            sender = threading.Thread(target=lambda ws=ws, frames=frames: [ws.send(f) for f in frames])
            sender.start()
            answers[session] = [_answer(ws) for _ in frames]
            sender.join()
        assert [a.get("position") for a in answers[session]] == [4 + o for o, _ in chunks]
        assert {a["version"] for a in answers[session]} == {"1"}
    assert [a["predictions"] for a in answers[appended]] == [a["predictions"] for a in answers[placed]]


def test_refused_frames_get_problem_frames_and_the_stream_stays_usable(server: Server) -> None:
    session = new_id("bad")
    values = series(10, seed=1)
    frames = [
        "{not json",
        json.dumps({"values": []}),
        json.dumps({"values": [1.0, "x"]}),
        json.dumps({"values": [1.0], "horizon": 100_000}),
        _frame(values[:4], 0),
        _frame(values[4:6], 9),  # the session is at 4
        _frame(values[4:6], 4),
    ]
    with _open(server, session) as ws:
        for frame in frames:
            ws.send(frame)
        answers = [_answer(ws) for _ in frames]
    statuses = [a.get("status", 200) for a in answers]
    assert statuses == [400, 422, 422, 422, 200, 409, 200]
    assert answers[0]["type"].endswith("/malformed-json")
    assert answers[2]["errors"][0]["loc"][:2] == ["body", "values"]
    assert answers[5]["type"].endswith("/offset-mismatch") and answers[5]["position"] == 4
    assert answers[6]["position"] == 6
    for problem in answers[:4] + answers[5:6]:
        assert problem["title"] and problem["detail"]


def test_a_binary_frame_of_json_is_read_as_the_same_text_frame(server: Server) -> None:
    values = series(9, seed=4)
    answers = []
    for session, as_bytes in ((new_id("text"), False), (new_id("binary"), True)):
        with _open(server, session) as ws:
            for frame in (_frame(values[:5], 0), _frame(values[5:], 5), b"\xff{", _frame(values[5:], 5)):
                ws.send(frame.encode() if as_bytes and isinstance(frame, str) else frame)
            answers.append([_answer(ws) for _ in range(4)])
    text, binary = answers
    assert [a.get("status", 200) for a in binary] == [200, 200, 400, 200]  # the last an exact retry
    assert binary[2]["type"].endswith("/malformed-json")
    for a, b in zip(text[:2], binary[:2], strict=True):
        assert a["position"] == b["position"] and a["predictions"] == b["predictions"]
    assert binary[3] == binary[1]


def test_a_frame_over_the_body_limit_closes_the_stream_with_1009(server_factory: ServerFactory) -> None:
    """uvicorn's protocol closes it as the frame's length arrives (nothing of it is buffered); its access line
    said the client had closed the stream."""
    server = server_factory(GRU_MAX_BODY_BYTES="2048")
    with _open(server, new_id("big"), additional_headers={"X-Request-ID": "stream-too-big"}) as ws:
        ws.send(_frame(np.zeros(10, dtype=np.float32), 0))
        assert _answer(ws)["position"] == 10
        ws.send(json.dumps({"values": [0.125] * 1000}))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    wait_for(lambda: "stream-too-big" in server.log())
    line = access_line(server, "stream-too-big")
    assert (line["close_code"], line["closed_by"]) == (1009, "service")


def test_a_dead_peer_with_answers_buffered_for_it_is_dropped(server_factory: ServerFactory,
                                                             wide_model: Path) -> None:
    """A peer that neither reads nor answers pings, its answers filling the buffers: uvicorn's close after
    the missed pong waited for them to drain, that is for ever; the connection and its stream stayed."""
    server = server_factory(wide_model, GRU_STREAM_WINDOW="4", GRU_STREAM_PING_SECONDS="5")
    frame = _long_frame(2)
    with _raw_stream(server, new_id("dead")) as sock:
        sock.settimeout(1)
        with contextlib.suppress(TimeoutError, ConnectionError):  # the service stops reading, or drops it
            for _ in range(3000):
                sock.sendall(frame)
        wait_for(lambda: _metrics(server)["gru_streams_open{}"] == 0, seconds=20)


def test_a_stream_waiting_for_a_place_as_a_version_is_listed_is_not_refused(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """A stream waits for a place when the queue is full, never answered 429. One waiting at version 1's queue
    as version 2 was listed went to version 2 with version 1's place, which version 2's full queue refused."""
    repository, server = polled_repository(server_factory, tmp_path, GRU_MAX_QUEUE="1", GRU_MAX_BATCH_SIZE="2",
                                           GRU_MAX_BATCH_DELAY_MS="500", GRU_QUEUE_PATIENCE_SECONDS="60")
    stop = threading.Event()

    def flood() -> None:  # keeps every queue full, with callers waiting for places
        with httpx.Client(base_url=server.url, timeout=60) as client:
            while not stop.is_set():
                client.post(f"/v1/sessions/{new_id('flood')}/predict", json={"values": [0.5], "offset": 0})

    flooders = [threading.Thread(target=flood, daemon=True) for _ in range(6)]
    for flooder in flooders:
        flooder.start()
    try:
        time.sleep(1.0)
        with _open(server, new_id("waits")) as ws, httpx.Client(base_url=server.url, timeout=30) as client:
            ws.send(json.dumps({"values": [0.5], "offset": 0}))  # waits seconds for a place at version 1
            add_version(repository, "m", 2, seed=1)
            wait_for(lambda: "2" in versions(client, "m"))
            answer = _answer(ws)
    finally:
        stop.set()
        for flooder in flooders:
            flooder.join(60)
    assert answer.get("status", 200) == 200, answer


def test_an_upgrade_without_a_valid_key_is_refused_401_and_a_stream_keeps_its_tenant(
    server_factory: ServerFactory,
) -> None:
    server = server_factory(GRU_API_KEYS=KEYS)
    for headers in ({}, {"Authorization": "Bearer not-a-key-at-all-000000"}):
        with pytest.raises(InvalidStatus) as refused:
            _open(server, "shared", additional_headers=headers)
        response = refused.value.response
        assert response.status_code == 401
        assert response.headers["Content-Type"].startswith("application/problem+json")
        assert json.loads(response.body)["type"].endswith("/unauthorized")
    with _open(server, "shared", additional_headers={"X-API-Key": "stream-key-acme-0123456789"}) as ws:
        ws.send(_frame(series(5), 0))
        assert _answer(ws)["position"] == 5
    acme = httpx.get(server.url + "/v1/sessions/shared", headers={"X-API-Key": "stream-key-acme-0123456789"})
    other = httpx.get(server.url + "/v1/sessions/shared", headers={"X-API-Key": "stream-key-other-012345678"})
    assert acme.json()["position"] == 5
    assert other.status_code == 404


def test_an_accepted_stream_echoes_its_request_id_or_gets_one(server: Server) -> None:
    """The 101 carries X-Request-ID as every HTTP answer and refused upgrade does, so a stream's log lines
    can be traced to the client's."""
    with _open(server, new_id("traced"), additional_headers={"X-Request-ID": "gateway-7-stream"}) as ws:
        assert ws.response is not None and ws.response.headers["X-Request-ID"] == "gateway-7-stream"
    with _open(server, new_id("traced")) as ws:
        assert ws.response is not None and len(ws.response.headers["X-Request-ID"]) == 32


def test_a_stream_gets_one_access_line_as_it_ends(server: Server) -> None:
    """As an HTTP request's, without values: status 101, its life as the latency, its frames read and
    answered, and who closed it with what code."""
    session = new_id("logged")
    with _open(server, session, additional_headers={"X-Request-ID": "stream-log-1"}) as ws:
        for offset, chunk in _chunks(series(12, seed=7), [4, 4, 4]):
            ws.send(_frame(chunk, offset))
        for _ in range(3):
            _answer(ws)
        ws.send(b"{bad")
        _answer(ws)
    entry = access_line(server, "stream-log-1")
    assert {key: entry[key] for key in ("method", "route", "status", "session", "frames_in", "frames_out",
                                        "close_code", "closed_by")} == {
        "method": "WS", "route": "/v1/sessions/{session_id}/stream", "status": 101, "session": session,
        "frames_in": 4, "frames_out": 4, "close_code": 1000, "closed_by": "client"}
    assert entry["latency_ms"] > 0


@pytest.mark.parametrize("end", ["client-1009", "lost"])
def test_a_stream_s_access_line_says_who_closed_it_whatever_the_code(server: Server, end: str) -> None:
    """A client's own close with 1009 (an answer over its frame limit, as websockets does) was logged as the
    service's, taken for uvicorn's on the client's frame; a connection lost without a close frame as the
    client's with 1005, where the docs say null."""
    request_id = new_id(f"closed-{end}")
    with _open(server, new_id("closer"), additional_headers={"X-Request-ID": request_id}) as ws:
        ws.send(_frame(series(4), 0))
        _answer(ws)
        if end == "lost":
            ws.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            ws.close_socket()  # a reset, no close frame
        else:
            ws.close(1009, "message too big")
    line = access_line(server, request_id)
    want = (1009, "client") if end == "client-1009" else (None, None)
    assert (line["close_code"], line["closed_by"]) == want


def test_a_client_s_close_behind_a_full_window_is_logged_as_the_client_s(server_factory: ServerFactory) -> None:
    """Two frames and a close in one write, the window one frame: the close came while the service read
    nothing more, so the first answer's send found the connection closed before the reader saw the close,
    and the access line said the connection was lost (null, null), not closed by the client."""
    server = server_factory(GRU_STREAM_WINDOW="1")
    request_id = new_id("closed-behind")
    with _raw_stream(server, new_id("behind"), request_id) as sock:
        _close_behind_a_full_window(sock)
    line = access_line(server, request_id)
    assert (line["close_code"], line["closed_by"]) == (1000, "client"), line


def test_a_client_s_close_behind_a_full_window_is_the_client_s_when_sigterm_drains_it(
    server_factory: ServerFactory, redis_server: RedisServer,
) -> None:
    """As above, SIGTERM coming while the first chunk is still at work: the drain gave the stream its 1001
    before the reader saw the close, and the access line said the service closed it. The chunk waits on a
    Redis that answers nothing (SIGSTOP) until the drain began, so the window is full whatever the timing."""
    server = server_factory(GRU_STREAM_WINDOW="1", GRU_STORE="redis",
                            GRU_REDIS_URL=redis_server.url + "?socket_timeout=60")
    assert redis_server.process is not None
    request_id = new_id("closed-drained")
    with _raw_stream(server, new_id("drained"), request_id) as sock:
        redis_server.process.send_signal(signal.SIGSTOP)
        try:
            _close_behind_a_full_window(sock)
            wait_for(lambda: _metrics(server)["gru_stream_frames_total{direction=in}"] == 1)
            server.process.send_signal(signal.SIGTERM)
            wait_for(lambda: not _listening(server.port))  # the drain began: the listening socket is closed
        finally:
            redis_server.process.send_signal(signal.SIGCONT)
    assert server.process.wait(30) in (0, -signal.SIGTERM)
    line = access_line(server, request_id)
    assert (line["close_code"], line["closed_by"]) == (1000, "client"), line


def _close_behind_a_full_window(sock: socket.socket) -> None:
    """Two chunks and a close (1000) in one write, then read to the end of the connection: the service's
    close reply came, so it has taken the close, whatever its stream read."""
    close = bytes([0x88, 0x82]) + b"\0\0\0\0" + (1000).to_bytes(2, "big")  # masked with a zero key
    frame = _masked_text_frame(_frame(series(4), 0))
    sock.sendall(frame + _masked_text_frame(_frame(series(4), 4)) + close)
    with contextlib.suppress(ConnectionError):
        while sock.recv(65536):  # the service's close reply, then the end of the connection
            pass


def _listening(port: int) -> bool:
    """Whether the port takes a connection."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return False
    return True


def test_an_invalid_session_id_refuses_the_upgrade_with_422(server: Server) -> None:
    with pytest.raises(InvalidStatus) as refused:
        _open(server, "x" * 200)
    assert refused.value.response.status_code == 422


@pytest.mark.parametrize("path", ["/v1/sessions/s-1/predict", "/v1/sessions//stream", "/v1/sessions/s-1/stream/",
                                  "/nope"])
def test_an_upgrade_to_a_path_without_a_stream_is_refused_404_with_a_problem(server: Server, path: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        connect(server.url.replace("http://", "ws://") + path, open_timeout=30)
    response = refused.value.response
    assert response.status_code == 404
    assert response.headers["Content-Type"].startswith("application/problem+json")
    problem = json.loads(response.body)
    assert problem["type"].endswith("/not-found") and "/v1/sessions/{session_id}/stream" in problem["detail"]


@pytest.mark.parametrize("fields", [b"Sec-WebSocket-Version: 13\r\n",
                                    b"Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
                                    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: short\r\n"])
def test_a_malformed_upgrade_is_refused_with_a_problem_and_its_request_id(server: Server, fields: bytes) -> None:
    """websockets refuses a handshake it cannot take (no key, another version, a key that is no base64) before
    the app sees it: that answer was a text/plain 400 without X-Request-ID, where every error is a problem."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/sessions/s-1/stream HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nX-Request-ID: bad-upgrade-1\r\n" + fields + b"\r\n")
        head, _, body = _whole_answer(sock).partition(b"\r\n\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert headers[b"content-type"] == b"application/problem+json", head
    assert headers[b"x-request-id"] == b"bad-upgrade-1", head
    problem = json.loads(body)
    assert problem["status"] == 400 and problem["type"].endswith("/invalid-upgrade")
    assert "Sec-WebSocket-" in problem["detail"], problem


def _refused_upgrades(server: Server, status: str) -> float:
    """How many upgrades websockets refused before the app saw them were counted with ``status``."""
    families = text_string_to_metric_families(httpx.get(server.url + "/metrics", timeout=30).text)
    requests = next(family for family in families if family.name == "gru_requests")
    return sum(s.value for s in requests.samples if s.name == "gru_requests_total"
               and s.labels == {"route": "unmatched", "method": "WS", "status": status})


@pytest.mark.parametrize(("line", "fields", "status"), [
    (b"/v1/sessions/s-1/stream", b"Sec-WebSocket-Version: 13\r\n", 400),  # no key: refused by websockets' accept
    (b"/v1/sessions/s-1/stream", b"X-Big: " + b"a" * 9000 + b"\r\n", 431),  # a field over websockets' 8 KiB line
    (b"/v1/sessions/s-1/stream", b"".join(b"X-%d: a\r\n" % n for n in range(130)), 431),  # over its 128 fields
    (b"/v1/sessions/" + b"s" * 9000 + b"/stream", b"", 414),  # a request line over its 8 KiB
])
def test_an_upgrade_refused_by_the_handshake_is_a_problem_logged_and_counted(
    server: Server, line: bytes, fields: bytes, status: int
) -> None:
    """websockets refuses a head it cannot take before the app sees it (an invalid handshake, and lines or
    fields past its own bounds, which httptools' 64 KiB lets through): every such refusal is a problem with
    the request id, access-logged once and counted under route ``unmatched``, method ``WS``, as the app's
    refused upgrades are. The limit's were text/plain without the id, and none was logged or counted."""
    request_id = new_id("refused-upgrade")
    before = _refused_upgrades(server, str(status))
    key = b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    handshake = b"" if status == 400 else b"Sec-WebSocket-Version: 13\r\n" + key
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET " + line + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"X-Request-ID: " + request_id.encode() + b"\r\n" + handshake + fields + b"\r\n")
        head, _, body = _whole_answer(sock).partition(b"\r\n\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
    assert head.startswith(b"HTTP/1.1 %d " % status), head
    assert headers[b"content-type"] == b"application/problem+json", head
    assert headers[b"x-request-id"] == request_id.encode(), head
    problem = json.loads(body)
    assert problem["status"] == status and problem["type"].endswith("/invalid-upgrade"), problem
    entry = access_line(server, request_id)
    assert (entry["method"], entry["route"], entry["status"]) == ("WS", "unmatched", status), entry
    assert _refused_upgrades(server, str(status)) == before + 1


@pytest.mark.parametrize("method", ["GET", "POST", "DELETE"])
@pytest.mark.parametrize("path", ["/v1/sessions/s-1/stream", "/v1/models/seattle-temp/sessions/s-1/stream"])
def test_a_plain_http_request_to_a_stream_path_is_answered_426_upgrade_required(
    server: Server, path: str, method: str
) -> None:
    answer = httpx.request(method, server.url + path, json={"values": [1.0]}, timeout=30)
    assert answer.status_code == 426
    assert answer.headers["Upgrade"] == "websocket"
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    problem = answer.json()
    assert problem["type"].endswith("/upgrade-required") and problem["status"] == 426
    assert path in problem["detail"]
    assert httpx.get(server.url + "/v1/sessions/s-1", timeout=30).status_code == 404  # nothing was created


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _raw_stream(server: Server, session: str, request_id: str | None = None) -> socket.socket:
    """A WebSocket opened by hand on a plain socket: a peer that does only what the test makes it do (never
    reads, never answers a ping); ``request_id`` its X-Request-ID, where given."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    traced = f"X-Request-ID: {request_id}\r\n" if request_id is not None else ""
    sock.sendall((f"GET /v1/sessions/{session}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                  f"Sec-WebSocket-Key: {key}\r\n{traced}\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _masked_text_frame(text: str) -> bytes:
    """One client text frame (RFC 6455 5.2), masked with a zero key, so the payload goes as it is."""
    payload = text.encode()
    assert len(payload) < 65536
    return bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big") + b"\0\0\0\0" + payload


def _long_frame(seed: int) -> bytes:
    """A masked frame of 2,048 values, 64 steps of ``wide_model``'s features: its answer fills buffers as fast
    as one of 2,048 steps of a single feature would, at a 32nd of the model's time."""
    return _masked_text_frame(_frame(series(64, seed=seed, features=len(WIDE_FEATURES))))


def test_a_text_frame_of_invalid_utf8_closes_with_1007_and_logs_no_error(server_factory: ServerFactory) -> None:
    """RFC 6455 fails such a connection with 1007; it is the client's fault, so a warning, not an error."""
    server = server_factory()
    payload = b'{"values": [0.5], "x": "\xff"}'
    with _raw_stream(server, new_id("utf8")) as sock:
        sock.sendall(bytes([0x81, 0x80 | len(payload)]) + b"\0\0\0\0" + payload)  # masked with a zero key
        head = sock.recv(4)
    assert head[0] == 0x88 and int.from_bytes(head[2:4], "big") == 1007  # a close frame, 1007
    assert "Invalid UTF-8" in server.log()
    assert not [line for line in server.log().splitlines() if '"level":"error"' in line or "Traceback" in line]


def _whole_answer(sock: socket.socket) -> bytes:
    """One HTTP answer read whole off a keep-alive connection (its head and its Content-Length of body: the
    two may come in separate reads)."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _send_until_stalled(sock: socket.socket, payload: bytes, most: int) -> int:
    """Send ``payload`` up to ``most`` times; how many went before one send blocked 5 s (the server stopped
    reading)."""
    sock.settimeout(5)
    sent = 0
    with contextlib.suppress(TimeoutError):
        while sent < most:
            sock.sendall(payload)
            sent += 1
    return sent


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_a_client_that_never_reads_stops_the_server_reading_and_holds_it_to_its_window(
    server_factory: ServerFactory, wide_model: Path,
) -> None:
    server = server_factory(wide_model, GRU_STREAM_WINDOW="4")
    frames = 3000
    # long chunks, long answers: unread answers fill the socket fast, and the model keeps up with the reads
    frame = _long_frame(2)  # no offset: appended, whatever the session holds
    before = _rss_bytes(server.process.pid)
    with _raw_stream(server, new_id("deaf")) as sock:
        sent = _send_until_stalled(sock, frame, frames)
        stalled = _metrics(server)
        time.sleep(3)
        later = _metrics(server)
        grown = _rss_bytes(server.process.pid) - before
    taken = later["gru_stream_frames_total{direction=in}"]
    answered = later["gru_stream_frames_total{direction=out}"]
    assert sent < frames / 2, "the client's sends never stalled: the server read everything"
    assert taken == stalled["gru_stream_frames_total{direction=in}"], "the server went on reading"
    assert taken - answered <= 4, (taken, answered)
    assert grown < 64 * 2**20, grown


def test_sigterm_answers_every_frame_read_and_closes_with_1001(server_factory: ServerFactory,
                                                               client: httpx.Client) -> None:
    server = server_factory()
    values = series(40 * 400, seed=4)
    chunks = _chunks(values, [400] * 40)
    with _open(server, new_id("term")) as ws:
        for offset, chunk in chunks:
            ws.send(_frame(chunk, offset))
        deadline = time.monotonic() + 30
        while _metrics(server)["gru_stream_frames_total{direction=in}"] < len(chunks):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        server.process.send_signal(signal.SIGTERM)
        answers = [_answer(ws) for _ in chunks]
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
    assert [a["position"] for a in answers] == [o + 400 for o, _ in chunks]
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    assert server.process.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained


def test_sigterm_while_clients_keep_sending_loses_no_answer_of_a_chunk_applied(
    server_factory: ServerFactory, tmp_path: Path,
) -> None:
    """Streams that keep four chunks in flight when SIGTERM comes: the frames the service read are answered,
    and its close must not reset the connection under those answers (closing a socket with the client's
    unread frames in it sends a reset, which can discard what the client had not read yet). After a restart
    from the snapshot each session holds exactly the chunks its client got answers for."""
    snapshot = {"GRU_SNAPSHOT_PATH": str(tmp_path / "sessions.safetensors")}
    server = server_factory(**snapshot)
    step = 8
    values = series(step * 5000, seed=8)
    sessions = [new_id(f"busy{n}") for n in range(16)]
    acknowledged = dict.fromkeys(sessions, 0)
    codes: dict[str, int | None] = {}
    started = threading.Barrier(len(sessions) + 1)

    def stream(session: str) -> None:
        sent = 0

        def take_answer() -> None:
            position = _answer(ws)["position"]
            assert position == acknowledged[session] + step  # in order, none missing
            acknowledged[session] = position

        with _open(server, session) as ws:
            started.wait()
            with contextlib.suppress(ConnectionClosed):  # a send after the close: read what came before it
                while True:
                    while sent - acknowledged[session] < 4 * step:
                        ws.send(_frame(values[sent : sent + step], sent))
                        sent += step
                    take_answer()
            try:
                while True:
                    take_answer()
            except ConnectionClosed as closed:
                codes[session] = closed.rcvd.code if closed.rcvd is not None else None

    threads = [threading.Thread(target=stream, args=(s,)) for s in sessions]
    for thread in threads:
        thread.start()
    started.wait()
    time.sleep(1.0)
    server.process.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(60)
    assert server.process.wait(45) in (0, -signal.SIGTERM)
    assert codes == dict.fromkeys(sessions, 1001)
    restarted = server_factory(**snapshot)
    with httpx.Client(base_url=restarted.url, timeout=30) as http:
        held = {s: http.get(f"/v1/sessions/{s}").json()["position"] for s in sessions}
    assert held == acknowledged


def test_a_peer_that_stops_answering_pings_is_dropped(server_factory: ServerFactory) -> None:
    server = server_factory(GRU_STREAM_PING_SECONDS="0.5")
    with _raw_stream(server, new_id("mute")) as sock:
        assert _metrics(server)["gru_streams_open{}"] == 1
        began = time.monotonic()
        while sock.recv(4096):  # pings, then the close; never a pong
            pass
        assert time.monotonic() - began < 8
    deadline = time.monotonic() + 10
    while _metrics(server)["gru_streams_open{}"] != 0:
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_stream_held_back_longer_than_a_ping_is_not_dropped_as_dead(server_factory: ServerFactory) -> None:
    """While a stream's window is full the service reads nothing from its socket, the client's pongs
    included: a client that answered every ping was dropped with 1011 whenever the engine held its chunks
    back past the pong deadline (here a batch delay of 1 s, under load a full queue), where backpressure is
    never an error."""
    server = server_factory(GRU_STREAM_PING_SECONDS="0.5", GRU_MAX_BATCH_DELAY_MS="1000", GRU_STREAM_WINDOW="1")
    chunks = _chunks(series(8, seed=9), [2] * 4)
    with _open(server, new_id("held")) as ws:  # websockets answers each ping from its own thread
        for offset, chunk in chunks:
            ws.send(_frame(chunk, offset))  # one read, three unread for about 3 s: the pongs behind them too
        answers = [_answer(ws) for _ in chunks]
    assert [a.get("position") for a in answers] == [o + 2 for o, _ in chunks]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_a_peer_that_pings_and_never_reads_stops_the_server_reading_and_holds_it_to_a_buffer(
    server_factory: ServerFactory,
) -> None:
    """Every ping is answered with a pong: a peer that floods pings and never reads its pongs must stall, as a
    peer that never reads its answers does, rather than grow the server's write buffer by what it sends."""
    server = server_factory()
    flood = bytes([0x89, 0x80 | 125]) + b"\0\0\0\0" + b"p" * 125  # a masked ping, the longest allowed
    batch, batches = flood * 2048, 256  # 256 KiB a batch, 64 MiB in all
    before = _rss_bytes(server.process.pid)
    with _raw_stream(server, new_id("pinger")) as sock:
        sent = _send_until_stalled(sock, batch, batches)
        grown = _rss_bytes(server.process.pid) - before
    assert sent < batches / 2, "the peer's pings never stalled: the server read everything"
    assert grown < 32 * 2**20, grown


def _server_frame(sock: socket.socket) -> tuple[int, bytes]:
    """The opcode and payload of the next frame the server sends (unmasked, under 64 KiB)."""
    def exactly(count: int) -> bytes:
        data = b""
        while len(data) < count:
            data += sock.recv(count - len(data))
        return data

    head = exactly(2)
    length = head[1] & 0x7F
    if length == 126:
        length = int.from_bytes(exactly(2), "big")
    return head[0] & 0x0F, exactly(length)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_a_message_of_endless_empty_fragments_holds_no_more_than_its_bytes(server_factory: ServerFactory) -> None:
    """websockets bounds a fragmented message by its bytes (GRU_MAX_BODY_BYTES), not by its fragments, and
    uvicorn kept a list entry for each: a peer sending empty continuation frames (6 bytes each) grew the
    server by some 8 bytes a frame for as long as it went on (measured: 105 MB for 77 MB sent in a minute)."""
    server = server_factory(GRU_STREAM_PING_SECONDS="300")  # no pings of the server's own in the way
    text = _frame(series(3), 0).encode()
    first = bytes([0x01, 0x80 | 10]) + b"\0\0\0\0" + text[:10]  # a text frame, not the last
    last = bytes([0x80, 0x80 | len(text) - 10]) + b"\0\0\0\0" + text[10:]  # the continuation that ends it
    empty = bytes([0x00, 0x80]) + b"\0\0\0\0"  # a continuation, not the last, with nothing in it
    batch = empty * 2**16

    def fragments(batches: int) -> int:
        """The server's resident bytes once it has read ``batches`` × 64 Ki more empty fragments."""
        for _ in range(batches):
            sock.sendall(batch)
        sock.sendall(bytes([0x89, 0x84]) + b"\0\0\0\0" + b"sync")  # its pong: every fragment before it is read
        assert _server_frame(sock) == (0xA, b"sync")
        return _rss_bytes(server.process.pid)

    with _raw_stream(server, new_id("fragments")) as sock:
        sock.settimeout(120)
        sock.sendall(first)
        before = fragments(4)  # the buffers a message's reading needs, in use
        grown = fragments(16) - before  # 1 Mi fragments, 6 MiB, on top
        sock.sendall(last)
        opcode, answer = _server_frame(sock)
    assert opcode == 0x1 and json.loads(answer)["position"] == 3, answer
    assert grown < 4 * 2**20, grown  # measured: 9 to 10 MiB with a list entry a fragment, under 2 MiB since


def test_sigterm_with_a_peer_that_never_reads_ends_within_one_drain_and_writes_the_snapshot(
    server_factory: ServerFactory, wide_model: Path, tmp_path: Path,
) -> None:
    """A stream whose answers cannot go out holds the drain to its bound (GRU_REQUEST_TIMEOUT_SECONDS), and no
    more: its connection, whose write buffer will never drain, is cut rather than waited for again (which
    took twice the bound, 61 s at the default 30 s, past Docker's 45 s and Kubernetes' 60 s grace, so the
    SIGKILL came before the snapshot). Meanwhile an HTTP keep-alive connection takes no new request: one was
    served during the drain, and uvicorn's shutdown after it waited up to the bound again (one at work
    finishes; the drain and that wait now share one bound). A fractional bound is kept, not rounded up to
    whole seconds (at 2.5 s, a drain of 3 s)."""
    snapshot, bound = tmp_path / "sessions.snapshot", 2.5
    server = server_factory(wide_model, GRU_SNAPSHOT_PATH=str(snapshot), GRU_REQUEST_TIMEOUT_SECONDS=str(bound))
    frame = _long_frame(7)
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with _raw_stream(server, new_id("deaf-term")) as sock:
        assert _send_until_stalled(sock, frame, 100_000) < 100_000  # its answers fill every buffer
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as http:
            http.sendall(request)  # kept alive for uvicorn's 5 s from its answer
            assert _whole_answer(http).startswith(b"HTTP/1.1 200")
            server.process.send_signal(signal.SIGTERM)
            signalled, signalled_at = time.monotonic(), time.time()
            time.sleep(1)
            assert server.process.poll() is None  # the deaf stream holds the drain
            with contextlib.suppress(OSError):
                http.sendall(request)
            try:
                later = http.recv(65536)
            except ConnectionResetError:
                later = b""
            assert later == b"", later[:80]  # got: HTTP/1.1 200 OK, served during the drain
        status = server.process.wait(45)  # docker-compose.yml's stop_grace_period
        took = time.monotonic() - signalled
    assert status in (0, -signal.SIGTERM)
    assert took < 2 * bound, f"{took:.1f} s: not within one drain of GRU_REQUEST_TIMEOUT_SECONDS = {bound} s"
    (line,) = [json.loads(line) for line in server.log().splitlines() if '"msg":"Shutting down"' in line]
    drained = datetime.strptime(line["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp() - signalled_at
    assert drained < bound + 0.4, f"the drain took {drained:.2f} s with GRU_REQUEST_TIMEOUT_SECONDS = {bound}"
    assert snapshot.exists()
    errors = [line for line in server.log().splitlines() if '"level":"error"' in line]
    assert not errors, errors
