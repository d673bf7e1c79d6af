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
import torch
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from harness.processes import free_port
from service import config
from service.config import Settings
from service.session_ids import SESSION_ID_PATTERN
from tests.conftest import Server, ServerFactory, refused_start_log
from tests.service.helpers import access_line, new_id, send, series


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
    reasons = {s.labels["reason"] for s in families["gru_session_evictions"].samples}
    assert reasons == {"ttl", "capacity", "tenant_quota"}
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


def test_methods_outside_the_standard_ones_share_one_metric_label(server_factory: ServerFactory) -> None:
    """uvicorn passes some 35 methods (WebDAV's, SSDP's): as labels, any caller could multiply the series of
    every route by them. Past the standard methods they are counted as "other"."""
    fresh = server_factory()
    exotic = ["PROPFIND", "MKCOL", "M-SEARCH", "SUBSCRIBE", "PURGE", "LINK", "REPORT", "QUERY"]
    for method in exotic:
        assert httpx.request(method, fresh.url + "/v1/model").status_code == 405
    httpx.request("OPTIONS", fresh.url + "/v1/model")
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(fresh.url + "/metrics").text)}
    counts = {(s.labels["method"], s.labels["status"]): s.value for s in families["gru_requests"].samples
              if s.name == "gru_requests_total" and s.labels["route"] == "/v1/model"}
    assert counts == {("other", "405"): len(exotic), ("OPTIONS", "405"): 1}
    methods = {s.labels["method"] for s in families["gru_request_duration_seconds"].samples}
    assert methods == {"GET", "OPTIONS", "WS", "other"}  # WS: the streams' chunks


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
    entry = access_line(server, "log-check-1")
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


@pytest.mark.parametrize("url", [
    "redis://:s3cret@127.0.0.1:notaport/0",  # redis-py raised at start-up: a traceback, exit 1
    "redis://admin:s3cret/0",  # the host forgotten: the password read as the port, and printed in the traceback
    "redis://:s3cret@127.0.0.1:6379/sessions",  # redis-py ignored the path: database 0, shared with whatever is there
    "redis://:s3cret@127.0.0.1:6379/0?ssl_cert_reqs=none",  # not a plain connection's option: every store call failed
], ids=["a port that is no number", "no host", "a database that is no number", "an option redis does not take"])
def test_a_redis_url_redis_cannot_use_stops_start_up_naming_the_variable(
    tiny_model: Path, tmp_path: Path, url: str
) -> None:
    """Only the scheme was checked: redis-py reads the rest when the store is built or first connects. A bad
    value stops start-up naming the variable (exit 2), never repeating the URL, which may hold a password."""
    log = refused_start_log(tiny_model, tmp_path, {"GRU_STORE": "redis", "GRU_REDIS_URL": url})
    assert "invalid configuration" in log and "GRU_REDIS_URL" in log
    assert "s3cret" not in log and "Traceback" not in log


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


# The README's bounds, each just past the edge (and the edge itself is accepted).
_OUT_OF_BOUNDS = [
    ("snapshot_interval_seconds", "-1", "0"),
    ("session_ttl_seconds", "0", "0.001"),
    ("max_sessions", "0", "1"),
    ("max_answer_bytes", "65535", "65536"),
    ("max_batch_size", "4097", "4096"),
    ("max_batch_size", "0", "1"),
    ("max_batch_delay_ms", "1001", "1000"),
    ("max_batch_delay_ms", "-1", "0"),
    ("max_queue", "0", "1"),
    ("request_timeout_seconds", "0", "0.001"),
    ("max_chunk_steps", "0", "1"),
    ("max_horizon", "-1", "0"),
    ("surprise_p", "0", "0.001"),
    ("surprise_p", "1", "0.999"),
    ("max_body_bytes", "1023", "1024"),
    ("max_batch_items", "0", "1"),
    ("max_batch_answer_values", "0", "1"),
    ("torch_threads", "-1", "0"),
    ("torch_threads", "1025", "1024"),
    ("session_ttl_seconds", "1000000001", "1000000000"),
    ("port", "0", "1"),
    ("port", "65536", "65535"),
    ("tenant_max_sessions", "0", "1"),
    ("tenant_max_answer_bytes", "65535", "65536"),
]


@pytest.mark.parametrize(("field", "bad", "edge"), _OUT_OF_BOUNDS, ids=[f"{f}={b}" for f, b, _ in _OUT_OF_BOUNDS])
def test_each_setting_is_refused_past_its_bound_and_accepted_at_it(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch, field: str, bad: str, edge: str
) -> None:
    monkeypatch.setenv("GRU_MODEL_PATH", str(tiny_model))
    monkeypatch.setenv(f"GRU_{field.upper()}", bad)
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert [e["loc"] for e in caught.value.errors()] == [(field,)]
    monkeypatch.setenv(f"GRU_{field.upper()}", edge)
    assert float(getattr(Settings(), field)) == float(edge)


