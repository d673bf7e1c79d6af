"""Checkpoints: a bit-exact round trip, and a clear CheckpointError for every broken directory."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import CheckpointError, Forecaster, load_checkpoint, save_checkpoint
from model.checkpoint import CONFIG_FILE, WEIGHTS_FILE, _read_config, model_version, publishing
from tests.conftest import make_tiny_model


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


def test_saved_files_are_readable_by_other_users_whatever_the_umask(forecaster: Forecaster, tmp_path: Path) -> None:
    """Under umask 077 (a hardened shell, a CI runner) config.json was written 0600 while the weights were
    made 0644: a service running as another user read the weights and could not read the config."""
    old = os.umask(0o077)
    try:
        save_checkpoint(forecaster, tmp_path / "ckpt")
    finally:
        os.umask(old)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        assert (tmp_path / "ckpt" / name).stat().st_mode & 0o044 == 0o044, name


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


def _edit_config(saved: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    config_path = saved / CONFIG_FILE
    meta = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(edit(meta)))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda meta: [1, 2], "format 'list'"),
        (lambda meta: {k: v for k, v in meta.items() if k != "name"}, '"name"'),
        (lambda meta: meta | {"model": ["features"]}, '"model"'),
        (lambda meta: meta | {"model": meta["model"] | {"features": [1, 2]}}, "features"),
        (lambda meta: meta | {"model": meta["model"] | {"features": ["a", "a"]}}, "distinct"),
        (lambda meta: meta | {"model": meta["model"] | {"hidden_size": 0}}, "hidden_size"),
        (lambda meta: meta | {"model": meta["model"] | {"num_layers": True}}, "num_layers"),
        (lambda meta: meta | {"model": meta["model"] | {"scale": [0.0, 1.0]}}, "scale"),
        (lambda meta: meta | {"model": meta["model"] | {"scale": [-2.0, 1.0]}}, "scale"),
        (lambda meta: meta | {"model": meta["model"] | {"diff_scale": [1e-300, 1.0]}}, "diff_scale"),
        (lambda meta: meta | {"model": meta["model"] | {"diff_scale": [1e39, 1.0]}}, "diff_scale"),
        (lambda meta: meta | {"model": meta["model"] | {"mean": [float("nan"), 0.0]}}, "mean"),
    ],
    ids=["not an object", "no name", "model not an object", "feature not text", "features repeated",
         "no hidden units", "layers a boolean", "zero scale", "negative scale", "scale 0 in float32",
         "scale past float32", "NaN mean"],
)
def test_config_that_would_build_a_broken_model_is_refused(
    saved: Path, edit: Callable[[dict[str, Any]], object], message: str
) -> None:
    """Each of these loaded before (or failed with a bare KeyError, AttributeError or ZeroDivisionError):
    a NaN or zero in the scaler gave a model whose every answer is NaN, so a service reported ready and
    then told each client its own values were out of range."""
    _edit_config(saved, edit)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_checkpoint(saved)


@pytest.mark.parametrize("declared", [{"hidden_size": 100_000}, {"num_layers": 10_000_000}, {"lags": 2**62}],
                         ids=["hidden", "layers", "lags"])
@pytest.mark.timeout(30)  # building ten million layers on the meta device first hangs for minutes
def test_config_declaring_a_huge_model_is_refused_before_anything_is_allocated(
    saved: Path, declared: dict[str, int]
) -> None:
    """hidden_size 100,000 would need 120 GB for W_hh alone, and ten million layers took minutes to build
    even without memory; the sizes are compared with the weights file's header first, so the answer is a
    mismatch at once, not an allocation failure, an OOM kill or a hang."""
    _edit_config(saved, lambda meta: meta | {"model": meta["model"] | declared})
    with pytest.raises(CheckpointError, match=r"does not match the sizes|not a valid model config"):
        load_checkpoint(saved)


def test_weights_that_are_not_finite_are_refused(saved: Path) -> None:
    weights = load_file(str(saved / WEIGHTS_FILE))
    name = sorted(weights)[0]
    weights[name].view(-1)[0] = float("inf")
    save_file(weights, str(saved / WEIGHTS_FILE), metadata={"format": "gru-forecaster/1"})
    with pytest.raises(CheckpointError, match=f"{re.escape(name)} holds values that are not finite"):
        load_checkpoint(saved)


@pytest.mark.parametrize(("training", "why"), [
    (None, "must be an object, got NoneType"), ([1], "must be an object, got list"),
    (json.loads('{"a": ' * 16 + "[1]" + "}" * 16), "nests deeper than 16 levels"),
])
def test_training_summary_that_is_no_shallow_object_is_refused(saved: Path, training: object, why: str) -> None:
    """Outside the version hash, it loaded, and GET /v1/model, which answers it, failed with a 500."""
    meta = json.loads((saved / CONFIG_FILE).read_text())
    (saved / CONFIG_FILE).write_text(json.dumps(meta | {"training": training}))
    with pytest.raises(CheckpointError, match=re.escape(why)):
        load_checkpoint(saved)


@pytest.mark.parametrize("features", ["xy", {"x": 1}])
def test_features_that_are_not_a_list_are_refused(tmp_path: Path, features: object) -> None:
    """A string was taken as its characters ("xy": the features x and y), an object as its keys: a version of
    the same model listing ["x", "y"] was then skipped for features that "differ" from ['x', 'y']."""
    ckpt = make_tiny_model(tmp_path / "ckpt", features=("x", "y"))
    meta = json.loads((ckpt / CONFIG_FILE).read_text())
    meta["model"]["features"] = features
    (ckpt / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="features must be a non-empty list of column names"):
        load_checkpoint(ckpt)  # before its version: a crafted one restamps that (``_restamp``), and it loaded


def test_training_summary_nested_16_deep_loads(saved: Path) -> None:
    meta = json.loads((saved / CONFIG_FILE).read_text())
    (saved / CONFIG_FILE).write_text(json.dumps(meta | {"training": json.loads('{"a": ' * 15 + "[1]" + "}" * 15)}))
    assert load_checkpoint(saved)[1]["training"]["a"]["a"]


def test_checkpoint_of_another_format_is_refused(forecaster: Forecaster, tmp_path: Path) -> None:
    save_checkpoint(forecaster, tmp_path)
    meta = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps(meta | {"format": "gru-forecaster/2"}))
    with pytest.raises(CheckpointError, match="format 'gru-forecaster/2' is not 'gru-forecaster/1'"):
        load_checkpoint(tmp_path)


def test_publishing_goes_past_numbers_taken_by_a_stray_file_or_a_dangling_link(
    forecaster: Forecaster, tmp_path: Path
) -> None:
    save_checkpoint(forecaster, tmp_path / "m" / "1")
    (tmp_path / "m" / "2").symlink_to(tmp_path / "gone")  # no version, yet its name is taken
    (tmp_path / "m" / "3").write_text("not a version")
    with publishing(tmp_path, "m") as publication:
        save_checkpoint(forecaster, publication.staging, name="m")
    assert publication.published == tmp_path / "m" / "4"
    assert load_checkpoint(publication.published)[1]["name"] == "m"
    assert (tmp_path / "m" / "3").read_text() == "not a version"


def test_publishing_past_the_highest_version_number_is_an_error(forecaster: Forecaster, tmp_path: Path) -> None:
    """Past 18 digits the version was renamed to 1000000000000000000, a directory no scan reads: the CLI said
    it published a version that no service would ever load."""
    (tmp_path / "m" / "999999999999999999").mkdir(parents=True)
    with pytest.raises(OSError, match="no version number left"), publishing(tmp_path, "m") as publication:
        save_checkpoint(forecaster, publication.staging, name="m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["999999999999999999"]


@pytest.mark.parametrize("name", [".", ".."])
def test_publishing_refuses_a_name_that_is_the_repository_or_its_parent(
    forecaster: Forecaster, tmp_path: Path, name: str
) -> None:
    """".." matched the name pattern: the version was published as the repository's sibling, outside it."""
    repository = tmp_path / "repo"
    repository.mkdir()
    with pytest.raises(ValueError, match="model name"), publishing(repository, name) as publication:
        save_checkpoint(forecaster, publication.staging, name=name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["repo"] and not any(repository.iterdir())


def test_publishing_fsyncs_the_files_before_the_rename_and_the_rename_after(
    forecaster: Forecaster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unsynced, a power cut after the rename could leave a version whose files are empty or partly written."""
    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append(f"fsync {os.readlink(f'/proc/self/fd/{fd}')}")
        real_fsync(fd)

    def rename(source: str | Path, target: str | Path) -> None:
        events.append(f"rename {Path(target).resolve()}")
        real_rename(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    with publishing(tmp_path, "m") as publication:
        save_checkpoint(forecaster, publication.staging, name="m")
        staging = publication.staging.resolve()
    model_dir = (tmp_path / "m").resolve()
    renamed = events.index(f"rename {model_dir / '1'}")
    assert {f"fsync {staging / CONFIG_FILE}", f"fsync {staging / WEIGHTS_FILE}", f"fsync {staging}"} <= set(
        events[:renamed]
    )
    assert f"fsync {model_dir}" in events[renamed:]


def _restamp(directory: Path) -> None:
    """Write the version the loader will compute, as a crafted checkpoint's author can."""
    meta = json.loads((directory / CONFIG_FILE).read_text())
    _, config, calibration = _read_config(directory / CONFIG_FILE)
    forecaster = Forecaster(config, calibration)
    forecaster.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
    meta["version"] = model_version(forecaster)
    (directory / CONFIG_FILE).write_text(json.dumps(meta))


def _edit_calibration(directory: Path, **fields: Any) -> None:
    meta = json.loads((directory / CONFIG_FILE).read_text())
    meta["calibration"] |= fields
    (directory / CONFIG_FILE).write_text(json.dumps(meta))


def test_float64_weights_past_float32_are_refused(tmp_path: Path) -> None:
    """The finite check ran on the file's float64 tensor; loading then cast 1e300 to an inf the model served."""
    ckpt = make_tiny_model(tmp_path / "ckpt")
    weights = {name: t.double() for name, t in load_file(str(ckpt / WEIGHTS_FILE)).items()}
    weights["head.bias"][0] = 1e300
    save_file(weights, str(ckpt / WEIGHTS_FILE))
    _restamp(ckpt)
    with pytest.raises(CheckpointError, match=r"head\.bias"):
        load_checkpoint(ckpt)


def test_float8_weights_are_a_checkpoint_error(tmp_path: Path) -> None:
    """A NotImplementedError (no isfinite for float8) escaped the skip-once handling: at start-up it stopped
    the service even with an older good version there."""
    ckpt = make_tiny_model(tmp_path / "ckpt")
    weights = {name: t.to(torch.float8_e4m3fn) for name, t in load_file(str(ckpt / WEIGHTS_FILE)).items()}
    save_file(weights, str(ckpt / WEIGHTS_FILE))
    with pytest.raises(CheckpointError):
        load_checkpoint(ckpt)


def test_calibration_count_past_float_is_a_checkpoint_error(tmp_path: Path) -> None:
    """An OverflowError escaped: a polled version was retried and logged with a traceback at every poll."""
    ckpt = make_tiny_model(tmp_path / "ckpt", error_scale=1.0)
    steps = len(json.loads((ckpt / CONFIG_FILE).read_text())["calibration"]["counts"])
    _edit_calibration(ckpt, counts=[10**400] * steps)
    with pytest.raises(CheckpointError):
        load_checkpoint(ckpt)


def test_deeply_nested_calibration_quantiles_are_a_checkpoint_error(tmp_path: Path) -> None:
    """600 levels parse (json.loads' limit is the recursion limit), but Calibration.from_dict's nested()
    takes two frames a level."""
    ckpt = make_tiny_model(tmp_path / "ckpt", error_scale=1.0)
    text = json.dumps(json.loads((ckpt / CONFIG_FILE).read_text()))
    start = text.index('"quantiles": ') + len('"quantiles": ')
    end = text.index('"adapt_rate"')
    (ckpt / CONFIG_FILE).write_text(text[:start] + "[" * 600 + "]" * 600 + ", " + text[end:])
    with pytest.raises(CheckpointError):
        load_checkpoint(ckpt)


def test_calibration_quantiles_past_float32_are_refused(tmp_path: Path) -> None:
    """Checked finite in float64, they became inf in float32, and every interval was answered null."""
    ckpt = make_tiny_model(tmp_path / "ckpt", error_scale=1.0)
    quantiles = json.loads((ckpt / CONFIG_FILE).read_text())["calibration"]["quantiles"]
    _edit_calibration(ckpt, quantiles=[[[1e300] * len(f) for f in h] for h in quantiles])
    with pytest.raises(CheckpointError, match="float32"):
        load_checkpoint(ckpt)
