"""The model registry: every served model, one engine per loaded version, and the lifecycle between them.

Each model has its own session store (sessions are per model; a memory store's rows are one model's state
size) and one ``Engine`` per loaded version, each with its own Forecaster, queue and compute thread. The
routes hand a chunk to the model's newest engine; the engines' router (``ServedModel.route``) sends a chunk
on to the engine of the version its session's state was built with (pinned), so a live session keeps
answering exactly as its version would while new sessions start on the newest. A version that no session
needs any more is unloaded (draining); ``GRU_MAX_LOADED_VERSIONS`` bounds how many stay loaded.

New versions come from the repository (``service.repository``), polled every
``GRU_REPOSITORY_POLL_SECONDS`` or loaded on request; reading and warming a version happens on worker
threads, never on the event loop. docs/architecture.md, "Models and versions", has the whole picture.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch

from service.batch_queue import Chunk
from service.config import Settings
from service.engine import Engine
from service.metrics import Metrics
from service.repository import FileSignature, Loaded, Repository, VersionDir
from service.sessions import build_store
from service.sessions.base import Session, SessionStore
from service.sessions.guard import GuardedStore
from service.sessions.memory import MemoryStore

log = logging.getLogger("service.models")
SERVING, DRAINING = "serving", "draining"
_DRAIN_POLL_SECONDS = 0.005  # at shutdown, how often to look whether every engine has finished its chunks
MAX_PINS = 100_000  # routing hints kept per model (each a key and a reference)
# A version number as a reference may spell it: ASCII digits ("²" is a digit to str.isdigit, not to int), and
# few enough that int() takes them (it refuses over 4,300)
_VERSION_NUMBER = re.compile(r"[0-9]{1,18}")


class StartupError(RuntimeError):
    """The repository cannot start the service (no model, or no default among several)."""


class RegistryRefusal(Exception):
    """A repository request the registry will not carry out: ``status`` and why."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(slots=True)
class LoadedVersion:
    number: int
    engine: Engine
    meta: dict[str, Any]
    files: FileSignature  # its files when last looked at: a change is when to look for other weights there
    # State imports and forks onto it (``SessionStates._writing``): under way, and finished. The drain keeps a
    # version one is writing to, or wrote to since its count of sessions (which may not hold the session written).
    importing: int = 0
    imported: int = 0

    @property
    def model_version(self) -> str:
        return self.engine.model_version


