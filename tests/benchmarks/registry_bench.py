"""(1) Registry operations at 10,000 live devices, next to the seed's dict-under-a-lock design.

The baseline is the seed's ClientConnectionManager as written in
shared/seed/client_connection_manager.md: one dict of ClientInfo under a threading.Lock, with
type, capability and selection queries that scan every client. Both hold the same 10,000 devices
(plus 100 constellations) with UFO-shaped system info; ns/op is the median of repeats.
"""

from __future__ import annotations

import random
import threading
import timeit
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ccm.device_load import CapacityPolicy
from ccm.domain import ClientType
from ccm.registry import ClientConnectionManager
from tests.benchmarks.common import Figure

PLATFORMS = ["windows", "linux", "darwin"]
FEATURES = [
    "gui",
    "cli",
    "browser",
    "file_system",
    "office",
    "windows_apps",
    "linux_apps",
    "macos_apps",
    "gpu_compute",
    "excel_automation",
    "pdf_generation",
    "docker_support",
]
TAGS = ["production", "office", "lab", "gpu", "testing", "development", "eu", "us"]


# -- the seed's design, verbatim in spirit --------------------------------------------------------


@dataclass
class SeedClientInfo:
    websocket: Any
    client_type: ClientType
    connected_at: datetime
    metadata: dict[str, Any] = field(default_factory=dict)
    platform: str = "windows"
    system_info: dict[str, Any] | None = None


