"""Fixtures of the fault suite: `ccm serve` processes and load generators on the test's database
(`database_url` from tests/conftest.py: a migrated SQLite file, or the run's Postgres database),
all stopped at the end of the test whatever happened."""

from __future__ import annotations

import resource
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from tests.reliability.support import LoadGen, ServeProcess, backend_of, engine_for


@pytest.fixture(autouse=True, scope="session")
def _nofile_limit() -> None:
    """Thousands of sockets in the test process: raise the soft fd limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@pytest.fixture
def backend(database_url: str) -> str:
    return backend_of(database_url)


@pytest.fixture
def serve(database_url: str, tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """`serve(env={...}, url=...)`: a started `ccm serve`; stopped (or killed) at the end."""
    started: list[ServeProcess] = []

    def start(env: dict[str, str] | None = None, url: str | None = None, **kw: Any) -> ServeProcess:
        server = ServeProcess(
            url or database_url, tmp_path, env=env, name=f"serve{len(started)}-", **kw
        )
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def loadgen(tmp_path: Path) -> Iterator[Callable[..., LoadGen]]:
    """`loadgen(ws_url, name, devices=..., ...)`: a load generator process; killed at the end."""
    started: list[LoadGen] = []

    def start(ws_url: str, name: str, **options: Any) -> LoadGen:
        load = LoadGen(ws_url, tmp_path, name, **options)
        started.append(load)
        return load

    yield start
    for load in started:
        load.resume()
        load.kill()


@pytest.fixture
def db(database_url: str) -> Iterator[Engine]:
    engine = engine_for(database_url)
    yield engine
    engine.dispose()
