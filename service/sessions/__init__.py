"""Session stores behind one protocol (see base.py)."""

from __future__ import annotations

import contextlib

import torch

from service.config import Settings
from service.metrics import Metrics
from service.sessions.base import SessionStore
from service.sessions.memory import MemoryStore


def build_store(settings: Settings, state_size: int, device: torch.device, metrics: Metrics,
                namespace: str = "") -> SessionStore:
    """The store GRU_STORE names, wired to the eviction metrics; ``namespace`` keeps a non-default model's
    Redis keys apart (a memory store is one model's already)."""
    if settings.store == "memory":
        store = MemoryStore(
            state_size, device, settings.max_sessions, settings.session_ttl_seconds,
            on_evict=lambda reason, count: metrics.evictions.labels(reason=reason).inc(count),
            max_answer_bytes=settings.max_answer_bytes, tenant_max_sessions=settings.tenant_max_sessions,
            tenant_max_answer_bytes=settings.tenant_max_answer_bytes,
        )
        return store
    if settings.store == "redis":
        # Imported here so the memory store never needs the redis package.
        try:
            from service.sessions.redis import RedisStore
        except ImportError as exc:
            raise RuntimeError(f"GRU_STORE=redis needs the redis package ({exc}); pip install"
                               " 'gru-service[redis]'") from exc
        # The sessions live in Redis, shared by every replica, which expires and evicts them itself: this
        # replica has no count to give, and a gauge stuck at 0 would read as "no sessions" on a dashboard.
        for shared in (metrics.active_sessions, metrics.evictions):
            with contextlib.suppress(KeyError):  # the second model's store: already gone
                metrics.registry.unregister(shared)
        return RedisStore(settings.redis_url, state_size, settings.session_ttl_seconds, namespace=namespace)
    raise ValueError(f"GRU_STORE={settings.store!r} is not available in this build")
