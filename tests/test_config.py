"""Tests for settings: defaults, the YAML file, CCM_* overrides, validation, and durations.

Errors are checked whole where it matters: one line, in plain words, naming the one source of the
bad value (file and line, or variable) and what to write instead."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest

from ccm.config import (
    ENV_KEYS,
    SETTING_KEYS,
    DuplicatePolicy,
    LogLevel,
    Settings,
    load_settings,
    parse_duration,
)
from ccm.devices import load_device_configs
from ccm.errors import ConfigError
from ccm.server.auth import fingerprint
from ccm.settings_report import SettingsInvalid, effective_settings

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
        """An unclosed bracket is reported on its own line, not where the parser gave up."""
        text = "server:\n  port: 5000\n  host: [unclosed\ncleanup:\n  enabled: true\n"
        path = write(tmp_path, text)
        with pytest.raises(ConfigError) as excinfo:
            load_settings(path, environ={})
        assert str(excinfo.value) == f"{path}, line 3: '[' is never closed"

    @pytest.mark.parametrize(
        ("text", "line", "says"),
        [
            ("server:\n  port 5000\n  host: x\n", 2, "'port 5000' has no ':' after its key"),
            ('server:\n  host: "x\n  port: 1\ncleanup: {}\n', 2, "a quote is never closed"),
            ("server:\n\tport: 5000\n", 2, "a tab indents this line"),
            ("a: 1\nserver:\n  host: a: b\n", 3, "must be in quotes"),
        ],
    )
    def test_syntax_errors_name_the_line_of_the_mistake(
        self, tmp_path: Path, text: str, line: int, says: str
    ):
        """Common slips are reported at the line the operator has to fix, in plain words."""
        path = write(tmp_path, text)
        with pytest.raises(ConfigError) as excinfo:
            load_settings(path, environ={})
        assert str(excinfo.value).startswith(f"{path}, line {line}: ")
        assert says in str(excinfo.value)

    def test_key_given_twice_is_refused(self, tmp_path: Path):
        """A key set twice names both lines (YAML would silently keep the second)."""
        path = write(tmp_path, "server:\n  port: 5001\n  host: 0.0.0.0\n  port: 5002\n")
        with pytest.raises(ConfigError) as excinfo:
            load_settings(path, environ={})
        assert str(excinfo.value) == f"{path}, line 4: 'server.port' is already set on line 2"

    def test_top_level_must_be_mapping(self, tmp_path: Path):
        """A YAML list at top level fails naming the file."""
        path = write(tmp_path, "- a\n- b\n")
        with pytest.raises(ConfigError, match=re.escape("ccm.yaml")):
            load_settings(path, environ={})

    def test_unknown_key_is_named_with_its_line_and_a_suggestion(self, tmp_path: Path):
        """A misspelled nested key stops the load: its line, its name, the key meant."""
        path = write(tmp_path, "# ccm\nserver:\n  host: 0.0.0.0\n  prot: 5000\n")
        with pytest.raises(ConfigError) as excinfo:
            load_settings(path, environ={})
        assert str(excinfo.value) == (
            f"{path}, line 4: unknown key 'server.prot'; did you mean 'server.port'?"
        )

    def test_unknown_top_level_key_is_named(self, tmp_path: Path):
        """A misspelled section is named, with the section meant."""
        path = write(tmp_path, "databse:\n  url: x\n")
        with pytest.raises(ConfigError) as excinfo:
            load_settings(path, environ={})
        assert str(excinfo.value) == (
            f"{path}, line 1: unknown key 'databse'; did you mean 'database'?"
        )

    def test_key_in_the_wrong_section_points_to_the_right_one(self, tmp_path: Path):
        """`port:` at the top level suggests the keys of that name in the sections."""
        path = write(tmp_path, "port: 5003\n")
        with pytest.raises(ConfigError) as excinfo:
            load_settings(path, environ={})
        assert str(excinfo.value).endswith(
            "unknown key 'port'; did you mean 'metrics.port' or 'server.port'?"
        )

    def test_invalid_value_names_the_key_in_plain_words(self, tmp_path: Path):
        """An out-of-range port names its line and key, and the bound, not pydantic's text."""
        path = write(tmp_path, "server:\n  port: 70000\n")
        with pytest.raises(ConfigError) as excinfo:
            load_settings(path, environ={})
        assert str(excinfo.value) == f"{path}, line 2: server.port must be at most 65535, not 70000"

    def test_invalid_duration_names_the_key(self, tmp_path: Path):
        """A bad duration fails naming its key and the units."""
        path = write(tmp_path, "cleanup:\n  interval: soon\n")
        with pytest.raises(ConfigError) as excinfo:
            load_settings(path, environ={})
        assert str(excinfo.value) == (
            f"{path}, line 2: cleanup.interval 'soon' is not a duration: write a number and a "
            "unit (30s, 15m, 12h, 7d, 2w)"
        )

    def test_invalid_policy_names_the_choices(self, tmp_path: Path):
        """An unknown duplicate_policy value lists the values that are allowed."""
        path = write(tmp_path, "duplicate_policy: ignore\n")
        with pytest.raises(ConfigError) as excinfo:
            load_settings(path, environ={})
        assert str(excinfo.value) == (
            f"{path}, line 1: duplicate_policy must be one of 'reject' or 'takeover', not 'ignore'"
        )

    def test_every_problem_is_collected(self, tmp_path: Path):
        """Two mistakes give two problems; the message is the first and says more follow."""
        path = write(tmp_path, "server:\n  prot: 1\ncleanup:\n  interval: 7\n")
        with pytest.raises(SettingsInvalid) as excinfo:
            load_settings(path, environ={})
        assert excinfo.value.problems == [
            f"{path}, line 2: unknown key 'server.prot'; did you mean 'server.port'?",
            f"{path}, line 4: cleanup.interval 7 has no unit: write 7s, 7m, 7h or 7d",
        ]
        assert "(and 1 more: `ccm config check` lists them all)" in str(excinfo.value)

    def test_bare_number_duration_is_refused(self, tmp_path: Path):
        """`finished_before: 7` could mean seven seconds: refused, with the units to write."""
        path = write(tmp_path, "cleanup:\n  finished_before: 7\n")
        with pytest.raises(ConfigError) as excinfo:
            load_settings(path, environ={})
        assert str(excinfo.value) == (
            f"{path}, line 2: cleanup.finished_before 7 has no unit: write 7s, 7m, 7h or 7d"
        )

    def test_empty_value_is_refused_not_defaulted(self, tmp_path: Path):
        """`url:` with nothing after it is refused; `null` is how to ask for the default."""
        path = write(tmp_path, "database:\n  url:\n")
        with pytest.raises(ConfigError) as excinfo:
            load_settings(path, environ={})
        assert str(excinfo.value) == (
            f"{path}, line 2: database.url is empty: write a value, or null for the default"
        )

    def test_empty_string_is_refused(self, tmp_path: Path):
        """`host: ""` is refused rather than bound to every interface by accident."""
        path = write(tmp_path, 'server:\n  host: ""\n')
        with pytest.raises(ConfigError, match=r"line 2: server\.host is empty"):
            load_settings(path, environ={})

    def test_null_and_empty_sections_mean_the_defaults(self, tmp_path: Path):
        """`url: null` and a section with every key commented out are the defaults."""
        path = write(tmp_path, "database:\n  url: null\nserver:\n  # port: 6000\n")
        assert load_settings(path, environ={}) == Settings()

    def test_log_level_is_read_in_any_case(self, tmp_path: Path):
        """`level: debug` is DEBUG; `level: loud` lists the levels."""
        assert (
            load_settings(write(tmp_path, "logging:\n  level: debug\n"), environ={}).logging.level
            is LogLevel.DEBUG
        )
        with pytest.raises(ConfigError, match=r"logging\.level must be one of 'DEBUG', 'INFO'"):
            load_settings(write(tmp_path, "logging:\n  level: loud\n"), environ={})


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

    def test_invalid_env_value_names_the_variable_once(self, tmp_path: Path):
        """A bad CCM_SERVER_PORT names that variable, and only it, as the source."""
        path = write(tmp_path, "server:\n  host: 0.0.0.0\n")
        with pytest.raises(ConfigError) as excinfo:
            load_settings(path, environ={"CCM_SERVER_PORT": "eighty"})
        assert str(excinfo.value) == (
            "environment variable CCM_SERVER_PORT: server.port must be a whole number, not 'eighty'"
        )

    def test_misspelled_variable_stops_the_load_with_a_suggestion(self, in_empty_dir: Path):
        """CCM_SERVER_PROT would leave the default port in force: refused, naming the right one."""
        with pytest.raises(ConfigError) as excinfo:
            load_settings(environ={"CCM_SERVER_PROT": "5003"})
        assert str(excinfo.value) == (
            "environment variable CCM_SERVER_PROT is not a ccm setting: did you mean "
            "CCM_SERVER_PORT? (or unset it)"
        )

    def test_empty_variable_is_refused_not_defaulted(self, in_empty_dir: Path):
        """CCM_DATABASE_URL= would silently fall back to SQLite: refused instead."""
        with pytest.raises(ConfigError) as excinfo:
            load_settings(environ={"CCM_DATABASE_URL": ""})
        assert str(excinfo.value) == (
            "environment variable CCM_DATABASE_URL is empty: give database.url a value, or "
            "unset CCM_DATABASE_URL for the default"
        )

    def test_bare_number_duration_variable_is_refused(self, in_empty_dir: Path):
        """CCM_CLEANUP_FINISHED_BEFORE=7 is refused with the units."""
        with pytest.raises(ConfigError) as excinfo:
            load_settings(environ={"CCM_CLEANUP_FINISHED_BEFORE": "7"})
        assert str(excinfo.value) == (
            "environment variable CCM_CLEANUP_FINISHED_BEFORE: cleanup.finished_before 7 has no "
            "unit: write 7s, 7m, 7h or 7d"
        )

    def test_test_suite_variables_are_not_settings(self, in_empty_dir: Path):
        """The test suite's and benchmarks' own CCM_* variables and CCM_CONFIG are let through."""
        environ = {
            "CCM_TEST_POSTGRES_URL": "x",
            "CCM_REQUIRE_POSTGRES": "1",
            "CCM_RELIABILITY_FULL": "0",
            "CCM_BENCH_POSTGRES_URL": "x",
        }
        assert load_settings(environ=environ) == Settings()

    def test_api_keys_variable_is_a_comma_separated_list(self, in_empty_dir: Path):
        """CCM_SERVER_API_KEYS=a,b gives two keys, taken verbatim."""
        settings = load_settings(environ={"CCM_SERVER_API_KEYS": "k-1:x, k-2[y]"})
        assert settings.server.api_keys == ["k-1:x", "k-2[y]"]

    def test_unparsable_env_value_names_the_key(self, in_empty_dir: Path):
        """An env value that is not even valid YAML fails with ConfigError naming the key."""
        with pytest.raises(ConfigError, match=r"server\.port"):
            load_settings(environ={"CCM_SERVER_PORT": "[8000"})

    def test_env_list_value(self, in_empty_dir: Path):
        """A list-valued key accepts a YAML flow list from the environment."""
        settings = load_settings(environ={"CCM_SERVER_ALLOWED_HOSTS": "[a.example, b.example]"})
        assert settings.server.allowed_hosts == ["a.example", "b.example"]

    def test_unrelated_env_is_ignored(self, in_empty_dir: Path):
        """Variables without the CCM_ prefix do not affect settings."""
        assert load_settings(environ={"PORT": "1", "CCMX": "2"}) == Settings()


