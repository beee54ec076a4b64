"""A real haproxy, configured by the shipped config/haproxy.cfg.example, in front of three real
nodes: devices and constellations that know only haproxy's address work across nodes, and when
a node dies its devices come back through haproxy on a survivor."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from tests.cluster.test_node_death import REAP_WITHIN
from tests.reliability.support import API_KEY, REPO, ServeProcess, wait_until
from tests.server.support import AipClient, run, track
from tests.support import free_port

HAPROXY = Path("/usr/sbin/haproxy")
EXAMPLE = REPO / "config" / "haproxy.cfg.example"
_SERVER_LINE = re.compile(r"^(\s*)server node\d+ 127\.0\.0\.1:\d+(.*)$")


def config_for(nodes: dict[str, ServeProcess], port: int) -> str:
    """The example with its `bind` on `port` and one `server` line per node (the example's own
    check options kept), everything else as shipped."""
    lines: list[str] = []
    servers_written = False
    bind_seen = False
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("bind "):
            lines.append(f"    bind 127.0.0.1:{port}")
            bind_seen = True
            continue
        match = _SERVER_LINE.match(line)
        if match:
            if not servers_written:
                indent, options = match.groups()
                for name, server in nodes.items():
                    lines.append(f"{indent}server {name} 127.0.0.1:{server.port}{options}")
                servers_written = True
            continue
        lines.append(line)
    assert bind_seen, f"{EXAMPLE} has no bind line"
    assert servers_written, f"{EXAMPLE} has no `server nodeN 127.0.0.1:PORT` lines"
    return "\n".join(lines) + "\n"


class Haproxy:
    """`haproxy -f cfg -db` in a subprocess (foreground, logs to a file)."""

    def __init__(self, nodes: dict[str, ServeProcess], workdir: Path) -> None:
        self.port = free_port()
        self.config = workdir / "haproxy.cfg"
        self.config.write_text(config_for(nodes, self.port), encoding="utf-8")
        self.log_path = workdir / "haproxy.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws?token={API_KEY}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Haproxy:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(HAPROXY), "-f", str(self.config), "-db"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self._answers, 30, f"haproxy to answer /healthz:\n{self.log()}", interval=0.1)
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"haproxy exited with {self.process.returncode}:\n{self.log()}")
        try:
            return httpx.get(f"{self.http_url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    def get(self, path: str) -> Any:
        reply = httpx.get(self.http_url + path, headers={"X-API-Key": API_KEY}, timeout=10)
        reply.raise_for_status()
        return reply.json()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def cluster(
    node: Callable[..., ServeProcess], tmp_path: Path
) -> Iterator[tuple[Haproxy, dict[str, ServeProcess]]]:
    """Three nodes and haproxy in front of them, built from the shipped example."""
    if not HAPROXY.exists():
        message = f"haproxy is not installed at {HAPROXY}; install it with: apt-get install haproxy"
        if os.environ.get("CCM_REQUIRE_HAPROXY") == "1":
            pytest.fail(f"{message} (CCM_REQUIRE_HAPROXY=1)")
        pytest.skip(message)
    nodes = {name: node(name) for name in ("a", "b", "c")}
    proxy = Haproxy(nodes, tmp_path).start()
    try:
        yield proxy, nodes
    finally:
        proxy.stop()


def _where(proxy: Haproxy, *client_ids: str) -> dict[str, str]:
    """client id -> name of the node holding it, as /api/clients (through haproxy, so from
    whichever node it picks) says once it lists every one of `client_ids`."""

    def listed() -> dict[str, str] | None:
        nodes = {c["client_id"]: c["node_name"] for c in proxy.get("/api/clients")["clients"]}
        return nodes if all(nodes.get(c) for c in client_ids) else None

    return wait_until(listed, 20, f"/api/clients to list {client_ids} with their nodes")


async def _device(proxy: Haproxy, client_id: str) -> AipClient:
    device = track(await AipClient.connect(proxy.ws_url))
    reply = await device.register_device(client_id, relay=True)
    assert (reply["type"], reply["status"]) == ("heartbeat", "ok"), reply
    return device


async def _constellation_elsewhere(
    proxy: Haproxy, devices: list[str], prefix: str
) -> tuple[AipClient, str, dict[str, str]]:
    """A constellation through haproxy that landed on another node than the device it targets
    (haproxy picks the node; a constellation that shares its device's node is closed and
    another one tried). Returns it, its target and where each client is."""
    for attempt in range(12):
        target = devices[attempt % len(devices)]
        client_id = f"{prefix}-{attempt}@{target}"
        constellation = track(await AipClient.connect(proxy.ws_url))
        reply = await constellation.register_constellation(client_id, target)
        assert (reply["type"], reply["status"]) == ("heartbeat", "ok"), reply
        where = await asyncio.to_thread(_where, proxy, client_id, *devices)
        if where[client_id] != where[target]:
            return constellation, target, where
        await constellation.close()
    raise AssertionError(f"haproxy put every constellation on its device's node: {where}")


async def _task(
    constellation: AipClient, device: AipClient, target: str, session_id: str
) -> dict[str, Any]:
    """A relay TASK from `constellation` that `device` completes; the constellation's task_end."""
    assert constellation.client_id is not None
    await constellation.send(
        type="task",
        client_type="constellation",
        client_id=constellation.client_id,
        target_id=target,
        session_id=session_id,
        request="through haproxy",
        status="continue",
    )
    task = await device.recv_type("task", timeout=20)
    assert task["session_id"] == session_id
    await device.send(
        type="task_end",
        client_id=target,
        session_id=session_id,
        status="completed",
        metadata={"result": {"via": "haproxy"}},
    )
    return await constellation.recv_type("task_end", timeout=20)


