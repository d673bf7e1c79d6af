"""service.client against a server that answers badly: each answer ends in the client's own typed error,
never a success or a traceback."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from service.client import BadAnswer, Client, OffsetConflict, Retry, ServiceError

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

    do_GET = do_POST = do_PUT = _reply


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
], ids=["not-json", "a-list", "no-fields", "predictions-not-a-list", "a-row-too-many", "no-version", "redirect"])
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


def test_a_body_that_cannot_be_inflated_raises_a_service_error(hostile: _ScriptedServer) -> None:
    hostile.answer = (200, {"content-encoding": "gzip"}, b"not gzip: " + _chunk_answer())
    with Client(_url(hostile), retry=FAST) as client, pytest.raises(ServiceError, match="DecodingError"):
        client.session("s").predict([1.0])


def test_a_url_without_its_scheme_raises_a_service_error() -> None:
    with Client("127.0.0.1:9", retry=FAST) as client, pytest.raises(ServiceError, match="http://"):
        client.model()
