"""API keys and tenants (service.auth): who may call, and that tenants never touch each other's sessions."""

from __future__ import annotations

import asyncio
import hmac
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from service import auth
from service.auth import ApiKeyAuth, KeyRing, presented_key
from service.config import Settings
from service.keys import load_api_keys
from tests.conftest import Server, ServerFactory, refused_start_log, start_server
from tests.service.helpers import assert_problem, new_id, position, send, series, stateless

ALICE = "alice-0123456789abcdef"
BOB = "bob:0123456789abcdef"  # a key may hold ":"; the tenant is after the last one
CAROL = "carol-from-the-file-0123"
KEYS = f"{ALICE}:alice,{BOB}:bob"
CHALLENGE = 'Bearer realm="gru"'


def _as(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# -- configuration -----------------------------------------------------------------------------------------


def test_keys_parse_from_env_and_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# operators' keys\n\n{CAROL}   carol\n  {ALICE} alice  \n")
    assert load_api_keys(f" {KEYS} ,", keys_file) == {ALICE: "alice", BOB: "bob", CAROL: "carol"}
    assert load_api_keys("", None) == {}


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ("s3cret-no-tenant", "entry 1 is not KEY:TENANT"),
        ("ok-key:alice,:bob", "entry 2 is not KEY:TENANT"),
        ("s3cret key:alice", "entry 1: the key must be"),
        ("s3cret:ali/ce", "entry 1: the tenant must match"),
        ("s3cret:", "entry 1: the tenant must match"),
        ("s3cret:alice,s3cret:bob", "entry 2: this key is already given to another tenant"),
    ],
)
def test_malformed_keys_are_refused_without_echoing_them(keys: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        load_api_keys(keys, None)
    assert "s3cret" not in str(caught.value)


def test_malformed_key_file_is_refused_by_line(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("good-key alice\ns3cret-alone\n")
    with pytest.raises(ValueError, match="line 2 has 1 fields") as caught:
        load_api_keys("", keys_file)
    assert "s3cret" not in str(caught.value)
    with pytest.raises(ValueError, match="cannot be read"):
        load_api_keys("", tmp_path / "missing")


def test_settings_fail_on_bad_keys_without_printing_them(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRU_MODEL_PATH", str(tiny_model))
    monkeypatch.setenv("GRU_API_KEYS", "s3cret-value:not/a/tenant")
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert "s3cret-value" not in str(caught.value)
    monkeypatch.setenv("GRU_API_KEYS", "s3cret-value:alice")
    settings = Settings()
    assert "s3cret-value" not in repr(settings)
    monkeypatch.delenv("GRU_API_KEYS")
    monkeypatch.setenv("GRU_METRICS_REQUIRE_KEY", "true")
    with pytest.raises(ValidationError, match="GRU_METRICS_REQUIRE_KEY=true needs keys"):
        Settings()


def test_required_keys_refuse_a_start_without_any(monkeypatch: pytest.MonkeyPatch) -> None:
    """The prod overlay requires its key Secret, but a Secret whose value is empty gave GRU_API_KEYS="": no
    auth, every route open. GRU_REQUIRE_API_KEYS=true (set there) refuses that; any key satisfies it."""
    monkeypatch.setenv("GRU_REQUIRE_API_KEYS", "true")
    monkeypatch.setenv("GRU_API_KEYS", "")
    with pytest.raises(ValidationError, match="GRU_REQUIRE_API_KEYS=true needs keys"):
        Settings()
    monkeypatch.setenv("GRU_ADMIN_KEYS", f"{CAROL}:carol")
    assert Settings().require_api_keys


def test_service_refuses_to_start_with_malformed_keys(tiny_model: Path, tmp_path: Path) -> None:
    log = refused_start_log(tiny_model, tmp_path, {"GRU_API_KEYS": "s3cret-value"})
    assert "GRU_API_KEYS entry 1 is not KEY:TENANT" in log
    assert "s3cret-value" not in log


def test_a_keys_setting_that_lists_no_key_stops_the_service(tiny_model: Path, tmp_path: Path) -> None:
    """A keys file of comments only (a secret mounted before its keys were written), or GRU_API_KEYS of
    separators only, named keys but gave none: the service started with no check at all, every route open
    (the repository API too). It must fail closed, as any other malformed key setting does."""
    keys_file = tmp_path / "api-keys"
    keys_file.write_text("# keys to come\n\n")
    log = refused_start_log(tiny_model, tmp_path, {"GRU_API_KEYS_FILE": str(keys_file)})
    assert f"GRU_API_KEYS_FILE={keys_file} holds no key" in log
    log = refused_start_log(tiny_model, tmp_path, {"GRU_API_KEYS": " , "})
    assert "GRU_API_KEYS lists no key" in log
    assert load_api_keys("", None) == {} and load_api_keys("  ", None) == {}  # empty: no keys, as documented


def test_the_client_s_key_variable_alone_stops_the_service(tiny_model: Path, tmp_path: Path) -> None:
    """GRU_API_KEY (the client's variable, allowed beside the settings) is GRU_API_KEYS less one letter: set
    as the service's keys, it was ignored without a word and the service started with every route open. It
    stops start-up where the service has no key of its own, naming the setting meant, never the value."""
    log = refused_start_log(tiny_model, tmp_path, {"GRU_API_KEY": "s3cret-value:alice"})
    assert "GRU_API_KEY is the client's variable; did you mean GRU_API_KEYS?" in log
    assert "s3cret-value" not in log


def test_a_keys_file_saved_with_a_byte_order_mark_is_read_as_written(server_factory: ServerFactory,
                                                                     tmp_path: Path) -> None:
    """Windows editors and PowerShell's ``Set-Content -Encoding UTF8`` start a UTF-8 file with a BOM: its
    first line, here a comment, was read as a key starting with U+FEFF, and the service refused to start
    saying "line 1: the key must be 1-512 visible ASCII characters"."""
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(f"# rotated 2024-05\r\n{CAROL} carol\r\n", encoding="utf-8-sig")
    assert load_api_keys("", keys_file) == {CAROL: "carol"}
    keys_file.write_text(f"{CAROL} carol\n", encoding="utf-8-sig")  # a BOM before the first key too
    server = server_factory(GRU_API_KEYS_FILE=str(keys_file))
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert http.get("/v1/model", headers=_as(CAROL)).status_code == 200
        assert_problem(http.get("/v1/model"), 401)


def test_the_keys_in_force_are_the_keys_validated_at_start_up(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The keys file was read twice: by ``Settings`` (validated: tenants, conflicts with GRU_ADMIN_KEYS) and
    again by ``auth.install``, after the model had loaded. A file rewritten in between (a secret being
    written in place while the pod starts) put unvalidated keys in force: a key given to another tenant, or
    an empty file that the service had just checked to hold keys, a ValueError traceback at start."""
    keys_file = tmp_path / "api-keys"
    keys_file.write_text(f"{CAROL} carol\n")
    monkeypatch.setenv("GRU_MODEL_PATH", str(tiny_model))
    monkeypatch.setenv("GRU_API_KEYS_FILE", str(keys_file))
    settings = Settings()
    for rewritten in (f"{CAROL} mallory\n", ""):
        keys_file.write_text(rewritten)
        app = FastAPI()
        app.get("/who")(_who)
        auth.install(app, settings)
        known, anonymous = asyncio.run(_ask_who(app))
        assert known.json() == {"tenant": "carol"}, rewritten
        assert_problem(anonymous, 401)


async def _who(tenant: auth.TenantDep) -> dict[str, str]:
    return {"tenant": tenant}


async def _ask_who(app: FastAPI) -> list[httpx.Response]:
    """/who with carol's key, then with none."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        return [await http.get("/who", headers=_as(CAROL)), await http.get("/who")]


# -- the check, in process -----------------------------------------------------------------------------------


def test_keyring_compares_every_key_without_early_exit(monkeypatch: pytest.MonkeyPatch) -> None:
    ring = KeyRing({ALICE: "alice", BOB: "bob", CAROL: "carol"})
    calls: list[int] = []
    compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(len(a) + len(b))
        return compare(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    assert ring.tenant(ALICE.encode()) == "alice"
    assert ring.tenant(b"x") is None
    assert ring.tenant(CAROL.encode() + b"-longer") is None
    assert calls == [64] * 9  # three keys, three lookups, every digest the same length


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ([(b"authorization", b"Bearer abc")], b"abc"),
        ([(b"authorization", b"bearer  abc ")], b"abc"),
        ([(b"x-api-key", b"abc")], b"abc"),
        ([(b"authorization", b"Basic dTpw"), (b"x-api-key", b"abc")], b"abc"),
        ([(b"x-api-key", b"xyz"), (b"authorization", b"Bearer abc")], b"abc"),
        ([(b"authorization", b"Bearer ")], None),
        ([(b"authorization", b"Basic dTpw")], None),
        ([], None),
    ],
)
def test_presented_key_reads_bearer_then_x_api_key(
    headers: list[tuple[bytes, bytes]], key: bytes | None
) -> None:
    assert presented_key(headers) == key


def _echo_app(open_paths: frozenset[str] = frozenset({"/healthz"})) -> ApiKeyAuth:
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"tenant": getattr(request.state, "tenant", None), "path": request.url.path})

    inner = Starlette(routes=[Route("/{path:path}", echo, methods=["GET", "POST"])])
    return ApiKeyAuth(inner, KeyRing({ALICE: "alice", BOB: "bob"}), open_paths)


def test_middleware_sets_tenant_and_refuses_others() -> None:
    asyncio.run(_sets_tenant_and_refuses_others())


async def _sets_tenant_and_refuses_others() -> None:
    transport = httpx.ASGITransport(app=_echo_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        assert (await http.get("/v1/model", headers=_as(ALICE))).json()["tenant"] == "alice"
        assert (await http.get("/v1/model", headers={"X-API-Key": BOB})).json()["tenant"] == "bob"
        assert (await http.get("/healthz")).json()["tenant"] is None  # open: no tenant needed
        missing = await http.get("/anything/else")  # deny by default, not only /v1 and /v2
        assert_problem(missing, 401)
        assert missing.headers["www-authenticate"] == CHALLENGE
        assert "error" not in missing.json()
        wrong = await http.post("/v2/models/m/infer", headers=_as(ALICE + "x"), content=b"{}")
        body = assert_problem(wrong, 401)
        assert wrong.headers["www-authenticate"] == CHALLENGE + ', error="invalid_token"'
        assert body["error"] == body["detail"]  # v2 clients (tritonclient) read `error`


def test_middleware_strips_root_path_before_matching_open_paths() -> None:
    asyncio.run(_strips_root_path())


async def _strips_root_path() -> None:
    transport = httpx.ASGITransport(app=_echo_app(), root_path="/gru")
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        assert (await http.get("/gru/healthz")).status_code == 200
        assert (await http.get("/gru/v1/model")).status_code == 401


# -- a real server with keys ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for this module: alice and bob from GRU_API_KEYS, carol from GRU_API_KEYS_FILE."""
    directory = tmp_path_factory.mktemp("keyed")
    keys_file = directory / "api-keys"
    keys_file.write_text(f"{CAROL} carol\n")
    running = start_server(tiny_model, directory, {"GRU_API_KEYS": KEYS, "GRU_API_KEYS_FILE": str(keys_file)})
    yield running
    running.stop(signal.SIGKILL)


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/model"),
        ("POST", "/v1/predict"),
        ("POST", "/v1/sessions/pump-7/predict"),
        ("POST", "/v1/predict/batch"),
        ("GET", "/v1/sessions/pump-7"),
        ("POST", "/v1/sessions/pump-7/reset"),
        ("DELETE", "/v1/sessions/pump-7"),
        ("GET", "/v2"),
        ("POST", "/v2/models/tiny/infer"),
        ("GET", "/v3/unknown"),
    ],
)
def test_every_api_call_needs_a_valid_key(keyed: Server, method: str, path: str) -> None:
    body = {"values": [0.1, 0.2]}
    with httpx.Client(base_url=keyed.url, timeout=30) as http:
        for headers, challenge in [
            ({}, CHALLENGE),
            (_as("not-a-key"), CHALLENGE + ', error="invalid_token"'),
            ({"X-API-Key": ALICE[:-1]}, CHALLENGE + ', error="invalid_token"'),
            ({"Authorization": f"Basic {ALICE}"}, CHALLENGE),
        ]:
            response = http.request(method, path, headers=headers, json=body if method == "POST" else None)
            assert_problem(response, 401)
            assert response.headers["www-authenticate"] == challenge
        # nothing reached a session: pump-7 does not exist for anyone
        assert http.get("/v1/sessions/pump-7", headers=_as(ALICE)).status_code == 404


