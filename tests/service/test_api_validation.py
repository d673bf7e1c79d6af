"""Hostile input: every bad request gets a clear 4xx problem+json and leaves the session as it was."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from websockets.sync.client import connect as ws_connect

from service.api.bodies import chunk_array, parse
from service.client import Client
from service.config import Settings
from service.problems import Problem
from service.schemas import ChunkRequest
from tests.conftest import Server, ServerFactory, make_tiny_model
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


_ORDER_CASES = [(case, body) for case, body, status in BAD_BODIES if status == 422] + [
    ("valid", b'{"values": [[0.5], [0.25]], "offset": 3, "horizon": 2, "levels": [80], "scores": true}'),
    ("unknown fields and a bad value", b'{"values": ["x"], "k": 1, "j": [NaN]}'),
    ("a bad value, then unknown fields", b'{"offset": -1, "k": 1, "j": 2}'),
]


@pytest.mark.parametrize(("case", "body"), _ORDER_CASES, ids=[c for c, _ in _ORDER_CASES])
def test_a_small_body_is_refused_as_a_large_one_is(case: str, body: bytes) -> None:
    """A body of at most 2 KiB is validated before it is looked at for unknown keys (a valid chunk is parsed
    once); a refused one gets the problem the other order gives, as the same body padded past 2 KiB does."""

    def outcome(raw: bytes) -> dict[str, object]:
        try:
            return parse(raw, ChunkRequest).model_dump()  # refused later (the model's limits): the same body
        except Problem as refused:
            return refused.body()

    small = outcome(body)
    assert small == outcome(body + b" " * 2048), case
    if b'"k"' in body:  # the first unknown key alone, before any bad value
        assert small["errors"] == [{"loc": ["body", "k"], "msg": "Extra inputs are not permitted",
                                    "type": "extra_forbidden"}]


def test_values_beyond_float32_are_refused_and_the_log_stays_json_lines(server_factory: ServerFactory) -> None:
    server = server_factory()
    assert_problem(httpx.post(server.url + "/v1/predict", content=b'{"values": [1e39]}'), 422)
    tensor = {"name": "values", "shape": [1, 1], "datatype": "FP32", "data": [1e39]}
    assert_problem(httpx.post(server.url + "/v2/models/tiny/infer", json={"inputs": [tensor]}), 400)
    for line in server.log().splitlines():
        json.loads(line)  # numpy's overflow warning would be two lines of plain text


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
    # refused before routing, yet counted and logged under the route its path names
    with httpx.Client(base_url=server.url) as http:
        metrics = http.get("/metrics").text
    assert 'gru_requests_total{method="POST",route="/v1/sessions/{session_id}/predict",status="413"} 1.0' in metrics
    access = [json.loads(line) for line in server.log().splitlines() if '"status":413' in line]
    assert [(line["route"], line["session"]) for line in access] == [("/v1/sessions/{session_id}/predict", "big")]


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


@pytest.mark.parametrize("session_id", [".", ".."])
def test_dot_session_ids_that_clients_normalise_away_are_refused_everywhere(
    client: httpx.Client, session_id: str
) -> None:
    """"." and ".." could never be reached: curl and HTTP clients normalise them out of the path, so
    /v1/sessions/../predict would be a stateless /v1/predict. Sent percent-encoded (as no client normalises
    them), every route refuses them, a batch item and a v2 sequence_id too; nothing is created."""
    encoded = session_id.replace(".", "%2E")
    for method, suffix, body in (("POST", "/predict", {"values": [1.0], "offset": 0}), ("GET", "", None),
                                 ("DELETE", "", None), ("POST", "/reset", None)):
        problem = assert_problem(client.request(method, f"/v1/sessions/{encoded}{suffix}", json=body), 422)
        assert problem["errors"][0]["loc"] == ["path", "session_id"], (method, suffix, problem)
    batch = client.post("/v1/predict/batch", json={"items": [{"session_id": session_id, "values": [1.0]}]})
    assert batch.json()["results"][0]["errors"][0]["loc"] == ["body", "items", "0", "session_id"]
    name = client.get("/v1/model").json()["name"]
    v2 = client.post(f"/v2/models/{name}/infer", json={
        "inputs": [{"name": "values", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}],
        "parameters": {"sequence_id": session_id, "sequence_start": True}})
    assert_problem(v2, 400)
    assert "other than . and .." in v2.json()["error"]
    for kept in ("...", ".a", "..a", "a."):  # only the two path segments are refused
        assert send(client, kept.replace(".", "%2E"), series(2), offset=0).status_code == 200, kept
        assert position(client, kept) == 2
    with Client(client.base_url) as python_client, pytest.raises(ValueError, match=r"other than \. and \.\."):
        python_client.session(session_id)


def test_longest_valid_session_id_works(client: httpx.Client) -> None:
    session_id = "A.b_c:d-" * 16  # 128 characters of every allowed kind
    assert send(client, session_id, series(2)).status_code == 200


def test_unknown_route_and_wrong_method_are_problems(client: httpx.Client) -> None:
    assert_problem(client.get("/v1/nothing-here"), 404)
    assert_problem(client.post("/v1/predict/batch/", json={"items": []}), 404)  # no redirect to elsewhere
    wrong = client.put("/v1/sessions/x/predict", json={"values": [1.0]})
    assert_problem(wrong, 405)
    assert wrong.headers["allow"] == "POST"
    assert_problem(client.get("/v1/predict"), 405)


@pytest.mark.parametrize(("path", "allowed"), [
    ("/v1/sessions/x", {"GET", "DELETE"}),
    ("/v1/models/tiny/sessions/x", {"GET", "DELETE"}),
    ("/v1/sessions/x/state", {"GET", "PUT"}),
])
def test_a_405_allows_every_method_of_the_path(client: httpx.Client, path: str, allowed: set[str]) -> None:
    """RFC 9110 §15.5.6: the Allow of a 405 lists every method the resource supports, not only those of the
    first route that matched its path (a client told "GET" alone would never try the DELETE that works)."""
    wrong = client.patch(path, json={})
    assert_problem(wrong, 405)
    assert set(wrong.headers["allow"].split(", ")) == allowed
    assert wrong.json()["detail"].endswith("; use " + " or ".join(wrong.headers["allow"].split(", ")))


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


def test_invalid_session_id_is_the_same_problem_on_every_route(client: httpx.Client) -> None:
    """The hot predict route and the FastAPI session routes refuse an id by one rule, with one problem."""
    answers = [assert_problem(client.request(method, f"/v1/sessions/a%20b{suffix}", json=body), 422)
               for method, suffix, body in (("POST", "/predict", {"values": [1.0]}), ("GET", "", None),
                                            ("DELETE", "", None), ("POST", "/reset", None))]
    assert all(answer == answers[0] for answer in answers), answers
    assert answers[0]["errors"][0]["loc"] == ["path", "session_id"]
    # with a bad body too, as FastAPI answers: a body that is not JSON first, else every error at once
    assert_problem(client.post("/v1/sessions/a%20b/predict", content=b"{not json"), 400)
    both = assert_problem(client.post("/v1/sessions/a%20b/predict", json={"values": "x"}), 422)
    assert {tuple(error["loc"][:2]) for error in both["errors"]} == {("path", "session_id"), ("body", "values")}


def test_a_body_of_many_bad_elements_gets_a_short_answer(client: httpx.Client) -> None:
    """A body under the limit that breaks a rule a million times is refused by its first breach, and the
    answer lists at most 20 errors: never an answer many times the size of the body."""
    elements = client.post("/v1/predict", content=b'{"values": [' + b",".join([b"{}"] * 1_000_000) + b"]}")
    assert len(elements.content) < 4096, len(elements.content)
    assert_problem(elements, 422)


def _unknown_fields(head: bytes, count: int = 150_000) -> bytes:
    """A JSON object of ``head`` and then ``count`` unknown keys holding nested lists (~3 MB)."""
    return b"{" + head + b"".join(b', "k%d": [[[[]]]]' % i for i in range(count)) + b"}"


@pytest.mark.parametrize("path", ["/v1/predict", "/v1/sessions/junk/predict", "/v1/predict/batch"])
def test_a_body_of_unknown_fields_is_refused_at_the_first_one(client: httpx.Client, path: str) -> None:
    """150,000 unknown fields cost one error, not 150,000 built and 20 listed (a second of the event loop,
    every client's latency): the answer names the first unknown field alone, and nothing changes."""
    head = b'"items": [{"session_id": "junk", "values": [1.0]}]' if path.endswith("batch") else b'"values": [1.0]'
    problem = assert_problem(client.post(path, content=_unknown_fields(head)), 422)
    assert problem["errors"] == [{"loc": ["body", "k0"], "msg": "Extra inputs are not permitted",
                                  "type": "extra_forbidden"}]
    assert_problem(client.get("/v1/sessions/junk"), 404)


@pytest.mark.parametrize("path", ["/v1/predict", "/v1/sessions/junk/predict", "/v1/predict/batch"])
def test_a_long_unknown_key_is_named_by_a_short_prefix(client: httpx.Client, path: str) -> None:
    """An unknown key is named in the 422's ``loc`` and again in its ``detail``: one of 1 MB was answered in
    2 MB. It is shown cut to 80 characters, its start and end, as v2 quotes a value; a short one whole."""
    key = "k" * 500_000 + "z" * 500_000
    item = {"values": [1.0], key: 1}
    body = {"items": [{"session_id": "junk", **item}]} if path.endswith("batch") else item
    response = client.post(path, json=body)
    problem = response.json()["results"][0] if path.endswith("batch") else assert_problem(response, 422)
    assert len(response.content) < 4096, len(response.content)
    shown = problem["errors"][0]["loc"][-1]
    assert len(shown) == 80 and shown == "k" * 38 + "..." + "z" * 39, shown
    assert problem["status"] == 422 and shown in problem["detail"]
    assert_problem(client.get("/v1/sessions/junk"), 404)


def test_a_batch_item_of_unknown_fields_gets_its_first_one_and_the_others_are_answered(client: httpx.Client) -> None:
    first, last = new_id("junk"), new_id("junk")
    junk = _unknown_fields(b'"session_id": "%s", "values": [1.0]' % new_id("junk").encode())
    body = (b'{"items": [{"session_id": "%s", "values": [0.5]}, ' % first.encode() + junk
            + b', {"session_id": "%s", "values": [0.5], "k": 1, "j": 2}, 7' % new_id("junk").encode()
            + b', {"session_id": "%s", "values": [0.5, 0.6]}]}' % last.encode())
    response = client.post("/v1/predict/batch", content=body)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r.get("position") for r in results] == [1, None, None, None, 2]
    assert [r["errors"] for r in results[1:3]] == [
        [{"loc": ["body", "items", "1", "k0"], "msg": "Extra inputs are not permitted", "type": "extra_forbidden"}],
        [{"loc": ["body", "items", "2", "k"], "msg": "Extra inputs are not permitted", "type": "extra_forbidden"}],
    ]
    assert results[3]["errors"][0]["loc"] == ["body", "items", "3"]
    assert (position(client, first), position(client, last)) == (1, 2)


