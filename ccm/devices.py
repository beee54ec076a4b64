"""Server-side device configuration: operator facts merged into what a device reports.

The file is YAML or JSON with a top-level `devices:` mapping from device id to an object. The merge
follows the seed (`_merge_device_info`) with two deliberate differences, both about not mutating
shared data: the reported info is deep-copied, and the feature union keeps a stable order
(reported features first, then the configured ones not already present).
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ccm.config import parse_yaml, read_text
from ccm.errors import ConfigError

JSONDict = dict[str, Any]


def load_device_configs(path: Path) -> dict[str, JSONDict]:
    """Read a device config file; errors name the file (and the line, for syntax errors)."""
    text = read_text(path, "device config file")
    data: object
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}, line {exc.lineno}: {exc.msg}") from None
    else:
        data = parse_yaml(text, path)
    if data is None:
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("devices", {}), dict):
        raise ConfigError(
            f"{path}: expected a top-level 'devices:' mapping of device id to settings"
        )
    devices = data.get("devices") or {}
    result: dict[str, JSONDict] = {}
    for device_id, entry in devices.items():
        if entry is None:
            entry = {}
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: devices.{device_id} must be a mapping")
        for key in ("tags", "additional_features"):
            if key in entry and not (
                isinstance(entry[key], list) and all(isinstance(v, str) for v in entry[key])
            ):
                raise ConfigError(f"{path}: devices.{device_id}.{key} must be a list of strings")
        result[str(device_id)] = entry
    return result


def merge_device_info(system_info: Mapping[str, Any], server_config: Mapping[str, Any]) -> JSONDict:
    """Merge operator config into reported system info, as the seed's `_merge_device_info` does.

    All of the config goes into `custom_metadata`; `additional_features` are united with
    `supported_features` (only when the device reported that list); `tags` are copied to the top.
    """
    merged: JSONDict = copy.deepcopy(dict(system_info))
    custom = merged.get("custom_metadata")
    if not isinstance(custom, dict):
        custom = {}
    custom.update(copy.deepcopy(dict(server_config)))
    merged["custom_metadata"] = custom
    if "supported_features" in system_info and "additional_features" in server_config:
        features: list[Any] = []
        for feature in [*system_info["supported_features"], *server_config["additional_features"]]:
            if feature not in features:
                features.append(feature)
        merged["supported_features"] = features
    if "tags" in server_config:
        merged["tags"] = list(server_config["tags"])
    return merged


class DeviceConfigs:
    """The loaded device config file, reloadable while the server runs."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[str, JSONDict] = load_device_configs(path) if path else {}

    def get(self, device_id: str) -> JSONDict | None:
        with self._lock:
            entry = self._entries.get(device_id)
        return copy.deepcopy(entry) if entry is not None else None

    def reload(self) -> int:
        """Re-read the file; on error the previous entries stay in force. Returns the entry count."""
        if self.path is None:
            return 0
        entries = load_device_configs(self.path)
        with self._lock:
            self._entries = entries
        return len(entries)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