def test_open_paths_need_no_key_and_openapi_documents_the_schemes(keyed: Server) -> None:
    with httpx.Client(base_url=keyed.url, timeout=30) as http:
        for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"):
            assert http.get(path).status_code == 200, path
        schema = http.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert (schemes["bearerAuth"]["type"], schemes["bearerAuth"]["scheme"]) == ("http", "bearer")
    assert schemes["apiKeyAuth"]["name"] == "X-API-Key"
    predict = schema["paths"]["/v1/sessions/{session_id}/predict"]["post"]
    assert predict["security"] == [{"bearerAuth": []}, {"apiKeyAuth": []}]
    assert "401" in predict["responses"]
    assert "security" not in schema["paths"]["/healthz"]["get"]
    assert "security" not in schema["paths"]["/metrics"]["get"]


def test_no_keys_means_no_check_and_no_security_in_openapi(client: httpx.Client) -> None:
    assert client.get("/v1/model").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "securitySchemes" not in schema.get("components", {})


def test_a_service_without_keys_says_so_once_at_start_up(server: Server, keyed: Server) -> None:
    """Only empty or unset key variables mean no keys, and a Secret mounted empty gives just that: the
    service then runs open, and its log is where an operator can see it."""
    warned = "no API keys: every route is open, every caller the tenant 'default'"
    for running, expected in ((server, [warned]), (keyed, [])):
        lines = [json.loads(line) for line in running.log().splitlines() if line.startswith("{")]
        assert [line["msg"] for line in lines if line["msg"].startswith("no API keys")] == expected