def test_batch_item_that_breaks_the_schema_gets_its_own_problem(client: httpx.Client) -> None:
    good, later = new_id("batch"), new_id("batch")
    items = [
        {"session_id": good, "values": [0.5, 0.6], "offset": 0},
        {"session_id": "bad id", "values": [0.5]},
        {"session_id": new_id("batch"), "values": ["NaN"]},
        "not an object",
        {"session_id": new_id("batch"), "values": [0.5], "offset": -1},
        {"session_id": new_id("batch"), "values": [0.5], "unknown": 1},
        {"session_id": later, "values": [[0.5]]},
    ]
    response = client.post("/v1/predict/batch", json={"items": items})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert (results[0]["position"], results[-1]["position"]) == (2, 1)
    for index, problem in enumerate(results[1:-1], start=1):
        assert problem["status"] == 422, problem
        assert problem["errors"][0]["loc"][:3] == ["body", "items", str(index)], problem
    assert (position(client, good), position(client, later)) == (2, 1)
    assert_problem(client.get(f"/v1/sessions/{items[2]['session_id']}"), 404)  # type: ignore[index]


def test_too_many_batch_items_names_the_field(client: httpx.Client) -> None:
    items = [{"session_id": new_id("many"), "values": [0.5]} for _ in range(257)]  # GRU_MAX_BATCH_ITEMS=256
    problem = assert_problem(client.post("/v1/predict/batch", json={"items": items}), 422)
    assert problem["errors"][0]["loc"] == ["body", "items"]
    assert_problem(client.get(f"/v1/sessions/{items[0]['session_id']}"), 404)


