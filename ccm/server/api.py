"""HTTP API: health, clients, devices, sessions, stats, dispatch and task results.

Every route but `/healthz` needs `X-API-Key`. Live answers come from the registry (memory) and
run on the event loop itself (`async def`, no thread), so nothing the database does can delay
them; history comes from SQL through `HistoryReads` (threads of its own, bounded in number and
time, 503 when the database is away). Client ids are opaque: every id route takes `/` and any
other character, percent-encoded. Answers that carry client JSON are `JsonAnswer`s.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Query, Request, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import AwareDatetime, BaseModel, model_validator

from ccm.domain import FINISHED_STATES, SessionState
from ccm.errors import ConfigError
from ccm.protocol import has_unstorable_value, is_valid_task_name
from ccm.server import views
from ccm.server.answers import JsonAnswer
from ccm.server.auth import Via, authenticate, require_api_key
from ccm.server.deps import HistoryDep, HubDep, RegistryDep, StoreDep
from ccm.store.nodes import list_nodes
from ccm.store.repository import read_connection_history, read_session_counts, read_sessions

public = APIRouter()
router = APIRouter()


async def refuse_nul(request: Request) -> None:
    """Ids and filters reach SQL as bound values, and PostgreSQL refuses NUL in text (a 500):
    refuse it here, with a 400, on both databases alike."""
    values = [request.scope.get("path", ""), *(v for _, v in request.query_params.multi_items())]
    if any("\x00" in value for value in values):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "NUL characters are not allowed")


protected = APIRouter(prefix="/api", dependencies=[Depends(require_api_key), Depends(refuse_nul)])

MAX_OFFSET = 1_000_000_000
"""Larger offsets overflow the databases' 64-bit integers (a 500); no history is that long."""
Limit = Annotated[int, Query(ge=1, le=1000)]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET)]
AnyJson = dict[str, Any]


@public.get("/healthz", tags=["health"])
async def healthz() -> dict[str, str]:
    """Liveness only: no authentication, no data."""
    return {"status": "ok"}


@public.get("/metrics", tags=["health"])
async def metrics(request: Request) -> Response:
    """Prometheus text format. Needs the key (`X-API-Key` or `Authorization: Bearer <key>`)
    unless `metrics.require_api_key` is false; `metrics.port` serves it on a separate bind."""
    settings = request.app.state.settings
    if not settings.metrics.enabled:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "Metrics are disabled")
    if settings.metrics.require_api_key:
        given = request.headers.get("x-api-key")
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if given is None and scheme.lower() == "bearer":
            given = token.strip()
        if authenticate(request.app, given, Via.METRICS) is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "Invalid or missing API key")
    return Response(
        generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )


@protected.get("/health", tags=["health"])
async def health(registry: RegistryDep, request: Request) -> dict[str, Any]:
    """`healthy`, or `degraded` while the database is not taking writes or file descriptors run
    short. Memory only: it answers while the database is frozen."""
    store = request.app.state.store
    fds = request.app.state.connections.file_descriptors()
    answer: dict[str, Any] = {
        "status": "degraded" if fds.short else "healthy",
        "online_clients": registry.list_clients(),
        "database": None,  # database.enabled: false
        "file_descriptors": fds.as_dict(),
        "pending_connections": request.app.state.connections.pending_count(),
    }
    if store is None:
        return answer
    writer = store.writer.stats()
    if writer.degraded:
        answer["status"] = "degraded"
    answer["database"] = {
        "queue_depth": writer.queue_depth,
        "max_queue": writer.max_queue,
        "degraded": writer.degraded,
        "last_error": writer.last_error,
        "writes_lost": writer.failed_by_kind,
        "last_lost_write": writer.last_failure,
    }
    answer["run_id"] = store.run_id
    return answer


@protected.get("/clients", tags=["clients"])
async def clients(hub: HubDep) -> dict[str, Any]:
    """Live clients of the whole cluster: UFO's `online_clients` list plus each client's type,
    platform and node."""
    details = views.clients(hub)
    return {"online_clients": [d["client_id"] for d in details], "clients": details}


