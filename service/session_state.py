"""A session's state as a first-class object: export it, import it (create or replace), fork it, delete it
under a precondition.

Export reads the record and its state vector in one ``peek`` at the store, which unlike a chunk's load is
no use of the session (a backup job's exports keep no session alive); import and fork write with the
store's compare-and-set, so they take their place between a session's chunks like any chunk does: a chunk
judged against the record an import replaced loses its commit and is judged again against the new one.
A conditional delete (``If-Match``, ``If-None-Match``) deletes at the revision its tag was compared at only.
Preconditions (``If-Match``, ``If-None-Match``) compare entity tags computed from the whole document
(``StateDocument.tag``), so they hold for a memory store whose revisions are a counter that starts again
with the process. No HTTP here: the routes (``service.api.state``) parse and answer.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from service.models import LoadedVersion, ServedModel
from service.refusals import Overloaded, PreconditionFailed, SessionExists, StaleModel, UnknownSession
from service.sessions.base import Revision, Session, SessionStore, Write, session_id_of
from service.sessions.document import DocumentError, StateDocument

MAX_ATTEMPTS = 8  # an import or a delete losing its write this often in a row: the session is too busy now
_T = TypeVar("_T")
_Current = tuple[Session, np.ndarray | None]  # a session's record and its (S,) state (None: not this model's)
UNREADABLE_TAG = "(none: another model's state)"


@dataclass(frozen=True, slots=True)
class Precondition:
    """Entity tags of ``If-Match`` and ``If-None-Match`` (``"*"``: any existing session); None: no header."""

    if_match: Sequence[str] | None = None
    if_none_match: Sequence[str] | None = None

    def holds(self, current: str | None) -> bool:
        """Whether it holds for the session whose tag is ``current`` (None: no such session)."""
        if self.if_match is not None and (current is None or not {"*", current} & set(self.if_match)):
            return False
        return self.if_none_match is None or current is None or not {"*", current} & set(self.if_none_match)

    @property
    def unconditional(self) -> bool:
        """Neither header was sent: the request is unconditional."""
        return self.if_match is None and self.if_none_match is None

    def named(self) -> str:
        """The headers sent, as a refusal names them ("If-Match", "If-None-Match" or both)."""
        sent = [name for name, tags in (("If-Match", self.if_match), ("If-None-Match", self.if_none_match))
                if tags is not None]
        return " / ".join(sent)


@dataclass(frozen=True, slots=True)
class Written:
    """A session as an import or a fork left it: its record, whether it is new, its entity tag."""

    session: Session
    created: bool
    tag: str


class SessionStates:
    """Export, import, fork and a conditional delete over one model's (guarded) store; a state belongs to the
    version that built it, which must be loaded for an import."""

    def __init__(self, model: ServedModel, max_answer_bytes: int | None = None):
        self.model = model
        self.store: SessionStore = model.store
        self.state_size = model.state_size
        self.device = model.engine.device
        # The most one session's kept answer may hold: a memory store's answer budget, its tenant's where it
        # has one. A chunk's answer is bounded by the chunk limits; an imported one only by the body limit,
        # and kept alone over the budget it made the store evict other tenants' sessions for it.
        self.max_answer_bytes = max_answer_bytes

    async def export(self, key: str) -> StateDocument:
        """The session as a document; ``UnknownSession`` when there is none."""
        document = await self._current(key)
        if document is None:
            raise UnknownSession.gone(session_id_of(key))
        return document

    async def put(self, key: str, document: StateDocument, precondition: Precondition) -> Written:
        """Create or replace the session at ``key`` with ``document``. ``StaleModel`` for a document of
        another model version; ``PreconditionFailed`` when the precondition does not hold (the commit checks
        again, atomically, that nothing changed since)."""
        with self._writing(key, document):
            return await self._put(key, document, precondition)

    @contextmanager
    def _writing(self, key: str, document: StateDocument) -> Iterator[None]:
        """A write of ``document`` (an import's, or a fork's of its parent ``key``) under way: ``StaleModel``
        unless its version is loaded, as a session of any other could never be continued here; then the drain
        keeps that version (its count of sessions may miss the one written)."""
        version = self.require_loaded(key, document.model_version, document.position)
        version.importing += 1  # with no await since the check: the drain keeps the version from here on
        try:
            yield
        finally:
            version.importing -= 1
            version.imported += 1

    async def _put(self, key: str, document: StateDocument, precondition: Precondition) -> Written:
        async def write(current: _Current | None) -> Written | None:
            return await self._write(key, document, current[0].revision if current is not None else None)

        return await self._compare_and_set(key, precondition, "the If-Match / If-None-Match of this import",
                                           "replaced", write)

    async def delete(self, key: str, precondition: Precondition) -> None:
        """Delete the session at ``key`` if the precondition (a DELETE's ``If-Match`` and ``If-None-Match``)
        holds for it; ``PreconditionFailed`` when it does not, as for an absent session under If-Match: no
        tag matches one. The store deletes only at the revision the tag was compared at."""
        async def delete(current: _Current | None) -> bool | None:
            if current is None:  # no If-Match to fail for no session (If-None-Match holds): nothing to delete
                raise UnknownSession.gone(session_id_of(key))
            return await self.store.delete(key, current[0].revision) or None

        await self._compare_and_set(key, precondition, f"the {precondition.named()} of this delete", "deleted",
                                    delete)

    async def _compare_and_set(self, key: str, precondition: Precondition, what: str, doing: str,
                               attempt: Callable[[_Current | None], Awaitable[_T | None]]) -> _T:
        """``attempt`` at the session as it is now, when ``precondition`` holds for it (``PreconditionFailed``,
        naming the tag it is at or that it is absent, when it does not); ``attempt`` writes at the revision
        read and gives None when it lost to a write since. Then the session is judged again as it is now, the
        precondition too (a tag it was at no longer holds; ``*`` holds while the session exists, whatever its
        chunks), at most MAX_ATTEMPTS times: then it is too busy (429)."""
        for _ in range(MAX_ATTEMPTS):
            current = await self._current_record(key)
            tag = self._tag(*current) if current is not None else None
            if not precondition.holds(tag):
                raise PreconditionFailed(
                    f"session {session_id_of(key)!r} is {'at entity tag ' + tag if tag else 'absent'}, which"
                    f" {what} excludes; nothing was changed", session_id=session_id_of(key))
            if (done := await attempt(current)) is not None:
                return done
        raise Overloaded(f"session {session_id_of(key)!r} changed {MAX_ATTEMPTS} times while it was being"
                         f" {doing}; nothing was changed, retry", retry_after=1)

    def require_loaded(self, key: str, model_version: str, position: int | None = None) -> LoadedVersion:
        """The loaded version of this model with ``model_version``; ``StaleModel`` when none is: a state of
        another model, or of a version no longer loaded, means nothing here."""
        version = self.model.by_hash(model_version)
        if version is None:
            newest = self.model.engine.model_version
            raise StaleModel(
                f"the state was built with model {model_version!r:.80}, which is not a loaded version of"
                f" {self.model.name!r} (newest {newest}); a state of one model means nothing to another",
                session_id=session_id_of(key), model_version=newest,
                **({"position": position} if position is not None else {}),
            )
        return version

    def check(self, document: StateDocument) -> None:
        """``DocumentError`` when the document's state is one its version could never have written (see
        ``Forecaster.unreachable``); a version not loaded is ``put``'s to refuse."""
        loaded = self.model.by_hash(document.model_version)
        why = None if loaded is None else loaded.engine.forecaster.unreachable(document.state, document.position)
        if why is not None:
            raise DocumentError(why)

    async def fork(self, key: str, to: str) -> Written:
        """A new session ``to`` with the state and position of ``key``; ``SessionExists`` when ``to`` exists,
        ``StaleModel`` when ``key``'s version is not loaded (as for an import of it)."""
        parent = await self.export(key)
        target = session_id_of(to)
        refusal = SessionExists(f"session {target!r} exists; fork to a new id, or delete it first",
                                session_id=target)
        with self._writing(key, parent):
            if await self.store.get(to) is not None:
                raise refusal
            written = await self._write(to, parent, None)
        if written is None:  # created in between
            raise refusal
        return written

    async def _current_record(self, key: str) -> _Current | None:
        """The record and its (S,) state; the state None where another model wrote it in another size (a
        replica of that model sharing the store, as in a rolling update): it is not this model's to read."""
        session = await self.store.peek(key)  # a read, no use: it keeps no session alive
        if session is None:
            return None
        try:
            state = self.store.gather([session], self.device)[0].cpu().numpy()  # (S,)
        except ValueError:
            if self.model.by_hash(session.model_version) is not None:
                raise
            return session, None
        return session, state

    async def _current(self, key: str) -> StateDocument | None:
        current = await self._current_record(key)
        if current is None:
            return None
        session, state = current
        if state is None:
            raise StaleModel(
                f"session {session_id_of(key)!r} was built with model {session.model_version}, whose state this"
                f" service (model {self.model.engine.model_version}) cannot read; export it where that model runs",
                session_id=session_id_of(key), position=session.position,
                model_version=self.model.engine.model_version,
            )
        return self._document(session, state)

    def _tag(self, session: Session, state: np.ndarray | None) -> str:
        """The session's entity tag; for a state this model cannot read, one that no quoted tag equals (only
        ``If-Match: *`` holds for it)."""
        return self._document(session, state).tag() if state is not None else UNREADABLE_TAG

    def _document(self, session: Session, state: np.ndarray) -> StateDocument:
        return StateDocument(
            session_id=session_id_of(session.key), model_name=self.model.name, model_version=session.model_version,
            position=session.position, last_offset=session.last_offset, fingerprint=session.fingerprint,
            answer=session.answer, created_at=session.created_at, updated_at=session.updated_at,
            state=state,
        )

    async def _write(self, key: str, document: StateDocument, expected: Revision | None) -> Written | None:
        """Compare-and-set ``document`` at ``key`` (``expected``: the revision replaced; None: must not exist)."""
        document = document.renamed(session_id_of(key))
        write = Write(key=key, expected_revision=expected, position=document.position,
                      model_version=document.model_version, last_offset=document.last_offset,
                      fingerprint=document.fingerprint, answer=document.answer, row=0)
        session, = await self.store.commit([write], torch.from_numpy(document.state.copy()).view(1, -1))
        if session is None:
            return None
        return Written(session, expected is None, self._document(session, document.state).tag())
