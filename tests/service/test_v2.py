"""Open Inference Protocol (v2) against a real server, driven by Triton's own Python client where it can be.

Sequences split across calls must give what one stateless v1 pass gives, in binary and in JSON tensors.
"""

from __future__ import annotations

import gzip
import json
import random
import socket
import tracemalloc
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import orjson
import pytest
import tritonclient.http as triton
from safetensors.numpy import load, save
from tritonclient.utils import InferenceServerException

from service.api.v2_codec import parse_infer
from service.http_fields import decode_body
from service.problems import Problem
from tests.conftest import Server, ServerFactory
from tests.service.helpers import PROBLEM_JSON, assert_problem, new_id, position, series, stateless

HEADER = "Inference-Header-Content-Length"


@pytest.fixture
def tc(server: Server) -> Iterator[triton.InferenceServerClient]:
    connection = triton.InferenceServerClient(server.url.removeprefix("http://"), connection_timeout=30,
                                              network_timeout=30)
    yield connection
    connection.close()


@pytest.fixture
def model(client: httpx.Client) -> dict[str, Any]:
    return client.get("/v1/model").json()


def _input(values: np.ndarray, binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput("values", list(values.shape), "FP32")
    tensor.set_data_from_numpy(values.astype(np.float32), binary_data=binary)
    return tensor


def _outputs(binary: bool, forecast: bool = False) -> list[triton.InferRequestedOutput]:
    names = ["predictions", "forecast"] if forecast else ["predictions"]
    return [triton.InferRequestedOutput(name, binary_data=binary) for name in names]


def _sequence_id() -> int:
    return random.randrange(10**12, 2**63)


def _infer(http: httpx.Client, name: str, body: dict[str, Any]) -> httpx.Response:
    return http.post(f"/v2/models/{name}/infer", content=json.dumps(body).encode())  # big ints too


def _values_tensor(values: np.ndarray) -> dict[str, Any]:
    return {"name": "values", "shape": list(values.shape), "datatype": "FP32",
            "data": values.ravel().tolist()}


def _assert_v2_error(response: httpx.Response, status: int) -> dict[str, Any]:
    """Both shapes at once: the protocol's ``error`` (what tritonclient reads) and RFC 9457's fields."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    body = response.json()
    assert body["error"] == body["detail"] and body["error"]
    assert body["status"] == status and body["type"] and body["title"]
    return body


# -- health and metadata -----------------------------------------------------------------------------


def test_health_and_metadata_through_tritonclient(
    tc: triton.InferenceServerClient, model: dict[str, Any]
) -> None:
    name, version = model["name"], model["version"]
    assert tc.is_server_live() and tc.is_server_ready()
    assert tc.is_model_ready(name) and tc.is_model_ready(name, version)
    assert not tc.is_model_ready("no-such-model")
    assert "sequence" in tc.get_server_metadata()["extensions"]
    metadata = tc.get_model_metadata(name)
    assert metadata["name"] == name and metadata["versions"] == [version]
    features, outputs = model["input_features"], model["output_features"]
    assert metadata["inputs"] == [{"name": "values", "datatype": "FP32", "shape": [-1, features]}]
    assert {"name": "predictions", "datatype": "FP32", "shape": [-1, outputs]} in metadata["outputs"]
    assert tc.get_model_metadata(name, version)["versions"] == [version]


def test_unknown_model_or_version_is_404_that_tritonclient_reads(
    tc: triton.InferenceServerClient, model: dict[str, Any], client: httpx.Client
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        tc.get_model_metadata("no-such-model")
    assert caught.value.status() == "404" and "unknown model 'no-such-model'" in caught.value.message()
    with pytest.raises(InferenceServerException) as caught:
        tc.infer(model["name"], [_input(series(3))], model_version="000000000000")
    assert caught.value.status() == "404" and "no version" in caught.value.message()
    _assert_v2_error(_infer(client, "no-such-model", {"inputs": [_values_tensor(series(3))]}), 404)
    _assert_v2_error(client.get(f"/v2/models/{model['name']}/config"), 404)  # not served, still readable


def test_a_version_reference_that_only_looks_like_a_number_is_a_404(
    model: dict[str, Any], client: httpx.Client
) -> None:
    """A version is looked up by number when its reference is all digits: "²" is a digit to ``str.isdigit``
    but not to ``int()``, nor is a number of 5,000 digits (over Python's limit): both were a 500. A sign, a
    space, a decimal point, 0 or over 18 digits name no version either (docs/interop.md); leading zeros are
    read as the number."""
    assert client.get(f"/v2/models/{model['name']}/versions/01").json()["versions"] == [model["version"]]
    for reference in ("%C2%B2", "9" * 5000, "+1", "%201", "1%20", "1.0", "0", "1" + "0" * 18):
        for method, suffix in (("GET", ""), ("GET", "/ready"), ("POST", "/infer")):
            answer = client.request(method, f"/v2/models/{model['name']}/versions/{reference}{suffix}", json={})
            _assert_v2_error(answer, 404)


def test_served_path_with_another_method_is_405_naming_the_methods(client: httpx.Client,
                                                                   model: dict[str, Any]) -> None:
    """The catch-all for unserved /v2 paths matched these too, answering 404 "not served here" for a GET
    on infer, as v1 does not (405 with Allow)."""
    infer = _assert_v2_error(client.get(f"/v2/models/{model['name']}/infer"), 405)
    assert "use POST" in infer["detail"]
    live = client.post("/v2/health/live")
    assert _assert_v2_error(live, 405) and live.headers["allow"] == "GET"
    assert client.get(f"/v2/models/{model['name']}/infer").headers["allow"] == "POST"
    for method in ("OPTIONS", "TRACE"):  # not the catch-all's methods, as Starlette's own 405 named them
        assert _assert_v2_error(client.request(method, "/v2/health/live"), 405)
        assert client.request(method, "/v2/health/live").headers["allow"] == "GET"
        _assert_v2_error(client.request(method, "/v2/not/served"), 404)
    index = client.delete("/v2/repository/index")  # the repository extension is served too
    assert _assert_v2_error(index, 405) and index.headers["allow"] == "POST"
    _assert_v2_error(client.put("/v2/repository/nothing"), 404)


@pytest.mark.parametrize("method", ["PROPFIND", "MKCOL", "QUERY", "PURGE"])
def test_a_method_no_route_takes_is_answered_as_v1_answers_it(client: httpx.Client, model: dict[str, Any],
                                                               method: str) -> None:
    """RFC 9110 15.5.6: a 405's Allow lists the methods the resource takes. For a method outside the catch-all's
    own list, /v2 left the 405 to Starlette, whose Allow listed the catch-all's five methods (GET, POST, PUT,
    PATCH, DELETE on /v2/health/live, which takes GET), and an unserved path was a 405 instead of v1's 404."""
    assert client.request(method, "/v1/model").headers["allow"] == "GET"  # what v1 answers
    assert_problem(client.request(method, "/v1/not-served"), 404)
    for path, allowed in (("/v2/health/live", "GET"), (f"/v2/models/{model['name']}/infer", "POST"),
                          ("/v2/repository/index", "POST")):
        wrong = client.request(method, path)
        assert _assert_v2_error(wrong, 405)["detail"] == f"{method} is not allowed on {path}; use {allowed}"
        assert wrong.headers["allow"] == allowed
    _assert_v2_error(client.request(method, "/v2/not/served"), 404)


# -- sequences ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_sequence_split_across_calls_equals_one_stateless_pass(
    binary: bool, tc: triton.InferenceServerClient, model: dict[str, Any], client: httpx.Client
) -> None:
    values = series(50, seed=3)
    expected = stateless(client, values, horizon=4)
    sequence = _sequence_id()
    cuts = [(0, 17), (17, 30), (30, 50)]
    got: list[np.ndarray] = []
    for index, (start, end) in enumerate(cuts):
        last = index == len(cuts) - 1
        result = tc.infer(
            model["name"], [_input(values[start:end], binary)], outputs=_outputs(binary, forecast=last),
            sequence_id=sequence, sequence_start=index == 0, sequence_end=last,
            parameters={"horizon": 4} if last else None,
        )
        response = result.get_response()
        output = result.get_output("predictions")
        assert ("data" in output) is not binary
        assert ("binary_data_size" in output.get("parameters", {})) is binary
        assert response["model_name"] == model["name"] and response["model_version"] == model["version"]
        assert response["parameters"]["sequence_position"] == end
        predictions = result.as_numpy("predictions")
        assert predictions.dtype == np.float32
        assert predictions.shape == (end - start, model["output_features"])
        got.append(predictions)
        if not last:
            assert position(client, str(sequence)) == end  # the v1 session of the same id
    np.testing.assert_allclose(np.concatenate(got), expected["predictions"], atol=1e-5)
    np.testing.assert_allclose(result.as_numpy("forecast"), expected["forecast"], atol=1e-5)
    assert client.get(f"/v1/sessions/{sequence}").status_code == 404  # sequence_end deleted it


