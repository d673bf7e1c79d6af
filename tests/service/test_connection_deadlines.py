"""A connection whose request head has not arrived within GRU_REQUEST_TIMEOUT_SECONDS is closed, whether the
client sends nothing or trickles the head in, the first request's or a later one's; a head sent in time is
answered as usual."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
from urllib.parse import urlsplit

import httpx

from tests.conftest import Server, ServerFactory
from tests.service.helpers import access_line, new_id, position, send, series


def _connect(server: Server) -> socket.socket:
    address = urlsplit(server.url)
    return socket.create_connection((address.hostname, address.port))


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float | None:
    """Seconds until the server closed the connection (None if it did not within ``seconds``), sending one
    byte of ``trickle`` every 0.2 s meanwhile; anything the server sends is a failure."""
    began = time.monotonic()
    sent = 0
    while time.monotonic() - began < seconds:
        readable, _, _ = select.select([sock], [], [], 0.2)
        if readable:
            try:
                data = sock.recv(4096)
            except ConnectionResetError:
                return time.monotonic() - began
            assert data == b"", data[:200]
            return time.monotonic() - began
        if sent < len(trickle):
            try:
                sock.sendall(trickle[sent:sent + 1])
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - began
            sent += 1
    return None


def test_a_connection_that_sends_nothing_or_trickles_its_head_is_closed(server_factory: ServerFactory) -> None:
    server = server_factory(GRU_REQUEST_TIMEOUT_SECONDS="1")
    with _connect(server) as silent:
        closed = _closed_within(silent, 6)
    assert closed is not None and 0.8 < closed < 3, closed
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 200 + b"\r\n\r\n"
    with _connect(server) as trickling:
        closed = _closed_within(trickling, 6, trickle=head)
    assert closed is not None and 0.8 < closed < 3, closed
    with _connect(server) as prompt:  # a head in time is answered; the next one trickled in is closed
        prompt.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        prompt.settimeout(5)
        answer = b""
        while not answer.endswith(b'{"status":"ok"}'):  # the head and the body may come in two reads
            answer += prompt.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200")
        closed = _closed_within(prompt, 6, trickle=head)
    assert closed is not None and 0.8 < closed < 3, closed


def _answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(10)
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def test_a_head_over_64_kib_is_answered_431_whole_or_unfinished(server: Server) -> None:
    """httptools has no bound on heads: a 64 MB header was held in memory before any middleware ran."""
    head = b"GET /v1/model HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: "
    with _connect(server) as fits:
        fits.sendall(head + b"a" * 60_000 + b"\r\n\r\n")
        assert _answer(fits).startswith(b"HTTP/1.1 200")
    for pieces in (1, 40):  # the head complete in one read, and arriving over many
        padded = head + b"a" * 66_000 + b"\r\n\r\n"
        with _connect(server) as large:
            for start in range(0, len(padded), len(padded) // pieces):
                large.sendall(padded[start:start + len(padded) // pieces])
            answer = _answer(large)
        status, _, body = answer.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 431") and b"content-type: application/problem+json" in status
        problem = json.loads(body)
        assert (problem["status"], problem["type"]) == (431, "https://gru-service.dev/problems/header-too-large")
    with _connect(server) as endless:  # refused once past the bound, the rest of the head never awaited
        endless.sendall(head)
        for _ in range(16):
            endless.sendall(b"a" * 16_384)
        assert _answer(endless).startswith(b"HTTP/1.1 431")
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_the_431_for_a_large_head_carries_a_request_id(server: Server) -> None:
    """README: every HTTP answer echoes X-Request-ID (or carries a new one); the 431 carried none."""
    address = urlsplit(server.url)
    head = (b"GET /v1/model HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Request-ID: trace-431\r\nX-Pad: "
            + b"a" * 66_000 + b"\r\n\r\n")
    with socket.create_connection((address.hostname, address.port)) as sock:
        sock.sendall(head)
        sock.settimeout(10)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status, _, _ = answer.partition(b"\r\n\r\n")
    assert status.startswith(b"HTTP/1.1 431"), status
    assert b"x-request-id: trace-431" in status.lower(), status.decode()


def test_the_431_for_a_large_head_is_logged_and_counted(server_factory: ServerFactory) -> None:
    """Every answer gets one access-log line and a gru_requests_total count, as a 413 or 400 does; the 431,
    written below the app, got neither. Counted under "unmatched": no route is looked at."""
    server = server_factory()
    head = b"POST /v1/sessions/s-1/predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Request-ID: "
    for request_id, pieces in (("trace-431-whole", 1), ("trace-431-arriving", 40)):
        padded = head + request_id.encode() + b"\r\nX-Pad: " + b"a" * 66_000 + b"\r\n\r\n"
        with _connect(server) as large:
            for start in range(0, len(padded), len(padded) // pieces):
                large.sendall(padded[start:start + len(padded) // pieces])
            assert _answer(large).startswith(b"HTTP/1.1 431")
        entry = access_line(server, request_id)
        assert (entry["msg"], entry["method"], entry["route"], entry["status"]) == ("request", "POST", "unmatched",
                                                                                   431), entry
        assert entry["latency_ms"] >= 0 and "session" not in entry, entry
    metrics = httpx.get(server.url + "/metrics").text
    assert 'gru_requests_total{method="POST",route="unmatched",status="431"} 2.0' in metrics, \
        [line for line in metrics.splitlines() if line.startswith("gru_requests_total")]
    assert 'gru_request_duration_seconds_count{method="POST",route="unmatched"} 2.0' in metrics


def test_a_malformed_request_is_answered_400_problem_json_logged_and_counted(server_factory: ServerFactory) -> None:
    """README: every error is problem+json and every answer echoes X-Request-ID. httptools' parse errors got
    uvicorn's text/plain 400, with no request id, no access-log line and no count; a chunked body that breaks
    off mid-way got the same text."""
    server = server_factory()
    malformed = {
        # httptools hands a header over as the next one begins: the id is known when a later one is malformed
        "trace-bad-header": b"GET /v1/model HTTP/1.1\r\nHost: x\r\nX-Request-ID: trace-bad-header\r\nAccept: */*\r\n"
                            b"Bad Name: 1\r\n\r\n",
        "trace-bad-length": b"POST /v1/sessions/s-1/predict HTTP/1.1\r\nHost: x\r\nX-Request-ID: trace-bad-length\r\n"
                            b"Content-Length: twelve\r\n\r\n",
    }
    for request_id, request in malformed.items():
        with _connect(server) as sock:
            sock.sendall(request)
            head, _, body = _answer(sock).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400"), head
        assert b"content-type: application/problem+json" in head.lower(), head
        assert f"x-request-id: {request_id}".encode() in head.lower(), head
        problem = json.loads(body)
        assert (problem["status"], problem["type"].rsplit("/", 1)[1]) == (400, "malformed-request"), problem
        entry = access_line(server, request_id)
        assert (entry["route"], entry["status"]) == ("unmatched", 400), entry
    with _connect(server) as sock:  # the head is the app's; its chunked body is not HTTP
        sock.sendall(b"POST /v1/sessions/s-1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"val\r\nzz\r\n")
        head, _, body = _answer(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/problem+json" in head.lower(), head
    assert json.loads(body)["type"].endswith("/malformed-request")
    metrics = httpx.get(server.url + "/metrics").text
    counted = [line for line in metrics.splitlines() if line.startswith("gru_requests_total") and "unmatched" in line]
    assert 'gru_requests_total{method="GET",route="unmatched",status="400"} 1.0' in counted, counted
    assert 'gru_requests_total{method="POST",route="unmatched",status="400"} 1.0' in counted, counted
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert "Invalid HTTP request received." not in server.log()  # uvicorn's warning, beside our access line


def test_a_malformed_chunked_body_is_logged_with_its_request_id(server_factory: ServerFactory) -> None:
    """uvicorn's warning for a request httptools cannot parse is dropped, as a head's 400 has its own access
    line; a chunked body's 400 has none (the app's line says 499, the client went), so nothing said why."""
    server = server_factory()
    with _connect(server) as sock:
        sock.sendall(b"POST /v1/sessions/s-1/predict HTTP/1.1\r\nHost: x\r\nX-Request-ID: trace-bad-chunk\r\n"
                     b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"val\r\nzz\r\n")
        assert _answer(sock).startswith(b"HTTP/1.1 400")
    assert httpx.get(server.url + "/healthz").status_code == 200  # the log has had time for the line
    lines = [json.loads(line) for line in server.log().splitlines() if "trace-bad-chunk" in line]
    assert [line["msg"] for line in lines if line["level"] == "warning"] == [
        "a chunked body could not be parsed: answered 400 and closed"], lines


def test_a_malformed_request_after_a_pipelined_one_is_answered_after_it(server_factory: ServerFactory) -> None:
    """HTTP/1.1 answers pipelined requests in order (RFC 9112 section 9.3.2). A valid request followed, in the
    same read, by one httptools cannot parse got the 400 first, as if it were the valid one's answer, and
    the valid one's answer then failed to write after the 400's end of stream: an "Exception in ASGI
    application" traceback at error level, which any anonymous client could write at will."""
    server = server_factory()
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: trace-piped-first\r\n\r\n"
                     b"FOO /v1/model HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = _answer(sock)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b"x-request-id: trace-piped-first" in answer.split(b"\r\n\r\n", 1)[0].lower(), answer[:300]
    assert answer.count(b"HTTP/1.1 400 Bad Request") == 1 and b"/malformed-request" in answer, answer
    assert access_line(server, "trace-piped-first")["status"] == 200
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert "Exception in ASGI application" not in server.log()


