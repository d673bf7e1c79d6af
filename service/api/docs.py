"""/docs: Swagger UI with its script, style sheet and favicon served by the service itself, from the
swagger-ui-bundle package, instead of FastAPI's default page, which loads them from a CDN and is blank in an
air-gapped cluster. The page, its OAuth2 redirect and the three assets are fixed paths, open like /docs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from swagger_ui_bundle import swagger_ui_path

DOCS = "/docs"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"
ASSETS = {
    "/docs/swagger-ui-bundle.js": "swagger-ui-bundle.js",
    "/docs/swagger-ui.css": "swagger-ui.css",
    "/docs/favicon.png": "favicon-32x32.png",
}
PATHS = (DOCS, OAUTH2_REDIRECT, *ASSETS)


def install(app: FastAPI) -> None:
    """Serve /docs from the package; the app must be built with ``docs_url=None`` (FastAPI's CDN page)."""

    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "").rstrip("/")  # behind a proxy that strips a prefix
        return get_swagger_ui_html(
            openapi_url=root + (app.openapi_url or ""), title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=root + OAUTH2_REDIRECT, swagger_js_url=root + "/docs/swagger-ui-bundle.js",
            swagger_css_url=root + "/docs/swagger-ui.css", swagger_favicon_url=root + "/docs/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # else a badge from validator.swagger.io
        )

    async def oauth2_redirect(request: Request) -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    app.add_route(DOCS, docs, include_in_schema=False)
    app.add_route(OAUTH2_REDIRECT, oauth2_redirect, include_in_schema=False)
    for path, name in ASSETS.items():
        app.add_route(path, _asset(Path(swagger_ui_path) / name), include_in_schema=False)


def _asset(file: Path) -> Callable[[Request], Awaitable[Response]]:
    async def serve(request: Request) -> Response:
        return FileResponse(file, headers={"Cache-Control": "public, max-age=86400"})

    return serve
