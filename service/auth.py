"""Tenants: who is calling. Without API keys every caller is the one tenant ``default``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

DEFAULT_TENANT = "default"


def get_tenant(request: Request) -> str:
    return getattr(request.state, "tenant", DEFAULT_TENANT)


TenantDep = Annotated[str, Depends(get_tenant)]