@pytest.mark.parametrize(("variable", "value", "line"), [
    ("GRU_TORCH_THREADS", "100000", "GRU_TORCH_THREADS: Input should be less than or equal to 1024"),
    ("GRU_TORCH_THREADS", str(2**63), "GRU_TORCH_THREADS: Input should be less than or equal to 1024"),
    ("GRU_SESSION_TTL_SECONDS", "inf", "GRU_SESSION_TTL_SECONDS: Input should be less than or equal to 1000000000"),
], ids=["threads=100000", "threads=2**63", "ttl=inf"])
def test_a_setting_past_what_the_service_can_run_stops_start_up_with_one_line(
    tiny_model: Path, tmp_path: Path, variable: str, value: str, line: str
) -> None:
    """GRU_TORCH_THREADS=100000 was accepted and then killed the process (SIGSEGV in libgomp, no message), and
    2**63 raised a traceback from torch.set_num_threads; GRU_SESSION_TTL_SECONDS=inf (or 1e18) was accepted,
    then a Redis store's start-up raised a traceback, and a memory store answered GET /v1/sessions/{id} 500 (an
    expiry past the year 9999)."""
    log = refused_start_log(tiny_model, tmp_path, {variable: value})
    assert line in log and "Traceback" not in log


def test_the_longest_session_ttl_still_describes_its_sessions(server_factory: ServerFactory) -> None:
    server = server_factory(GRU_SESSION_TTL_SECONDS="1000000000")
    with httpx.Client(base_url=server.url) as http:
        session = new_id()
        assert send(http, session, series(2)).status_code == 200
        described = http.get(f"/v1/sessions/{session}")
        assert described.status_code == 200, described.text


_NON_DEFAULT: dict[str, str] = {
    "port": "9001", "model_path": "", "device": "cpu", "store": "redis", "redis_url": "redis://cache:6380/2",
    "snapshot_path": "/tmp/snap.safetensors", "snapshot_interval_seconds": "7.5", "session_ttl_seconds": "61",
    "max_sessions": "17", "max_answer_bytes": "70000", "tenant_max_sessions": "5",
    "tenant_max_answer_bytes": "65536", "max_batch_size": "9", "max_batch_delay_ms": "3.5",
    "max_queue": "11", "queue_patience_seconds": "2.5", "request_timeout_seconds": "4.5", "max_chunk_steps": "99",
    "max_horizon": "7", "max_body_bytes": "5000", "stream_window": "7", "stream_ping_seconds": "3",
    "max_batch_items": "13", "max_batch_answer_values": "5000", "max_run_steps": "0",
    "api_keys": "some-long-key-0123:alice",
    "api_keys_file": "", "metrics_require_key": "true", "require_api_keys": "true", "torch_threads": "3",
    "log_level": "WARNING",
    "surprise_p": "0.05",
    "model_repository": "", "default_model": "pumps", "repository_poll_seconds": "0.5",
    "max_loaded_versions": "2", "upgrade": "replay", "admin_keys": "admin-key-0123456789:ops",
}


def test_every_setting_is_read_from_its_documented_variable(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GRU_<FIELD> is the variable the README documents; a field read under another name (an alias, a typo)
    would silently keep its default."""
    keys_file = tmp_path / "keys"
    keys_file.write_text("file-key-0123456789 carol\n")
    values = {**_NON_DEFAULT, "model_path": str(tiny_model), "api_keys_file": str(keys_file),
              "model_repository": str(tmp_path)}
    assert set(values) == set(Settings.model_fields)  # a new setting needs a value here
    for name, value in values.items():
        monkeypatch.setenv(f"GRU_{name.upper()}", value)
    settings = Settings()
    defaults = Settings.model_construct()
    for name in values:
        assert getattr(settings, name) != getattr(defaults, name), f"GRU_{name.upper()} was not read"
    assert settings.log_level == "warning"  # GRU_LOG_LEVEL is case-insensitive


def test_the_port_flag_wins_over_gru_port(server_factory: ServerFactory) -> None:
    """`make serve` and the Kubernetes manifests pass --port; GRU_PORT is the port only without it (the image)."""
    flag, variable = free_port(), free_port()
    server = server_factory(port=flag, GRU_PORT=str(variable))
    assert server.port == flag and httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{variable}/readyz", timeout=5)


def test_a_model_path_that_is_not_a_directory_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="is not a directory; point it at a checkpoint"):
        Settings(model_path=tmp_path / "missing")
    refused = tmp_path / "model.safetensors"
    refused.write_bytes(b"")
    log = refused_start_log(refused, tmp_path, {})
    assert "invalid configuration" in log and f"GRU_MODEL_PATH={refused} is not a directory" in log


def test_a_misspelt_setting_stops_start_up_naming_it_and_the_closest_setting(
    tiny_model: Path, tmp_path: Path
) -> None:
    """GRU_SNAPSHOT_PATHS (an s too many) once started normally: no snapshot, every session lost at SIGTERM."""
    log = refused_start_log(tiny_model, tmp_path, {"GRU_SNAPSHOT_PATHS": str(tmp_path / "snap"),
                                                   "GRU_TENANT_MAX_SESION": "5"})
    assert "invalid configuration" in log
    assert "GRU_SNAPSHOT_PATHS is not a setting; did you mean GRU_SNAPSHOT_PATH?" in log
    assert "GRU_TENANT_MAX_SESION is not a setting; did you mean GRU_TENANT_MAX_SESSIONS?" in log
    assert "Traceback" not in log


def test_the_client_variables_are_allowed_beside_the_settings(server_factory: ServerFactory) -> None:
    """GRU_API_KEY beside keys of the service's own (alone, it is taken for a misspelt GRU_API_KEYS: test_auth)."""
    server = server_factory(GRU_URL="http://127.0.0.1:1", GRU_API_KEY="a-client-key",
                            GRU_API_KEYS="a-service-key-0123456789:alice")
    assert httpx.get(server.url + "/readyz").status_code == 200


def test_default_intra_op_threads_leave_one_core_to_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config.os, "cpu_count", lambda: 8)
    assert config.intra_op_threads(0) == 7
    assert config.intra_op_threads(3) == 3
    monkeypatch.setattr(config.os, "cpu_count", lambda: 1)
    assert config.intra_op_threads(0) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_stops_start_up_with_exit_2_and_one_line(tiny_model: Path, tmp_path: Path) -> None:
    log = refused_start_log(tiny_model, tmp_path, {"GRU_DEVICE": "cuda"})
    assert "cannot start: GRU_DEVICE=cuda but torch sees no CUDA device" in log
    assert "Traceback" not in log


