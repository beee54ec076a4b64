"""The traps of the command line, through its real entry point: every failure is one line on
stderr naming what failed and what to do, with the traceback only after `--debug` (or `-v`).

Database failures are real ones: a Postgres port nobody listens on, a URL that is not one, a
backend ccm does not support, a Postgres database that does not exist. `ccm serve` runs as a
subprocess (it would configure this process's logging); the other commands run in-process
through `ccm.cli.main`, which is what the `ccm` script calls.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from ccm import cli
from ccm.config import ENV_KEYS
from ccm.store import migrate
from ccm.store.engine import make_engine
from ccm.store.models import sessions

CCM = Path(sys.executable).parent / "ccm"
UNREACHABLE = "postgresql+psycopg://ccm:hunter2@127.0.0.1:1/ccm"
"""Port 1: nothing listens there, so the connection is refused at once (no timeout to wait)."""
NOT_A_URL = "notaurl"
MYSQL = "mysql://ccm:hunter2@db.example/ccm"
COMMANDS = [
    ["db", "upgrade"],
    ["db", "current"],
    ["audit", "online"],
    ["audit", "sessions"],
    ["cleanup", "--dry-run"],
    ["config", "check"],
]


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ENV_KEYS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("CCM_CONFIG", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`ccm ARGS` in-process: (exit status, stdout, stderr)."""
    code = 0
    try:
        cli.main(list(args))
    except SystemExit as exited:
        code = int(exited.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def ccm(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The `ccm` script in a subprocess, without the developer's CCM_* settings."""
    clean = {k: v for k, v in os.environ.items() if not (k in ENV_KEYS or k == "CCM_CONFIG")}
    return subprocess.run(
        [str(CCM), *args],
        cwd=cwd,
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    return lines[0]


class TestDatabaseErrors:
    @pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
    def test_unreachable_postgres_is_one_line(
        self, capsys: pytest.CaptureFixture[str], command: list[str]
    ) -> None:
        """A Postgres port nobody listens on: the URL with its password masked, what failed,
        what to check."""
        code, out, err = run(capsys, *command, "--database-url", UNREACHABLE)

        assert code == 1
        if command == ["config", "check"]:  # it lists every check, then fails
            assert one_line(err) == "error: 1 check(s) failed: database"
            (line,) = [x for x in out.splitlines() if x.startswith("FAIL database: ")]
        else:
            line = one_line(err)
        assert "postgresql+psycopg://ccm:***@127.0.0.1:1/ccm" in line
        assert "nothing accepts connections on 127.0.0.1:1" in line
        assert "hunter2" not in err + out

    @pytest.mark.parametrize("command", COMMANDS[:5], ids=" ".join)
    def test_not_a_url_says_what_a_url_looks_like(
        self, capsys: pytest.CaptureFixture[str], command: list[str]
    ) -> None:
        """`notaurl`: one line with the two forms ccm takes."""
        code, _out, err = run(capsys, *command, "--database-url", NOT_A_URL)

        assert code == 1
        assert one_line(err) == (
            "error: database URL 'notaurl' is not a URL: write sqlite:///path/to/ccm.db or "
            "postgresql+psycopg://user:password@host:5432/dbname"
        )

    @pytest.mark.parametrize("command", COMMANDS[:5], ids=" ".join)
    def test_mysql_is_refused_as_unsupported(
        self, capsys: pytest.CaptureFixture[str], command: list[str]
    ) -> None:
        """`mysql://...` says ccm keeps its history in SQLite or PostgreSQL (no MySQLdb)."""
        code, _out, err = run(capsys, *command, "--database-url", MYSQL)

        assert code == 1
        line = one_line(err)
        assert "mysql://ccm:***@db.example/ccm" in line
        assert "SQLite or PostgreSQL, not mysql" in line
        assert "MySQLdb" not in err

    @pytest.mark.postgres
    def test_missing_postgres_database_says_how_to_create_it(
        self, capsys: pytest.CaptureFixture[str], postgres_template_url: str
    ) -> None:
        """A database that does not exist on a live server: its name and the createdb line."""
        from sqlalchemy import make_url

        url = make_url(postgres_template_url).set(database="ccm_no_such_db")
        shown = url.render_as_string(hide_password=False)

        code, _out, err = run(capsys, "db", "upgrade", "--database-url", shown)

        assert code == 1
        line = one_line(err)
        assert "database 'ccm_no_such_db' does not exist" in line
        assert "createdb" in line

    def test_debug_adds_the_traceback(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`--debug` (anywhere, or `-v`) shows the driver's traceback above the one line."""
        for flag in ("--debug", "-v"):
            code, _out, err = run(capsys, "audit", "online", "--database-url", UNREACHABLE, flag)

            assert code == 1
            assert "Traceback (most recent call last)" in err
            assert "psycopg.OperationalError" in err
            assert err.strip().splitlines()[-1].startswith("error: cannot use")

    def test_missing_sqlite_file_is_not_created_by_an_audit(
        self, capsys: pytest.CaptureFixture[str], tmp_path: Path
    ) -> None:
        """A mistyped SQLite path is refused instead of audited as a new empty database."""
        code, _out, err = run(
            capsys, "audit", "online", "--database-url", f"sqlite:///{tmp_path}/typo.db"
        )

        assert code == 1
        assert "no database at" in one_line(err)
        assert not (tmp_path / "typo.db").exists()


class TestServe:
    def test_unreachable_postgres_stops_serve_in_one_line(self, tmp_path: Path) -> None:
        """`ccm serve` on an unreachable Postgres exits 1 with one line, no traceback."""
        result = ccm("serve", "--port", "0", "--database-url", UNREACHABLE, cwd=tmp_path)

        assert result.returncode == 1
        assert "nothing accepts connections on 127.0.0.1:1" in one_line(result.stderr)

    def test_busy_port_is_reported_before_any_database_work(self, tmp_path: Path) -> None:
        """A port in use stops the start at once, naming the option and variable that change
        it; the database was never touched (the SQLite file is not even created)."""
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            result = ccm("serve", "--port", str(port), cwd=tmp_path)

        assert result.returncode == 1
        line = one_line(result.stderr)
        assert f"port {port} on 127.0.0.1 is already in use" in line
        assert "--port, server.port or CCM_SERVER_PORT" in line
        assert not (tmp_path / "data" / "ccm.db").exists()

    def test_misspelled_variable_stops_serve(self, tmp_path: Path) -> None:
        """CCM_SERVER_PROT=5003 stops the start with the variable meant."""
        result = ccm("serve", cwd=tmp_path, env={"CCM_SERVER_PROT": "5003"})

        assert result.returncode == 1
        assert one_line(result.stderr) == (
            "error: environment variable CCM_SERVER_PROT is not a ccm setting: did you mean "
            "CCM_SERVER_PORT? (or unset it)"
        )
        assert not (tmp_path / "data").exists()

    def test_bad_log_level_is_one_line(self, tmp_path: Path) -> None:
        """`--log-level NOPE` lists the levels (it was a ValueError traceback)."""
        result = ccm("serve", "--log-level", "NOPE", cwd=tmp_path)

        assert result.returncode == 2
        line = one_line(result.stderr)
        assert "Invalid value for '--log-level': 'NOPE' is not one of" in line
        assert "`ccm serve --help` lists the options" in line


class TestOptions:
    @pytest.mark.parametrize(
        ("args", "says"),
        [
            (["serve", "--port", "abc"], "'--port': must be a whole number"),
            (["serve", "--port", "70000"], "'--port': must be at most 65535"),
            (["audit", "online", "--database-url", ""], "'--database-url': is empty"),
            (["audit", "sessions", "--state", "done"], "'--state': 'done' is not one of"),
            (["cleanup", "--batch-size", "0"], "'--batch-size': must be at least 1"),
            (["nosuch"], "No such command 'nosuch'"),
            (["serve", "--prot", "1"], "No such option: --prot"),
        ],
    )
    def test_an_unreadable_option_is_one_line(
        self, capsys: pytest.CaptureFixture[str], args: list[str], says: str
    ) -> None:
        """Options the command cannot read: exit 2, one line saying which and where to look."""
        code, _out, err = run(capsys, *args)

        assert code == 2
        line = one_line(err)
        assert says in line
        assert "--help` lists the options" in line

    @pytest.mark.parametrize(
        ("args", "says"),
        [
            (["--finished-before", "7"], "--finished-before '7': 7 has no unit: write 7s, 7m"),
            (["--finished-before", ""], "--finished-before '': is empty"),
            (["--connections-before", "30"], "--connections-before '30': 30 has no unit"),
        ],
    )
    def test_cleanup_refuses_a_duration_without_a_unit(
        self,
        capsys: pytest.CaptureFixture[str],
        sqlite_template: Path,
        tmp_path: Path,
        args: list[str],
        says: str,
    ) -> None:
        """`cleanup --finished-before 7` meant seven seconds, and deleted the history: now it is
        refused with the units, and nothing is deleted."""
        shutil.copyfile(sqlite_template, tmp_path / "ccm.db")
        url = f"sqlite:///{tmp_path / 'ccm.db'}"

        code, _out, err = run(capsys, "cleanup", *args, "--database-url", url)

        assert code == 1
        assert says in one_line(err)

    def test_since_without_a_unit_is_refused(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`--since 24` is not guessed to be hours."""
        code, _out, err = run(capsys, "audit", "sessions", "--since", "24")

        assert code == 1
        assert "--since '24': 24 has no unit" in one_line(err)

    def test_version(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`ccm --version` prints the version."""
        from ccm import __version__

        assert run(capsys, "--version") == (0, f"ccm {__version__}\n", "")


class TestDowngrade:
    @pytest.fixture
    def with_history(self, sqlite_template: Path, tmp_path: Path) -> str:
        """A migrated SQLite file holding one session."""
        shutil.copyfile(sqlite_template, tmp_path / "ccm.db")
        url = f"sqlite:///{tmp_path / 'ccm.db'}"
        engine = make_engine(url)
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO sessions (id, session_id, origin, device_id, mode, state, "
                "created_at) VALUES ('r1', 's1', 'http', 'd1', 'agent', 'completed', "
                "'2026-05-01 00:00:00.000000')"
            )
        engine.dispose()
        return url

    def _sessions(self, url: str) -> int:
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                return int(conn.execute(select(func.count()).select_from(sessions)).scalar_one())
        finally:
            engine.dispose()

    def test_a_downgrade_that_deletes_rows_is_refused_with_the_count(
        self, capsys: pytest.CaptureFixture[str], with_history: str
    ) -> None:
        """`db downgrade base` on a database with history says how many rows would go, and
        leaves everything in place."""
        code, _out, err = run(capsys, "db", "downgrade", "base", "--database-url", with_history)

        assert code == 1
        line = one_line(err)
        assert "downgrade to base would delete 1 rows (sessions 1)" in line
        assert "run again with --yes" in line
        assert self._sessions(with_history) == 1

    def test_yes_does_it(self, capsys: pytest.CaptureFixture[str], with_history: str) -> None:
        """With --yes the tables go and the database is empty."""
        code, out, _err = run(
            capsys, "db", "downgrade", "base", "--yes", "--database-url", with_history
        )

        assert code == 0
        assert "sessions (1 rows)" in out
        engine = make_engine(with_history)
        try:
            assert migrate.current_revision(engine) is None
        finally:
            engine.dispose()

    def test_a_downgrade_that_deletes_no_row_needs_no_yes(
        self, capsys: pytest.CaptureFixture[str], with_history: str
    ) -> None:
        """One step down from head drops nothing that holds rows here: it just runs."""
        engine = make_engine(with_history)
        try:
            below_head = migrate.resolve_downgrade_target(engine, "-1")
            losses = migrate.data_lost_by_downgrade(engine, below_head)
            assert all(loss.rows == 0 for loss in losses)  # the premise: no row would go
        finally:
            engine.dispose()

        code, out, _err = run(capsys, "db", "downgrade", "-1", "--database-url", with_history)

        assert code == 0
        assert f"database at {below_head}" in out
        assert self._sessions(with_history) == 1