class TestParseDuration:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("30s", timedelta(seconds=30)),
            ("15m", timedelta(minutes=15)),
            ("12h", timedelta(hours=12)),
            ("7d", timedelta(days=7)),
            ("2w", timedelta(weeks=2)),
            ("500ms", timedelta(milliseconds=500)),
            ("1.5s", timedelta(seconds=1.5)),
            (" 5m ", timedelta(minutes=5)),
        ],
    )
    def test_accepts(self, text: object, expected: timedelta):
        """Units ms/s/m/h/d/w parse to the right timedelta."""
        assert parse_duration(text) == expected

    @pytest.mark.parametrize("bare", ["7", "90", 7, 1.5, "0"])
    def test_refuses_a_number_without_a_unit(self, bare: object):
        """A bare number is refused, naming the units to choose from."""
        with pytest.raises(ValueError, match=f"{bare} has no unit: write {bare}s, {bare}m"):
            parse_duration(bare)

    @pytest.mark.parametrize("empty", ["", "  ", None])
    def test_refuses_an_empty_value(self, empty: object):
        """An empty value is refused, never read as a default."""
        with pytest.raises(ValueError, match="is empty"):
            parse_duration(empty)

    def test_timedelta_passes_through(self):
        """A timedelta is returned unchanged."""
        assert parse_duration(timedelta(hours=1)) == timedelta(hours=1)

    @pytest.mark.parametrize("junk", ["soon", "5 minutes", "5x", "m5", "1d2h", "-", True, [1]])
    def test_rejects_junk(self, junk: object):
        """Anything that is not a number with a unit raises ValueError."""
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
        """An invalid override fails naming its source and the key."""
        base = load_settings(environ={})
        with pytest.raises(ConfigError) as excinfo:
            base.with_overrides({"server.port": -1}, source="--port")
        assert str(excinfo.value) == "--port: server.port must be at least 0, not -1"

    def test_python_callers_may_give_seconds(self, in_empty_dir: Path):
        """A number from Python code is seconds; text from the same call still needs a unit."""
        settings = Settings().with_overrides({"server.heartbeat_interval": 0.5})
        assert settings.server.heartbeat_interval == timedelta(seconds=0.5)
        with pytest.raises(ConfigError, match=r"0\.5 has no unit"):
            Settings().with_overrides({"server.heartbeat_interval": "0.5"})

    def test_empty_override_is_refused(self, in_empty_dir: Path):
        """An empty string from the command line is refused, not read as the default."""
        with pytest.raises(ConfigError, match=r"command line: database\.url is empty"):
            Settings().with_overrides({"database.url": ""})

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


