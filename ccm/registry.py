"""The live registry: who is online, what each device can do, which sessions run where.

Every read is a dict lookup under one `threading.Lock`; nothing here waits on the database. With a
Store, registrations and disconnects are also queued for SQL (see `ccm.store.writer`). Method names
and semantics are those of UFO's ClientConnectionManager (ufo/server/services/ in microsoft/UFO),
plus `remove_session` (completion and cancellation drop a session from both maps), duplicate-id
policies with a per-connection epoch, and indexes for platform, capability and tag lookups.
"""

from __future__ import annotations

import copy
import logging
import threading
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ccm.client_info import ClientInfo, next_epoch
from ccm.clock import Clock, utcnow
from ccm.config import DuplicatePolicy
from ccm.device_index import DeviceIndex
from ccm.device_load import CapacityPolicy, DeviceLoads, LoadCounts
from ccm.devices import DeviceConfigs, merge_device_info
from ccm.domain import ClientType, DisconnectReason
from ccm.errors import DuplicateClientError
from ccm.ids import new_id
from ccm.registry_queries import RegistryQueries
from ccm.session_map import SessionMap

if TYPE_CHECKING:
    from ccm.store import Store

__all__ = ["ClientConnectionManager", "ClientInfo", "ClientType"]

logger = logging.getLogger(__name__)


class ClientConnectionManager(RegistryQueries):
    """Thread-safe registry of live clients and session mappings, optionally backed by a Store."""

    def __init__(
        self,
        device_config_path: str | Path | None = None,
        *,
        store: Store | None = None,
        device_configs: DeviceConfigs | None = None,
        duplicate_policy: DuplicatePolicy | str = DuplicatePolicy.REJECT,
        capacity: CapacityPolicy | None = None,
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
        self._sessions = SessionMap()
        self._index = DeviceIndex()
        self._loads = DeviceLoads(self._index, capacity or CapacityPolicy())
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
        record: bool = True,
    ) -> ClientInfo:
        """Register a client connection. With `record` False the caller persists it itself
        (a cluster node claims the id in the database first).

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
        capacity = (
            self._loads.policy.capacity(self._device_configs.get(client_id), metadata)
            if client_type is ClientType.DEVICE
            else None
        )
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
            info.epoch = next_epoch()  # under the lock: epochs follow registration order
            old = self.online_clients.get(client_id)
            if old is not None:
                if self.duplicate_policy is DuplicatePolicy.REJECT:
                    raise DuplicateClientError(client_id)
                self._index.remove(old.client_id, old.client_type, old.platform, old.system_info)
                self._loads.remove(client_id)
                del self.online_clients[client_id]
                info.replaced = old
            self.online_clients[client_id] = info
            self._index.add(info.client_id, info.client_type, info.platform, info.system_info)
            if client_type is ClientType.DEVICE:
                self._loads.add(client_id, capacity)
        if self._store is not None and record:
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
                metadata=metadata,
                system_info=system_info,
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
            self._index.remove(info.client_id, info.client_type, info.platform, info.system_info)
            self._loads.remove(client_id)
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
            return list(self._index.by_type[ClientType(client_type)])

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
            self._sessions.add(ClientType.CONSTELLATION, client_id, session_id)

    def get_constellation_sessions(self, client_id: str) -> list[str]:
        with self.lock:
            return self._sessions.of(ClientType.CONSTELLATION, client_id)

    def count_constellation_sessions(self, client_id: str) -> int:
        with self.lock:
            return self._sessions.count(ClientType.CONSTELLATION, client_id)

    def remove_constellation_sessions(self, client_id: str) -> list[str]:
        with self.lock:
            return self._sessions.remove_client(ClientType.CONSTELLATION, client_id)

    def add_device_session(self, device_id: str, session_id: str) -> None:
        with self.lock:
            self._sessions.add(ClientType.DEVICE, device_id, session_id)

    def get_device_sessions(self, device_id: str) -> list[str]:
        with self.lock:
            return self._sessions.of(ClientType.DEVICE, device_id)

    def count_device_sessions(self, device_id: str) -> int:
        with self.lock:
            return self._sessions.count(ClientType.DEVICE, device_id)

    def remove_device_sessions(self, device_id: str) -> list[str]:
        with self.lock:
            return self._sessions.remove_client(ClientType.DEVICE, device_id)

    def remove_session(self, session_id: str) -> bool:
        """Drop one session from both maps (on completion or cancellation). Idempotent."""
        with self.lock:
            return self._sessions.remove_session(session_id)

    def session_count(self) -> int:
        with self.lock:
            return len(self._sessions)

    # -- capacity and queues ----------------------------------------------------------------

    def admit_session(self, device_id: str, session_id: str) -> int:
        """Count a new session on its device: 0 if it may run now, else its place in the
        device's queue (1 is next). Raises QueueFull when the queue is at its bound."""
        with self.lock:
            return self._loads.admit(device_id, session_id)

    def release_session(self, session_id: str) -> list[str]:
        """A session ended: the queued sessions of its device that may run now, oldest first
        (they count as running already). Idempotent."""
        with self.lock:
            return self._loads.release(session_id)

    def device_load(self, device_id: str) -> LoadCounts | None:
        """A live device's capacity (None: unlimited) and its running and queued sessions."""
        with self.lock:
            return self._loads.counts(device_id)

    def device_loads(self) -> dict[str, LoadCounts]:
        """Every live device's capacity and running and queued sessions, in registration order."""
        with self.lock:
            return self._loads.all_counts()

    def queue_position(self, device_id: str, session_id: str) -> int:
        with self.lock:
            return self._loads.queue_position(device_id, session_id)

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
                for device_id in self._index.by_type[ClientType.DEVICE]
                if (info := self.online_clients[device_id]).system_info
            }

    def reload_device_config(self) -> int:
        """Re-read the device config file and re-merge it into every live device's info.

        Raises ConfigError (and keeps the old config) if the file is now missing or malformed.
        Returns the number of live devices whose system info changed.
        """
        self._device_configs.reload()
        changed: list[ClientInfo] = []
        with self.lock:  # DeviceConfigs has a lock of its own, never held while taking this one
            for device_id in list(self._index.by_type[ClientType.DEVICE]):
                info = self.online_clients[device_id]
                config = self._device_configs.get(device_id)
                self._loads.set_capacity(
                    device_id, self._loads.policy.capacity(config, info.metadata)
                )
                merged = self._system_info_for(device_id, info.reported_system_info)
                if merged != info.system_info:
                    self._index.replace_system_info(device_id, info.system_info, merged)
                    info.system_info = merged
                    changed.append(info)
        if self._store is not None:
            for info in changed:
                self._store.record_system_info(
                    client_id=info.client_id, system_info=info.system_info
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
