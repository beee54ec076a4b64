"""Annotated dependencies that read the app-lifetime objects from `app.state`.

All `async def`: FastAPI runs a sync dependency in its thread pool, and the memory-only routes
must not wait for a thread while history reads hold them.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, status
from starlette.requests import HTTPConnection

from ccm.registry import ClientConnectionManager
from ccm.server.history import HistoryReads
from ccm.server.hub import Hub
from ccm.store import Store


async def _hub(conn: HTTPConnection) -> Hub:
    hub: Hub = conn.app.state.hub
    return hub


async def _registry(conn: HTTPConnection) -> ClientConnectionManager:
    registry: ClientConnectionManager = conn.app.state.registry
    return registry


async def _store(conn: HTTPConnection) -> Store:
    store: Store | None = conn.app.state.store
    if store is None:  # database.enabled: false keeps no history
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "no history: this server runs without a database (database.enabled: false)",
        )
    return store


async def _history(conn: HTTPConnection) -> HistoryReads:
    history: HistoryReads = conn.app.state.history
    return history


HubDep = Annotated[Hub, Depends(_hub)]
RegistryDep = Annotated[ClientConnectionManager, Depends(_registry)]
StoreDep = Annotated[Store, Depends(_store)]
HistoryDep = Annotated[HistoryReads, Depends(_history)]