def test_a_request_line_with_no_valid_method_is_not_logged_as_another_method(server_factory: ServerFactory) -> None:
    """httptools reports DELETE (its method 0), or the valid prefix of "POSTX", for a method it could not
    parse: the access line and gru_requests_total said a client sent DELETE when it had sent FOO."""
    server = server_factory()
    for method in (b"FOO", b"POSTX"):
        with _connect(server) as sock:
            sock.sendall(method + b" /v1/model HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _answer(sock).startswith(b"HTTP/1.1 400")
    # the parser stops at the method, before the X-Request-ID: the lines are found by their status
    lines = [json.loads(line) for line in server.log().splitlines() if '"status":400' in line]
    assert [(line["method"], line["route"]) for line in lines] == [("", "unmatched")] * 2, lines
    metrics = httpx.get(server.url + "/metrics").text
    counted = [line for line in metrics.splitlines() if line.startswith("gru_requests_total") and "unmatched" in line]
    assert counted == ['gru_requests_total{method="other",route="unmatched",status="400"} 2.0'], counted


def test_the_body_of_an_upgrade_the_service_does_not_take_never_runs_as_a_request(
    server: Server, client: httpx.Client
) -> None:
    """httptools skips the body of any request with an Upgrade (another protocol follows the head), and
    uvicorn, which takes only websocket, dropped the rest of that read and parsed later reads as new
    requests: a POST with ``Upgrade: h2c`` whose body, sent after its head, was a DELETE had the DELETE run."""
    session = new_id("upgrade")
    assert send(client, session, series(4)).status_code == 200
    inner = f"DELETE /v1/sessions/{session} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with _connect(server) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(inner))
        time.sleep(0.3)  # the body in a read of its own
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused before it came: as good
            sock.sendall(inner)
        answer = _answer(sock)
    assert answer.count(b"HTTP/1.1 ") == 1 and answer.startswith(b"HTTP/1.1 400"), answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["type"].endswith("/malformed-request"), answer
    assert position(client, session) == 4  # not deleted
    # without a body (curl --http2 asks so) it is answered as plain HTTP/1.1, and the connection closed: what
    # followed in the same read was dropped unparsed, and a client waiting for its answer would hang
    with _connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
                     b"HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = _answer(sock)
    assert answer.count(b"HTTP/1.1 ") == 1 and answer.startswith(b"HTTP/1.1 200"), answer
    assert b"connection: close" in answer.lower(), answer


def test_a_100_continue_answered_before_its_body_is_asked_for_closes_the_connection(
    server_factory: ServerFactory,
) -> None:
    """A request awaiting ``100 Continue`` refused before its body is asked for (here a 401) got its answer
    on a connection kept open, the service still waiting for the body: a client that then sent its next
    request, the body never asked for, had that request read as the body (RFC 9110 10.1.1 asks the server to
    say whether it closes or reads on). The answer closes; a request whose body is asked for goes on."""
    server = server_factory(GRU_API_KEYS="k1:t1")
    head = b"POST /v1/sessions/a/predict HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 60\r\n\r\n"
    with _connect(server) as sock:
        sock.sendall(head)
        refused = _one_answer(sock)
        assert refused.startswith(b"HTTP/1.1 401") and b"connection: close" in refused.lower(), refused
        assert _closed_within(sock, 5) is not None
    body = json.dumps({"values": [0.5, 0.6], "offset": 0}).encode()
    with _connect(server) as sock:  # asked for: 100, the body, the answer, and the connection is kept
        sock.sendall(head.replace(b"Host: x", b"Host: x\r\nAuthorization: Bearer k1").replace(
            b"Content-Length: 60", b"Content-Length: %d" % len(body)))
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(body)
        answered = _one_answer(sock)
        assert answered.startswith(b"HTTP/1.1 200") and b"connection: close" not in answered.lower(), answered
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _one_answer(sock).startswith(b"HTTP/1.1 200")


def _one_answer(sock: socket.socket) -> bytes:
    """One answer of a connection that may stay open: its head, then Content-Length bytes of body."""
    sock.settimeout(10)
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    fields = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in fields if line.startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body
