"""Fixtures of the cluster tests: real `ccm serve` processes on loopback ports, all on the run's
PostgreSQL database (emptied before each test), stopped or killed at the end whatever happened.
Leases are short (LEASE seconds) so that node death is noticed within a test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from tests.conftest import _truncate_postgres
from tests.reliability.support import ServeProcess, engine_for

LEASE = 2.0
"""cluster.lease of every node in these tests."""


@pytest.fixture
def pg_url(postgres_template_url: str) -> str:
    """The run's PostgreSQL database, emptied (a cluster needs PostgreSQL)."""
    _truncate_postgres(postgres_template_url)
    return postgres_template_url


@pytest.fixture
def db(pg_url: str) -> Iterator[Engine]:
    engine = engine_for(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture
def node(pg_url: str, tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """`node(name, env={...}, url=...)`: a started node of the cluster; stopped at the end."""
    started: list[ServeProcess] = []

    def start(
        name: str = "", env: dict[str, str] | None = None, url: str | None = None, **kw: Any
    ) -> ServeProcess:
        name = name or f"node{len(started)}"
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        settings = {
            "CCM_CLUSTER_LEASE": f"{LEASE}s",
            "CCM_CLUSTER_NODE_NAME": name,
            **(env or {}),
        }
        server = ServeProcess(url or pg_url, workdir, env=settings, name=f"{name}-", **kw)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        if server.process is not None and server.process.poll() is None:
            with_continue(server)
        server.stop()


def with_continue(server: ServeProcess) -> None:
    """A node a test left stopped (SIGSTOP) must run again to stop cleanly."""
    import signal

    assert server.process is not None
    server.process.send_signal(signal.SIGCONT)
