"""Capacity in the live registry: where a device's capacity comes from, the queue it keeps, the
least-busy choice of `select_optimal_device` and the explanation of a selection."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import pytest

from ccm.device_load import CapacityPolicy
from ccm.devices import DeviceConfigs
from ccm.domain import ClientType, RejectReason
from ccm.errors import ConfigError, QueueFull
from ccm.registry import ClientConnectionManager


def registry(
    tmp_path: Path, config: str = "devices: {}\n", **policy: Any
) -> ClientConnectionManager:
    path = tmp_path / "devices.yaml"
    path.write_text(config)
    return ClientConnectionManager(
        device_configs=DeviceConfigs(path), capacity=CapacityPolicy(**policy)
    )


def add_device(
    manager: ClientConnectionManager,
    device_id: str,
    *,
    platform: str = "windows",
    features: list[str] | None = None,
    tags: list[str] | None = None,
    **metadata: Any,
) -> None:
    system_info = {"supported_features": features or [], "tags": tags or []}
    manager.add_client(
        device_id,
        platform,
        object(),
        ClientType.DEVICE,
        {"system_info": system_info, **metadata},
    )


def occupy(manager: ClientConnectionManager, device_id: str, sessions: int) -> None:
    for n in range(sessions):
        manager.admit_session(device_id, f"{device_id}/s{n}")


class TestCapacitySources:
    def test_the_device_config_gives_a_device_its_capacity(self, tmp_path: Path) -> None:
        """`max_concurrent_tasks` under the device's id in the device config is its capacity."""
        manager = registry(tmp_path, "devices:\n  d1:\n    max_concurrent_tasks: 5\n", default=2)
        add_device(manager, "d1")
        add_device(manager, "d2")
        assert manager.device_load("d1").capacity == 5  # type: ignore[union-attr]
        assert manager.device_load("d2").capacity == 2  # type: ignore[union-attr]

    def test_without_any_source_a_device_is_unlimited(self, tmp_path: Path) -> None:
        """No device config entry, no default: capacity None, and sessions never wait."""
        manager = registry(tmp_path)
        add_device(manager, "d1")
        assert [manager.admit_session("d1", f"s{n}") for n in range(50)] == [0] * 50
        assert manager.device_load("d1").capacity is None  # type: ignore[union-attr]

    def test_registration_metadata_counts_only_when_allowed(self, tmp_path: Path) -> None:
        """A device's declared `max_concurrent_tasks` is its capacity only with
        `from_registration`; the device config still comes first."""
        config = "devices:\n  d3:\n    max_concurrent_tasks: 7\n"
        trusting = registry(tmp_path, config, from_registration=True, default=1)
        wary = registry(tmp_path, config, default=1)
        for manager in (trusting, wary):
            add_device(manager, "d1", max_concurrent_tasks=3)
            add_device(manager, "d3", max_concurrent_tasks=3)
        assert trusting.device_load("d1").capacity == 3  # type: ignore[union-attr]
        assert wary.device_load("d1").capacity == 1  # type: ignore[union-attr]
        assert trusting.device_load("d3").capacity == 7  # type: ignore[union-attr]

    def test_a_declared_capacity_that_is_not_a_positive_number_is_ignored(
        self, tmp_path: Path
    ) -> None:
        """`max_concurrent_tasks: 0` (or "5", or true) from a device falls back to the default."""
        manager = registry(tmp_path, from_registration=True, default=4)
        for n, declared in enumerate([0, "5", True, -1]):
            add_device(manager, f"d{n}", max_concurrent_tasks=declared)
            assert manager.device_load(f"d{n}").capacity == 4  # type: ignore[union-attr]

    def test_a_reloaded_device_config_changes_a_live_device_capacity(self, tmp_path: Path) -> None:
        """Reloading the device config applies a new `max_concurrent_tasks` to a live device."""
        manager = registry(tmp_path, "devices:\n  d1:\n    max_concurrent_tasks: 1\n")
        add_device(manager, "d1")
        (tmp_path / "devices.yaml").write_text("devices:\n  d1:\n    max_concurrent_tasks: 3\n")
        manager.reload_device_config()
        assert manager.device_load("d1").capacity == 3  # type: ignore[union-attr]

    def test_a_device_config_capacity_must_be_a_whole_number(self, tmp_path: Path) -> None:
        """`max_concurrent_tasks: five` in the device config stops the load, naming the line."""
        path = tmp_path / "devices.yaml"
        path.write_text("devices:\n  d1:\n    max_concurrent_tasks: five\n")
        with pytest.raises(ConfigError, match=r"line 3.*max_concurrent_tasks must be a whole"):
            DeviceConfigs(path)