class ServedModel:
    """One model: its store, its loaded versions (the highest number is the newest) and their routing."""

    def __init__(self, name: str, store: SessionStore, guarded: GuardedStore, first: Loaded, replay: bool):
        self.name = name
        self.replay = replay  # GRU_UPGRADE=replay: every chunk goes to the newest, which moves the session
        self.raw_store = store
        self.store = guarded
        self.features = first.forecaster.config.features
        self.layout = _layout(first)
        self.versions: dict[int, LoadedVersion] = {}
        self.sessions: dict[str, int] = {}  # per model version, from the last drain check
        # Where the router last sent each pinned session: its next chunk goes there at once instead of via
        # the newest engine (one store load and one batch instead of two). A hint only: a wrong one is
        # routed on by the engine that gets it.
        self._pins: OrderedDict[str, LoadedVersion] = OrderedDict()
        # Engines of versions unloaded while they held chunks (GRU_MAX_LOADED_VERSIONS unloads whatever a
        # version holds), until they finish: a session's later chunk queues behind the ones it has there.
        self._leaving: list[Engine] = []
        self._newest: LoadedVersion | None = None  # kept by add and remove: every chunk asks for it
        # Version hashes known to be no newer than the newest: every version loaded here, and the repository's
        # up to the newest. A session of another hash may be on a version another replica loaded first; its
        # chunks are refused (503) until a poll has looked (``Registry._place``), never judged on an older one.
        self.known: set[str] = set()
        self.unplaced: set[str] = set()  # hashes met since the last poll that it has to place
        # Hashes of versions unloaded because no session needed them (pin): a session of one met later was
        # started by a replica that had not polled yet, and the next poll loads the version back for it
        # (``Registry._load_pinned``), so its chunks are refused to retry (503), not 409 (a reset loses it).
        self.drained: set[str] = set()

    @property
    def newest(self) -> LoadedVersion:
        assert self._newest is not None, "a served model has a version"
        return self._newest

    def add(self, version: LoadedVersion) -> None:
        """Into the listing and the routing. A session with chunks still at the engine that was the newest
        is pinned to it: its next chunks queue there behind them and are routed on in their order, where
        sent straight to the new newest they could be judged first (a stream appending without offsets
        would apply them out of order; a new session's first chunk could lose its creation to its second)."""
        previous = self._newest
        self.versions[version.number] = version
        self.known.add(version.model_version)
        self.drained.discard(version.model_version)
        self._newest = self.versions[max(self.versions)]
        if previous is not None and previous is not self._newest:
            for key in previous.engine.keys_in_flight():
                if key not in self._pins:
                    self._pin(key, previous)

    def remove(self, version: LoadedVersion) -> None:
        """Out of the listing and the routing: nothing new reaches it, and no hint to it is kept (the hints
        would keep its weights in memory)."""
        del self.versions[version.number]
        self._newest = self.versions[max(self.versions)] if self.versions else None
        for key in [k for k, v in self._pins.items() if v is version]:
            del self._pins[key]
        if version.engine.busy:
            self._leaving.append(version.engine)

    def left(self, version: LoadedVersion) -> None:
        """``version``'s engine, removed, has finished what it held."""
        with contextlib.suppress(ValueError):
            self._leaving.remove(version.engine)

    def _leaving_with(self, key: str | None, engine: Engine) -> Engine | None:
        """An unloaded version's engine, other than ``engine``, still holding chunks of session ``key``."""
        if key is None or not self._leaving:  # every chunk asks: the usual answer costs one look
            return None
        return next((e for e in self._leaving if e is not engine and key in e.keys_in_flight()), None)

    @property
    def engine(self) -> Engine:
        """The newest version's engine: where every chunk arrives, and new sessions start."""
        return self.newest.engine

    def engine_for(self, key: str | None) -> Engine:
        """The engine to submit a chunk of session ``key`` to: its pinned version's, as last routed, else
        the newest (stateless chunks, new sessions, and every chunk with replay)."""
        pinned = self._pins.get(key) if key is not None else None
        return pinned.engine if pinned is not None else self.engine

    def _pin(self, key: str, version: LoadedVersion) -> None:
        self._pins[key] = version
        self._pins.move_to_end(key)  # least recently routed first out
        if len(self._pins) > MAX_PINS:
            self._unpin_one(key)

    def _unpin_one(self, pinned: str) -> None:
        """Drop the least recently routed pin, but ``pinned`` (its chunk is on its way there), whose session
        has no chunk at its version's engine: for such a session a pin is only a shortcut. One with chunks
        there keeps its next chunks behind them (sent to the newest, a new session's next chunk would create
        it there first, and a restart be judged first), so it stays, past the cap if need be: as many as the
        sessions with chunks in flight, which the queues bound."""
        held: dict[int, set[str]] = {}  # per version: its engine's sessions in flight, looked up once
        for key, version in self._pins.items():
            if version.number not in held:
                held[version.number] = version.engine.keys_in_flight()
            if key != pinned and key not in held[version.number]:
                del self._pins[key]
                return

    def newer_elsewhere(self, model_version: str) -> bool:
        """Whether a session of ``model_version`` may be on a version newer than the newest loaded here:
        not one known here, until a poll has looked for it in the repository; or one drained here, until a poll
        has loaded it back for its sessions."""
        if model_version in self.drained:
            return True
        if model_version in self.known:
            return False
        if len(self.unplaced) < MAX_PINS:
            self.unplaced.add(model_version)
        return True

    def state_of(self, version: LoadedVersion) -> str:
        return SERVING if version is self.newest else DRAINING

    def by_hash(self, model_version: str) -> LoadedVersion | None:
        """The newest loaded version with these weights (a roll-back republishes a version's weights)."""
        for number in sorted(self.versions, reverse=True):
            if self.versions[number].model_version == model_version:
                return self.versions[number]
        return None

    def find(self, reference: str) -> LoadedVersion | None:
        """A loaded version by its number ("2") or its hash."""
        if _VERSION_NUMBER.fullmatch(reference) and int(reference) in self.versions:
            return self.versions[int(reference)]
        return self.by_hash(reference)

    @property
    def state_size(self) -> int:
        return self.newest.engine.forecaster.state_size

    def incompatible(self, candidate: Loaded) -> str | None:
        """Why ``candidate`` cannot be a version of this model, or None: the same features, and the same
        state layout (the sessions' store holds states of one layout; replay reads the raw values in it)."""
        config = candidate.forecaster.config
        if config.features != self.features:
            return f"features {list(config.features)} differ from the model's {list(self.features)}"
        if _layout(candidate) != self.layout:
            return (f"its state layout (layers × hidden, lags, floats per session) {_layout(candidate)} differs"
                    f" from the model's {self.layout} (a calibration adds floats, a normalised one more:"
                    " calibrate every version alike)")
        return None

    def route(self, engine: Engine, chunk: Chunk, session: Session | None) -> bool:
        """Called by ``engine`` as it judges ``chunk``: True when the chunk went to another version's engine
        (the one its session is pinned to; the newest for a new or restarted session)."""
        newest = self.newest
        target = newest.engine
        if (leaving := self._leaving_with(chunk.key, engine)) is not None:
            target = leaving  # behind the session's chunks there, which it routes on first (then this one)
        elif (session is not None and not chunk.restart and not self.replay
                and session.model_version != newest.model_version):  # the newest's own sessions stay on it
            pinned = self.by_hash(session.model_version)
            if pinned is not None and pinned is not newest:
                target = pinned.engine
                self._pin(session.key, pinned)
        if target is newest.engine and chunk.key is not None:
            self._pins.pop(chunk.key, None)
        if target is engine:
            return False
        target.queue.hand_over(chunk)
        # The session's later chunks waiting here follow it, in order: the pin just set sends its next chunks
        # straight to ``target``, where they must not overtake these (a stream pipelines them).
        if chunk.key is not None:
            for later in engine.queue.withdraw(chunk.key):
                target.queue.hand_over(later)
        return True


