"""The live registry: who is online, what each device can do, which sessions run where.

Every read is a dict lookup under one `threading.Lock`; nothing here waits on the database. With a
Store, registrations and disconnects are also queued for SQL (see `ccm.store.writer`). Method names
and semantics follow the seed's ClientConnectionManager; what the seed left as future work is here:
`remove_session` (completion and cancellation drop a session from both maps), duplicate-id policies
with a per-connection epoch, and indexes for platform, capability and tag lookups.
"""

from __future__ import annotations

import copy
import itertools
import logging
import threading
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ccm.clock import Clock, utcnow
from ccm.config import DuplicatePolicy
from ccm.devices import DeviceConfigs, merge_device_info
from ccm.domain import ClientType, DisconnectReason
from ccm.errors import DuplicateClientError
from ccm.ids import new_id

if TYPE_CHECKING:
    from ccm.store import Store

__all__ = ["ClientConnectionManager", "ClientInfo", "ClientType"]

logger = logging.getLogger(__name__)

_epochs = itertools.count(1)


@dataclass(eq=False)
class ClientInfo:
    """One live client connection, as the seed's ClientInfo plus the ids ccm needs.

    `epoch` grows with every registration, so a late disconnect of a replaced socket can be told
    apart from the current one; `connection_id` is the key of this connection's SQL row.
    """

    websocket: Any
    client_type: ClientType
    connected_at: datetime
    metadata: dict[str, Any] = field(default_factory=dict)
    platform: str = "windows"
    system_info: dict[str, Any] | None = None
    transport: Any = None
    task_protocol: Any = None
    client_id: str = ""
    connection_id: str = ""
    epoch: int = 0
    remote_address: str | None = None
    reported_system_info: dict[str, Any] | None = None
    last_heartbeat_at: datetime | None = None
    replaced: ClientInfo | None = None
    """Set on the new entry when the takeover policy evicted a live connection (to be closed)."""


def _features(info: ClientInfo) -> list[str]:
    if not info.system_info:
        return []
    features = info.system_info.get("supported_features") or []
    return [f for f in features if isinstance(f, str)] if isinstance(features, list) else []


def _tags(info: ClientInfo) -> list[str]:
    if not info.system_info:
        return []
    tags = info.system_info.get("tags") or []
    return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []


