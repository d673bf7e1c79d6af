"""Checkpoints: ``model.safetensors`` (weights) + ``config.json`` (sizes, scaler, calibration, training
summary, version).

Never pickle: a checkpoint is data, and loading one must not run code. The version is a hash of the
weights and the config, so a service can tell two models apart and refuse to mix their session states.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from model.conformal import Calibration
from model.forecaster import Forecaster, ForecasterConfig

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "gru-forecaster/1"
# A model repository (Triton's layout): ROOT/<model>/<version>/, version directories positive integers of up
# to 18 digits (Triton's are int64, and a version stamped with the Unix time has 10). A model name is one
# directory's name: "." and ".." would name the repository itself or its parent.
MODEL_NAME = re.compile(r"^(?!\.\.?$)[A-Za-z0-9._-]{1,64}$")
VERSION_DIR = re.compile(r"^[1-9][0-9]{0,17}$")
# Far above any real config.json (a calibration of 100 features × 48 steps writes about 30 MB).
MAX_CONFIG_BYTES = 64 << 20
# How deep config.json's "training" summary may nest: the CLI's is 3 deep; GET /v1/model answers it whole,
# and one a few hundred deep takes its encoder past Python's recursion limit.
MAX_TRAINING_DEPTH = 16


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the file and the problem."""