def test_integer_and_string_sequence_ids_are_the_same_v1_session(
    tc: triton.InferenceServerClient, model: dict[str, Any], client: httpx.Client
) -> None:
    values = series(24, seed=5)
    sequence = _sequence_id()
    tc.infer(model["name"], [_input(values[:8])], sequence_id=sequence, sequence_start=True)
    tc.infer(model["name"], [_input(values[8:16], binary=False)], sequence_id=str(sequence))
    assert position(client, str(sequence)) == 16
    rest = client.post(f"/v1/sessions/{sequence}/predict",
                       json={"values": values[16:].tolist(), "offset": 16})
    assert rest.status_code == 200, rest.text
    expected = stateless(client, values)["predictions"][16:]
    np.testing.assert_allclose(rest.json()["predictions"], expected, atol=1e-5)


def test_chunk_without_start_for_unknown_or_ended_sequence_is_refused(
    tc: triton.InferenceServerClient, model: dict[str, Any], client: httpx.Client
) -> None:
    sequence = _sequence_id()
    with pytest.raises(InferenceServerException) as caught:
        tc.infer(model["name"], [_input(series(4))], sequence_id=sequence)
    assert caught.value.status() == "404" and "sequence_start" in caught.value.message()
    assert client.get(f"/v1/sessions/{sequence}").status_code == 404  # and nothing was created
    tc.infer(model["name"], [_input(series(4))], sequence_id=sequence, sequence_start=True, sequence_end=True)
    with pytest.raises(InferenceServerException) as caught:
        tc.infer(model["name"], [_input(series(4))], sequence_id=sequence)
    assert caught.value.status() == "404"
    assert client.get(f"/v1/sessions/{sequence}").status_code == 404


