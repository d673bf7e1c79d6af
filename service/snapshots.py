"""Snapshots of every served model's sessions: one snapshot file per model (``service.sessions.snapshot``).

The default model's file is ``GRU_SNAPSHOT_PATH`` itself, as with one model; another model's sits beside it
with the model's name before the suffix (``sessions.safetensors`` -> ``sessions.pumps.safetensors``). Each
file is restored at start onto the model of its name, for the versions its repository holds; a model the
repository no longer has leaves its file where it is. A model that appears while the service runs (back in
the repository, or loaded through its API) has its file restored before it is routed to, as at a start, and
is snapshotted from then on, periodically and at shutdown.

Each file names its model in its header, so a change of ``GRU_DEFAULT_MODEL`` across a restart keeps every
model's sessions: before any restore, a file at ``GRU_SNAPSHOT_PATH`` naming another model than the default
is renamed to that model's own path, and the default's own file, if it had one, to ``GRU_SNAPSHOT_PATH``.
Renamed, never copied: no older file is left behind to bring back older sessions at a later switch. A file
of an earlier release names no model and stays where it is, the default's by its path as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from model.checkpoint import MODEL_NAME
from service.config import Settings
from service.models import Registry, ServedModel
from service.sessions.snapshot import SnapshotKeeper, save_every, snapshot_model

log = logging.getLogger("service.snapshot")


def snapshot_path(base: Path, model: str, default: bool) -> Path:
    """Where model ``model``'s snapshot lives, given GRU_SNAPSHOT_PATH ``base``. Links are followed: a
    snapshot is renamed over its path, which would replace a link (into a volume, say) with a file beside
    the link instead of writing where it points."""
    base = base.resolve()
    return base if default else base.with_name(f"{base.stem}.{model}{base.suffix}").resolve()


def follow_the_default(base: Path, default: str) -> None:
    """Put each file where the default model ``default`` says its model's goes, before any restore: the file
    at GRU_SNAPSHOT_PATH ``base`` of another model (the default before a switch) to that model's own path,
    then the default's own file (it was not the default before) to ``base``, where nothing is left."""
    base = snapshot_path(base, default, True)
    named = snapshot_model(base)
    if named is not None and named != default and MODEL_NAME.fullmatch(named):
        # a file there is older: while this one was written at ``base``, its model wrote nothing there
        _move(base, snapshot_path(base, named, False), named)
    own = snapshot_path(base, default, False)
    if own.exists() and not base.exists():
        _move(own, base, default)


def _move(source: Path, target: Path, model: str) -> None:
    """Rename model ``model``'s snapshot ``source`` to ``target``; one that cannot be is left where it is (the
    model then starts without its sessions, as before files named their model), never a failed start."""
    fields = {"fields": {"model": model, "path": str(source), "moved_to": str(target)}}
    try:
        os.replace(source, target)
    except OSError as exc:
        log.warning(f"model {model}'s snapshot could not be moved to its path: {exc}", extra=fields)
        return
    log.info(f"model {model}'s snapshot moved to its path: GRU_DEFAULT_MODEL changed", extra=fields)


class ModelSnapshots:
    def __init__(self, settings: Settings, registry: Registry):
        self._settings = settings
        self._registry = registry
        # per model name, the keeper of the ServedModel it serves: a model unloaded and loaded again is a new
        # ServedModel with a new store, and gets a new keeper
        self._keepers: dict[str, tuple[ServedModel, SnapshotKeeper | None]] = {}
        self._periodic: asyncio.Task[None] | None = None
        if self.enabled:  # a path no snapshot can be written to stops start-up here, not at the first save
            self._current(refuse=True)
            registry.on_new_model = self._arrived
        elif settings.snapshot_interval_seconds > 0:  # the path forgotten: say so, not at the first restart
            log.warning("GRU_SNAPSHOT_INTERVAL_SECONDS is ignored: without GRU_SNAPSHOT_PATH no snapshot is"
                        " written")

    @property
    def enabled(self) -> bool:
        return self._settings.snapshot_path is not None

    def _keeper(self, model: ServedModel, refuse: bool) -> SnapshotKeeper | None:
        """``model``'s keeper, made at its first use (a model unloaded and loaded again is a new one, with a new
        store). ``refuse``: a path no snapshot can be written to raises (start-up); for a model that appeared
        while serving it costs that model's snapshots only, with one error line, never the others' (the
        periodic save and the final one go on)."""
        kept = self._keepers.get(model.name)
        if kept is None or kept[0] is not model:
            base = self._settings.snapshot_path
            assert base is not None
            keeper: SnapshotKeeper | None = None
            try:
                keeper = SnapshotKeeper.from_settings(
                    self._settings, model.raw_store, lambda: model.engine.model_version,
                    lambda: self._registry.hashes_on_disk(model.name), model.state_size, self._registry.metrics,
                    model.name, path=snapshot_path(base, model.name, model.name == self._registry.default),
                    periodic=False,
                )
            except RuntimeError as exc:
                if refuse:
                    raise
                log.error(f"model {model.name}'s sessions will not be snapshotted: {exc}",
                          extra={"fields": {"model": model.name}})
            kept = self._keepers[model.name] = (model, keeper)
        return kept[1]

    async def _arrived(self, model: ServedModel) -> None:
        """``model`` appeared while serving (a poll or the repository API loaded it) and is not routed to yet:
        its file, left where it is by a start without the model, is restored as at a start. Unread, it was
        replaced by the new store's first save, and every session it held was lost without a word."""
        keeper = self._keeper(model, refuse=False)
        if keeper is not None:
            await keeper.start()

    async def forget(self, name: str) -> None:
        """Model ``name`` was unloaded, its sessions with it: its snapshot goes too, or the next start (which
        loads every model of the repository) would restore them. Its keeper is retired first, so that neither
        a write in progress nor a periodic save that listed it before the unload puts the file back."""
        kept = self._keepers.pop(name, None)
        if kept is not None and kept[1] is not None:
            await kept[1].retire()
        if self.enabled and name != self._registry.default:
            assert self._settings.snapshot_path is not None
            snapshot_path(self._settings.snapshot_path, name, default=False).unlink(missing_ok=True)

    def _current(self, refuse: bool = False) -> list[SnapshotKeeper]:
        return [k for m in list(self._registry.models.values()) if (k := self._keeper(m, refuse)) is not None]

    async def start(self) -> None:
        """Restore each model's snapshot (before any request is served), then save every interval."""
        keepers = self._current()
        if keepers:  # none with a store that persists itself: its files are left alone
            assert self._settings.snapshot_path is not None
            await asyncio.to_thread(follow_the_default, self._settings.snapshot_path, self._registry.default)
        for keeper in keepers:
            await keeper.start()
        if self._settings.snapshot_interval_seconds > 0 and self._keepers:
            self._periodic = asyncio.create_task(save_every(self._settings.snapshot_interval_seconds, self._current),
                                                 name="gru-snapshots")

    async def stop(self) -> None:
        """Stop the periodic saves, then write every model's final snapshot (after the engines drained)."""
        if self._periodic is not None:
            self._periodic.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._periodic
        for keeper in self._current():
            await keeper.stop()
