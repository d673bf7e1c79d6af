"""The session state document: one session as a self-describing safetensors file, for export, import and fork.

Tensors (every one of them is read, or the document is refused):

    state        (S,) float32   the Forecaster's state vector
    fingerprint  (16,) uint8    of the last applied chunk, for exact retries ((0,) when none)
    answer       (A,) uint8     the last applied chunk's answer, replayed to an exact retry ((0,) when none)

Header metadata (strings): ``format`` (``gru-session-state``), ``format_version``, ``session_id``, ``model``
(the model's name), ``model_version``, ``position``, ``last_offset`` (-1: no chunk to retry),
``created_at`` and ``updated_at`` (unix seconds). Unknown metadata is ignored: it describes, it carries
nothing. An unknown tensor, or a newer ``format_version``, is refused: it would carry something of the
session (a per-session adaptation, say) that this reader would drop, and the session would not continue
exactly. A later format adds its tensors to ``_TENSORS`` and raises ``FORMAT_VERSION``.

Everything here is hostile until ``decode`` has checked it: the header's size, every tensor's dtype and
shape, a finite state, integer and time fields, and a kept answer that is this session's own.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, replace

import numpy as np
import orjson
from safetensors import SafetensorError
from safetensors.numpy import load, save

from service.schemas import answer_prefix
from service.session_ids import SESSION_ID

FORMAT = "gru-session-state"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024  # a document's header is a few hundred bytes; the answer is a tensor
FINGERPRINT_BYTES = 16
_INTEGER = re.compile(r"-?[0-9]{1,18}")
_TENSORS = {"state": np.dtype(np.float32), "fingerprint": np.dtype(np.uint8), "answer": np.dtype(np.uint8)}


class DocumentError(ValueError):
    """The bytes are not a state document this service can import; the message says what is wrong."""


@dataclass(frozen=True, slots=True)
class StateDocument:
    """A session as exported: its record and its state vector."""

    session_id: str
    model_name: str
    model_version: str
    position: int
    last_offset: int  # -1: no chunk applied since the session started (or was reset)
    fingerprint: bytes
    answer: bytes
    created_at: float
    updated_at: float
    state: np.ndarray  # (S,) float32

    def tag(self) -> str:
        """An entity tag that changes whenever any part of the session does (timestamps included, so a
        session deleted and made again to the same numbers still gets another tag)."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(orjson.dumps([self.session_id, self.model_name, self.model_version, self.position,
                                    self.last_offset, self.created_at, self.updated_at]))
        digest.update(self.fingerprint)
        digest.update(len(self.answer).to_bytes(8, "little"))
        digest.update(self.answer)
        digest.update(np.ascontiguousarray(self.state, dtype="<f4").tobytes())
        return f'"{digest.hexdigest()}"'

    def renamed(self, session_id: str) -> StateDocument:
        """The same session under another id; its kept answer names the new id (a fork, or an import under
        another id, replays it to an exact retry as its own)."""
        answer = self.answer
        if answer:
            answer = answer_prefix(session_id) + answer[len(answer_prefix(self.session_id)):]
        return replace(self, session_id=session_id, answer=answer)


def encode(document: StateDocument) -> bytes:
    tensors: dict[str, np.ndarray] = {
        "state": np.ascontiguousarray(document.state, dtype=np.float32),
        "fingerprint": np.frombuffer(document.fingerprint, dtype=np.uint8),
        "answer": np.frombuffer(document.answer, dtype=np.uint8),
    }
    metadata = {
        "format": FORMAT, "format_version": str(FORMAT_VERSION), "session_id": document.session_id,
        "model": document.model_name, "model_version": document.model_version,
        "position": str(document.position), "last_offset": str(document.last_offset),
        "created_at": repr(document.created_at), "updated_at": repr(document.updated_at),
    }
    return _sorted_header(save(tensors, metadata=metadata))


def _sorted_header(raw: bytes) -> bytes:
    """``raw`` with its header's keys in sorted order: safetensors writes the metadata in hash order, and
    the same session should always be the same bytes (its ETag is a strong one). The same keys and values
    take the same room, so the header keeps its length and the tensors their offsets."""
    length = int.from_bytes(raw[:8], "little")
    header = orjson.dumps(orjson.loads(raw[8 : 8 + length]), option=orjson.OPT_SORT_KEYS)
    if len(header) > length:  # written otherwise than orjson writes it: keep safetensors' order
        return raw
    return raw[:8] + header.ljust(length) + raw[8 + length :]


