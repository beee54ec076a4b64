"""What the HTTP API and the dashboard show of the live clients: this node's (the registry) and,
in a cluster, the other nodes' (the directory), both from memory.

Every client carries the node that holds it (`node`: its run id, `node_name`)."""

from __future__ import annotations

import math
from typing import Any

from ccm.cluster.directory import RemoteClient
from ccm.device_index import DeviceIndex
from ccm.domain import ClientType
from ccm.server.hub import Hub


def _this_node(hub: Hub) -> tuple[str | None, str | None]:
    cluster = hub.cluster
    if cluster is None:
        return None, hub.settings.cluster.node_name
    me = cluster.directory.nodes.get(cluster.me)
    return cluster.me, me.name if me is not None else hub.settings.cluster.node_name


def _remote(hub: Hub) -> list[RemoteClient]:
    return hub.cluster.directory.clients() if hub.cluster is not None else []


def _node_name(hub: Hub, run_id: str) -> str | None:
    assert hub.cluster is not None
    node = hub.cluster.directory.nodes.get(run_id)
    return node.name if node is not None else None


def clients(hub: Hub) -> list[dict[str, Any]]:
    """Every live client of the cluster: this node's first, in registration order."""
    registry = hub.registry
    node, name = _this_node(hub)
    listed: list[dict[str, Any]] = []
    for client_id in registry.list_clients():
        info = registry.get_client_info(client_id)
        if info is not None:
            listed.append(
                {
                    "client_id": client_id,
                    "client_type": info.client_type.value,
                    "platform": info.platform,
                    "connected_at": info.connected_at.isoformat(),
                    "last_heartbeat_at": info.last_heartbeat_at.isoformat()
                    if info.last_heartbeat_at
                    else None,
                    "node": node,
                    "node_name": name,
                }
            )
    local = {c["client_id"] for c in listed}
    for remote in _remote(hub):
        if remote.client_id not in local:
            listed.append(
                {
                    "client_id": remote.client_id,
                    "client_type": remote.client_type.value,
                    "platform": remote.platform,
                    "connected_at": remote.connected_at.isoformat(),
                    "last_heartbeat_at": None,
                    "node": remote.run_id,
                    "node_name": _node_name(hub, remote.run_id),
                }
            )
    return listed


def devices(hub: Hub) -> dict[str, Any]:
    """Ids, counts by platform and, for this node's devices, their load (`capacity` null:
    unlimited): other nodes' devices are listed, their load lives on their nodes."""
    stats = hub.registry.get_stats()
    ids: list[str] = list(stats["devices"]["ids"])
    platforms: dict[str, int] = dict(stats["devices"]["platforms"])
    local = set(ids)
    for remote in _remote(hub):
        if remote.client_type is ClientType.DEVICE and remote.client_id not in local:
            ids.append(remote.client_id)
            key = (remote.platform or "").lower()
            platforms[key] = platforms.get(key, 0) + 1
    load = {
        device_id: {"running": counts.running, "queued": counts.queued, "capacity": counts.capacity}
        for device_id, counts in hub.registry.device_loads().items()
    }
    return {"devices": ids, "count": len(ids), "by_platform": platforms, "load": load}


def device(hub: Hub, device_id: str) -> dict[str, Any] | None:
    """One live device of the cluster, or None."""
    registry = hub.registry
    if registry.is_device_connected(device_id):
        info = registry.get_client_info(device_id)
        node, name = _this_node(hub)
        return {
            "device_id": device_id,
            "platform": info.platform if info else None,
            "connected_at": info.connected_at.isoformat() if info else None,
            "sessions": registry.get_device_sessions(device_id),
            "load": _load(hub, device_id),
            "system_info": registry.get_device_system_info(device_id),
            "node": node,
            "node_name": name,
        }
    remote = hub.cluster.directory.locate(device_id) if hub.cluster is not None else None
    if remote is None or remote.client_type is not ClientType.DEVICE:
        return None
    return {
        "device_id": device_id,
        "platform": remote.platform,
        "connected_at": remote.connected_at.isoformat(),
        "sessions": None,
        "load": None,
        "system_info": remote.system_info,
        "node": remote.run_id,
        "node_name": _node_name(hub, remote.run_id),
    }


def _load(hub: Hub, device_id: str) -> dict[str, Any] | None:
    counts = hub.registry.device_load(device_id)
    if counts is None:
        return None
    return {"running": counts.running, "queued": counts.queued, "capacity": counts.capacity}


