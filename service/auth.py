"""API keys and tenants: who is calling, decided before any route runs.

Without keys (``GRU_API_KEYS`` and ``GRU_API_KEYS_FILE`` unset) nothing is checked and every caller is the
one tenant ``default``. With keys, every request needs ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``,
except the open operational paths (/healthz, /readyz, /docs, /openapi.json, and /metrics unless
``GRU_METRICS_REQUIRE_KEY``); otherwise 401 problem+json with ``WWW-Authenticate: Bearer realm="gru"``.
The key's tenant goes to ``scope["state"]["tenant"]`` (what ``request.state.tenant`` reads), and every
session key is qualified by it (``service.sessions.base.session_key``): two tenants using the same session
id never see, reset or delete each other's state, in any store.

Why this shape:

- A pure ASGI middleware, not a dependency on each router: one check per request ahead of routing, so no
  route (v1, v2, one added later) can forget it, and unauthenticated callers learn nothing about which
  routes exist. Deny by default: only the listed open paths skip the check, so a new route is protected
  without anyone remembering to protect it, and a mistake here fails closed.
- Keys are compared as SHA-256 digests with ``hmac.compare_digest`` against *every* configured key, no
  early exit: how long a check takes says nothing about which key, or how much of one, matched, nor about
  the keys' lengths.
- Keys never reach a log line or an error message: configuration errors name the entry's position, not
  its text, and the access log records route templates, never headers.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, Request
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from service.api import docs
from service.http_fields import send_problem
from service.problems import PROBLEM_JSON, Problem, route_path

if TYPE_CHECKING:
    from service.config import Settings

DEFAULT_TENANT = "default"
REALM = 'Bearer realm="gru"'
WEAK_KEY_LENGTH = 16  # shorter keys start the service with a warning
log = logging.getLogger("service.auth")


def tenant_of(request: HTTPConnection) -> str:
    """The caller's tenant (of a request or a WebSocket), set by the auth middleware (the one tenant when no
    keys are configured)."""
    # Read where ApiKeyAuth writes it: request.state would raise and catch AttributeError on every keyless call.
    return request.scope.get("state", {}).get("tenant", DEFAULT_TENANT)


async def get_tenant(request: Request) -> str:
    return tenant_of(request)


TenantDep = Annotated[str, Depends(get_tenant)]


# -- the check on every request ---------------------------------------------------------------------------


class KeyRing:
    """Tenant by key, matched in constant time: only digests are kept, every one is compared. ``admin``
    keys (GRU_ADMIN_KEYS) are keys too, and also open the model repository API."""

    def __init__(self, keys: Mapping[str, str], admin: Mapping[str, str] | None = None):
        admin = admin or {}
        self._entries = [(hashlib.sha256(key.encode()).digest(), tenant, key in admin)
                         for key, tenant in {**keys, **admin}.items()]

    def lookup(self, presented: bytes) -> tuple[str, bool] | None:
        """(tenant, whether the key is an admin key), or None for an unknown key."""
        digest = hashlib.sha256(presented).digest()  # fixed length: compare_digest then leaks no lengths
        found = None
        for known, tenant, admin in self._entries:  # no break: the time is the same wherever the match is
            if hmac.compare_digest(digest, known):
                found = (tenant, admin)
        return found

    def tenant(self, presented: bytes) -> str | None:
        found = self.lookup(presented)
        return found[0] if found is not None else None


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The key a request carries: ``Authorization: Bearer KEY``, else ``X-API-Key: KEY``; None if neither."""
    api_key = None
    for name, value in headers:
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            token = value[7:].strip()
            if token:
                return token
        elif name == b"x-api-key" and api_key is None:
            api_key = value.strip() or None
    return api_key


def _refusal(missing: bool) -> Problem:
    if missing:
        detail = "this endpoint needs an API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
        challenge = REALM
    else:
        detail = "the API key is not valid; check it, or ask the operator for one"
        challenge = REALM + ', error="invalid_token"'  # RFC 6750 §3
    return Problem(401, "unauthorized", detail, headers={"WWW-Authenticate": challenge})


