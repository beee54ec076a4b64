"""`ccm key`: list, add and revoke the API keys of the key file, by fingerprint.

A running server reads the key file again when it changes, so rotating a key needs no restart:
`ccm key add`, move the clients to the new key, `ccm key revoke <old fingerprint>`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ccm.commands.options import ConfigOpt, JsonOpt, load
from ccm.commands.output import err, print_json, say
from ccm.config import Settings
from ccm.errors import CcmError
from ccm.server.auth import (
    API_KEY_FILE,
    add_key,
    configured_keys,
    fingerprint,
    read_key_file,
    revoke_key,
)

key_app = typer.Typer(
    help="The API keys: list, add, revoke (by fingerprint).", no_args_is_help=True
)


def _key_file(settings: Settings) -> Path:
    return Path(settings.data_dir) / API_KEY_FILE


def _refuse_when_configured(settings: Settings) -> None:
    if configured_keys(settings):
        raise CcmError(
            "the keys come from the settings (server.api_key / server.api_keys, or "
            "CCM_SERVER_API_KEY): change them there and restart; `ccm key` edits "
            f"{_key_file(settings)}, which is not read while keys are configured"
        )


@key_app.command("list")
def key_list(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """The fingerprints of the keys the server accepts; clients use the newest (last)."""
    settings = load(config)
    configured = configured_keys(settings)
    path = _key_file(settings)
    if configured:
        keys, source = configured, "the settings"
    else:
        keys, source = (read_key_file(path) if path.is_file() else []), str(path)
    if as_json:
        print_json({"source": source, "fingerprints": [fingerprint(k) for k in keys]})
        return
    if not keys:
        say(f"no keys yet: `ccm serve` generates one into {path}, or run `ccm key add`")
        return
    say(f"{len(keys)} key(s) from {source}, oldest first:")
    for n, key in enumerate(keys):
        say(
            f"  {fingerprint(key)}"
            + ("  (newest: clients use this one)" if n == len(keys) - 1 else "")
        )


@key_app.command("add")
def key_add(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Add a new random key to the key file and print it once (accepted at once, beside the old).

    A running server reads the key file again when it changes."""
    settings = load(config)
    _refuse_when_configured(settings)
    path = _key_file(settings)
    key = add_key(path)
    if as_json:
        print_json({"key": key, "fingerprint": fingerprint(key), "file": str(path)})
        return
    say(key)
    say(
        f"added key {fingerprint(key)} to {path} (shown only now). Move the clients to it, then "
        "`ccm key revoke <old fingerprint>` (`ccm key list` shows them).",
        console=err,
    )


@key_app.command("revoke")
def key_revoke(
    fingerprint_prefix: Annotated[
        str, typer.Argument(metavar="FINGERPRINT", help="The key's fingerprint (or its start).")
    ],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Remove a key from the key file; a running server refuses it from its next check on."""
    settings = load(config)
    _refuse_when_configured(settings)
    gone = revoke_key(_key_file(settings), fingerprint_prefix)
    if as_json:
        print_json({"revoked": gone})
        return
    say(f"revoked key {gone}: new connections and requests with it are refused")