def select_device(
    hub: Hub, platform: str | None, capabilities: list[str], tags: list[str]
) -> str | None:
    """select_optimal_device over the whole cluster: the best of this node's devices and of the
    others' (by the same rule: platform and every capability, most preferred tags, earliest)."""
    local = hub.registry.select_optimal_device(platform, capabilities, tags)
    remote = [r for r in _remote(hub) if r.client_type is ClientType.DEVICE]
    if not remote:
        return local
    index = DeviceIndex()
    order: dict[str, int] = {}
    candidates = remote
    if local is not None:
        info = hub.registry.get_client_info(local)
        if info is not None:
            candidates = [
                RemoteClient(
                    local,
                    ClientType.DEVICE,
                    info.platform,
                    info.system_info,
                    info.connected_at,
                    info.connection_id,
                    "",
                ),
                *remote,
            ]
    for position, client in enumerate(sorted(candidates, key=lambda c: c.connected_at)):
        index.add(client.client_id, ClientType.DEVICE, client.platform, client.system_info)
        order[client.client_id] = position
    return index.select(platform, capabilities, tags, epoch_of=lambda device_id: order[device_id])


def explain_selection(
    hub: Hub, platform: str | None, capabilities: list[str], tags: list[str], limit: int
) -> dict[str, Any]:
    """The choice of `select_device` with this node's reasons (other nodes' devices are
    counted in the choice, not explained: their load lives on their nodes)."""
    explained = hub.registry.explain_selection(platform, capabilities, tags, limit=limit)
    return {
        "device_id": select_device(hub, platform, capabilities, tags),
        "explain": {
            "qualifying": explained.qualifying,
            "scores": [
                {
                    "device_id": score.device_id,
                    "free_capacity": None if math.isinf(score.free) else int(score.free),
                    "preferred_tags": score.tags,
                }
                for score in explained.scores
            ],
            "rejected": {
                reason.value: {
                    "count": count,
                    "devices": [
                        {"device_id": r.device_id}
                        | ({"capability": r.capability} if r.capability else {})
                        for r in explained.examples[reason]
                    ],
                }
                for reason, count in explained.rejected.items()
            },
        },
    }


def device_system_info(hub: Hub, device_id: str) -> dict[str, Any] | None:
    found = device(hub, device_id)
    return found["system_info"] if found is not None else None


def counts(hub: Hub) -> dict[str, Any]:
    """The registry's counts (UFO's shape) for the whole cluster."""
    result = hub.registry.get_stats()
    remote = _remote(hub)
    if not remote:
        return result
    local = set(hub.registry.list_clients())
    extra_devices = [
        r.client_id
        for r in remote
        if r.client_type is ClientType.DEVICE and r.client_id not in local
    ]
    extra_constellations = [
        r.client_id
        for r in remote
        if r.client_type is ClientType.CONSTELLATION and r.client_id not in local
    ]
    listing = devices(hub)
    result["devices"] = {
        "ids": listing["devices"],
        "count": listing["count"],
        "platforms": listing["by_platform"],
    }
    result["constellations"]["ids"] = [*result["constellations"]["ids"], *extra_constellations]
    result["constellations"]["count"] = len(result["constellations"]["ids"])
    result["device_clients"] += len(extra_devices)
    result["constellation_clients"] += len(extra_constellations)
    result["total"] = result["device_clients"] + result["constellation_clients"]
    return result


def this_node_name(hub: Hub) -> str:
    """This node's name: cluster.node_name, or host:port."""
    name = _this_node(hub)[1]
    return name or f"{hub.settings.server.host}:{hub.settings.server.port}"


def nodes_in_memory(hub: Hub) -> list[dict[str, Any]]:
    """The alive nodes as this node knows them (the dashboard's view; /api/nodes reads SQL),
    this one first, each with the clients it holds."""
    here = {
        "name": this_node_name(hub),
        "address": hub.settings.cluster.advertise_address
        or f"{hub.settings.server.host}:{hub.settings.server.port}",
        "clients": len(hub.registry.list_clients()),
        "this_node": True,
    }
    cluster = hub.cluster
    if cluster is None:
        return [here]
    held: dict[str, int] = {}
    for remote in cluster.directory.clients():
        held[remote.run_id] = held.get(remote.run_id, 0) + 1
    others = [
        {
            "name": node.name or run_id,
            "address": node.address,
            "clients": held.get(run_id, 0),
            "this_node": False,
        }
        for run_id, node in sorted(cluster.directory.nodes.items(), key=lambda n: n[1].name or "")
        if run_id != cluster.me
    ]
    return [here, *others]


def single_node(hub: Hub, store: Any) -> dict[str, Any]:
    """/api/nodes without a cluster: this server, from memory."""
    registry = hub.registry
    return {
        "run_id": store.run_id if store is not None else None,
        "name": hub.settings.cluster.node_name,
        "address": f"{hub.settings.server.host}:{hub.settings.server.port}",
        "state": "alive",
        "clients": len(registry.list_clients()),
        "running_sessions": len(hub.sessions),
    }
