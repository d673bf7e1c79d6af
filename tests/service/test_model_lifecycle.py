"""Several models from a repository, and new versions published while sessions stream (real servers)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file
from tritonclient.utils import InferenceServerException
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from harness.processes import Process as Server
from model.checkpoint import CONFIG_FILE, MAX_CONFIG_BYTES, WEIGHTS_FILE
from service.config import Settings
from service.metrics import Metrics
from service.models import Registry, ServedModel
from service.refusals import Refusal
from service.repository import Repository
from service.snapshots import ModelSnapshots
from tests.conftest import ServerFactory, make_tiny_model, refused_start_log
from tests.model.test_checkpoint import _edit_calibration
from tests.service.helpers import assert_problem, new_id, send, series

ROOT = Path(__file__).resolve().parents[2]


def add_version(repository: Path, model: str, version: int, seed: int = 0,
                features: tuple[str, ...] = ("x",), error_scale: float | None = None) -> Path:
    """A tiny model as ``repository/model/version``, written aside and renamed in: a poll sees all or nothing;
    calibrated (``make_tiny_model``) when ``error_scale`` is given."""
    (repository / model).mkdir(parents=True, exist_ok=True)
    staging = make_tiny_model(repository.parent / f"staging-{model}-{version}", features=features, seed=seed,
                              name=model, error_scale=error_scale)
    return staging.rename(repository / model / str(version))


def polled_repository(server_factory: ServerFactory, tmp_path: Path, **env: str) -> tuple[Path, Server]:
    """A repository holding model ``m`` version 1, and a server polling it every 0.1 s with ``env`` added."""
    repository = tmp_path / "repo"
    add_version(repository, "m", 1)
    server = server_factory(GRU_MODEL_REPOSITORY=str(repository), GRU_REPOSITORY_POLL_SECONDS="0.1", **env)
    return repository, server


def two_models(server_factory: ServerFactory, tmp_path: Path, b_seed: int = 3,
               b_features: tuple[str, ...] = ("p", "q"), **env: str) -> tuple[Path, Server]:
    """A repository holding models ``a`` (the default) and ``b`` at version 1, and a server on it with ``env``
    added."""
    repository = tmp_path / "repo"
    add_version(repository, "a", 1)
    add_version(repository, "b", 1, seed=b_seed, features=b_features)
    server = server_factory(GRU_MODEL_REPOSITORY=str(repository), GRU_DEFAULT_MODEL="a", **env)
    return repository, server


def models(client: httpx.Client) -> dict[str, Any]:
    response = client.get("/v1/models")
    assert response.status_code == 200, response.text
    return {entry["name"]: entry for entry in response.json()["models"]}


def versions(client: httpx.Client, model: str) -> dict[str, dict[str, Any]]:
    return {v["version"]: v for v in models(client)[model]["versions"]}


def wait_for(condition: Any, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def sample(client: httpx.Client, name: str, **labels: str) -> float | None:
    """The value of the first sample of ``name`` with ``labels`` on /metrics; None when there is none."""
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for found in family.samples:
            if found.name == name and all(found.labels.get(k) == v for k, v in labels.items()):
                return float(found.value)
    return None


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """``sample``, 0 when there is none (a counter not yet counted)."""
    value = sample(client, name, **labels)
    return 0.0 if value is None else value


def test_repository_scan_lists_versions_and_ignores_what_breaks_the_layout(tmp_path: Path) -> None:
    add_version(tmp_path, "pumps", 2)
    add_version(tmp_path, "pumps", 10, seed=1)
    (tmp_path / "pumps" / "0").mkdir()  # not a positive integer
    (tmp_path / "pumps" / ".publishing-x").mkdir()  # a publication in progress
    (tmp_path / "bad name!").mkdir()
    (tmp_path / "empty").mkdir()
    found = Repository(root=tmp_path).scan()
    assert list(found) == ["pumps"]
    assert [v.version for v in found["pumps"]] == [2, 10]


def test_a_version_numbered_by_a_unix_time_is_served_as_the_newest(tmp_path: Path) -> None:
    """Versions are positive integers (README), and a release stamped with the time it was published is one:
    1733400000 is newer than 1. Versions of ten digits or more were ignored by the scan, with no log line,
    and version 1 went on serving for good."""
    registry = _in_process_registry(tmp_path)
    add_version(registry.repository.root, "m", 1733400000, seed=1)
    add_version(registry.repository.root, "m", 10**17, seed=2)

    async def scenario() -> int:
        await registry.start()
        newest = registry.models["m"].newest.number
        await registry.stop()
        return newest

    assert asyncio.run(scenario()) == 10**17


def test_a_newest_version_removed_and_published_again_under_its_number_serves_the_new_weights(
    tmp_path: Path,
) -> None:
    """Version 2, the newest, is removed, and the training CLI's next publication takes its number again
    (the highest on disk is 1) with other weights. The poll loads them under that number: new sessions get the
    new weights, and the old weights' session gets 409 model-changed, never an answer of the new weights. The
    service went on serving the removed weights for good, listed as version 2, and said nothing."""
    registry = _in_process_registry(tmp_path)
    repository = registry.repository.root
    assert repository is not None
    add_version(repository, "m", 2, seed=1)
    values = series(8).reshape(8, 1)
    metrics = registry.metrics.registry

    async def scenario() -> tuple[str, str, str, Any, Any]:
        await registry.start()
        model = registry.models["m"]
        old = model.newest.model_version
        await model.engine.predict("t/old", values, 0, 0)
        shutil.rmtree(repository / "m" / "2")
        time.sleep(0.05)  # past the file system's timestamp granularity
        add_version(repository, "m", 2, seed=2)
        await registry.poll()
        await registry.poll()  # nothing more to do: it stays as it is
        new = json.loads(await model.engine_for("t/new").predict("t/new", values, 0, 0))
        stale = await asyncio.gather(model.engine_for("t/old").predict("t/old", values, 8, 0), return_exceptions=True)
        numbers = sorted(model.versions)
        await registry.stop()
        return old, new["model_version"], new["version"], numbers, stale[0]

    old, new_hash, number, numbers, stale = asyncio.run(scenario())
    assert numbers == [2] and number == "2"
    assert new_hash == registry.repository.model_version_of(registry.repository.scan()["m"][-1]) != old
    assert type(stale).__name__ == "StaleModel", stale
    assert metrics.get_sample_value("gru_model_version_evictions_total", {"model": "m"}) == 1


def test_a_skipped_version_is_tried_again_when_only_its_permissions_change(tmp_path: Path) -> None:
    """A version refused for its files is logged and counted once per state of its files. Making an
    unreadable file readable (chmod, chown) moves its ctime alone, and is a change: it is tried again."""
    repository = tmp_path / "repo"
    weights = add_version(repository, "m", 1) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    skipped: list[int] = []
    versions_on_disk = Repository(root=repository, on_skip=lambda model, version: skipped.append(version))
    where = versions_on_disk.scan()["m"][0]
    for _ in range(2):
        assert versions_on_disk.load(where, torch.device("cpu")) is None
    assert skipped == [1]
    time.sleep(0.05)  # past the file system's timestamp granularity
    weights.chmod(0o600)
    assert versions_on_disk.load(where, torch.device("cpu")) is None  # still damaged: tried, refused again
    assert skipped == [1, 1]


def test_a_version_that_fails_to_load_holds_up_no_other_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process: loading model a's new version raises what its files do not explain, a GPU out of memory
    (raised by hand: there is no GPU here). The poll goes on to model b's new version and the drain; the next
    poll tries a's again. The first failure ended the poll, and every poll after it while it lasted."""
    repository = tmp_path / "repo"
    for name in ("a", "b"):
        add_version(repository, name, 1)
    settings = Settings(model_repository=repository, default_model="a", repository_poll_seconds=0, device="cpu")
    registry = Registry(settings, Repository(root=repository), torch.device("cpu"), Metrics())
    registry.open()
    for name in ("a", "b"):
        add_version(repository, name, 2, seed=1)
    full = [True]
    load = Repository.load

    def load_on_a_full_gpu(self: Repository, where: Any, device: torch.device) -> Any:
        if where.model == "a" and full[0]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (raised by the test)")
        return load(self, where, device)

    monkeypatch.setattr(Repository, "load", load_on_a_full_gpu)

    async def scenario() -> list[dict[str, list[int]]]:
        await registry.start()
        listed = []
        for _ in range(2):
            await registry.poll()
            listed.append({name: sorted(model.versions) for name, model in registry.models.items()})
            full[0] = False
        await registry.stop()
        return listed

    assert asyncio.run(scenario()) == [{"a": [1], "b": [2]}, {"a": [2], "b": [2]}]  # version 1s drained: no sessions


