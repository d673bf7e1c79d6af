"""HEAD is answered wherever GET is: the same status and headers, no body; elsewhere the same 404 or 405."""

from __future__ import annotations

import httpx

from tests.conftest import Server
from tests.service.helpers import new_id, send, series


def test_head_answers_every_get_route_with_its_status_and_headers_and_no_body(
    server: Server, client: httpx.Client
) -> None:
    session = new_id("head")
    assert send(client, session, series(3), offset=0).status_code == 200
    model = client.get("/v1/model").json()
    filled = {"{session_id}": session, "{model_name}": model["name"], "{model_version}": model["version"],
              "{model}": model["name"]}
    paths = ["/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"]
    for path, operations in client.get("/openapi.json").json()["paths"].items():
        if "get" in operations:
            for template, value in filled.items():
                path = path.replace(template, value)
            paths.append(path)
    assert {"/healthz", "/readyz", "/metrics", "/v2/health/ready", f"/v1/sessions/{session}"} <= set(paths)
    for path in paths:
        get, head = client.get(path), client.head(path)
        assert (head.status_code, head.content) == (get.status_code, b""), path
        assert get.status_code == 200, (path, get.text)
        assert head.headers["content-type"] == get.headers["content-type"], path
    assert client.head(f"/v1/sessions/{new_id('absent')}").status_code == 404
    wrong = client.head("/v1/predict")
    assert (wrong.status_code, wrong.headers["allow"]) == (405, "POST")
    metrics = client.get("/metrics").text
    assert 'gru_requests_total{method="HEAD",route="/healthz",status="200"} 1.0' in metrics
