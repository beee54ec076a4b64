"""What the live dashboard shows, built once for every open page.

DashboardFeed samples the registry and the app's metrics every couple of seconds into a per-minute
ring buffer (the hour of charts) and, while a page is open, builds one snapshot that all event
streams share: ten open pages cost one SQL query per tick, not ten.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import Counter

from ccm.clock import Clock, utcnow
from ccm.domain import ClientType
from ccm.metrics import Metrics
from ccm.server import views
from ccm.server.hub import Hub
from ccm.store import Store
from ccm.store.repository import SessionRow, read_sessions

logger = logging.getLogger(__name__)

Json = dict[str, Any]

RECENT_SESSIONS = 100
MAX_SUBSCRIBERS = 32
"""Open event streams at once; more get 503 (each holds a connection for up to STREAM_SECONDS)."""
STREAM_SECONDS = 15 * 60.0
"""A stream ends after this and the page reconnects, so no response lives forever."""
KEEPALIVE_SECONDS = 15.0
"""An SSE comment this often when nothing changed: a gone client is noticed on the next write."""
REREAD_SECONDS = 60.0
"""Recent sessions are read again after a store commit, or after this long (cleanup deletes rows
without the writer). Unfiltered `ORDER BY created_at` scans the table without an index on it."""


@dataclass
class _Minute:
    start: datetime
    devices: int = 0
    sessions_started: int = 0
    disconnects: dict[str, int] = field(default_factory=dict)


class MinuteSeries:
    """The last `size` minutes of activity, kept in memory for the dashboard's charts.

    It folds samples of cumulative counters into per-minute deltas. It is lost on restart on
    purpose: SQL keeps the history, this only spares the page a query per chart.
    """

    def __init__(self, size: int = 60) -> None:
        self.size = size
        self._minutes: deque[_Minute] = deque(maxlen=size)
        self._sessions_seen = 0  # the app's counters start at 0 with the app, as this does
        self._disconnects_seen: dict[str, int] = {}

    def record(
        self,
        at: datetime,
        *,
        devices: int,
        sessions_started: int,
        disconnects: Mapping[str, int],
    ) -> None:
        """Fold one sample into the minute `at` falls in; `devices` keeps the minute's peak."""
        start = at.replace(second=0, microsecond=0)
        if not self._minutes or self._minutes[-1].start < start:
            self._minutes.append(_Minute(start))
        minute = self._minutes[-1]  # a clock step backwards folds into the newest minute
        minute.devices = max(minute.devices, devices)
        minute.sessions_started += max(0, sessions_started - self._sessions_seen)
        self._sessions_seen = sessions_started
        for reason, total in disconnects.items():
            delta = total - self._disconnects_seen.get(reason, 0)
            if delta > 0:
                minute.disconnects[reason] = minute.disconnects.get(reason, 0) + delta
            self._disconnects_seen[reason] = total

    def columns(self, now: datetime) -> Json:
        """The `size` minutes up to `now`, oldest first; minutes never sampled have devices None."""
        by_start = {m.start: m for m in self._minutes}
        last = now.replace(second=0, microsecond=0)
        starts = [last - timedelta(minutes=self.size - 1 - i) for i in range(self.size)]
        reasons = sorted({r for m in self._minutes for r in m.disconnects})
        picked = [by_start.get(s) for s in starts]
        return {
            "minutes": [s.isoformat() for s in starts],
            "devices": [m.devices if m else None for m in picked],
            "sessions_started": [m.sessions_started if m else 0 for m in picked],
            "disconnects": {
                r: [m.disconnects.get(r, 0) if m else 0 for m in picked] for r in reasons
            },
        }


def _totals(counter: Counter, label: str | None = None) -> dict[str, int]:
    """Cumulative values of a prometheus Counter, summed per `label` (or under "")."""
    totals: dict[str, int] = {}
    for metric in counter.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                key = sample.labels.get(label, "") if label else ""
                totals[key] = totals.get(key, 0) + int(sample.value)
    return totals


