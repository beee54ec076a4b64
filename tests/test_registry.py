"""Unit tests for the in-memory ClientConnectionManager (no store), with the seed's semantics."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from ccm import ClientConnectionManager, ClientInfo, ClientType
from ccm.errors import DuplicateClientError


class FakeClock:
    """A clock that only moves when the test advances it."""

    def __init__(self) -> None:
        self.now = datetime(2024, 11, 4, 14, 30, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


class FakeSocket:
    """Stands in for a WebSocket; only its identity matters to the registry."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"FakeSocket({self.name!r})"


@pytest.fixture
def manager() -> ClientConnectionManager:
    return ClientConnectionManager()


def add_device(
    manager: ClientConnectionManager,
    device_id: str,
    *,
    platform: str = "windows",
    features: list[str] | None = None,
    tags: list[str] | None = None,
    system_info: dict[str, Any] | None = None,
    ws: Any = None,
) -> ClientInfo:
    """Register a device; `features`/`tags` build a system_info unless one is given."""
    if system_info is None and (features is not None or tags is not None):
        system_info = {"os": platform}
        if features is not None:
            system_info["supported_features"] = features
        if tags is not None:
            system_info["tags"] = tags
    metadata: dict[str, Any] = {"hostname": device_id.upper()}
    if system_info is not None:
        metadata["system_info"] = system_info
    return manager.add_client(
        device_id, platform, ws or FakeSocket(device_id), ClientType.DEVICE, metadata
    )


def add_constellation(
    manager: ClientConnectionManager,
    client_id: str,
    *,
    metadata: dict[str, Any] | None = None,
    ws: Any = None,
) -> ClientInfo:
    return manager.add_client(
        client_id, "linux", ws or FakeSocket(client_id), ClientType.CONSTELLATION, metadata
    )


class TestAddAndLookup:
    def test_get_client_returns_the_websocket_passed_in(self, manager: ClientConnectionManager):
        """get_client returns the very ws object given to add_client."""
        ws = FakeSocket("w")
        add_device(manager, "device_windows_001", ws=ws)
        assert manager.get_client("device_windows_001") is ws

    def test_get_client_unknown_id_is_none(self, manager: ClientConnectionManager):
        """get_client returns None for an id that never registered."""
        assert manager.get_client("nobody") is None

    def test_get_client_info_has_registration_fields(self, manager: ClientConnectionManager):
        """get_client_info carries the registration's platform, type, metadata and websocket."""
        ws = FakeSocket("c")
        metadata = {"orchestrator_version": "2.0.0"}
        add_constellation(manager, "constellation_001", metadata=metadata, ws=ws)
        info = manager.get_client_info("constellation_001")
        assert info is not None
        assert info.platform == "linux"
        assert info.client_type is ClientType.CONSTELLATION
        assert info.metadata == {"orchestrator_version": "2.0.0"}
        assert info.websocket is ws
        assert info.client_id == "constellation_001"

    def test_get_client_info_unknown_id_is_none(self, manager: ClientConnectionManager):
        """get_client_info returns None for an unknown id."""
        assert manager.get_client_info("nobody") is None

    def test_metadata_defaults_to_empty_dict(self, manager: ClientConnectionManager):
        """A registration without metadata gets an empty dict, as in the seed."""
        manager.add_client("c1", "linux", FakeSocket("c1"), ClientType.CONSTELLATION)
        info = manager.get_client_info("c1")
        assert info is not None
        assert info.metadata == {}

    def test_client_type_defaults_to_device(self, manager: ClientConnectionManager):
        """add_client without a client_type registers a DEVICE."""
        manager.add_client("d1", "windows", FakeSocket("d1"))
        assert manager.get_client_type("d1") is ClientType.DEVICE

    def test_get_client_type_reports_each_type(self, manager: ClientConnectionManager):
        """get_client_type tells devices from constellations."""
        add_device(manager, "d1")
        add_constellation(manager, "c1")
        assert manager.get_client_type("d1") is ClientType.DEVICE
        assert manager.get_client_type("c1") is ClientType.CONSTELLATION

    def test_get_client_type_unknown_id_is_none(self, manager: ClientConnectionManager):
        """get_client_type returns None for an unknown id."""
        assert manager.get_client_type("nobody") is None

    def test_constellation_metadata_system_info_is_ignored(self, manager: ClientConnectionManager):
        """system_info in a constellation's metadata is not cached (devices only)."""
        add_constellation(manager, "c1", metadata={"system_info": {"os": "Linux"}})
        info = manager.get_client_info("c1")
        assert info is not None
        assert info.system_info is None


