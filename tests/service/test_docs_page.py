"""/docs works air-gapped: the page and everything it loads come from the service, none from another host."""

from __future__ import annotations

import re

import httpx

from tests.conftest import ServerFactory

KEYS = "a-key-for-the-docs-test-0123:acme"


def test_docs_page_loads_only_assets_the_service_serves_and_they_are_open(server_factory: ServerFactory) -> None:
    server = server_factory(GRU_API_KEYS=KEYS)  # the assets must be open like the page: a browser has no key
    with httpx.Client(base_url=server.url) as http:
        page = http.get("/docs")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        html = page.text
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]", html), "the page names another host"
        referenced = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert set(referenced) == {"/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css", "/docs/favicon.png"}
        assert "url: '/openapi.json'" in html and '"validatorUrl": null' in html
        kinds = {".js": "javascript", ".css": "text/css", ".png": "image/png"}
        for path in referenced:
            asset = http.get(path)
            assert asset.status_code == 200, path
            assert kinds[path[path.rindex("."):]] in asset.headers["content-type"], path
            assert len(asset.content) > 500, path
        assert "SwaggerUIBundle" in http.get("/docs/swagger-ui-bundle.js").text
        assert http.get("/docs/oauth2-redirect").status_code == 200
        assert http.get("/openapi.json").status_code == 200