def test_models_are_listed_and_each_has_its_own_routes_and_sessions(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    repository, server = two_models(server_factory, tmp_path)
    a_path = repository / "a" / "1"
    with httpx.Client(base_url=server.url, timeout=30) as client:
        a_version = client.get("/v1/models/a").json()["version"]
        assert client.get("/v1/model").json() == client.get("/v1/models/a").json()
        assert client.get("/v1/models/b").json()["input_features"] == 2
        listed = models(client)
        assert listed["a"] == {"name": "a", "default": True, "versions": [
            {"version": "1", "model_version": a_version, "state": "serving", "sessions": 0}]}
        assert listed["b"]["default"] is False

        session = new_id()
        first = send(client, session, series(3), offset=0).json()
        assert (first["model"], first["version"], first["model_version"]) == ("a", "1", a_version)
        # today's route and the default model's route are one session
        again = client.post(f"/v1/models/a/sessions/{session}/predict", json={"values": [0.4], "offset": 3})
        assert again.status_code == 200 and again.json()["position"] == 4 and again.json()["created"] is False
        info = client.get(f"/v1/sessions/{session}").json()
        assert (info["position"], info["model"], info["version"]) == (4, "a", "1")
        # the same id under another model is another session
        other = client.post(f"/v1/models/b/sessions/{session}/predict", json={"values": [[0.1, 0.2]], "offset": 0})
        assert other.status_code == 200, other.text
        assert (other.json()["created"], other.json()["model"]) == (True, "b")
        assert versions(client, "a")["1"]["sessions"] == 1 and versions(client, "b")["1"]["sessions"] == 1
        stateless = client.post("/v1/models/b/predict", json={"values": [[0.1, 0.2], [0.2, 0.1]]}).json()
        assert stateless["model"] == "b" and len(stateless["predictions"]) == 2
        batch = client.post("/v1/models/b/predict/batch", json={"items": [
            {"session_id": session, "values": [[0.3, 0.3]], "offset": 1}]}).json()
        assert batch["results"][0]["position"] == 2 and batch["results"][0]["model"] == "b"
        assert client.delete(f"/v1/models/b/sessions/{session}").status_code == 204
        assert client.get(f"/v1/sessions/{session}").status_code == 200  # a's is untouched

        for method, path in (("GET", "/v1/models/nope"), ("GET", f"/v1/models/nope/sessions/{session}"),
                             ("POST", f"/v1/models/nope/sessions/{session}/predict"),
                             ("POST", "/v1/models/nope/predict")):
            body = assert_problem(client.request(method, path, json={"values": [0.1]}), 404)
            assert "nope" in body["detail"]
        v2 = client.get("/v2/models/b").json()
        assert v2["name"] == "b" and v2["inputs"][0]["shape"] == [-1, 2]
    assert a_path.exists()


def test_several_models_and_no_default_stop_start_up_naming_them(tmp_path: Path, tiny_model: Path) -> None:
    repository = tmp_path / "repo"
    add_version(repository, "a", 1)
    add_version(repository, "b", 1)
    log = refused_start_log(tiny_model, tmp_path, {"GRU_MODEL_REPOSITORY": str(repository)})
    assert "several models (a, b)" in log and "GRU_DEFAULT_MODEL" in log


def _skipped_once(log: str, version: int, why: str) -> str:
    """Model m's ``version`` was skipped with one log line, saying ``why``: that line."""
    lines = [line for line in log.splitlines() if f"model m version {version} skipped" in line]
    assert len(lines) == 1 and why in lines[0], (version, lines)
    return lines[0]


def _serves_version_1_alone(client: httpx.Client) -> None:
    assert list(versions(client, "m")) == ["1"]
    assert send(client, new_id(), series(3)).json()["version"] == "1"


def test_damaged_half_written_and_incompatible_versions_are_skipped_once(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    repository, server = polled_repository(server_factory, tmp_path)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        damaged = add_version(repository, "m", 2, seed=1)
        weights = damaged / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
        add_version(repository, "m", 3, seed=2, features=("x", "y"))
        half = repository / "m" / "4"
        half.mkdir()
        shutil.copy(damaged / "config.json", half / "config.json")  # weights not there yet
        wait_for(lambda: metric(client, "gru_model_versions_skipped_total", model="m") >= 3)
        time.sleep(0.5)  # several more polls: each refusal is logged and counted once
        assert metric(client, "gru_model_versions_skipped_total", model="m") == 3
        for version, why in ((2, "truncated"), (3, "features"), (4, "does not exist")):
            _skipped_once(server.log(), version, why)
        _serves_version_1_alone(client)
        # the half-written version completes: its files changed, so it is tried again, and served
        complete = make_tiny_model(tmp_path / "v4", seed=4, name="m")
        shutil.copy(complete / "model.safetensors", half / "model.safetensors")
        shutil.copy(complete / "config.json", half / "config.json")
        wait_for(lambda: "4" in versions(client, "m"))
        assert send(client, new_id(), series(3)).json()["version"] == "4"


def test_a_deeply_nested_config_is_skipped_once_and_the_poll_goes_on_to_the_next_model(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    repository, server = polled_repository(server_factory, tmp_path)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        nested = make_tiny_model(tmp_path / "nested", seed=1, name="m")  # made aside, then renamed in
        (nested / "config.json").write_text("[" * 100_000 + "]" * 100_000)
        nested.rename(repository / "m" / "2")
        add_version(repository, "n", 1, seed=2)  # polled after m's version 2 in the same pass
        wait_for(lambda: "n" in models(client))
        time.sleep(0.5)  # several more polls: the refusal is logged and counted once
        assert metric(client, "gru_model_versions_skipped_total", model="m") == 1
        _skipped_once(server.log(), 2, "not a valid model config")
        assert "Traceback" not in server.log() and "poll failed" not in server.log()
        _serves_version_1_alone(client)


def test_a_version_with_a_config_over_the_size_limit_or_a_file_not_regular_is_skipped_unread(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    repository, server = polled_repository(server_factory, tmp_path)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        huge = make_tiny_model(tmp_path / "huge", seed=1, name="m")  # each made aside, then renamed in
        config = (huge / "config.json").read_text()
        (huge / "config.json").write_text(config.ljust(MAX_CONFIG_BYTES + 1))  # valid JSON, padded past the limit
        huge.rename(repository / "m" / "2")
        fifo = make_tiny_model(tmp_path / "fifo", seed=2, name="m")
        (fifo / "config.json").unlink()
        os.mkfifo(fifo / "config.json")  # opened for reading, it would wait for a writer for good
        fifo.rename(repository / "m" / "3")
        weights_fifo = make_tiny_model(tmp_path / "weights-fifo", seed=3, name="m")
        (weights_fifo / "model.safetensors").unlink()
        os.mkfifo(weights_fifo / "model.safetensors")
        weights_fifo.rename(repository / "m" / "4")
        add_version(repository, "n", 1, seed=4)
        wait_for(lambda: "n" in models(client))
        assert metric(client, "gru_model_versions_skipped_total", model="m") == 3
        for version, why in ((2, "larger than 64 MiB"), (3, "config.json is not a regular file"),
                             (4, "model.safetensors is not a regular file")):
            _skipped_once(server.log(), version, why)
        _serves_version_1_alone(client)


def test_a_version_whose_training_summary_is_no_shallow_object_is_skipped_and_v1_model_answers(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """"training" is outside the version hash: null, or an object some 400 deep, loaded and served, and
    GET /v1/model answered 500 for as long as that version was the newest."""
    repository, server = polled_repository(server_factory, tmp_path)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for version, training in ((2, "null"), (3, '{"a": ' * 400 + "1" + "}" * 400)):
            staging = make_tiny_model(tmp_path / f"v{version}", seed=version, name="m")  # made aside, renamed in
            meta = json.loads((staging / "config.json").read_text()) | {"training": "@"}
            (staging / "config.json").write_text(json.dumps(meta).replace('"@"', training))
            staging.rename(repository / "m" / str(version))
        add_version(repository, "n", 1, seed=4)  # polled after m's versions in the same pass
        wait_for(lambda: "n" in models(client))
        assert client.get("/v1/model").status_code == 200
        for version, why in ((2, "must be an object, got NoneType"), (3, "nests deeper than 16 levels")):
            _skipped_once(server.log(), version, why)
        _serves_version_1_alone(client)


def test_a_repository_that_vanishes_is_logged_once_serves_on_and_is_polled_again_when_back(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    repository, server = polled_repository(server_factory, tmp_path)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        away = repository.rename(tmp_path / "away")
        wait_for(lambda: "cannot be read" in server.log())
        time.sleep(0.5)  # several more polls of the missing repository
        assert send(client, new_id(), series(3)).json()["version"] == "1"
        assert list(versions(client, "m")) == ["1"]
        away.rename(repository)
        add_version(repository, "m", 2, seed=1)
        wait_for(lambda: "2" in versions(client, "m"))
        log = server.log()
        assert log.count("cannot be read") == 1 and log.count("can be read again") == 1
        assert send(client, new_id(), series(3)).json()["version"] == "2"


def test_a_skipped_version_s_log_line_quotes_a_bounded_part_of_a_huge_config_value(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    repository, server = polled_repository(server_factory, tmp_path)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        duplicated = make_tiny_model(tmp_path / "duplicated", seed=1, name="m")  # made aside, then renamed in
        meta = json.loads((duplicated / "config.json").read_text())
        meta["model"]["features"] = ["x"] * 200_000  # refused, and quoted in the reason
        (duplicated / "config.json").write_text(json.dumps(meta))
        duplicated.rename(repository / "m" / "2")
        wait_for(lambda: metric(client, "gru_model_versions_skipped_total", model="m") == 1)
        assert len(_skipped_once(server.log(), 2, "features must be distinct")) < 2000
        assert list(versions(client, "m")) == ["1"]


def _publish(repository: Path, csv: Path, name: str) -> subprocess.Popen[bytes]:
    """The training CLI publishing a model compatible with the tiny calibrated one (same features and state
    size: the CLI calibrates every model it writes)."""
    return subprocess.Popen(
        [sys.executable, "-m", "model.train", "--csv", str(csv), "--repository", str(repository), "--name", name,
         "--hidden", "16", "--layers", "2", "--lags", "4", "--epochs", "1", "--max-seconds", "1"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def _training_csv(path: Path) -> Path:
    values = series(300, seed=5)[:, 0]
    path.write_text("x\n" + "\n".join(f"{v:.6f}" for v in values) + "\n")
    return path


def test_a_session_streams_through_a_published_version_and_its_version_drains_after_it(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    repository = tmp_path / "repo"
    add_version(repository, "m", 1, error_scale=1.0)
    server = server_factory(GRU_MODEL_REPOSITORY=str(repository), GRU_REPOSITORY_POLL_SECONDS="0.2")
    whole = series(4000, seed=11)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        v1_alone = np.array(client.post("/v1/predict", json={"values": whole.tolist()}).json()["predictions"])
        session, at, answers = new_id(), 0, []

        def step() -> None:
            nonlocal at
            response = send(client, session, whole[at : at + 4], offset=at)
            assert response.status_code == 200, response.text  # no request fails, before, during or after
            body = response.json()
            assert body["version"] == "1"
            answers.append(body["predictions"])
            at += 4

        step()
        publisher = _publish(repository, _training_csv(tmp_path / "x.csv"), "m")
        while publisher.poll() is None:
            step()
            time.sleep(0.05)  # a steady client, not a flood: the series must outlast the training
        assert publisher.returncode == 0, publisher.stderr.read() if publisher.stderr else ""
        wait_for(lambda: "2" in versions(client, "m"))
        for _ in range(5):
            step()
        listed = versions(client, "m")
        assert (listed["2"]["state"], listed["1"]["state"], listed["1"]["sessions"]) == ("serving", "draining", 1)
        fresh = send(client, new_id(), whole[:4]).json()
        assert fresh["version"] == "2" and fresh["model_version"] == listed["2"]["model_version"]
        # S answered what version 1 alone answers for the whole series
        np.testing.assert_allclose(np.concatenate(answers), v1_alone[:at], atol=1e-6)
        assert metric(client, "gru_model_versions", model="m", version="1", state="draining") == 1
        wait_for(lambda: metric(client, "gru_model_version_sessions", model="m", version="1") == 1)
        assert metric(client, "gru_steps_total", model="m", version="1") >= at
        assert metric(client, "gru_steps_total", model="m", version="2") >= 4
        assert client.delete(f"/v1/sessions/{session}").status_code == 204
        wait_for(lambda: list(versions(client, "m")) == ["2"])
        # an unloaded version's series are gone (the labels stay bounded)
        assert "version=\"1\"" not in client.get("/metrics").text
        assert metric(client, "gru_model_versions", model="m", version="1", state="draining") == 0
        assert metric(client, "gru_model_versions", model="m", version="2", state="serving") == 1


def _model_info(client: httpx.Client) -> dict[str, str]:
    """The labels of the one ``gru_model_info`` sample on /metrics."""
    (info,) = [s for family in text_string_to_metric_families(client.get("/metrics").text)
               for s in family.samples if s.name == "gru_model_info"]
    return dict(info.labels)


def test_the_model_info_metric_names_the_default_model_s_newest_version_after_an_update(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """``gru_model_info`` (the dashboard's Model panel: name, version, device) was set once at start-up: after
    version 2 was published and served every new session, it went on naming version 1's hash for good."""
    repository, server = polled_repository(server_factory, tmp_path)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        first = client.get("/v1/model").json()["version"]
        assert _model_info(client)["version"] == first
        add_version(repository, "m", 2, seed=1)
        wait_for(lambda: "2" in versions(client, "m"))
        newest = client.get("/v1/model").json()["version"]
        assert newest != first
        assert _model_info(client) == {"name": "m", "version": newest, "device": "cpu", "variant": "seed"}


@pytest.mark.parametrize("end", ["expiry", "eviction"])
def test_a_version_whose_last_session_expires_or_is_evicted_is_unloaded(
    server_factory: ServerFactory, tmp_path: Path, end: str
) -> None:
    limits = ({"GRU_SESSION_TTL_SECONDS": "1"} if end == "expiry"
              else {"GRU_MAX_SESSIONS": "1", "GRU_MAX_BATCH_SIZE": "1"})
    repository, server = polled_repository(server_factory, tmp_path, **limits)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        pinned = new_id()
        assert send(client, pinned, series(4), offset=0).json()["version"] == "1"
        add_version(repository, "m", 2, seed=1)
        wait_for(lambda: "2" in versions(client, "m"))
        assert versions(client, "m")["1"]["state"] == "draining"
        if end == "eviction":  # the one place goes to a new session on version 2: the pinned one is evicted
            assert send(client, new_id(), series(4), offset=0).json()["version"] == "2"
        wait_for(lambda: list(versions(client, "m")) == ["2"])
        refused = send(client, pinned, series(4), offset=4)
        assert assert_problem(refused, 404)["type"].endswith("/session-not-found")


def test_state_export_import_and_fork_are_per_model(server_factory: ServerFactory, tmp_path: Path) -> None:
    _, server = two_models(server_factory, tmp_path)
    values = np.stack([series(20, seed=8)[:, 0], series(20, seed=9)[:, 0]], axis=1)
    octet = {"Content-Type": "application/octet-stream"}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        whole = client.post("/v1/models/b/predict", json={"values": values.tolist()}).json()["predictions"]
        first = client.post("/v1/models/b/sessions/s/predict", json={"values": values[:8].tolist(), "offset": 0})
        assert first.status_code == 200, first.text
        exported = client.get("/v1/models/b/sessions/s/state")
        assert exported.status_code == 200 and exported.headers["etag"]
        assert client.get("/v1/sessions/s/state").status_code == 404  # the default model's "s" is another session
        refused = client.put("/v1/sessions/s/state", content=exported.content, headers=octet)
        assert assert_problem(refused, 409)["type"].endswith("/model-changed")  # b's state means nothing to a
        forked = client.post("/v1/models/b/sessions/s/fork", json={"to": "t"})
        assert forked.status_code == 201 and forked.json()["model"] == "b"
        imported = client.put("/v1/models/b/sessions/u/state", content=exported.content, headers=octet)
        assert imported.status_code == 201 and imported.json()["position"] == 8
        for session in ("s", "t", "u"):
            body = client.post(f"/v1/models/b/sessions/{session}/predict",
                               json={"values": values[8:].tolist(), "offset": 8})
            assert body.status_code == 200, body.text
            np.testing.assert_allclose(body.json()["predictions"], whole[8:], atol=1e-6)



def test_a_per_model_import_or_fork_answers_the_location_of_that_models_session(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """The Location of a session created under /v1/models/b/... names b's session, not the default model's
    session of the same id (which is another session, or none)."""
    _, server = two_models(server_factory, tmp_path)
    values = np.stack([series(8, seed=8)[:, 0], series(8, seed=9)[:, 0]], axis=1)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        first = client.post("/v1/models/b/sessions/s/predict", json={"values": values.tolist(), "offset": 0})
        assert first.status_code == 200, first.text
        exported = client.get("/v1/models/b/sessions/s/state")
        forked = client.post("/v1/models/b/sessions/s/fork", json={"to": "t"})
        imported = client.put("/v1/models/b/sessions/u/state", content=exported.content,
                              headers={"Content-Type": "application/octet-stream"})
        for created, session in ((forked, "t"), (imported, "u")):
            assert created.status_code == 201, created.text
            assert created.headers["location"].endswith(f"/v1/models/b/sessions/{session}")
            described = client.get(created.headers["location"])
            assert described.status_code == 200 and described.json()["model"] == "b"


PLAIN, ADMIN = "plain-key-0123456789", "admin-key-0123456789"


def test_tritonclient_indexes_loads_and_unloads_models_with_an_admin_key(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    repository, server = two_models(server_factory, tmp_path, b_seed=1, b_features=("x",),
                                    GRU_REPOSITORY_POLL_SECONDS="0", GRU_API_KEYS=f"{PLAIN}:alice",
                                    GRU_ADMIN_KEYS=f"{ADMIN}:ops")
    admin, plain = {"Authorization": f"Bearer {ADMIN}"}, {"Authorization": f"Bearer {PLAIN}"}
    tc = triton.InferenceServerClient(server.url.removeprefix("http://"), connection_timeout=30, network_timeout=30)
    try:
        assert tc.get_model_repository_index(headers=admin) == [
            {"name": "a", "version": "1", "state": "READY"}, {"name": "b", "version": "1", "state": "READY"}]
        for call in (lambda: tc.get_model_repository_index(headers=plain),
                     lambda: tc.load_model("b", headers=plain), lambda: tc.unload_model("b", headers=plain)):
            with pytest.raises(InferenceServerException) as refused:
                call()
            assert refused.value.status() == "403"
        with httpx.Client(base_url=server.url, timeout=30, headers=plain) as client:
            assert client.post("/v2/repository/index", headers={"Authorization": ""}).status_code == 401
            forbidden = client.post("/v2/repository/index")  # a valid key, not an admin one: RFC 6750 §3.1
            assert forbidden.status_code == 403
            assert forbidden.headers["www-authenticate"] == 'Bearer realm="gru", error="insufficient_scope"'
            tc.unload_model("b", headers=admin)
            assert_problem(client.get("/v1/models/b"), 404)
            assert {"name": "b", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded on request"} in (
                tc.get_model_repository_index(headers=admin))
            ready = client.post("/v2/repository/index", json={"ready": True}, headers=admin)
            assert ready.json() == [{"name": "a", "version": "1", "state": "READY"}]
            with pytest.raises(InferenceServerException) as refused:
                tc.unload_model("a", headers=admin)
            assert refused.value.status() == "409" and "default model" in refused.value.message()
            with pytest.raises(InferenceServerException) as refused:
                tc.load_model("nope", headers=admin)
            assert refused.value.status() == "404"
            add_version(repository, "b", 2, seed=2)
            tc.load_model("b", headers=admin)  # the newest valid version
            assert list(versions(client, "b")) == ["2"]
            assert tc.is_model_ready("b", "2", headers=plain)
            assert send(client, new_id(), series(3)).json()["model"] == "a"
    finally:
        tc.close()


def test_replay_moves_a_session_onto_the_new_version_within_a_bounded_error(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    repository, server = polled_repository(server_factory, tmp_path, GRU_UPGRADE="replay")
    whole = series(300, seed=12)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        session = new_id()
        for at in range(0, 100, 10):
            assert send(client, session, whole[at : at + 10], offset=at).json()["version"] == "1"
        add_version(repository, "m", 2, seed=1)
        wait_for(lambda: list(versions(client, "m")) == ["2"])  # nothing is pinned: version 1 goes at once
        answers = []
        for at in range(100, 300, 10):
            body = send(client, session, whole[at : at + 10], offset=at).json()
            upgraded = True if at == 100 else None  # only the chunk that moved it says so
            assert (body["version"], body["position"], body.get("upgraded")) == ("2", at + 10, upgraded)
            answers.append(body["predictions"])
        v2_alone = np.array(client.post("/v1/predict", json={"values": whole.tolist()}).json()["predictions"])[100:]
        # per chunk, the largest distance to what version 2 answers having seen the whole series: the hidden
        # state rebuilt from the K = 4 values kept differs at first, then forgets the difference
        error = np.abs(np.concatenate(answers) - v2_alone)[:, 0].reshape(-1, 10).max(axis=1)
        assert 0 < error[0] < 1e-2 and error[5:].max() < 1e-5, error


def test_two_replicas_on_redis_keep_a_pinned_session_across_an_update(
    server_factory: ServerFactory, tmp_path: Path, redis_server: Any
) -> None:
    repository = tmp_path / "repo"
    add_version(repository, "m", 1)
    env = {"GRU_MODEL_REPOSITORY": str(repository), "GRU_REPOSITORY_POLL_SECONDS": "0.2", "GRU_STORE": "redis",
           "GRU_REDIS_URL": redis_server.url}
    first = server_factory(**env)
    whole = series(200, seed=21)
    with httpx.Client(base_url=first.url, timeout=30) as a:
        v1_alone = np.array(a.post("/v1/predict", json={"values": whole.tolist()}).json()["predictions"])
        session, answers = new_id(), []
        for at in range(0, 40, 4):
            answers.append(send(a, session, whole[at : at + 4], offset=at).json()["predictions"])
        add_version(repository, "m", 2, seed=1)
        wait_for(lambda: "2" in versions(a, "m"))
        # a replica started now loads version 2, and version 1 too, before it serves: S is pinned to it
        second = server_factory(**env)
        with httpx.Client(base_url=second.url, timeout=30) as b:
            assert set(versions(b, "m")) == {"1", "2"} and versions(b, "m")["1"]["sessions"] == 1
            for at in range(40, 200, 4):
                body = send(b if at % 8 else a, session, whole[at : at + 4], offset=at).json()
                assert body["version"] == "1", body
                answers.append(body["predictions"])
            np.testing.assert_allclose(np.concatenate(answers), v1_alone, atol=1e-6)
            assert send(b, new_id(), whole[:4]).json()["version"] == "2"
            assert b.delete(f"/v1/sessions/{session}").status_code == 204
            wait_for(lambda: list(versions(a, "m")) == ["2"] and list(versions(b, "m")) == ["2"])


def test_beyond_max_loaded_versions_the_oldest_goes_and_its_sessions_get_409(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    repository, server = polled_repository(server_factory, tmp_path, GRU_MAX_LOADED_VERSIONS="2")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        on_1, on_2 = new_id(), new_id()
        assert send(client, on_1, series(3)).json()["version"] == "1"
        add_version(repository, "m", 2, seed=1)
        wait_for(lambda: "2" in versions(client, "m"))
        assert send(client, on_2, series(3)).json()["version"] == "2"
        add_version(repository, "m", 3, seed=2)
        wait_for(lambda: "3" in versions(client, "m"))
        assert list(versions(client, "m")) == ["3", "2"]
        stale = assert_problem(send(client, on_1, series(3, seed=1), offset=3), 409)
        assert stale["type"].endswith("model-changed")
        assert send(client, on_2, series(3, seed=1), offset=3).json()["version"] == "2"
        assert metric(client, "gru_model_version_evictions_total", model="m") == 1
        assert "GRU_MAX_LOADED_VERSIONS=2" in server.log()


def test_a_fork_of_a_session_whose_version_is_not_loaded_is_409_like_its_import_and_creates_nothing(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """A fork writes a session as an import does: of a version this service has not loaded (here unloaded
    beyond GRU_MAX_LOADED_VERSIONS) it would make a session no chunk can continue, so it is refused alike."""
    repository, server = polled_repository(server_factory, tmp_path, GRU_MAX_LOADED_VERSIONS="1")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        pinned, branch = new_id(), new_id("branch")
        assert send(client, pinned, series(3)).json()["version"] == "1"
        exported = client.get(f"/v1/sessions/{pinned}/state")
        assert exported.status_code == 200, exported.text
        add_version(repository, "m", 2, seed=1)
        wait_for(lambda: list(versions(client, "m")) == ["2"])
        imported = client.put(f"/v1/sessions/{branch}/state", content=exported.content,
                              headers={"Content-Type": "application/octet-stream"})
        assert assert_problem(imported, 409)["type"].endswith("/model-changed")
        forked = assert_problem(client.post(f"/v1/sessions/{pinned}/fork", json={"to": branch}), 409)
        assert forked["type"].endswith("/model-changed")
        assert (forked["session_id"], forked["position"]) == (pinned, 3)
        assert_problem(client.get(f"/v1/sessions/{branch}"), 404)
        assert client.get(f"/v1/sessions/{pinned}/state").content == exported.content


def test_a_new_version_is_listed_only_once_warmed_with_the_oldest_beyond_the_limit_already_gone(
    tmp_path: Path,
) -> None:
    """In-process, the versions every step of the event loop sees while a poll loads version 2 under
    GRU_MAX_LOADED_VERSIONS=1: a watcher steps at each of the poll's awaits, as a request or a listing would.
    Listed while it warmed up, version 2 stood beside version 1 (one more than the limit) and took requests
    it could not answer yet."""
    repository = tmp_path / "repo"
    add_version(repository, "m", 1)
    settings = Settings(model_repository=repository, max_loaded_versions=1, repository_poll_seconds=0, device="cpu")
    metrics = Metrics()
    registry = Registry(settings, Repository(root=repository), torch.device("cpu"), metrics)
    registry.open()

    async def scenario() -> list[list[int]]:
        await registry.start()
        add_version(repository, "m", 2, seed=1)
        seen: list[list[int]] = []
        polling = asyncio.ensure_future(registry.poll())
        while not polling.done():
            listed = sorted(registry.models["m"].versions)
            if not seen or seen[-1] != listed:
                seen.append(listed)
            await asyncio.sleep(0)
        await polling
        await registry.stop()
        return seen

    assert asyncio.run(scenario()) == [[1], [2]]
    assert metrics.registry.get_sample_value("gru_model_version_evictions_total", {"model": "m"}) == 1


def _in_process_registry(tmp_path: Path, **settings: Any) -> Registry:
    """A registry (not started) on a repository holding model ``m`` version 1."""
    repository = tmp_path / "repo"
    add_version(repository, "m", 1)
    registry = Registry(Settings(model_repository=repository, repository_poll_seconds=0, device="cpu", **settings),
                        Repository(root=repository), torch.device("cpu"), Metrics())
    registry.open()
    return registry


async def _computing(registry: Registry, key: str, values: np.ndarray) -> tuple[ServedModel, asyncio.Future[bytes]]:
    """The registry started, and ``values`` queued at model ``m`` for session ``key`` (appended, no offset),
    once a batch has taken them: computing."""
    await registry.start()
    model = registry.models["m"]
    chunk = model.engine.enqueue(key, values, None, 0)
    while model.engine.queue:
        await asyncio.sleep(0.001)
    return model, chunk


async def _warm_version_2(registry: Registry) -> Callable[[], None]:
    """Version 2 of ``m``, loaded and warmed up; what lists it (the step a poll takes, with no await)."""
    add_version(registry.repository.root, "m", 2, seed=1)
    loaded = registry.repository.load(registry.repository.scan()["m"][-1], torch.device("cpu"))
    assert loaded is not None
    model, version = registry._prepare(loaded)
    await version.engine.start()
    return lambda: registry._enter(model, version)


@pytest.mark.parametrize("upgrade", ["pin", "replay"])
@pytest.mark.parametrize("at_work", [False, True], ids=["waiting", "computing"])
def test_a_session_s_chunks_keep_their_order_across_the_listing_of_a_version(
    tmp_path: Path, upgrade: str, at_work: bool
) -> None:
    """In-process, a new session appending without offsets: its chunks wait at version 1's engine (or the
    first, long, is computing there) as version 2 is listed, and the next one is sent after. Each applies in
    the order it was sent. The last went straight to version 2's engine and was judged first: the others were
    routed there behind it, or lost the session's creation to it (positions 16, 24, 8). The session is now
    pinned to the engine that holds its chunks until they move on."""
    registry = _in_process_registry(tmp_path, upgrade=upgrade)
    values = series(4008 if at_work else 24, seed=5)
    chunks = [values[:-8], values[-8:]] if at_work else list(values.reshape(3, 8, 1))

    async def scenario() -> list[bytes]:
        await registry.start()
        model = registry.models["m"]
        first = model.engine
        list_version_2 = await _warm_version_2(registry)
        early = [first.enqueue("t/s", chunk, None, 0) for chunk in chunks[:-1]]
        while at_work and first.queue:  # taken: the 4000 steps take tens of milliseconds to compute
            await asyncio.sleep(0.0005)
        list_version_2()  # no await from here until the last chunk is queued
        late = model.engine_for("t/s").enqueue("t/s", chunks[-1], None, 0)
        answers = await asyncio.gather(*early, late)
        await registry.stop()
        return answers

    ends = np.cumsum([len(chunk) for chunk in chunks]).tolist()
    assert [json.loads(answer)["position"] for answer in asyncio.run(scenario())] == ends


def test_at_shutdown_a_chunk_handed_to_its_session_s_version_is_answered(tmp_path: Path) -> None:
    """In-process: a session on version 1 sends a chunk to the newest, version 2, just as the service stops.
    Version 2's engine hands it to version 1's, which must still be taking chunks: the engines stopped one
    after another, and version 1's, stopped first, left it waiting for its timeout (503)."""
    registry = _in_process_registry(tmp_path, request_timeout_seconds=5)
    chunks = series(16, seed=6).reshape(2, 8, 1)

    async def scenario() -> bytes:
        await registry.start()
        model = registry.models["m"]
        await model.engine.predict("t/s", chunks[0], 0, 0)  # the session lives on version 1
        (await _warm_version_2(registry))()
        pending = model.engine.enqueue("t/s", chunks[1], 8, 0)  # the newest's engine, as a route sends it
        await registry.stop()
        return await pending  # TimedOut (503) where it waited at a stopped engine

    assert json.loads(asyncio.run(scenario()))["position"] == 16


LONG = 200_000  # steps: a chunk that keeps version 1's compute thread busy while a poll loads version 2


def _position_or_refusal(future: asyncio.Future[bytes]) -> Any:
    try:
        return json.loads(future.result())["position"]
    except Refusal as refused:
        return f"{type(refused).__name__}: {refused}"


def test_a_session_whose_first_chunk_computes_as_a_version_is_listed_keeps_its_version(tmp_path: Path) -> None:
    """In-process: a new session's first chunk is computing on version 1 as a poll lists version 2. The
    poll's drain counted no session on version 1 (the chunk had not committed) and unloaded it; its engine,
    finishing, created the session on version 1's weights, and the session's next chunk got 409
    model-changed. A version still holding chunks is not drained."""
    registry = _in_process_registry(tmp_path)
    values = series(LONG + 8, seed=3)

    async def scenario() -> Any:
        model, first = await _computing(registry, "t/s", values[:LONG])
        add_version(registry.repository.root, "m", 2, seed=1)
        await registry.poll()  # lists version 2 and drains
        await first
        second = model.engine_for("t/s").enqueue("t/s", values[LONG:], LONG, 0)
        await asyncio.wait({second})
        await registry.stop()
        return _position_or_refusal(second)

    assert asyncio.run(scenario()) == LONG + 8


def test_a_new_session_s_chunks_keep_their_order_when_a_poll_lists_a_version_and_drains(tmp_path: Path) -> None:
    """In-process: a new session appending without offsets has its first chunk waiting at version 1 (busy
    with another session's long chunk) as a poll lists version 2, and sends its second once version 1 is no
    longer the newest. ``ServedModel.add`` pinned the session to version 1; the same poll's drain unloaded
    version 1 and took the pin with it, so the second chunk went to version 2, created the session there and
    the first was applied after it (positions 16, 8)."""
    registry = _in_process_registry(tmp_path)
    busy = series(LONG, seed=4)
    chunks = series(16, seed=5).reshape(2, 8, 1)

    async def scenario() -> list[Any]:
        model, other = await _computing(registry, "t/other", busy)
        early = model.engine_for("t/s").enqueue("t/s", chunks[0], None, 0)  # waits behind it at version 1
        add_version(registry.repository.root, "m", 2, seed=1)
        polling = asyncio.ensure_future(registry.poll())
        while model.newest.number == 1 and not polling.done():
            await asyncio.sleep(0.001)
        late = model.engine_for("t/s").enqueue("t/s", chunks[1], None, 0)
        await asyncio.wait({other, early, late, polling})
        await registry.stop()
        return [_position_or_refusal(early), _position_or_refusal(late)]

    assert asyncio.run(scenario()) == [8, 16]


def test_unloading_a_model_answers_a_chunk_its_newest_version_hands_to_an_older_one(tmp_path: Path) -> None:
    """In-process: the repository API unloads model b while a chunk of a session pinned to version 1 waits at
    the newest, version 2. ``Registry.unload`` stopped the versions one after another, and version 2's engine
    handed the chunk to version 1's, already stopped: it waited for its timeout (503) after unload returned.
    Unload now lets every version finish before any stops, as shutdown does."""
    repository = tmp_path / "repo"
    add_version(repository, "a", 1)
    add_version(repository, "b", 1, seed=3)
    registry = Registry(Settings(model_repository=repository, default_model="a", repository_poll_seconds=0,
                                 device="cpu", request_timeout_seconds=5),
                        Repository(root=repository), torch.device("cpu"), Metrics())
    registry.open()
    chunks = series(16, seed=6).reshape(2, 8, 1)

    async def scenario() -> tuple[bool, Any]:
        await registry.start()
        model = registry.models["b"]
        await model.engine.predict("t/s", chunks[0], 0, 0)  # the session lives on version 1
        add_version(repository, "b", 2, seed=1)
        await registry.poll()  # version 2 serves; version 1 keeps its session
        assert sorted(model.versions) == [1, 2]
        pending = model.engine.enqueue("t/s", chunks[1], 8, 0)  # at the newest, as a route sends it
        await registry.unload("b")
        answered = pending.done()
        await asyncio.wait({pending})
        await registry.stop()
        return answered, _position_or_refusal(pending)

    assert asyncio.run(scenario()) == (True, 16)


def test_a_v2_sequence_start_does_not_overtake_the_chunk_sent_before_it(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Session s lives on version 1 as version 2 serves. It appends (no offset) while version 1 computes
    another session's long chunk, then starts its sequence again over v2. The restart went to the newest
    engine and was judged first, and the append sent before it applied on top: position 16, where the
    restart, sent last, leaves 8. It now queues behind the append, wherever that waits."""
    repository, server = polled_repository(server_factory, tmp_path, GRU_MAX_CHUNK_STEPS=str(LONG),
                                           GRU_MAX_BODY_BYTES=str(16 * 1024 * 1024))
    busy = series(LONG, seed=4)
    chunks = series(24, seed=5).reshape(3, 8, 1)
    s, other = new_id(), new_id()
    restart = {"inputs": [{"name": "values", "shape": [8, 1], "datatype": "FP32", "data": chunks[2].ravel().tolist()}],
               "parameters": {"sequence_id": s, "sequence_start": True}}
    with httpx.Client(base_url=server.url, timeout=60) as client, ThreadPoolExecutor(2) as pool:
        send(client, s, chunks[0], offset=0)
        send(client, other, busy[:8], offset=0)
        add_version(repository, "m", 2, seed=1)
        wait_for(lambda: "2" in versions(client, "m"))  # version 1 stays for its two sessions
        long = pool.submit(client.post, f"/v1/sessions/{other}/predict",
                           json={"values": busy[8:].tolist(), "offset": 8})
        time.sleep(0.5)  # version 1 computes it: seconds
        append = pool.submit(client.post, f"/v1/sessions/{s}/predict", json={"values": chunks[1].tolist()})
        time.sleep(0.2)  # the append waits at version 1
        restarted = client.post("/v2/models/m/infer", json=restart)
        assert restarted.status_code == 200, restarted.text
        assert long.result().status_code == append.result().status_code == 200
        assert client.get(f"/v1/sessions/{s}").json()["position"] == 8


def test_a_v2_infer_whose_body_arrives_as_its_version_is_drained_is_answered(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """A stateless v2 infer sends its headers and part of its body; version 2 is published and version 1,
    with no session, drained; then the rest of the body arrives. The route had taken version 1's engine
    before reading the body, and the stopped engine refused the chunk as at shutdown (503)."""
    repository, server = polled_repository(server_factory, tmp_path)
    body = json.dumps({"inputs": [{"name": "values", "shape": [3, 1], "datatype": "FP32",
                                   "data": [0.1, 0.2, 0.3]}]}).encode()
    with httpx.Client(base_url=server.url, timeout=30) as client, \
            socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\n\r\n" % len(body) + body[:10])
        time.sleep(0.3)  # the route waits for the rest of its body
        add_version(repository, "m", 2, seed=1)
        wait_for(lambda: list(versions(client, "m")) == ["2"])
        sock.sendall(body[10:])
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 200 "), head.decode(errors="replace")


def _stopped_with_two_versions(
    server_factory: ServerFactory, tmp_path: Path, seed: int
) -> tuple[Path, dict[str, str], np.ndarray, str, str, np.ndarray]:
    """A server with snapshots on model m: a session pinned to version 1 and one fresh on version 2, 20 of
    40 steps each, then stopped (the snapshot written). The repository, the environment, the series, the
    two session ids, and version 1's predictions of the whole series alone."""
    repository, path = tmp_path / "repo", tmp_path / "state" / "sessions.safetensors"
    add_version(repository, "m", 1)
    env = {"GRU_MODEL_REPOSITORY": str(repository), "GRU_REPOSITORY_POLL_SECONDS": "0.1",
           "GRU_SNAPSHOT_PATH": str(path)}
    first = server_factory(**env)
    whole = series(40, seed=seed)
    pinned, fresh = new_id(), new_id()
    with httpx.Client(base_url=first.url, timeout=30) as client:
        v1_alone = np.array(client.post("/v1/predict", json={"values": whole.tolist()}).json()["predictions"])
        send(client, pinned, whole[:20], offset=0)
        add_version(repository, "m", 2, seed=1)
        wait_for(lambda: "2" in versions(client, "m"))
        assert send(client, fresh, whole[:20], offset=0).json()["version"] == "2"
    assert first.stop() in (0, -signal.SIGTERM) and "snapshot written" in first.log()
    return repository, env, whole, pinned, fresh, v1_alone


def test_a_snapshot_keeps_each_session_on_its_version_across_a_restart(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    _, env, whole, pinned, fresh, v1_alone = _stopped_with_two_versions(server_factory, tmp_path, seed=31)
    # the snapshot names version 2, the newest; its version 1 session is restored and version 1 loaded for it
    second = server_factory(**env)
    assert '"sessions":2,' in second.log().split("snapshot restored")[1].splitlines()[0]
    with httpx.Client(base_url=second.url, timeout=30) as client:
        assert versions(client, "m")["1"]["sessions"] == 1
        body = send(client, pinned, whole[20:], offset=20).json()
        assert body["version"] == "1"
        np.testing.assert_allclose(body["predictions"], v1_alone[20:], atol=1e-6)
        assert send(client, fresh, whole[20:], offset=20).json()["version"] == "2"


def test_a_snapshot_whose_newest_version_was_removed_keeps_the_sessions_of_the_others(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Version 2 deleted from the repository while the service was down (a bad model taken out): its
    sessions are left out, as the records of a version the repository no longer has are; version 1's stay.
    The header names the newest, version 2, and set the whole file aside as another model's."""
    repository, env, whole, pinned, fresh, v1_alone = _stopped_with_two_versions(server_factory, tmp_path, seed=32)
    shutil.rmtree(repository / "m" / "2")
    second = server_factory(**env)
    restored = second.log().split("snapshot restored")[1].splitlines()[0]
    assert '"sessions":1,' in restored and '"unknown_version":1' in restored
    with httpx.Client(base_url=second.url, timeout=30) as client:
        body = send(client, pinned, whole[20:], offset=20).json()
        assert body["version"] == "1" and body["position"] == 40
        np.testing.assert_allclose(body["predictions"], v1_alone[20:], atol=1e-6)
        assert_problem(send(client, fresh, whole[20:], offset=20), 404)


def test_a_snapshot_keeps_every_models_sessions_across_a_restart(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """One file per model: the default's at GRU_SNAPSHOT_PATH, another's beside it with its name."""
    repository, path = tmp_path / "repo", tmp_path / "state" / "sessions.safetensors"
    add_version(repository, "a", 1)
    add_version(repository, "b", 1, seed=3, features=("p", "q"))
    env = {"GRU_MODEL_REPOSITORY": str(repository), "GRU_DEFAULT_MODEL": "a", "GRU_SNAPSHOT_PATH": str(path)}
    first = server_factory(**env)
    on_a, on_b = series(30, seed=5), np.stack([series(30, seed=6)[:, 0], series(30, seed=7)[:, 0]], axis=1)
    with httpx.Client(base_url=first.url, timeout=30) as client:
        whole = {"a": client.post("/v1/predict", json={"values": on_a.tolist()}).json()["predictions"],
                 "b": client.post("/v1/models/b/predict", json={"values": on_b.tolist()}).json()["predictions"]}
        send(client, "s", on_a[:12], offset=0)
        assert client.post("/v1/models/b/sessions/s/predict",
                           json={"values": on_b[:12].tolist(), "offset": 0}).status_code == 200
    assert first.stop() in (0, -signal.SIGTERM)
    assert path.exists() and (tmp_path / "state" / "sessions.b.safetensors").exists()
    second = server_factory(**env)
    with httpx.Client(base_url=second.url, timeout=30) as client:
        body_a = send(client, "s", on_a[12:], offset=12).json()
        body_b = client.post("/v1/models/b/sessions/s/predict", json={"values": on_b[12:].tolist(), "offset": 12})
        assert body_b.status_code == 200, body_b.text
    assert body_a["position"] == 30 and body_b.json()["position"] == 30
    np.testing.assert_allclose(body_a["predictions"], whole["a"][12:], atol=1e-6)
    np.testing.assert_allclose(body_b.json()["predictions"], whole["b"][12:], atol=1e-6)


def test_a_default_model_switched_across_restarts_keeps_every_models_sessions(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """The default's file is GRU_SNAPSHOT_PATH itself, another model's is named after it: after a restart with
    GRU_DEFAULT_MODEL=b, b read a's file and set it aside as incompatible, a found no file of its name, and
    both sessions answered 404. Switched back, a file left at a model's old path must not bring back older
    positions either."""
    repository, path = tmp_path / "repo", tmp_path / "state" / "sessions.safetensors"
    add_version(repository, "a", 1)
    add_version(repository, "b", 1, seed=3)
    values = series(12, seed=9)
    for start, default in enumerate(("a", "b", "a")):
        server = server_factory(GRU_MODEL_REPOSITORY=str(repository), GRU_DEFAULT_MODEL=default,
                                GRU_SNAPSHOT_PATH=str(path))
        offset = 4 * start  # each restart goes on where the one before stopped
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for model in ("a", "b"):
                answer = client.post(f"/v1/models/{model}/sessions/s/predict",
                                     json={"values": values[offset : offset + 4].tolist(), "offset": offset})
                assert answer.status_code == 200, f"model {model}, default {default}: {answer.text}"
                assert answer.json()["position"] == offset + 4
        assert server.stop() in (0, -signal.SIGTERM)
    assert not list(path.parent.glob("*.incompatible-*"))  # nothing set aside: each file found its model


def test_a_model_unloaded_and_loaded_again_has_its_new_sessions_snapshotted(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """Model b is unloaded and loaded again through the repository API: a new store. The snapshots kept the
    keeper made for the first one, so the final snapshot wrote the unloaded store: the sessions made since
    were lost at the restart, and the unloaded model's session came back."""
    repository, path = tmp_path / "repo", tmp_path / "state" / "sessions.safetensors"
    add_version(repository, "a", 1)
    add_version(repository, "b", 1, seed=3)
    env = {"GRU_MODEL_REPOSITORY": str(repository), "GRU_DEFAULT_MODEL": "a", "GRU_SNAPSHOT_PATH": str(path),
           "GRU_REPOSITORY_POLL_SECONDS": "0"}
    first = server_factory(**env)
    with httpx.Client(base_url=first.url, timeout=30) as client:
        def start_on_b(session: str, steps: int) -> None:
            answer = client.post(f"/v1/models/b/sessions/{session}/predict",
                                 json={"values": series(steps).tolist(), "offset": 0})
            assert answer.status_code == 200, answer.text

        start_on_b("old", 4)
        assert client.post("/v2/repository/models/b/unload").status_code == 200
        assert client.post("/v2/repository/models/b/load").status_code == 200
        assert client.get("/v1/models/b/sessions/old").status_code == 404  # its sessions went with it
        start_on_b("new", 5)
    assert first.stop() in (0, -signal.SIGTERM)
    second = server_factory(**env)
    with httpx.Client(base_url=second.url, timeout=30) as client:
        found = {s: client.get(f"/v1/models/b/sessions/{s}").status_code for s in ("old", "new")}
    assert found == {"old": 404, "new": 200}


def test_a_model_added_while_serving_whose_snapshot_cannot_be_written_costs_only_its_own(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """A path no snapshot can be written to stops a start; met for a model that appears while serving, it
    raised from the periodic save (ending it) and from the shutdown's, before any model's final snapshot
    was written: every session of every model went back to the last periodic snapshot."""
    repository, path = tmp_path / "repo", tmp_path / "state" / "sessions.safetensors"
    add_version(repository, "a", 1)
    (tmp_path / "state" / "sessions.b.safetensors").mkdir(parents=True)  # b's snapshot path is taken
    env = {"GRU_MODEL_REPOSITORY": str(repository), "GRU_DEFAULT_MODEL": "a", "GRU_REPOSITORY_POLL_SECONDS": "0.1",
           "GRU_SNAPSHOT_PATH": str(path), "GRU_SNAPSHOT_INTERVAL_SECONDS": "0.1"}
    first = server_factory(**env)
    with httpx.Client(base_url=first.url, timeout=30) as client:
        add_version(repository, "b", 1, seed=3)
        wait_for(lambda: "b" in models(client))
        wait_for(lambda: "sessions.b.safetensors" in first.log())  # the periodic save met it
        assert send(client, "s", series(12), offset=0).status_code == 200
    assert first.stop() in (0, -signal.SIGTERM)
    refused = [line for line in first.log().splitlines() if "sessions.b.safetensors" in line]
    assert len(refused) == 1 and '"level":"error"' in refused[0] and "Traceback" not in refused[0]
    (tmp_path / "state" / "sessions.b.safetensors").rmdir()  # else the next start is refused, as it should be
    second = server_factory(**{**env, "GRU_SNAPSHOT_INTERVAL_SECONDS": "0"})
    with httpx.Client(base_url=second.url, timeout=30) as client:
        assert client.get("/v1/sessions/s").json()["position"] == 12


def test_a_reset_moves_the_session_to_the_newest_and_its_old_version_drains(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    repository, server = polled_repository(server_factory, tmp_path)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        session = new_id()
        send(client, session, series(5), offset=0)
        add_version(repository, "m", 2, seed=1)
        wait_for(lambda: "2" in versions(client, "m"))
        assert versions(client, "m")["1"]["state"] == "draining"
        assert client.post(f"/v1/sessions/{session}/reset").status_code == 200
        wait_for(lambda: list(versions(client, "m")) == ["2"])
        assert send(client, session, series(5), offset=0).json()["version"] == "2"
        assert client.get(f"/v1/sessions/{session}").json()["version"] == "2"


def _stream(server: Any, path: str) -> ClientConnection:
    return connect(server.url.replace("http://", "ws://") + path, open_timeout=30)


def test_a_model_s_stream_serves_its_sessions_and_a_pinned_session_streams_on_its_version(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    repository, server = two_models(server_factory, tmp_path, GRU_REPOSITORY_POLL_SECONDS="0.1")
    values = series(12, seed=5).reshape(6, 2)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        streamed, posted = new_id("ws"), new_id("http")
        with _stream(server, f"/v1/models/b/sessions/{streamed}/stream") as ws:
            for offset in (0, 3):
                ws.send(json.dumps({"values": values[offset : offset + 3].tolist(), "offset": offset}))
            answers = [json.loads(ws.recv(timeout=30)) for _ in range(2)]
        for offset in (0, 3):
            expected = client.post(f"/v1/models/b/sessions/{posted}/predict",
                                   json={"values": values[offset : offset + 3].tolist(), "offset": offset}).json()
            answer = answers.pop(0)
            assert (answer["model"], answer["session_id"]) == ("b", streamed)
            assert answer["predictions"] == expected["predictions"]
            assert answer["position"] == expected["position"] == offset + 3
        assert client.get(f"/v1/sessions/{streamed}").status_code == 404  # b's session, not the default's
        with pytest.raises(InvalidStatus) as unknown:
            _stream(server, f"/v1/models/nope/sessions/{streamed}/stream")
        assert unknown.value.response.status_code == 404
        assert b"nope" in (unknown.value.response.body or b"")

        pinned = new_id("pinned")
        assert send(client, pinned, series(3), offset=0).json()["version"] == "1"
        add_version(repository, "a", 2, seed=1)
        wait_for(lambda: "2" in versions(client, "a"))
        with _stream(server, f"/v1/sessions/{pinned}/stream") as ws:
            ws.send(json.dumps({"values": [0.5], "offset": 3}))
            assert json.loads(ws.recv(timeout=30))["version"] == "1"
        fresh = new_id("fresh")
        with _stream(server, f"/v1/models/a/sessions/{fresh}/stream") as ws:
            ws.send(json.dumps({"values": [0.5], "offset": 0}))
            assert json.loads(ws.recv(timeout=30))["version"] == "2"
        assert send(client, pinned, np.array([0.6]), offset=4).json()["version"] == "1"


def test_a_model_unloaded_under_its_open_stream_answers_404_and_serves_it_again_once_loaded(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """The stream kept the model it was opened on: unloaded through the repository API, every later frame got
    503 "the service is shutting down" (its engines stopped), and still did after the model was loaded
    again. The frames read before the unload are answered; later ones get the HTTP route's 404 on a stream
    that stays usable, and the model loaded again serves them."""
    repository, server = two_models(server_factory, tmp_path, b_seed=1, b_features=("x",),
                                     GRU_REPOSITORY_POLL_SECONDS="0")
    session = new_id("ws")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        with _stream(server, f"/v1/models/b/sessions/{session}/stream") as ws:
            for offset in range(20):
                ws.send(json.dumps({"values": [0.3], "offset": offset}))
            assert client.post("/v2/repository/models/b/unload").status_code == 200
            answers = [json.loads(ws.recv(timeout=30)) for _ in range(20)]
            assert [a.get("position") for a in answers] == list(range(1, 21))
            ws.send(json.dumps({"values": [0.3], "offset": 20}))
            unloaded = json.loads(ws.recv(timeout=30))
            assert (unloaded["status"], unloaded["type"].rsplit("/", 1)[-1]) == (404, "model-not-found"), unloaded
            add_version(repository, "b", 2, seed=2)
            assert client.post("/v2/repository/models/b/load").status_code == 200
            ws.send(json.dumps({"values": [0.3], "offset": 0}))
            again = json.loads(ws.recv(timeout=30))
            assert (again.get("version"), again.get("position")) == ("2", 1), again
        wait_for(lambda: metric(client, "gru_streams_open") == 0)


def test_a_full_queue_of_one_model_refuses_its_chunks_unread_and_not_another_model_s(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    # b's one place is taken by a chunk whose batch waits a second to fill
    _, server = two_models(server_factory, tmp_path, b_features=("x",), GRU_MAX_QUEUE="1", GRU_MAX_BATCH_SIZE="64",
                           GRU_MAX_BATCH_DELAY_MS="1000", GRU_QUEUE_PATIENCE_SECONDS="0")
    with ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(httpx.post, server.url + "/v1/models/b/predict", json={"values": [0.1]}, timeout=30)
        time.sleep(0.3)
        other = pool.submit(httpx.post, server.url + "/v1/sessions/edge/predict", json={"values": [0.1]},
                            timeout=30)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            # the headers of a 100-byte body, and no body: refused at once, or the server would wait for it
            sock.sendall(b"POST /v1/models/b/sessions/edge/predict HTTP/1.1\r\nhost: x\r\n"
                         b"content-type: application/json\r\ncontent-length: 100\r\n\r\n")
            head = sock.recv(65536)
        assert waiting.result().status_code == 200
        assert other.result().status_code == 200  # a's queue had room
    assert head.startswith(b"HTTP/1.1 429 "), head
    with httpx.Client(base_url=server.url, timeout=30) as client:
        assert metric(client, "gru_rejected_total", reason="queue_full_unread") == 1
        assert client.get("/v1/models/b/sessions/edge").status_code == 404


def _float8(directory: Path) -> Path:
    weights = {n: t.to(torch.float8_e4m3fn) for n, t in load_file(str(directory / WEIGHTS_FILE)).items()}
    save_file(weights, str(directory / WEIGHTS_FILE))
    return directory


def test_a_newest_version_with_float8_weights_is_skipped_at_start_up(server_factory: ServerFactory,
                                                                      tmp_path: Path) -> None:
    """Its NotImplementedError (no isfinite for float8) escaped the skip-once handling and stopped the start,
    version 1 there and good."""
    repository = tmp_path / "repo"
    add_version(repository, "m", 1)
    _float8(make_tiny_model(tmp_path / "v2", seed=1, name="m")).rename(repository / "m" / "2")
    server = server_factory(GRU_MODEL_REPOSITORY=str(repository), wait=False)
    try:
        deadline = time.monotonic() + 60
        while server.process.poll() is None and "Uvicorn running" not in server.log() \
                and time.monotonic() < deadline:
            time.sleep(0.2)
        assert server.process.poll() is None, server.log()[-1500:]
    finally:
        server.stop()


def test_a_polled_version_with_a_count_past_float_is_skipped_once(server_factory: ServerFactory,
                                                                  tmp_path: Path) -> None:
    """Its OverflowError escaped: the version was tried again at every poll, each time with a traceback."""
    repository = tmp_path / "repo"
    add_version(repository, "m", 1)
    server = server_factory(GRU_MODEL_REPOSITORY=str(repository), GRU_REPOSITORY_POLL_SECONDS="0.1")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        bad = make_tiny_model(tmp_path / "v2", seed=1, name="m", error_scale=1.0)
        steps = len(json.loads((bad / CONFIG_FILE).read_text())["calibration"]["counts"])
        _edit_calibration(bad, counts=[10**400] * steps)
        bad.rename(repository / "m" / "2")
        time.sleep(1.5)
        log = server.log()
        assert metric(client, "gru_model_versions_skipped_total", model="m") == 1
        assert log.count("model m version 2 skipped") == 1 and "Traceback" not in log


def test_a_model_unloaded_before_a_restart_does_not_get_its_sessions_back(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """The repository API's unload drops a model's sessions, but its snapshot file was neither removed nor
    rewritten: the next start, which loads every model, restored the unloaded sessions."""
    repository, path = tmp_path / "repo", tmp_path / "state" / "sessions.safetensors"
    add_version(repository, "a", 1)
    add_version(repository, "b", 1, seed=3)
    env = {"GRU_MODEL_REPOSITORY": str(repository), "GRU_DEFAULT_MODEL": "a", "GRU_SNAPSHOT_PATH": str(path),
           "GRU_REPOSITORY_POLL_SECONDS": "0", "GRU_SNAPSHOT_INTERVAL_SECONDS": "0.2"}
    b_file = tmp_path / "state" / "sessions.b.safetensors"
    first = server_factory(**env)
    with httpx.Client(base_url=first.url, timeout=30) as client:
        answer = client.post("/v1/models/b/sessions/old/predict", json={"values": series(4).tolist(), "offset": 0})
        assert answer.status_code == 200, answer.text
        written = b_file.stat().st_mtime_ns if b_file.exists() else 0
        wait_for(lambda: b_file.exists() and b_file.stat().st_mtime_ns != written)  # a periodic save holds it
        assert client.post("/v2/repository/models/b/unload").status_code == 200
    assert first.stop() in (0, -signal.SIGTERM)
    second = server_factory(**env)
    with httpx.Client(base_url=second.url, timeout=30) as client:
        assert client.get("/v1/models/b/sessions/old").status_code == 404  # it went with the unload


def test_a_periodic_save_in_progress_at_an_unload_does_not_write_the_unloaded_models_file_back(
    tmp_path: Path
) -> None:
    """In-process: the periodic save takes the list of keepers, then saves each in turn, awaiting each write.
    Model b unloaded meanwhile (its file removed by ``forget``) was still on that list, and its save wrote
    the unloaded store's sessions back: the next start restored them."""
    repository, path = tmp_path / "repo", tmp_path / "state" / "sessions.safetensors"
    add_version(repository, "a", 1)
    add_version(repository, "b", 1, seed=3)
    settings = Settings(model_repository=repository, default_model="a", repository_poll_seconds=0, device="cpu",
                        snapshot_path=path, snapshot_interval_seconds=0)
    registry = Registry(settings, Repository(root=repository), torch.device("cpu"), Metrics())
    registry.open()
    snapshots = ModelSnapshots(settings, registry)
    b_file = tmp_path / "state" / "sessions.b.safetensors"

    async def scenario() -> None:
        await snapshots.start()
        await registry.start()
        await registry.models["b"].engine.predict("t/s", series(8, seed=6), 0, 0)
        keepers = snapshots._current()  # what the periodic save iterates, over its awaits
        await keepers[0].save()  # the default model's, while the unload below comes in
        await registry.unload("b")
        await snapshots.forget("b")
        for keeper in keepers[1:]:
            await keeper.save()
        await registry.stop(before_close=snapshots.stop)

    asyncio.run(scenario())
    assert not b_file.exists()


def test_a_model_back_in_the_repository_while_serving_gets_its_snapshot_back(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    """A model the repository no longer has at a start leaves its file where it is (docs/durability.md), to be
    restored when the model is back. Back while serving (a poll loads it), its file was never read: its first
    save wrote the new, empty store over it, and every session kept in it was lost without a word."""
    repository, path = tmp_path / "repo", tmp_path / "state" / "sessions.safetensors"
    add_version(repository, "a", 1)
    add_version(repository, "b", 1, seed=3)
    env = {"GRU_MODEL_REPOSITORY": str(repository), "GRU_DEFAULT_MODEL": "a", "GRU_SNAPSHOT_PATH": str(path),
           "GRU_REPOSITORY_POLL_SECONDS": "0.1"}
    values = series(12, seed=9)
    first = server_factory(**env)
    with httpx.Client(base_url=first.url, timeout=30) as client:
        answer = client.post("/v1/models/b/sessions/kept/predict", json={"values": values[:8].tolist(), "offset": 0})
        assert answer.status_code == 200, answer.text
    assert first.stop() in (0, -signal.SIGTERM)
    (repository / "b").rename(tmp_path / "b-away")  # out of the repository for a restart
    second = server_factory(**env)
    with httpx.Client(base_url=second.url, timeout=30) as client:
        assert "b" not in models(client)
        (tmp_path / "b-away").rename(repository / "b")  # back while serving
        wait_for(lambda: "b" in models(client))
        found = client.get("/v1/models/b/sessions/kept")
        assert found.status_code == 200, found.text  # was 404: never restored
        answer = client.post("/v1/models/b/sessions/kept/predict",
                             json={"values": values[8:].tolist(), "offset": 8})
        assert answer.status_code == 200 and answer.json()["position"] == 12, answer.text
    assert second.stop() in (0, -signal.SIGTERM)


def test_a_pinned_version_of_another_layout_is_skipped_once_with_a_log_line(tmp_path: Path) -> None:
    """Sessions pinned to a version this replica has not loaded make each poll load it for them (a store
    shared with other replicas, or kept across a restart). One whose layout this model cannot take was
    loaded in full and dropped at every poll, without a word; it is now refused as the poll refuses a newest
    version that does not fit: one log line and one count per state of its files, and not loaded again."""
    repository = tmp_path / "repo"
    old = add_version(repository, "m", 1, features=("y",))  # another feature: not this model's layout
    add_version(repository, "m", 2)
    skipped: list[tuple[str, int]] = []
    registry = Registry(Settings(model_repository=repository, repository_poll_seconds=0, device="cpu"),
                        Repository(root=repository, on_skip=lambda model, version: skipped.append((model, version))),
                        torch.device("cpu"), Metrics())
    registry.open()

    async def scenario() -> list[int]:
        await registry.start()
        try:
            old_hash = json.loads((old / CONFIG_FILE).read_text())["version"]
            await registry.models["m"].raw_store.reset("t/pinned", old_hash)  # a session of version 1's weights
            await registry.poll()
            await registry.poll()
            return sorted(registry.models["m"].versions)
        finally:
            await registry.stop()

    assert asyncio.run(scenario()) == [2]
    assert skipped == [("m", 1)]
