"""Checkpoints: a bit-exact round trip, and a clear CheckpointError for every broken directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model import CheckpointError, Forecaster, load_checkpoint, save_checkpoint
from model.checkpoint import CONFIG_FILE, WEIGHTS_FILE


@pytest.fixture
def saved(forecaster: Forecaster, tmp_path: Path) -> Path:
    save_checkpoint(forecaster, tmp_path / "ckpt", name="tiny", training={"epochs": 3})
    return tmp_path / "ckpt"


def test_round_trip_is_bit_exact(forecaster: Forecaster, saved: Path) -> None:
    loaded, meta = load_checkpoint(saved)
    assert loaded.config == forecaster.config
    for name, tensor in forecaster.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = torch.randn(2, 7, 2)
    with torch.no_grad():
        expected = forecaster.predict(x, forecaster.initial_state(2))
        got = loaded.predict(x, loaded.initial_state(2))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert meta["name"] == "tiny" and meta["training"] == {"epochs": 3}


def test_saved_files_are_readable_by_other_users(saved: Path) -> None:
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        assert (saved / name).stat().st_mode & 0o044 == 0o044, name


def test_version_names_the_weights(forecaster: Forecaster, tmp_path: Path) -> None:
    first = save_checkpoint(forecaster, tmp_path / "a")
    assert save_checkpoint(forecaster, tmp_path / "b") == first
    with torch.no_grad():
        forecaster.head.bias.add_(1e-3)
    assert save_checkpoint(forecaster, tmp_path / "c") != first


def test_missing_directory_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nowhere does not exist"):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize("lost", [CONFIG_FILE, WEIGHTS_FILE])
def test_missing_file_is_named(saved: Path, lost: str) -> None:
    (saved / lost).unlink()
    with pytest.raises(CheckpointError, match=f"{lost} does not exist"):
        load_checkpoint(saved)


def test_truncated_weights_are_reported(saved: Path) -> None:
    weights = saved / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or not a safetensors file"):
        load_checkpoint(saved)


def test_config_edited_after_saving_is_inconsistent(saved: Path) -> None:
    config_path = saved / CONFIG_FILE
    meta = json.loads(config_path.read_text())
    meta["model"]["mean"] = [5.0, 5.0]  # same sizes, different scaler: the version no longer matches
    config_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="different checkpoints"):
        load_checkpoint(saved)


def test_config_with_other_sizes_does_not_match_weights(saved: Path) -> None:
    config_path = saved / CONFIG_FILE
    meta = json.loads(config_path.read_text())
    meta["model"]["hidden_size"] = 16
    config_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match the sizes"):
        load_checkpoint(saved)


def test_config_that_is_not_json_is_reported(saved: Path) -> None:
    (saved / CONFIG_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="not a valid model config"):
        load_checkpoint(saved)