class TestListing:
    def test_list_clients_returns_all_ids(self, manager: ClientConnectionManager):
        """list_clients() with no type lists every online client."""
        add_device(manager, "d1")
        add_constellation(manager, "c1")
        add_device(manager, "d2")
        assert manager.list_clients() == ["d1", "c1", "d2"]

    def test_list_clients_filters_by_type(self, manager: ClientConnectionManager):
        """list_clients(client_type) lists only clients of that type."""
        add_device(manager, "d1")
        add_constellation(manager, "c1")
        add_device(manager, "d2")
        assert manager.list_clients(ClientType.DEVICE) == ["d1", "d2"]
        assert manager.list_clients(ClientType.CONSTELLATION) == ["c1"]

    def test_list_clients_by_type_matches_seed(self, manager: ClientConnectionManager):
        """list_clients_by_type lists the ids of one type."""
        add_device(manager, "d1")
        add_constellation(manager, "c1")
        assert manager.list_clients_by_type(ClientType.DEVICE) == ["d1"]
        assert manager.list_clients_by_type(ClientType.CONSTELLATION) == ["c1"]

    def test_list_clients_empty_registry(self, manager: ClientConnectionManager):
        """An empty registry lists nothing."""
        assert manager.list_clients() == []
        assert manager.list_clients_by_type(ClientType.DEVICE) == []


class TestConnectionState:
    def test_is_online_for_any_type(self, manager: ClientConnectionManager):
        """is_online is True for devices and constellations alike."""
        add_device(manager, "d1")
        add_constellation(manager, "c1")
        assert manager.is_online("d1")
        assert manager.is_online("c1")

    def test_is_online_false_for_unknown(self, manager: ClientConnectionManager):
        """is_online is False for an id that is not registered."""
        assert not manager.is_online("nobody")

    def test_is_device_connected_true_for_device(self, manager: ClientConnectionManager):
        """is_device_connected is True for a live device."""
        add_device(manager, "d1")
        assert manager.is_device_connected("d1")

    def test_is_device_connected_false_for_constellation(self, manager: ClientConnectionManager):
        """is_device_connected is False for a live constellation with that id (the type check)."""
        add_constellation(manager, "c1")
        assert manager.is_online("c1")
        assert not manager.is_device_connected("c1")

    def test_is_device_connected_false_for_unknown(self, manager: ClientConnectionManager):
        """is_device_connected is False for an unknown id."""
        assert not manager.is_device_connected("nobody")


class TestRemoveClient:
    def test_remove_client_takes_it_offline(self, manager: ClientConnectionManager):
        """After remove_client the id is offline and absent from every lookup."""
        add_device(manager, "d1", features=["ui_automation"], tags=["office"])
        manager.remove_client("d1")
        assert not manager.is_online("d1")
        assert not manager.is_device_connected("d1")
        assert manager.get_client("d1") is None
        assert manager.get_client_info("d1") is None
        assert manager.get_client_type("d1") is None
        assert manager.list_clients() == []

    def test_remove_client_returns_the_removed_entry(self, manager: ClientConnectionManager):
        """remove_client returns the ClientInfo it removed."""
        info = add_device(manager, "d1")
        assert manager.remove_client("d1") is info

    def test_remove_unknown_client_returns_none(self, manager: ClientConnectionManager):
        """Removing an id that is not online is a no-op returning None."""
        assert manager.remove_client("nobody") is None

    def test_remove_client_clears_capability_index(self, manager: ClientConnectionManager):
        """A removed device is no longer found by capability."""
        add_device(manager, "d1", features=["excel_automation"])
        add_device(manager, "d2", features=["excel_automation"])
        manager.remove_client("d1")
        assert manager.find_devices_with_capability("excel_automation") == ["d2"]

    def test_remove_client_clears_platform_index(self, manager: ClientConnectionManager):
        """A removed device is no longer listed for its platform."""
        add_device(manager, "d1", platform="linux")
        manager.remove_client("d1")
        assert manager.get_devices_by_platform("linux") == []

    def test_remove_client_clears_tag_and_selection(self, manager: ClientConnectionManager):
        """A removed device is neither found by tag nor selected."""
        add_device(manager, "d1", features=["f"], tags=["prod"])
        manager.remove_client("d1")
        assert manager.find_devices_with_tag("prod") == []
        assert manager.select_optimal_device(required_capabilities=["f"]) is None

    def test_remove_client_updates_stats(self, manager: ClientConnectionManager):
        """get_stats no longer counts a removed client."""
        add_device(manager, "d1")
        add_constellation(manager, "c1")
        manager.remove_client("d1")
        stats = manager.get_stats()
        counts = (stats["total"], stats["device_clients"], stats["constellation_clients"])
        assert counts == (1, 0, 1)
        assert stats["devices"] == {"ids": [], "count": 0, "platforms": {}}

    def test_readd_after_remove_is_allowed(self, manager: ClientConnectionManager):
        """An id that was removed can register again under the reject policy."""
        add_device(manager, "d1")
        manager.remove_client("d1")
        ws = FakeSocket("new")
        add_device(manager, "d1", ws=ws)
        assert manager.get_client("d1") is ws