def test_sequence_start_resets_a_session_that_was_already_there(
    tc: triton.InferenceServerClient, model: dict[str, Any], client: httpx.Client
) -> None:
    session = new_id("v2")
    values = series(12, seed=7)
    before = client.post(f"/v1/sessions/{session}/predict", json={"values": series(30).tolist()})
    assert before.status_code == 200
    result = tc.infer(model["name"], [_input(values)], sequence_id=session, sequence_start=True)
    expected = stateless(client, values)["predictions"]
    np.testing.assert_allclose(result.as_numpy("predictions"), expected, atol=1e-5)
    assert position(client, session) == 12


def test_a_refused_sequence_start_leaves_the_sequence_as_it_was(model: dict[str, Any], client: httpx.Client) -> None:
    """The restart and the chunk are one commit: a start the engine refuses (here: values the model
    cannot answer) does not wipe the sequence it was to replace."""
    session = new_id("v2")
    first = {"inputs": [_values_tensor(series(3))], "parameters": {"sequence_id": session, "sequence_start": True}}
    assert _infer(client, model["name"], first).status_code == 200
    extreme = {"inputs": [_values_tensor(np.array([[3e38], [-3e38]], np.float32))],
               "parameters": {"sequence_id": session, "sequence_start": True}}
    _assert_v2_error(_infer(client, model["name"], extreme), 422)
    assert position(client, session) == 3


def test_offset_parameter_makes_a_resent_chunk_safe(model: dict[str, Any], client: httpx.Client) -> None:
    session = new_id("v2")
    values = series(10, seed=8)
    first = {"inputs": [_values_tensor(values[:6])],
             "parameters": {"sequence_id": session, "sequence_start": True}}
    assert _infer(client, model["name"], first).status_code == 200
    second = {"inputs": [_values_tensor(values[6:])], "parameters": {"sequence_id": session, "offset": 6}}
    answers = [_infer(client, model["name"], second) for _ in range(2)]  # the resend changes nothing
    assert answers[0].status_code == answers[1].status_code == 200
    assert answers[0].json() == answers[1].json()
    assert position(client, session) == 10
    stale = _assert_v2_error(_infer(client, model["name"], {**second, "parameters": {"sequence_id": session,
                                                                                      "offset": 3}}), 409)
    assert stale["position"] == 10


def _started_with_a_forged_kept_answer(model: dict[str, Any], client: httpx.Client) -> tuple[str, dict[str, Any]]:
    """A sequence of 4 steps whose kept answer (imported) holds no ``predictions``; its id and first chunk."""
    session, values = new_id("v2"), series(4, seed=9)
    start = {"inputs": [_values_tensor(values)], "parameters": {"sequence_id": session, "sequence_start": True}}
    assert _infer(client, model["name"], start).status_code == 200
    raw = client.get(f"/v1/sessions/{session}/state").content
    length = int.from_bytes(raw[:8], "little")
    skeleton = orjson.dumps({"session_id": session, "position": 4})
    forged = save({**load(raw), "answer": np.frombuffer(skeleton, np.uint8)},
                  metadata=orjson.loads(raw[8 : 8 + length])["__metadata__"])
    imported = client.put(f"/v1/sessions/{session}/state", content=forged,
                          headers={"content-type": "application/octet-stream"})
    assert imported.status_code == 200, imported.text
    return session, start


def test_a_resent_chunk_whose_imported_kept_answer_lacks_its_outputs_is_422_not_500(
    model: dict[str, Any], client: httpx.Client
) -> None:
    """An imported document carries the answer an exact retry gets again; one forged to hold no
    ``predictions`` (its prefix and position as the import checks them) is refused on replay, not a 500."""
    session, start = _started_with_a_forged_kept_answer(model, client)
    resent = {**start, "parameters": {"sequence_id": session, "offset": 0}}
    refused = _assert_v2_error(_infer(client, model["name"], resent), 422)
    assert refused["type"].endswith("/invalid-state") and "predictions" in refused["detail"]
    assert position(client, session) == 4


def test_a_refused_resent_chunk_with_sequence_end_does_not_end_the_sequence(
    model: dict[str, Any], client: httpx.Client
) -> None:
    """The same refused replay with ``sequence_end``: the sequence was deleted before the answer was built,
    so the 422, which says to start again or import, had ended the sequence it left "as it was"."""
    session, start = _started_with_a_forged_kept_answer(model, client)
    resent = {**start, "parameters": {"sequence_id": session, "offset": 0, "sequence_end": True}}
    _assert_v2_error(_infer(client, model["name"], resent), 422)
    assert position(client, session) == 4


def test_tenants_sequences_with_one_id_are_separate(server_factory: ServerFactory) -> None:
    keys = {"alice": "alice-key-0123456789abcdef", "bob": "bob-key-0123456789abcdef"}
    server = server_factory(GRU_API_KEYS=",".join(f"{key}:{tenant}" for tenant, key in keys.items()))
    connection = triton.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        name = httpx.get(server.url + "/v1/model", headers={"X-API-Key": keys["alice"]}).json()["name"]
        def as_(tenant: str) -> dict[str, str]:  # a fresh dict each call: tritonclient adds to it
            return {"Authorization": f"Bearer {keys[tenant]}"}

        connection.infer(name, [_input(series(9))], sequence_id=42, sequence_start=True, headers=as_("alice"))
        with pytest.raises(InferenceServerException) as caught:  # bob's sequence 42 never started
            connection.infer(name, [_input(series(3))], sequence_id=42, headers=as_("bob"))
        assert caught.value.status() == "404"
        with pytest.raises(InferenceServerException) as caught:
            connection.infer(name, [_input(series(3))])  # no key at all
        assert caught.value.status() == "401"
        info = httpx.get(server.url + "/v1/sessions/42", headers=as_("alice")).json()
        assert info["position"] == 9
    finally:
        connection.close()


