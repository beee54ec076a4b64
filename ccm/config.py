"""Settings: read once from a YAML file plus `CCM_*` environment overrides, then passed down.

Every key has a default, so a missing file is fine unless it was named explicitly. Nested keys map
to environment variables by joining the path with `_`: `cleanup.finished_before` is
`CCM_CLEANUP_FINISHED_BEFORE`. What cannot be right stops the start with one line naming where
the value came from (file and line, or variable) and what to write instead: unknown keys and
unknown `CCM_*` variables (with a "did you mean"), durations without a unit, empty values.
The checks read the models, so a section or key added to `Settings` is covered without more code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from ccm.choices import DocsMode, DuplicatePolicy, LogFormat, LogLevel, SqliteSynchronous
from ccm.durations import DURATION_EXAMPLES, Duration, parse_duration
from ccm.errors import ConfigError
from ccm.settings_report import (
    Origins,
    SettingsInvalid,
    blank_strings,
    problems_of,
    unknown_variables,
)
from ccm.yamlfile import KeyPath, dotted, read_text, read_yaml

DEFAULT_CONFIG_PATH = Path("config/ccm.yaml")
__all__ = [
    "DURATION_EXAMPLES",
    "DocsMode",
    "DuplicatePolicy",
    "Duration",
    "LogFormat",
    "LogLevel",
    "Settings",
    "SqliteSynchronous",
    "load_settings",
    "parse_duration",
]


def _upper(value: object) -> object:
    return value.upper() if isinstance(value, str) else value


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DatabaseSettings(_Section):
    enabled: bool = True
    """False runs ccm without a store: the live registry only, no SQL history (benchmarks,
    throwaway setups). Nothing is persisted, so there is no durable point to wait for, and the
    history endpoints answer 503."""
    url: str | None = None
    """SQLAlchemy URL; None means SQLite at `<data_dir>/ccm.db`."""
    sqlite_synchronous: Annotated[SqliteSynchronous, BeforeValidator(_upper)] = (
        SqliteSynchronous.NORMAL
    )
    pool_size: int = Field(default=5, ge=1)


class WriterSettings(_Section):
    batch_size: int = Field(default=500, ge=1)
    """Most events applied in one transaction."""
    max_queue: int = Field(default=100_000, ge=1)
    """Events held while the database is slow or away; beyond it new sessions are refused."""
    retry_interval: Duration = timedelta(seconds=1)


class CleanupSettings(_Section):
    enabled: bool = True
    interval: Duration = timedelta(hours=1)
    finished_before: Duration = timedelta(days=7)
    """Finished sessions older than this are deleted."""
    connections_retention: Duration = timedelta(days=30)
    """Closed connection rows older than this are deleted."""
    batch_size: int = Field(default=5000, ge=1)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=5000, ge=0, le=65535)
    api_key: str | None = None
    """One key for clients; with `api_keys` empty too, keys come from `<data_dir>/api_key`."""
    api_keys: list[str] = Field(default_factory=list)
    """More keys, all accepted at once (rotation: add the new one, move clients, drop the old)."""
    docs: DocsMode = DocsMode.KEY
    heartbeat_interval: Duration = timedelta(seconds=120)
    """Expected client heartbeat period; silence for 1.5x this closes the connection."""
    last_seen_interval: Duration = timedelta(seconds=60)
    """How often heartbeats reach `clients.last_seen_at` in SQL (they are kept in memory)."""
    ws_ping_interval: Duration = timedelta(seconds=20)
    """WebSocket pings to every client this often; one unanswered for as long is dropped. A
    pong counts as a sign of life, like a frame (stock UFO devices heartbeat every 120 s)."""
    register_timeout: Duration = timedelta(seconds=10)
    max_frame_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    command_timeout: Duration = timedelta(seconds=300)
    send_timeout: Duration = timedelta(seconds=10)
    allowed_hosts: list[str] = Field(default_factory=list)
    """Extra Host header values accepted when bound to loopback (DNS-rebinding guard)."""
    allow_unscoped_constellations: bool = False
    """Let a constellation that registered without target_id task and query any device."""
    max_live_sessions_per_client: int = Field(default=1000, ge=1)
    """Sessions one client may have running at once (no unbounded growth per peer)."""
    agent_runner: str | None = None
    """`package.module:factory` building a runner for natural-language tasks (an LLM agent)."""


class LimitsSettings(_Section):
    """What one client may cost before it is refused: structure of frames, size of what a
    registration asks ccm to keep, connections that have not registered yet, and how long history
    reads may wait on the database."""

    max_json_depth: int = Field(default=256, ge=8, le=400)
    """Deepest nesting (objects and arrays) a frame may have. UFO's clients cannot send deeper
    than 255 (pydantic stops serialising there); the ceiling keeps every copy and encoder in the
    server well inside Python's recursion limit."""
    max_metadata_bytes: int = Field(default=64 * 1024, ge=1024)
    """Size of a REGISTER's `metadata` as JSON, not counting `system_info`."""
    max_system_info_bytes: int = Field(default=64 * 1024, ge=1024)
    """Size of a REGISTER's `metadata.system_info` as JSON (UFO's is under 2 KB)."""
    request_timeout: Duration = timedelta(seconds=10)
    """An HTTP request (or WebSocket upgrade) whose headers and body have not all arrived this
    long after the connection opened (or after the previous response) is closed with 408."""
    max_pending_connections: int = Field(default=10_000, ge=1)
    """Connections that have not finished a request or registered yet, in total; never more than
    half the open-files limit. High enough that a fleet reconnecting at once (a restart, a node
    lost) is not turned away: 10,000 devices register in about 11 s under this cap, and took 42 s
    under a cap of 1,000, whose refused clients all came back (the burst benchmark)."""
    max_pending_per_address: int = Field(default=500, ge=1)
    """The same, from one remote address."""
    history_timeout: Duration = timedelta(seconds=5)
    """A history read (SQL behind an HTTP route) not answered within this is a 503."""
    max_history_reads: int = Field(default=4, ge=1)
    """History reads running at once; more wait for a slot within `history_timeout`."""