@protected.get("/clients/{client_id:path}/connections", tags=["clients"])
async def client_connections(
    client_id: str,
    store: StoreDep,
    history: HistoryDep,
    since: AwareDatetime | None = None,
    until: AwareDatetime | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> dict[str, Any]:
    """A client's connection history from SQL, newest first. Any id, `/` included."""
    rows = await history.run(
        read_connection_history,
        store.engine,
        client_id,
        since=since,
        until=until,
        limit=limit,
        offset=offset,
    )
    return _page([r.as_dict() for r in rows], limit, offset)


@protected.get("/devices", tags=["devices"])
async def devices(hub: HubDep) -> dict[str, Any]:
    """Live devices of the whole cluster, with counts by platform."""
    return views.devices(hub)


@protected.get("/devices/select", tags=["devices"], response_model=AnyJson)
async def select_device(
    hub: HubDep,
    platform: str | None = None,
    capabilities: Annotated[list[str] | None, Query()] = None,
    tags: Annotated[list[str] | None, Query()] = None,
    explain: bool = False,
    limit: Annotated[int, Query(ge=1, le=1000)] = 10,
) -> Response:
    """`select_optimal_device`: repeat `capabilities`/`tags`, or give them comma-separated.
    With `explain=true`, 200 even when nothing qualifies, and an `explain` object: this node's
    devices passed over, counted per first reason with the first `limit` of each, and the
    `limit` best qualifying devices with their scores."""
    caps = _split(capabilities)
    wanted_tags = _split(tags)
    if explain:
        answer = views.explain_selection(hub, platform, caps, wanted_tags, limit)
        chosen = answer["device_id"]
        answer["system_info"] = views.device_system_info(hub, chosen) if chosen else None
        return JsonAnswer(answer)
    device_id = views.select_device(hub, platform, caps, wanted_tags)
    if device_id is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            "No connected device matches with room for a session; add explain=true to see why",
        )
    return JsonAnswer(
        {"device_id": device_id, "system_info": views.device_system_info(hub, device_id)}
    )


@protected.post("/devices/reload-config", tags=["devices"])
def reload_device_config(registry: RegistryDep) -> dict[str, Any]:
    """Re-read the device config file and re-merge it into live devices."""
    try:
        changed = registry.reload_device_config()
    except ConfigError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
    return {
        "status": "reloaded",
        "entries": len(registry.device_configs),
        "devices_changed": changed,
    }


@protected.get("/devices/{device_id:path}", tags=["devices"], response_model=AnyJson)
async def device(device_id: str, hub: HubDep) -> Response:
    """A live device of the cluster, any id (`/` included; `select` and `reload-config` name
    the routes above); `sessions` lists its running sessions when it is connected to this node
    (null when to another)."""
    found = views.device(hub, device_id)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "Device not connected")
    return JsonAnswer(found)


@protected.get("/nodes", tags=["cluster"])
async def nodes(hub: HubDep, history: HistoryDep, request: Request) -> dict[str, Any]:
    """The nodes of the cluster (on SQLite, this one): id, name, address, started, last lease
    renewal, clients held and running sessions, alive ones first."""
    store = request.app.state.store
    if hub.cluster is None or store is None:
        return {"nodes": [views.single_node(hub, store)]}
    rows = await history.run(list_nodes, store.engine)
    listed = sorted((r.as_dict() for r in rows), key=lambda n: n["state"] != "alive")
    return {"nodes": listed}


@protected.get("/stats", tags=["stats"])
async def stats(
    registry: RegistryDep, store: StoreDep, hub: HubDep, history: HistoryDep
) -> dict[str, Any]:
    """The seed's counts, plus sessions by state (SQL) and the store writer's figures.
    `live_sessions` counts the session manager's own map (`active_sessions` the registry's)."""
    result = views.counts(hub)
    result["live_sessions"] = len(hub.sessions)
    result["sessions_by_state"] = await history.run(read_session_counts, store.engine)
    writer = store.writer.stats()
    result["store"] = {
        "queue_depth": writer.queue_depth,
        "batches_committed": writer.batches_committed,
        "writes_committed": writer.writes_committed,
        "writes_failed": writer.writes_failed,
        "degraded": writer.degraded,
    }
    return result


