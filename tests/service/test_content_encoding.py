"""Content-Encoding on every route: gzip and deflate bodies are inflated (at most to GRU_MAX_BODY_BYTES), any
other coding is a 415, never a body read as if it were plain."""

from __future__ import annotations

import gzip
import json
import zlib

import httpx
import numpy as np

from tests.conftest import ServerFactory
from tests.service.helpers import assert_problem, new_id, position, series


def _post(client: httpx.Client, path: str, body: object, coding: str, packed: bytes | None = None) -> httpx.Response:
    raw = json.dumps(body).encode()
    if packed is None:
        packed = {"gzip": gzip.compress, "deflate": zlib.compress, "br": lambda data: data}[coding](raw)
    return client.post(path, content=packed, headers={"content-type": "application/json", "content-encoding": coding})


def test_a_gzip_or_deflate_body_is_answered_as_the_same_body_plain(client: httpx.Client) -> None:
    values = series(12, seed=21).tolist()
    plain = client.post("/v1/predict", json={"values": values, "horizon": 2}).json()
    for coding in ("gzip", "deflate"):
        assert _post(client, "/v1/predict", {"values": values, "horizon": 2}, coding).json() == plain
        session = new_id(coding)
        first = _post(client, f"/v1/sessions/{session}/predict", {"values": values[:5], "offset": 0}, coding)
        assert first.status_code == 200, first.text
        batch = _post(client, "/v1/predict/batch",
                      {"items": [{"session_id": session, "values": values[5:], "offset": 5}]}, coding)
        assert batch.status_code == 200, batch.text
        assert position(client, session) == 12
        np.testing.assert_allclose(first.json()["predictions"] + batch.json()["results"][0]["predictions"],
                                   plain["predictions"], atol=1e-5)


def test_another_coding_is_415_and_changes_nothing(client: httpx.Client) -> None:
    session = new_id("br")
    for path in (f"/v1/sessions/{session}/predict", "/v1/predict", "/v1/predict/batch"):
        body = {"items": [{"session_id": session, "values": [0.5]}]} if path.endswith("batch") else {"values": [0.5]}
        problem = assert_problem(_post(client, path, body, "br"), 415)
        assert "Content-Encoding 'br' is not supported" in problem["detail"]
    assert_problem(client.get(f"/v1/sessions/{session}"), 404)


def test_a_bomb_is_413_and_a_body_that_is_not_gzip_is_400(server_factory: ServerFactory) -> None:
    server = server_factory(GRU_MAX_BODY_BYTES="65536")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        bomb = gzip.compress(b'{"values": [0.5]' + b" " * 10_000_000 + b"}")  # ~10 KB on the wire
        assert_problem(_post(http, "/v1/predict", {}, "gzip", packed=bomb), 413)
        assert_problem(_post(http, "/v1/predict", {}, "gzip", packed=b"\x1f\x8bnot gzip"), 400)
        assert_problem(_post(http, "/v1/predict", {}, "gzip", packed=gzip.compress(b'{"values": [0.5]}')[:-9]), 400)
        identity = http.post("/v1/predict", json={"values": [0.5]}, headers={"content-encoding": "identity"})
        assert identity.status_code == 200


def test_a_gzip_body_of_two_members_is_read_whole(client: httpx.Client) -> None:
    """RFC 1952 (2.2): a gzip body is a series of members; `gzip -c a >> f` and streaming compressors write
    several. Only the first was inflated, the rest silently dropped."""
    plain = client.post("/v1/predict", json={"values": [0.1, 0.2]})
    assert plain.status_code == 200, plain.text
    packed = gzip.compress(b'{"values": [0.1, ') + gzip.compress(b"0.2]}")
    assert gzip.decompress(packed) == b'{"values": [0.1, 0.2]}'  # what the client sent
    answer = client.post("/v1/predict", content=packed,
                         headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert answer.status_code == 200, answer.text
    assert answer.json() == plain.json()


def test_bytes_after_the_compressed_stream_are_400_and_change_nothing(client: httpx.Client) -> None:
    """Data after the end of the gzip/deflate stream is not valid gzip/deflate: it must be refused (400), not
    ignored while the part before it is applied to the session."""
    for coding, compress in (("gzip", gzip.compress), ("deflate", zlib.compress)):
        session = new_id(coding)
        packed = compress(b'{"values": [0.5], "offset": 0}') + compress(b'{"values": [9.0, 9.0, 9.0]}')
        answer = client.post(f"/v1/sessions/{session}/predict", content=packed,
                             headers={"content-type": "application/json", "content-encoding": coding})
        assert_problem(answer, 400)
        assert_problem(client.get(f"/v1/sessions/{session}"), 404)


def test_content_encoding_on_two_header_lines_is_one_list(client: httpx.Client) -> None:
    """RFC 9110 5.3: two Content-Encoding lines are the list "identity, br". Sent on one line it is a 415; on
    two, only the first line was looked at and the br-coded body was read as if plain and applied."""
    one_line = new_id("ce1")
    refused = client.post(f"/v1/sessions/{one_line}/predict", content=b'{"values": [0.5], "offset": 0}',
                          headers=[("content-type", "application/json"), ("content-encoding", "identity, br")])
    assert_problem(refused, 415)
    two_lines = new_id("ce2")
    answer = client.post(f"/v1/sessions/{two_lines}/predict", content=b'{"values": [0.5], "offset": 0}',
                         headers=[("content-type", "application/json"), ("content-encoding", "identity"),
                                  ("content-encoding", "br")])
    assert_problem(answer, 415)
    assert_problem(client.get(f"/v1/sessions/{two_lines}"), 404)


def test_a_body_of_many_gzip_members_is_refused(client: httpx.Client) -> None:
    """Members are inflated one by one: a body of thousands of tiny ones would cost a decompressor each."""
    packed = gzip.compress(b'{"values": [0.1]}') + gzip.compress(b"") * 100
    assert_problem(client.post("/v1/predict", content=packed,
                               headers={"content-type": "application/json", "content-encoding": "gzip"}), 400)
