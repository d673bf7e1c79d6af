"""Hostile input: every bad request gets a clear 4xx problem+json and leaves the session as it was."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest

from tests.conftest import ServerFactory, make_tiny_model
from tests.service.helpers import assert_problem, new_id, position, send, series, stateless

BAD_BODIES: list[tuple[str, bytes, int]] = [
    ("malformed json", b'{"values": [1, 2', 400),
    ("not an object", b"[1, 2, 3]", 422),
    ("empty body", b"", 400),
    ("NaN", b'{"values": [NaN]}', 422),
    ("Infinity", b'{"values": [1.0, Infinity]}', 422),
    ("-Infinity", b'{"values": [-Infinity]}', 422),
    ("overflows float32", b'{"values": [1e39]}', 422),
    ("overflows float64", b'{"values": [1e400]}', 422),
    ("string number", b'{"values": ["1.5"]}', 422),
    ("boolean", b'{"values": [true]}', 422),
    ("null value", b'{"values": [null]}', 422),
    ("values missing", b'{"offset": 2}', 422),
    ("values not a list", b'{"values": 3}', 422),
    ("empty values", b'{"values": []}', 422),
    ("ragged rows", b'{"values": [[1.0], [1.0, 2.0]]}', 422),
    ("too many features", b'{"values": [[1.0, 2.0]]}', 422),
    ("three dimensions", b'{"values": [[[1.0]]]}', 422),
    ("negative offset", b'{"values": [1.0], "offset": -1}', 422),
    ("fractional offset", b'{"values": [1.0], "offset": 2.5}', 422),
    ("string offset", b'{"values": [1.0], "offset": "2"}', 422),
    ("negative horizon", b'{"values": [1.0], "horizon": -3}', 422),
    ("horizon over the maximum", b'{"values": [1.0], "horizon": 100000}', 422),
    ("unknown field", b'{"values": [1.0], "valeus": [2.0]}', 422),
    ("too many steps", b'{"values": [' + b",".join([b"0.5"] * 5000) + b"]}", 422),
]


@pytest.mark.parametrize(("case", "body", "status"), BAD_BODIES, ids=[c for c, _, _ in BAD_BODIES])
def test_bad_chunk_gets_a_problem_and_changes_nothing(
    client: httpx.Client, case: str, body: bytes, status: int
) -> None:
    values = series(10, seed=11)
    session = new_id()
    send(client, session, values[:4], offset=0)
    response = client.post(f"/v1/sessions/{session}/predict", content=body,
                           headers={"content-type": "application/json"})
    problem = assert_problem(response, status)
    if status == 422:
        assert problem["errors"], problem
        assert all(error["loc"] for error in problem["errors"])
    assert position(client, session) == 4
    rest = send(client, session, values[4:], offset=4).json()["predictions"]
    np.testing.assert_allclose(rest, stateless(client, values)["predictions"][4:], atol=1e-5)


@pytest.mark.parametrize(("case", "body", "status"), BAD_BODIES, ids=[c for c, _, _ in BAD_BODIES])
def test_bad_stateless_call_gets_a_problem(client: httpx.Client, case: str, body: bytes, status: int) -> None:
    if case.endswith("offset"):
        status = 422  # stateless calls take no offset at all
    assert_problem(client.post("/v1/predict", content=body), status)


def test_errors_name_the_field(client: httpx.Client) -> None:
    problem = assert_problem(client.post("/v1/predict", json={"values": [1.0], "horizon": -1}), 422)
    assert ["body", "horizon"] in [error["loc"] for error in problem["errors"]]
    over = assert_problem(client.post("/v1/predict", json={"values": [1.0], "horizon": 10_000}), 422)
    assert "GRU_MAX_HORIZON" in over["detail"]


def test_body_over_the_limit_is_refused_from_its_content_length(server_factory: ServerFactory) -> None:
    server = server_factory(GRU_MAX_BODY_BYTES="2048")
    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port)) as sock:
        # Announce 500 MB, send none of it: the answer must come without waiting for the body.
        sock.sendall(b"POST /v1/sessions/big/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 500000000\r\n\r\n")
        sock.settimeout(5)
        head = sock.recv(65536).decode()
    assert head.startswith("HTTP/1.1 413"), head
    assert "application/problem+json" in head
    assert "connection: close" in head.lower()


def test_chunked_body_is_cut_off_at_the_limit(server_factory: ServerFactory) -> None:
    server = server_factory(GRU_MAX_BODY_BYTES="2048")

    def endless() -> object:
        yield b'{"values": ['
        for _ in range(10_000):
            yield b"0.5," * 100

    with httpx.Client(base_url=server.url) as http:
        response = http.post("/v1/sessions/chunky/predict", content=endless())
        assert_problem(response, 413)
        assert_problem(http.get("/v1/sessions/chunky"), 404)


@pytest.mark.parametrize(
    "session_id", ["x" * 5000, "..%2F..", "a b", "%00", "ü", "a/b", "", "?x=1", "a" * 129, "a%0A", "a" * 128 + "%0A"]
)
def test_odd_session_ids_never_give_a_server_error(client: httpx.Client, session_id: str) -> None:
    for method, suffix, body in (("POST", "/predict", {"values": [1.0]}), ("GET", "", None),
                                 ("DELETE", "", None), ("POST", "/reset", None)):
        response = client.request(method, f"/v1/sessions/{session_id}{suffix}", json=body)
        assert 400 <= response.status_code < 500, (method, response.status_code, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")


def test_longest_valid_session_id_works(client: httpx.Client) -> None:
    session_id = "A.b_c:d-" * 16  # 128 characters of every allowed kind
    assert send(client, session_id, series(2)).status_code == 200


def test_unknown_route_and_wrong_method_are_problems(client: httpx.Client) -> None:
    assert_problem(client.get("/v1/nothing-here"), 404)
    wrong = client.put("/v1/sessions/x/predict", json={"values": [1.0]})
    assert_problem(wrong, 405)
    assert wrong.headers["allow"] == "POST"
    assert_problem(client.get("/v1/predict"), 405)


def test_multivariate_model_takes_t_by_f_and_refuses_flat_lists(server_factory: ServerFactory, tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "two", features=("a", "b"))
    server = server_factory(model_path=model)
    values = series(6, seed=12, features=2)
    with httpx.Client(base_url=server.url) as http:
        body = send(http, "mv", values, offset=0).json()
        assert np.array(body["predictions"]).shape == (6, 2)
        assert http.get("/v1/model").json()["input_features"] == 2
        problem = assert_problem(http.post("/v1/sessions/mv/predict", json={"values": [1.0, 2.0]}), 422)
        assert "2 features" in problem["detail"]
        assert position(http, "mv") == 6
