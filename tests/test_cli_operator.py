"""The commands an operator reaches for: `config check`, `dispatch` against a running server, and
the demo clients finding the key without `--token` (which `ps` would show)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from ccm.cli import app
from ccm.config import ENV_KEYS
from ccm.server.auth import fingerprint
from tests.server.conftest import server, server_factory
from tests.server.support import API_KEY, ServerThread
from tests.server.test_demo import DemoDevice

__all__ = ["server", "server_factory"]

runner = CliRunner()
PLAN = json.dumps([{"tool_name": "add", "parameters": {"a": 2, "b": 3}}])
FAILING = json.dumps([{"tool_name": "fail"}])


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ENV_KEYS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("CCM_CONFIG", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)


def invoke(*args: str, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, list(args), env=env)


class TestConfigCheck:
    def test_a_good_setup_passes_and_prints_what_is_in_force(
        self, tmp_path: Path, sqlite_template: Path
    ) -> None:
        """Settings, device config, port, database at head and keys are checked; the settings
        are printed with the key masked by its fingerprint."""
        (tmp_path / "devices.yaml").write_text("devices:\n  d1:\n    tags: [lab]\n")
        config = tmp_path / "ccm.yaml"
        config.write_text("device_config: devices.yaml\nserver:\n  port: 0\n")
        db = tmp_path / "ccm.db"
        db.write_bytes(sqlite_template.read_bytes())

        result = invoke(
            "config",
            "check",
            "--config",
            str(config),
            "--database-url",
            f"sqlite:///{db}",
            env={"CCM_SERVER_API_KEY": "secret-key-1"},
        )

        assert result.exit_code == 0, result.output
        assert "ok   device config: devices.yaml: 1 devices" in result.stdout
        assert "ok   database: sqlite:///" in result.stdout
        assert "schema at head" in result.stdout
        assert f"api_key: '*** ({fingerprint('secret-key-1')})'" in result.stdout
        assert "secret-key-1" not in result.stdout

    def test_every_settings_problem_is_listed(self, tmp_path: Path) -> None:
        """A misspelled key in the file and a misspelled variable: both listed, exit 1."""
        config = tmp_path / "ccm.yaml"
        config.write_text("server:\n  prot: 1\n")

        result = invoke("config", "check", "--config", str(config), env={"CCM_DATABSE_URL": "x"})

        assert result.exit_code == 1
        problems = [line for line in result.stdout.splitlines() if line.startswith("problem: ")]
        assert problems == [
            "problem: environment variable CCM_DATABSE_URL is not a ccm setting: did you mean "
            "CCM_DATABASE_URL? (or unset it)",
            f"problem: {config}, line 2: unknown key 'server.prot'; did you mean 'server.port'?",
        ]

    def test_a_broken_device_config_fails_the_check(self, tmp_path: Path) -> None:
        """`device:` for `devices:` is a failed check naming the line, not zero devices."""
        (tmp_path / "devices.yaml").write_text("device:\n  d1: {}\n")
        config = tmp_path / "ccm.yaml"
        config.write_text("device_config: devices.yaml\nserver:\n  port: 0\n")

        result = invoke("config", "check", "--config", str(config), "--json")

        assert result.exit_code == 1
        checks = {c["name"]: c for c in json.loads(result.stdout)["checks"]}
        assert checks["device config"]["ok"] is False
        assert (
            "line 1: unknown key 'device'; did you mean 'devices'?"
            in (checks["device config"]["detail"])
        )


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
class TestDispatch:
    def test_wait_prints_the_outcome(self, server: ServerThread) -> None:
        """`ccm dispatch DEVICE --request PLAN --wait` runs it and prints state and result."""
        with DemoDevice(server.ws_url):
            result = invoke(
                "dispatch",
                "demo-device",
                "--request",
                PLAN,
                "--wait",
                "--timeout",
                "20s",
                "--url",
                server.http_url,
                "--api-key",
                API_KEY,
            )

        assert result.exit_code == 0, result.output
        first, *rest = result.stdout.splitlines()
        assert first.startswith("session ")
        assert " completed on demo-device after " in first
        assert any(line.startswith("result: ") and '"result": 5' in line for line in rest)

    def test_a_failed_task_exits_1_with_its_error(self, server: ServerThread) -> None:
        """A task that fails prints its reason and error, and exits 1."""
        with DemoDevice(server.ws_url):
            result = invoke(
                "dispatch",
                "demo-device",
                "--request",
                FAILING,
                "--wait",
                "--url",
                server.http_url,
                "--api-key",
                API_KEY,
            )

        assert result.exit_code == 1
        assert "reason: task_failed" in result.stdout
        assert "ended failed" in str(result.exception)

    def test_without_wait_it_names_the_session(self, server: ServerThread) -> None:
        """Without --wait: the session id and how to follow it; --json gives the API's answer."""
        with DemoDevice(server.ws_url):
            result = invoke(
                "dispatch",
                "demo-device",
                "--request",
                PLAN,
                "--json",
                "--url",
                server.http_url,
                "--api-key",
                API_KEY,
            )

        assert result.exit_code == 0, result.output
        answer = json.loads(result.stdout)
        assert answer["status"] == "dispatched"
        assert answer["client_id"] == "demo-device"

    def test_an_offline_device_is_one_line(self, server: ServerThread) -> None:
        """Dispatch to a device that is not connected: the server's answer, in one line."""
        result = invoke(
            "dispatch",
            "nobody",
            "--request",
            PLAN,
            "--url",
            server.http_url,
            "--api-key",
            API_KEY,
        )

        assert result.exit_code == 1
        assert str(result.exception).endswith("/api/dispatch answered 404: Client not online")

    def test_the_key_is_found_in_the_key_file(self, server: ServerThread, tmp_path: Path) -> None:
        """Run where `ccm serve` keeps data/api_key, no key option is needed."""
        (tmp_path / "data").mkdir()
        (tmp_path / "data" / "api_key").write_text(f"{API_KEY}\n")
        with DemoDevice(server.ws_url):
            result = invoke("dispatch", "demo-device", "--request", PLAN, "--url", server.http_url)

        assert result.exit_code == 0, result.output
        assert "dispatched to demo-device" in result.stdout


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_demo_constellation_reads_the_key_file(server: ServerThread, tmp_path: Path) -> None:
    """The walkthrough needs no `--token "$KEY"` (visible in `ps`): the key comes from the
    data directory, as `ccm serve` wrote it."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "api_key").write_text(f"old-key\n{API_KEY}\n")  # the newest is used
    url = f"ws://127.0.0.1:{server.port}/ws"
    with DemoDevice(server.ws_url):
        result = invoke("demo-constellation", "--url", url, "--request", PLAN, "--timeout", "10s")

    assert result.exit_code == 0, result.output
    assert "task completed" in result.stdout