def model_version(forecaster: Forecaster) -> str:
    """12 hex digits of SHA-256 over the config, the calibration if any (it sets the state's layout), and
    every weight, in name order."""
    digest = hashlib.sha256(json.dumps(forecaster.config.to_dict(), sort_keys=True).encode())
    if forecaster.calibration is not None:
        digest.update(json.dumps(forecaster.calibration.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(forecaster.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def save_checkpoint(
    forecaster: Forecaster, directory: str | Path, name: str = "gru", training: dict[str, Any] | None = None
) -> str:
    """Write the checkpoint into ``directory`` (created if needed) and return its version; OSError when a
    file cannot be written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in forecaster.state_dict().items()}
    try:
        save_file(weights, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT})
    except SafetensorError as exc:  # how safetensors reports a failed write (a full disk): not an OSError
        raise OSError(f"{directory / WEIGHTS_FILE}: {exc}") from exc
    # safetensors creates the file owner-only (0600), and a umask of 077 does the same to config.json: a
    # service running as another user (the image's non-root user after COPY) could not read them.
    (directory / WEIGHTS_FILE).chmod(0o644)
    version = model_version(forecaster)
    meta = {
        "format": FORMAT,
        "name": name,
        "version": version,
        "model": forecaster.config.to_dict(),
        "training": training or {},
    }
    if forecaster.calibration is not None:
        meta["calibration"] = forecaster.calibration.to_dict()
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    (directory / CONFIG_FILE).chmod(0o644)
    return version


def _shapes(shapes: dict[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{name} {list(shape)}" for name, shape in sorted(shapes.items()))


def _require_regular_file(path: Path) -> None:
    """CheckpointError unless ``path`` is a regular file: opening a FIFO waits for a writer for good, and a
    device never ends."""
    if not stat.S_ISREG(path.stat().st_mode):
        raise CheckpointError(f"{path} is not a regular file")


def read_config_json(config_path: Path) -> Any:
    """config.json parsed; CheckpointError when it cannot be: not a regular file, over MAX_CONFIG_BYTES (read
    whole, it could exhaust memory), unreadable, not UTF-8, not JSON, or nested deeper than the parser descends."""
    try:
        _require_regular_file(config_path)
        with config_path.open("rb") as file:
            raw = file.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise CheckpointError(f"{config_path} is larger than {MAX_CONFIG_BYTES >> 20} MiB: not a model config")
        return json.loads(raw.decode())
    except CheckpointError:
        raise
    except (ValueError, OSError, RecursionError) as exc:
        raise CheckpointError(f"{config_path} is not a valid model config: {exc}") from exc


def _check_training(training: Any, config_path: Path) -> None:
    """CheckpointError unless the training summary is an object nested at most MAX_TRAINING_DEPTH deep: the
    service answers it in GET /v1/model, which cannot answer any other (null, a list, deep nesting)."""
    if not isinstance(training, dict):
        raise CheckpointError(f"{config_path}: \"training\" must be an object, got {type(training).__name__}")
    level: list[dict[str, Any] | list[Any]] = [training]
    depth = 1
    while level:
        if depth > MAX_TRAINING_DEPTH:
            raise CheckpointError(f"{config_path}: \"training\" nests deeper than {MAX_TRAINING_DEPTH} levels")
        level = [child for node in level for child in (node.values() if isinstance(node, dict) else node)
                 if isinstance(child, dict | list)]
        depth += 1


def _read_config(config_path: Path) -> tuple[dict[str, Any], ForecasterConfig, Calibration | None]:
    try:
        meta = read_config_json(config_path)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise CheckpointError(f"{config_path}: format {found!r} is not {FORMAT!r}")
        if not isinstance(meta.get("name"), str) or not meta["name"] or not isinstance(meta.get("model"), dict):
            raise CheckpointError(f"{config_path} needs a \"name\" (text) and a \"model\" (an object)")
        _check_training(meta.get("training", {}), config_path)
        config = ForecasterConfig.from_dict(meta["model"])
        calibration = Calibration.from_dict(meta["calibration"]) if "calibration" in meta else None
        if calibration is not None and calibration.features != config.num_features:
            raise CheckpointError(f"{config_path}: the calibration has {calibration.features} features, the"
                                  f" model {config.num_features}")
        return meta, config, calibration
    except CheckpointError:
        raise
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError, OSError) as exc:
        raise CheckpointError(f"{config_path} is not a valid model config: {str(exc)[:500]}") from exc


def _not_safetensors(path: Path, exc: Exception) -> CheckpointError:
    return CheckpointError(f"{path} is truncated or not a safetensors file: {exc}")


def _stored_shapes(weights_path: Path) -> dict[str, tuple[int, ...]]:
    """The tensors' shapes, from the file's header: nothing is loaded."""
    try:
        _require_regular_file(weights_path)
        with safe_open(str(weights_path), framework="pt") as file:
            names = file.keys()  # safe_open is not iterable itself
            return {name: tuple(file.get_slice(name).get_shape()) for name in names}
    except (SafetensorError, OSError) as exc:
        raise _not_safetensors(weights_path, exc) from exc


def _needed_shapes(config: ForecasterConfig, config_path: Path) -> dict[str, tuple[int, ...]]:
    """The tensors' shapes a model of ``config`` has, from one built on the meta device: no memory."""
    try:
        with torch.device("meta"):
            return {name: tuple(t.shape) for name, t in Forecaster(config).state_dict().items()}
    except (RuntimeError, TypeError, ValueError, OverflowError) as exc:  # sizes past what torch can describe
        first_line = str(exc).split("\n", 1)[0]  # torch appends a C++ stack
        raise CheckpointError(f"{config_path} is not a valid model config: {first_line}") from exc


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[Forecaster, dict[str, Any]]:
    """Load a checkpoint; returns the forecaster in eval mode on ``device`` and the config.json contents.

    The config is checked against the weights file's header before anything is built or loaded, so a
    config that declares a huge model fails at once instead of allocating it.
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for path in (directory, config_path, weights_path):
        if not path.exists():
            raise CheckpointError(
                f"{path} does not exist: a checkpoint is a directory with {CONFIG_FILE} and {WEIGHTS_FILE}"
            )
    meta, config, calibration = _read_config(config_path)
    stored = _stored_shapes(weights_path)
    # Every layer has tensors of its own: more layers than the file has tensors cannot match, and even the
    # meta-device model of millions of layers takes minutes to build.
    expected = _needed_shapes(config, config_path) if config.num_layers <= len(stored) else None
    if stored != expected:
        needed = _shapes(expected) if expected is not None else f"{config.num_layers} layers"
        raise CheckpointError(f"{weights_path} does not match the sizes in {config_path}: it holds"
                              f" {_shapes(stored)}, the config needs {needed}")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError) as exc:
        raise _not_safetensors(weights_path, exc) from exc
    for name, tensor in weights.items():  # judged as the float32 the model computes in: 1e300 is inf there
        if not tensor.is_floating_point():
            raise CheckpointError(f"{weights_path}: {name} is {tensor.dtype}, not floating point numbers")
        weights[name] = tensor = tensor.to(torch.float32)
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{weights_path}: {name} holds values that are not finite numbers in float32")
    forecaster = Forecaster(config, calibration)
    forecaster.load_state_dict(weights, strict=True)
    version = model_version(forecaster)
    if meta.get("version") != version:
        raise CheckpointError(
            f"{directory}: weights hash to version {version} but {CONFIG_FILE} says {meta.get('version')!r};"
            " the files come from different checkpoints"
        )
    return forecaster.to(device).eval(), meta


def versions_in(model_dir: Path) -> list[int]:
    """The version numbers under a model's directory of a repository, ascending (none if it is absent)."""
    try:
        return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and VERSION_DIR.fullmatch(p.name))
    except FileNotFoundError:
        return []


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@dataclass
class Publication:
    staging: Path  # where to write the checkpoint
    published: Path | None = None  # repository/name/<version>, once renamed into place


@contextmanager
def publishing(repository: Path, name: str) -> Iterator[Publication]:
    """A temporary directory to write a checkpoint into, renamed to ``repository/name/<next version>/``
    when the block ends without an error (removed otherwise): a polling service never sees half of it.
    The rename fails rather than replace a version another publisher took first, or any other entry with
    that name (a stray file, a dangling link); the next number is tried, and OSError raised past the
    largest a version may have (18 digits). The files and the directory are
    fsynced before the rename, and the model's directory after it, so a power cut cannot leave a version
    whose files are empty or partly written."""
    if not MODEL_NAME.fullmatch(name):
        raise ValueError(f"model name {name!r} must match {MODEL_NAME.pattern}")
    model_dir = repository / name
    model_dir.mkdir(parents=True, exist_ok=True)
    # In the model's directory: the same file system, so the rename is atomic; the dot keeps scanners off it.
    publication = Publication(Path(tempfile.mkdtemp(prefix=".publishing-", dir=model_dir)))
    try:
        yield publication
        publication.staging.chmod(0o755)  # mkdtemp's 0700 would hide it from a service running as another user
        for entry in publication.staging.iterdir():
            if entry.is_file():
                _fsync(entry)
        _fsync(publication.staging)
        taken = 0  # the highest number found taken: a stray file is no version, yet recounting would reach it
        while publication.published is None:
            taken = max((versions_in(model_dir) or [0])[-1], taken) + 1
            if not VERSION_DIR.fullmatch(str(taken)):  # a directory no scan would read: published to no one
                raise OSError(f"{model_dir} has no version number left past {taken - 1} ({VERSION_DIR.pattern})")
            target = model_dir / str(taken)
            try:
                os.rename(publication.staging, target)  # fails on an existing non-empty directory, or a file
                publication.published = target
            except OSError:
                if not os.path.lexists(target):
                    raise
        _fsync(model_dir)  # the rename itself
    except BaseException:
        shutil.rmtree(publication.staging, ignore_errors=True)
        raise
