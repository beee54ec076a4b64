"""Prometheus metrics, one registry per app (no import-time globals).

Counters and histograms are updated where things happen (hub, peers, writer, cleanup). Values
that already live somewhere (clients online, the writer's queue depth) are read at scrape time by
a collector instead of being mirrored, so they can never drift.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ccm.registry import ClientConnectionManager
    from ccm.store.writer import StoreWriter

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


class _FrameCounts(Collector):
    """Frames in and out by type, counted in plain dicts and exported when Prometheus scrapes.

    Every frame is counted, and a prometheus_client Counter takes a lock per increment (3% of
    the server's time in the heartbeat profile); these are only ever incremented on the event
    loop, so a dict entry does."""

    def __init__(self) -> None:
        self.received: dict[str, int] = {}
        self.sent: dict[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        for name, text, counts in (
            ("ccm_frames_in", "Frames received, by type.", self.received),
            ("ccm_frames_out", "Frames sent, by type.", self.sent),
        ):
            family = CounterMetricFamily(name, text, labels=["type"])
            for kind, n in sorted(counts.items()):  # copied in one C step, under the GIL
                family.add_metric([kind], n)
            yield family


class _LiveCollector(Collector):
    """Gauges read from the registry and the store writer when Prometheus scrapes."""

    def __init__(
        self,
        registry: Callable[[], ClientConnectionManager | None],
        writer: Callable[[], StoreWriter | None],
    ) -> None:
        self._registry = registry
        self._writer = writer

    def collect(self) -> Iterator[Metric]:
        registry = self._registry()
        clients = GaugeMetricFamily(
            "ccm_connected_clients",
            "Clients connected now, by type and platform.",
            labels=["type", "platform"],
        )
        sessions = GaugeMetricFamily("ccm_live_sessions", "Sessions running now.")
        per_device = GaugeMetricFamily(
            "ccm_device_sessions",
            "Sessions of a device now, by state (running or queued); devices without any are "
            "left out.",
            labels=["device_id", "state"],
        )
        queued = GaugeMetricFamily("ccm_queued_sessions", "Sessions waiting for a busy device.")
        full = GaugeMetricFamily("ccm_devices_at_capacity", "Devices running at their capacity.")
        if registry is not None:
            waiting = at_capacity = 0
            for device_id, load in registry.device_loads().items():
                if load.running:
                    per_device.add_metric([device_id, "running"], load.running)
                if load.queued:
                    per_device.add_metric([device_id, "queued"], load.queued)
                waiting += load.queued
                at_capacity += load.capacity is not None and load.running >= load.capacity
            queued.add_metric([], waiting)
            full.add_metric([], at_capacity)
            counts: dict[tuple[str, str], int] = {}
            for client_id in registry.list_clients():
                info = registry.get_client_info(client_id)
                if info is not None:
                    key = (info.client_type.value, (info.platform or "").lower())
                    counts[key] = counts.get(key, 0) + 1
            for (kind, platform), n in sorted(counts.items()):
                clients.add_metric([kind, platform], n)
            sessions.add_metric([], registry.session_count())
        yield clients
        yield sessions
        if registry is not None:
            yield per_device
            yield queued
            yield full
        writer = self._writer()
        if writer is not None:
            stats = writer.stats()
            depth = GaugeMetricFamily("ccm_store_queue_depth", "Writes waiting for the database.")
            depth.add_metric([], stats.queue_depth)
            yield depth
            degraded = GaugeMetricFamily(
                "ccm_store_degraded", "1 while the database is not taking writes."
            )
            degraded.add_metric([], 1 if stats.degraded else 0)
            yield degraded
            lost = CounterMetricFamily(
                "ccm_store_writes_lost",
                "Writes the database refused for good (logged at ERROR), by write kind.",
                labels=["kind"],
            )
            for kind, n in sorted(stats.failed_by_kind.items()):
                lost.add_metric([kind], n)
            yield lost


class Metrics:
    """Every metric ccm exports, registered on its own CollectorRegistry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.registrations = Counter(
            "ccm_registrations", "Accepted registrations.", ["type"], registry=r
        )
        self.registrations_refused = Counter(
            "ccm_registrations_refused", "Refused registrations.", ["reason"], registry=r
        )
        self.disconnects = Counter(
            "ccm_disconnects",
            "Registered connections that ended, by reason.",
            ["reason"],
            registry=r,
        )
        self.sessions_started = Counter(
            "ccm_sessions_started", "Sessions started.", ["mode", "origin"], registry=r
        )
        self.sessions_ended = Counter(
            "ccm_sessions_ended", "Sessions ended, by final state.", ["state"], registry=r
        )
        self.session_duration = Histogram(
            "ccm_session_duration_seconds",
            "Time from session start to its end.",
            ["mode"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.relay_latency = Histogram(
            "ccm_relay_latency_seconds",
            "Relay sessions: from the requester's TASK to the TASK_END sent back.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._frames = _FrameCounts()
        r.register(self._frames)
        self.flapping_bans = Counter(
            "ccm_flapping_bans",
            "Client ids and addresses refused for a while for connecting too often.",
            ["kind"],
            registry=r,
        )
        self.late_frames = Counter(
            "ccm_late_frames",
            "Answers of a session's own device that came after it ended (dropped quietly).",
            ["type"],
            registry=r,
        )
        self.protocol_errors = Counter(
            "ccm_protocol_errors", "Bad input from clients, by kind.", ["kind"], registry=r
        )
        self.store_batch_size = Histogram(
            "ccm_store_batch_size",
            "Writes per committed transaction.",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000),
            registry=r,
        )
        self.store_commit_seconds = Histogram(
            "ccm_store_commit_seconds",
            "Time to apply and commit one batch.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.cleanup_runs = Counter("ccm_cleanup_runs", "Cleanup job runs.", registry=r)
        self.cleanup_rows = Counter(
            "ccm_cleanup_rows_deleted", "Rows deleted by cleanup.", ["table"], registry=r
        )
        self._children: dict[tuple[int, tuple[str, ...]], Counter] = {}
        self._live_registry: ClientConnectionManager | None = None
        self._live_writer: StoreWriter | None = None
        r.register(_LiveCollector(lambda: self._live_registry, lambda: self._live_writer))

    def count(self, counter: Counter, *labels: str) -> None:
        """`counter.labels(*labels).inc()`, with the labelled child cached: looking it up costs
        three times the increment, and the hot paths count every frame. Labels are bounded sets
        (frame types, states), so the cache is too."""
        key = (id(counter), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = counter.labels(*labels)
        child.inc()

    def frame_in(self, kind: str) -> None:
        """Count a received frame (event loop only)."""
        counts = self._frames.received
        counts[kind] = counts.get(kind, 0) + 1

    def frame_out(self, kind: str) -> None:
        """Count a sent frame (event loop only)."""
        counts = self._frames.sent
        counts[kind] = counts.get(kind, 0) + 1

    def watch(self, registry: ClientConnectionManager, writer: StoreWriter | None) -> None:
        """Point the scrape-time gauges at the running registry and writer."""
        self._live_registry = registry
        self._live_writer = writer

    def observe_commit(self, batch_size: int, seconds: float) -> None:
        self.store_batch_size.observe(batch_size)
        self.store_commit_seconds.observe(seconds)