class TestQueue:
    def test_sessions_past_capacity_wait_in_arrival_order(self, tmp_path: Path) -> None:
        """Capacity 2: the third and fourth sessions get places 1 and 2; each end starts the
        oldest waiting one."""
        manager = registry(tmp_path, default=2)
        add_device(manager, "d1")
        assert [manager.admit_session("d1", s) for s in ("a", "b", "c", "d")] == [0, 0, 1, 2]
        assert manager.release_session("b") == ["c"]
        assert manager.queue_position("d1", "d") == 1
        assert manager.release_session("a") == ["d"]
        assert manager.release_session("c") == []

    def test_a_waiting_session_that_ends_frees_no_slot(self, tmp_path: Path) -> None:
        """Cancelling a waiting session moves the ones behind it up, and starts nothing."""
        manager = registry(tmp_path, default=1)
        add_device(manager, "d1")
        for session_id in ("a", "b", "c"):
            manager.admit_session("d1", session_id)
        assert manager.release_session("b") == []
        assert manager.queue_position("d1", "c") == 1
        counts = manager.device_load("d1")
        assert (counts.running, counts.queued) == (1, 1)  # type: ignore[union-attr]

    def test_the_queue_is_bounded(self, tmp_path: Path) -> None:
        """One session more than `max_queue` waiting raises QueueFull naming the setting."""
        manager = registry(tmp_path, default=1, max_queue=2)
        add_device(manager, "d1")
        occupy(manager, "d1", 3)
        with pytest.raises(QueueFull, match=r"dispatch\.max_queue_per_device"):
            manager.admit_session("d1", "one-too-many")

    def test_a_device_that_leaves_starts_nothing_more(self, tmp_path: Path) -> None:
        """After its device is removed, ending a session hands no waiting one a slot."""
        manager = registry(tmp_path, default=1)
        add_device(manager, "d1")
        occupy(manager, "d1", 2)
        manager.remove_client("d1")
        assert manager.release_session("d1/s0") == []