def test_metrics_behind_a_key_when_configured(server_factory: ServerFactory) -> None:
    server = server_factory(GRU_API_KEYS=KEYS, GRU_METRICS_REQUIRE_KEY="true")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        assert_problem(http.get("/metrics"), 401)
        assert http.get("/metrics", headers={"X-API-Key": BOB}).text.startswith("# HELP")
        assert http.get("/healthz").status_code == 200


def test_refusals_before_routing_are_counted_under_the_route_their_path_names(server_factory: ServerFactory) -> None:
    """A 401 is decided before routing; an operator still sees which route it was for. Unknown paths stay
    under one "unmatched" label (a scan of random paths must not grow the metric without bound)."""
    keyed = server_factory(GRU_API_KEYS=KEYS)
    with httpx.Client(base_url=keyed.url, timeout=30) as http:
        assert_problem(http.post("/v1/sessions/no-key-7/predict", json={"values": [1.0]}), 401)
        assert_problem(http.get("/v2/models/seattle/ready"), 401)
        assert http.get("/docs").status_code == 200
        assert_problem(http.get("/no/such/path", headers=_as(ALICE)), 404)
        metrics = http.get("/metrics").text
    for sample in ('method="POST",route="/v1/sessions/{session_id}/predict",status="401"',
                   'method="GET",route="/v2/models/{model_name}/ready",status="401"',
                   'method="GET",route="/docs",status="200"', 'method="GET",route="unmatched",status="404"'):
        assert f"gru_requests_total{{{sample}}} 1.0" in metrics, sample
    assert '"route":"/v1/sessions/{session_id}/predict","status":401' in keyed.log()
    assert '"session":"no-key-7"' in keyed.log()


