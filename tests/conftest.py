"""Shared fixtures: real databases (a SQLite file and a real PostgreSQL), migrated by Alembic.

`database_url` is parametrised over both. Where no Postgres answers, the Postgres half is skipped
with a reason that names the command to start it; with CCM_REQUIRE_POSTGRES=1 (set by .ci/run)
that skip becomes a failure.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text

from ccm.store import migrate
from ccm.store.engine import make_engine
from ccm.store.models import Base
from tests.support import postgres_available, postgres_database

POSTGRES_URL = os.environ.get(
    "CCM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
START_POSTGRES = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


@pytest.fixture(scope="session")
def postgres_template_url() -> Iterator[str]:
    """A fresh, migrated Postgres database for this test run, dropped at the end."""
    if not postgres_available(POSTGRES_URL):
        message = f"PostgreSQL is not reachable at {POSTGRES_URL}; start it with: {START_POSTGRES}"
        if os.environ.get("CCM_REQUIRE_POSTGRES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    with postgres_database(POSTGRES_URL, "ccm_test") as url:
        yield url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite file migrated once per run; each test gets a copy."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    migrate.upgrade(f"sqlite:///{path}")
    return path


def _truncate_postgres(url: str) -> None:
    engine = create_engine(url)
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {tables} CASCADE"))
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of a migrated, empty database: a SQLite file or the run's Postgres database."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "ccm.db"
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("postgres_template_url")
    _truncate_postgres(url)
    return url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url)
    yield eng
    eng.dispose()
