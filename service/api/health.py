"""Liveness, readiness and metrics: open to probes and scrapers (/metrics unless GRU_METRICS_REQUIRE_KEY)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import EngineDep
from service.api.openapi import problem_responses
from service.engine import Engine
from service.problems import Problem

router = APIRouter(tags=["operations"])


async def require_ready(engine: Engine, **extra: Any) -> None:
    """Readiness, for /readyz and v2's /health/ready alike: the model is loaded by the time anything is
    served, so what can fail is the session store."""
    if not await engine.store.ping():
        raise Problem(503, "not-ready", "the session store is unreachable", headers={"Retry-After": "2"}, **extra)


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: model loaded and session store reachable",
            responses=problem_responses(503))
async def readyz(engine: EngineDep) -> dict[str, str]:
    await require_ready(engine)
    return {"status": "ready", "model_version": engine.model_version}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