class MetricsSettings(_Section):
    enabled: bool = True
    require_api_key: bool = True
    """`/metrics` needs `X-API-Key` (or `Authorization: Bearer <key>`) like the API."""
    port: int | None = Field(default=None, ge=0, le=65535)
    """Also serve metrics without a key on this port (bound to `metrics.host`)."""
    host: str = "127.0.0.1"


class LoggingSettings(_Section):
    level: Annotated[LogLevel, BeforeValidator(_upper)] = LogLevel.INFO
    format: LogFormat = LogFormat.TEXT


class FlappingSettings(_Section):
    """A client id, or a remote address, that connects too often is refused for a while (like
    EMQX's flapping detection: two devices sharing one id, a crash loop, a reconnect storm)."""

    enabled: bool = True
    max_connects: int = Field(default=15, ge=1)
    """Registrations of one client id allowed per `window`; one more is refused for `ban`."""
    max_connects_per_address: int = Field(default=120, ge=1)
    """WebSocket connections from one remote address allowed per `window`."""
    window: Duration = timedelta(seconds=60)
    ban: Duration = timedelta(minutes=5)
    exempt_addresses: list[str] = Field(default_factory=lambda: ["127.0.0.1", "::1"])
    """Addresses the per-address rule leaves alone (loopback: local tools and tests)."""


class ClusterSettings(_Section):
    """Nodes on one PostgreSQL database form a cluster with no other setting (see README,
    "Running a cluster"); SQLite is always a single node."""

    node_name: str | None = None
    """The node's name in /api/nodes and the dashboard (default: hostname:port)."""
    advertise_address: str | None = None
    """host:port that clients use to reach this node (default: server.host:server.port)."""
    lease: Duration = timedelta(seconds=10)
    """A node that has not renewed its lease for this long is declared dead by the others;
    it renews every third of it."""


class DispatchSettings(_Section):
    """How many sessions a device runs at once, and how many wait for it (README, "How tasks
    run"). A device's `max_concurrent_tasks` in the device config comes first."""

    default_max_concurrent_tasks: int | None = Field(default=None, ge=1)
    """Capacity of a device with none configured (and none accepted from its registration);
    None: unlimited."""
    capacity_from_registration: bool = False
    """Accept `max_concurrent_tasks` from a device's REGISTER metadata (or its system_info)
    when the device config gives none: trusts what devices say about themselves."""
    max_queue_per_device: int = Field(default=100, ge=0)
    """Sessions that may wait (`pending`) for a device at capacity; one more is refused."""


class Settings(_Section):
    data_dir: Path = Path("data")
    device_config: Path | None = None
    duplicate_policy: DuplicatePolicy = DuplicatePolicy.REJECT
    database: DatabaseSettings = DatabaseSettings()
    writer: WriterSettings = WriterSettings()
    cleanup: CleanupSettings = CleanupSettings()
    server: ServerSettings = ServerSettings()
    limits: LimitsSettings = LimitsSettings()
    metrics: MetricsSettings = MetricsSettings()
    logging: LoggingSettings = LoggingSettings()
    cluster: ClusterSettings = ClusterSettings()
    flapping: FlappingSettings = FlappingSettings()
    dispatch: DispatchSettings = DispatchSettings()

    @property
    def database_url(self) -> str:
        """The configured URL, or the embedded SQLite default under the data directory."""
        if self.database.url:
            return self.database.url
        return f"sqlite:///{(self.data_dir / 'ccm.db').as_posix()}"

    def with_overrides(
        self, overrides: Mapping[str, Any], *, source: str = "command line"
    ) -> Settings:
        """A copy with dotted keys replaced (`{"server.port": 8000}`), validated again; None
        values (an option not given) are skipped. For the Python callers of this method (tests,
        code embedding ccm), a duration may be a timedelta or a number of seconds; text still
        needs its unit, as in the file and the environment."""
        data = self.model_dump()
        origins = Origins()
        for key, value in overrides.items():
            if value is None:
                continue
            path = tuple(key.split("."))
            if isinstance(_get_path(data, path), timedelta) and _is_number(value):
                value = timedelta(seconds=value)
            _set_path(data, path, value)
            origins.set(path, source)
        return _validate(data, origins, [])


