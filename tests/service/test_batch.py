"""``POST /v1/predict/batch`` as a demanding client uses it, against a real server: a call the engine queue
cannot take whole is refused whole (429, ``Retry-After``), nothing of it applied."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.conftest import ServerFactory
from tests.service.helpers import assert_problem, new_id


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
        taken = http.post("/v1/predict/batch", json={"items": items[:2]})  # two places left: taken whole
        assert waiting.result().status_code == 200
        body = assert_problem(refused, 429)
        assert body["type"].endswith("/overloaded") and int(refused.headers["retry-after"]) >= 1
        assert refused.elapsed.total_seconds() < 0.5  # at once, not after the chunk ahead of it
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
