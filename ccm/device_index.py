"""DeviceIndex: the registry's indexes of live clients (by type; devices by platform, capability
and tag) and the device selection computed over them.

Every index is an insertion-ordered dict used as an ordered set, so "first registered" is the
first key and adding or removing one id is O(1). It holds no lock: the registry calls it under
its own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection
from typing import Any

from ccm.domain import ClientType

Pool = dict[str, None]


def supported_features(system_info: dict[str, Any] | None) -> list[str]:
    """The capabilities a device's system info reports (`supported_features`)."""
    return _strings(system_info, "supported_features")


def device_tags(system_info: dict[str, Any] | None) -> list[str]:
    """The tags in a device's system info (operator config puts them there)."""
    return _strings(system_info, "tags")


def _strings(system_info: dict[str, Any] | None, key: str) -> list[str]:
    if not system_info:
        return []
    values = system_info.get(key) or []
    return [v for v in values if isinstance(v, str)] if isinstance(values, list) else []


class DeviceIndex:
    def __init__(self) -> None:
        self.by_type: dict[ClientType, Pool] = {t: {} for t in ClientType}
        self.by_platform: dict[str, Pool] = {}
        self.by_feature: dict[str, Pool] = {}
        self.by_tag: dict[str, Pool] = {}

    # -- maintenance ----------------------------------------------------------------------------

    def add(
        self,
        client_id: str,
        client_type: ClientType,
        platform: str | None,
        system_info: dict[str, Any] | None,
    ) -> None:
        self.by_type[client_type][client_id] = None
        if client_type is ClientType.DEVICE:
            self.by_platform.setdefault((platform or "").lower(), {})[client_id] = None
            self._add_system_info(client_id, system_info)

    def remove(
        self,
        client_id: str,
        client_type: ClientType,
        platform: str | None,
        system_info: dict[str, Any] | None,
    ) -> None:
        self.by_type[client_type].pop(client_id, None)
        if client_type is ClientType.DEVICE:
            _discard(self.by_platform, (platform or "").lower(), client_id)
            self._remove_system_info(client_id, system_info)

    def replace_system_info(
        self, device_id: str, old: dict[str, Any] | None, new: dict[str, Any] | None
    ) -> None:
        """A device's system info changed. Only its capability and tag entries move: its place
        in the type and platform pools (its registration order) stays."""
        self._remove_system_info(device_id, old)
        self._add_system_info(device_id, new)

    def _add_system_info(self, device_id: str, system_info: dict[str, Any] | None) -> None:
        for feature in supported_features(system_info):
            self.by_feature.setdefault(feature, {})[device_id] = None
        for tag in device_tags(system_info):
            self.by_tag.setdefault(tag, {})[device_id] = None

    def _remove_system_info(self, device_id: str, system_info: dict[str, Any] | None) -> None:
        for feature in supported_features(system_info):
            _discard(self.by_feature, feature, device_id)
        for tag in device_tags(system_info):
            _discard(self.by_tag, tag, device_id)

    # -- queries --------------------------------------------------------------------------------

    def platform_counts(self) -> dict[str, int]:
        return {platform: len(ids) for platform, ids in self.by_platform.items() if ids}

    def select(
        self,
        platform: str | None,
        capabilities: list[str],
        tags: list[str],
        *,
        epoch_of: Callable[[str], int],
    ) -> str | None:
        """The device with `platform` (any case) and every capability that shares the most
        `tags`; ties go to the earliest registered (`epoch_of` orders registrations)."""
        devices = self.by_type[ClientType.DEVICE]
        # Candidates are intersections of index key views, computed in C (each `&` walks the
        # smaller side): about 10x cheaper than testing every device in Python.
        pools: list[Pool] = []
        if platform:
            pools.append(self.by_platform.get(platform.lower(), {}))
        for capability in capabilities:
            pools.append(self.by_feature.get(capability, {}))
        tag_pools = [pool for tag in tags if (pool := self.by_tag.get(tag))]
        # A pool holding every device filters nothing (a feature all devices report).
        pools = [pool for pool in pools if len(pool) < len(devices)]
        if tag_pools:
            # Common case first: some device qualifies and has every preferred tag (the top
            # score). Intersect from the smallest of all pools, tags included.
            ordered = sorted(pools + tag_pools, key=len)
            best: Collection[str] = ordered[0].keys()
            for pool in ordered[1:]:
                best = pool.keys() & best
                if not best:
                    break
            if best:
                return self._earliest(best, epoch_of)
        pools.sort(key=len)
        candidates: Collection[str] = pools[0].keys() if pools else devices.keys()
        for pool in pools[1:]:
            candidates = pool.keys() & candidates
            if not candidates:
                return None
        if not candidates:
            return None
        if tag_pools:
            scores: Counter[str] = Counter()
            for pool in tag_pools:
                scores.update(pool.keys() & candidates)
            if scores:
                top = max(scores.values())
                candidates = {d for d, score in scores.items() if score == top}
        return self._earliest(candidates, epoch_of)

    def _earliest(self, candidates: Collection[str], epoch_of: Callable[[str], int]) -> str:
        """The candidate registered first. Few: by epoch; many: walk the device pool, which is
        in registration order, until the first candidate."""
        if len(candidates) <= 32:
            return min(candidates, key=epoch_of)
        for device_id in self.by_type[ClientType.DEVICE]:
            if device_id in candidates:
                return device_id
        raise AssertionError("candidates must be live devices")  # pragma: no cover


def _discard(index: dict[str, Pool], key: str, client_id: str) -> None:
    ids = index.get(key)
    if ids is not None:
        ids.pop(client_id, None)
        if not ids:
            del index[key]