class Registry:
    """Every served model; loads, routes, drains and unloads their versions."""

    def __init__(self, settings: Settings, repository: Repository, device: torch.device, metrics: Metrics):
        self.settings = settings
        self.repository = repository
        self.device = device
        self.metrics = metrics
        self.models: dict[str, ServedModel] = {}
        self.default = ""
        self.unloaded: set[str] = set()  # unloaded on request: polling leaves them alone until a load
        # Awaited with a model that appears while serving, before it is routed to (its snapshot is restored)
        self.on_new_model: Callable[[ServedModel], Awaitable[None]] | None = None
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        self._hashes_read: dict[VersionDir, str | None] = {}  # versions up to a newest: their declared hash
        metrics.active_sessions.set_function(lambda: _held_sessions(self.models))

    # -- start and stop --------------------------------------------------------------------------------

    def open(self) -> None:
        """Load every model's newest valid version (start-up, before the event loop serves) and pick the
        default model; StartupError when there is nothing to serve or no default among several."""
        found = self.repository.scan()
        wanted = self.settings.default_model
        if wanted and wanted not in found:
            raise StartupError(f"GRU_DEFAULT_MODEL={wanted} is not in the repository; it holds"
                               f" {', '.join(sorted(found)) or 'no model'}")
        if not wanted and len(found) > 1:
            raise StartupError(f"the repository holds several models ({', '.join(sorted(found))}); name the"
                               " one behind /v1/... with GRU_DEFAULT_MODEL")
        if not found:
            raise StartupError(f"{self.repository.root} holds no model: a repository holds DIR/<model>/<version>/"
                               "{config.json, model.safetensors}")
        self.default = wanted or next(iter(found))
        for versions in found.values():
            for where in reversed(versions):
                loaded = self.repository.load(where, self.device)
                if loaded is not None:
                    self._install(loaded)
                    break
        if self.default not in self.models:
            raise StartupError(f"no version of the default model {self.default} can be loaded: see the lines"
                               " above for each version skipped")
        if self.repository.polls:
            self._place(found)
        self._publish()

    async def start(self) -> None:
        for model in list(self.models.values()):
            for version in list(model.versions.values()):
                await version.engine.start()
        every = self.settings.repository_poll_seconds
        if self.repository.polls:  # before serving: the older versions the store's sessions are pinned to
            await self.poll()
        if self.repository.polls and every > 0:
            self._poller = asyncio.create_task(self._poll_forever(every), name="gru-repository-poll")

    async def stop(self, before_close: Callable[[], Awaitable[None]] | None = None) -> None:
        """Stop polling, let every engine finish what it accepted, run ``before_close`` (the final
        snapshot), then close the stores."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        async with self._lock:
            await _finish([version.engine for model in self.models.values() for version in model.versions.values()])
            if before_close is not None:
                await before_close()
            for model in self.models.values():
                await model.store.close()

    @property
    def writing(self) -> bool:
        """Whether any engine is writing a batch's chunks to its store (``Engine.writing``)."""
        return any(version.engine.writing for model in list(self.models.values())
                   for version in list(model.versions.values()))

    # -- lookups for the routes ------------------------------------------------------------------------

    def model(self, name: str | None = None) -> ServedModel | None:
        return self.models.get(name if name is not None else self.default)

    @property
    def default_model(self) -> ServedModel:
        return self.models[self.default]

    def hashes_on_disk(self, name: str) -> set[str]:
        """The version hashes the repository holds for model ``name`` (config.json only; disk I/O)."""
        versions = self.repository.scan().get(name, [])
        return {h for h in map(self.repository.model_version_of, versions) if h is not None}

    # -- the lifecycle ---------------------------------------------------------------------------------

    async def poll(self) -> None:
        """Load what is new in the repository (a newer version, a new model), then unload what drained."""
        async with self._lock:
            found = await asyncio.to_thread(self.repository.scan)
            for name, versions in found.items():
                if name in self.unloaded:
                    continue
                try:
                    await self._load_newest(name, versions)
                except Exception:  # what a version's files do not explain (a GPU out of memory): the others go on
                    log.exception("loading model %s failed; the next poll tries again", name,
                                  extra={"fields": {"model": name}})
            await asyncio.to_thread(self._place, found)
            await self._drain_all(found)

    def _place(self, found: dict[str, list[VersionDir]]) -> None:
        """Each model's known hashes: its repository versions up to its newest loaded one (read once each),
        and the hashes its sessions named since the last poll that no newer version on disk declares (a
        version since removed); one a newer version declares stays refused until this replica loads it. Disk I/O."""
        for name, model in list(self.models.items()):
            newest, unplaced = model.newest.number, set(model.unplaced)
            model.unplaced -= unplaced
            ahead: set[str | None] = set()
            for where in found.get(name, []):
                if where.version > newest:
                    if unplaced:
                        ahead.add(self.repository.model_version_of(where))
                    continue
                if where not in self._hashes_read:
                    self._hashes_read[where] = self.repository.model_version_of(where)
                if (declared := self._hashes_read[where]) is not None:
                    model.known.add(declared)
            model.known |= unplaced - ahead
            model.unplaced |= unplaced & ahead  # {str} & {str | None}: the ones a newer version declares

    async def load(self, name: str) -> None:
        """The repository API's load: (re)load ``name``'s newest valid version."""
        async with self._lock:
            versions = (await asyncio.to_thread(self.repository.scan)).get(name)
            if not versions:
                raise RegistryRefusal(404, f"model {name!r} is not in the repository")
            self.unloaded.discard(name)
            if not await self._load_newest(name, versions) and name not in self.models:
                raise RegistryRefusal(400, f"no version of model {name!r} can be loaded; the log says why")

    async def unload(self, name: str) -> None:
        """The repository API's unload: every version of ``name``; the default model cannot be."""
        async with self._lock:
            if name == self.default:
                raise RegistryRefusal(409, f"model {name!r} is the default model (GRU_DEFAULT_MODEL); it"
                                      " cannot be unloaded")
            model = self.models.pop(name, None)
            if model is None:
                raise RegistryRefusal(404, f"model {name!r} is not loaded")
            self.unloaded.add(name)
            await _finish([version.engine for version in model.versions.values()])
            for version in model.versions.values():
                _forget_series(self.metrics, model, version)
            await model.store.close()
            log.info("model unloaded", extra={"fields": {"model": name}})
            self._publish()

    async def refresh_counts(self) -> None:
        """Sessions per version, for GET /v1/models, and unload the versions no session needs."""
        async with self._lock:
            await self._drain_all()

    async def _load_newest(self, name: str, versions: list[VersionDir]) -> bool:
        """Load the newest valid version newer than what is loaded; True when one was."""
        model = self.models.get(name)
        loaded_up_to = max(model.versions) if model is not None else 0
        for where in reversed(versions):
            if where.version < loaded_up_to or (where.version == loaded_up_to and (
                    model is None or not await asyncio.to_thread(self._republished, model, where))):
                return False
            loaded = await asyncio.to_thread(self.repository.load, where, self.device)
            if loaded is None:
                continue
            reason = model.incompatible(loaded) if model is not None else None
            if reason is not None:
                self.repository.skip(where, reason)
                continue
            replaced = await self._bring_in(loaded)
            log.info("model version loaded", extra={"fields": {
                "model": name, "version": where.version, "model_version": loaded.model_version}})
            if replaced is not None and model is not None:
                self.metrics.version_evictions.labels(model=name).inc()
                log.warning("model %s version %d was published again with other weights (%s, before %s); its %d"
                            " sessions of the old weights now get 409 model-changed", name, where.version,
                            loaded.model_version, replaced.model_version,
                            model.sessions.get(replaced.model_version, 0))
                await self._stop_version(model, replaced, "replaced")
            await self._limit(self.models[name])
            self._publish()
            return True
        return False

    def _republished(self, model: ServedModel, where: VersionDir) -> bool:
        """Whether ``where``, the directory of ``model``'s newest loaded version, now holds other weights: it was
        removed and published again under its number (the training CLI numbers a publication past the highest
        on disk). Its config.json is read only once its files change. Disk I/O."""
        if not self.repository.polls:  # GRU_MODEL_PATH: one checkpoint, read at start-up
            return False
        newest = model.versions[where.version]
        files = self.repository.files_of(where)
        if files == newest.files:
            return False
        declared = self.repository.model_version_of(where)
        if declared is not None and declared != newest.model_version:
            return True  # to load: a damaged copy is skipped (logged once) until its files change
        newest.files = files  # the same weights (copied again, a chmod), or a config.json not written yet
        return False

    def _install(self, loaded: Loaded) -> LoadedVersion:
        """A new engine for ``loaded`` beside the model's others, routed to at once (start-up: the engines
        start before anything is served)."""
        model, version = self._prepare(loaded)
        self._enter(model, version)
        return version

    async def _bring_in(self, loaded: Loaded) -> LoadedVersion | None:
        """A new engine for ``loaded``, warmed up before it enters the listing and the routing: a version is
        listed only once it serves, and the caller's ``_limit`` runs with no await after its entry, so no
        request and no listing ever sees more than GRU_MAX_LOADED_VERSIONS versions. Returns the version of
        the same number it replaced (out of the routing, its engine still to stop), if any."""
        model, version = self._prepare(loaded)
        try:
            await version.engine.start()  # warms up on the version's own compute thread
            if model is not self.models.get(model.name) and self.on_new_model is not None:
                model.add(version)  # the new model's newest, which its restore reads (``_enter`` adds it again)
                await self.on_new_model(model)  # before it is listed, so no chunk meets the store half restored
        except BaseException:  # not entered: a later poll tries again, so nothing may be left behind
            await version.engine.stop()
            if model is not self.models.get(model.name):
                await model.store.close()
            raise
        return self._enter(model, version)

    def _enter(self, model: ServedModel, version: LoadedVersion) -> LoadedVersion | None:
        """Into the listing and the routing (a new model with it), in the same step taking out the loaded
        version of its number if there is one (republished with other weights), which it returns."""
        self.models.setdefault(model.name, model)
        replaced = model.versions.get(version.number)
        if replaced is version:  # a new model's, added already for its snapshot's restore (``_bring_in``)
            replaced = None
        if replaced is not None:
            model.remove(replaced)
        model.add(version)
        return replaced

    def _prepare(self, loaded: Loaded) -> tuple[ServedModel, LoadedVersion]:
        """An engine for ``loaded``, not routed to yet, and its model (a new model, unlisted, gets its store)."""
        name = loaded.where.model
        model = self.models.get(name)
        s = self.settings
        if model is None:
            namespace = "" if name == self.default else name  # the default's keys are today's
            store = build_store(self.settings, loaded.forecaster.state_size, self.device, self.metrics, namespace)
            model = ServedModel(name, store, GuardedStore(store, self.metrics), loaded, s.upgrade == "replay")
        engine = Engine(
            loaded.forecaster, loaded.model_version, model.store, self.metrics,
            max_batch_size=s.max_batch_size, max_batch_delay_ms=s.max_batch_delay_ms, max_queue=s.max_queue,
            request_timeout_seconds=s.request_timeout_seconds, max_run_steps=s.max_run_steps,
            label=(name, str(loaded.where.version)), replay=model.replay, surprise_p=s.surprise_p,
        )
        engine.router = lambda chunk, session: model.route(engine, chunk, session)
        if self.repository.polls:  # a lone checkpoint never has a newer version
            engine.unplaced = model.newer_elsewhere
        return model, LoadedVersion(loaded.where.version, engine, loaded.meta, loaded.files)

    async def _drain_all(self, found: dict[str, list[VersionDir]] | None = None) -> None:
        """Count each model's sessions per version; with the repository's listing (``found``), load the
        versions that sessions are pinned to and this replica lacks (another replica, or a restart, made
        them); unload the versions no session needs."""
        for model in list(self.models.values()):
            if found is None and len(model.versions) < 2 and not isinstance(model.raw_store, MemoryStore):
                continue  # nothing to drain: no Redis SCAN for a count
            # what each version had imported and committed as the count began: a session written since may
            # be missing from the count
            began = {number: (version.imported, version.engine.written) for number, version in model.versions.items()}
            try:
                model.sessions = await model.store.version_counts()
            except Exception:  # the store is down: nothing is unloaded on a count we do not have
                log.warning("session counts unavailable for model %s; nothing drained", model.name)
                continue
            if found is not None and not model.replay:
                await self._load_pinned(model, found.get(model.name, []))
            for version in list(model.versions.values()):
                if version is model.newest:
                    continue
                # A version still holding chunks is needed too: the counts miss a session its first chunk is
                # creating, and its pins keep a session's later chunks behind the ones it holds. So is one a
                # state import writes to, or one that an import or its engine wrote to after the count began
                # (a Redis SCAN takes a while): the count may miss the session written.
                has_sessions = not model.replay and model.by_hash(version.model_version) is version and (
                    model.sessions.get(version.model_version, 0) > 0)
                written = (version.imported, version.engine.written)
                importing = version.importing > 0 or began.get(version.number, written) != written
                if not has_sessions and not importing and not version.engine.busy:
                    await self._unload_version(model, version, "drained")
                    if self._reloads_drained(model, version):
                        model.drained.add(version.model_version)
        self._publish()

    def _publish(self) -> None:
        """gru_model_versions{model, version, state}: 1 per loaded version (only loaded ones: bounded), and each
        one's sessions at the last count; gru_model_info: the default model's newest version, as /v1/model says
        (the dashboard's Model panel), kept so as each new version is listed."""
        if self.default in self.models:
            newest = self.models[self.default].newest
            engine = newest.engine
            self.metrics.model_info.info({"name": str(newest.meta["name"]), "version": engine.model_version,
                                          "device": str(engine.device), "variant": engine.forecaster.config.variant})
        gauge = self.metrics.model_versions
        gauge.clear()
        for model in self.models.values():
            for version in model.versions.values():
                number = str(version.number)
                gauge.labels(model=model.name, version=number, state=model.state_of(version)).set(1)
                sessions = model.sessions.get(version.model_version, 0) if model.by_hash(
                    version.model_version) is version else 0
                self.metrics.version_sessions.labels(model=model.name, version=number).set(sessions)

    def _reloads_drained(self, model: ServedModel, version: LoadedVersion) -> bool:
        """Whether a poll will load ``version``, drained, back for a session of it met later (pin, polling on,
        and no other loaded version of its hash): its chunks are refused to retry until then."""
        return (not model.replay and self.settings.repository_poll_seconds > 0
                and model.by_hash(version.model_version) is None)

    async def _load_pinned(self, model: ServedModel, on_disk: list[VersionDir]) -> None:
        """Load the newest repository version of each hash that live sessions hold and no loaded version has."""
        missing = {h for h, n in model.sessions.items() if n > 0 and model.by_hash(h) is None}
        try:
            await self._load_missing(model, on_disk, missing)
        finally:  # a drained version not loaded back (no room, gone from disk, damaged): its sessions get 409
            model.drained -= missing

    async def _load_missing(self, model: ServedModel, on_disk: list[VersionDir], missing: set[str]) -> None:
        """``_load_pinned``'s loads: the newest version on disk of each hash in ``missing``, while there is
        room; each one loaded leaves ``missing``."""
        for where in reversed(on_disk):
            if not missing or len(model.versions) >= self.settings.max_loaded_versions:
                return
            if where.version in model.versions:
                continue
            declared = await asyncio.to_thread(self.repository.model_version_of, where)
            if declared not in missing:
                continue
            loaded = await asyncio.to_thread(self.repository.load, where, self.device)
            if loaded is None or loaded.model_version != declared:
                continue
            if (reason := model.incompatible(loaded)) is not None:  # as a newest version that does not fit is:
                self.repository.skip(where, reason)  # said once, and not loaded again until its files change
                continue
            missing.discard(declared)
            await self._bring_in(loaded)
            log.info("model version loaded for its pinned sessions", extra={"fields": {
                "model": model.name, "version": where.version, "model_version": declared}})

    async def _limit(self, model: ServedModel) -> None:
        """Beyond GRU_MAX_LOADED_VERSIONS the oldest draining versions go; their sessions then get 409."""
        while len(model.versions) > self.settings.max_loaded_versions:
            oldest = model.versions[min(model.versions)]
            pinned = model.sessions.get(oldest.model_version, 0)
            self.metrics.version_evictions.labels(model=model.name).inc()
            log.warning("model %s version %d unloaded beyond GRU_MAX_LOADED_VERSIONS=%d; its %d sessions now"
                        " get 409 model-changed", model.name, oldest.number, self.settings.max_loaded_versions,
                        pinned)
            await self._unload_version(model, oldest, "limit")

    async def _unload_version(self, model: ServedModel, version: LoadedVersion, why: str) -> None:
        """Out of the routing first (nothing new reaches it), then its engine finishes what it holds."""
        model.remove(version)
        await self._stop_version(model, version, why)

    async def _stop_version(self, model: ServedModel, version: LoadedVersion, why: str) -> None:
        """``version``, out of the routing, finishes what it holds and stops."""
        try:
            await version.engine.stop()
        finally:
            model.left(version)
        if version.number not in model.versions:  # a version republished in its place keeps the number's series
            _forget_series(self.metrics, model, version)
        log.info("model version unloaded", extra={"fields": {
            "model": model.name, "version": version.number, "reason": why}})

    async def _poll_forever(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            try:
                await self.poll()
            except Exception:  # a bug or a full disk must not end polling
                log.exception("model repository poll failed")


async def _finish(engines: list[Engine]) -> None:
    """Let ``engines`` answer every chunk they hold, then stop them. Each refuses new chunks at once, but
    none stops while another holds a chunk: a chunk one hands to another (its session's version) must find
    it taking chunks, where a stopped one would leave it to its timeout."""
    for engine in engines:
        engine.refuse_new()
    while any(engine.busy for engine in engines):
        await asyncio.sleep(_DRAIN_POLL_SECONDS)
    for engine in engines:
        await engine.stop()


def _layout(loaded: Loaded) -> tuple[int, int, int]:
    """What places the raw values in a state, and its size: (layers × hidden size, lags, floats); the size
    differs with a calibration's interval adaptation at the end (docs/architecture.md, "State layout")."""
    config = loaded.forecaster.config
    return config.num_layers * config.hidden_size, config.lags, loaded.forecaster.state_size


# -- metrics: module functions, so the registry's class stays about the lifecycle ----------------------------


def _held_sessions(models: dict[str, ServedModel]) -> float:
    return float(sum(len(m.raw_store) for m in models.values() if isinstance(m.raw_store, MemoryStore)))


def _forget_series(metrics: Metrics, model: ServedModel, version: LoadedVersion) -> None:
    """Only loaded versions have series: the labels stay bounded."""
    for family in (metrics.steps, metrics.forward_time, metrics.version_sessions):
        with contextlib.suppress(KeyError):
            family.remove(model.name, str(version.number))