# -- generic over the model: a section added to Settings is covered without more code ------------

LEAVES = sorted(".".join(path) for path, is_section in SETTING_KEYS.items() if not is_section)


def _durations(data: dict[str, object], prefix: tuple[str, ...] = ()) -> list[str]:
    found = []
    for key, value in data.items():
        if isinstance(value, dict):
            found += _durations(value, (*prefix, key))
        elif isinstance(value, timedelta):
            found.append(".".join((*prefix, key)))
    return found


DURATIONS = sorted(_durations(Settings().model_dump()))


class TestEveryKey:
    @pytest.mark.parametrize("key", LEAVES)
    def test_a_misspelling_suggests_the_key(self, tmp_path: Path, key: str):
        """Every key, misspelled by one letter, is refused with that key as the suggestion."""
        *section, name = key.split(".")
        typo = name[1:]  # the first letter dropped
        text = "".join(f"{'  ' * i}{part}:\n" for i, part in enumerate(section))
        text += f"{'  ' * len(section)}{typo}: 1\n"
        with pytest.raises(SettingsInvalid) as excinfo:
            load_settings(write(tmp_path, text), environ={})
        assert f"did you mean '{key}'?" in excinfo.value.problems[0]

    @pytest.mark.parametrize("key", LEAVES)
    def test_has_an_environment_variable(self, key: str):
        """Every key can be set from the environment, by the documented name."""
        assert ENV_KEYS["CCM_" + key.replace(".", "_").upper()] == tuple(key.split("."))

    @pytest.mark.parametrize("key", DURATIONS)
    def test_every_duration_refuses_a_bare_number(self, in_empty_dir: Path, key: str):
        """No duration key anywhere takes a number without a unit."""
        var = "CCM_" + key.replace(".", "_").upper()
        with pytest.raises(ConfigError, match=f"{key} 30 has no unit"):
            load_settings(environ={var: "30"})

    def test_the_durations_were_found(self):
        """The duration list above is not empty (else the test before it proves nothing)."""
        assert "cleanup.finished_before" in DURATIONS
        assert "server.heartbeat_interval" in DURATIONS


class TestEffectiveSettings:
    def test_secrets_are_masked_with_their_fingerprint(self, in_empty_dir: Path):
        """Keys show as `*** (fingerprint)`, URL passwords as `***`, durations as written."""
        settings = load_settings(
            environ={
                "CCM_SERVER_API_KEY": "s3cret-key",
                "CCM_DATABASE_URL": "postgresql+psycopg://ccm:hunter2@db/ccm",
            }
        )
        shown = effective_settings(settings, fingerprint)
        assert shown["server"]["api_key"] == f"*** ({fingerprint('s3cret-key')})"
        assert shown["database"]["url"] == "postgresql+psycopg://ccm:***@db/ccm"
        assert shown["database_url"] == "postgresql+psycopg://ccm:***@db/ccm"
        assert shown["cleanup"]["finished_before"] == "7d"
        assert shown["server"]["heartbeat_interval"] == "2m"
        assert shown["metrics"]["require_api_key"] is True
        assert "s3cret-key" not in repr(shown)
        assert "hunter2" not in repr(shown)