class TestConstellationSessions:
    def test_added_sessions_are_listed_in_order(self, manager: ClientConnectionManager):
        """get_constellation_sessions lists the sessions added, in order."""
        manager.add_constellation_session("c1", "s1")
        manager.add_constellation_session("c1", "s2")
        assert manager.get_constellation_sessions("c1") == ["s1", "s2"]

    def test_unknown_constellation_has_no_sessions(self, manager: ClientConnectionManager):
        """get_constellation_sessions of an unknown id is an empty list."""
        assert manager.get_constellation_sessions("nobody") == []

    def test_getter_returns_a_copy(self, manager: ClientConnectionManager):
        """Mutating the returned list does not change the registry."""
        manager.add_constellation_session("c1", "s1")
        sessions = manager.get_constellation_sessions("c1")
        sessions.append("intruder")
        sessions.remove("s1")
        assert manager.get_constellation_sessions("c1") == ["s1"]

    def test_remove_returns_and_clears(self, manager: ClientConnectionManager):
        """remove_constellation_sessions returns the sessions and forgets them."""
        manager.add_constellation_session("c1", "s1")
        manager.add_constellation_session("c1", "s2")
        assert manager.remove_constellation_sessions("c1") == ["s1", "s2"]
        assert manager.get_constellation_sessions("c1") == []

    def test_remove_unknown_returns_empty(self, manager: ClientConnectionManager):
        """remove_constellation_sessions of an unknown id returns []."""
        assert manager.remove_constellation_sessions("nobody") == []

    def test_remove_leaves_other_constellations(self, manager: ClientConnectionManager):
        """Removing one constellation's sessions keeps another's."""
        manager.add_constellation_session("c1", "s1")
        manager.add_constellation_session("c2", "s2")
        manager.remove_constellation_sessions("c1")
        assert manager.get_constellation_sessions("c2") == ["s2"]

    def test_remove_keeps_device_side_of_session(self, manager: ClientConnectionManager):
        """Removing a constellation's sessions leaves the device mapping of the same session."""
        manager.add_constellation_session("c1", "s1")
        manager.add_device_session("d1", "s1")
        manager.remove_constellation_sessions("c1")
        assert manager.get_device_sessions("d1") == ["s1"]

    def test_duplicate_add_then_remove_leaves_no_active_session(
        self, manager: ClientConnectionManager
    ):
        """Adding the same session twice then removing the constellation's sessions forgets it."""
        manager.add_constellation_session("c1", "s1")
        manager.add_constellation_session("c1", "s1")
        manager.remove_constellation_sessions("c1")
        assert manager.get_stats()["active_sessions"] == 0
        assert manager.remove_session("s1") is False


class TestDeviceSessions:
    def test_added_sessions_are_listed_in_order(self, manager: ClientConnectionManager):
        """get_device_sessions lists the sessions added, in order."""
        manager.add_device_session("d1", "s1")
        manager.add_device_session("d1", "s2")
        assert manager.get_device_sessions("d1") == ["s1", "s2"]

    def test_unknown_device_has_no_sessions(self, manager: ClientConnectionManager):
        """get_device_sessions of an unknown id is an empty list."""
        assert manager.get_device_sessions("nobody") == []

    def test_getter_returns_a_copy(self, manager: ClientConnectionManager):
        """Mutating the returned list does not change the registry."""
        manager.add_device_session("d1", "s1")
        sessions = manager.get_device_sessions("d1")
        sessions.clear()
        assert manager.get_device_sessions("d1") == ["s1"]

    def test_remove_returns_and_clears(self, manager: ClientConnectionManager):
        """remove_device_sessions returns the sessions and forgets them."""
        manager.add_device_session("d1", "s1")
        manager.add_device_session("d1", "s2")
        assert manager.remove_device_sessions("d1") == ["s1", "s2"]
        assert manager.get_device_sessions("d1") == []

    def test_remove_unknown_returns_empty(self, manager: ClientConnectionManager):
        """remove_device_sessions of an unknown id returns []."""
        assert manager.remove_device_sessions("nobody") == []

    def test_remove_keeps_constellation_side_of_session(self, manager: ClientConnectionManager):
        """Removing a device's sessions leaves the constellation mapping of the same session."""
        manager.add_constellation_session("c1", "s1")
        manager.add_device_session("d1", "s1")
        manager.remove_device_sessions("d1")
        assert manager.get_constellation_sessions("c1") == ["s1"]

    def test_duplicate_add_then_remove_leaves_no_active_session(
        self, manager: ClientConnectionManager
    ):
        """Adding the same device session twice then removing the device's sessions forgets it."""
        manager.add_device_session("d1", "s1")
        manager.add_device_session("d1", "s1")
        manager.remove_device_sessions("d1")
        assert manager.get_stats()["active_sessions"] == 0
        assert manager.remove_session("s1") is False