def _raw_request(url: str, head: bytes, body: bytes, *, hang_up: bool = False) -> bytes:
    """Send one request as written; then read until the server closes (or 5 s pass), or hang up at once."""
    address = urlsplit(url)
    with socket.create_connection((address.hostname, address.port)) as sock:
        sock.sendall(head + b"\r\n\r\n" + body)
        if hang_up:
            return b""
        sock.settimeout(5)
        return b"".join(iter(lambda: sock.recv(65536), b""))


@pytest.mark.parametrize("written", [b"%d \t", b"0%d", b"0" * 5000 + b"%d"], ids=["whitespace", "zero", "5000 zeros"])
def test_content_length_with_whitespace_or_leading_zeros_is_read(server: Server, written: bytes) -> None:
    body = b'{"values": [0.5]}'
    answer = _raw_request(server.url, b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                      b"Content-Length: " + written % len(body), body)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]


@pytest.mark.parametrize("path", ["/v1/predict", "/v1/predict/batch"])
def test_client_that_hangs_up_mid_body_is_a_499_not_a_server_error(server: Server, path: str) -> None:
    """The body never arrives: nothing changes, and neither the metrics nor the log report our error."""
    _raw_request(server.url, b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 100" % path.encode(), b'{"values"',
                 hang_up=True)
    with httpx.Client(base_url=server.url) as http:
        metrics = http.get("/metrics").text
    assert f'gru_requests_total{{method="POST",route="{path}",status="499"}}' in metrics
    assert f'route="{path}",status="500"' not in metrics
    assert "ClientDisconnect" not in server.log()


