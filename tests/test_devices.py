"""Tests for server-side device configuration: loading, merging, and reloading into the registry."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from ccm import ClientConnectionManager, ClientType
from ccm.devices import DeviceConfigs, load_device_configs, merge_device_info
from ccm.errors import ConfigError

SEED_SYSTEM_INFO: dict[str, Any] = {
    "os": "Windows",
    "screen_resolution": "1920x1080",
    "supported_features": ["ui_automation", "web_browsing", "file_ops"],
}

SEED_CONFIG: dict[str, Any] = {
    "tags": ["production", "office", "high_priority"],
    "tier": "high_performance",
    "additional_features": ["excel_automation", "pdf_generation"],
    "max_concurrent_tasks": 5,
}

SEED_RESULT: dict[str, Any] = {
    "os": "Windows",
    "screen_resolution": "1920x1080",
    "supported_features": [
        "ui_automation",
        "web_browsing",
        "file_ops",
        "excel_automation",
        "pdf_generation",
    ],
    "tags": ["production", "office", "high_priority"],
    "custom_metadata": {
        "tier": "high_performance",
        "max_concurrent_tasks": 5,
        "tags": ["production", "office", "high_priority"],
        "additional_features": ["excel_automation", "pdf_generation"],
    },
}

SEED_YAML = """\
devices:
  device_windows_001:
    tags: ["production", "office", "high_priority"]
    tier: "high_performance"
    additional_features: ["excel_automation", "pdf_generation"]
    max_concurrent_tasks: 5

  device_linux_001:
    tags: ["development", "testing"]
    tier: "standard"
    additional_features: ["docker_support"]
"""


def register(
    manager: ClientConnectionManager,
    device_id: str,
    system_info: dict[str, Any] | None,
    client_type: ClientType = ClientType.DEVICE,
) -> None:
    metadata: dict[str, Any] = {"hostname": device_id}
    if system_info is not None:
        metadata["system_info"] = system_info
    manager.add_client(device_id, "windows", object(), client_type, metadata)


class TestMergeDeviceInfo:
    def test_seed_worked_example(self):
        """merge_device_info gives exactly the seed's documented result."""
        assert merge_device_info(SEED_SYSTEM_INFO, SEED_CONFIG) == SEED_RESULT

    def test_feature_order_is_stable(self):
        """Reported features come first, then configured ones, in their given order."""
        merged = merge_device_info(SEED_SYSTEM_INFO, SEED_CONFIG)
        assert merged["supported_features"] == [
            "ui_automation",
            "web_browsing",
            "file_ops",
            "excel_automation",
            "pdf_generation",
        ]

    def test_feature_in_both_is_not_duplicated(self):
        """A feature both reported and configured appears once."""
        config = {**SEED_CONFIG, "additional_features": ["file_ops", "excel_automation"]}
        merged = merge_device_info(SEED_SYSTEM_INFO, config)
        assert merged["supported_features"] == [
            "ui_automation",
            "web_browsing",
            "file_ops",
            "excel_automation",
        ]

    def test_reported_dict_is_not_mutated(self):
        """The reported system_info (and its nested lists/dicts) is left unchanged."""
        reported = copy.deepcopy(SEED_SYSTEM_INFO)
        reported["custom_metadata"] = {"owner": "it"}
        before = copy.deepcopy(reported)
        merge_device_info(reported, SEED_CONFIG)
        assert reported == before

    def test_config_dict_is_not_mutated(self):
        """The server config passed in is left unchanged."""
        config = copy.deepcopy(SEED_CONFIG)
        merged = merge_device_info(SEED_SYSTEM_INFO, config)
        merged["tags"].append("x")
        merged["custom_metadata"]["tags"].append("y")
        assert config == SEED_CONFIG

    def test_existing_custom_metadata_is_kept_and_updated(self):
        """Reported custom_metadata keys survive; config keys are added over them."""
        reported = {**SEED_SYSTEM_INFO, "custom_metadata": {"owner": "it", "tier": "low"}}
        merged = merge_device_info(reported, {"tier": "high"})
        assert merged["custom_metadata"] == {"owner": "it", "tier": "high"}

    def test_no_supported_features_reported_means_none_added(self):
        """additional_features only extend a reported supported_features list (seed rule)."""
        merged = merge_device_info({"os": "Linux"}, {"additional_features": ["docker_support"]})
        assert "supported_features" not in merged
        assert merged["custom_metadata"] == {"additional_features": ["docker_support"]}

    def test_without_additional_features_features_unchanged(self):
        """Config without additional_features leaves supported_features as reported."""
        merged = merge_device_info(SEED_SYSTEM_INFO, {"tier": "standard"})
        assert merged["supported_features"] == SEED_SYSTEM_INFO["supported_features"]
        assert "tags" not in merged


