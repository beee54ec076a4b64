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

from ccm.domain import Mode
from ccm.errors import ConfigError
from ccm.settings_report import suggest
from ccm.yamlfile import YamlDocument, read_text, read_yaml

JSONDict = dict[str, Any]

TOP_LEVEL_KEYS: dict[tuple[str, ...], bool] = {("devices",): True}
"""The only key a device config file has at the top; anything else is a typo (`device:` would
otherwise load zero devices without a word)."""


def _document(path: Path) -> YamlDocument:
    text = read_text(path, "device config file")
    if path.suffix.lower() != ".json":
        return read_yaml(text, path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}, line {exc.lineno}: {exc.msg}") from None
    return YamlDocument(path, data, {}, frozenset())


def load_device_configs(path: Path) -> dict[str, JSONDict]:
    """Read a device config file; errors name the file and the line."""
    document = _document(path)
    data = document.data
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a top-level 'devices:' mapping of device id to settings"
        )
    for key in data:
        if key != "devices":
            hint = suggest((str(key),), TOP_LEVEL_KEYS) or "; the file holds one key, 'devices:'"
            raise ConfigError(f"{document.where((str(key),))}: unknown key '{key}'{hint}")
    devices = data.get("devices") or {}
    if not isinstance(devices, dict):
        raise ConfigError(
            f"{document.where(('devices',))}: 'devices' must be a mapping of device id to settings"
        )
    result: dict[str, JSONDict] = {}
    for device_id, entry in devices.items():
        where = document.where(("devices", str(device_id)))
        if entry is None:
            entry = {}
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: devices.{device_id} must be a mapping of settings")
        for key in ("tags", "additional_features"):
            if key in entry and not (
                isinstance(entry[key], list) and all(isinstance(v, str) for v in entry[key])
            ):
                raise ConfigError(
                    f"{document.where(('devices', str(device_id), key))}: "
                    f"devices.{device_id}.{key} must be a list of strings, such as [a, b]"
                )
        if "execution" in entry and entry["execution"] not in {m.value for m in Mode}:
            modes = " or ".join(m.value for m in Mode)
            raise ConfigError(
                f"{document.where(('devices', str(device_id), 'execution'))}: "
                f"devices.{device_id}.execution must be {modes}, not {entry['execution']!r}"
            )
        capacity = entry.get("max_concurrent_tasks")
        if "max_concurrent_tasks" in entry and capacity_value(capacity) is None:
            raise ConfigError(
                f"{document.where(('devices', str(device_id), 'max_concurrent_tasks'))}: "
                f"devices.{device_id}.max_concurrent_tasks must be a whole number of at least 1, "
                f"not {capacity!r}"
            )
        result[str(device_id)] = entry
    return result


def capacity_value(value: object) -> int | None:
    """`value` as a device capacity (a whole number, at least 1), or None if it is not one."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return None


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

    def ids(self) -> list[str]:
        """The configured device ids, in file order."""
        with self._lock:
            return list(self._entries)

    def reload(self) -> int:
        """Re-read the file; on error the previous entries stay in force. Returns the count."""
        if self.path is None:
            return 0
        entries = load_device_configs(self.path)
        with self._lock:
            self._entries = entries
        return len(entries)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