# -- stateless calls and tensor encodings -------------------------------------------------------------


def test_call_without_sequence_id_is_stateless_and_keeps_nothing(
    tc: triton.InferenceServerClient, model: dict[str, Any], client: httpx.Client
) -> None:
    values = series(20, seed=9)
    expected = stateless(client, values, horizon=3)
    for _ in range(2):  # same answer twice: no state carried over
        result = tc.infer(model["name"], [_input(values)], parameters={"horizon": 3})
        np.testing.assert_allclose(result.as_numpy("predictions"), expected["predictions"], atol=1e-5)
        np.testing.assert_allclose(result.as_numpy("forecast"), expected["forecast"], atol=1e-5)
        assert "parameters" not in result.get_response()


def test_batched_input_shape_gives_batched_outputs(tc: triton.InferenceServerClient, model: dict[str, Any],
                                                   client: httpx.Client) -> None:
    values = series(6, seed=10)
    result = tc.infer(model["name"], [_input(values[None])], parameters={"horizon": 2})  # (1, T, F)
    assert result.as_numpy("predictions").shape == (1, 6, 1)
    assert result.as_numpy("forecast").shape == (1, 2, 1)
    np.testing.assert_allclose(result.as_numpy("predictions")[0], stateless(client, values)["predictions"],
                               atol=1e-5)


def test_json_data_flat_or_nested_and_json_answer(model: dict[str, Any], client: httpx.Client) -> None:
    values = series(5, seed=11)
    flat = _infer(client, model["name"], {"id": "req-1", "inputs": [_values_tensor(values)],
                                          "parameters": {"horizon": 2}})
    nested = _infer(client, model["name"], {"id": "req-1", "parameters": {"horizon": 2}, "inputs": [
        {"name": "values", "shape": [5, 1], "datatype": "FP32", "data": values.tolist()}]})
    assert flat.status_code == nested.status_code == 200, flat.text
    assert flat.headers["content-type"] == "application/json" and HEADER not in flat.headers
    assert flat.json() == nested.json()
    body = flat.json()
    assert body["id"] == "req-1" and [o["name"] for o in body["outputs"]] == ["predictions", "forecast"]
    predictions = body["outputs"][0]
    assert predictions["shape"] == [5, 1] and predictions["datatype"] == "FP32"
    expected = np.ravel(stateless(client, values)["predictions"])
    np.testing.assert_allclose(predictions["data"], expected, atol=1e-5)


def test_raw_binary_request_and_binary_answer(model: dict[str, Any], client: httpx.Client) -> None:
    """The binary extension by hand: the JSON header, then the raw tensor; the answer likewise."""
    values = series(7, seed=12)
    header = orjson.dumps({
        "inputs": [{"name": "values", "shape": [7, 1], "datatype": "FP32",
                    "parameters": {"binary_data_size": 28}}],
        "parameters": {"binary_data_output": True},
    })
    response = client.post(f"/v2/models/{model['name']}/infer",
                           content=header + values.astype("<f4").tobytes(),
                           headers={HEADER: str(len(header)), "content-type": "application/octet-stream"})
    assert response.status_code == 200, response.text
    length = int(response.headers[HEADER])
    answer = orjson.loads(response.content[:length])
    assert answer["outputs"][0]["parameters"]["binary_data_size"] == 28
    predictions = np.frombuffer(response.content[length:], dtype="<f4").reshape(7, 1)
    np.testing.assert_allclose(predictions, stateless(client, values)["predictions"], atol=1e-5)


def test_gzip_compressed_request(tc: triton.InferenceServerClient, model: dict[str, Any],
                                 client: httpx.Client) -> None:
    values = series(16, seed=13)
    result = tc.infer(model["name"], [_input(values)], request_compression_algorithm="gzip",
                      response_compression_algorithm="gzip")
    expected = stateless(client, values)["predictions"]
    np.testing.assert_allclose(result.as_numpy("predictions"), expected, atol=1e-5)
    bomb = gzip.compress(b" " * (64 * 1024 * 1024))  # inflates past GRU_MAX_BODY_BYTES: refused, not inflated
    response = client.post(f"/v2/models/{model['name']}/infer", content=bomb,
                           headers={"content-encoding": "gzip"})
    _assert_v2_error(response, 413)


# -- errors ------------------------------------------------------------------------------------------


