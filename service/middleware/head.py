"""``HeadAsGet``: HEAD is answered wherever GET is (/healthz, /readyz, /metrics, /docs, every v1 and v2 GET):
the request goes on as a GET and the server sends the GET's status and headers without its body (uvicorn
drops the body of an answer to HEAD). Where GET is not allowed, HEAD gets the same 404 or 405. Outside, the
request is still a HEAD: metrics and the access log say so."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


class HeadAsGet:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}  # a copy: the server's scope stays HEAD, so it sends no body
        await self.app(scope, receive, send)
