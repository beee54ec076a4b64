"""The live dashboard over HTTP: the page at `/dashboard`, a JSON snapshot and an event stream.

The page is static (shipped in `ccm/server/static/`) and logs in with the API key, which it only
ever sends as the `X-API-Key` header. That is why it reads `/api/events` with `fetch()` streaming:
`EventSource` cannot set headers and would need the key in the URL, where access logs keep it.
What the page shows comes from the app's DashboardFeed (`ccm.server.feed`); one session's whole
story, opened from the page, from `ccm.audit` (as `ccm audit session` tells it).
"""

from __future__ import annotations

from importlib import resources
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from starlette.requests import HTTPConnection

from ccm.audit import read_session_story
from ccm.server.auth import require_api_key
from ccm.server.feed import DashboardFeed, Json


def _feed(conn: HTTPConnection) -> DashboardFeed:
    feed: DashboardFeed = conn.app.state.dashboard
    return feed


FeedDep = Annotated[DashboardFeed, Depends(_feed)]

# -- routes ----------------------------------------------------------------------------------

_ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
_SECURITY_HEADERS = {
    # Only our own script, style and fetches; no form may submit anywhere (the key stays in JS).
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

pages = APIRouter(include_in_schema=False)
"""The page and its files: public, they hold no data (the page asks for the key)."""
api = APIRouter(prefix="/api", dependencies=[Depends(require_api_key)], tags=["dashboard"])


def _asset(name: str) -> Response:
    if name not in _ASSETS:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "Not found")
    body = resources.files(__package__).joinpath("static", name).read_bytes()
    return Response(body, media_type=_ASSETS[name], headers=_SECURITY_HEADERS)


@pages.get("/dashboard")
def dashboard_page() -> Response:
    return _asset("index.html")


@pages.get("/dashboard/{name}")
def dashboard_asset(name: str) -> Response:
    return _asset(name)


@api.get("/dashboard/snapshot")
async def dashboard_snapshot(feed: FeedDep) -> Json:
    """What the dashboard shows, once: live clients, recent sessions, the last hour per minute."""
    return await feed.snapshot()


@api.get("/dashboard/sessions/{ident:path}")
async def dashboard_session(ident: str, feed: FeedDep) -> Json:
    """One session run's whole story: the row (request, result, error, times), the other runs
    of its id, and the device's and requester's connections at the time. `ident` is the run's
    `id` (or a session id: its newest run)."""
    if feed.store is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "ccm runs without a database")
    if "\x00" in ident:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "NUL characters are not allowed")
    story = await run_in_threadpool(read_session_story, feed.store.engine, ident)
    if story is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "Session not found")
    return story.as_dict()


@api.get("/events")
async def events(feed: FeedDep) -> StreamingResponse:
    """Server-sent events: a `snapshot` event now and whenever something changes (checked every
    ~2 s), a keepalive comment otherwise; the stream ends after 15 minutes (reconnect)."""
    if feed.is_full:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "Too many open event streams")
    return StreamingResponse(
        feed.stream(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


router = APIRouter()
router.include_router(pages)
router.include_router(api)