def _bad_requests(features: int) -> list[tuple[str, dict[str, Any]]]:
    good = {"name": "values", "shape": [2, features], "datatype": "FP32", "data": [0.5] * (2 * features)}
    session = {"sequence_id": "v2-bad-target"}  # the live session the test checks is untouched
    return [
        ("no inputs", {"inputs": []}),
        ("inputs not a list", {"inputs": {"values": [1.0]}}),
        ("wrong input name", {"inputs": [{**good, "name": "x"}]}),
        ("two inputs", {"inputs": [good, good]}),
        ("wrong datatype", {"inputs": [{**good, "datatype": "FP64"}]}),
        ("rank 1", {"inputs": [{**good, "shape": [2 * features]}]}),
        ("batch of 2", {"inputs": [{**good, "shape": [2, 1, features], "data": [0.5] * (2 * features)}]}),
        ("wrong feature count",
         {"inputs": [{**good, "shape": [1, features + 1], "data": [0.5] * (features + 1)}]}),
        ("no steps", {"inputs": [{**good, "shape": [0, features], "data": []}]}),
        ("too many elements", {"inputs": [{**good, "data": [0.5] * (2 * features + 1)}]}),
        ("string data", {"inputs": [{**good, "data": ["0.5"] * (2 * features)}]}),
        ("boolean data", {"inputs": [{**good, "data": [True] * (2 * features)}]}),
        ("null data", {"inputs": [{**good, "data": None}]}),
        ("ragged nesting", {"inputs": [{**good, "data": [[0.5] * features, 0.5]}]}),
        ("ragged rows of the right total",
         {"inputs": [{**good, "data": [[0.5] * (2 * features), []]}]}),
        ("rows nested across the shape", {"inputs": [{**good, "data": [[0.5] * (2 * features)]}]}),
        ("batched shape, rows nested across the shape",
         {"inputs": [{**good, "shape": [1, 2, features], "data": [[[0.5] * (2 * features)]]}]}),
        ("beyond FP32", {"inputs": [{**good, "data": [1e39] * (2 * features)}]}),
        ("shape of strings", {"inputs": [{**good, "shape": ["2", str(features)]}]}),
        ("too many steps",
         {"inputs": [{**good, "shape": [5000, features], "data": [0.5] * (5000 * features)}]}),
        ("horizon over max", {"inputs": [good], "parameters": {"horizon": 10_000}}),
        ("negative horizon", {"inputs": [good], "parameters": {"horizon": -1}}),
        ("horizon as string", {"inputs": [good], "parameters": {"horizon": "3"}}),
        ("unknown output", {"inputs": [good], "outputs": [{"name": "hidden"}]}),
        ("forecast without horizon", {"inputs": [good], "outputs": [{"name": "forecast"}]}),
        ("output asked twice, in JSON and in binary",  # one answer in one of them was a guess
         {"inputs": [good], "outputs": [{"name": "predictions"},
                                        {"name": "predictions", "parameters": {"binary_data": True}}]}),
        ("sequence_id 0", {"inputs": [good], "parameters": {"sequence_id": 0}}),
        ("sequence_id over uint64", {"inputs": [good], "parameters": {"sequence_id": 2**64}}),
        ("sequence_id bool", {"inputs": [good], "parameters": {"sequence_id": True}}),
        ("sequence_id with a slash", {"inputs": [good], "parameters": {"sequence_id": "a/b"}}),
        ("sequence_id with a final newline", {"inputs": [good], "parameters": {"sequence_id": "a\n"}}),
        ("start at an offset", {"inputs": [good], "parameters": {**session, "sequence_start": True, "offset": 7}}),
        ("sequence_start not bool", {"inputs": [good], "parameters": {**session, "sequence_start": 1}}),
        ("start without id", {"inputs": [good], "parameters": {"sequence_start": True}}),
        ("offset without id", {"inputs": [good], "parameters": {"offset": 0}}),
        ("offset beyond int64", {"inputs": [good], "parameters": {**session, "offset": 2**63}}),
        ("binary size wrong", {"inputs": [{**good, "data": None, "parameters": {"binary_data_size": 3}}]}),
        ("binary data missing",
         {"inputs": [{**good, "data": None, "parameters": {"binary_data_size": 8 * features}}]}),
        ("binary_data_output not bool", {"inputs": [good], "parameters": {"binary_data_output": "yes"}}),
        ("more inputs than the model can take", {"inputs": [good] * 9}),
        ("more dimensions than the model can take", {"inputs": [{**good, "shape": [1] * 9}]}),
        ("more outputs than the model answers", {"inputs": [good], "outputs": [{"name": "predictions"}] * 20}),
    ]


def test_bad_requests_are_400_in_both_error_shapes_and_change_nothing(
    model: dict[str, Any], client: httpx.Client
) -> None:
    name = model["name"]
    target = "v2-bad-target"
    start = {"inputs": [_values_tensor(series(3))],
             "parameters": {"sequence_id": target, "sequence_start": True}}
    assert _infer(client, name, start).status_code == 200
    for label, body in _bad_requests(model["input_features"]):
        parameters = body.get("parameters", {})
        if not {"sequence_id", "sequence_start", "offset"} & parameters.keys():  # aim it at the live session
            body = {**body, "parameters": {**parameters, "sequence_id": target}}
        response = _infer(client, name, body)
        assert response.status_code == 400, f"{label}: {response.status_code} {response.text}"
        _assert_v2_error(response, 400)
    assert position(client, target) == 3