# -- the models, walked ------------------------------------------------------------------------


def _section_model(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _keys(model: type[BaseModel], prefix: KeyPath = ()) -> dict[KeyPath, bool]:
    """Every key path of `model`, mapped to whether it is a section (a mapping of keys)."""
    keys: dict[KeyPath, bool] = {}
    for name, info in model.model_fields.items():
        path = (*prefix, name)
        section = _section_model(info.annotation)
        keys[path] = section is not None
        if section is not None:
            keys.update(_keys(section, path))
    return keys


SETTING_KEYS = _keys(Settings)
"""Every key path in the settings, True for sections."""

ENV_KEYS = {
    "CCM_" + "_".join(path).upper(): path
    for path, is_section in SETTING_KEYS.items()
    if not is_section
}
"""Every `CCM_*` variable that overrides a key, and the key's path."""

_VERBATIM = {"url", "api_key", "api_keys"}
"""Keys whose environment value is taken as text, never read as YAML (secrets and URLs)."""


def environment_problems(environ: Mapping[str, str]) -> list[str]:
    """`CCM_*` variables that are not settings (see `settings_report.unknown_variables`)."""
    return unknown_variables(environ, ENV_KEYS)


def _validate(data: Mapping[str, Any], origins: Origins, problems: list[str]) -> Settings:
    """The settings, or SettingsInvalid with every problem: those found while reading, empty
    values, and what the model refuses."""
    blank = list(blank_strings(data))
    problems = problems + [
        f"{origins.of(path)}: {dotted(path)} is empty: give a value, or leave it out for the "
        "default"
        for path in blank
    ]
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        problems += problems_of(exc, origins, SETTING_KEYS, skip=blank)
    else:
        if not problems:
            return settings
    raise SettingsInvalid(problems)


def _read_settings_file(path: Path, origins: Origins, problems: list[str]) -> dict[str, Any]:
    document = read_yaml(read_text(path, "config file"), path)
    if document.data is None:
        return {}
    if not isinstance(document.data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys (`server:` ...)")
    data: dict[str, Any] = document.data
    for key, line in document.lines.items():
        origins.set(key, f"{path}, line {line}")
    for key in sorted(document.empty, key=document.lines.__getitem__):
        if SETTING_KEYS.get(key):  # an empty section (`server:` with nothing under it)
            _set_path(data, key, {})
        elif key in SETTING_KEYS:
            problems.append(
                f"{document.where(key)}: {dotted(key)} is empty: write a value, or null for "
                "the default"
            )
    return data


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _get_path(data: Mapping[str, Any], path: KeyPath) -> Any:
    node: Any = data
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _set_path(data: dict[str, Any], path: KeyPath, value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config key '{part}' must be a mapping of keys")
        node = child
    node[path[-1]] = value


def _env_value(var: str, raw: str, key_path: KeyPath) -> Any:
    if key_path[-1] == "api_keys":
        return [part.strip() for part in raw.split(",")]
    if key_path[-1] in _VERBATIM:
        return raw  # never reinterpret secrets or URLs as YAML
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(
            f"environment variable {var}: cannot read {raw!r} as a value for {dotted(key_path)}"
        ) from None


def load_settings(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read settings from `path` (or `$CCM_CONFIG`, or `config/ccm.yaml` if present) and the env.

    A file that was named (argument or `CCM_CONFIG`) must exist; the default path is optional.
    Every problem found is reported (SettingsInvalid.problems), not only the first.
    """
    env = os.environ if environ is None else environ
    problems = environment_problems(env)
    origins = Origins()
    if "CCM_CONFIG" in env and not env["CCM_CONFIG"].strip():
        raise ConfigError("environment variable CCM_CONFIG is empty: name a file, or unset it")
    named = path or (Path(env["CCM_CONFIG"]) if env.get("CCM_CONFIG") else None)
    if named is not None:
        data = _read_settings_file(named, origins, problems)
    elif DEFAULT_CONFIG_PATH.is_file():
        data = _read_settings_file(DEFAULT_CONFIG_PATH, origins, problems)
    else:
        data = {}
    for var, key_path in ENV_KEYS.items():
        if var in env:
            origins.set(key_path, f"environment variable {var}")
            if not env[var].strip():
                problems.append(
                    f"environment variable {var} is empty: give {dotted(key_path)} a value, or "
                    f"unset {var} for the default"
                )
                continue
            _set_path(data, key_path, _env_value(var, env[var], key_path))
    return _validate(data, origins, problems)
