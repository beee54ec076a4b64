"""Tests for settings: defaults, the YAML file, CCM_* overrides, validation, and durations."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest

from ccm.config import (
    DuplicatePolicy,
    Settings,
    load_settings,
    parse_duration,
)
from ccm.devices import load_device_configs
from ccm.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def in_empty_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run from a directory without config/ccm.yaml, so only defaults apply."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(tmp_path: Path, text: str, name: str = "ccm.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


class TestDefaults:
    def test_defaults_without_a_file(self, in_empty_dir: Path):
        """With no file and no env, every key has its default."""
        settings = load_settings(environ={})
        assert settings.server.port == 5000
        assert settings.server.host == "127.0.0.1"
        assert settings.duplicate_policy is DuplicatePolicy.REJECT
        assert settings.cleanup.finished_before == timedelta(days=7)
        assert settings.database.url is None

    def test_default_database_url_is_sqlite_under_data_dir(self, in_empty_dir: Path):
        """database_url defaults to SQLite at <data_dir>/ccm.db."""
        settings = load_settings(environ={})
        assert settings.database_url == "sqlite:///data/ccm.db"

    def test_database_url_follows_data_dir(self, tmp_path: Path):
        """A configured data_dir moves the default SQLite file."""
        path = write(tmp_path, "data_dir: /var/lib/ccm\n")
        settings = load_settings(path, environ={})
        assert settings.database_url == "sqlite:////var/lib/ccm/ccm.db"

    def test_empty_file_gives_defaults(self, tmp_path: Path):
        """An empty YAML file is valid and means all defaults."""
        settings = load_settings(write(tmp_path, ""), environ={})
        assert settings == Settings()


class TestYamlFile:
    def test_values_are_read(self, tmp_path: Path):
        """Values in the YAML file override defaults, nested keys included."""
        path = write(
            tmp_path,
            "duplicate_policy: takeover\n"
            "server:\n  port: 6001\n  host: 0.0.0.0\n"
            "cleanup:\n  finished_before: 12h\n  enabled: false\n"
            "database:\n  url: postgresql+psycopg://u@h/db\n",
        )
        settings = load_settings(path, environ={})
        assert settings.duplicate_policy is DuplicatePolicy.TAKEOVER
        assert settings.server.port == 6001
        assert settings.server.host == "0.0.0.0"
        assert settings.cleanup.finished_before == timedelta(hours=12)
        assert settings.cleanup.enabled is False
        assert settings.database_url == "postgresql+psycopg://u@h/db"

    def test_ccm_config_env_names_the_file(self, tmp_path: Path):
        """CCM_CONFIG in the environment selects the file when no path is given."""
        path = write(tmp_path, "server:\n  port: 7000\n")
        settings = load_settings(environ={"CCM_CONFIG": str(path)})
        assert settings.server.port == 7000

    def test_missing_named_file_names_the_file(self, tmp_path: Path):
        """A named file that does not exist fails with ConfigError naming it."""
        path = tmp_path / "absent.yaml"
        with pytest.raises(ConfigError, match=re.escape("absent.yaml")):
            load_settings(path, environ={})

    def test_missing_file_named_by_env_fails(self, tmp_path: Path):
        """A CCM_CONFIG pointing nowhere fails naming the file."""
        with pytest.raises(ConfigError, match=re.escape("gone.yaml")):
            load_settings(environ={"CCM_CONFIG": str(tmp_path / "gone.yaml")})

    def test_yaml_syntax_error_names_file_and_line(self, tmp_path: Path):
        """A YAML syntax error names the file and the line."""
        text = "server:\n  port: 5000\n  host: [unclosed\ncleanup:\n  enabled: true\n"
        path = write(tmp_path, text)
        with pytest.raises(ConfigError) as excinfo:
            load_settings(path, environ={})
        message = str(excinfo.value)
        assert str(path) in message
        assert "line 4" in message

    def test_top_level_must_be_mapping(self, tmp_path: Path):
        """A YAML list at top level fails naming the file."""
        path = write(tmp_path, "- a\n- b\n")
        with pytest.raises(ConfigError, match=re.escape("ccm.yaml")):
            load_settings(path, environ={})

    def test_unknown_key_is_named(self, tmp_path: Path):
        """An unknown nested key fails with ConfigError naming it."""
        path = write(tmp_path, "server:\n  prot: 5000\n")
        with pytest.raises(ConfigError, match=r"server\.prot"):
            load_settings(path, environ={})

    def test_unknown_top_level_key_is_named(self, tmp_path: Path):
        """An unknown top-level key fails naming it."""
        path = write(tmp_path, "databse:\n  url: x\n")
        with pytest.raises(ConfigError, match="databse"):
            load_settings(path, environ={})

    def test_invalid_value_names_the_key(self, tmp_path: Path):
        """An out-of-range port fails naming server.port."""
        path = write(tmp_path, "server:\n  port: 70000\n")
        with pytest.raises(ConfigError, match=r"server\.port"):
            load_settings(path, environ={})

    def test_invalid_duration_names_the_key(self, tmp_path: Path):
        """A bad duration fails naming its key."""
        path = write(tmp_path, "cleanup:\n  interval: soon\n")
        with pytest.raises(ConfigError, match=r"cleanup\.interval"):
            load_settings(path, environ={})

    def test_invalid_policy_names_the_key(self, tmp_path: Path):
        """An unknown duplicate_policy value fails naming the key."""
        path = write(tmp_path, "duplicate_policy: ignore\n")
        with pytest.raises(ConfigError, match="duplicate_policy"):
            load_settings(path, environ={})


class TestEnvironment:
    def test_server_port_override(self, in_empty_dir: Path):
        """CCM_SERVER_PORT sets server.port as an int."""
        settings = load_settings(environ={"CCM_SERVER_PORT": "8000"})
        assert settings.server.port == 8000

    def test_cleanup_finished_before_override(self, in_empty_dir: Path):
        """CCM_CLEANUP_FINISHED_BEFORE=3d sets cleanup.finished_before to 3 days."""
        settings = load_settings(environ={"CCM_CLEANUP_FINISHED_BEFORE": "3d"})
        assert settings.cleanup.finished_before == timedelta(days=3)

    def test_env_overrides_file(self, tmp_path: Path):
        """An env variable wins over the value in the file, leaving siblings alone."""
        path = write(tmp_path, "server:\n  port: 6001\n  host: 0.0.0.0\n")
        settings = load_settings(path, environ={"CCM_SERVER_PORT": "8000"})
        assert settings.server.port == 8000
        assert settings.server.host == "0.0.0.0"

    @pytest.mark.parametrize(
        "url",
        [
            "postgresql+psycopg://user:p%40ss@db.example:5432/ccm",
            "postgresql+psycopg://u:{[weird]}:#!&*@h/db?sslmode=require",
            "sqlite:///relative/path.db",
            "123",
            "null",
        ],
    )
    def test_database_url_kept_verbatim(self, in_empty_dir: Path, url: str):
        """CCM_DATABASE_URL is used exactly as given, never reinterpreted as YAML."""
        settings = load_settings(environ={"CCM_DATABASE_URL": url})
        assert settings.database.url == url
        assert settings.database_url == url

    def test_api_key_kept_verbatim(self, in_empty_dir: Path):
        """CCM_SERVER_API_KEY is kept as a string even when it looks like YAML."""
        settings = load_settings(environ={"CCM_SERVER_API_KEY": "[not: a list"})
        assert settings.server.api_key == "[not: a list"

    def test_invalid_env_value_names_the_key(self, in_empty_dir: Path):
        """A non-numeric CCM_SERVER_PORT fails naming server.port."""
        with pytest.raises(ConfigError, match=r"server\.port"):
            load_settings(environ={"CCM_SERVER_PORT": "eighty"})

    def test_unparsable_env_value_names_the_key(self, in_empty_dir: Path):
        """An env value that is not even valid YAML fails with ConfigError naming the key."""
        with pytest.raises(ConfigError, match=r"server\.port"):
            load_settings(environ={"CCM_SERVER_PORT": "[8000"})

    def test_env_list_value(self, in_empty_dir: Path):
        """A list-valued key accepts a YAML flow list from the environment."""
        settings = load_settings(environ={"CCM_SERVER_ALLOWED_HOSTS": "[a.example, b.example]"})
        assert settings.server.allowed_hosts == ["a.example", "b.example"]

    def test_unrelated_env_is_ignored(self, in_empty_dir: Path):
        """Variables outside the CCM_* key set do not affect settings."""
        settings = load_settings(environ={"PORT": "1", "CCM_NOT_A_KEY": "x"})
        assert settings == Settings()


class TestParseDuration:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("30s", timedelta(seconds=30)),
            ("15m", timedelta(minutes=15)),
            ("12h", timedelta(hours=12)),
            ("7d", timedelta(days=7)),
            ("2w", timedelta(weeks=2)),
            ("90", timedelta(seconds=90)),
            (90, timedelta(seconds=90)),
            (1.5, timedelta(seconds=1.5)),
            (" 5m ", timedelta(minutes=5)),
        ],
    )
    def test_accepts(self, text: object, expected: timedelta):
        """Units s/m/h/d/w and plain seconds parse to the right timedelta."""
        assert parse_duration(text) == expected

    def test_timedelta_passes_through(self):
        """A timedelta is returned unchanged."""
        assert parse_duration(timedelta(hours=1)) == timedelta(hours=1)

    @pytest.mark.parametrize(
        "junk", ["", "soon", "5 minutes", "5x", "m5", "1d2h", "-", True, None, [1]]
    )
    def test_rejects_junk(self, junk: object):
        """Anything that is not a number with an optional unit raises ValueError."""
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(junk)


class TestWithOverrides:
    def test_database_url_override(self, in_empty_dir: Path):
        """with_overrides({'database.url': ...}) returns settings using that URL."""
        base = load_settings(environ={})
        url = "postgresql+psycopg://u@h/db"
        settings = base.with_overrides({"database.url": url})
        assert settings.database_url == url
        assert base.database.url is None

    def test_none_values_are_skipped(self, in_empty_dir: Path):
        """An override of None (an option not given) leaves the value alone."""
        base = load_settings(environ={"CCM_SERVER_PORT": "8000"})
        assert base.with_overrides({"server.port": None}).server.port == 8000

    def test_override_is_validated(self, in_empty_dir: Path):
        """An invalid override fails naming the key."""
        base = load_settings(environ={})
        with pytest.raises(ConfigError, match=r"server\.port"):
            base.with_overrides({"server.port": -1})

    def test_override_keeps_other_values(self, tmp_path: Path):
        """Overriding one key keeps the rest, durations included."""
        base = load_settings(write(tmp_path, "cleanup:\n  finished_before: 3d\n"), environ={})
        settings = base.with_overrides({"server.port": 9000})
        assert settings.server.port == 9000
        assert settings.cleanup.finished_before == timedelta(days=3)


class TestShippedConfig:
    def test_shipped_ccm_yaml_loads(self):
        """config/ccm.yaml loads without error and matches its documented values."""
        settings = load_settings(REPO_ROOT / "config" / "ccm.yaml", environ={})
        assert settings.server.port == 5000
        assert settings.device_config == Path("config/devices.yaml")
        assert settings.duplicate_policy is DuplicatePolicy.REJECT

    def test_shipped_devices_yaml_loads(self):
        """config/devices.yaml loads and has the seed's example devices."""
        configs = load_device_configs(REPO_ROOT / "config" / "devices.yaml")
        assert configs["device_windows_001"]["additional_features"] == [
            "excel_automation",
            "pdf_generation",
        ]
        assert configs["device_linux_001"]["tags"] == ["development", "testing"]
