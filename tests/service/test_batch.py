"""``POST /v1/predict/batch`` as a demanding client uses it, against a real server: a call the engine queue
cannot take whole is refused whole (429, ``Retry-After``), nothing of it applied."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson

from service.config import DEFAULT_MODEL_PATH, Settings
from tests.conftest import WIDE_FEATURES, ServerFactory
from tests.service.helpers import assert_problem, new_id, position, send, series


def test_a_batch_the_queue_cannot_take_whole_is_refused_whole_and_applies_nothing(
    server_factory: ServerFactory,
) -> None:
    """README's 429 row: a batch call that finds the queue full is refused at once, with Retry-After. Each
    item was queued on its own instead: the call answered 200, the items that found a place applied and
    the rest got a 429 problem in ``results`` (no Retry-After anywhere), so a client resending the call after
    its 429s appended the no-offset items that had applied a second time."""
    # one waiting chunk holds one of the three places for a second (its batch waits to fill)
    server = server_factory(GRU_MAX_QUEUE="3", GRU_MAX_BATCH_SIZE="64", GRU_MAX_BATCH_DELAY_MS="1000",
                            GRU_QUEUE_PATIENCE_SECONDS="0")
    sessions = [new_id("full") for _ in range(3)]
    items = [{"session_id": s, "values": [0.1, 0.2]} for s in sessions]
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=server.url, timeout=30) as http:
        waiting = pool.submit(httpx.post, server.url + "/v1/predict", json={"values": [0.3]}, timeout=30)
        time.sleep(0.3)
        refused = http.post("/v1/predict/batch", json={"items": items})
        assert not waiting.done()  # refused at once, not after the chunk ahead of it
        taken = http.post("/v1/predict/batch", json={"items": items[:2]})  # two places left: taken whole
        assert waiting.result().status_code == 200
        body = assert_problem(refused, 429)
        assert body["type"].endswith("/overloaded") and int(refused.headers["retry-after"]) >= 1
        assert taken.status_code == 200, taken.text
        assert [r["position"] for r in taken.json()["results"]] == [2, 2]
        assert [http.get(f"/v1/sessions/{s}").status_code for s in sessions] == [200, 200, 404]
        assert http.get(f"/v1/sessions/{sessions[0]}").json()["position"] == 2  # applied once, by the second call


def test_a_batch_of_more_items_than_the_queue_holds_is_refused_as_too_many(server_factory: ServerFactory) -> None:
    """On an idle server, a call of more items than GRU_MAX_QUEUE could never be taken whole: it is a 422 that
    says to split it (as past GRU_MAX_BATCH_ITEMS), never a 429 that no retry gets past."""
    server = server_factory(GRU_MAX_QUEUE="2", GRU_MAX_BATCH_DELAY_MS="0")
    sessions = [new_id("many") for _ in range(3)]
    with httpx.Client(base_url=server.url, timeout=30) as http:
        items = [{"session_id": s, "values": [0.5], "offset": 0} for s in sessions]
        problem = assert_problem(http.post("/v1/predict/batch", json={"items": items}), 422)
        assert problem["errors"][0]["loc"] == ["body", "items"] and "GRU_MAX_QUEUE=2" in problem["detail"]
        assert [http.get(f"/v1/sessions/{s}").status_code for s in sessions] == [404] * 3
        schema = http.get("/openapi.json").json()["components"]["schemas"]["BatchRequest"]
        assert schema["properties"]["items"]["maxItems"] == 2
        answered = http.post("/v1/predict/batch", json={"items": items[:2]})
        assert [r["position"] for r in answered.json()["results"]] == [1, 1]


_ANSWER_ARRAYS = ("predictions", "forecast", "intervals", "forecast_intervals", "scores")


def _numbers(part: Any) -> int:
    """The numbers (and the nulls standing for them) in part of an answer."""
    if isinstance(part, dict):
        return sum(_numbers(value) for value in part.values())
    if isinstance(part, list):
        return sum(_numbers(value) for value in part)
    return 1


def _post_batch(http: httpx.Client, items: list[dict[str, Any]]) -> httpx.Response:
    return http.post("/v1/predict/batch", content=orjson.dumps({"items": items}),
                     headers={"content-type": "application/json"})


def test_a_batch_whose_answer_passes_the_bound_is_refused_whole_before_any_item_applies(
    server_factory: ServerFactory,
) -> None:
    """The review's call: 256 items of 4,096 steps, each within its own limits, all four levels, scores and a
    horizon of 512 (a 2.1 MB body) were answered 170 MB in 8.4 s, the server 730 MB larger after. Now a 422 of
    its own type naming the bound and the count, and none of its items applied."""
    server = server_factory(DEFAULT_MODEL_PATH)
    sessions = [new_id("big") for _ in range(256)]
    with httpx.Client(base_url=server.url, timeout=120) as http:
        assert send(http, sessions[0], series(5)).status_code == 200
        items = [{"session_id": s, "values": [0] * 4096, "levels": [80, 90, 95, 99], "scores": True, "horizon": 512}
                 for s in sessions]
        refused = _post_batch(http, items)
        assert refused.status_code == 422, refused.text[:300]  # not the whole 170 MB
        problem = assert_problem(refused, 422)
        assert problem["type"].endswith("/batch-answer-too-large")
        count = 256 * (4096 * (1 + 8 + 1) + 512 * (1 + 8))  # predictions, intervals, scores; forecast and its
        assert (problem["limit"], problem["count"]) == (2 * 2**20, count)
        assert f"GRU_MAX_BATCH_ANSWER_VALUES={2 * 2**20}" in problem["detail"] and str(count) in problem["detail"]
        assert position(http, sessions[0]) == 5
        assert http.get(f"/v1/sessions/{sessions[1]}").status_code == 404


def test_a_batch_whose_answer_holds_exactly_the_bound_is_answered(server_factory: ServerFactory,
                                                                    wide_model: Path) -> None:
    """The count is the numbers the answer holds: a batch at GRU_MAX_BATCH_ANSWER_VALUES is answered with that
    many, one item more is refused, and an item refused on its own (here: past GRU_MAX_HORIZON) counts
    nothing."""
    features = len(WIDE_FEATURES)
    per_item = features * (3 * (1 + 4 + 1) + 2 * (1 + 4))  # 3 steps, 2 levels, scores, horizon 2
    server = server_factory(wide_model, GRU_MAX_BATCH_ANSWER_VALUES=str(2 * per_item), GRU_MAX_HORIZON="2")
    sessions = [new_id("edge") for _ in range(3)]
    items = [{"session_id": s, "values": series(3, features=features).tolist(), "levels": [80, 99], "scores": True,
              "horizon": 2} for s in sessions]
    refused_item = {**items[0], "horizon": 3}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        problem = assert_problem(_post_batch(http, items), 422)
        assert (problem["limit"], problem["count"]) == (2 * per_item, 3 * per_item)
        assert [http.get(f"/v1/sessions/{s}").status_code for s in sessions] == [404] * 3
        answered = _post_batch(http, [*items[:2], refused_item])
        assert answered.status_code == 200, answered.text
        first, second, third = answered.json()["results"]
        assert third["status"] == 422
        assert sum(_numbers(r[key]) for r in (first, second) for key in _ANSWER_ARRAYS) == 2 * per_item
        assert [position(http, s) for s in sessions[:2]] == [3, 3]


def test_the_largest_batch_without_extras_that_fits_the_body_limit_is_answered(
    server_factory: ServerFactory, wide_model: Path
) -> None:
    """GRU_MAX_BATCH_ANSWER_VALUES' default refuses no call that was answered before it and asks no levels,
    scores or horizon: a body of GRU_MAX_BODY_BYTES packed with the shortest numbers (2 bytes a value and a
    little more for the rows' brackets) answers fewer values than it."""
    settings = Settings.model_construct()
    server = server_factory(wide_model)
    row, steps = [0] * len(WIDE_FEATURES), settings.max_chunk_steps
    per_step = len(orjson.dumps(row)) + 1  # a row and its comma
    items: list[dict[str, Any]] = []
    while len(orjson.dumps({"items": items})) <= settings.max_body_bytes:
        items.append({"session_id": new_id("full"), "values": [row] * steps})
    over = len(orjson.dumps({"items": items})) - settings.max_body_bytes
    items[-1]["values"] = items[-1]["values"][: steps - -(-over // per_step)]  # the fewest rows dropped
    body = orjson.dumps({"items": items})
    assert settings.max_body_bytes - per_step < len(body) <= settings.max_body_bytes
    with httpx.Client(base_url=server.url, timeout=120) as http:
        answered = _post_batch(http, items)
        assert answered.status_code == 200, answered.text[:500]
        results = answered.json()["results"]
    assert [len(r["predictions"]) for r in results] == [len(item["values"]) for item in items]
    assert sum(_numbers(r["predictions"]) for r in results) == sum(len(i["values"]) for i in items) * len(row)
