"""DeviceLoads: how many sessions each live device runs, how many it may run (its capacity), and
the sessions waiting for it (`pending`) in arrival order.

It holds no lock: the registry calls it under its own. Every change of a device's free capacity
is passed to the DeviceIndex, so selection reads free capacity from a bucket, not per device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ccm.device_index import DeviceIndex
from ccm.devices import capacity_value
from ccm.errors import QueueFull

if TYPE_CHECKING:
    from ccm.config import DispatchSettings

CAPACITY_KEY = "max_concurrent_tasks"
"""The key naming a device's capacity, in the device config and in REGISTER metadata."""


@dataclass(frozen=True, slots=True)
class CapacityPolicy:
    """Where a device's capacity comes from (the `dispatch` settings)."""

    default: int | None = None
    """For a device with no capacity of its own; None: unlimited."""
    from_registration: bool = False
    """Accept the capacity a device declares in its REGISTER metadata (or system_info)."""
    max_queue: int = 100
    """Pending sessions per device at capacity; one more is refused."""

    @classmethod
    def from_settings(cls, dispatch: DispatchSettings) -> CapacityPolicy:
        return cls(
            default=dispatch.default_max_concurrent_tasks,
            from_registration=dispatch.capacity_from_registration,
            max_queue=dispatch.max_queue_per_device,
        )

    def capacity(
        self, config: Mapping[str, Any] | None, metadata: Mapping[str, Any] | None
    ) -> int | None:
        """The device config's `max_concurrent_tasks`, else (if allowed) the one the device
        registered with, else the default."""
        configured = capacity_value((config or {}).get(CAPACITY_KEY))
        if configured is not None:
            return configured
        if self.from_registration and metadata is not None:
            system_info = metadata.get("system_info")
            for source in (metadata, system_info if isinstance(system_info, Mapping) else {}):
                declared = capacity_value(source.get(CAPACITY_KEY))
                if declared is not None:
                    return declared
        return self.default


@dataclass(slots=True)
class Load:
    """One live device's sessions: those it runs and those waiting, both in arrival order."""

    capacity: int | None
    running: dict[str, None] = field(default_factory=dict)
    queued: dict[str, None] = field(default_factory=dict)

    @property
    def free(self) -> float:
        """Sessions it may still start now (math.inf without a capacity)."""
        if self.capacity is None:
            return math.inf
        return max(0, self.capacity - len(self.running))


@dataclass(frozen=True, slots=True)
class LoadCounts:
    """What /api/devices, /metrics and the dashboard show of a device's load."""

    capacity: int | None
    running: int
    queued: int


class DeviceLoads:
    """Running and queued sessions per live device, keyed by wire session id."""

    def __init__(self, index: DeviceIndex, policy: CapacityPolicy) -> None:
        self._index = index
        self.policy = policy
        self._loads: dict[str, Load] = {}
        self._device_of: dict[str, str] = {}

    def add(self, device_id: str, capacity: int | None) -> None:
        """A device registered (a takeover starts afresh: the old sessions end on their own)."""
        self.remove(device_id)
        load = Load(capacity)
        self._loads[device_id] = load
        self._index.set_free(device_id, load.free)

    def remove(self, device_id: str) -> None:
        """A device left: nothing of it is started any more (its sessions end elsewhere)."""
        load = self._loads.pop(device_id, None)
        if load is None:
            return
        for session_id in (*load.running, *load.queued):
            self._device_of.pop(session_id, None)

    def set_capacity(self, device_id: str, capacity: int | None) -> None:
        """The device config changed; a larger capacity takes effect as sessions end."""
        load = self._loads.get(device_id)
        if load is not None and load.capacity != capacity:
            load.capacity = capacity
            self._index.set_free(device_id, load.free)

    def counts(self, device_id: str) -> LoadCounts | None:
        load = self._loads.get(device_id)
        if load is None:
            return None
        return LoadCounts(load.capacity, len(load.running), len(load.queued))

    def all_counts(self) -> dict[str, LoadCounts]:
        return {
            device_id: LoadCounts(load.capacity, len(load.running), len(load.queued))
            for device_id, load in self._loads.items()
        }

    def queue_position(self, device_id: str, session_id: str) -> int:
        """Where a pending session stands in its device's queue (1 is next); 0 if not queued."""
        load = self._loads.get(device_id)
        if load is None or session_id not in load.queued:
            return 0
        for position, queued in enumerate(load.queued, 1):
            if queued == session_id:
                return position
        return 0  # pragma: no cover

    def admit(self, device_id: str, session_id: str) -> int:
        """Count a new session on its device: 0 if it may run now, else its place in the queue
        (1 is next). Raises QueueFull at the bound. A device not tracked here is not limited."""
        load = self._loads.get(device_id)
        if load is None:
            return 0
        if load.free > 0 and not load.queued:
            load.running[session_id] = None
            self._device_of[session_id] = device_id
            self._index.set_free(device_id, load.free)
            return 0
        if len(load.queued) >= self.policy.max_queue:
            raise QueueFull(device_id, self.policy.max_queue)
        load.queued[session_id] = None
        self._device_of[session_id] = device_id
        return len(load.queued)

    def release(self, session_id: str) -> list[str]:
        """A session ended: its slot (or its place in the queue) is free. Returns the queued
        sessions that may run now, oldest first; they count as running when this returns."""
        device_id = self._device_of.pop(session_id, None)
        if device_id is None or (load := self._loads.get(device_id)) is None:
            return []
        if session_id in load.queued:  # it never ran: nothing else may start
            del load.queued[session_id]
            return []
        load.running.pop(session_id, None)
        started: list[str] = []
        while load.queued and load.free > 0:
            next_id = next(iter(load.queued))
            del load.queued[next_id]
            load.running[next_id] = None
            started.append(next_id)
        self._index.set_free(device_id, load.free)
        return started
