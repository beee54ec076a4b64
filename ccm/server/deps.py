"""Annotated dependencies that read the app-lifetime objects from `app.state`."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, status
from starlette.requests import HTTPConnection

from ccm.registry import ClientConnectionManager
from ccm.server.hub import Hub
from ccm.store import Store


def _hub(conn: HTTPConnection) -> Hub:
    hub: Hub = conn.app.state.hub
    return hub


def _registry(conn: HTTPConnection) -> ClientConnectionManager:
    registry: ClientConnectionManager = conn.app.state.registry
    return registry


def _store(conn: HTTPConnection) -> Store:
    store: Store | None = conn.app.state.store
    if store is None:  # database.enabled: false keeps no history
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "no history: this server runs without a database (database.enabled: false)",
        )
    return store


HubDep = Annotated[Hub, Depends(_hub)]
RegistryDep = Annotated[ClientConnectionManager, Depends(_registry)]
StoreDep = Annotated[Store, Depends(_store)]
