"""The offset rules (README "Offsets, retries and sessions") as a table: ``rules.judge`` alone, no server.

One live session stands at position 10 after a chunk of 4 steps applied at offset 6 with horizon 2; each row
is a call on it (or on no session, or on one a reset left at 0) and the verdict the rules give.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest

from service.refusals import OffsetMismatch, Refusal, StaleModel, UnknownSession
from service.rules import Apply, Replay, Verdict, fingerprint, judge
from service.sessions.base import Session

KEY, SESSION_ID = "tenant/pump", "pump"
MODEL = "v1"
LAST = np.array([[0.1], [0.2], [0.3], [0.4]], dtype=np.float32)  # the last applied chunk
LAST_OFFSET, LAST_HORIZON, POSITION = 6, 2, 10
ANSWER = b'{"position":10,"created":false}'


def _live(model_version: str = MODEL) -> Session:
    return Session(KEY, POSITION, model_version, revision=3, created_at=1.0, updated_at=2.0,
                   last_offset=LAST_OFFSET, fingerprint=fingerprint(LAST_OFFSET, LAST_HORIZON, LAST), answer=ANSWER)


def _reset() -> Session:
    """What a reset leaves: position 0, no chunk applied yet."""
    return Session(KEY, 0, MODEL, revision=4, created_at=1.0, updated_at=2.0)


class Case(NamedTuple):
    session: Session | None
    offset: int | None
    expected: Verdict | tuple[type[Refusal], dict[str, object]]  # a refusal: its class and extension members
    values: np.ndarray = LAST
    horizon: int = LAST_HORIZON


MISMATCH = (OffsetMismatch, {"session_id": SESSION_ID, "position": POSITION})
STALE = (StaleModel, {"session_id": SESSION_ID, "position": POSITION, "model_version": MODEL})
OTHER_VALUES = LAST + np.float32(0.5)

CASES = {
    # an unknown session: created by offset None or 0, otherwise 404
    "unknown session, no offset: created at 0": Case(None, None, Apply(start=0, created=True)),
    "unknown session, offset 0: created at 0": Case(None, 0, Apply(start=0, created=True)),
    "unknown session, offset > 0: unknown, at 0": Case(None, 3, (UnknownSession, {"session_id": SESSION_ID,
                                                                                   "position": 0})),
    # a live session
    "no offset: appended at the position": Case(_live(), None, Apply(start=POSITION, created=False)),
    "offset == position: applied there": Case(_live(), POSITION, Apply(start=POSITION, created=False)),
    "reset session, offset 0: applied, not created": Case(_reset(), 0, Apply(start=0, created=False)),
    "reset session, no offset: appended at 0": Case(_reset(), None, Apply(start=0, created=False)),
    "exact retry of the last chunk: its answer again": Case(_live(), LAST_OFFSET, Replay(ANSWER)),
    "last offset, other values": Case(_live(), LAST_OFFSET, MISMATCH, values=OTHER_VALUES),
    "last offset, one value changed": Case(_live(), LAST_OFFSET, MISMATCH,
                                           values=np.array([[0.1], [0.2], [0.3], [0.5]], dtype=np.float32)),
    "last offset, a prefix of the values": Case(_live(), LAST_OFFSET, MISMATCH, values=LAST[:3]),
    "last offset, other horizon": Case(_live(), LAST_OFFSET, MISMATCH, horizon=0),
    "last offset, same numbers in another shape": Case(_live(), LAST_OFFSET, MISMATCH, values=LAST.reshape(2, 2)),
    "offset beyond the position": Case(_live(), POSITION + 1, MISMATCH),
    "offset between the last offset and the position": Case(_live(), LAST_OFFSET + 2, MISMATCH),
    "offset below the last offset": Case(_live(), LAST_OFFSET - 1, MISMATCH),
    "offset 0 on a live session": Case(_live(), 0, MISMATCH),
    "offset > 0 on a reset session": Case(_reset(), 4, (OffsetMismatch, {"session_id": SESSION_ID,
                                                                           "position": 0})),
    # a session another model version built: refused whatever the offset, but an exact retry (its answer is
    # kept: no model computes it, and a client that lost it must be able to get it)
    "other model, no offset": Case(_live("v0"), None, STALE),
    "other model, offset == position": Case(_live("v0"), POSITION, STALE),
    "other model, exact retry: its answer again": Case(_live("v0"), LAST_OFFSET, Replay(ANSWER)),
    "other model, last offset, other values": Case(_live("v0"), LAST_OFFSET, STALE, values=OTHER_VALUES),
    "other model, wrong offset": Case(_live("v0"), POSITION + 5, STALE),
}


def _outcome(verdict: Verdict) -> Verdict | tuple[type[Refusal], dict[str, object]]:
    return (type(verdict), verdict.extra) if isinstance(verdict, Refusal) else verdict


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_judge_gives_each_offset_case_its_verdict(case: Case) -> None:
    verdict = judge(KEY, case.offset, case.horizon, case.values, case.session, MODEL)
    assert _outcome(verdict) == case.expected


@pytest.mark.parametrize(("session", "offset", "says"), [
    (_live(), POSITION + 1, f"resend from offset {POSITION}"),
    (None, 3, "send offset 0 (or none) to start it again"),
    (_live("v0"), POSITION, f"built with model v0, the service now runs {MODEL}; reset the session to continue"),
], ids=["offset mismatch", "unknown session", "other model"])
def test_each_refusal_says_how_to_go_on(session: Session | None, offset: int, says: str) -> None:
    verdict = judge(KEY, offset, LAST_HORIZON, LAST, session, MODEL)
    assert isinstance(verdict, Refusal) and repr(SESSION_ID) in verdict.detail and says in verdict.detail


def test_judge_changes_nothing_in_the_session() -> None:
    """The verdict is all it gives: the engine commits, the rules only read."""
    session = _live()
    before = (session.position, session.last_offset, session.fingerprint, session.answer, session.revision)
    for case in CASES.values():
        judge(KEY, case.offset, case.horizon, case.values, session, MODEL)
    assert (session.position, session.last_offset, session.fingerprint, session.answer, session.revision) == before


# -- the fingerprint: what makes two chunks "the same chunk" -------------------------------------------------

BASE = fingerprint(LAST_OFFSET, LAST_HORIZON, LAST)

CHANGED = {
    "another offset": (LAST_OFFSET + 1, LAST_HORIZON, LAST),
    "another horizon": (LAST_OFFSET, LAST_HORIZON + 1, LAST),
    "one value one float32 step away": (LAST_OFFSET, LAST_HORIZON,
                                        np.nextafter(LAST, np.float32(1), dtype=np.float32)),
    "the values in another order": (LAST_OFFSET, LAST_HORIZON, LAST[::-1]),
    "a prefix": (LAST_OFFSET, LAST_HORIZON, LAST[:3]),
    "the same numbers as 2x2": (LAST_OFFSET, LAST_HORIZON, LAST.reshape(2, 2)),
    "the same numbers as 1x4": (LAST_OFFSET, LAST_HORIZON, LAST.reshape(1, 4)),
}


@pytest.mark.parametrize(("offset", "horizon", "values"), CHANGED.values(), ids=CHANGED.keys())
def test_fingerprint_changes_with_offset_horizon_each_value_and_shape(
    offset: int, horizon: int, values: np.ndarray
) -> None:
    assert fingerprint(offset, horizon, values) != BASE


def test_fingerprint_tells_negative_zero_from_zero() -> None:
    """It hashes the float32 bytes: -0.0 and 0.0 compare equal but are not the same chunk."""
    zero = np.zeros((2, 1), dtype=np.float32)
    assert fingerprint(0, 0, zero) != fingerprint(0, 0, -zero)


SAME = {
    "a copy": LAST.copy(),
    "float64 of the same float32 values": LAST.astype(np.float64),
    "a strided view of the same values": np.repeat(LAST, 2, axis=0)[::2],
}


@pytest.mark.parametrize("values", SAME.values(), ids=SAME.keys())
def test_fingerprint_is_the_same_for_the_same_float32_chunk(values: np.ndarray) -> None:
    assert fingerprint(LAST_OFFSET, LAST_HORIZON, values) == BASE
    assert len(BASE) == 16
