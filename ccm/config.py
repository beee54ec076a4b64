"""Settings: read once from a YAML file plus `CCM_*` environment overrides, then passed down.

Every key has a default, so a missing file is fine unless it was named explicitly. Nested keys map
to environment variables by joining the path with `_`: `cleanup.finished_before` is
`CCM_CLEANUP_FINISHED_BEFORE`. Invalid values fail at start with the key named.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from ccm.errors import ConfigError

DEFAULT_CONFIG_PATH = Path("config/ccm.yaml")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: object) -> timedelta:
    """Parse `90`, `30s`, `15m`, `12h`, `7d`, `2w` (a bare number is seconds)."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=float(value))
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 15m, 12h, 7d)")


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


class DuplicatePolicy(StrEnum):
    REJECT = "reject"
    TAKEOVER = "takeover"


class SqliteSynchronous(StrEnum):
    OFF = "OFF"
    NORMAL = "NORMAL"
    FULL = "FULL"
    EXTRA = "EXTRA"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DatabaseSettings(_Section):
    enabled: bool = True
    """False runs ccm without a store: the live registry only, no SQL history (benchmarks,
    throwaway setups). Nothing is persisted, so there is no durable point to wait for, and the
    history endpoints answer 503."""
    url: str | None = None
    """SQLAlchemy URL; None means SQLite at `<data_dir>/ccm.db`."""
    sqlite_synchronous: SqliteSynchronous = SqliteSynchronous.NORMAL
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
    max_live_sessions_per_client: int = Field(default=1000, ge=1)
    """Sessions one client may have running at once (6.13: no unbounded growth per peer)."""
    """Let a constellation that registered without target_id task and query any device."""
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
    max_pending_connections: int = Field(default=1000, ge=1)
    """Connections that have not finished a request or registered yet, in total; never more than
    half the open-files limit."""
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
    level: str = "INFO"
    format: str = Field(default="text", pattern="^(text|json)$")


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

    @property
    def database_url(self) -> str:
        """The configured URL, or the embedded SQLite default under the data directory."""
        if self.database.url:
            return self.database.url
        return f"sqlite:///{(self.data_dir / 'ccm.db').as_posix()}"

    def with_overrides(self, overrides: Mapping[str, Any]) -> Settings:
        """A copy with dotted keys replaced (`{"server.port": 8000}`), validated again."""
        data = self.model_dump()
        for dotted, value in overrides.items():
            if value is None:
                continue
            _set_path(data, dotted.split("."), value)
        return _validate(data, source="command line")


def _env_keys(model: type[BaseModel], prefix: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    keys: dict[str, tuple[str, ...]] = {}
    for name, field in model.model_fields.items():
        path = (*prefix, name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.update(_env_keys(annotation, path))
        else:
            keys["CCM_" + "_".join(path).upper()] = path
    return keys


ENV_KEYS = _env_keys(Settings)
"""Every `CCM_*` variable that overrides a key, and the key's path."""


def _set_path(data: dict[str, Any], path: list[str] | tuple[str, ...], value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{part}' must be a mapping")
    node[path[-1]] = value


def _validate(data: Mapping[str, Any], *, source: str) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"'{'.'.join(str(p) for p in err['loc'])}': {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration in {source}: {problems}") from None


def parse_yaml(text: str, path: Path) -> object:
    """YAML to Python; a syntax error becomes a ConfigError naming the file and line."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        line = exc.problem_mark.line + 1 if exc.problem_mark else "?"
        raise ConfigError(f"{path}, line {line}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def read_text(path: Path, what: str) -> str:
    """A config file's text; a missing, unreadable or non-UTF-8 file is a ConfigError."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text: {exc.reason}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    data = parse_yaml(read_text(path, "config file"), path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return data


def load_settings(
    path: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Read settings from `path` (or `$CCM_CONFIG`, or `config/ccm.yaml` if present) and the env.

    A file that was named (argument or `CCM_CONFIG`) must exist; the default path is optional.
    """
    env = os.environ if environ is None else environ
    named = path or (Path(env["CCM_CONFIG"]) if env.get("CCM_CONFIG") else None)
    if named is not None:
        data = _read_yaml(named)
        source = str(named)
    elif DEFAULT_CONFIG_PATH.is_file():
        data = _read_yaml(DEFAULT_CONFIG_PATH)
        source = str(DEFAULT_CONFIG_PATH)
    else:
        data, source = {}, "defaults"
    for var, key_path in ENV_KEYS.items():
        if var in env:
            raw = env[var]
            value: Any
            if key_path[-1] in {"url", "api_key"}:
                value = raw  # never reinterpret secrets or URLs as YAML
            else:
                try:
                    value = yaml.safe_load(raw) if raw.strip() else None
                except yaml.YAMLError:
                    key = ".".join(key_path)
                    raise ConfigError(f"{var} (config key '{key}'): cannot parse {raw!r}") from None
            _set_path(data, key_path, value)
            source = f"{source} + environment"
    return _validate(data, source=source)