class TestRemoveSession:
    def test_drops_session_from_both_maps(self, manager: ClientConnectionManager):
        """remove_session drops the session from the constellation and the device map."""
        manager.add_constellation_session("c1", "s1")
        manager.add_constellation_session("c1", "s2")
        manager.add_device_session("d1", "s1")
        manager.add_device_session("d1", "s3")
        assert manager.remove_session("s1") is True
        assert manager.get_constellation_sessions("c1") == ["s2"]
        assert manager.get_device_sessions("d1") == ["s3"]

    def test_is_idempotent(self, manager: ClientConnectionManager):
        """A second remove_session of the same id returns False and changes nothing."""
        manager.add_constellation_session("c1", "s1")
        manager.add_device_session("d1", "s1")
        manager.add_device_session("d1", "s2")
        assert manager.remove_session("s1") is True
        assert manager.remove_session("s1") is False
        assert manager.get_device_sessions("d1") == ["s2"]

    def test_unknown_session_returns_false(self, manager: ClientConnectionManager):
        """remove_session of a session never added returns False."""
        assert manager.remove_session("nope") is False

    def test_empty_per_client_lists_disappear(self, manager: ClientConnectionManager):
        """When a client's last session is removed, its map entry is deleted."""
        manager.add_constellation_session("c1", "s1")
        manager.add_device_session("d1", "s1")
        manager.remove_session("s1")
        by_side = manager._sessions._by_side  # no empty per-client entry accumulates
        assert "c1" not in by_side[ClientType.CONSTELLATION]
        assert "d1" not in by_side[ClientType.DEVICE]

    def test_active_sessions_counted_in_stats(self, manager: ClientConnectionManager):
        """get_stats counts a dual-mapped session once, and not after remove_session."""
        manager.add_constellation_session("c1", "s1")
        manager.add_device_session("d1", "s1")
        assert manager.get_stats()["active_sessions"] == 1
        manager.remove_session("s1")
        assert manager.get_stats()["active_sessions"] == 0

    def test_after_bulk_removal_returns_false(self, manager: ClientConnectionManager):
        """A session removed with both parties' bulk removals is gone for remove_session."""
        manager.add_constellation_session("c1", "s1")
        manager.add_device_session("d1", "s1")
        manager.remove_constellation_sessions("c1")
        manager.remove_device_sessions("d1")
        assert manager.remove_session("s1") is False


class TestDeviceInfo:
    def test_get_device_system_info_returns_reported_info(self, manager: ClientConnectionManager):
        """Without a device config, the system info is what the device reported."""
        reported = {"os": "Windows", "screen_resolution": "1920x1080"}
        add_device(manager, "d1", system_info=reported)
        assert manager.get_device_system_info("d1") == reported

    def test_get_device_system_info_none_for_constellation(self, manager: ClientConnectionManager):
        """A constellation id yields None even when its metadata carried system_info."""
        add_constellation(manager, "c1", metadata={"system_info": {"os": "Linux"}})
        assert manager.get_device_system_info("c1") is None

    def test_get_device_system_info_none_for_unknown(self, manager: ClientConnectionManager):
        """An unknown id yields None."""
        assert manager.get_device_system_info("nobody") is None

    def test_get_device_system_info_none_without_system_info(
        self, manager: ClientConnectionManager
    ):
        """A device that reported no system_info yields None."""
        add_device(manager, "d1")
        assert manager.get_device_system_info("d1") is None

    def test_get_device_system_info_returns_a_copy(self, manager: ClientConnectionManager):
        """Mutating the returned dict (even nested lists) does not change the registry."""
        add_device(manager, "d1", features=["ui_automation"])
        info = manager.get_device_system_info("d1")
        assert info is not None
        info["os"] = "hacked"
        info["supported_features"].append("root")
        again = manager.get_device_system_info("d1")
        assert again == {"os": "windows", "supported_features": ["ui_automation"]}

    def test_caller_mutating_reported_dict_does_not_change_registry(
        self, manager: ClientConnectionManager
    ):
        """The registry keeps its own copy of the reported system_info."""
        reported: dict[str, Any] = {"os": "Windows", "supported_features": ["a"]}
        add_device(manager, "d1", system_info=reported)
        reported["supported_features"].append("b")
        assert manager.find_devices_with_capability("b") == []
        expected = {"os": "Windows", "supported_features": ["a"]}
        assert manager.get_device_system_info("d1") == expected

    def test_get_all_devices_info_only_devices_with_system_info(
        self, manager: ClientConnectionManager
    ):
        """get_all_devices_info maps device ids with system_info, skipping others."""
        add_device(manager, "d1", system_info={"os": "Windows"})
        add_device(manager, "d2")
        add_constellation(manager, "c1", metadata={"system_info": {"os": "Linux"}})
        add_device(manager, "d3", system_info={"os": "Linux"})
        assert manager.get_all_devices_info() == {"d1": {"os": "Windows"}, "d3": {"os": "Linux"}}

    def test_get_all_devices_info_returns_copies(self, manager: ClientConnectionManager):
        """Mutating get_all_devices_info's result does not change the registry."""
        add_device(manager, "d1", system_info={"os": "Windows"})
        manager.get_all_devices_info()["d1"]["os"] = "hacked"
        assert manager.get_device_system_info("d1") == {"os": "Windows"}