def test_log_level_setting_is_applied(server_factory: ServerFactory) -> None:
    """GRU_LOG_LEVEL=warning drops the info access lines; the default keeps them (one a request)."""
    quiet = server_factory(GRU_LOG_LEVEL="warning")
    with httpx.Client(base_url=quiet.url) as http:
        http.get("/v1/model", headers={"X-Request-ID": "quiet-check-1"})
    quiet.stop()  # SIGTERM, a graceful stop: every line it would write is written
    assert "quiet-check-1" not in quiet.log()


def test_readiness_names_the_model_version(client: httpx.Client) -> None:
    ready = client.get("/readyz").json()
    assert ready == {"status": "ready", "model_version": client.get("/v1/model").json()["version"]}


def test_histograms_keep_their_documented_buckets(client: httpx.Client) -> None:
    """Latency buckets reach past the 30 s request timeout (60 s); batch sizes up to 1024 (GRU_MAX_BATCH_SIZE
    goes to 4096): dropping the top buckets hides a stalled queue or large batches in +Inf."""
    send(client, new_id(), series(3))
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}

    def bounds(name: str) -> list[float]:
        return sorted({float(s.labels["le"]) for s in families[name].samples if s.name == name + "_bucket"})

    latency = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
               float("inf")]
    for name in ("gru_request_duration_seconds", "gru_queue_wait_seconds", "gru_forward_seconds"):
        assert bounds(name) == latency, name
    assert bounds("gru_batch_size") == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, float("inf")]


def test_labelled_series_exist_from_the_first_scrape(server_factory: ServerFactory) -> None:
    """Rules and dashboards divide by these before any event happens: a fresh server exports them at 0."""
    fresh = server_factory()
    text = httpx.get(fresh.url + "/metrics").text
    for series_line in ('gru_rejected_total{reason="queue_full"} 0.0', 'gru_rejected_total{reason="timeout"} 0.0',
                        'gru_session_evictions_total{reason="ttl"} 0.0',
                        'gru_session_evictions_total{reason="capacity"} 0.0',
                        'gru_session_evictions_total{reason="tenant_quota"} 0.0'):
        assert series_line in text, series_line
    assert "# TYPE gru_store_errors_total counter" in text and "# TYPE gru_store_conflicts_total counter" in text


def test_log_lines_carry_timestamp_level_and_logger(server: Server, client: httpx.Client) -> None:
    client.get("/v1/model", headers={"X-Request-ID": "log-shape-1"})
    entry = access_line(server, "log-shape-1")
    assert entry["level"] == "info" and entry["logger"] and entry["msg"] == "request"
    assert entry["ts"].endswith("Z") and entry["method"] == "GET" and entry["route"] == "/v1/model"


def test_docs_state_every_limit_and_the_session_id_rule(client: httpx.Client) -> None:
    schemas = client.get("/openapi.json").json()
    components = schemas["components"]["schemas"]
    for name in ("ChunkRequest", "StatelessRequest", "BatchItem"):
        properties = components[name]["properties"]
        rows, flat = properties["values"]["anyOf"]
        assert rows["maxItems"] == flat["maxItems"] == 4096, name
        assert rows["items"]["minItems"] == rows["items"]["maxItems"] == 1, name
        assert properties["horizon"]["maximum"] == 512, name
    for path in ("/v1/sessions/{session_id}/predict", "/v1/sessions/{session_id}"):
        for operation in schemas["paths"][path].values():
            parameter, = [p for p in operation["parameters"] if p["name"] == "session_id"]
            assert parameter["schema"]["pattern"] == SESSION_ID_PATTERN, path
