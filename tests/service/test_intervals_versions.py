"""Intervals and scores across a model's versions: each version answers with its own calibration, a pinned
session keeps its version's, a replayed upgrade starts the new version's adaptation afresh (real servers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.conftest import ServerFactory, make_tiny_model
from tests.service.helpers import new_id, series
from tests.service.test_model_lifecycle import metric, versions, wait_for

LEVELS = [80]


def add_calibrated(repository: Path, version: int, error_scale: float | None, seed: int = 0) -> Path:
    """A tiny model as ``repository/m/version``, calibrated with errors spread over [0, error_scale]."""
    (repository / "m").mkdir(parents=True, exist_ok=True)
    staging = make_tiny_model(repository.parent / f"staging-{version}", seed=seed, name="m", error_scale=error_scale)
    return staging.rename(repository / "m" / str(version))


def post(client: httpx.Client, path: str, values: np.ndarray, **fields: Any) -> dict[str, Any]:
    response = client.post(path, json={"values": values.tolist(), "levels": LEVELS, "scores": True, **fields})
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def half_width(answer: dict[str, Any]) -> np.ndarray:
    band = answer["intervals"]["80"]
    return (np.array(band["upper"]) - np.array(band["lower"]))[:, 0] / 2


def scores(answer: dict[str, Any]) -> np.ndarray:
    return np.array(answer["scores"], dtype=np.float64)[:, 0]  # null -> nan


def test_a_pinned_session_keeps_its_versions_calibration_and_a_new_one_gets_the_newest(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    repository = tmp_path / "repo"
    add_calibrated(repository, 1, error_scale=1.0)
    server = server_factory(GRU_MODEL_REPOSITORY=str(repository), GRU_REPOSITORY_POLL_SECONDS="0.1")
    whole = series(60, seed=3)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        v1_alone = post(client, "/v1/models/m/predict", whole)
        session = new_id()
        streamed = [post(client, f"/v1/models/m/sessions/{session}/predict", whole[:30], offset=0)]
        add_calibrated(repository, 2, error_scale=4.0, seed=1)
        wait_for(lambda: "2" in versions(client, "m"))
        streamed.append(post(client, f"/v1/sessions/{session}/predict", whole[30:], offset=30))
        assert [answer["version"] for answer in streamed] == ["1", "1"]
        np.testing.assert_allclose(np.concatenate([half_width(a) for a in streamed]), half_width(v1_alone),
                                   rtol=1e-5)
        np.testing.assert_allclose(np.concatenate([scores(a) for a in streamed]), scores(v1_alone), rtol=1e-5)
        fresh = post(client, f"/v1/models/m/sessions/{new_id()}/predict", whole)
        assert fresh["version"] == "2"
        # nothing scored yet, so nothing adapted: the first half-width is the calibration's alone, 4 times v1's
        np.testing.assert_allclose(half_width(fresh)[0], 4 * half_width(v1_alone)[0], rtol=1e-5)
        # a version without calibration would change the state's size under the model's sessions: skipped
        add_calibrated(repository, 3, error_scale=None, seed=2)
        wait_for(lambda: metric(client, "gru_model_versions_skipped_total", model="m") >= 1)
        assert "3" not in versions(client, "m")
        assert "floats per session" in server.log()


def test_a_replayed_upgrade_starts_the_new_versions_adaptation_afresh(
    server_factory: ServerFactory, tmp_path: Path
) -> None:
    repository = tmp_path / "repo"
    add_calibrated(repository, 1, error_scale=0.5)
    server = server_factory(GRU_MODEL_REPOSITORY=str(repository), GRU_REPOSITORY_POLL_SECONDS="0.1",
                            GRU_UPGRADE="replay")
    whole = series(60, seed=4)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        session = new_id()
        before = post(client, f"/v1/sessions/{session}/predict", whole[:50], offset=0)
        first_v1 = post(client, "/v1/predict", whole[:1])
        assert half_width(before)[-1] != half_width(first_v1)[0]  # version 1's adaptation moved its widths
        add_calibrated(repository, 2, error_scale=2.0, seed=1)
        wait_for(lambda: list(versions(client, "m")) == ["2"])
        upgraded = post(client, f"/v1/sessions/{session}/predict", whole[50:], offset=50)
        assert (upgraded["version"], upgraded["upgraded"]) == ("2", True)
        first_v2 = post(client, "/v1/predict", whole[:1])
        assert np.isnan(scores(upgraded)[0]) and not np.isnan(scores(upgraded)[1:]).any()
        np.testing.assert_allclose(half_width(upgraded)[0], half_width(first_v2)[0], rtol=1e-6)
        np.testing.assert_allclose(half_width(first_v2)[0], 4 * half_width(first_v1)[0], rtol=1e-5)