class TestStats:
    def test_seed_counts(self, manager: ClientConnectionManager):
        """get_stats reports total, device_clients and constellation_clients."""
        add_device(manager, "d1")
        add_device(manager, "d2", platform="linux")
        add_constellation(manager, "c1")
        stats = manager.get_stats()
        assert stats["total"] == 3
        assert stats["device_clients"] == 2
        assert stats["constellation_clients"] == 1

    def test_devices_section(self, manager: ClientConnectionManager):
        """get_stats()['devices'] has ids, count and per-platform counts."""
        add_device(manager, "d1", platform="windows")
        add_device(manager, "d2", platform="linux")
        add_device(manager, "d3", platform="windows")
        add_constellation(manager, "c1")
        devices = manager.get_stats()["devices"]
        assert devices["ids"] == ["d1", "d2", "d3"]
        assert devices["count"] == 3
        assert devices["platforms"] == {"windows": 2, "linux": 1}

    def test_empty_registry_stats(self, manager: ClientConnectionManager):
        """An empty registry reports zero everywhere."""
        stats = manager.get_stats()
        counts = (stats["total"], stats["device_clients"], stats["constellation_clients"])
        assert counts == (0, 0, 0)
        assert stats["devices"] == {"ids": [], "count": 0, "platforms": {}}


class TestQueries:
    def test_get_devices_by_platform_is_case_insensitive(self, manager: ClientConnectionManager):
        """'Windows' finds a device registered as 'windows', and vice versa."""
        add_device(manager, "d1", platform="windows")
        add_device(manager, "d2", platform="Windows")
        add_device(manager, "d3", platform="linux")
        assert manager.get_devices_by_platform("Windows") == ["d1", "d2"]
        assert manager.get_devices_by_platform("WINDOWS") == ["d1", "d2"]
        assert manager.get_devices_by_platform("Linux") == ["d3"]

    def test_get_devices_by_platform_excludes_constellations(
        self, manager: ClientConnectionManager
    ):
        """A constellation on the same platform is not listed as a device."""
        add_constellation(manager, "c1")  # platform linux
        add_device(manager, "d1", platform="linux")
        assert manager.get_devices_by_platform("linux") == ["d1"]

    def test_get_devices_by_platform_unknown(self, manager: ClientConnectionManager):
        """A platform nobody runs yields []."""
        add_device(manager, "d1")
        assert manager.get_devices_by_platform("darwin") == []

    def test_find_devices_with_capability(self, manager: ClientConnectionManager):
        """find_devices_with_capability lists devices whose supported_features include it."""
        add_device(manager, "d1", features=["ui_automation", "excel_automation"])
        add_device(manager, "d2", features=["docker_support"])
        add_device(manager, "d3", features=["excel_automation"])
        add_device(manager, "d4")  # no system_info
        assert manager.find_devices_with_capability("excel_automation") == ["d1", "d3"]
        assert manager.find_devices_with_capability("docker_support") == ["d2"]
        assert manager.find_devices_with_capability("nothing") == []

    def test_find_devices_with_capability_ignores_constellations(
        self, manager: ClientConnectionManager
    ):
        """A constellation whose metadata lists features is never a capable device."""
        add_constellation(
            manager, "c1", metadata={"system_info": {"supported_features": ["excel_automation"]}}
        )
        assert manager.find_devices_with_capability("excel_automation") == []


class TestRecentlyConnected:
    def test_lists_clients_within_window(self):
        """Clients registered within the last N minutes are listed, older ones are not."""
        clock = FakeClock()
        manager = ClientConnectionManager(clock=clock)
        add_device(manager, "old")
        clock.advance(minutes=10)
        add_device(manager, "mid")
        clock.advance(minutes=3)
        add_constellation(manager, "new")
        clock.advance(minutes=1)
        assert manager.get_recently_connected(minutes=5) == ["mid", "new"]
        assert manager.get_recently_connected(minutes=2) == ["new"]
        assert manager.get_recently_connected(minutes=60) == ["old", "mid", "new"]

    def test_default_window_is_five_minutes(self):
        """Without an argument the window is 5 minutes."""
        clock = FakeClock()
        manager = ClientConnectionManager(clock=clock)
        add_device(manager, "a")
        clock.advance(minutes=6)
        add_device(manager, "b")
        clock.advance(minutes=4)
        assert manager.get_recently_connected() == ["b"]

    def test_boundary_is_inclusive(self):
        """A client connected exactly N minutes ago is still listed (seed: >= cutoff)."""
        clock = FakeClock()
        manager = ClientConnectionManager(clock=clock)
        add_device(manager, "a")
        clock.advance(minutes=5)
        assert manager.get_recently_connected(minutes=5) == ["a"]

    def test_removed_clients_are_not_listed(self):
        """A client removed since it connected is not listed."""
        clock = FakeClock()
        manager = ClientConnectionManager(clock=clock)
        add_device(manager, "a")
        add_device(manager, "b")
        manager.remove_client("a")
        assert manager.get_recently_connected(minutes=5) == ["b"]

    def test_connected_at_comes_from_clock(self):
        """connected_at is the injected clock's time."""
        clock = FakeClock()
        manager = ClientConnectionManager(clock=clock)
        info = add_device(manager, "a")
        assert info.connected_at == clock.now

    def test_takeover_counts_as_new_connection(self):
        """A takeover registration is listed by its new connection time."""
        clock = FakeClock()
        manager = ClientConnectionManager(clock=clock, duplicate_policy="takeover")
        add_device(manager, "a")
        add_device(manager, "b")
        clock.advance(minutes=10)
        add_device(manager, "a")
        assert manager.get_recently_connected(minutes=5) == ["a"]


