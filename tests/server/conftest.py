"""Server fixtures: `server_factory(**overrides)` starts a real server on the test's database
(`database_url`, so every flow runs on SQLite and on Postgres)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ccm.server.runners import SessionRunner
from tests.server.support import ServerThread, make_settings


@pytest.fixture
def server_factory(database_url: str, tmp_path: Path) -> Iterator[Callable[..., ServerThread]]:
    """Start servers on the test database: `server_factory(**{"server.heartbeat_interval": 2})`."""
    started: list[ServerThread] = []

    def start(runners: list[SessionRunner] | None = None, **overrides: Any) -> ServerThread:
        settings = make_settings(database_url, tmp_path / f"data{len(started)}", **overrides)
        server = ServerThread(settings, runners).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(server_factory: Callable[..., ServerThread]) -> ServerThread:
    return server_factory()