def _session_view(row: SessionRow) -> Json:
    """A session row for the page: no request or result (they can be large), error shortened."""
    duration = None
    if row.ended_at is not None:
        duration = round((row.ended_at - (row.started_at or row.created_at)).total_seconds(), 3)
    return {
        "id": row.id,
        "session_id": row.session_id,
        "state": row.state,
        "reason": row.reason,
        "error": row.error[:200] if row.error else None,
        "device_id": row.device_id,
        "constellation_id": row.constellation_id,
        "origin": row.origin,
        "mode": row.mode,
        "task_name": row.task_name,
        "created_at": row.created_at.isoformat(),
        "started_at": row.started_at.isoformat() if row.started_at else None,
        "ended_at": row.ended_at.isoformat() if row.ended_at else None,
        "duration_seconds": duration,
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


class DashboardFeed:
    """Samples the live state every `tick` seconds and publishes snapshots to open streams.

    Owned by the app's lifespan: `start()` there, `close()` when the server begins to stop (so
    uvicorn's drain does not wait for open browsers), `await stop()` at the end.
    """

    def __init__(
        self,
        *,
        hub: Hub,
        store: Store | None,
        metrics: Metrics,
        tick: float = 2.0,
        clock: Clock = utcnow,
    ) -> None:
        """`store` None: ccm runs without a database; the page shows live state only."""
        self.hub = hub
        self.store = store
        self.metrics = metrics
        self.tick = tick
        self.series = MinuteSeries()
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()
        self._refreshing = asyncio.Lock()
        self._body = ""  # the latest snapshot without its time, to tell a change from a tick
        self._payload: str | None = None
        self._version = 0
        self._subscribers = 0
        self._closed = False
        self._waker: asyncio.Task[None] | None = None
        self._recent: list[Json] = []
        self._recent_as_of: tuple[int, float] | None = None  # (writes committed, monotonic time)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ccm-dashboard")

    def close(self) -> None:
        """End every open stream now; idempotent."""
        self._closed = True
        with contextlib.suppress(RuntimeError):  # no running loop: nothing can be waiting
            self._waker = asyncio.get_running_loop().create_task(self._wake())

    async def stop(self) -> None:
        self.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def is_full(self) -> bool:
        return self._subscribers >= MAX_SUBSCRIBERS

    async def _wake(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _run(self) -> None:
        while True:
            try:
                self.sample()
                if self._subscribers:
                    await self.refresh()
            except Exception:  # the page must keep its charts even if one tick fails
                logger.exception("dashboard tick failed")
            await asyncio.sleep(self.tick)

    def sample(self) -> None:
        """Add the current counts to the per-minute series (memory only, cheap)."""
        registry = self.hub.registry
        self.series.record(
            self._clock(),
            devices=len(registry.list_clients(ClientType.DEVICE)),
            sessions_started=sum(_totals(self.metrics.sessions_started).values()),
            disconnects=_totals(self.metrics.disconnects, "reason"),
        )

    async def snapshot(self) -> Json:
        """Everything the page shows, as one JSON object (SQL read in a worker thread)."""
        now = self._clock()
        live = self._live_view()
        recent, sessions_error = await self._recent_sessions()
        return {
            "server_time": now.isoformat(),
            **live,
            "sessions": recent,
            "sessions_error": sessions_error,
            "series": self.series.columns(now),
            "store": self._store_view(),
        }

    async def _recent_sessions(self) -> tuple[list[Json] | None, str | None]:
        """The newest sessions from SQL, or None and a sentence for the page saying why not."""
        if self.store is None:
            return None, "ccm runs without a database (database.enabled: false): no history"
        # Read the commit count before the query: a commit in between only causes one more read.
        committed, now = self.store.writer.stats().writes_committed, time.monotonic()
        if self._recent_as_of is not None:
            seen, read_at = self._recent_as_of
            if seen == committed and now - read_at < REREAD_SECONDS:
                return self._recent, None  # nothing was written since: the rows are the same
        try:
            rows = await asyncio.to_thread(read_sessions, self.store.engine, limit=RECENT_SESSIONS)
        except Exception as exc:  # noqa: BLE001 - the live half is still worth showing while SQL is away
            logger.warning("dashboard could not read sessions: %s", exc)
            return None, "the database did not answer; see the server log"
        self._recent, self._recent_as_of = [_session_view(r) for r in rows], (committed, now)
        return self._recent, None

    def _store_view(self) -> Json:
        if self.store is None:
            return {"enabled": False, "degraded": False, "queue_depth": 0}
        writer = self.store.writer.stats()
        return {"enabled": True, "degraded": writer.degraded, "queue_depth": writer.queue_depth}

    def _live_view(self) -> Json:
        registry = self.hub.registry
        devices, constellations = [], []
        for client_id in registry.list_clients():
            info = registry.get_client_info(client_id)
            if info is None:  # left between the two calls
                continue
            common = {
                "client_id": client_id,
                "connected_at": info.connected_at.isoformat(),
                "last_heartbeat_at": _iso(info.last_heartbeat_at),
            }
            if info.client_type is ClientType.DEVICE:
                system_info = info.system_info or {}
                load = registry.device_load(client_id)
                devices.append(
                    {
                        **common,
                        "platform": info.platform,
                        "tags": _strings(system_info.get("tags")),
                        "capabilities": _strings(system_info.get("supported_features")),
                        "mode": "relay" if self.hub.is_relay_device(client_id) else "agent",
                        "sessions": registry.get_device_sessions(client_id),
                        "running": load.running if load else None,
                        "queued": load.queued if load else None,
                        "capacity": load.capacity if load else None,
                    }
                )
            else:
                peer = self.hub.peer_of(client_id)
                constellations.append(
                    {
                        **common,
                        "target_id": peer.target_id if peer else None,
                        "sessions": registry.get_constellation_sessions(client_id),
                    }
                )
        here = views.this_node_name(self.hub)
        for client in devices + constellations:
            client["node"] = here
        remote_devices, remote_constellations = self._remote_clients(set(registry.list_clients()))
        devices += remote_devices
        constellations += remote_constellations
        return {
            "devices": sorted(devices, key=lambda d: d["client_id"]),
            "constellations": sorted(constellations, key=lambda c: c["client_id"]),
            "live_sessions": registry.session_count(),
            "nodes": views.nodes_in_memory(self.hub),
        }

    def _remote_clients(self, local: set[str]) -> tuple[list[Json], list[Json]]:
        """The other nodes' clients (a cluster), as far as this node knows them."""
        cluster = self.hub.cluster
        if cluster is None:
            return [], []
        devices, constellations = [], []
        for remote in cluster.directory.clients():
            if remote.client_id in local:
                continue
            node = cluster.directory.nodes.get(remote.run_id)
            common: Json = {
                "client_id": remote.client_id,
                "connected_at": remote.connected_at.isoformat(),
                "last_heartbeat_at": None,
                "node": node.name if node is not None else remote.run_id,
                "remote": True,
                "sessions": [],
            }
            if remote.client_type is ClientType.DEVICE:
                system_info = remote.system_info or {}
                devices.append(
                    {
                        **common,
                        "platform": remote.platform,
                        "tags": _strings(system_info.get("tags")),
                        "capabilities": _strings(system_info.get("supported_features")),
                        "mode": None,
                        "running": None,
                        "queued": None,
                        "capacity": None,
                    }
                )
            else:
                constellations.append({**common, "target_id": None})
        return devices, constellations

    async def refresh(self) -> None:
        """Build a snapshot; if anything but the time changed, publish it to every stream."""
        async with self._refreshing:
            data = await self.snapshot()
            body = json.dumps({k: v for k, v in data.items() if k != "server_time"}, default=str)
            if body == self._body and self._payload is not None:
                return
            self._body = body
            self._payload = json.dumps(data, default=str)
            self._version += 1
        await self._wake()

    async def stream(self) -> AsyncIterator[str]:
        """SSE text for one page: a fresh snapshot at once, then each change, until the page goes
        away (Starlette cancels this generator), STREAM_SECONDS pass, or `close()`."""
        self._subscribers += 1
        try:
            await self.refresh()  # the stored one may be old if nobody was watching
            sent = 0
            deadline = time.monotonic() + STREAM_SECONDS
            while not self._closed and time.monotonic() < deadline:
                if self._version != sent and self._payload is not None:
                    sent = self._version
                    yield f"event: snapshot\ndata: {self._payload}\n\n"
                if not await self._wait_for_change(sent):
                    yield ": keepalive\n\n"  # outside the condition's lock: a send may block
        finally:
            self._subscribers -= 1

    async def _wait_for_change(self, seen: int) -> bool:
        """True once a snapshot newer than `seen` exists or the feed closed; False after
        KEEPALIVE_SECONDS without either."""
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self._closed or self._version != seen),
                    KEEPALIVE_SECONDS,
                )
            except TimeoutError:
                return False
        return True


def _strings(value: object) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