class TestSelectOptimalDevice:
    def test_none_when_registry_empty(self, manager: ClientConnectionManager):
        """No devices: None."""
        assert manager.select_optimal_device() is None

    def test_none_when_only_constellations(self, manager: ClientConnectionManager):
        """Constellations are never selected."""
        add_constellation(manager, "c1")
        assert manager.select_optimal_device() is None

    def test_platform_is_case_insensitive(self, manager: ClientConnectionManager):
        """required_platform 'Windows' matches a device registered 'windows'."""
        add_device(manager, "lin", platform="linux")
        add_device(manager, "win", platform="windows")
        assert manager.select_optimal_device(required_platform="Windows") == "win"

    def test_none_when_platform_does_not_match(self, manager: ClientConnectionManager):
        """No device on the required platform: None."""
        add_device(manager, "win", platform="windows")
        assert manager.select_optimal_device(required_platform="darwin") is None

    def test_all_capabilities_required(self, manager: ClientConnectionManager):
        """A device with only some of the required capabilities is skipped."""
        add_device(manager, "partial", features=["excel_automation"])
        add_device(manager, "full", features=["excel_automation", "pdf_generation"])
        chosen = manager.select_optimal_device(
            required_capabilities=["excel_automation", "pdf_generation"]
        )
        assert chosen == "full"

    def test_none_when_no_device_has_capabilities(self, manager: ClientConnectionManager):
        """Nobody has the capability: None."""
        add_device(manager, "d1", features=["ui_automation"])
        assert manager.select_optimal_device(required_capabilities=["docker_support"]) is None

    def test_device_without_system_info_never_satisfies_capability(
        self, manager: ClientConnectionManager
    ):
        """A device with no system_info is not selected when a capability is required."""
        add_device(manager, "bare")
        assert manager.select_optimal_device(required_capabilities=["ui_automation"]) is None

    def test_device_without_system_info_selectable_without_requirements(
        self, manager: ClientConnectionManager
    ):
        """With no capability requirement a device without system_info is a candidate."""
        add_device(manager, "bare")
        assert manager.select_optimal_device(required_platform="windows") == "bare"

    def test_most_preferred_tags_wins(self, manager: ClientConnectionManager):
        """The device sharing the most preferred tags is chosen."""
        add_device(manager, "one", features=["f"], tags=["production"])
        add_device(manager, "two", features=["f"], tags=["production", "high_priority"])
        add_device(manager, "zero", features=["f"], tags=["testing"])
        chosen = manager.select_optimal_device(
            required_capabilities=["f"], preferred_tags=["production", "high_priority"]
        )
        assert chosen == "two"

    def test_most_preferred_tags_wins_without_other_filters(self, manager: ClientConnectionManager):
        """Tag preference applies when no platform or capability is required."""
        add_device(manager, "untagged")
        add_device(manager, "tagged", tags=["office"])
        assert manager.select_optimal_device(preferred_tags=["office"]) == "tagged"

    def test_tie_goes_to_earliest_registered(self, manager: ClientConnectionManager):
        """Equal scores: the device registered first wins."""
        add_device(manager, "first", features=["f"], tags=["a"])
        add_device(manager, "second", features=["f"], tags=["a"])
        assert manager.select_optimal_device(required_capabilities=["f"], preferred_tags=["a"]) == (
            "first"
        )

    def test_tie_goes_to_earliest_registered_when_capability_pool_smallest(
        self, manager: ClientConnectionManager
    ):
        """Ties go to the earliest registered even when filtering via the capability index."""
        for i in range(5):
            add_device(manager, f"other{i}", features=["g"])
        add_device(manager, "early", features=["f"], tags=["x"])
        add_device(manager, "late", features=["f"], tags=["y"])
        assert manager.select_optimal_device(required_capabilities=["f"]) == "early"

    def test_tie_goes_to_earliest_registered_without_filters(
        self, manager: ClientConnectionManager
    ):
        """With no criteria at all, the earliest registered device is chosen."""
        add_constellation(manager, "c0")
        add_device(manager, "first")
        add_device(manager, "second")
        assert manager.select_optimal_device() == "first"

    def test_takeover_reregistration_is_newest(self):
        """A device that re-registered by takeover counts as registered last for ties."""
        manager = ClientConnectionManager(duplicate_policy="takeover")
        add_device(manager, "a", features=["f"])
        add_device(manager, "b", features=["f"])
        add_device(manager, "a", features=["f"])
        assert manager.select_optimal_device(required_capabilities=["f"]) == "b"

    def test_combined_filters(self, manager: ClientConnectionManager):
        """Platform, capability and tags combine: only a device meeting all filters is chosen."""
        add_device(
            manager, "lin", platform="linux", features=["excel_automation"], tags=["production"]
        )
        add_device(manager, "win_nocap", platform="windows", features=["x"], tags=["production"])
        add_device(manager, "win", platform="windows", features=["excel_automation"], tags=[])
        chosen = manager.select_optimal_device(
            required_platform="Windows",
            required_capabilities=["excel_automation"],
            preferred_tags=["production", "high_priority"],
        )
        assert chosen == "win"