@pytest.mark.parametrize("value", [3.4028234663852886e38, -3.4028234663852886e38, 3.4e38, 3.3e38, 1e-45, 0.1])
def test_every_value_within_float32_is_taken_exactly_as_float32_rounds_it(value: float) -> None:
    """Values well inside float32's range are cast without a check, those near its limit with the exact
    one: either way the value float32 rounds it to, its largest value included."""
    got = chunk_array([value, 1.0], 0, 1, Settings(), ["body", "values"])
    assert got.dtype == np.float32 and got.shape == (2, 1)
    assert got[0, 0] == np.float32(value)


@pytest.mark.parametrize("value", [3.40283e38, -3.5e38, 1e39, 1.7e308])
def test_a_value_beyond_float32_is_refused_however_close(value: float) -> None:
    with pytest.raises(Problem) as refused:
        chunk_array([[0.5], [value]], 0, 1, Settings(), ["body", "values"])
    assert refused.value.status == 422 and "beyond float32 range" in refused.value.detail


def test_values_that_drive_the_model_past_float32_are_refused_and_change_nothing(client: httpx.Client) -> None:
    """3e38 is float32, but the model's outputs from it are not finite: 422, never nulls in an answer, and
    never a state that turns every later answer into nulls."""
    extreme = {"values": [3e38, -3e38], "horizon": 3}
    problem = assert_problem(client.post("/v1/predict", json=extreme), 422)
    assert problem["type"].endswith("/out-of-range")
    session = new_id("extreme")
    assert_problem(client.post(f"/v1/sessions/{session}/predict", json={**extreme, "offset": 0}), 422)
    assert_problem(client.get(f"/v1/sessions/{session}"), 404)
    head, tail = series(6, seed=3), series(4, seed=4)
    assert send(client, session, head, offset=0).status_code == 200
    assert_problem(client.post(f"/v1/sessions/{session}/predict", json={**extreme, "offset": 6}), 422)
    assert position(client, session) == 6
    after = send(client, session, tail, offset=6)
    assert after.status_code == 200, after.text
    whole = stateless(client, np.concatenate([head, tail]))["predictions"]
    np.testing.assert_allclose(after.json()["predictions"], whole[6:], atol=1e-5)