class TestLoadDeviceConfigs:
    def test_reads_yaml(self, tmp_path: Path):
        """A YAML file's devices mapping is returned by device id."""
        path = tmp_path / "devices.yaml"
        path.write_text(SEED_YAML)
        configs = load_device_configs(path)
        assert configs["device_windows_001"] == SEED_CONFIG
        assert configs["device_linux_001"]["additional_features"] == ["docker_support"]
        assert set(configs) == {"device_windows_001", "device_linux_001"}

    def test_reads_json(self, tmp_path: Path):
        """A .json file is parsed as JSON."""
        path = tmp_path / "devices.json"
        path.write_text(json.dumps({"devices": {"device_windows_001": SEED_CONFIG}}))
        assert load_device_configs(path) == {"device_windows_001": SEED_CONFIG}

    def test_empty_file_is_no_devices(self, tmp_path: Path):
        """An empty YAML file configures no devices."""
        path = tmp_path / "devices.yaml"
        path.write_text("")
        assert load_device_configs(path) == {}

    def test_missing_file_names_the_file(self, tmp_path: Path):
        """A missing file raises ConfigError naming it."""
        path = tmp_path / "nope.yaml"
        with pytest.raises(ConfigError, match=re.escape("nope.yaml")):
            load_device_configs(path)

    def test_malformed_yaml_names_file_and_line(self, tmp_path: Path):
        """A YAML syntax error names the file and the line of the mistake (the unclosed '['),
        not the line where the parser gave up."""
        path = tmp_path / "bad.yaml"
        path.write_text('devices:\n  d1:\n    tags: ["a", "b"\n    tier: x\n')
        with pytest.raises(ConfigError) as excinfo:
            load_device_configs(path)
        assert str(excinfo.value) == f"{path}, line 3: '[' is never closed"

    def test_misspelled_top_level_key_is_refused_with_a_suggestion(self, tmp_path: Path):
        """`device:` instead of `devices:` stops the load, naming the line and the right key,
        instead of loading zero devices."""
        path = tmp_path / "devices.yaml"
        path.write_text("# lab machines\ndevice:\n  d1:\n    tags: [lab]\n")
        with pytest.raises(ConfigError) as excinfo:
            load_device_configs(path)
        assert str(excinfo.value) == (
            f"{path}, line 2: unknown key 'device'; did you mean 'devices'?"
        )

    def test_unrelated_top_level_key_says_what_the_file_holds(self, tmp_path: Path):
        """A top-level key nothing like `devices` says the file holds only that key."""
        path = tmp_path / "devices.yaml"
        path.write_text("devices: {}\nservers: {}\n")
        with pytest.raises(ConfigError, match="line 2: unknown key 'servers'; the file holds"):
            load_device_configs(path)

    def test_device_id_given_twice_is_refused(self, tmp_path: Path):
        """A device id repeated in the file names both lines (YAML would keep the last)."""
        path = tmp_path / "devices.yaml"
        path.write_text("devices:\n  d1:\n    tier: a\n  d1:\n    tier: b\n")
        with pytest.raises(ConfigError, match=r"line 4: 'devices\.d1' is already set on line 2"):
            load_device_configs(path)

    def test_unknown_execution_mode_is_refused(self, tmp_path: Path):
        """`execution: rely` is refused with the modes, not silently run as agent mode."""
        path = tmp_path / "devices.yaml"
        path.write_text("devices:\n  d1:\n    execution: rely\n")
        with pytest.raises(ConfigError) as excinfo:
            load_device_configs(path)
        assert str(excinfo.value) == (
            f"{path}, line 3: devices.d1.execution must be relay or agent, not 'rely'"
        )

    def test_malformed_json_names_file_and_line(self, tmp_path: Path):
        """A JSON syntax error names the file and the line of the problem."""
        path = tmp_path / "bad.json"
        path.write_text('{\n  "devices": {\n    "d1": {"tier": "x",}\n  }\n}\n')
        with pytest.raises(ConfigError) as excinfo:
            load_device_configs(path)
        message = str(excinfo.value)
        assert str(path) in message
        assert "line 3" in message

    def test_devices_not_a_mapping_is_rejected(self, tmp_path: Path):
        """A top-level devices list raises ConfigError naming the file."""
        path = tmp_path / "devices.yaml"
        path.write_text("devices:\n  - d1\n")
        with pytest.raises(ConfigError, match=re.escape("devices.yaml")):
            load_device_configs(path)

    def test_tags_must_be_list_of_strings(self, tmp_path: Path):
        """tags given as a plain string raises ConfigError naming the line, device and key."""
        path = tmp_path / "devices.yaml"
        path.write_text("devices:\n  d1:\n    tags: production\n")
        with pytest.raises(ConfigError, match=r"line 3: devices\.d1\.tags must be a list"):
            load_device_configs(path)


