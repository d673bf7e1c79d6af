"""Snapshots of the memory store, so a graceful restart (a deploy) loses no acknowledged chunk.

One safetensors file, written atomically (temporary file, fsync, rename), holding these tensors:

    states    (N, S) float32   the state rows of the sessions that have one
    answers   (A,)   uint8     every session's last answer, concatenated
    index     (J,)   uint8     UTF-8 JSON: one entry per session, least recently used first
    seen      (J,)   float64   when each session was last reached (a chunk answered 409 or as an exact retry
                               refreshes its TTL without writing it); older snapshots lack it: 0, never
    ended     (E,)   uint8     UTF-8 JSON: the marks ended v2 sequences left, oldest first (older snapshots
                               lack it: none)
    ended_answers (B,) uint8   their answers, concatenated

and in the header metadata the format, the model version, S and the model's name (``snapshot_model``; a file
of an earlier release names none, and a reader ignores the keys it does not know). An index entry is
``[key, position, model_version, created_at, updated_at, last_offset, fingerprint (hex), answer start,
answer length, state row (-1: fresh state)]``; an ``ended`` entry is ``[key, when it ended, fingerprint (hex),
answer start, answer length]``, the time kept so that a mark's TTL counts from its end across a restart
(without the marks, the exact resend of a sequence's final chunk was a 404 after one). The index is a
tensor, not header metadata, because safetensors caps its header (100 MB) and a full store's index can
outgrow it. ``seen`` is a tensor of its own, not an eleventh index field, so that a reader without it (a
roll-back) still reads the file, and this one reads theirs; the marks' tensors likewise (a roll-back reads
the sessions and loses the marks).

Written on shutdown after the engine has drained (every answered chunk is in the store) and every
``GRU_SNAPSHOT_INTERVAL_SECONDS``; read once at start, before the first request. A file that cannot be read,
or was written for a model version or state size the service does not have, is renamed
``<path>.corrupt-<time>`` or ``<path>.incompatible-<time>`` with a warning, and the service starts empty: a
snapshot never stops a start. With a model repository a snapshot holds sessions of several versions (each
record names its own); a session of a version the repository no longer has is left out, counted in the log.

The store changes only on the event loop, so a snapshot is captured there in one go (the records' fields
and one ``index_select`` of the states) and serialised and written on a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
import tempfile
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from service.config import Settings
from service.metrics import Metrics
from service.sessions.base import Ended, Session, SessionStore, is_unix_time
from service.sessions.memory import EndedMark, MemoryStore

log = logging.getLogger("service.snapshot")
FORMAT = "gru-session-snapshot/1"
_CLOCK_SLIP = 86400.0  # seconds a session's time may lie ahead of this host's clock (another host's)
_TEMPORARY = ".tmp-"  # a write goes to <snapshot>.tmp-<pid>-<ns> first; one cut short is removed at start


class _Incompatible(Exception):
    """A readable snapshot of another model or state size: set aside, not restored."""


@dataclass(slots=True)
class _Captured:
    records: list[tuple[str, int, str, float, float, float, int, bytes, bytes, int | None]]  # the fields, slot last
    states: Tensor  # (capacity + 1, S): a copy of the store's whole state tensor, on its device
    ended: list[EndedMark]  # the ended sequences' marks, oldest first
    model_version: str
    model: str | None  # the model's name, for the header


def capture(store: MemoryStore, model_version: str, model: str | None = None) -> _Captured:
    """A consistent copy of the store; call on the event loop (the only place the store changes).

    Kept to two cheap steps (references to the records' immutable field values, one copy of the state
    tensor); picking the rows and building the JSON happen on the writer thread.
    """
    records = [(s.key, s.position, s.model_version, s.created_at, s.updated_at, s.seen_at, s.last_offset,
                s.fingerprint, s.answer, s.handle) for s in store.records()]
    return _Captured(records, store.states.clone(), store.ended_marks(), model_version, model)


def _write(captured: _Captured, path: Path) -> None:
    entries: list[list[object]] = []
    slots: list[int] = []
    start = 0
    for key, position, version, created, updated, _, last_offset, fingerprint, answer, slot in captured.records:
        row = -1
        if slot:
            row = len(slots)
            slots.append(slot)
        entries.append([key, position, version, created, updated, last_offset, fingerprint.hex(), start,
                        len(answer), row])
        start += len(answer)
    index = torch.tensor(slots, dtype=torch.long, device=captured.states.device)
    states = captured.states.index_select(0, index).to("cpu", torch.float32)  # (N, S)
    tensors = {
        "states": states.contiguous(),
        "answers": _bytes_tensor(bytearray().join(r[8] for r in captured.records)),
        "index": _bytes_tensor(bytearray(orjson.dumps(entries))),
        "seen": torch.tensor([r[5] for r in captured.records], dtype=torch.float64),  # (J,)
        **_ended_tensors(captured.ended),
    }
    metadata = {"format": FORMAT, "model_version": captured.model_version,
                "state_size": str(states.size(1)), "sessions": str(len(entries))}
    if captured.model is not None:
        metadata["model"] = captured.model
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}{_TEMPORARY}{os.getpid()}-{time.monotonic_ns()}")
    try:
        try:
            save_file(tensors, temporary, metadata=metadata)
        except SafetensorError as exc:  # its I/O errors (a full disk) come as this; the tensors are ours
            raise OSError(f"{temporary}: {exc}") from exc
        with temporary.open("rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)  # atomic: a reader sees the old snapshot or the new one, never half
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every filesystem)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def _ended_tensors(marks: list[EndedMark]) -> dict[str, Tensor]:
    """The ``ended`` index and ``ended_answers`` of the marks ``marks``, oldest first."""
    entries: list[list[object]] = []
    start = 0
    for key, when, mark in marks:
        entries.append([key, when, mark.fingerprint.hex(), start, len(mark.answer)])
        start += len(mark.answer)
    return {"ended": _bytes_tensor(bytearray(orjson.dumps(entries))),
            "ended_answers": _bytes_tensor(bytearray().join(mark.answer for _, _, mark in marks))}


def _read_ended(file: Any, latest: float) -> list[EndedMark]:
    """The marks of the open snapshot ``file`` (none in a file written before they were kept), each ended at a
    unix time no later than ``latest``: one far ahead would outlive its TTL by as much."""
    if "ended" not in file.keys():  # noqa: SIM118
        return []
    answers = file.get_tensor("ended_answers").numpy().tobytes()
    marks: list[EndedMark] = []
    for entry in orjson.loads(file.get_tensor("ended").numpy().tobytes()):
        key, when, fingerprint, start, length = entry
        if not (isinstance(key, str) and "/" in key and is_unix_time(when) and when <= latest
                and isinstance(start, int) and isinstance(length, int) and 0 <= start <= start + length
                <= len(answers)):
            raise ValueError(f"malformed ended entry {entry!r:.200}")
        marks.append((key, float(when), Ended(bytes.fromhex(fingerprint), answers[start : start + length])))
    return marks


def _bytes_tensor(data: bytearray) -> Tensor:
    """A view of ``data`` (no copy: the answers of 100,000 sessions can be hundreds of MB, and a snapshot
    that copies them needs that much more memory while it is written)."""
    if not data:
        return torch.empty(0, dtype=torch.uint8)  # frombuffer refuses an empty buffer
    return torch.frombuffer(data, dtype=torch.uint8)  # (len,)


async def save(store: MemoryStore, path: Path, model_version: str, model: str | None = None) -> int:
    """Write a snapshot of ``store`` to ``path``, naming ``model`` in its header; returns the number of sessions
    in it."""
    began = time.perf_counter()
    captured = capture(store, model_version, model)
    await asyncio.to_thread(_write, captured, path)
    seconds = round(time.perf_counter() - began, 3)
    log.info("snapshot written",
             extra={"fields": {"path": str(path), "sessions": len(captured.records), "seconds": seconds}})
    return len(captured.records)


def _read(path: Path, model_versions: set[str], state_size: int,
          latest: float) -> tuple[list[Session], list[int], Tensor, list[EndedMark]]:
    """Every record of the snapshot and its state row, and the ended marks, validated in full before anything
    is restored."""
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"format {metadata.get('format')!r}, expected {FORMAT!r}")
        if metadata.get("state_size") != str(state_size):
            raise _Incompatible(f"state size {metadata.get('state_size')}, the model carries {state_size}")
        states = file.get_tensor("states")
        answers = file.get_tensor("answers").numpy().tobytes()
        entries = orjson.loads(file.get_tensor("index").numpy().tobytes())
        seen = file.get_tensor("seen") if "seen" in file.keys() else None  # noqa: SIM118
        ended = _read_ended(file, latest)
    if states.dtype != torch.float32 or states.dim() != 2 or states.size(1) != state_size:
        raise ValueError(f"states tensor {tuple(states.shape)} {states.dtype}, expected (N, {state_size})"
                         " float32")
    if not torch.isfinite(states).all():
        raise ValueError("states tensor holds NaN or infinity")
    if seen is None:
        seen = torch.zeros(len(entries), dtype=torch.float64)
    if seen.dtype != torch.float64 or tuple(seen.shape) != (len(entries),) or not torch.isfinite(seen).all():
        raise ValueError(f"seen tensor {tuple(seen.shape)} {seen.dtype}, expected ({len(entries)},) finite float64")
    if len(seen) and not (seen.min().item() >= 0 and seen.max().item() <= latest):  # session times, as updated_at
        raise ValueError(f"seen tensor holds a time that is no unix time or lies ahead: {seen.max().item()!r}")
    sessions: list[Session] = []
    rows: list[int] = []
    for entry, seen_at in zip(entries, seen.tolist(), strict=True):
        key, position, version, created, updated, last_offset, fingerprint, start, length, row = entry
        # a position past int64 would fail every chunk of its session, and its batch, where the chunk
        # fingerprint packs it (Python's int has no bound of its own)
        if not (isinstance(key, str) and "/" in key and isinstance(position, int) and 0 <= position < 2**63
                and isinstance(start, int) and isinstance(length, int) and 0 <= start <= start + length
                <= len(answers) and isinstance(row, int) and -1 <= row < states.size(0)
                and is_unix_time(created) and is_unix_time(updated) and max(created, updated) <= latest):
            raise ValueError(f"malformed index entry {entry!r:.200}")
        sessions.append(Session(key, position, str(version), 0, created_at=float(created),
                                updated_at=float(updated), last_offset=int(last_offset),
                                fingerprint=bytes.fromhex(fingerprint), answer=answers[start : start + length],
                                seen_at=seen_at))
        rows.append(row)
    if len(sessions) != int(metadata.get("sessions", -1)):
        raise ValueError(f"{len(sessions)} index entries, the header says {metadata.get('sessions')}")
    # The header names the newest version when written; a repository may have lost that one since (a bad
    # version taken out) and still serve the others, whose sessions stay.
    if metadata.get("model_version") not in model_versions and not any(s.model_version in model_versions
                                                                       for s in sessions):
        raise _Incompatible(f"written for model {metadata.get('model_version')}, serving"
                            f" {', '.join(sorted(model_versions))}")
    return sessions, rows, states, ended


def snapshot_model(path: Path) -> str | None:
    """The model the snapshot at ``path`` names in its header; None for a missing or unreadable file (its
    restore sets it aside) and for one of an earlier release, which names none."""
    try:
        with safe_open(str(path), framework="pt") as file:
            return (file.metadata() or {}).get("model")
    except Exception:  # any unreadable file: none named
        return None


def _free_name(path: Path) -> Path:
    """``path``, or ``path`` with ``-2``, ``-3``, ... where it is taken: a second file set aside within the same
    second (a restart loop) must not replace the first, which may be the only copy of its sessions."""
    candidate, n = path, 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


def restore(store: MemoryStore, path: Path, model_versions: str | Collection[str], state_size: int,
            clock: Callable[[], float] = time.time) -> int:
    """Load the snapshot at ``path`` into an empty store; returns the sessions restored (0 when set aside).
    ``model_versions``: the versions whose sessions can be served (the repository's); others are left out."""
    known = {model_versions} if isinstance(model_versions, str) else set(model_versions)
    if not path.exists():
        log.info("no snapshot to restore; starting empty", extra={"fields": {"path": str(path)}})
        return 0
    try:
        # a session's times: unix seconds, and none past now by more than a clock's slip (one far ahead would
        # never expire, and the sweep, oldest first, would stop at it)
        sessions, rows, states, ended = _read(path, known, state_size, clock() + _CLOCK_SLIP)
    except Exception as exc:  # any unreadable file: set it aside, never fail the start
        reason = "incompatible" if isinstance(exc, _Incompatible) else "corrupt"
        aside = _free_name(path.with_name(f"{path.name}.{reason}-{time.strftime('%Y%m%dT%H%M%S')}"))
        with contextlib.suppress(OSError):
            os.replace(path, aside)
        log.warning(f"snapshot is {reason}, set aside; starting with no sessions: {exc}",
                    extra={"fields": {"path": str(path), "moved_to": str(aside), "reason": reason}})
        return 0
    now = clock()
    servable = [i for i, s in enumerate(sessions) if s.model_version in known]
    fresh = [i for i in servable if now - sessions[i].last_used <= store.ttl_seconds]
    live = fresh[-store.max_sessions:]  # least recently used first: keep the newest
    marks = sorted((m for m in ended if now - m[1] <= store.ttl_seconds), key=lambda m: m[1])  # oldest first
    store.restore([sessions[i] for i in live], [rows[i] for i in live], states, marks)
    log.info("snapshot restored", extra={"fields": {
        "path": str(path), "sessions": len(store), "ended_marks": len(store.ended_marks()),
        "expired": len(servable) - len(fresh),
        "unknown_version": len(sessions) - len(servable),
        "over_capacity": len(fresh) - len(store)}})  # GRU_MAX_SESSIONS or GRU_MAX_ANSWER_BYTES
    return len(store)  # the newest that fit GRU_MAX_SESSIONS and the answers' budget


def _check_writable(path: Path) -> None:
    """Refuse to start with a path no snapshot can be written to. Found only at shutdown, it would lose
    every session the snapshot exists to keep; and a directory there would be set aside as "corrupt"."""
    try:
        if path.exists() and not path.is_file():
            raise RuntimeError(f"GRU_SNAPSHOT_PATH={path} exists and is not a file; name the snapshot file itself")
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.probe-"):
            pass
    except OSError as exc:
        raise RuntimeError(f"GRU_SNAPSHOT_PATH={path}: no snapshot can be written there ({exc})") from exc


def _remove_leftovers(path: Path) -> None:
    """Remove the temporary files of writes cut short (a process killed while it wrote: an OOM kill, likeliest
    then, as the write is the peak of its memory). Each is as large as a snapshot, and left there one crash
    after another they would fill the disk. At start, before this process writes any."""
    for leftover in path.parent.glob(f"{glob.escape(path.name)}{_TEMPORARY}*"):
        with contextlib.suppress(OSError):
            leftover.unlink()
            log.info("removed the temporary file of a snapshot write cut short",
                     extra={"fields": {"path": str(leftover)}})


class SnapshotKeeper:
    """Restore at start, save every ``interval`` seconds (0: never) and once more at shutdown.

    ``model_version`` gives the version the header names (the newest, when saving); ``known_versions`` the
    versions whose sessions are restored (every version in the repository, read at start). Each save is
    counted under ``model``: ``gru_snapshot_failures_total``, else ``gru_snapshot_last_success_timestamp_seconds``,
    which has no sample until a snapshot is known (restored or written): a 0 there read as a snapshot of 1970,
    fifty years old at every start."""

    def __init__(self, store: MemoryStore, path: Path, model_version: Callable[[], str],
                 known_versions: Callable[[], set[str]], state_size: int, interval: float, metrics: Metrics,
                 model: str):
        self.store = store
        self.path = path
        self.model_version = model_version
        self.known_versions = known_versions
        self.state_size = state_size
        self.interval = interval
        self._periodic: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._retired = False  # its model was unloaded: it never writes again
        self._metrics, self._model = metrics, model
        self._failures = metrics.snapshot_failures.labels(model=model)

    @classmethod
    def from_settings(cls, settings: Settings, store: SessionStore, model_version: Callable[[], str],
                      known_versions: Callable[[], set[str]], state_size: int, metrics: Metrics, model: str, *,
                      path: Path | None = None, periodic: bool = True) -> SnapshotKeeper | None:
        """The keeper GRU_SNAPSHOT_PATH asks for (at ``path`` instead, where given); None when unset, or with a
        store that persists itself. ``periodic``: it saves every GRU_SNAPSHOT_INTERVAL_SECONDS itself."""
        if settings.snapshot_path is None:
            return None
        if not isinstance(store, MemoryStore):
            log.warning("GRU_SNAPSHOT_PATH is ignored: snapshots are for the memory store, and"
                        f" GRU_STORE={settings.store} keeps sessions outside the process")
            return None
        path = path or settings.snapshot_path
        _check_writable(path)
        interval = settings.snapshot_interval_seconds if periodic else 0.0
        return cls(store, path, model_version, known_versions, state_size, interval, metrics, model)

    async def start(self) -> None:
        """Restore the snapshot (before any request is served), then save every interval."""
        _remove_leftovers(self.path)
        known = await asyncio.to_thread(self.known_versions)
        # off the event loop, which may be serving other models (one appeared while serving): no request
        # reaches this store before its restore (start-up, or a model not routed to yet)
        await asyncio.to_thread(restore, self.store, self.path, known | {self.model_version()}, self.state_size)
        with contextlib.suppress(FileNotFoundError):  # none, or set aside: no snapshot is known yet
            self._written(self.path.stat().st_mtime)  # the rename kept the written file's time
        if self.interval > 0:
            self._periodic = asyncio.create_task(save_every(self.interval, lambda: [self]), name="gru-snapshot")

    async def save(self) -> int:
        async with self._lock:  # one writer at a time: the periodic one and the final one never interleave
            if self._retired:
                return 0
            try:
                saved = await save(self.store, self.path, self.model_version(), self._model)
            except Exception:
                self._failures.inc()
                raise
            self._written(time.time())
            return saved

    def _written(self, when: float) -> None:
        """The snapshot at ``path`` was written whole at ``when`` (unix seconds)."""
        self._metrics.snapshot_written.labels(model=self._model).set(when)

    async def retire(self) -> None:
        """Its model was unloaded: wait for a write in progress, and write no more (a periodic save that
        listed this keeper before the unload would write the unloaded sessions back)."""
        async with self._lock:
            self._retired = True
            for family in (self._metrics.snapshot_failures, self._metrics.snapshot_written):  # its series go too
                with contextlib.suppress(KeyError):
                    family.remove(self._model)

    async def stop(self) -> None:
        """Stop the periodic saves, then write the final snapshot (call after the engine has drained)."""
        if self._periodic is not None:
            self._periodic.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._periodic
        try:
            await self.save()
        except Exception as exc:
            _failed("final snapshot failed; a restart restores the last one written, if any", self.path, exc)


async def save_every(interval: float, keepers: Callable[[], Iterable[SnapshotKeeper]]) -> None:
    """Every ``interval`` seconds, each of ``keepers()`` saves; a failure is logged and tried again next time."""
    while True:
        await asyncio.sleep(interval)
        for keeper in keepers():
            try:  # shielded: a shutdown waits for a write in progress instead of racing it with the final one
                await asyncio.shield(keeper.save())
            except Exception as exc:  # a full disk must not stop the service; the next interval tries again
                _failed("snapshot failed", keeper.path, exc)


def _failed(what: str, path: Path, exc: Exception) -> None:
    """Log a failed save: one line saying why for an I/O error (a full disk, a lost mount: conditions a
    service meets), the traceback for anything else (a bug)."""
    fields = {"fields": {"path": str(path)}}
    if isinstance(exc, OSError):
        log.error(f"{what}: {exc}", extra=fields)
    else:
        log.error(what, exc_info=exc, extra=fields)