class TestDuplicateReject:
    def test_duplicate_id_raises(self, manager: ClientConnectionManager):
        """A second registration of a live id raises DuplicateClientError by default."""
        add_device(manager, "d1")
        with pytest.raises(DuplicateClientError) as excinfo:
            add_device(manager, "d1")
        assert excinfo.value.client_id == "d1"

    def test_duplicate_across_types_raises(self, manager: ClientConnectionManager):
        """A constellation cannot take a live device's id under reject."""
        add_device(manager, "same")
        with pytest.raises(DuplicateClientError):
            add_constellation(manager, "same")
        assert manager.is_device_connected("same")

    def test_live_entry_is_untouched(self, manager: ClientConnectionManager):
        """After a rejected duplicate the live entry keeps its websocket, metadata and info."""
        ws = FakeSocket("orig")
        original = add_device(manager, "d1", ws=ws, features=["a"], tags=["t"])
        metadata_before = dict(original.metadata)
        with pytest.raises(DuplicateClientError):
            manager.add_client(
                "d1",
                "linux",
                FakeSocket("intruder"),
                ClientType.DEVICE,
                {"hostname": "EVIL", "system_info": {"supported_features": ["b"], "tags": ["u"]}},
            )
        info = manager.get_client_info("d1")
        assert info is original
        assert manager.get_client("d1") is ws
        assert info.metadata == metadata_before
        assert info.platform == "windows"
        assert info.epoch == original.epoch
        assert manager.find_devices_with_capability("a") == ["d1"]
        assert manager.find_devices_with_capability("b") == []
        assert manager.find_devices_with_tag("u") == []
        assert manager.get_devices_by_platform("linux") == []
        assert manager.get_stats()["total"] == 1


class TestDuplicateTakeover:
    @pytest.fixture
    def manager(self) -> ClientConnectionManager:
        return ClientConnectionManager(duplicate_policy="takeover")

    def test_new_entry_wins(self, manager: ClientConnectionManager):
        """With takeover the new websocket and metadata replace the old ones."""
        add_device(manager, "d1", ws=FakeSocket("old"))
        new_ws = FakeSocket("new")
        manager.add_client("d1", "linux", new_ws, ClientType.DEVICE, {"hostname": "NEW"})
        assert manager.get_client("d1") is new_ws
        info = manager.get_client_info("d1")
        assert info is not None
        assert info.metadata == {"hostname": "NEW"}
        assert info.platform == "linux"

    def test_replaced_is_old_info(self, manager: ClientConnectionManager):
        """info.replaced is the evicted ClientInfo."""
        old = add_device(manager, "d1")
        new = add_device(manager, "d1")
        assert new.replaced is old
        assert new.epoch != old.epoch

    def test_first_registration_has_no_replaced(self, manager: ClientConnectionManager):
        """A fresh registration has replaced=None."""
        assert add_device(manager, "d1").replaced is None

    def test_late_disconnect_of_old_socket_is_ignored(self, manager: ClientConnectionManager):
        """remove_client with the old epoch returns None and the new entry stays online."""
        old = add_device(manager, "d1", ws=FakeSocket("old"))
        new_ws = FakeSocket("new")
        new = add_device(manager, "d1", ws=new_ws)
        assert manager.remove_client("d1", epoch=old.epoch) is None
        assert manager.is_device_connected("d1")
        assert manager.get_client("d1") is new_ws
        assert manager.get_client_info("d1") is new

    def test_remove_with_new_epoch_removes(self, manager: ClientConnectionManager):
        """remove_client with the current epoch removes the registration."""
        add_device(manager, "d1")
        new = add_device(manager, "d1")
        assert manager.remove_client("d1", epoch=new.epoch) is new
        assert not manager.is_online("d1")

    def test_indexes_follow_the_new_entry(self, manager: ClientConnectionManager):
        """After takeover the capability, tag and platform indexes describe only the new entry."""
        add_device(manager, "d1", platform="windows", features=["old_feature"], tags=["old_tag"])
        add_device(manager, "d1", platform="linux", features=["new_feature"], tags=["new_tag"])
        assert manager.find_devices_with_capability("old_feature") == []
        assert manager.find_devices_with_capability("new_feature") == ["d1"]
        assert manager.find_devices_with_tag("old_tag") == []
        assert manager.find_devices_with_tag("new_tag") == ["d1"]
        assert manager.get_devices_by_platform("windows") == []
        assert manager.get_devices_by_platform("linux") == ["d1"]

    def test_takeover_keeps_counts(self, manager: ClientConnectionManager):
        """A takeover does not double-count the client."""
        add_device(manager, "d1")
        add_device(manager, "d1")
        stats = manager.get_stats()
        assert stats["total"] == 1
        assert stats["devices"]["ids"] == ["d1"]
        assert manager.list_clients() == ["d1"]

    def test_takeover_by_other_type(self, manager: ClientConnectionManager):
        """A constellation taking over a device id removes it from the device indexes."""
        add_device(manager, "x", features=["f"])
        add_constellation(manager, "x")
        assert not manager.is_device_connected("x")
        assert manager.find_devices_with_capability("f") == []
        assert manager.list_clients(ClientType.DEVICE) == []
        assert manager.list_clients(ClientType.CONSTELLATION) == ["x"]