class TestRegistryMerge:
    def test_merges_device_with_system_info_and_config(self, tmp_path: Path):
        """A configured device reporting system_info gets the merged info at registration."""
        path = tmp_path / "devices.yaml"
        path.write_text(SEED_YAML)
        manager = ClientConnectionManager(path)
        register(manager, "device_windows_001", copy.deepcopy(SEED_SYSTEM_INFO))
        assert manager.get_device_system_info("device_windows_001") == SEED_RESULT
        assert manager.find_devices_with_capability("pdf_generation") == ["device_windows_001"]
        assert manager.find_devices_with_tag("high_priority") == ["device_windows_001"]

    def test_device_without_system_info_is_not_merged(self, tmp_path: Path):
        """A configured device that reported no system_info keeps system_info None."""
        path = tmp_path / "devices.yaml"
        path.write_text(SEED_YAML)
        manager = ClientConnectionManager(path)
        register(manager, "device_windows_001", None)
        assert manager.get_device_system_info("device_windows_001") is None
        assert manager.find_devices_with_tag("production") == []

    def test_device_without_config_entry_keeps_reported_info(self, tmp_path: Path):
        """A device with no config entry keeps exactly what it reported."""
        path = tmp_path / "devices.yaml"
        path.write_text(SEED_YAML)
        manager = ClientConnectionManager(path)
        register(manager, "device_other", copy.deepcopy(SEED_SYSTEM_INFO))
        assert manager.get_device_system_info("device_other") == SEED_SYSTEM_INFO

    def test_constellation_with_config_id_is_not_merged(self, tmp_path: Path):
        """A constellation using a configured id gets no system_info."""
        path = tmp_path / "devices.yaml"
        path.write_text(SEED_YAML)
        manager = ClientConnectionManager(path)
        register(
            manager, "device_windows_001", copy.deepcopy(SEED_SYSTEM_INFO), ClientType.CONSTELLATION
        )
        info = manager.get_client_info("device_windows_001")
        assert info is not None
        assert info.system_info is None

    def test_registration_does_not_mutate_reported_dict(self, tmp_path: Path):
        """The system_info dict passed in metadata is not changed by the merge."""
        path = tmp_path / "devices.yaml"
        path.write_text(SEED_YAML)
        manager = ClientConnectionManager(path)
        reported = copy.deepcopy(SEED_SYSTEM_INFO)
        register(manager, "device_windows_001", reported)
        assert reported == SEED_SYSTEM_INFO

    def test_constructor_with_missing_file_raises(self, tmp_path: Path):
        """ClientConnectionManager with a missing device config path raises ConfigError."""
        with pytest.raises(ConfigError, match=re.escape("absent.yaml")):
            ClientConnectionManager(tmp_path / "absent.yaml")


class TestDeviceConfigsReload:
    def test_reload_picks_up_changed_file(self, tmp_path: Path):
        """DeviceConfigs.reload() returns the new count and serves the new entries."""
        path = tmp_path / "devices.yaml"
        path.write_text("devices:\n  d1:\n    tier: standard\n")
        configs = DeviceConfigs(path)
        assert configs.get("d1") == {"tier": "standard"}
        path.write_text("devices:\n  d1:\n    tier: premium\n  d2:\n    tier: standard\n")
        assert configs.reload() == 2
        assert configs.get("d1") == {"tier": "premium"}
        assert configs.get("d2") == {"tier": "standard"}
        assert len(configs) == 2

    def test_reload_of_malformed_file_keeps_old_entries(self, tmp_path: Path):
        """A malformed file on reload raises ConfigError and the old entries stay."""
        path = tmp_path / "devices.yaml"
        path.write_text("devices:\n  d1:\n    tier: standard\n")
        configs = DeviceConfigs(path)
        path.write_text("devices:\n  d1: [unclosed\n")
        with pytest.raises(ConfigError, match=re.escape("devices.yaml")):
            configs.reload()
        assert configs.get("d1") == {"tier": "standard"}

    def test_get_returns_a_copy(self, tmp_path: Path):
        """Mutating what get() returns does not change the loaded config."""
        path = tmp_path / "devices.yaml"
        path.write_text(SEED_YAML)
        configs = DeviceConfigs(path)
        entry = configs.get("device_windows_001")
        assert entry is not None
        entry["tags"].append("hacked")
        assert configs.get("device_windows_001") == SEED_CONFIG

    def test_without_path_reload_is_noop(self):
        """A DeviceConfigs without a file has no entries and reloads to 0."""
        configs = DeviceConfigs()
        assert configs.reload() == 0
        assert configs.get("d1") is None