def test_tenants_with_the_same_session_id_never_touch_each_others_state(keyed: Server) -> None:
    values = series(12, seed=5)
    session = "pump-7"
    with httpx.Client(base_url=keyed.url, timeout=30) as http:
        alice, bob, carol = _as(ALICE), {"X-API-Key": BOB}, _as(CAROL)
        first = http.post(f"/v1/sessions/{session}/predict", headers=alice,
                          json={"values": values[:5].tolist()})
        assert (first.json()["position"], first.json()["created"]) == (5, True)

        # bob does not see alice's session, cannot continue, reset or delete it
        assert_problem(http.get(f"/v1/sessions/{session}", headers=bob), 404)
        assert_problem(http.post(f"/v1/sessions/{session}/predict", headers=bob,
                                 json={"values": values[5:].tolist(), "offset": 5}), 404)
        assert_problem(http.delete(f"/v1/sessions/{session}", headers=bob), 404)
        reset = http.post(f"/v1/sessions/{session}/reset", headers=bob).json()
        assert reset == {"session_id": session, "position": 0, "created": True}  # bob's own, new
        other = http.post(f"/v1/sessions/{session}/predict", headers=bob,
                          json={"values": [9.0, 9.0], "offset": 0})
        assert (other.json()["position"], other.json()["created"]) == (2, False)
        batch = http.post("/v1/predict/batch", headers=carol,
                          json={"items": [{"session_id": session, "values": [1.0], "offset": 0}]}).json()
        assert (batch["results"][0]["position"], batch["results"][0]["created"]) == (1, True)
        assert http.delete(f"/v1/sessions/{session}", headers=bob).status_code == 204

        # alice's session is untouched: same position, and it continues exactly where it was
        info = http.get(f"/v1/sessions/{session}", headers=alice).json()
        assert info["position"] == 5
        rest = http.post(f"/v1/sessions/{session}/predict", headers=alice,
                         json={"values": values[5:].tolist(), "offset": 5})
        assert rest.json()["position"] == 12
        expected = http.post("/v1/predict", headers=alice, json={"values": values.tolist()}).json()
        got = first.json()["predictions"] + rest.json()["predictions"]
        np.testing.assert_allclose(got, expected["predictions"], atol=1e-5)
        assert http.get(f"/v1/sessions/{session}", headers=carol).json()["position"] == 1


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_tenant_s_model_listing_counts_its_own_sessions_and_an_admin_s_every_tenant_s(
    server_factory: ServerFactory, request: pytest.FixtureRequest, store: str
) -> None:
    """How many sessions another tenant holds is that tenant's business: GET /v1/models counts the caller's
    own; an admin key (the operator, who may unload a model and every tenant's sessions with it) counts all."""
    admin = "ops-0123456789abcdef"
    settings = {"GRU_API_KEYS": KEYS, "GRU_ADMIN_KEYS": f"{admin}:ops"}
    if store == "redis":
        settings |= {"GRU_STORE": "redis", "GRU_REDIS_URL": request.getfixturevalue("redis_server").url}
    server = server_factory(**settings)
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for key, sessions in ((ALICE, ("a1", "a2")), (BOB, ("b1",))):
            for session in sessions:
                created = http.post(f"/v1/sessions/{session}/predict", headers=_as(key),
                                    json={"values": [0.1, 0.2], "offset": 0})
                assert created.status_code == 200, created.text

        def counted(key: str) -> list[int]:
            listing = http.get("/v1/models", headers=_as(key))
            assert listing.status_code == 200, listing.text
            return [version["sessions"] for model in listing.json()["models"] for version in model["versions"]]

        assert (counted(ALICE), counted(BOB), counted(admin)) == ([2], [1], [3])