def test_a_body_that_trickles_in_past_the_request_time_gets_408(server_factory: ServerFactory) -> None:
    """A client sending a byte now and then would hold its connection and a task for ever."""
    server = server_factory(GRU_REQUEST_TIMEOUT_SECONDS="1")
    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port)) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"values\"")
        sock.settimeout(10)
        answer = b"".join(iter(lambda: sock.recv(65536), b""))  # closed by the server after its answer
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"application/problem+json" in answer and b"body-timeout" in answer
    with httpx.Client(base_url=server.url) as http:
        assert 'route="/v1/predict",status="408"' in http.get("/metrics").text


def test_limits_are_inclusive(server_factory: ServerFactory) -> None:
    """Exactly GRU_MAX_CHUNK_STEPS steps, GRU_MAX_BATCH_ITEMS items, a body of GRU_MAX_BODY_BYTES are served
    and one more is refused, a chunked body (no Content-Length) just past the limit too; no items is a 422."""
    server = server_factory(GRU_MAX_CHUNK_STEPS="8", GRU_MAX_BATCH_ITEMS="3", GRU_MAX_BODY_BYTES="4096")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert send(http, new_id(), series(8)).status_code == 200
        assert_problem(send(http, new_id(), series(9)), 422)
        items = [{"session_id": new_id("b"), "values": [0.5]} for _ in range(3)]
        assert http.post("/v1/predict/batch", json={"items": items}).status_code == 200
        assert_problem(http.post("/v1/predict/batch", json={"items": items + items[:1]}), 422)
        assert_problem(http.post("/v1/predict/batch", json={"items": []}), 422)
        prefix = b'{"values": [0.5]'
        body = prefix + b" " * (4096 - len(prefix) - 1) + b"}"
        assert http.post("/v1/predict", content=body).status_code == 200
        assert_problem(http.post("/v1/predict", content=body + b" "), 413)
        assert_problem(http.post("/v1/predict", content=iter([body[:2048], body[2048:] + b"  "])), 413)


def test_batch_items_are_as_strict_as_the_session_route(client: httpx.Client) -> None:
    """A number as a string or a boolean is refused in a batch item, as on the session route."""
    session = new_id("strict")
    items = [{"session_id": session, "values": ["0.5"]}, {"session_id": session, "values": [True]},
             {"session_id": session, "values": [0.5], "offset": "0"}]
    results = client.post("/v1/predict/batch", json={"items": items}).json()["results"]
    assert [r.get("status") for r in results] == [422, 422, 422], results
    assert_problem(client.get(f"/v1/sessions/{session}"), 404)


REPEATED_KEYS: list[tuple[str, bytes]] = [
    ("offset twice", b'{"values": [0.5], "offset": 0, "offset": 4}'),
    ("values twice", b'{"values": [0.5], "offset": 4, "values": [0.7, 0.8]}'),
    ("an escaped repeat", b'{"values": [0.5], "offset": 4, "\\u006fffset": 0}'),
    ("a large body", b'{"values": [' + b", ".join([b"0.5"] * 600) + b'], "offset": 4, "offset": 0}'),
]


