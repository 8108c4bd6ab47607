"""The interactive API page (``AGENT_API_DOCS=1``), loading nothing from another origin.

FastAPI's own ``/docs`` and ``/redoc`` fetch their scripts from a CDN, on the chat page's
origin: whoever serves that script could act with the page's token. Here Swagger UI's
script, stylesheet and icon come from the ``fastapi-offline`` package (Swagger UI 5's release
files, for FastAPI; ``swagger-ui-bundle`` ships Swagger UI 4, which cannot read the
OpenAPI 3.1 schema FastAPI writes) and are served by the app itself, and the page's
Content-Security-Policy lets it load and call its own origin only. ReDoc stays off: one
page shows the schema, and ReDoc's search needs workers from ``blob:`` URLs.
``/openapi.json`` is served either way.
"""

from __future__ import annotations

import html
import json
from collections.abc import Awaitable, Callable
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import Response

ASSET_DIR = files("fastapi_offline") / "static"
DOCS_PATH = "/docs"
ASSETS = {
    f"{DOCS_PATH}/swagger-ui-bundle.js": ("swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
    f"{DOCS_PATH}/swagger-ui.css": ("swagger-ui.css", "text/css; charset=utf-8"),
    f"{DOCS_PATH}/favicon.png": ("favicon.png", "image/png"),
}
PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{title}}</title>
<link rel="stylesheet" href="{DOCS_PATH}/swagger-ui.css">
<link rel="icon" href="{DOCS_PATH}/favicon.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{DOCS_PATH}/swagger-ui-bundle.js"></script>
<script src="{DOCS_PATH}/start.js"></script>
</body>
</html>
"""
START = """window.ui = SwaggerUIBundle({{
  url: {openapi_url}, dom_id: "#swagger-ui", layout: "BaseLayout", deepLinking: true,
  presets: [SwaggerUIBundle.presets.apis],
  validatorUrl: null  // no validator badge: it would send the schema's address to swagger.io
}});
"""
"""Swagger UI started from a script of our own, not an inline one, so the policy allows
scripts from this origin only."""
CONTENT_SECURITY_POLICY = (
    # Swagger UI sets inline styles; its icons are data: URLs.
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {"content-security-policy": CONTENT_SECURITY_POLICY, "x-content-type-options": "nosniff",
           "referrer-policy": "no-referrer"}


def install_api_docs(app: FastAPI) -> None:
    """``GET /docs`` (Swagger UI) and its assets, same-origin, without auth (like the chat
    page it holds no data: the schema it shows is ``/openapi.json``)."""
    assert app.openapi_url is not None
    files = {
        DOCS_PATH: (PAGE.format(title=html.escape(app.title)).encode(), "text/html; charset=utf-8"),
        f"{DOCS_PATH}/start.js": (START.format(openapi_url=json.dumps(app.openapi_url)).encode(),
                                  "text/javascript; charset=utf-8"),
        **{path: ((ASSET_DIR / name).read_bytes(), media_type) for path, (name, media_type) in ASSETS.items()},
    }
    for path, (body, media_type) in files.items():
        app.add_api_route(path, _responder(body, media_type), methods=["GET", "HEAD"], include_in_schema=False)


def _responder(body: bytes, media_type: str) -> Callable[[], Awaitable[Response]]:
    async def serve() -> Response:
        return Response(body, media_type=media_type, headers=HEADERS)

    return serve