def test_v2_sequences_are_namespaced_by_tenant(keyed: Server) -> None:
    with httpx.Client(base_url=keyed.url, timeout=30) as http:
        if not any(p.startswith("/v2/") for p in http.get("/openapi.json").json()["paths"]):
            pytest.skip("this build has no /v2 routes")
        name = http.get("/v1/model", headers=_as(ALICE)).json()["name"]
        started = http.post("/v1/sessions/42/predict", headers=_as(ALICE), json={"values": [0.1, 0.2, 0.3]})
        assert started.json()["position"] == 3

        def infer(key: str, **parameters: Any) -> httpx.Response:
            body = {"inputs": [{"name": "values", "datatype": "FP32", "shape": [2, 1], "data": [0.5, 0.6]}],
                    "parameters": {"sequence_id": 42, **parameters}}
            return http.post(f"/v2/models/{name}/infer", headers=_as(key), json=body)

        refused = infer(BOB)
        assert refused.status_code == 404, refused.text  # not alice's sequence 42: unknown to bob
        assert "error" in refused.json()
        assert infer(BOB, sequence_start=True).status_code == 200
        assert infer(BOB, sequence_end=True).status_code == 200  # ends (deletes) bob's sequence 42 only
        assert http.get("/v1/sessions/42", headers=_as(ALICE)).json()["position"] == 3