def test_clients_behind_haproxy_spread_over_nodes_and_relay_across_them(
    cluster: tuple[Haproxy, dict[str, ServeProcess]],
) -> None:
    """Every node passes the example's health check (none is marked down), devices that
    connect to haproxy land on more than one node (leastconn), and a constellation on another
    node than its device sends it a relay task through haproxy and gets the device's result
    back as `completed`."""
    proxy, _nodes = cluster

    async def scenario() -> tuple[dict[str, str], dict[str, str], dict[str, Any]]:
        ids = [f"h-dev-{i}" for i in range(3)]
        devices = {client_id: await _device(proxy, client_id) for client_id in ids}
        constellation, target, where = await _constellation_elsewhere(proxy, ids, "h-con")
        end = await _task(constellation, devices[target], target, "h-s1")
        return where, {"target": target, "constellation": str(constellation.client_id)}, end

    where, pair, end = run(scenario())
    assert " is DOWN" not in proxy.log(), proxy.log()
    assert len({where[f"h-dev-{i}"] for i in range(3)}) >= 2, where
    assert where[pair["target"]] != where[pair["constellation"]]
    assert (end["status"], end["session_id"], end["result"]) == (
        "completed",
        "h-s1",
        {"via": "haproxy"},
    )


def test_a_device_of_a_killed_node_comes_back_through_haproxy_on_a_survivor(
    cluster: tuple[Haproxy, dict[str, ServeProcess]],
) -> None:
    """kill -9 of the node holding a device in a session: haproxy's health check marks that
    node down, the device's connection through haproxy drops, the constellation (on a
    survivor) is told `task_end` `failed`, the device reconnects to the same haproxy address
    and registers its id again on a survivor within the lease window, and a new task to it
    completes."""
    proxy, nodes = cluster

    async def scenario() -> dict[str, Any]:
        ids = [f"k-dev-{i}" for i in range(3)]
        devices = {client_id: await _device(proxy, client_id) for client_id in ids}
        constellation, target, where = await _constellation_elsewhere(proxy, ids, "k-con")
        assert constellation.client_id is not None
        await constellation.send(
            type="task",
            client_type="constellation",
            client_id=constellation.client_id,
            target_id=target,
            session_id="k-s1",
            request="cut short",
            status="continue",
        )
        assert (await constellation.recv_type("heartbeat", timeout=20))["session_id"] == "k-s1"
        await devices[target].recv_type("task", timeout=20)
        killed = where[target]
        await asyncio.to_thread(nodes[killed].kill)
        dropped = await _dropped(devices[target], timeout=REAP_WITHIN)
        end = await constellation.recv_type("task_end", timeout=REAP_WITHIN)
        back, took = await _register_again(proxy, target, deadline=REAP_WITHIN * 2)
        now = await asyncio.to_thread(_where, proxy, target, str(constellation.client_id))
        second = await _task(constellation, back, target, "k-s2")
        return {
            "killed": killed,
            "dropped": dropped,
            "end": end,
            "took": took,
            "now_on": now[target],
            "second": second,
        }

    out = run(scenario())
    wait_until(
        lambda: f"Server ccm_nodes/{out['killed']} is DOWN" in proxy.log(),
        10,
        "haproxy to mark the killed node down",
    )
    assert out["dropped"], "the device's connection through haproxy stayed open to a dead node"
    assert (out["end"]["status"], out["end"]["session_id"]) == ("failed", "k-s1")
    assert out["now_on"] != out["killed"]
    assert out["took"] < REAP_WITHIN * 2
    assert (out["second"]["status"], out["second"]["session_id"]) == ("completed", "k-s2")


async def _dropped(device: AipClient, timeout: float) -> bool:
    """True once the device's connection ends (read until it does, or `timeout`)."""
    deadline = time.monotonic() + timeout
    with contextlib.suppress(Exception):
        while time.monotonic() < deadline:
            await device.recv(timeout=max(deadline - time.monotonic(), 0.01))
    return device.ws.close_code is not None or device.ws.state.name == "CLOSED"


async def _register_again(
    proxy: Haproxy, client_id: str, deadline: float
) -> tuple[AipClient, float]:
    """What a device does after losing its node: reconnect to haproxy's address and register,
    once a second, until accepted (its id is refused while the cluster still counts it on the
    dead node). The accepted client and how long it took."""
    started = time.monotonic()
    refusals: list[str] = []
    while time.monotonic() - started < deadline:
        try:
            device = await AipClient.connect(proxy.ws_url)
        except (OSError, InvalidHandshake) as exc:  # haproxy found no node up at that moment
            refusals.append(repr(exc))
        else:
            try:
                reply = await device.register_device(client_id, relay=True)
            except ConnectionClosed as exc:
                reply = {"error": repr(exc)}
            if reply.get("status") == "ok":
                return track(device), time.monotonic() - started
            refusals.append(str(reply.get("error")))
            with contextlib.suppress(Exception):
                await device.close()
        await asyncio.sleep(1.0)
    raise AssertionError(f"{client_id} not registered again within {deadline} s: {refusals}")