def test_malformed_bodies_are_400(model: dict[str, Any], client: httpx.Client) -> None:
    url = f"/v2/models/{model['name']}/infer"
    for content, headers in [
        (b"{not json", {}),
        (b'{"inputs": [{"name": "values", "shape": [1, 1], "datatype": "FP32", "data": [NaN]}]}', {}),
        (b"[1, 2]", {}),
        (b'{"inputs": []}', {HEADER: "999"}),
        (b'{"inputs": []}', {HEADER: "-1"}),
        (b'{"inputs": []}', {HEADER: "\N{SUPERSCRIPT TWO}".encode("latin-1")}),  # a digit to str.isdigit()
        (b'{"inputs": []}', {HEADER: "9" * 5000}),  # past int()'s 4,300 digits
        (b'{"inputs": []}', {HEADER: "0" * 5000 + "999"}),
        (b"\x1f\x8bnot gzip", {"content-encoding": "gzip"}),
    ]:
        _assert_v2_error(client.post(url, content=content, headers=headers), 400)
    _assert_v2_error(client.post(url, content=b"{}", headers={"content-encoding": "br"}), 415)
    header = orjson.dumps({"inputs": [{"name": "values", "shape": [1, 1], "datatype": "FP32",
                                       "parameters": {"binary_data_size": 4}}]})
    both = orjson.dumps({"inputs": [{"name": "values", "shape": [1, 1], "datatype": "FP32", "data": [0.25],
                                     "parameters": {"binary_data_size": 4}}]})  # which one holds the values?
    nan, extra, half = (np.array(v, "<f4").tobytes() for v in ([np.nan], [0.5, 0.5], [0.5]))
    for head, tail in ((header, nan), (header, extra), (both, half)):
        response = client.post(url, content=head + tail, headers={HEADER: str(len(head))})
        _assert_v2_error(response, 400)


def test_two_different_header_lengths_are_400_not_the_first_one_believed(
    model: dict[str, Any], client: httpx.Client
) -> None:
    """Two Inference-Header-Content-Length lines that disagree say two things about where the JSON ends; a
    proxy may believe the other one, so neither is taken."""
    session = new_id("v2")
    start = {"inputs": [_values_tensor(series(2))], "parameters": {"sequence_id": session, "sequence_start": True}}
    assert _infer(client, model["name"], start).status_code == 200
    header = orjson.dumps({"inputs": [{"name": "values", "shape": [1, 1], "datatype": "FP32",
                                       "parameters": {"binary_data_size": 4}}],
                           "parameters": {"sequence_id": session}})
    body = header + np.array([0.5], "<f4").tobytes()
    response = client.post(f"/v2/models/{model['name']}/infer", content=body,
                           headers=[(HEADER, str(len(header))), (HEADER, str(len(header) - 4))])
    _assert_v2_error(response, 400)
    assert position(client, session) == 2


def test_refusals_from_outside_the_v2_code_carry_the_error_member(
    server: Server, model: dict[str, Any], client: httpx.Client
) -> None:
    """tritonclient reads only ``error``: a 405, an unknown route and the body limit's 413, all answered
    before any v2 code runs, carry it too."""
    url = f"/v2/models/{model['name']}/infer"
    _assert_v2_error(client.options(url), 405)
    _assert_v2_error(client.get(f"/v2/models/{model['name']}/nothing"), 404)
    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port)) as sock:
        sock.sendall(f"POST {url} HTTP/1.1\r\nHost: x\r\nContent-Length: 500000000\r\n\r\n".encode())
        sock.settimeout(5)
        answer = b"".join(iter(lambda: sock.recv(65536), b""))  # the server closes after a 413
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    problem = orjson.loads(body)
    assert problem["error"] == problem["detail"]


def _answer_to_raw(server: Server, request: bytes) -> tuple[bytes, dict[str, Any]]:
    """The status line and the problem of the answer to ``request``, sent as is; the server closes after it."""
    address = urlsplit(server.url)
    with socket.create_connection((address.hostname, address.port)) as sock:
        sock.sendall(request)
        sock.settimeout(5)
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0], orjson.loads(body)


def test_refusals_from_below_the_app_carry_the_error_member(server: Server, model: dict[str, Any]) -> None:
    """A head over 64 KiB (431) and a request httptools cannot parse (400) are answered by the HTTP protocol,
    before any route: their problems had no ``error`` under /v2, which promises it on every problem."""
    url = f"/v2/models/{model['name']}/infer".encode()
    too_large = b"POST " + url + b" HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    malformed = (b"POST " + url + b" HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"zz\r\nabc\r\n0\r\n\r\n")  # "zz" is no chunk size
    long_url = b"GET /v2?pad=" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"  # past parse_url's 64 KiB
    for request, status in ((too_large, b"431"), (malformed, b"400"), (long_url, b"431")):
        line, problem = _answer_to_raw(server, request)
        assert line.startswith(b"HTTP/1.1 " + status), line
        assert problem["error"] == problem["detail"], problem
    line, problem = _answer_to_raw(server, too_large.replace(url, b"/v1/predict"))  # v1 keeps RFC 9457 alone
    assert line.startswith(b"HTTP/1.1 431") and "error" not in problem


def test_error_reaches_tritonclient_with_our_message(tc: triton.InferenceServerClient,
                                                     model: dict[str, Any]) -> None:
    wrong = triton.InferInput("values", [3, 1], "FP64")
    wrong.set_data_from_numpy(np.zeros((3, 1), dtype=np.float64))
    with pytest.raises(InferenceServerException) as caught:
        tc.infer(model["name"], [wrong])
    assert caught.value.status() == "400"
    assert caught.value.message() == "input values has datatype FP64; the model takes FP32"


