"""Intervals and surprise scores through the API, on the shipped (calibrated) model and real data."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors.numpy import load, save
from websockets.sync.client import connect

from harness.processes import RedisServer, wait_http
from model.data import load_dataset, series_from_frame
from service.client import Client
from service.config import DEFAULT_MODEL_PATH
from service.refusals import StaleModel
from service.rules import judge
from service.sessions.base import Write
from tests.conftest import Server, ServerFactory, start_server
from tests.service.helpers import assert_problem, new_id, position, send

_SHIPPED = json.loads((DEFAULT_MODEL_PATH / "config.json").read_text())
LAGS = _SHIPPED["model"]["lags"]  # a spike stays this long in view
CALIBRATION_COUNT = _SHIPPED["calibration"]["counts"][0]  # N: the smallest p-value is 1/(N + 1)


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    running = start_server(DEFAULT_MODEL_PATH, tmp_path_factory.mktemp("calibrated"))
    yield running
    running.stop(signal.SIGKILL)


@pytest.fixture
def http(calibrated: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=calibrated.url, timeout=60) as client:
        yield client


def _seattle(start: int, rows: int) -> np.ndarray:
    """Hourly Seattle temperatures (vega_datasets), the shipped model's series, (rows, 1) float32."""
    values = series_from_frame(load_dataset("seattle-temps"), None, "seattle-temps").values
    return values[start : start + rows].astype(np.float32)


def _noisier(values: np.ndarray, seed: int = 0) -> np.ndarray:
    """The series with noise several times the model's validation errors: its intervals must adapt."""
    rng = np.random.default_rng(seed)
    return (values + rng.normal(0, 0.3, values.shape)).astype(np.float32)


