"""create_app(settings) -> FastAPI: wiring only (model, store, engine, routers, middleware, handlers)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import logging
from collections.abc import AsyncIterator
from typing import Any

import torch
from fastapi import FastAPI

from service import auth, problems
from service.api import docs, health, hot, state, stream, v1, v2
from service.api import repository as repository_api
from service.api.openapi import Limits, document_raw_routes
from service.api.stream import Streams
from service.config import Settings
from service.metrics import Metrics
from service.middleware import BodyLimit, ContentEncoding, HeadAsGet, Observability, RouteTemplates, ServerErrors
from service.models import Registry
from service.repository import Repository
from service.snapshots import ModelSnapshots

log = logging.getLogger("service")

# FastAPI 0.16x asks OpenTelemetry for its providers on every request (environment lookups each time, about
# a tenth of the hot path's CPU); this service exports its own Prometheus metrics, so where FastAPI has the
# option, its built-in telemetry is off.
_WITHOUT_FASTAPI_TELEMETRY: dict[str, Any] = (
    {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters
    else {}
)


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("GRU_DEVICE=cuda but torch sees no CUDA device; use auto or cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


async def _sweep_forever(registry: Registry, every: float) -> None:
    """Expire idle sessions of stores without their own expiry (Redis has TTLs), then drain: a version
    whose last session expired is unloaded."""
    while True:
        await asyncio.sleep(every)
        for model in list(registry.models.values()):
            sweep = getattr(model.raw_store, "sweep", None)
            if sweep is not None:
                sweep()
        await registry.refresh_counts()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    torch.set_num_threads(settings.intra_op_threads)
    device = resolve_device(settings.device)
    metrics = Metrics()
    on_skip = lambda model, version: metrics.versions_skipped.labels(model=model).inc()  # noqa: E731
    repository = (Repository(root=settings.model_repository, on_skip=on_skip) if settings.model_repository
                  else Repository(single=settings.model_path, on_skip=on_skip))
    registry = Registry(settings, repository, device, metrics)
    registry.open()
    snapshots = ModelSnapshots(settings, registry)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if snapshots.enabled:  # restored before the first request
            await snapshots.start()
        await registry.start()
        sweeper = asyncio.create_task(_sweep_forever(registry, min(settings.session_ttl_seconds / 4, 10.0)))
        # Everything imported and loaded so far (torch, FastAPI, pydantic: ~200k objects) lives as long as the
        # process; left to the collector, each full collection walked them all for nothing, 100-300 ms
        # whole-process stalls that made the p99. Frozen, they are never scanned again.
        gc.collect()
        gc.freeze()
        log.info("serving", extra={"fields": {"models": sorted(registry.models), "default": registry.default,
                                              "version": registry.default_model.engine.model_version,
                                              "device": str(device), "store": settings.store}})
        try:
            yield
        finally:
            sweeper.cancel()
            # uvicorn answered every in-flight request; the engines drain what is left, then the snapshot
            # (after the drain: every answered chunk is in it), then the stores close.
            await registry.stop(before_close=snapshots.stop if snapshots.enabled else None)

    app = FastAPI(
        **_WITHOUT_FASTAPI_TELEMETRY,
        title="GRU sequence-prediction service",
        version="1.0",
        summary="Stream a time series in chunks; the service keeps each session's GRU state between calls.",
        lifespan=lifespan,
        redirect_slashes=False,  # /v1/predict/batch/ is a 404 problem, as on the hot routes, not an empty 307
        docs_url=None,  # FastAPI's /docs loads Swagger UI from a CDN: service.api.docs serves it from a package
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.snapshots = snapshots  # an unloaded model's file goes with its sessions (service.api.repository)
    app.include_router(v1.router)
    app.include_router(v1.model_router)
    app.include_router(state.router)
    app.include_router(state.model_router)
    limits = Limits(steps=settings.max_chunk_steps, horizon=settings.max_horizon, items=v1.batch_items_limit(settings),
                    features=registry.default_model.engine.forecaster.num_features)
    document_raw_routes(app, hot.OPERATIONS, [*v1.RAW_BODY_MODELS, *state.RAW_BODY_MODELS], limits)
    app.include_router(repository_api.router)  # before v2's catch-all for unserved /v2 paths
    app.include_router(v2.router)
    app.include_router(health.router)
    docs.install(app)
    problems.install(app)
    streams = Streams(settings, metrics)
    app.state.streams = streams  # drained by service.__main__ on SIGTERM, before uvicorn closes connections
    # innermost: the predict routes and the streams skip FastAPI's per-request machinery
    app.add_middleware(hot.HotRoutes, streams=streams, patience=settings.queue_patience_seconds)
    app.add_middleware(HeadAsGet)
    app.add_middleware(ContentEncoding, max_body_bytes=settings.max_body_bytes)  # inside the limit on the wire
    app.add_middleware(BodyLimit, max_body_bytes=settings.max_body_bytes,
                       body_timeout_seconds=settings.request_timeout_seconds)
    auth.install(app, settings)  # inside Observability, so refusals are counted and logged
    app.add_middleware(ServerErrors)  # inside Observability, so the 500/503/499 it answers are counted
    templates = [*app.openapi()["paths"], *docs.PATHS, *(url for url in (app.openapi_url, app.redoc_url) if url),
                 *(route.path for route in stream.ROUTES)]  # not in OpenAPI, which has no WebSockets
    app.add_middleware(Observability, metrics=metrics, templates=RouteTemplates(templates))
    return app