def test_v2_limits_are_inclusive() -> None:
    """Exactly GRU_MAX_CHUNK_STEPS steps and a horizon of exactly GRU_MAX_HORIZON are accepted, one more not."""
    def body(steps: int, horizon: int) -> bytes:
        return orjson.dumps({"inputs": [{"name": "values", "shape": [steps, 1], "datatype": "FP32",
                                         "data": [0.5] * steps}], "parameters": {"horizon": horizon}})

    call = parse_infer(body(8, 4), None, features=1, max_steps=8, max_horizon=4)
    assert (len(call.values), call.horizon) == (8, 4)
    for steps, horizon in ((9, 4), (8, 5)):
        with pytest.raises(Problem):
            parse_infer(body(steps, horizon), None, features=1, max_steps=8, max_horizon=4)


def test_data_nested_to_another_shape_is_refused_not_reshaped() -> None:
    """Rows sent transposed (F lists of T numbers for shape [T, F]) are evenly nested and hold T × F numbers:
    they were flattened and cut into T rows again, each mixing features of several steps, and answered."""
    steps, features = 2, 3
    transposed = [[0.1, 0.2], [1.1, 1.2], [2.1, 2.2]]  # feature by feature, each over the 2 steps
    body = orjson.dumps({"inputs": [{"name": "values", "shape": [steps, features], "datatype": "FP32",
                                     "data": transposed}]})
    with pytest.raises(Problem) as refused:
        parse_infer(body, None, features=features, max_steps=8, max_horizon=4)
    assert refused.value.status == 400 and "another shape than [2, 3]" in refused.value.detail
    rows = orjson.dumps({"inputs": [{"name": "values", "shape": [1, steps, features], "datatype": "FP32",
                                     "data": [[0.1, 1.1, 2.1, 0.2, 1.2, 2.2]]}]})  # batch level, then flat
    call = parse_infer(rows, None, features=features, max_steps=8, max_horizon=4)
    np.testing.assert_array_equal(call.values, np.array(transposed, np.float32).T)
    unbatched = orjson.dumps({"inputs": [{"name": "values", "shape": [1, steps, features], "datatype": "FP32",
                                          "data": [[0.1, 1.1, 2.1], [0.2, 1.2, 2.2]]}]})  # its 1 left unnested
    call = parse_infer(unbatched, None, features=features, max_steps=8, max_horizon=4)
    np.testing.assert_array_equal(call.values, np.array(transposed, np.float32).T)


def test_a_compression_bomb_is_refused_without_inflating_it() -> None:
    """The body is inflated at most to the limit and one byte: a 256 MB bomb must not cost 256 MB to refuse."""
    bomb = gzip.compress(b" " * (256 * 1024 * 1024))
    tracemalloc.start()
    try:
        with pytest.raises(Problem) as refused:
            decode_body(bomb, b"gzip", 1024 * 1024)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert refused.value.status == 413
    assert peak < 16 * 1024 * 1024, peak


def test_a_body_of_many_bad_elements_costs_one_error_not_one_each() -> None:
    """Each invalid list element made its own pydantic error, all built to name the first five: 150 kB of
    empty input tensors took 88 MB and 2 s of the event loop to refuse (4 MB: 2.4 GB, over a minute)."""
    good = {"name": "values", "shape": [1, 1], "datatype": "FP32", "data": [0.5]}
    many = 50_000
    for document in ({"inputs": [{}] * many}, {"inputs": [good], "outputs": [{}] * many},
                     {"inputs": [{**good, "shape": ["1"] * many}]}):
        tracemalloc.start()
        try:
            with pytest.raises(Problem) as refused:
                parse_infer(orjson.dumps(document), None, features=1, max_steps=8, max_horizon=4)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert refused.value.status == 400 and "does not match the protocol" in refused.value.detail
        assert peak < 16 * 1024 * 1024, peak


def test_a_list_longer_than_the_model_takes_is_refused_at_its_count() -> None:
    """The model takes one input of at most 3 dimensions and answers at most 19 outputs, yet every element of
    those lists was looked at before their count: 4 MB of valid extra input tensors cost 0.36 s of the event
    loop and were all named in a 666 kB answer, a shape of 2 million dimensions 0.22 s and a 6 MB answer,
    180,000 outputs 0.9 s. Now a list is refused at its count: a bad element past it is never reached."""
    good = {"name": "values", "shape": [1, 1], "datatype": "FP32", "data": [0.5]}
    many = 50_000
    for where, document in [
        ("inputs", lambda tail: {"inputs": [good] * many + tail}),
        ("inputs.0.shape", lambda tail: {"inputs": [{**good, "shape": [1] * many + tail}]}),
        ("outputs", lambda tail: {"inputs": [good], "outputs": [{"name": "predictions"}] * many + tail}),
    ]:
        for tail in ([], [{}]):  # valid elements only, or a bad one last that only a walk of them all meets
            with pytest.raises(Problem) as refused:
                parse_infer(orjson.dumps(document(tail)), None, features=1, max_steps=8, max_horizon=4)
            assert refused.value.status == 400
            assert f"{where}: List should have at most" in refused.value.detail, refused.value.detail[:200]
            assert len(refused.value.detail) < 512, len(refused.value.detail)
    asked = {"inputs": [good], "parameters": {"horizon": 1, "levels": [50, 80, 90, 99.5], "scores": True}}
    every = parse_infer(orjson.dumps(asked), None, features=1, max_steps=8, max_horizon=4).outputs
    listed = {**asked, "outputs": [{"name": name} for name in every]}  # each output the model has, once
    assert parse_infer(orjson.dumps(listed), None, features=1, max_steps=8, max_horizon=4).outputs == every
    assert len(every) == 19