class TestRegistryReload:
    @pytest.fixture
    def path(self, tmp_path: Path) -> Path:
        path = tmp_path / "devices.yaml"
        path.write_text(
            "devices:\n  d1:\n    tags: [old_tag]\n    additional_features: [old_feature]\n"
        )
        return path

    def test_reload_re_merges_live_devices(self, path: Path):
        """reload_device_config re-merges and updates the tag and feature indexes."""
        manager = ClientConnectionManager(path)
        register(manager, "d1", {"supported_features": ["base"]})
        register(manager, "d2", {"supported_features": ["base"]})
        path.write_text(
            "devices:\n"
            "  d1:\n"
            "    tags: [new_tag]\n"
            "    additional_features: [new_feature]\n"
            "  d2:\n"
            "    tags: [new_tag]\n"
        )
        assert manager.reload_device_config() == 2
        assert manager.find_devices_with_tag("old_tag") == []
        assert manager.find_devices_with_capability("old_feature") == []
        assert manager.find_devices_with_capability("new_feature") == ["d1"]
        assert sorted(manager.find_devices_with_tag("new_tag")) == ["d1", "d2"]
        assert manager.get_device_system_info("d1") == {
            "supported_features": ["base", "new_feature"],
            "tags": ["new_tag"],
            "custom_metadata": {"tags": ["new_tag"], "additional_features": ["new_feature"]},
        }

    def test_reload_merges_from_reported_not_previous_merge(self, path: Path):
        """Features dropped from the config disappear: the merge starts from the reported info."""
        manager = ClientConnectionManager(path)
        register(manager, "d1", {"supported_features": ["base"]})
        path.write_text("devices: {}\n")
        assert manager.reload_device_config() == 1
        assert manager.get_device_system_info("d1") == {"supported_features": ["base"]}
        assert manager.find_devices_with_capability("old_feature") == []
        assert manager.find_devices_with_capability("base") == ["d1"]

    def test_reload_unchanged_counts_zero(self, path: Path):
        """A reload that changes nothing reports 0 changed devices."""
        manager = ClientConnectionManager(path)
        register(manager, "d1", {"supported_features": ["base"]})
        assert manager.reload_device_config() == 0

    def test_reload_keeps_registration_order(self, path: Path):
        """Re-merged devices keep their registration order for listings and tie-breaking."""
        manager = ClientConnectionManager(path)
        register(manager, "d1", {"supported_features": ["base"]})
        register(manager, "d2", {"supported_features": ["base"]})
        register(manager, "d3", {"supported_features": ["base"]})
        path.write_text("devices:\n  d1:\n    tier: premium\n")
        manager.reload_device_config()
        assert manager.list_clients(ClientType.DEVICE) == ["d1", "d2", "d3"]
        assert manager.get_stats()["devices"]["ids"] == ["d1", "d2", "d3"]
        assert manager.select_optimal_device() == "d1"

    def test_reload_malformed_raises_and_keeps_old_config(self, path: Path):
        """A now-malformed file raises ConfigError; the old config stays in force."""
        manager = ClientConnectionManager(path)
        register(manager, "d1", {"supported_features": ["base"]})
        before = manager.get_device_system_info("d1")
        path.write_text("devices:\n  d1:\n    tags: [unclosed\n")
        with pytest.raises(ConfigError, match=re.escape("devices.yaml")):
            manager.reload_device_config()
        assert manager.get_device_system_info("d1") == before
        assert manager.find_devices_with_tag("old_tag") == ["d1"]
        manager.remove_client("d1")
        register(manager, "d1", {"supported_features": ["base"]})
        assert manager.find_devices_with_capability("old_feature") == ["d1"]

    def test_reload_missing_file_raises(self, path: Path):
        """A deleted config file raises ConfigError naming it and keeps the old config."""
        manager = ClientConnectionManager(path)
        register(manager, "d1", {"supported_features": ["base"]})
        path.unlink()
        with pytest.raises(ConfigError, match=re.escape("devices.yaml")):
            manager.reload_device_config()
        assert manager.find_devices_with_tag("old_tag") == ["d1"]

    def test_reload_ignores_devices_without_system_info(self, path: Path):
        """A live device without system_info stays without it after a reload."""
        manager = ClientConnectionManager(path)
        register(manager, "d1", None)
        path.write_text("devices:\n  d1:\n    tags: [x]\n")
        assert manager.reload_device_config() == 0
        assert manager.get_device_system_info("d1") is None
