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