def decode(raw: bytes, state_size: int, max_answer_bytes: int | None = None) -> StateDocument:
    """The document in ``raw``, checked in full; ``DocumentError`` saying what is wrong otherwise.
    ``max_answer_bytes``: the most a kept answer may hold (the store's bound on one session's)."""
    metadata = _metadata(raw)
    if metadata.get("format") != FORMAT:
        raise DocumentError(f"format {metadata.get('format')!r:.80} is not {FORMAT!r}; send a document that"
                            " GET /v1/sessions/{id}/state answered")
    version = _integer(metadata, "format_version")
    if version != FORMAT_VERSION:
        raise DocumentError(f"format_version {version} is not one this service reads ({FORMAT_VERSION}):"
                            " import it where it was exported, or into a service of that version")
    try:
        tensors = load(raw)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise DocumentError(f"the tensors cannot be read: {exc}") from None
    unknown = sorted(set(tensors) - set(_TENSORS))
    if unknown:
        raise DocumentError(f"tensor(s) {', '.join(unknown)[:200]} unknown to this service; refused rather"
                            " than dropped, as the session would not continue exactly")
    for name, dtype in _TENSORS.items():
        if name not in tensors:
            raise DocumentError(f"tensor {name!r} is missing")
        if tensors[name].dtype != dtype or tensors[name].ndim != 1:
            raise DocumentError(f"tensor {name!r} is {tensors[name].dtype} of shape {tensors[name].shape};"
                                f" expected one dimension of {dtype}")
    state = tensors["state"]
    if state.shape != (state_size,):
        raise DocumentError(f"the state has {state.size} values; this model carries {state_size}")
    if not np.isfinite(state).all():
        raise DocumentError("the state holds NaN or infinity")
    document = StateDocument(
        session_id=_session_id(metadata), model_name=metadata.get("model", ""),
        model_version=_model_version(metadata), position=_integer(metadata, "position"),
        last_offset=_integer(metadata, "last_offset"), fingerprint=tensors["fingerprint"].tobytes(),
        answer=tensors["answer"].tobytes(), created_at=_time(metadata, "created_at"),
        updated_at=_time(metadata, "updated_at"), state=state,
    )
    _check_retry(document)
    if max_answer_bytes is not None and len(document.answer) > max_answer_bytes:
        raise DocumentError(f"the kept answer has {len(document.answer)} bytes, more than this service keeps for"
                            f" one session ({max_answer_bytes})")
    return document


def built_by(raw: bytes) -> str | None:
    """The model version a document names, read from its header alone; None where there is none to read."""
    try:
        return _metadata(raw).get("model_version") or None  # none: a damaged document, for decode to say so
    except DocumentError:
        return None


def _metadata(raw: bytes) -> dict[str, str]:
    """The header's metadata, read before the tensors so that a header can never cost more than its cap."""
    if len(raw) < 8:
        raise DocumentError(f"{len(raw)} bytes is no safetensors document (it starts with an 8-byte header"
                            " length)")
    length = int.from_bytes(raw[:8], "little")
    if length > MAX_HEADER_BYTES or length > len(raw) - 8:
        raise DocumentError(f"the header claims {length} bytes; the document has {len(raw) - 8} after the"
                            f" length and a header may hold {MAX_HEADER_BYTES}")
    try:
        header = orjson.loads(raw[8 : 8 + length])
    except orjson.JSONDecodeError:
        raise DocumentError("the header is not JSON") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise DocumentError("the header has no metadata of strings")
    return metadata


def _integer(metadata: dict[str, str], name: str) -> int:
    value = metadata.get(name, "")
    if not _INTEGER.fullmatch(value):
        raise DocumentError(f"{name} {value!r:.40} is not a whole number")
    return int(value)


def _time(metadata: dict[str, str], name: str) -> float:
    try:
        value = float(metadata.get(name, ""))
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise DocumentError(f"{name} {metadata.get(name)!r:.40} is not unix seconds")
    return value


def _model_version(metadata: dict[str, str]) -> str:
    """The version that built the state: a document without one is damaged, not another model's."""
    model_version = metadata.get("model_version", "")
    if not model_version:
        raise DocumentError("model_version is missing: the state belongs to no model")
    return model_version


def _session_id(metadata: dict[str, str]) -> str:
    session_id = metadata.get("session_id", "")
    if not SESSION_ID.fullmatch(session_id):
        raise DocumentError(f"session_id {session_id!r:.140} is not a session id")
    return session_id


def _check_retry(document: StateDocument) -> None:
    """Position and the kept answer agree: either no chunk to retry, or one that ended at ``position`` with
    a 16-byte fingerprint and an answer that is this session's own."""
    if document.position < 0:
        raise DocumentError(f"position {document.position} is negative")
    if document.last_offset == -1:
        if document.fingerprint or document.answer:
            raise DocumentError("last_offset -1 (no chunk to retry) with a fingerprint or an answer")
        return
    if not 0 <= document.last_offset < document.position:
        raise DocumentError(f"last_offset {document.last_offset} is not a chunk before position"
                            f" {document.position}")
    if len(document.fingerprint) != FINGERPRINT_BYTES:
        raise DocumentError(f"the fingerprint has {len(document.fingerprint)} bytes, not {FINGERPRINT_BYTES}")
    try:
        answer = orjson.loads(document.answer)
    except orjson.JSONDecodeError:
        answer = None
    if not (document.answer.startswith(answer_prefix(document.session_id)) and isinstance(answer, dict)
            and answer.get("position") == document.position):
        raise DocumentError(f"the kept answer is not session {document.session_id!r}'s answer at position"
                            f" {document.position}")
    if len(document.answer) > len(orjson.dumps(answer)):  # padded: kept bytes the service never wrote
        raise DocumentError("the kept answer is padded; the service writes its answers compact")
