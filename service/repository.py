"""The model repository: which checkpoints exist, read from disk (Triton's layout), never served from here.

``GRU_MODEL_REPOSITORY=DIR`` holds ``DIR/<model>/<version>/{config.json, model.safetensors}``: model names
match ``MODEL_NAME``, versions are positive integers and the highest is the newest. ``GRU_MODEL_PATH`` is a
repository of one model (named by its checkpoint, else ``default``) with one version, 1.

Scanning only lists directories; ``Repository.load`` reads and checks one version (``model.load_checkpoint``)
and remembers a failure by the files' sizes and times, so a damaged or half-copied version is logged and
counted once, skipped, and tried again only when its files change (their permissions included). Every
call here does disk I/O or loads weights: the service calls it on a worker thread, never on the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model import CheckpointError, Forecaster, load_checkpoint
from model.checkpoint import CONFIG_FILE, MODEL_NAME, VERSION_DIR, WEIGHTS_FILE, read_config_json

FALLBACK_NAME = "default"
FileSignature = tuple[tuple[int, int, int], ...]  # per file of a version: size, mtime, ctime (ns)
MAX_REASON = 1000  # characters of why a version is skipped that its log line quotes
log = logging.getLogger("service.repository")


@dataclass(frozen=True, slots=True)
class VersionDir:
    """One version's directory in the repository."""

    model: str
    version: int
    path: Path


@dataclass(slots=True)
class Loaded:
    """A version read and checked: the forecaster on its device and its config.json."""

    where: VersionDir
    forecaster: Forecaster
    meta: dict[str, Any]
    files: FileSignature  # its files as they were read: others there now were written since (``files_of``)

    @property
    def model_version(self) -> str:
        return str(self.meta["version"])


class Repository:
    """The versions on disk: ``GRU_MODEL_REPOSITORY`` (``root``) or one checkpoint (``single``)."""

    def __init__(self, *, root: Path | None = None, single: Path | None = None,
                 on_skip: Callable[[str, int], None] | None = None) -> None:
        if (root is None) == (single is None):
            raise ValueError("a repository is either a directory of models or one checkpoint")
        self.root = root
        self.single = single
        self._on_skip = on_skip or (lambda model, version: None)
        self._failed: dict[Path, FileSignature] = {}  # version dir -> its files' (size, mtime, ctime)
        self._single_name = _checkpoint_name(single) if single is not None else ""
        self._unreadable = False  # the last scan found the root unreadable (logged once, until it is back)

    @property
    def polls(self) -> bool:
        """Whether new versions can appear (a directory of models; one checkpoint is fixed)."""
        return self.root is not None

    def scan(self) -> dict[str, list[VersionDir]]:
        """Every model's version directories, oldest first; names that break the layout are ignored."""
        if self.single is not None:
            return {self._single_name: [VersionDir(self._single_name, 1, self.single)]}
        assert self.root is not None
        found: dict[str, list[VersionDir]] = {}
        try:
            models = sorted(p for p in self.root.iterdir() if p.is_dir() and MODEL_NAME.fullmatch(p.name))
        except OSError as exc:
            if not self._unreadable:  # once per outage, not once per poll
                log.warning("model repository %s cannot be read: %s; the loaded versions go on serving",
                            self.root, exc)
            self._unreadable = True
            return {}
        if self._unreadable:
            log.info("model repository %s can be read again", self.root)
            self._unreadable = False
        for model_dir in models:
            try:
                versions = [VersionDir(model_dir.name, int(p.name), p) for p in model_dir.iterdir()
                            if p.is_dir() and VERSION_DIR.fullmatch(p.name)]
            except OSError:
                continue
            if versions:
                found[model_dir.name] = sorted(versions, key=lambda v: v.version)
        return found

    def load(self, where: VersionDir, device: torch.device) -> Loaded | None:
        """The version loaded on ``device``; None (logged and counted once per state of its files) when it
        is damaged, half-written or not a checkpoint."""
        signature = _signature(where.path)
        if self._failed.get(where.path) == signature:
            return None
        try:
            forecaster, meta = load_checkpoint(where.path, device)
        except (CheckpointError, OSError) as exc:
            if self.single is not None:  # GRU_MODEL_PATH: a broken checkpoint stops start-up, as it always did
                raise CheckpointError(str(exc)) from exc
            self.skip(where, str(exc), signature)
            return None
        self._failed.pop(where.path, None)
        return Loaded(where, forecaster, meta, signature)

    def files_of(self, where: VersionDir) -> FileSignature:
        """The sizes and times of the version's files now (a ``Loaded``'s ``files`` as they were read)."""
        return _signature(where.path)

    def model_version_of(self, where: VersionDir) -> str | None:
        """The version hash its config.json declares (read without loading the weights); None if unreadable."""
        try:
            meta = read_config_json(where.path / CONFIG_FILE)
        except CheckpointError:
            return None
        version = meta.get("version") if isinstance(meta, dict) else None
        return version if isinstance(version, str) else None

    def skip(self, where: VersionDir, reason: str, signature: FileSignature | None = None) -> None:
        """Refuse a version until its files change: one log line naming it, one count."""
        signature = signature if signature is not None else _signature(where.path)
        if self._failed.get(where.path) == signature:
            return
        self._failed[where.path] = signature
        if len(reason) > MAX_REASON:  # a reason quotes the config's values, which can be megabytes of them
            reason = f"{reason[:MAX_REASON]}… ({len(reason) - MAX_REASON} more characters)"
        log.warning("model %s version %d skipped: %s", where.model, where.version, reason,
                    extra={"fields": {"model": where.model, "version": where.version, "path": str(where.path)}})
        self._on_skip(where.model, where.version)


def _signature(directory: Path) -> FileSignature:
    """Sizes, modification and status-change times of a version's files: what changes when it is rewritten,
    and when only its permissions or owner are fixed (a chmod moves the ctime alone)."""
    out = []
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        try:
            stat = (directory / name).stat()
            out.append((stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns))
        except OSError:
            out.append((-1, -1, -1))
    return tuple(out)


def _checkpoint_name(path: Path) -> str:
    """The model name of a lone checkpoint: its config's name where that is a valid model name."""
    try:
        name = read_config_json(path / CONFIG_FILE).get("name")
    except (CheckpointError, AttributeError):
        return FALLBACK_NAME
    return name if isinstance(name, str) and MODEL_NAME.fullmatch(name) else FALLBACK_NAME