class TestLeastBusySelection:
    def test_the_device_with_most_free_capacity_wins(self, tmp_path: Path) -> None:
        """Free capacity comes before registration order."""
        manager = registry(tmp_path, default=3)
        for device_id in ("early", "middle", "late"):
            add_device(manager, device_id)
        occupy(manager, "early", 2)
        occupy(manager, "middle", 1)
        occupy(manager, "late", 2)
        assert manager.select_optimal_device() == "middle"

    def test_free_capacity_comes_before_preferred_tags(self, tmp_path: Path) -> None:
        """A freer device without the tags beats a busier one with them; at equal free
        capacity, the tags decide."""
        manager = registry(tmp_path, default=2)
        add_device(manager, "tagged", tags=["gpu"])
        add_device(manager, "plain")
        add_device(manager, "tagged-too", tags=["gpu"])
        occupy(manager, "tagged", 1)
        assert manager.select_optimal_device(preferred_tags=["gpu"]) == "tagged-too"
        occupy(manager, "tagged-too", 1)
        assert manager.select_optimal_device(preferred_tags=["gpu"]) == "plain"

    def test_an_unlimited_device_is_freer_than_any_limited_one(self, tmp_path: Path) -> None:
        """A device with no capacity limit counts as the most free."""
        manager = registry(tmp_path, "devices:\n  small:\n    max_concurrent_tasks: 9\n")
        add_device(manager, "small")
        add_device(manager, "unlimited")
        occupy(manager, "unlimited", 20)
        assert manager.select_optimal_device() == "unlimited"

    def test_a_device_at_capacity_is_not_chosen(self, tmp_path: Path) -> None:
        """Every qualifying device at capacity: None, even if others are free."""
        manager = registry(tmp_path, default=1)
        add_device(manager, "busy", platform="linux")
        add_device(manager, "free", platform="windows")
        occupy(manager, "busy", 1)
        assert manager.select_optimal_device(required_platform="linux") is None
        assert manager.select_optimal_device() == "free"

    def test_matches_a_plain_scan_under_random_load(self, tmp_path: Path) -> None:
        """Every query picks the device a scan by (free, tags, registration) would pick."""
        rng = random.Random(14)
        capacities = "".join(
            f"  d{i:03d}:\n    max_concurrent_tasks: {rng.randint(1, 4)}\n"
            for i in range(300)
            if i % 3  # a third stay unlimited
        )
        manager = registry(tmp_path, "devices:\n" + capacities)
        features, tags = ["gui", "cli", "gpu"], ["lab", "prod", "eu"]
        for i in range(300):
            manager.add_client(
                f"d{i:03d}",
                ["windows", "linux"][i % 2],
                object(),
                ClientType.DEVICE,
                {
                    "system_info": {
                        "supported_features": rng.sample(features, rng.randint(0, 2)),
                        "tags": rng.sample(tags, rng.randint(0, 2)),
                    },
                },
            )
        for i in range(300):
            occupy(manager, f"d{i:03d}", rng.randint(0, 4))

        def scan(platform: str | None, caps: list[str], wanted: list[str]) -> str | None:
            best: tuple[float, int, int] | None = None
            answer = None
            for device_id in manager.list_clients(ClientType.DEVICE):
                info = manager.get_client_info(device_id)
                counts = manager.device_load(device_id)
                assert info is not None
                assert counts is not None
                system_info = info.system_info or {}
                free = (
                    math.inf
                    if counts.capacity is None
                    else max(0, counts.capacity - counts.running)
                )
                if platform and info.platform != platform:
                    continue
                if not all(c in system_info["supported_features"] for c in caps) or free <= 0:
                    continue
                key = (-free, -len(set(wanted) & set(system_info["tags"])), info.epoch)
                if best is None or key < best:
                    best, answer = key, device_id
            return answer

        queries: list[tuple[str | None, list[str], list[str]]] = [
            (None, [], []),
            (None, [], ["lab"]),
            ("linux", ["gui"], ["lab", "eu"]),
            ("windows", ["gpu", "cli"], ["prod"]),
            (None, ["no-such-feature"], []),
        ]
        for platform, caps, wanted in queries:
            assert manager.select_optimal_device(platform, caps, wanted) == scan(
                platform, caps, wanted
            ), (platform, caps, wanted)


class TestExplainSelection:
    def test_each_rejected_device_has_its_first_reason(self, tmp_path: Path) -> None:
        """Offline (configured, not connected), wrong platform, missing capability (named) and
        at capacity, checked in that order; the choice is the one select makes."""
        manager = registry(
            tmp_path, "devices:\n  absent:\n    tags: [lab]\n  busy: {}\n", default=1
        )
        add_device(manager, "mac", platform="darwin")
        add_device(manager, "no-gpu", features=["gui"])
        add_device(manager, "busy", features=["gui", "gpu"])
        add_device(manager, "chosen", features=["gui", "gpu"])
        occupy(manager, "busy", 1)
        explained = manager.explain_selection("windows", ["gui", "gpu"])
        assert (
            explained.device_id
            == "chosen"
            == manager.select_optimal_device("windows", ["gui", "gpu"])
        )
        reasons = {
            reason: [(r.device_id, r.capability) for r in rejected]
            for reason, rejected in explained.examples.items()
        }
        assert reasons == {
            RejectReason.OFFLINE: [("absent", None)],
            RejectReason.WRONG_PLATFORM: [("mac", None)],
            RejectReason.MISSING_CAPABILITY: [("no-gpu", "gpu")],
            RejectReason.AT_CAPACITY: [("busy", None)],
        }
        assert [(s.device_id, s.free) for s in explained.scores] == [("chosen", 1)]

    def test_a_large_fleet_is_explained_in_bounded_size(self, tmp_path: Path) -> None:
        """With 500 rejected devices, counts are complete but only `limit` are listed."""
        manager = registry(tmp_path)
        for i in range(500):
            add_device(manager, f"linux-{i}", platform="linux")
        for i in range(20):
            add_device(manager, f"win-{i}", tags=["lab"] if i == 7 else [])
        explained = manager.explain_selection("windows", preferred_tags=["lab"], limit=5)
        assert explained.rejected == {RejectReason.WRONG_PLATFORM: 500}
        assert len(explained.examples[RejectReason.WRONG_PLATFORM]) == 5
        assert explained.qualifying == 20
        assert [s.device_id for s in explained.scores] == [
            "win-7",
            "win-0",
            "win-1",
            "win-2",
            "win-3",
        ]
