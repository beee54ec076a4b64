"""API keys: several at once, the key file read again while the server runs, fingerprints in the
log instead of keys, and `ccm key add|revoke|list` through the command's runner."""

from __future__ import annotations

import contextvars
import logging
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from ccm.cli import app as cli
from ccm.config import Settings
from ccm.errors import ConfigError
from ccm.logs import current_context
from ccm.server.auth import (
    API_KEY_FILE,
    KeyRing,
    Via,
    add_key,
    authenticate,
    fingerprint,
    key_ring,
    read_key_file,
    resolve_api_key,
    revoke_key,
)
from tests.support import free_port

runner = CliRunner()
CCM = Path(sys.executable).parent / "ccm"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "data" / API_KEY_FILE
    path.parent.mkdir()
    path.write_text("old-key\n", encoding="utf-8")
    return path


class TestKeyRing:
    def test_any_of_several_keys_is_accepted_by_fingerprint(self) -> None:
        """Each configured key matches and is named by its fingerprint; others do not."""
        ring = KeyRing(["key-a", "key-b"])
        assert ring.match("key-b", Via.HTTP) == fingerprint("key-b")
        assert ring.match("key-a", Via.WEBSOCKET) == fingerprint("key-a")
        assert ring.match("key-c", Via.HTTP) is None
        assert ring.match("", Via.HTTP) is None
        assert ring.match(None, Via.HTTP) is None

    def test_key_file_changes_count_at_once(self, key_file: Path) -> None:
        """A key added to the file is accepted and a revoked one refused, without a restart."""
        ring = KeyRing([], key_file)
        new = add_key(key_file)
        assert ring.match(new, Via.WEBSOCKET) == fingerprint(new)
        assert ring.match("old-key", Via.WEBSOCKET) is not None
        revoke_key(key_file, fingerprint("old-key"))
        assert ring.match("old-key", Via.WEBSOCKET) is None
        assert ring.match(new, Via.WEBSOCKET) == fingerprint(new)

    def test_a_vanished_key_file_keeps_the_keys_read_before(
        self, key_file: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        """Deleting the file does not lock every client out; it is logged."""
        ring = KeyRing([], key_file)
        key_file.unlink()
        with caplog.at_level(logging.WARNING, "ccm.server.auth"):
            assert ring.match("old-key", Via.HTTP) is not None
        assert "keeping the keys read before" in caplog.text

    def test_use_is_logged_by_fingerprint_once_a_minute(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        """The first use of a key per transport is logged with its fingerprint, then at most
        once a minute; the key itself never appears."""
        clock = Clock()
        ring = KeyRing(["the-secret-key"], clock=clock)
        with caplog.at_level(logging.INFO, "ccm.server.auth"):
            for _ in range(3):
                ring.match("the-secret-key", Via.HTTP)
            ring.match("the-secret-key", Via.WEBSOCKET)
            clock.now += 61
            ring.match("the-secret-key", Via.HTTP)
        lines = [r.getMessage() for r in caplog.records]
        expected = f"api key in use key={fingerprint('the-secret-key')}"
        assert lines == [
            f"{expected} via=http",
            f"{expected} via=websocket",
            f"{expected} via=http",
        ]
        assert "the-secret-key" not in caplog.text

    def test_authenticate_binds_the_fingerprint_to_the_log_context(self) -> None:
        """A connection's later log lines carry `key=<fingerprint>`."""

        class State:
            keys = KeyRing(["k1"])

        class App:
            state = State()

        def check() -> dict[str, object]:
            authenticate(App(), "k1", Via.WEBSOCKET)
            return current_context()

        assert contextvars.copy_context().run(check)["key"] == fingerprint("k1")


class TestKeyFile:
    def test_add_appends_a_new_key_with_mode_0600(self, key_file: Path) -> None:
        """`add_key` keeps the old key, appends a new random one, and the file stays private."""
        new = add_key(key_file)
        assert read_key_file(key_file) == ["old-key", new]
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert len(new) >= 40

    def test_revoke_refuses_the_last_key(self, key_file: Path) -> None:
        """Revoking the only key would lock every client out: refused, saying what to do."""
        with pytest.raises(ConfigError, match="add its successor first"):
            revoke_key(key_file, fingerprint("old-key"))
        assert read_key_file(key_file) == ["old-key"]

    def test_revoke_of_an_unknown_fingerprint_lists_the_keys(self, key_file: Path) -> None:
        """An unknown fingerprint names the fingerprints there are."""
        with pytest.raises(ConfigError, match=f"the keys are {fingerprint('old-key')}"):
            revoke_key(key_file, "ffffffff")

    def test_clients_use_the_newest_key(self, key_file: Path) -> None:
        """resolve_api_key gives the newest key: after `add`, clients move to it."""
        settings = Settings(data_dir=key_file.parent)
        new = add_key(key_file)
        assert resolve_api_key(settings) == (new, False)

    def test_comments_and_blank_lines_are_skipped(self, key_file: Path) -> None:
        """`# notes` and blank lines in the key file are not keys."""
        key_file.write_text("# rotated 2026-05-01\n\nkey-1  # laptop\nkey-2\n", encoding="utf-8")
        assert read_key_file(key_file) == ["key-1", "key-2"]

    def test_configured_keys_win_over_the_file(self, key_file: Path) -> None:
        """With server.api_keys set, the key file is not read at all."""
        settings = Settings(data_dir=key_file.parent).with_overrides(
            {"server.api_keys": ["conf-1", "conf-2"]}
        )
        ring = key_ring(settings)
        assert ring.match("conf-2", Via.HTTP) is not None
        assert ring.match("old-key", Via.HTTP) is None


@pytest.fixture
def serving(key_file: Path) -> Iterator[tuple[Path, str]]:
    """`ccm serve` (the real command, no database) on its key file; yields (config, base URL)."""
    config = key_file.parent.parent / "ccm.yaml"
    port = free_port()
    config.write_text(
        f"data_dir: {key_file.parent}\ndatabase:\n  enabled: false\nserver:\n  port: {port}\n",
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCM_")}
    log = key_file.parent.parent / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(CCM), "serve", "--config", str(config)],
            env=env,
            cwd=key_file.parent.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, log.read_text()
            try:
                httpx.get(f"{base}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "ccm serve did not answer within 30 s"
                time.sleep(0.1)
        yield config, base
    finally:
        process.terminate()
        process.wait(20)


def _key(config: Path, *args: str) -> str:
    result = runner.invoke(cli, ["key", *args, "--config", str(config)])
    assert result.exit_code == 0, (result.output, result.exception)
    return result.stdout


def _ws_refused(base: str, key: str) -> bool:
    url = base.replace("http", "ws") + f"/ws?token={key}"
    try:
        with connect(url, open_timeout=10) as ws:
            ws.close()
    except InvalidStatus as exc:
        return exc.response.status_code == 403
    return False


def test_a_key_is_rotated_without_a_restart(serving: tuple[Path, str]) -> None:
    """`ccm key add`, then `ccm key revoke <old>`: the running server accepts the new key at
    once and refuses the old one from then on, over HTTP and WebSocket."""
    config, base = serving
    new = _key(config, "add").strip()
    assert httpx.get(f"{base}/api/health", headers={"X-API-Key": new}).status_code == 200
    assert httpx.get(f"{base}/api/health", headers={"X-API-Key": "old-key"}).status_code == 200

    _key(config, "revoke", fingerprint("old-key"))

    assert httpx.get(f"{base}/api/health", headers={"X-API-Key": "old-key"}).status_code == 401
    assert _ws_refused(base, "old-key")
    assert not _ws_refused(base, new)
    listed = _key(config, "list")
    assert fingerprint(new) in listed
    assert fingerprint("old-key") not in listed
    assert new not in listed  # fingerprints only


def test_key_add_refuses_when_keys_are_configured(
    key_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With CCM_SERVER_API_KEY set, `ccm key add` says where the keys are instead of editing a
    file the server does not read."""
    monkeypatch.setenv("CCM_SERVER_API_KEY", "from-env")
    config = key_file.parent.parent / "ccm.yaml"
    config.write_text(f"data_dir: {key_file.parent}\n", encoding="utf-8")
    result = runner.invoke(cli, ["key", "add", "--config", str(config)])
    assert result.exit_code == 1
    assert "the keys come from the settings" in str(result.exception)
    assert read_key_file(key_file) == ["old-key"]
