"""The registry's read-only queries over its indexes: statistics, lookups by platform, capability
and tag, and device selection (least busy first) with its explanation.

A base of ClientConnectionManager (ccm.registry), which owns the state read here and its lock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from ccm.client_info import ClientInfo
from ccm.clock import Clock
from ccm.device_index import DeviceIndex, Explanation
from ccm.devices import DeviceConfigs
from ccm.domain import ClientType
from ccm.session_map import SessionMap


class RegistryQueries:
    """Queries of ClientConnectionManager; every one is a few lookups under its lock."""

    lock: threading.Lock
    online_clients: dict[str, ClientInfo]
    _index: DeviceIndex
    _sessions: SessionMap
    _device_configs: DeviceConfigs
    _clock: Clock

    # -- statistics and queries -------------------------------------------------------------

    def get_stats(self) -> dict[str, Any]:
        """UFO's counts (`total`, `device_clients`, `constellation_clients`), plus per-type id
        lists and platform counts (the shape UFO's API router reads), plus sessions."""
        with self.lock:
            devices = list(self._index.by_type[ClientType.DEVICE])
            constellations = list(self._index.by_type[ClientType.CONSTELLATION])
            platforms = self._index.platform_counts()
            active_sessions = len(self._sessions)
        return {
            "total": len(devices) + len(constellations),
            "device_clients": len(devices),
            "constellation_clients": len(constellations),
            "devices": {"ids": devices, "count": len(devices), "platforms": platforms},
            "constellations": {"ids": constellations, "count": len(constellations)},
            "active_sessions": active_sessions,
        }

    def get_devices_by_platform(self, platform: str) -> list[str]:
        """Device ids whose platform matches, ignoring case."""
        with self.lock:
            return list(self._index.by_platform.get(platform.lower(), ()))

    def get_recently_connected(self, minutes: float = 5) -> list[str]:
        """Ids of clients that registered in the last `minutes`, oldest first."""
        cutoff = self._clock() - timedelta(minutes=minutes)
        recent: list[str] = []
        with self.lock:
            # online_clients is in registration order, so walk back from the newest.
            for client_id in reversed(self.online_clients):
                if self.online_clients[client_id].connected_at < cutoff:
                    break
                recent.append(client_id)
        recent.reverse()
        return recent

    def find_devices_with_capability(self, capability: str) -> list[str]:
        with self.lock:
            return list(self._index.by_feature.get(capability, ()))

    def find_devices_with_tag(self, tag: str) -> list[str]:
        with self.lock:
            return list(self._index.by_tag.get(tag, ()))

    def select_optimal_device(
        self,
        required_platform: str | None = None,
        required_capabilities: Iterable[str] | None = None,
        preferred_tags: Iterable[str] | None = None,
    ) -> str | None:
        """Among the live devices that have the platform and every capability and room for one
        more session: the one with the most free capacity, then the most preferred tags, then
        the earliest registered. None if no device qualifies.

        A device without system info has no capabilities, so it never satisfies a capability
        requirement (UFO's sketch of this method let such devices through).
        """
        with self.lock:
            return self._index.select(
                required_platform,
                list(dict.fromkeys(required_capabilities or ())),
                list(dict.fromkeys(preferred_tags or ())),
                epoch_of=lambda device_id: self.online_clients[device_id].epoch,
            )

    def explain_selection(
        self,
        required_platform: str | None = None,
        required_capabilities: Iterable[str] | None = None,
        preferred_tags: Iterable[str] | None = None,
        *,
        limit: int = 10,
    ) -> Explanation:
        """What `select_optimal_device` chooses and why: each device passed over with its first
        reason (configured devices not connected count as offline), each qualifying device's
        score; at most `limit` devices per reason and `limit` scores."""
        configured = self._device_configs.ids()
        with self.lock:
            offline = [d for d in configured if d not in self.online_clients]
            return self._index.explain(
                required_platform,
                list(dict.fromkeys(required_capabilities or ())),
                list(dict.fromkeys(preferred_tags or ())),
                epoch_of=lambda device_id: self.online_clients[device_id].epoch,
                offline=offline,
                limit=limit,
            )