def test_a_refusal_quotes_a_short_prefix_of_what_it_refuses() -> None:
    """A refusal names the value it refuses, but a name, a datatype or a parameter of 100 kB was echoed
    whole (a 4 MB body got a 4 MB answer): at most a few dozen characters of each, and a few elements of a
    list, are quoted now."""
    long = "x" * 100_000
    good = {"name": "values", "shape": [1, 1], "datatype": "FP32", "data": [0.5]}
    for label, document, header_length in [
        ("input name", {"inputs": [{**good, "name": long}]}, None),
        ("input names", {"inputs": [{**good, "name": long}] * 8}, None),
        ("datatype", {"inputs": [{**good, "datatype": long}]}, None),
        ("binary_data_size", {"inputs": [{**good, "data": None, "parameters": {"binary_data_size": long}}]}, None),
        ("output name", {"inputs": [good], "outputs": [{"name": long}]}, None),
        ("sequence_id", {"inputs": [good], "parameters": {"sequence_id": long}}, None),
        ("sequence_id list", {"inputs": [good], "parameters": {"sequence_id": [long] * 10}}, None),
        ("sequence_start", {"inputs": [good], "parameters": {"sequence_start": long}}, None),
        ("horizon", {"inputs": [good], "parameters": {"horizon": long}}, None),
        ("levels", {"inputs": [good], "parameters": {"levels": [50] * 100_000}}, None),
        ("header length", {"inputs": [good]}, "9" * 60_000),
    ]:
        with pytest.raises(Problem) as refused:
            parse_infer(orjson.dumps(document), header_length, features=1, max_steps=8, max_horizon=4)
        assert refused.value.status == 400, label
        assert len(refused.value.detail) < 1024, (label, refused.value.detail[:200])


def test_a_key_given_twice_is_400_not_the_last_one_believed(model: dict[str, Any], client: httpx.Client) -> None:
    """A JSON object naming a key twice says two things: the last was applied, where Triton's parser, like
    other parsers, reads the first, so a gateway could see another sequence or other values than the ones
    applied. v1 refuses such a body too (``duplicate_key``)."""
    session, other = new_id("v2"), new_id("v2")
    start = {"inputs": [_values_tensor(series(2))], "parameters": {"sequence_id": session, "sequence_start": True}}
    assert _infer(client, model["name"], start).status_code == 200
    tensor = '{"name": "values", "shape": [1, 1], "datatype": "FP32", "data": [0.5]%s}'
    for inputs, parameters in [
        (tensor % ', "data": [0.25]', f'"sequence_id": "{session}"'),
        (tensor % "", f'"sequence_id": "{session}", "sequence_id": "{other}", "sequence_start": true'),
        (tensor % ', "parameters": {"x": "\\"", "x": 1}', f'"sequence_id": "{session}"'),  # an escaped quote
    ]:
        body = f'{{"inputs": [{inputs}], "parameters": {{{parameters}}}}}'.encode()
        assert "given twice" in _assert_v2_error(_infer_raw(client, model["name"], body), 400)["error"]
    header = orjson.dumps({"inputs": [{"name": "values", "shape": [1, 1], "datatype": "FP32",
                                       "parameters": {"binary_data_size": 4}}]})
    header = header[:-1] + f', "parameters": {{"sequence_id": "{session}", "horizon": 1, "horizon": 2}}}}'.encode()
    binary = client.post(f"/v2/models/{model['name']}/infer", content=header + np.array([0.5], "<f4").tobytes(),
                         headers={HEADER: str(len(header))})
    assert "given twice" in _assert_v2_error(binary, 400)["error"]
    assert position(client, session) == 2
    assert client.get(f"/v1/sessions/{other}").status_code == 404
    escaped = f'{{"inputs": [{tensor % ""}], "parameters": {{"sequence_id": "{session}", "x": "\\"\\\\"}}}}'
    assert _infer_raw(client, model["name"], escaped.encode()).status_code == 200  # quotes, but no key twice
    for inner, status in (("1", 200), ('{"z": 1, "z": 2}', 400)):  # past the 254 levels orjson writes
        deep = f'{{"x": "\\"", "y": {"[" * 1000}{inner}{"]" * 1000}}}'
        deep_body = f'{{"inputs": [{tensor % ""}], "parameters": {deep}}}'.encode()
        assert _infer_raw(client, model["name"], deep_body).status_code == status  # checked, not a 500
    # Past 64 KiB a repeat is refused without parsing the header again to name it (Python's parser cost 1.6 s
    # of the event loop for 4 MB of small objects); escaped quotes alone never make it parse again.
    junk = ", ".join(['{"\\"": 1}'] * 20_000)
    for repeat, status in (("", 200), (', "k": 1, "k": 2', 400)):
        body = f'{{"inputs": [{tensor % ""}], "junk": [{junk}]{repeat}}}'.encode()
        answer = _infer_raw(client, model["name"], body)
        assert answer.status_code == status, answer.text
    assert "a key is given twice" in answer.json()["error"]


def _infer_raw(http: httpx.Client, name: str, body: bytes) -> httpx.Response:
    return http.post(f"/v2/models/{name}/infer", content=body)