class SeedRegistry:
    """The seed's registry: a dict and a lock; queries scan all clients."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.online_clients: dict[str, SeedClientInfo] = {}

    def add_client(
        self,
        client_id: str,
        platform: str,
        ws: Any,
        client_type: ClientType,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        with self.lock:
            system_info = None
            if metadata and "system_info" in metadata and client_type == ClientType.DEVICE:
                system_info = metadata.get("system_info")
            self.online_clients[client_id] = SeedClientInfo(
                websocket=ws,
                platform=platform,
                client_type=client_type,
                connected_at=datetime.now(),
                metadata=metadata or {},
                system_info=system_info,
            )

    def get_client(self, client_id: str) -> Any:
        with self.lock:
            client_info = self.online_clients.get(client_id)
            return client_info.websocket if client_info else None

    def is_device_connected(self, device_id: str) -> bool:
        with self.lock:
            client_info = self.online_clients.get(device_id)
            if not client_info:
                return False
            return client_info.client_type == ClientType.DEVICE

    def list_clients_by_type(self, client_type: ClientType) -> list[str]:
        with self.lock:
            return [
                cid for cid, info in self.online_clients.items() if info.client_type == client_type
            ]

    def find_devices_with_capability(self, capability: str) -> list[str]:
        with self.lock:
            matches = []
            for device_id, client_info in self.online_clients.items():
                if client_info.client_type != ClientType.DEVICE:
                    continue
                if not client_info.system_info:
                    continue
                features = client_info.system_info.get("supported_features", [])
                if capability in features:
                    matches.append(device_id)
            return matches

    def select_optimal_device(
        self,
        required_platform: str | None = None,
        required_capabilities: list[str] | None = None,
        preferred_tags: list[str] | None = None,
    ) -> str | None:
        with self.lock:
            candidates = []
            for device_id, client_info in self.online_clients.items():
                if client_info.client_type != ClientType.DEVICE:
                    continue
                if required_platform and client_info.platform != required_platform:
                    continue
                if required_capabilities and client_info.system_info:
                    features = client_info.system_info.get("supported_features", [])
                    if not all(cap in features for cap in required_capabilities):
                        continue
                score = 0
                if preferred_tags and client_info.system_info:
                    tags = client_info.system_info.get("tags", [])
                    score = len(set(tags) & set(preferred_tags))
                candidates.append((device_id, score))
            if not candidates:
                return None
            candidates.sort(key=lambda x: x[1], reverse=True)
            return candidates[0][0]


# -- the fleet ----------------------------------------------------------------------------------


def fleet(n: int, seed: int = 5) -> list[tuple[str, str, dict[str, Any]]]:
    """n devices: id, platform, REGISTER metadata with system info (features and tags vary)."""
    rng = random.Random(seed)
    devices = []
    for i in range(n):
        platform = PLATFORMS[i % 3]
        features = ["gui", "cli", "browser", "file_system", *rng.sample(FEATURES[4:], 3)]
        tags = rng.sample(TAGS, 2)
        devices.append(
            (
                f"device-{i:05d}",
                platform,
                {
                    "platform": platform,
                    "system_info": {
                        "device_id": f"device-{i:05d}",
                        "platform": platform,
                        "supported_features": features,
                        "tags": tags,
                        "cpu_count": 8,
                        "memory_total_gb": 31.7,
                        "custom_metadata": {},
                    },
                },
            )
        )
    return devices


# Selection queries: common (platform + a capability), narrow (rare capability pair + tags) and
# none-match (every pool scanned, nothing qualifies): the last is the worst case for both designs.
SELECTIONS: dict[str, tuple[str | None, list[str], list[str]]] = {
    "platform+capability+tags": ("linux", ["browser"], ["gpu", "lab"]),
    "rare capabilities": ("windows", ["docker_support", "pdf_generation"], ["production"]),
    "no device matches": (
        "darwin",
        ["windows_apps", "linux_apps", "macos_apps", "gpu_compute"],
        [],
    ),
}


def _calibrate(timer: timeit.Timer, target_seconds: float) -> int:
    """How many loops take about `target_seconds` (one quick probe, then scaled)."""
    number = 1
    while True:
        took = timer.timeit(number)
        if took >= 0.005 or number >= 1 << 22:
            return max(1, int(number * target_seconds / max(took, 1e-9)))
        number *= 4


def _measure(
    ours: timeit.Timer, seed: timeit.Timer, per_call: int, repeats: int, target: float
) -> tuple[Figure, Figure]:
    """ns per operation, repeats interleaved (ours, seed, ours, ...) so load drift hits both."""
    n_ours, n_seed = _calibrate(ours, target), _calibrate(seed, target)
    fo, fs = Figure(unit="ns/op"), Figure(unit="ns/op")
    for _ in range(repeats):
        fo.add(ours.timeit(n_ours) / (n_ours * per_call) * 1e9)
        fs.add(seed.timeit(n_seed) / (n_seed * per_call) * 1e9)
    return fo, fs


def _busy_registry(devices: int) -> ClientConnectionManager:
    busy = ClientConnectionManager(capacity=CapacityPolicy(default=5))
    rng = random.Random(14)
    for client_id, platform, metadata in fleet(devices):
        busy.add_client(client_id, platform, object(), ClientType.DEVICE, metadata)
        for n in range(rng.randint(0, 5)):
            busy.admit_session(client_id, f"{client_id}/{n}")
    return busy


def run(*, devices: int = 10_000, repeats: int = 7, quick: bool = False) -> dict[str, Any]:
    target = 0.02 if quick else 0.06
    ours = ClientConnectionManager()
    seed = SeedRegistry()
    for client_id, platform, metadata in fleet(devices):
        ours.add_client(client_id, platform, object(), ClientType.DEVICE, metadata)
        seed.add_client(client_id, platform, object(), ClientType.DEVICE, metadata)
    for i in range(100):
        ours.add_client(f"const-{i}", "windows", object(), ClientType.CONSTELLATION, {})
        seed.add_client(f"const-{i}", "windows", object(), ClientType.CONSTELLATION, {})
    # Point lookups walk 1,000 ids spread over the fleet (plus 10 unknown ones) per timed loop,
    # so the loop, not a lambda, is the only overhead: about what `for c in ids: pass` costs.
    ids = [f"device-{i:05d}" for i in range(0, devices, max(1, devices // 1000))][:1000]
    ids += [f"missing-{i}" for i in range(10)]

    def loop(fn: Callable[[str], Any]) -> timeit.Timer:
        return timeit.Timer("for c in ids: f(c)", globals={"ids": ids, "f": fn})

    def call(fn: Callable[..., Any], *args: Any) -> timeit.Timer:
        return timeit.Timer("f(*a)", globals={"f": fn, "a": args})

    cases: dict[str, tuple[timeit.Timer, timeit.Timer, int]] = {
        "get_client": (loop(ours.get_client), loop(seed.get_client), len(ids)),
        "is_device_connected": (
            loop(ours.is_device_connected),
            loop(seed.is_device_connected),
            len(ids),
        ),
        "list_clients_by_type (10,000 devices)": (
            call(ours.list_clients_by_type, ClientType.DEVICE),
            call(seed.list_clients_by_type, ClientType.DEVICE),
            1,
        ),
        "find_devices_with_capability": (
            call(ours.find_devices_with_capability, "docker_support"),
            call(seed.find_devices_with_capability, "docker_support"),
            1,
        ),
    }
    for name, (platform, caps, tags) in SELECTIONS.items():
        cases[f"select_optimal_device ({name})"] = (
            call(ours.select_optimal_device, platform, caps, tags),
            call(seed.select_optimal_device, platform, caps, tags),
            1,
        )
    # The same fleet with capacity 5 each and 0-5 sessions running on every device: least-busy
    # selection walks free-capacity levels (the seed has no notion of load).
    busy = _busy_registry(devices)
    platform, caps, tags = SELECTIONS["platform+capability+tags"]
    cases["select_optimal_device (busy fleet, capacity 5)"] = (
        call(busy.select_optimal_device, platform, caps, tags),
        call(seed.select_optimal_device, platform, caps, tags),
        1,
    )
    results: dict[str, Any] = {"devices": devices, "ops": {}}
    results["loop_overhead_ns"] = (
        timeit.Timer("for c in ids: pass", globals={"ids": ids}).timeit(1000) / (1000 * len(ids))
    ) * 1e9
    for name, (ours_timer, seed_timer, per_call) in cases.items():
        fo, fs = _measure(ours_timer, seed_timer, per_call, repeats, target)
        entry: dict[str, Any] = {"ccm": fo, "seed": fs}
        results["ops"][name] = entry
    results["ops"]["list_clients_by_type (10,000 devices)"]["result_size"] = len(
        ours.list_clients_by_type(ClientType.DEVICE)
    )
    results["ops"]["find_devices_with_capability"]["result_size"] = len(
        ours.find_devices_with_capability("docker_support")
    )
    answers = {}
    for name, (platform, caps, tags) in SELECTIONS.items():
        answers[name] = (
            ours.select_optimal_device(platform, caps, tags),
            seed.select_optimal_device(platform, caps, tags),
        )
    results["selection_answers"] = answers
    return results


if __name__ == "__main__":
    out = run(quick=True)
    for name, r in out["ops"].items():
        print(
            f"{name:55s} ccm {r['ccm'].show()}  seed {r['seed'].show()}  "
            f"ratio {r['ccm'].median / r['seed'].median:.2f}"
        )
