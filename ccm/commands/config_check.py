"""`ccm config check`: everything `ccm serve` would check before serving, without serving.

The settings file, the environment and the device config are read, the port is tried, the
database is reached and its schema compared with the code; then the settings in force are printed
with secrets masked. Every problem is listed (not only the first); exit status 1 if there is one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import typer
import yaml

from ccm.commands.options import ConfigOpt, JsonOpt, UrlOpt, database_errors, load, sqlite_file
from ccm.commands.output import out, print_json, say
from ccm.commands.ports import METRICS_PORT, SERVER_PORT, check_port
from ccm.config import Settings
from ccm.devices import DeviceConfigs
from ccm.errors import CcmError, ConfigError
from ccm.server.auth import API_KEY_FILE, configured_keys, fingerprint, read_key_file
from ccm.settings_report import SettingsInvalid, effective_settings, mask_url
from ccm.store import migrate
from ccm.store.engine import is_sqlite, make_engine

config_app = typer.Typer(help="Check the configuration without starting the server.")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    failure: bool = True
    """False: worth saying, but `ccm serve` would still start (a busy port is one)."""


def _database(settings: Settings) -> Check:
    url = mask_url(settings.database_url)
    if not settings.database.enabled:
        return Check("database", True, "database.enabled is false: no history is kept")
    try:
        with database_errors(settings):
            file = sqlite_file(settings.database_url) if is_sqlite(settings.database_url) else None
            if file is not None and not file.is_file():
                return Check("database", True, f"{url}: not there yet; `ccm serve` creates it")
            engine = make_engine(settings.database_url)
            try:
                current = migrate.current_revision(engine)
            finally:
                engine.dispose()
    except CcmError as exc:
        return Check("database", False, str(exc))
    head = migrate.head_revision()
    if current == head:
        return Check("database", True, f"{url}: reachable, schema at head {head}")
    if is_sqlite(settings.database_url):
        return Check("database", True, f"{url}: at {current}, `ccm serve` migrates it to {head}")
    return Check(
        "database",
        False,
        f"{url}: schema at {current or 'nothing'}, code expects {head}; run `ccm db upgrade`",
    )


def _keys(settings: Settings) -> Check:
    configured = configured_keys(settings)
    if configured:
        prints = ", ".join(fingerprint(k) for k in configured)
        return Check("api keys", True, f"{prints} (from the settings)")
    path = Path(settings.data_dir) / API_KEY_FILE
    keys = read_key_file(path) if path.is_file() else []
    if not keys:
        return Check("api keys", True, f"none yet: `ccm serve` generates one into {path}")
    return Check("api keys", True, f"{', '.join(fingerprint(k) for k in keys)} (from {path})")


def _port(name: str, host: str, port: int, change: str) -> Check:
    try:
        check_port(host, port, change)
    except CcmError as exc:
        return Check(name, False, str(exc), failure=False)
    return Check(name, True, f"{host}:{port} is free")


def _checks(settings: Settings) -> list[Check]:
    checks = [Check("settings", True, "valid")]
    try:
        devices = DeviceConfigs(settings.device_config)
        where = settings.device_config or "none configured"
        checks.append(Check("device config", True, f"{where}: {len(devices)} devices"))
    except ConfigError as exc:
        checks.append(Check("device config", False, str(exc)))
    checks.append(_port("port", settings.server.host, settings.server.port, SERVER_PORT))
    if settings.metrics.enabled and settings.metrics.port is not None:
        checks.append(
            _port("metrics port", settings.metrics.host, settings.metrics.port, METRICS_PORT)
        )
    checks.append(_database(settings))
    checks.append(_keys(settings))
    return checks


@config_app.command("check")
def config_check(
    config: ConfigOpt = None, database_url: UrlOpt = None, as_json: JsonOpt = False
) -> None:
    """Check settings, environment, device config, port and database; print what is in force.

    Secrets are masked (keys by their fingerprint, URL passwords as ***)."""
    try:
        settings = load(config, database_url)
    except SettingsInvalid as exc:
        if as_json:
            print_json({"ok": False, "problems": exc.problems})
        else:
            for problem in exc.problems:
                say(f"problem: {problem}")
        raise CcmError(f"{len(exc.problems)} problem(s) in the settings, listed above") from None
    checks = _checks(settings)
    failed = [c for c in checks if not c.ok and c.failure]
    effective = effective_settings(settings, fingerprint)
    if as_json:
        print_json({"ok": not failed, "checks": [asdict(c) for c in checks], "settings": effective})
    else:
        for check in checks:
            mark = "ok  " if check.ok else ("FAIL" if check.failure else "note")
            say(f"{mark} {check.name}: {check.detail}")
        say("settings in force:")
        out.print(
            yaml.safe_dump(effective, sort_keys=False, default_flow_style=False).rstrip(),
            markup=False,
            highlight=False,
        )
    if failed:
        raise CcmError(f"{len(failed)} check(s) failed: {'; '.join(c.name for c in failed)}")
