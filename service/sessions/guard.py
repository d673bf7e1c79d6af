"""GuardedStore: a session store that knows when it is down.

It wraps a real store and implements the same protocol. A failed call is counted (``gru_store_errors_total``
by operation) and declares an outage: until a ping answers, every call is refused at once with
``StoreUnreachable`` (503) instead of waiting out the store's timeouts (a hung Redis held each batch,
stateless chunks included, for 8 to 24 s). A probe pings every ``STORE_PROBE_SECONDS`` meanwhile, and a ping
from ``/readyz`` ends the outage too, so readiness and serving agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from torch import Tensor

from service.metrics import Metrics
from service.refusals import StoreUnreachable
from service.sessions.base import Ended, Revision, Session, SessionStore, StoreUnavailable, Write

STORE_PROBE_SECONDS = 0.5  # while the store is down, how often it is pinged
log = logging.getLogger("service.store")
_T = TypeVar("_T")


class GuardedStore:
    def __init__(self, store: SessionStore, metrics: Metrics):
        self.inner = store
        self._metrics = metrics
        self._down: StoreUnavailable | None = None  # set from a store failure until a ping answers
        self._probe: asyncio.Task[None] | None = None

    @property
    def ttl_seconds(self) -> float:
        return self.inner.ttl_seconds

    async def load(self, keys: Sequence[str]) -> list[Session | None]:
        return await self._call(self.inner.load(keys), "load")

    async def peek(self, key: str) -> Session | None:
        return await self._call(self.inner.peek(key), "peek")

    def gather(self, sessions: Sequence[Session | None], device: Any) -> Tensor:
        return self.inner.gather(sessions, device)

    async def commit(self, writes: Sequence[Write], states: Tensor) -> list[Session | None]:
        return await self._call(self.inner.commit(writes, states), "commit")

    async def get(self, key: str) -> Session | None:
        return await self._call(self.inner.get(key), "get")

    async def delete(self, key: str, revision: Revision | None = None) -> bool:
        return await self._call(self.inner.delete(key, revision), "delete")

    async def end(self, key: str, revision: Revision) -> bool:
        return await self._call(self.inner.end(key, revision), "delete")

    async def ended(self, key: str) -> Ended | None:
        return await self._call(self.inner.ended(key), "get")

    async def reset(self, key: str, model_version: str) -> tuple[Session, bool]:
        return await self._call(self.inner.reset(key, model_version), "reset")

    async def version_counts(self, tenant: str | None = None) -> dict[str, int]:
        return await self._call(self.inner.version_counts(tenant), "count")

    async def ping(self) -> bool:
        """An answer ends an outage; a failure is counted, so an outage shows in the store error rate
        throughout, not only at its first failed call."""
        if await self.inner.ping():
            if self._down is not None:
                log.info("session store reachable again")
            self._down = None
            return True
        self._metrics.store_errors.labels(operation="ping").inc()
        return False

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self.inner.close()

    async def _call(self, call: Coroutine[Any, Any, _T], operation: str) -> _T:
        if self._down is not None:
            call.close()  # never awaited: the outage answers for it
            raise _unreachable(self._down)
        try:
            return await call
        except StoreUnavailable as exc:
            self._metrics.store_errors.labels(operation=operation).inc()
            if self._down is None:  # the outage's cause, once: the clients' 503 does not name the store's address
                log.warning("session store unreachable; session calls get 503 until a ping answers: %s", exc)
            self._down = exc
            if self._probe is None or self._probe.done():
                self._probe = asyncio.create_task(self._await_store(), name="gru-store-probe")
            raise _unreachable(exc) from exc

    async def _await_store(self) -> None:
        while self._down is not None and not await self.ping():
            await asyncio.sleep(STORE_PROBE_SECONDS)


def _unreachable(exc: StoreUnavailable) -> StoreUnreachable:
    return StoreUnreachable(f"the session store is unreachable ({exc.reason}); nothing was changed, retry shortly",
                            retry_after=2)