def _post(client: httpx.Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def _surprises(client: httpx.Client) -> float:
    found = re.search(r'^gru_surprises_total\{model="seattle-temp"\} (\S+)$', client.get("/metrics").text, re.M)
    assert found, "gru_surprises_total is not exported"
    return float(found.group(1))


def test_spikes_rank_above_every_ordinary_step_and_score_alike_in_chunks_and_in_one_call(
    http: httpx.Client,
) -> None:
    """Spikes of 2 °F in a stretch of the real series: each one's p-value is the smallest there is, 1/(N + 1)
    (a score beyond every calibration error), and no ordinary step's is smaller. One ordinary step may tie
    with them: hour 2,491, a real fall (53.6, 51.6, 50.0 °F) beyond every calibration error too (about 1 in
    N + 1 ordinary steps is); ties count half, so the AUC is at least 1 − 0.5 / (ordinary steps). The
    warm-up (the first K steps from a fresh state) and the K + 1 steps after a spike, whose lag window still
    holds one of the two differences it made (echoes), are neither. Streamed in chunks of 37 or sent whole,
    the scores agree; the first K + 1 values, predicted without a full lag window, have none."""
    values = _seattle(2000, 1000)
    rng = np.random.default_rng(0)
    spikes = np.arange(100, 950, 80) + rng.integers(0, 20, 11)
    values[spikes, 0] += rng.choice([-2.0, 2.0], len(spikes))
    whole = np.array(_post(http, "/v1/predict", {"values": values.tolist(), "scores": True})["scores"],
                     dtype=np.float64)[:, 0]  # null -> nan
    assert np.isnan(whole[: LAGS + 1]).all() and not np.isnan(whole[LAGS + 1 :]).any()
    ordinary = np.ones(len(values), bool)
    ordinary[: LAGS + 1] = False
    for spike in spikes:
        ordinary[spike : spike + LAGS + 2] = False
    spiked, calm = whole[spikes], whole[ordinary]
    at_floor = np.isclose(whole, 1 / (CALIBRATION_COUNT + 1), rtol=1e-6, atol=0)  # float32 in the answer
    assert at_floor[spikes].all(), spiked
    assert not (calm < spiked.min()).any()  # no ordinary step more surprising than a spike
    assert set(np.flatnonzero(at_floor & ordinary)) <= {491}  # the real fall at hour 2,491
    auc = np.mean([(calm > s).mean() + 0.5 * (calm == s).mean() for s in spiked])
    assert auc >= 1 - 0.5 / calm.size, auc
    assert calm.size > 300

    before, session, streamed = _surprises(http), new_id(), []
    for start in range(0, len(values), 37):
        answer = _post(http, f"/v1/sessions/{session}/predict",
                       {"values": values[start : start + 37].tolist(), "offset": start, "scores": True})
        streamed += [row[0] for row in answer["scores"]]
    streamed_scores = np.array(streamed, dtype=np.float64)
    np.testing.assert_allclose(streamed_scores, whole, atol=2e-4, equal_nan=True)  # float32 rounding only
    # every spike counts; the stateless call before counted nothing (it is not a session's arriving value)
    assert _surprises(http) - before == np.count_nonzero(streamed_scores < 0.01) >= len(spikes)


def test_intervals_surround_the_predictions_and_widen_with_the_level(http: httpx.Client) -> None:
    values = _seattle(7100, 120)
    plain = http.post("/v1/predict", json={"values": values.tolist(), "horizon": 30})
    asked = _post(http, "/v1/predict", {"values": values.tolist(), "horizon": 30, "levels": [95, 80.0, 99.5]})
    assert list(plain.json()) == ["predictions", "forecast", "model_version", "model", "version"]  # as it was
    assert list(asked) == ["predictions", "forecast", "intervals", "forecast_intervals", "model_version", "model",
                           "version"]
    assert asked["predictions"] == plain.json()["predictions"] and asked["forecast"] == plain.json()["forecast"]
    assert list(asked["intervals"]) == list(asked["forecast_intervals"]) == ["95", "80", "99.5"]
    for key, centre in (("intervals", "predictions"), ("forecast_intervals", "forecast")):
        middle = np.array(asked[centre])
        widths = []
        for level in ("80", "95", "99.5"):
            lower, upper = (np.array(asked[key][level][side]) for side in ("lower", "upper"))
            assert lower.shape == upper.shape == middle.shape
            assert (lower < middle).all() and (middle < upper).all()
            np.testing.assert_allclose(upper - middle, middle - lower, rtol=1e-4)
            widths.append(upper - lower)
        assert (widths[0] <= widths[1]).all() and (widths[1] <= widths[2]).all()  # nested
    band = asked["forecast_intervals"]["95"]
    width = np.array(band["upper"])[:, 0] - np.array(band["lower"])[:, 0]
    assert width[-1] > 2 * width[0]  # a forecast band widens with the step, as the real errors did
    assert band["lower"][0] == asked["intervals"]["95"]["lower"][-1]  # forecast[0] is the last prediction


def test_a_jump_across_float32_is_answered_with_finite_intervals_and_no_warning_in_the_log(
    calibrated: Server, http: httpx.Client,
) -> None:
    """1e38 then −1e38 after a day of real values: the predictions stay finite, so it is a 200 whose
    intervals are numbers (never null) and whose last two scores are the smallest p-value; the second
    score passes float32's range once divided by g(1e38) < 1, and no numpy warning reaches the log."""
    values = np.concatenate([_seattle(3000, LAGS + 2)[:, 0], [1e38, -1e38]]).astype(np.float32)
    asked = _post(http, "/v1/predict", {"values": values.tolist(), "horizon": 3, "levels": [50, 99],
                                        "scores": True})
    for key in ("intervals", "forecast_intervals"):
        for band in asked[key].values():
            assert np.isfinite(np.array([band["lower"], band["upper"]], dtype=np.float64)).all(), band
    np.testing.assert_allclose(asked["scores"][-2:], [[1 / (CALIBRATION_COUNT + 1)]] * 2, rtol=1e-6)
    assert "RuntimeWarning" not in calibrated.log()


def _lifted(state: np.ndarray) -> np.ndarray:
    """``state`` with its running error level log u (the shipped model's last value: one feature, normalised
    scores) at 100: finite, but e^100 is past float32, and nothing before the lag window is full clips it."""
    lifted = state.copy()
    lifted[-1] = 100.0
    return lifted


def test_an_imported_state_beyond_the_models_log_scale_limit_is_refused(http: httpx.Client) -> None:
    """A state document was checked for finite numbers only, so one could carry log u = 100. Before the lag
    window is full nothing is scored and u is not updated, so the intervals of the next chunks were infinite
    and answered as null bounds. Such a document is not one the service writes: a 422, nothing changed."""
    session = new_id("lifted")
    values = _seattle(5000, LAGS + 8)[:, 0]
    assert send(http, session, values[:5], offset=0).status_code == 200
    exported = http.get(f"/v1/sessions/{session}/state")
    assert exported.status_code == 200, exported.text
    raw = exported.content
    length = int.from_bytes(raw[:8], "little")
    tensors = load(raw)
    lifted = save({**tensors, "state": _lifted(tensors["state"])},
                  metadata=json.loads(raw[8 : 8 + length])["__metadata__"])
    imported = http.put(f"/v1/sessions/{session}/state", content=lifted,
                        headers={"Content-Type": "application/octet-stream"})
    problem = assert_problem(imported, 422)
    assert problem["type"].endswith("/invalid-state") and "log-scales reach 100" in problem["detail"], problem
    assert http.get(f"/v1/sessions/{session}/state").content == raw
    answer = send(http, session, values[5:6], offset=5, levels=[80])  # on the state the export had
    assert answer.status_code == 200 and np.isfinite(np.array(answer.json()["intervals"]["80"]["upper"])).all()


def test_a_stored_state_whose_intervals_pass_float32_is_refused_like_outputs_that_do() -> None:
    """The engine's own check, behind the import's: a chunk whose interval bounds are not finite (a stored
    state with log u = 100, as a snapshot or a Redis record from outside could hold) is the 422
    out-of-range a chunk whose predictions are not finite gets, never an answer with null bounds, and
    nothing changes; a chunk that asks no intervals goes on."""
    import torch

    from model import load_checkpoint
    from service.engine import Engine
    from service.extras import Extras
    from service.metrics import Metrics
    from service.refusals import OutOfRange
    from service.sessions.base import session_key
    from service.sessions.memory import MemoryStore

    forecaster, meta = load_checkpoint(DEFAULT_MODEL_PATH, "cpu")
    store = MemoryStore(forecaster.state_size, torch.device("cpu"), max_sessions=10, ttl_seconds=600)
    engine = Engine(forecaster, meta["version"], store, Metrics(), max_batch_size=8, max_batch_delay_ms=1,
                    max_queue=10, request_timeout_seconds=30)
    values, key = _seattle(5000, LAGS + 8), session_key("t", "lifted")

    async def scenario() -> None:
        await engine.start()
        try:
            await engine.predict(key, values[:5], 0, 0)
            session = (await store.load([key]))[0]
            assert session is not None
            state = torch.from_numpy(_lifted(store.gather([session], "cpu")[0].numpy()))[None]
            await store.commit([Write(key, session.revision, 5, session.model_version, session.last_offset,
                                      session.fingerprint, session.answer, 0)], state)
            for extras, horizon in ((Extras(levels=(80.0,)), 0), (Extras(levels=(50.0, 99.0), scores=True), 3)):
                with pytest.raises(OutOfRange):
                    await engine.predict(key, values[5:6], 5, horizon, extras=extras)
                assert (await store.load([key]))[0].position == 5  # type: ignore[union-attr]
            plain = json.loads(await engine.predict(key, values[5:], 5, 0))
            assert plain["position"] == LAGS + 8 and np.isfinite(np.array(plain["predictions"])).all()
        finally:
            await engine.stop()

    asyncio.run(scenario())


def test_exact_retries_repeat_levels_and_scores_and_other_fields_are_another_chunk(http: httpx.Client) -> None:
    values, session = _seattle(3000, 40), new_id()
    fields = {"levels": [80, 95], "scores": True, "horizon": 3}
    first = send(http, session, values[:20], offset=0, **fields)
    second = send(http, session, values[20:], offset=20, **fields)
    assert first.status_code == second.status_code == 200
    again = send(http, session, values[20:], offset=20, **fields)
    assert again.status_code == 200 and again.content == second.content
    for other in ({"levels": [80], "scores": True, "horizon": 3}, {"scores": True, "horizon": 3},
                  {"levels": [80, 95], "horizon": 3}, {"horizon": 3}):
        assert_problem(send(http, session, values[20:], offset=20, **other), 409)
    assert position(http, session) == 40


_BAD_LEVELS = {
    "zero": b'[0]', "a hundred": b'[100]', "over a hundred": b'[150]', "a string": b'["95"]',
    "five levels": b'[50, 60, 70, 80, 90]', "NaN": b'[NaN]', "a repeat": b'[80, 80.0]', "none": b'[]',
    "not a list": b'95', "two levels one key": b'[80, 80.0000001]',  # both would answer as intervals["80"]
}


@pytest.mark.parametrize("levels", _BAD_LEVELS.values(), ids=_BAD_LEVELS.keys())
def test_bad_levels_are_422_on_every_route_and_change_nothing(http: httpx.Client, levels: bytes) -> None:
    session, values = new_id(), _seattle(0, 5)
    assert send(http, session, values[:2]).status_code == 200
    chunk = json.dumps(values[2:].tolist()).encode()
    body = b'{"values": ' + chunk + b', "offset": 2, "levels": ' + levels + b"}"
    problem = assert_problem(http.post(f"/v1/sessions/{session}/predict", content=body), 422)
    assert any(e["loc"][:2] == ["body", "levels"] for e in problem["errors"]), problem
    assert_problem(http.post("/v1/predict", content=b'{"values": ' + chunk + b', "levels": ' + levels + b"}"), 422)
    item = b'{"session_id": "' + session.encode() + b'", "values": ' + chunk + b', "offset": 2, "levels": ' + levels
    batch = http.post("/v1/predict/batch", content=b'{"items": [' + item + b"}]}")
    assert batch.status_code == 200 and batch.json()["results"][0]["status"] == 422, batch.text
    assert position(http, session) == 2
    assert send(http, session, values[2:], offset=2).status_code == 200  # the session is where it was


def test_scores_must_be_true_or_false(http: httpx.Client) -> None:
    assert_problem(http.post("/v1/predict", json={"values": [1.0, 2.0], "scores": "yes"}), 422)
    assert_problem(http.post("/v1/predict", json={"values": [1.0, 2.0], "scores": 1}), 422)


def test_the_request_schemas_say_how_many_first_values_have_no_score(http: httpx.Client) -> None:
    """/docs said a series' first value has no score; its first K + 1 have none (K = the model's lags), as the
    README says, and a client reading the schema took the 2nd to (K + 1)th nulls for a fault."""
    lags = http.get("/v1/model").json()["lags"]
    scores = _post(http, "/v1/predict", {"values": _seattle(0, lags + 3).tolist(), "scores": True})["scores"]
    assert [row == [None] for row in scores] == [True] * (lags + 1) + [False] * 2
    schemas = http.get("/openapi.json").json()["components"]["schemas"]
    for name in ("ChunkRequest", "StatelessRequest", "BatchItem"):
        described = schemas[name]["properties"]["scores"]["description"]
        assert "null for a series' first K + 1 values (K: the model's `lags`)" in described, (name, described)


def test_a_model_without_calibration_says_how_to_add_it_and_changes_nothing(client: httpx.Client) -> None:
    session = new_id()
    for fields in ({"levels": [90]}, {"scores": True}):
        problem = assert_problem(send(client, session, np.ones((3, 1), np.float32), **fields), 422)
        assert problem["type"].endswith("/not-calibrated") and "python -m model.train" in problem["detail"]
        assert_problem(client.post("/v1/predict", json={"values": [1.0, 2.0], **fields}), 422)
    assert_problem(client.get(f"/v1/sessions/{session}"), 404)
    assert send(client, session, np.ones((3, 1), np.float32)).status_code == 200  # without them: served


def _stream(client: httpx.Client, session: str, values: np.ndarray, start: int, stop: int,
            size: int = 50) -> dict[str, Any]:
    answer: dict[str, Any] = {}
    for at in range(start, stop, size):
        answer = _post(client, f"/v1/sessions/{session}/predict",
                       {"values": values[at : min(at + size, stop)].tolist(), "offset": at, "levels": [80, 95]})
    return answer


def _assert_adapted(last: dict[str, Any], client: httpx.Client, values: np.ndarray, tail: int) -> None:
    """The last chunk's intervals are those of one stateless pass over the whole series, and not those
    of a fresh state: what the session adapted before the break carried over."""
    whole = _post(client, "/v1/predict", {"values": values.tolist(), "levels": [80, 95]})["intervals"]
    fresh = _post(client, "/v1/predict", {"values": values[-tail:].tolist(), "levels": [80, 95]})["intervals"]
    for level in ("80", "95"):
        got = np.array(last["intervals"][level]["upper"]) - np.array(last["predictions"])
        np.testing.assert_allclose(got, np.array(whole[level]["upper"])[-tail:] - np.array(
            _post(client, "/v1/predict", {"values": values.tolist()})["predictions"])[-tail:], rtol=1e-4)
        assert not np.allclose(np.array(fresh[level]["upper"]), np.array(last["intervals"][level]["upper"]),
                               rtol=1e-2)


def test_adaptation_survives_a_snapshot_restart(server_factory: ServerFactory, tmp_path: Path) -> None:
    values, session = _noisier(_seattle(4000, 600)), new_id()
    snapshot = str(tmp_path / "sessions.safetensors")
    first = server_factory(model_path=DEFAULT_MODEL_PATH, GRU_SNAPSHOT_PATH=snapshot)
    with httpx.Client(base_url=first.url, timeout=60) as client:
        before = _stream(client, session, values, 0, 550)
    assert np.mean(np.array(before["intervals"]["95"]["upper"]) - np.array(before["predictions"])) > 0.3  # widened
    assert first.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    second = server_factory(model_path=DEFAULT_MODEL_PATH, GRU_SNAPSHOT_PATH=snapshot)
    with httpx.Client(base_url=second.url, timeout=60) as client:
        _assert_adapted(_stream(client, session, values, 550, 600), client, values, 50)


def test_adaptation_survives_a_redis_round_trip(server_factory: ServerFactory, redis_server: RedisServer) -> None:
    settings = {"GRU_STORE": "redis", "GRU_REDIS_URL": redis_server.url}
    pair = [server_factory(model_path=DEFAULT_MODEL_PATH, wait=False, **settings) for _ in range(2)]
    for server in pair:
        wait_http(server, "/readyz")
    values, session = _noisier(_seattle(5000, 600), seed=1), new_id()
    with httpx.Client(base_url=pair[0].url, timeout=60) as a, httpx.Client(base_url=pair[1].url, timeout=60) as b:
        _stream(a, session, values, 0, 550)
        _assert_adapted(_stream(b, session, values, 550, 600), b, values, 50)


def test_v2_answers_intervals_and_scores_as_output_tensors(http: httpx.Client, client: httpx.Client) -> None:
    values = _seattle(6000, 30)
    v1 = _post(http, "/v1/predict", {"values": values.tolist(), "horizon": 4, "levels": [90], "scores": True})
    body = {"inputs": [{"name": "values", "shape": [30, 1], "datatype": "FP32", "data": values.ravel().tolist()}],
            "parameters": {"horizon": 4, "levels": [90], "scores": True}}
    answer = _post(http, "/v2/models/seattle-temp/infer", body)
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert list(outputs) == ["predictions", "forecast", "lower_90", "upper_90", "forecast_lower_90",
                             "forecast_upper_90", "scores"]
    assert outputs["lower_90"]["shape"] == [30, 1] and outputs["forecast_upper_90"]["shape"] == [4, 1]
    assert outputs["lower_90"]["data"] == [row[0] for row in v1["intervals"]["90"]["lower"]]
    assert outputs["forecast_upper_90"]["data"] == [row[0] for row in v1["forecast_intervals"]["90"]["upper"]]
    assert outputs["scores"]["data"] == [row[0] for row in v1["scores"]]  # the first is null in both
    picked = _post(http, "/v2/models/seattle-temp/infer", {**body, "outputs": [{"name": "upper_90"}]})
    assert [o["name"] for o in picked["outputs"]] == ["upper_90"]
    for parameters in ({"levels": [100]}, {"levels": "90"}, {"levels": [90, 90]}, {"levels": [1, 2, 3, 4, 5]},
                       {"levels": [90, 90.0000001]}, {"scores": "yes"}):
        response = http.post("/v2/models/seattle-temp/infer", json={**body, "parameters": parameters})
        assert_problem(response, 400)
    tiny = client.get("/v1/model").json()["name"]
    bare = {**body, "parameters": {"scores": True}}
    assert_problem(client.post(f"/v2/models/{tiny}/infer", json=bare), 422)


def test_a_redis_state_of_another_layout_is_a_409_that_says_to_reset(redis_server: RedisServer) -> None:
    """A record written with another state size (an older layout under the same version) is judged a
    changed model, never gathered into a batch, where it would fail every chunk beside it."""
    from service.sessions.redis import RedisStore  # needs the redis client, which start_redis checked

    async def scenario() -> None:
        import torch

        old, new = RedisStore(redis_server.url, 181, 60), RedisStore(redis_server.url, 187, 60)
        write = Write(key="t/s", expected_revision=None, position=3, model_version="v1", last_offset=0,
                      fingerprint=b"", answer=b"{}", row=0)
        assert (await old.commit([write], torch.zeros(1, 181)))[0] is not None
        session = (await new.load(["t/s"]))[0]
        verdict = judge("t/s", 3, 0, np.ones((1, 1), np.float32), session, "v1")
        assert isinstance(verdict, StaleModel) and "181 floats" in verdict.detail
        await old.close()
        await new.close()

    asyncio.run(scenario())


def test_a_stream_frame_asks_for_intervals_and_scores_as_a_post_does(calibrated: Server, http: httpx.Client) -> None:
    values = _noisier(_seattle(100, 120), seed=4)
    fields = {"levels": [80, 95], "scores": True}
    streamed, posted = new_id("ws"), new_id("http")
    url = calibrated.url.replace("http://", "ws://") + f"/v1/sessions/{streamed}/stream"
    with connect(url, open_timeout=30) as ws:
        for at in (0, 60):
            ws.send(json.dumps({"values": values[at : at + 60].tolist(), "offset": at, **fields}))
        answers = [json.loads(ws.recv(timeout=60)) for _ in range(2)]
        ws.send(json.dumps({"values": [[1.0], [1.0]], "offset": 120, "levels": [90, 90]}))
        repeated = json.loads(ws.recv(timeout=60))
    for at, answer in zip((0, 60), answers, strict=True):
        expected = _post(http, f"/v1/sessions/{posted}/predict",
                         {"values": values[at : at + 60].tolist(), "offset": at, **fields})
        assert answer.keys() == expected.keys() and {"intervals", "scores"} <= answer.keys()
        got, want = np.array(answer["scores"], dtype=float), np.array(expected["scores"], dtype=float)
        np.testing.assert_allclose(got, want, rtol=1e-6)  # None (no full lag window yet) as NaN, in place
        for level in ("80", "95"):
            np.testing.assert_allclose(answer["intervals"][level]["upper"], expected["intervals"][level]["upper"],
                                       rtol=1e-6)
    assert repeated["status"] == 422 and position(http, streamed) == 120


def test_the_client_asks_for_intervals_and_scores_over_http_and_the_stream(calibrated: Server,
                                                                           http: httpx.Client) -> None:
    """Client.predict, Session.stream and StreamSession.stream with levels and scores answer what a post with
    those fields answers; without them a Prediction has none."""
    values = _noisier(_seattle(300, 111), seed=5)
    fields = {"levels": [80, 95], "scores": True}
    whole = _post(http, "/v1/predict", {"values": values.tolist(), "horizon": 3, **fields})
    with Client(calibrated.url) as api:
        stateless = api.predict(values, 3, levels=[80, 95], scores=True)
        plain = api.predict(values, 3)
        chunked = list(api.session(new_id("client")).stream(values, chunk=37, levels=[80, 95], scores=True))
        with api.stream_session(new_id("client-ws"), window=2) as session:
            streamed = list(session.stream(values, chunk=37, levels=[80, 95], scores=True))
    assert (stateless.intervals, stateless.forecast_intervals, stateless.scores) == (
        whole["intervals"], whole["forecast_intervals"], whole["scores"])
    assert plain.intervals is plain.forecast_intervals is plain.scores is None
    want_scores = np.array(whole["scores"], dtype=float)
    for answers in (chunked, streamed):
        assert [a.position for a in answers] == [37, 74, 111]
        scores = np.array([row for a in answers for row in a.scores or []], dtype=float)
        np.testing.assert_allclose(scores, want_scores, atol=2e-4)  # float32 rounding only; None as NaN
        for level in ("80", "95"):
            upper = [row for a in answers for row in (a.intervals or {})[level]["upper"]]
            np.testing.assert_allclose(upper, whole["intervals"][level]["upper"], rtol=1e-5)