class ClientConnectionManager:
    """Thread-safe registry of live clients and session mappings, optionally backed by a Store."""

    def __init__(
        self,
        device_config_path: str | Path | None = None,
        *,
        store: Store | None = None,
        device_configs: DeviceConfigs | None = None,
        duplicate_policy: DuplicatePolicy | str = DuplicatePolicy.REJECT,
        clock: Clock = utcnow,
    ) -> None:
        if device_configs is None:
            device_configs = DeviceConfigs(Path(device_config_path) if device_config_path else None)
        self._device_configs = device_configs
        self._store = store
        self.duplicate_policy = DuplicatePolicy(duplicate_policy)
        self._clock = clock
        self.lock = threading.Lock()
        self.online_clients: dict[str, ClientInfo] = {}
        # Ordered sets (dict keys) so add/remove of one session is O(1) and order is kept.
        self._constellation_sessions: dict[str, dict[str, None]] = {}
        self._device_sessions: dict[str, dict[str, None]] = {}
        self._session_parties: dict[str, list[tuple[str, str]]] = {}
        # Indexes: insertion-ordered so "first registered" is the first key.
        self._by_type: dict[ClientType, dict[str, None]] = {t: {} for t in ClientType}
        self._devices_by_platform: dict[str, dict[str, None]] = {}
        self._devices_by_feature: dict[str, dict[str, None]] = {}
        self._devices_by_tag: dict[str, dict[str, None]] = {}
        self._heard: dict[str, None] = {}
        """Clients heard from (touch) since the last `take_heard_from`."""

    @property
    def device_configs(self) -> DeviceConfigs:
        return self._device_configs

    # -- client registry --------------------------------------------------------------------

    def add_client(
        self,
        client_id: str,
        platform: str,
        ws: Any,
        client_type: ClientType = ClientType.DEVICE,
        metadata: dict[str, Any] | None = None,
        transport: Any = None,
        task_protocol: Any = None,
        *,
        remote_address: str | None = None,
    ) -> ClientInfo:
        """Register a client connection.

        With policy `reject` a live id raises DuplicateClientError and the live entry is untouched.
        With `takeover` the old entry is replaced; it is returned in `ClientInfo.replaced` and its
        connection is recorded as closed with reason `replaced`.
        """
        client_type = ClientType(client_type)
        metadata = dict(metadata or {})
        reported = metadata.get("system_info") if client_type is ClientType.DEVICE else None
        reported = copy.deepcopy(reported) if isinstance(reported, dict) else None
        if reported is not None:
            # One private copy serves as metadata's, the reported and (without operator config)
            # the live system info: copies per idle connection are memory x 10,000 devices.
            metadata["system_info"] = reported
        system_info = self._system_info_for(client_id, reported)
        now = self._clock()
        info = ClientInfo(
            websocket=ws,
            client_type=client_type,
            connected_at=now,
            metadata=metadata,
            platform=platform,
            system_info=system_info,
            transport=transport,
            task_protocol=task_protocol,
            client_id=client_id,
            connection_id=new_id(),
            remote_address=remote_address,
            reported_system_info=reported,
            last_heartbeat_at=now,
        )
        with self.lock:
            info.epoch = next(_epochs)  # under the lock: epochs follow registration order
            old = self.online_clients.get(client_id)
            if old is not None:
                if self.duplicate_policy is DuplicatePolicy.REJECT:
                    raise DuplicateClientError(client_id)
                self._unindex(old)
                del self.online_clients[client_id]
                info.replaced = old
            self.online_clients[client_id] = info
            self._index(info)
        if self._store is not None:
            if old is not None:
                self._store.record_disconnect(
                    connection_id=old.connection_id,
                    client_id=client_id,
                    reason=DisconnectReason.REPLACED,
                    at=now,
                )
            self._store.record_connect(
                connection_id=info.connection_id,
                client_id=client_id,
                client_type=client_type,
                platform=platform,
                metadata=_json_safe(metadata),
                system_info=_json_safe(system_info),
                remote_address=remote_address,
                at=now,
            )
        if old is not None:
            logger.warning("client replaced by takeover client_id=%s", client_id)
        logger.info(
            "client registered client_id=%s type=%s remote=%s",
            client_id,
            client_type.value,
            remote_address,
        )
        return info

    def remove_client(
        self,
        client_id: str,
        *,
        epoch: int | None = None,
        reason: DisconnectReason = DisconnectReason.CLOSED,
    ) -> ClientInfo | None:
        """Remove a client. With `epoch`, only that registration is removed (a late disconnect of
        a replaced socket leaves the newer one alone). Returns the removed entry, if any."""
        with self.lock:
            info = self.online_clients.get(client_id)
            if info is None or (epoch is not None and info.epoch != epoch):
                return None
            del self.online_clients[client_id]
            self._unindex(info)
        if self._store is not None:
            self._store.record_disconnect(
                connection_id=info.connection_id,
                client_id=client_id,
                reason=reason,
                at=self._clock(),
            )
        logger.info("client removed client_id=%s reason=%s", client_id, reason)
        return info

    def get_client(self, client_id: str) -> Any:
        """The client's WebSocket, or None."""
        with self.lock:
            info = self.online_clients.get(client_id)
            return info.websocket if info else None

    def get_client_info(self, client_id: str) -> ClientInfo | None:
        with self.lock:
            return self.online_clients.get(client_id)

    def get_client_type(self, client_id: str) -> ClientType | None:
        with self.lock:
            info = self.online_clients.get(client_id)
            return info.client_type if info else None

    def list_clients(self, client_type: ClientType | None = None) -> list[str]:
        """Ids of live clients in registration order, all or of one type."""
        with self.lock:
            if client_type is None:
                return list(self.online_clients)
            return list(self._by_type[ClientType(client_type)])

    def list_clients_by_type(self, client_type: ClientType) -> list[str]:
        return self.list_clients(client_type)

    def is_online(self, client_id: str) -> bool:
        with self.lock:
            return client_id in self.online_clients

    def is_device_connected(self, device_id: str) -> bool:
        """True only if the id is live **and** registered as a device."""
        with self.lock:
            info = self.online_clients.get(device_id)
            return info is not None and info.client_type is ClientType.DEVICE

    def touch(self, client_id: str, *, epoch: int | None = None) -> bool:
        """Note a heartbeat (memory only). False if that registration is not live."""
        with self.lock:
            info = self.online_clients.get(client_id)
            if info is None or (epoch is not None and info.epoch != epoch):
                return False
            info.last_heartbeat_at = self._clock()
            self._heard[client_id] = None
            return True

    def take_heard_from(self) -> list[tuple[str, str, datetime]]:
        """(client id, connection id, last heard at) of the live clients heard from since the
        last call: what the store's `last_seen_at` must catch up with."""
        with self.lock:
            heard, self._heard = self._heard, {}
            return [
                (client_id, info.connection_id, info.last_heartbeat_at)
                for client_id in heard
                if (info := self.online_clients.get(client_id)) is not None
                and info.last_heartbeat_at is not None
            ]

    # -- session mappings -------------------------------------------------------------------

    def add_constellation_session(self, client_id: str, session_id: str) -> None:
        with self.lock:
            self._constellation_sessions.setdefault(client_id, {})[session_id] = None
            parties = self._session_parties.setdefault(session_id, [])
            if ("c", client_id) not in parties:  # the mapping is a set; keep parties in step
                parties.append(("c", client_id))

    def get_constellation_sessions(self, client_id: str) -> list[str]:
        with self.lock:
            return list(self._constellation_sessions.get(client_id, ()))

    def count_constellation_sessions(self, client_id: str) -> int:
        with self.lock:
            return len(self._constellation_sessions.get(client_id, ()))

    def remove_constellation_sessions(self, client_id: str) -> list[str]:
        with self.lock:
            removed = list(self._constellation_sessions.pop(client_id, ()))
            for session_id in removed:
                self._forget_party(session_id, ("c", client_id))
            return removed

    def add_device_session(self, device_id: str, session_id: str) -> None:
        with self.lock:
            self._device_sessions.setdefault(device_id, {})[session_id] = None
            parties = self._session_parties.setdefault(session_id, [])
            if ("d", device_id) not in parties:  # the mapping is a set; keep parties in step
                parties.append(("d", device_id))

    def get_device_sessions(self, device_id: str) -> list[str]:
        with self.lock:
            return list(self._device_sessions.get(device_id, ()))

    def count_device_sessions(self, device_id: str) -> int:
        with self.lock:
            return len(self._device_sessions.get(device_id, ()))

    def remove_device_sessions(self, device_id: str) -> list[str]:
        with self.lock:
            removed = list(self._device_sessions.pop(device_id, ()))
            for session_id in removed:
                self._forget_party(session_id, ("d", device_id))
            return removed

    def remove_session(self, session_id: str) -> bool:
        """Drop one session from both maps (on completion or cancellation). Idempotent."""
        with self.lock:
            parties = self._session_parties.pop(session_id, None)
            if not parties:
                return False
            for kind, client_id in parties:
                mapping = self._constellation_sessions if kind == "c" else self._device_sessions
                sessions = mapping.get(client_id)
                if sessions is not None:
                    sessions.pop(session_id, None)
                    if not sessions:
                        del mapping[client_id]
            return True

    def session_count(self) -> int:
        with self.lock:
            return len(self._session_parties)

    def _forget_party(self, session_id: str, party: tuple[str, str]) -> None:
        parties = self._session_parties.get(session_id)
        if parties is None:
            return
        if party in parties:
            parties.remove(party)
        if not parties:
            del self._session_parties[session_id]

    # -- device information -----------------------------------------------------------------

    def get_device_system_info(self, device_id: str) -> dict[str, Any] | None:
        """A copy of the device's (merged) system info, or None."""
        with self.lock:
            info = self.online_clients.get(device_id)
            if info is None or info.client_type is not ClientType.DEVICE:
                return None
            return copy.deepcopy(info.system_info)

    def get_all_devices_info(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {
                device_id: copy.deepcopy(info.system_info)
                for device_id in self._by_type[ClientType.DEVICE]
                if (info := self.online_clients[device_id]).system_info
            }

    def reload_device_config(self) -> int:
        """Re-read the device config file and re-merge it into every live device's info.

        Raises ConfigError (and keeps the old config) if the file is now missing or malformed.
        Returns the number of live devices whose system info changed.
        """
        self._device_configs.reload()
        changed: list[ClientInfo] = []
        with self.lock:
            for device_id in self._by_type[ClientType.DEVICE]:
                info = self.online_clients[device_id]
                merged = self._system_info_for(device_id, info.reported_system_info)
                if merged != info.system_info:
                    # Only the system-info indexes change; re-indexing the type pool would move
                    # the id to the end (breaking registration order) while we iterate over it.
                    self._unindex_system_info(info)
                    info.system_info = merged
                    self._index_system_info(info)
                    changed.append(info)
        if self._store is not None:
            for info in changed:
                self._store.record_system_info(
                    client_id=info.client_id, system_info=_json_safe(info.system_info)
                )
        return len(changed)

    def _system_info_for(
        self, device_id: str, reported: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        if reported is None:
            return None
        server_config = self._device_configs.get(device_id)
        if server_config:
            logger.info("merged server config for device client_id=%s", device_id)
            return merge_device_info(reported, server_config)
        return reported  # the registry's own copy; it is replaced, never changed in place

    # -- statistics and queries -------------------------------------------------------------

    def get_stats(self) -> dict[str, Any]:
        """The seed's counts (`total`, `device_clients`, `constellation_clients`), plus per-type
        id lists and platform counts (the shape the seed's API router reads), plus sessions."""
        with self.lock:
            devices = list(self._by_type[ClientType.DEVICE])
            constellations = list(self._by_type[ClientType.CONSTELLATION])
            platforms = {
                platform: len(ids) for platform, ids in self._devices_by_platform.items() if ids
            }
            active_sessions = len(self._session_parties)
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
            return list(self._devices_by_platform.get(platform.lower(), ()))

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
            return list(self._devices_by_feature.get(capability, ()))

    def find_devices_with_tag(self, tag: str) -> list[str]:
        with self.lock:
            return list(self._devices_by_tag.get(tag, ()))

    def select_optimal_device(
        self,
        required_platform: str | None = None,
        required_capabilities: Iterable[str] | None = None,
        preferred_tags: Iterable[str] | None = None,
    ) -> str | None:
        """The live device that has the platform and every capability and shares the most
        preferred tags; ties go to the earliest registered. None if no device qualifies.

        Unlike the seed's sketch, a device without system info has no capabilities, so it never
        satisfies a capability requirement.
        """
        capabilities = list(dict.fromkeys(required_capabilities or ()))
        tags = list(dict.fromkeys(preferred_tags or ()))
        with self.lock:
            devices = self._by_type[ClientType.DEVICE]
            # Candidates are intersections of index key views, computed in C (each `&` walks
            # the smaller side): about 10x cheaper than testing every device in Python.
            pools: list[dict[str, None]] = []
            if required_platform:
                pools.append(self._devices_by_platform.get(required_platform.lower(), {}))
            for capability in capabilities:
                pools.append(self._devices_by_feature.get(capability, {}))
            tag_pools = [pool for tag in tags if (pool := self._devices_by_tag.get(tag))]
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
                    return self._earliest(best)
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
            return self._earliest(candidates)

    def _earliest(self, candidates: Collection[str]) -> str:
        """The candidate registered first (caller holds the lock). Few: by epoch; many: walk the
        device pool, which is in registration order, until the first candidate."""
        if len(candidates) <= 32:
            return min(candidates, key=lambda d: self.online_clients[d].epoch)
        for device_id in self._by_type[ClientType.DEVICE]:
            if device_id in candidates:
                return device_id
        raise AssertionError("candidates must be live devices")  # pragma: no cover

    # -- index maintenance (caller holds the lock) ------------------------------------------

    def _index(self, info: ClientInfo) -> None:
        self._by_type[info.client_type][info.client_id] = None
        if info.client_type is not ClientType.DEVICE:
            return
        self._devices_by_platform.setdefault((info.platform or "").lower(), {})[info.client_id] = (
            None
        )
        self._index_system_info(info)

    def _index_system_info(self, info: ClientInfo) -> None:
        for feature in _features(info):
            self._devices_by_feature.setdefault(feature, {})[info.client_id] = None
        for tag in _tags(info):
            self._devices_by_tag.setdefault(tag, {})[info.client_id] = None

    def _unindex(self, info: ClientInfo) -> None:
        self._by_type[info.client_type].pop(info.client_id, None)
        if info.client_type is not ClientType.DEVICE:
            return
        _discard(self._devices_by_platform, (info.platform or "").lower(), info.client_id)
        self._unindex_system_info(info)

    def _unindex_system_info(self, info: ClientInfo) -> None:
        for feature in _features(info):
            _discard(self._devices_by_feature, feature, info.client_id)
        for tag in _tags(info):
            _discard(self._devices_by_tag, tag, info.client_id)


def _discard(index: dict[str, dict[str, None]], key: str, client_id: str) -> None:
    ids = index.get(key)
    if ids is not None:
        ids.pop(client_id, None)
        if not ids:
            del index[key]


def _json_safe(value: Any) -> Any:
    """Metadata goes to a JSON column; anything not JSON-native is stored as its string form."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return str(value)
