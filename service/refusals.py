"""What the engine and the offset rules refuse, named by class and free of HTTP.

The engine and ``service.rules`` raise (or return) these; ``service.problems`` holds the one table that
gives each its HTTP status and turns it into ``application/problem+json``. ``kind`` becomes the problem's
``type``; ``extra`` its extension members (``position``, ``session_id``, ...); ``retry_after`` its
``Retry-After`` header, in seconds.
"""

from __future__ import annotations

from typing import Any, ClassVar


class Refusal(Exception):
    """A chunk or call the service will not carry out; nothing was changed."""

    kind: ClassVar[str]

    def __init__(self, detail: str, *, retry_after: int | None = None, **extra: Any):
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after
        self.extra = extra


class UnknownSession(Refusal):
    """The session does not exist (expired, deleted, never created) and the call cannot create it."""

    kind = "session-not-found"

    @classmethod
    def gone(cls, session_id: str) -> UnknownSession:
        """The refusal of a call on a session that is not there (expired, deleted, never created)."""
        return cls(f"session {session_id!r} does not exist (expired, deleted or never created)",
                   session_id=session_id)


class StaleModel(Refusal):
    """The session's state was built by another model version than the one now served."""

    kind = "model-changed"


class OffsetMismatch(Refusal):
    """The chunk's offset is neither the session's position nor an exact retry of its last chunk."""

    kind = "offset-mismatch"


class SessionExists(Refusal):
    """A fork's target session exists already; nothing was changed."""

    kind = "session-exists"


class PreconditionFailed(Refusal):
    """An import's ``If-Match`` or ``If-None-Match`` does not hold for the session as it is now."""

    kind = "precondition-failed"


class OutOfRange(Refusal):
    """The chunk is valid float32, but the model's outputs or state from it are not finite (values far
    outside what the model was trained on): answering would mean nulls, and saving would poison the state."""

    kind = "out-of-range"


class ShuttingDown(Refusal):
    kind = "shutting-down"


class Overloaded(Refusal):
    """The queue is full (GRU_MAX_QUEUE), or a session changed too often to be replaced by an import now."""

    kind = "overloaded"


class TimedOut(Refusal):
    """The chunk was not answered within GRU_REQUEST_TIMEOUT_SECONDS. It is then not applied, unless its
    commit was already under way (a retry with the same offset gets that answer)."""

    kind = "timeout"


class VersionNotLoaded(Refusal):
    """The session is on a model version this replica has not loaded yet (another replica polled the
    repository first and moved it there, or had not polled yet and started it on a version drained here):
    retried after this replica's next poll, or on another replica, it goes on there."""

    kind = "version-not-loaded"


class StoreUnreachable(Refusal):
    kind = "store-unavailable"


class BatchFailed(Refusal):
    """The model raised on a batch (logged); its chunks were not applied."""

    kind = "internal-error"