@protected.get("/sessions", tags=["sessions"], response_model=AnyJson)
async def sessions(
    store: StoreDep,
    history: HistoryDep,
    state: Annotated[list[SessionState] | None, Query()] = None,
    device_id: str | None = None,
    constellation_id: str | None = None,
    since: AwareDatetime | None = None,
    until: AwareDatetime | None = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> Response:
    """Session history from SQL, newest first; `since`/`until` bound the creation time and
    must carry a UTC offset (a naive time is 422: it cannot be compared with the UTC columns)."""
    rows = await history.run(
        read_sessions,
        store.engine,
        state=[s.value for s in state] if state else None,
        device_id=device_id,
        constellation_id=constellation_id,
        since=since,
        until=until,
        limit=limit,
        offset=offset,
    )
    return JsonAnswer(_page([r.as_dict() for r in rows], limit, offset))


@protected.get("/sessions/{session_id:path}", tags=["sessions"], response_model=AnyJson)
async def session(session_id: str, store: StoreDep, history: HistoryDep) -> Response:
    """The newest run with this session id (a constellation may reuse an id after it ended).
    Session ids are opaque and may contain `/`, hence the `path` converter."""
    rows = await history.run(read_sessions, store.engine, session_id=session_id, limit=1)
    if not rows:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "Session not found")
    return JsonAnswer(rows[0].as_dict())


class DispatchBody(BaseModel):
    client_id: str | None = None
    request: str | None = None
    task_name: str | None = None

    @model_validator(mode="after")
    def _storable(self) -> DispatchBody:
        # The same rule as for WebSocket frames (protocol.decode_client_message).
        if has_unstorable_value([self.client_id, self.request, self.task_name]):
            raise ValueError("NUL characters and unpaired surrogates are not allowed")
        return self


@protected.post("/dispatch", tags=["sessions"])
async def dispatch(
    hub: HubDep, registry: RegistryDep, body: Annotated[DispatchBody, Body()]
) -> dict[str, Any]:
    """Start a session on a device. The returned `session_id` is the one that runs (and ends up in
    SQL), unlike UFO's, because ccm runs the session itself instead of bouncing an assignment."""
    if not body.request:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "Empty task content")
    if not body.client_id:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "Empty client ID")
    task_name = body.task_name
    if "task_name" in body.model_fields_set and not is_valid_task_name(task_name):
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            "Invalid task_name: must be a non-empty string of characters [A-Za-z0-9._-] "
            "and must not start with '.'",
        )
    answer = await hub.dispatch_anywhere(body.client_id, body.request, task_name)
    if answer.status != status.HTTP_200_OK:
        raise HTTPException(answer.status, answer.error or "dispatch failed")
    dispatched: dict[str, Any] = {
        "status": "dispatched",
        "task_name": answer.task_name,
        "client_id": body.client_id,
        "session_id": answer.session_id,
        "state": (SessionState.PENDING if answer.queue_position else SessionState.RUNNING).value,
    }
    if answer.queue_position:
        dispatched["queue_position"] = answer.queue_position
    return dispatched


@protected.get("/task_result/{task_name}", tags=["sessions"], response_model=AnyJson)
async def task_result(task_name: str, store: StoreDep, history: HistoryDep) -> Response:
    """UFO's route, answered from SQL: `pending` until the newest session of that name ends."""
    rows = await history.run(read_sessions, store.engine, task_name=task_name, limit=1)
    if not rows or SessionState(rows[0].state) not in FINISHED_STATES:
        return JsonAnswer({"status": "pending"})
    row = rows[0]
    return JsonAnswer(
        {
            "status": "done",
            "state": row.state,
            "session_id": row.session_id,
            "result": row.result,
            "error": row.error,
        }
    )


def _split(values: list[str] | None) -> list[str]:
    return [part.strip() for v in values or [] for part in v.split(",") if part.strip()]


def _page(items: list[dict[str, Any]], limit: int, offset: int) -> dict[str, Any]:
    return {
        "items": items,
        "limit": limit,
        "offset": offset,
        "next_offset": offset + limit if len(items) == limit else None,
    }


router.include_router(public)
router.include_router(protected)


def history_unavailable(_request: Request, exc: Exception) -> Response:
    """HistoryUnavailable as a 503 with its text as `detail` (installed by create_app)."""
    return JsonAnswer({"detail": str(exc)}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
