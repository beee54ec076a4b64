"""The OpenAPI description of the HTTP API, served as `server.docs` says.

`key` (default): `/openapi.json` needs `X-API-Key` like every other route, and the `/docs` and
`/redoc` pages are not served (a browser cannot send the header to them, so they could not load
the schema). `public`: all three without a key, for a development machine. `off`: none.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from ccm.config import DocsMode
from ccm.server.auth import require_api_key

OPENAPI_URL = "/openapi.json"


def install_docs(app: FastAPI, mode: DocsMode) -> None:
    """Add the routes for `mode` to an app built with `openapi_url=None` (no routes of its own)."""
    if mode is DocsMode.OFF:
        return
    guard = [Depends(require_api_key)] if mode is DocsMode.KEY else []

    @app.get(OPENAPI_URL, include_in_schema=False, dependencies=guard)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    if mode is not DocsMode.PUBLIC:
        return

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url=OPENAPI_URL, title=f"{app.title} - API")

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=OPENAPI_URL, title=f"{app.title} - API")