def test_keys_never_reach_the_log(keyed: Server) -> None:
    with httpx.Client(base_url=keyed.url, timeout=30) as http:
        http.get("/v1/model", headers=_as(ALICE))
        http.get("/v1/model", headers={"X-API-Key": BOB})
        http.get("/v1/model", headers=_as("wrong-" + CAROL))
        http.post(f"/v1/sessions/{new_id()}/predict", headers=_as(CAROL), json={"values": [0.1]})
    time.sleep(0.2)  # let the access lines flush
    log = keyed.log()
    assert '"status":401' in log and '"status":200' in log  # the requests were logged...
    for key in (ALICE, BOB, CAROL, "0123456789abcdef"):
        assert key not in log  # ...without their keys


def test_keys_in_a_stream_query_string_never_reach_the_log(keyed: Server) -> None:
    """A browser cannot set headers on a WebSocket, so keys get put in its query string; uvicorn logs each
    upgrade's path, and that line must not carry them."""
    session = new_id("ws-query")
    url = keyed.url.replace("http://", "ws://") + f"/v1/sessions/{session}/stream"
    with pytest.raises(InvalidStatus) as refused:
        connect(f"{url}?api_key={ALICE}")
    assert refused.value.response.status_code == 401
    with connect(f"{url}?token={BOB}", additional_headers=_as(BOB)) as stream:
        stream.send(json.dumps({"values": [0.1], "offset": 0}))
        assert json.loads(stream.recv())["position"] == 1
    deadline = time.monotonic() + 5
    while len(lines := [line for line in keyed.log().splitlines() if f"{session}/stream" in line]) < 2:
        assert time.monotonic() < deadline, lines
        time.sleep(0.05)
    assert len(lines) == 2 and all(f"/v1/sessions/{session}/stream" in line for line in lines)
    for key in (ALICE, BOB, "0123456789abcdef"):
        assert key not in keyed.log()


def test_a_refused_stream_upgrade_is_counted_and_logged_like_any_refusal(keyed: Server) -> None:
    """Keys guessed over WebSocket upgrades show where keys guessed over HTTP do: gru_requests_total and the
    access log, under the stream's route template and method WS."""
    route = "/v1/sessions/{session_id}/stream"

    def refusals() -> float:
        families = {f.name: f for f in text_string_to_metric_families(httpx.get(keyed.url + "/metrics").text)}
        return sum(s.value for s in families["gru_requests"].samples if s.name == "gru_requests_total"
                   and s.labels == {"route": route, "method": "WS", "status": "401"})

    before = refusals()
    url = keyed.url.replace("http://", "ws://") + "/v1/sessions/guessing/stream"
    for request_id, headers in (("ws-guess-1", {}), ("ws-guess-2", _as("wrong-" + ALICE))):
        with pytest.raises(InvalidStatus) as refused:
            connect(url, additional_headers={"X-Request-ID": request_id, **headers})
        assert refused.value.response.status_code == 401
        assert refused.value.response.headers["x-request-id"] == request_id
    assert refusals() == before + 2
    deadline = time.monotonic() + 5
    while not (lines := [json.loads(line) for line in keyed.log().splitlines() if '"ws-guess-2"' in line]):
        assert time.monotonic() < deadline, "no access line for the refused upgrade"
        time.sleep(0.05)
    assert [(line["route"], line["method"], line["status"], line["session"]) for line in lines] == [
        (route, "WS", 401, "guessing")]


def test_default_tenant_without_keys_keeps_the_v1_contract(client: httpx.Client) -> None:
    values = series(6, seed=6)
    session = new_id()
    assert send(client, session, values[:3], offset=0).status_code == 200
    assert send(client, session, values[3:], offset=3).status_code == 200
    assert position(client, session) == 6
    assert stateless(client, values)["predictions"]


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ("s3cret" + "k" * 507 + ":alice", "entry 1: the key must be 1-512"),  # 513 characters
        ("s3cret:" + "t" * 65, "entry 1: the tenant must match"),  # 65 characters
    ],
    ids=["key over 512", "tenant over 64"],
)
def test_keys_and_tenants_past_their_length_limits_are_refused(keys: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as caught:
        load_api_keys(keys, None)
    assert "s3cret" not in str(caught.value)


def test_keys_and_tenants_at_their_length_limits_are_accepted() -> None:
    key, tenant = "k" * 512, "t" * 64
    assert load_api_keys(f"{key}:{tenant}", None) == {key: tenant}