class ApiKeyAuth:
    """Pure ASGI: checks the key of every request but the open paths, and puts its tenant in the scope."""

    def __init__(self, app: ASGIApp, keys: KeyRing, open_paths: frozenset[str]):
        self.app = app
        self.keys = keys
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        if path in self.open_paths:
            await self.app(scope, receive, send)
            return
        presented = presented_key(scope["headers"])
        found = self.keys.lookup(presented) if presented is not None else None
        if found is None:  # a WebSocket upgrade gets the same 401 (service.http_fields.send_problem)
            await send_problem(_refusal(missing=presented is None), scope, send)
            return
        state = scope.setdefault("state", {})
        state["tenant"], state["admin"] = found
        await self.app(scope, receive, send)


# -- wiring -----------------------------------------------------------------------------------------------

_SECURITY_SCHEMES = {
    "bearerAuth": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer KEY"},
    "apiKeyAuth": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "X-API-Key: KEY"},
}


def _document(app: FastAPI, open_paths: frozenset[str]) -> None:
    """Show the schemes in OpenAPI (so /docs has an Authorize button) and a 401 on each guarded operation."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {}).update(_SECURITY_SCHEMES)
        problem = ({"$ref": "#/components/schemas/Problem"} if "Problem" in components.get("schemas", {})
                   else {"type": "object"})
        unauthorized = {
            "description": "No API key, or not a valid one",
            "headers": {"WWW-Authenticate": {"schema": {"type": "string"}, "description": REALM}},
            "content": {PROBLEM_JSON: {"schema": problem}},
        }
        for path, operations in schema.get("paths", {}).items():
            if path in open_paths:
                continue
            for operation in operations.values():
                operation["security"] = [{"bearerAuth": []}, {"apiKeyAuth": []}]  # either one
                operation.setdefault("responses", {}).setdefault("401", unauthorized)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def is_admin(request: Request) -> bool:
    """Whether the caller holds an admin key (GRU_ADMIN_KEYS); without keys configured, anyone does."""
    return not request.app.state.keys_required or bool(request.scope.get("state", {}).get("admin", False))


def require_admin(request: Request) -> None:
    """403 unless the caller holds an admin key (``is_admin``)."""
    if not is_admin(request):
        raise Problem(403, "forbidden", "this endpoint needs an admin key (GRU_ADMIN_KEYS); this key is not one",
                      headers={"WWW-Authenticate": REALM + ', error="insufficient_scope"'})  # RFC 6750 §3.1


def install(app: FastAPI, settings: Settings) -> None:
    """Guard every route but the open ones with the configured keys; without keys, do nothing. The keys are
    the ones ``Settings`` validated (the keys file is not read again)."""
    keys, admin = settings.key_tenants  # keys holds the admin keys too
    app.state.keys_required = bool(keys)
    if not keys:  # said once at start-up: a Secret that came out empty must not open every route unseen
        log.warning("no API keys: every route is open, every caller the tenant %r", DEFAULT_TENANT)
        return
    urls = (app.redoc_url, app.openapi_url)
    open_paths = {"/healthz", "/readyz", *docs.PATHS, *(url for url in urls if url)}
    if not settings.metrics_require_key:
        open_paths.add("/metrics")
    frozen = frozenset(open_paths)
    app.add_middleware(ApiKeyAuth, keys=KeyRing(keys, admin), open_paths=frozen)
    _document(app, frozen)
    weak = sorted({tenant for key, tenant in keys.items() if len(key) < WEAK_KEY_LENGTH})
    if weak:
        log.warning("API keys shorter than %d characters are easy to guess", WEAK_KEY_LENGTH,
                    extra={"fields": {"tenants": weak}})
    log.info("API keys required", extra={"fields": {"keys": len(keys), "tenants": len(set(keys.values()))}})