@pytest.mark.parametrize(("case", "body"), REPEATED_KEYS, ids=[c for c, _ in REPEATED_KEYS])
def test_a_body_that_names_a_field_twice_is_refused_and_changes_nothing(
    client: httpx.Client, case: str, body: bytes
) -> None:
    """JSON parsers disagree on a repeated key (Python and pydantic keep the last, others the first, or
    refuse): an offset or chunk read one way by a proxy or a client library and another here must not be
    applied, so the body is refused and the session stays where it was."""
    session = new_id()
    assert send(client, session, series(4), offset=0).status_code == 200
    problem = assert_problem(client.post(f"/v1/sessions/{session}/predict", content=body), 422)
    assert problem["errors"][0]["type"] == "duplicate_key"
    assert problem["errors"][0]["loc"][0] == "body"
    assert position(client, session) == 4
    twice = b'{"values": [0.5], "horizon": 1, "horizon": 0}'
    stateless = assert_problem(client.post("/v1/predict", content=twice), 422)
    assert stateless["errors"] == [{"loc": ["body", "horizon"], "msg": "the field is given more than once",
                                    "type": "duplicate_key"}]


def test_a_batch_item_that_names_a_field_twice_gets_its_own_problem(client: httpx.Client) -> None:
    repeated, good = new_id("dup"), new_id("dup")
    body = (b'{"items": [{"session_id": "%s", "values": [0.5], "offset": 3, "offset": 0},'
            b' {"session_id": "%s", "values": [0.5]}]}' % (repeated.encode(), good.encode()))
    response = client.post("/v1/predict/batch", content=body)
    assert response.status_code == 200, response.text
    refused, answered = response.json()["results"]
    assert refused["status"] == 422 and refused["errors"][0]["type"] == "duplicate_key", refused
    assert refused["errors"][0]["loc"] == ["body", "items", "0", "offset"]
    assert answered["position"] == 1
    assert_problem(client.get(f"/v1/sessions/{repeated}"), 404)
    assert_problem(client.post("/v1/predict/batch", content=b'{"items": [], "items": [{"session_id": "x",'
                               b' "values": [0.5]}]}'), 422)


# JSON that pydantic-core's parser cannot take, and what its 400 says: the whole call, in a batch too.
_TOO_DEEP = b'"values": ' + b"[" * 5000 + b"]" * 5000
_TOO_LONG = b'"values": [' + b"1" * 4301 + b"]"
PARSER_LIMITS = [(_TOO_DEEP, "nests arrays and objects more than 200 levels deep"),
                 (_TOO_LONG, "holds a number of more than 4,300 digits")]


@pytest.mark.parametrize(("values", "why"), PARSER_LIMITS, ids=["too deep", "too long a number"])
def test_json_beyond_the_parsers_limits_is_refused_saying_why_on_every_route(
    server: Server, client: httpx.Client, values: bytes, why: str
) -> None:
    session = new_id("limits")
    body = b"{" + values + b"}"
    batch = b'{"items": [{"session_id": "%s", ' % session.encode() + values + b'}, {"session_id": "%s",' \
        b' "values": [0.5]}]}' % session.encode()
    answers = [client.post("/v1/predict", content=body), client.post(f"/v1/sessions/{session}/predict", content=body),
               client.post("/v1/predict/batch", content=batch)]
    with ws_connect(server.url.replace("http://", "ws://") + f"/v1/sessions/{session}/stream") as stream:
        stream.send(body.decode())
        frame = json.loads(stream.recv(timeout=30))
    for problem in [*(assert_problem(answer, 400) for answer in answers), frame]:
        assert problem["type"].endswith("/malformed-json") and why in problem["detail"], problem
    assert_problem(client.get(f"/v1/sessions/{session}"), 404)


def test_a_batch_item_of_a_number_the_parser_takes_is_its_own_problem(client: httpx.Client) -> None:
    session = new_id("limits")
    body = b'{"items": [{"session_id": "x", "values": [' + b"1" * 4300 + b']}, {"session_id": "%s",' \
        b' "values": [0.5]}]}' % session.encode()
    response = client.post("/v1/predict/batch", content=body)
    assert response.status_code == 200, response.text
    assert [result.get("status") for result in response.json()["results"]] == [422, None]
    assert position(client, session) == 1