class TestThreadSafety:
    def test_concurrent_adds_removes_and_sessions_stay_consistent(self):
        """Threads adding/removing distinct clients and sessions end with consistent counts."""
        manager = ClientConnectionManager()
        threads_n, per_thread = 8, 200
        barrier = threading.Barrier(threads_n)
        errors: list[BaseException] = []

        def work(t: int) -> None:
            try:
                barrier.wait()
                for i in range(per_thread):
                    dev, con, sess = f"d{t}_{i}", f"c{t}_{i}", f"s{t}_{i}"
                    add_device(manager, dev, features=[f"f{t}", "shared"], tags=["all"])
                    add_constellation(manager, con)
                    manager.add_constellation_session(con, sess)
                    manager.add_device_session(dev, sess)
                    if i % 2:  # odd: tear everything down again
                        manager.remove_session(sess)
                        manager.remove_client(dev)
                        manager.remove_client(con)
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

        assert errors == []
        kept = threads_n * per_thread // 2
        stats = manager.get_stats()
        assert stats["device_clients"] == kept
        assert stats["constellation_clients"] == kept
        assert stats["total"] == 2 * kept
        assert stats["active_sessions"] == kept
        assert len(manager.find_devices_with_capability("shared")) == kept
        assert len(manager.find_devices_with_tag("all")) == kept
        assert len(manager.get_devices_by_platform("windows")) == kept
        for t in range(threads_n):
            assert len(manager.find_devices_with_capability(f"f{t}")) == per_thread // 2
        assert all(manager.get_device_sessions(d) == [f"s{d[1:]}"] for d in stats["devices"]["ids"])


class TestSelectionAtScale:
    """select_optimal_device on a fleet large enough for every internal path (many candidates,
    no device with all tags, empty pools), checked against a plain scan of the same rules."""

    @staticmethod
    def reference(
        manager: ClientConnectionManager,
        platform: str | None,
        caps: list[str],
        tags: list[str],
    ) -> str | None:
        best: tuple[int, int] | None = None
        answer = None
        for device_id in manager.list_clients(ClientType.DEVICE):
            info = manager.get_client_info(device_id)
            assert info is not None
            system_info = info.system_info or {}
            if platform and info.platform.lower() != platform.lower():
                continue
            if not all(c in (system_info.get("supported_features") or []) for c in caps):
                continue
            score = len(set(tags) & set(system_info.get("tags") or []))
            key = (-score, info.epoch)
            if best is None or key < best:
                best, answer = key, device_id
        return answer

    def test_matches_a_plain_scan(self, manager: ClientConnectionManager):
        """Every query shape picks the same device as scanning all devices would."""
        import random

        rng = random.Random(11)
        features = ["gui", "cli", "browser", "office", "gpu", "docker", "pdf"]
        tags = ["lab", "prod", "eu", "us", "gpu"]
        for i in range(400):
            manager.add_client(
                f"d{i:03d}",
                ["windows", "linux", "darwin"][i % 3],
                object(),
                ClientType.DEVICE,
                {
                    "system_info": {
                        "supported_features": rng.sample(features, rng.randint(0, 4)),
                        "tags": rng.sample(tags, rng.randint(0, 2)),
                    }
                },
            )
        queries = [
            (None, [], []),
            (None, [], ["lab"]),
            ("linux", [], []),
            ("linux", ["gui"], ["lab", "eu"]),
            ("windows", ["gpu", "docker"], ["prod"]),
            (None, ["office"], ["lab", "prod", "eu", "us", "gpu"]),
            ("darwin", ["gui", "cli", "browser", "office"], []),
            ("plan9", [], []),
            (None, ["no-such-feature"], []),
            (None, [], ["no-such-tag"]),
        ]
        for platform, caps, wanted in queries:
            assert manager.select_optimal_device(platform, caps, wanted) == self.reference(
                manager, platform, caps, wanted
            ), (platform, caps, wanted)
