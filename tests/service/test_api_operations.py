"""Operations: metrics (parsed and checked by promtool), request ids, JSON logs, health, docs, model info,
and a bad setting stopping start-up."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from tests.conftest import Server, refused_start_log
from tests.service.helpers import new_id, send, series


def test_metrics_parse_and_pass_promtool(client: httpx.Client) -> None:
    send(client, new_id(), series(5))
    text = client.get("/metrics").text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for name in ("gru_requests", "gru_request_duration_seconds", "gru_active_sessions", "gru_session_evictions",
                 "gru_steps", "gru_batch_size", "gru_queue_wait_seconds", "gru_forward_seconds",
                 "gru_store_errors", "gru_rejected", "gru_model_info"):
        assert name in families, name
    steps = [s.value for s in families["gru_steps"].samples if s.name == "gru_steps_total"]
    assert steps and steps[0] >= 5
    assert {s.labels["reason"] for s in families["gru_session_evictions"].samples} == {"ttl", "capacity"}
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make test installs the Debian package prometheus)")
    result = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_request_latency_is_labelled_by_route_template(client: httpx.Client) -> None:
    send(client, new_id(), series(2))
    text = client.get("/metrics").text
    assert 'gru_request_duration_seconds_count{method="POST",route="/v1/sessions/{session_id}/predict"}' in text
    assert 'le="0.0005"' in text  # millisecond-scale buckets


def test_request_id_is_honoured_and_echoed(client: httpx.Client) -> None:
    response = client.get("/v1/model", headers={"X-Request-ID": "trace-123"})
    assert response.headers["x-request-id"] == "trace-123"
    generated = client.get("/v1/model").headers["x-request-id"]
    assert len(generated) == 32
    hostile = client.get("/v1/model", headers={"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"]
    assert hostile != "bad id\twith spaces"


def test_one_json_log_line_per_request_without_values(server: Server, client: httpx.Client) -> None:
    session = new_id("logged")
    client.post(f"/v1/sessions/{session}/predict", json={"values": [123.456, 654.321]},
                headers={"X-Request-ID": "log-check-1", "Authorization": "Bearer secret-key-xyz"})
    lines = [json.loads(line) for line in server.log().splitlines() if "log-check-1" in line]
    assert len(lines) == 1
    entry = lines[0]
    assert entry["route"] == "/v1/sessions/{session_id}/predict"
    assert entry["session"] == session and entry["status"] == 200 and entry["latency_ms"] > 0
    raw = json.dumps(entry)
    assert "123.456" not in raw and "secret-key-xyz" not in raw


def test_health_and_readiness(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_model_info_describes_the_served_model(client: httpx.Client) -> None:
    info = client.get("/v1/model").json()
    assert info["name"] == "tiny"
    assert (info["input_features"], info["output_features"]) == (1, 1)
    assert (info["hidden_size"], info["num_layers"], info["variant"]) == (16, 2, "seed")
    assert info["device"].split(":")[0] == os.environ.get("GRU_DEVICE", "cpu")  # cpu, or cuda[:N] on a GPU run
    assert len(info["version"]) == 12


def test_docs_show_how_to_call_each_endpoint(client: httpx.Client) -> None:
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    predict = schema["paths"]["/v1/sessions/{session_id}/predict"]["post"]
    assert predict["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChunkRequest")
    assert schema["components"]["schemas"]["ChunkRequest"]["examples"]
    assert "409" in predict["responses"]
    assert "Retry-After" in predict["responses"]["429"]["headers"]
    # the configured limits and the model's feature count, stated where a client generator reads them
    rows, flat = schema["components"]["schemas"]["ChunkRequest"]["properties"]["values"]["anyOf"]
    assert rows["maxItems"] == flat["maxItems"] == 4096 and rows["items"]["maxItems"] == 1
    assert schema["components"]["schemas"]["BatchRequest"]["properties"]["items"]["maxItems"] == 256
    assert "Retry-After" in schema["paths"]["/v1/sessions/{session_id}"]["get"]["responses"]["503"]["headers"]
    for path in ("/v1/model", "/v1/predict", "/v1/predict/batch", "/v1/sessions/{session_id}",
                 "/v1/sessions/{session_id}/reset", "/healthz", "/readyz", "/metrics"):
        assert path in schema["paths"], path


def test_bad_settings_stop_start_up_naming_each_variable(tiny_model: Path, tmp_path: Path) -> None:
    log = refused_start_log(tiny_model, tmp_path, {"GRU_DEVICE": "gpu", "GRU_MAX_SESSIONS": "0"})
    assert "GRU_DEVICE: Input should be 'auto', 'cpu' or 'cuda'" in log
    assert "GRU_MAX_SESSIONS: Input should be greater than or equal to 1" in log
    log = refused_start_log(tiny_model, tmp_path, {"GRU_STORE": "redis",
                                                   "GRU_REDIS_URL": "http://:s3cret@redis:6379/0"})
    assert "GRU_REDIS_URL must start with redis://, rediss://, unix://" in log
    assert "s3cret" not in log and "Traceback" not in log
    assert Settings(store="memory", redis_url="").redis_url == ""  # unused there: a placeholder is fine


@pytest.mark.parametrize("config", ["[1, 2]", "{}", None], ids=["a list", "an empty object", "a directory"])
def test_a_broken_checkpoint_stops_start_up_with_one_line_not_a_traceback(
    tiny_model: Path, tmp_path: Path, config: str | None
) -> None:
    broken = tmp_path / "model"
    shutil.copytree(tiny_model, broken)
    (broken / "config.json").unlink()
    if config is None:
        (broken / "config.json").mkdir()
    else:
        (broken / "config.json").write_text(config)
    log = refused_start_log(broken, tmp_path, {})
    assert f"cannot start: {broken / 'config.json'}" in log
    assert "Traceback" not in log
