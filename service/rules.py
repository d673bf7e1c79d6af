"""The offset rules (README, "Offsets, retries and sessions") as one pure function, so every store and
replica judges alike.

- offset == position: apply. No offset: append at the current position.
- offset and fingerprint of the last applied chunk: its answer again (exact retry), nothing changes, even
  after the model changed (the answer is kept: no model computes it).
- any other offset: 409 with the current position (at the last chunk's offset, saying a different chunk was
  applied there).
- unknown session: created when offset is absent or 0; otherwise 404 (expired or never there).
- a session built with another model version: 409, reset to continue (but for an exact retry).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import numpy as np

from service.extras import NO_EXTRAS, Extras
from service.refusals import OffsetMismatch, Refusal, StaleModel, UnknownSession
from service.sessions.base import Session, session_id_of


@dataclass(frozen=True, slots=True)
class Apply:
    start: int  # the position the chunk is applied at
    created: bool


@dataclass(frozen=True, slots=True)
class Replay:
    answer: bytes  # the stored answer of the exact same chunk


Verdict = Apply | Replay | Refusal


def fingerprint(offset: int, horizon: int, values: np.ndarray, extras: Extras = NO_EXTRAS) -> bytes:
    """16 bytes identifying a chunk as applied: where it started, its horizon, its exact values, and the
    levels and scores it asked for (only when it asked: without them the fingerprint is what it was)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(struct.pack(f"={2 + values.ndim}q", offset, horizon, *values.shape))  # native int64s, as numpy's
    digest.update(np.ascontiguousarray(values, dtype=np.float32).data)
    if extras:
        digest.update(np.array([extras.scores, len(extras.levels)], dtype=np.int64).tobytes())
        digest.update(np.array(extras.levels, dtype=np.float64).tobytes())
    return digest.digest()


def judge(
    key: str, offset: int | None, horizon: int, values: np.ndarray, session: Session | None, model_version: str,
    extras: Extras = NO_EXTRAS,
) -> Verdict:
    session_id = session_id_of(key)
    if session is None:
        if offset in (None, 0):
            return Apply(start=0, created=True)
        return UnknownSession(
            f"session {session_id!r} does not exist (expired or never created) and offset {offset} > 0 cannot"
            " continue it; send offset 0 (or none) to start it again",
            session_id=session_id, position=0,
        )
    retry = offset is not None and offset != session.position and offset == session.last_offset
    if retry and session.fingerprint == fingerprint(session.last_offset, horizon, values, extras):
        return Replay(session.answer)  # whatever version answered it: nothing is computed
    if session.model_version != model_version:
        return StaleModel(
            f"session {session_id!r} was built with model {session.model_version}, the service now runs"
            f" {model_version}; reset the session to continue",
            session_id=session_id, position=session.position, model_version=model_version,
        )
    if offset is None or offset == session.position:
        return Apply(start=session.position, created=False)
    if retry:
        detail = (f"a different chunk (other values, horizon, levels or scores) was applied at offset {offset} of"
                  f" session {session_id!r}, now at position {session.position}; this is not a retry of it: send the"
                  f" next chunk from offset {session.position}, or reset the session")
    else:
        detail = (f"offset {offset} does not match session {session_id!r} at position {session.position}; resend"
                  f" from offset {session.position}")
    return OffsetMismatch(detail, session_id=session_id, position=session.position)
