"""The load generator: a separate process that plays devices and constellations over loopback.

    python -m tests.benchmarks.loadgen relay  --url WS [--in-flight 64] [--duration S] ...
    python -m tests.benchmarks.loadgen peer   --url WS [--duration S] ...
    python -m tests.benchmarks.loadgen idle   --url WS --count N ...
    python -m tests.benchmarks.loadgen cycles --url WS [--duration S] ...
    python -m tests.benchmarks.loadgen failover --url WS --fallback-url WS2 --count N ...

relay takes `--constellation-url` to put the constellations on another server than the devices
(two nodes of a cluster); failover registers N devices on --url and, once that server dies,
registers each of them again on --fallback-url (see `failover`).

Each mode prints its figures as one JSON line on stdout. The same code drives ccm and the seed
baseline server, so their figures compare. Frames are built from templates and received frames
are only parsed when their id is needed, to keep this process's CPU cost per task low.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from array import array
from typing import Any

import websockets

from tests.benchmarks.common import cpu_seconds, percentile, raise_nofile_limit

CONNECT: dict[str, Any] = {
    "compression": None,
    "ping_interval": None,
    "max_size": None,
    "open_timeout": 60,
    "close_timeout": 10,
}


def register_frame(client_id: str, *, relay: bool = False, index: int = 0) -> str:
    """REGISTER as a stock UFO device (3.1), with the relay flag when asked."""
    features = ["gui", "cli", "browser", "file_system", "office", "windows_apps"]
    metadata: dict[str, Any] = {
        "system_info": {
            "device_id": client_id,
            "platform": "windows",
            "os_version": "10.0.22631",
            "cpu_count": 16,
            "memory_total_gb": 31.73,
            "hostname": f"LAB-PC-{index:05d}",
            "ip_address": f"10.20.{index // 250 % 250}.{index % 250 + 1}",
            "supported_features": features,
            "platform_type": "computer",
            "schema_version": "1.0",
            "custom_metadata": {},
        },
        "registration_time": "2026-05-01T09:30:12.345601+00:00",
        "platform": "windows",
    }
    if relay:
        metadata["ccm_execution"] = "relay"
    return json.dumps(
        {
            "type": "register",
            "status": "ok",
            "client_type": "device",
            "client_id": client_id,
            "timestamp": "2026-05-01T09:30:12.345678+00:00",
            "metadata": metadata,
        }
    )


def register_constellation_frame(client_id: str, target: str) -> str:
    return json.dumps(
        {
            "type": "register",
            "status": "ok",
            "client_type": "constellation",
            "client_id": client_id,
            "target_id": target,
            "metadata": {"type": "constellation_client", "targeted_device_id": target},
        }
    )


async def connect(url: str, **extra: Any) -> Any:
    return await websockets.connect(url, **CONNECT, **extra)


async def registered(url: str, frame: str, retry_for: float = 0.0, **extra: Any) -> Any:
    """A connection whose REGISTER was accepted. `retry_for`: seconds to keep trying after a
    refusal (a constellation on another node than its device: the target may not be listed
    there yet). `extra` goes to the connect (`local_addr`, say)."""
    deadline = time.monotonic() + retry_for
    while True:
        ws = await connect(url, **extra)
        await ws.send(frame)
        reply = json.loads(await ws.recv())
        if reply.get("status") == "ok":
            return ws
        await ws.close()
        if time.monotonic() >= deadline:
            raise RuntimeError(f"registration refused: {reply.get('error')}")
        await asyncio.sleep(0.2)


def emit(data: dict[str, Any]) -> None:
    data["cpu_s"] = cpu_seconds(os.getpid())
    print(json.dumps(data), flush=True)


# -- relay: constellations -> ccm -> devices -> ccm -> constellations -------------------------


class Relay:
    """C constellations, each scoped to one relay device, keep `in_flight` sessions running."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.prefix = args.prefix
        self.stop = False
        self.measuring = False
        self.done = 0
        self.total = 0
        self.errors = 0
        self.acks = 0
        self.latencies = array("d")
        self.finish_times = array("d")
        self.sent = 0

    async def device(self, ws: Any, client_id: str) -> None:
        head = '{"type":"task_end","status":"completed","client_type":"device","client_id":'
        head += json.dumps(client_id) + ',"metadata":{"result":"done"},"session_id":'
        async for raw in ws:
            if raw.startswith('{"type":"task",'):
                session_id = json.loads(raw)["session_id"]
                await ws.send(head + json.dumps(session_id) + "}")
            elif raw.startswith('{"type":"error"'):
                self.errors += 1

    async def constellation(self, ws: Any, client_id: str, target: str, slots: int) -> None:
        head = (
            '{"type":"task","status":"continue","client_type":"constellation","client_id":'
            + json.dumps(client_id)
            + ',"target_id":'
            + json.dumps(target)
            + ',"task_name":"galaxy/bench/t","request":"noop","session_id":"'
        )
        started: dict[str, float] = {}
        counter = 0
        rate = self.args.rate / self.args.constellations if self.args.rate else 0.0
        interval = 1.0 / rate if rate else 0.0
        next_send = time.perf_counter()
        window = asyncio.Semaphore(slots)
        lat, fin = self.latencies, self.finish_times
        perf = time.perf_counter

        async def send_one() -> None:
            nonlocal counter
            counter += 1
            session_id = f"{client_id}#{counter}"
            started[session_id] = perf()
            self.sent += 1
            await ws.send(head + session_id + '"}')

        async def reader() -> None:
            async for raw in ws:
                if raw.startswith('{"type":"heartbeat"'):
                    self.acks += 1
                    continue
                msg = json.loads(raw)
                kind = msg.get("type")
                if kind == "task_end":
                    t0 = started.pop(msg["session_id"], None)
                    if t0 is None:
                        continue
                    now = perf()
                    self.total += 1
                    if msg.get("status") != "completed":
                        self.errors += 1
                    elif self.measuring:
                        self.done += 1
                        lat.append(now - t0)
                        fin.append(time.monotonic())
                    window.release()
                    if not rate and not self.stop:
                        await window.acquire()
                        await send_one()
                elif kind == "error":
                    self.errors += 1

        read_task = asyncio.create_task(reader())
        if rate:
            while not self.stop:
                await window.acquire()
                if self.stop:
                    break
                next_send += interval
                delay = next_send - perf()
                if delay > 0:
                    await asyncio.sleep(delay)
                await send_one()
        else:
            for _ in range(slots):
                await window.acquire()
                await send_one()
        while not self.stop:
            await asyncio.sleep(0.05)
        deadline = perf() + 10
        while started and perf() < deadline:
            await asyncio.sleep(0.02)
        read_task.cancel()

    async def run(self) -> dict[str, Any]:
        a = self.args
        devices = [f"{self.prefix}-dev-{i}" for i in range(a.devices)]
        dev_ws = [
            await registered(a.url, register_frame(d, relay=True, index=i))
            for i, d in enumerate(devices)
        ]
        const_ws = []
        const_url = a.constellation_url or a.url
        retry = 0.0 if const_url == a.url else 10.0
        for i in range(a.constellations):
            cid = f"{self.prefix}-con-{i}@{devices[i % a.devices]}"
            const_ws.append(
                (
                    cid,
                    devices[i % a.devices],
                    await registered(
                        const_url,
                        register_constellation_frame(cid, devices[i % a.devices]),
                        retry_for=retry,
                    ),
                )
            )
        device_tasks = [
            asyncio.create_task(self.device(ws, d)) for ws, d in zip(dev_ws, devices, strict=False)
        ]
        slots = max(1, a.in_flight // a.constellations)
        const_tasks = [
            asyncio.create_task(self.constellation(ws, cid, target, slots))
            for cid, target, ws in const_ws
        ]
        await asyncio.sleep(a.warmup)
        cpu0 = cpu_seconds(os.getpid())
        self.measuring = True
        t0 = time.perf_counter()
        mono0 = time.monotonic()
        if a.until_stdin:
            # Measure until the orchestrator writes a line (it runs something alongside).
            print(json.dumps({"measuring": True, "t": mono0}), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        else:
            await asyncio.sleep(a.duration)
        self.measuring = False
        elapsed = time.perf_counter() - t0
        cpu = cpu_seconds(os.getpid()) - cpu0
        self.stop = True
        await asyncio.gather(*const_tasks, return_exceptions=True)
        for t in device_tasks:
            t.cancel()
        for _, _, ws in const_ws:
            await ws.close()
        for ws in dev_ws:
            await ws.close()
        lat_ms = [x * 1000 for x in self.latencies]
        result: dict[str, Any] = {
            "tasks": self.done,
            "total_tasks": self.total,
            "seconds": elapsed,
            "tasks_per_s": self.done / elapsed,
            "p50_ms": percentile(lat_ms, 50),
            "p99_ms": percentile(lat_ms, 99),
            "max_ms": max(lat_ms) if lat_ms else float("nan"),
            "errors": self.errors,
            "loadgen_cpu_per_task_us": cpu / max(self.done, 1) * 1e6,
            "t0": mono0,
        }
        if a.samples:
            with open(a.samples, "wb") as f:
                array("d", [float(len(self.latencies))]).tofile(f)
                self.finish_times.tofile(f)
                self.latencies.tofile(f)
        return result


# -- peer: registrations, heartbeats, device info ---------------------------------------------


async def _for(duration: float, worker: Any, n: int) -> tuple[int, float]:
    stop = asyncio.Event()
    counts = [0] * n

    async def run(i: int) -> None:
        while not stop.is_set():
            await worker(i)
            counts[i] += 1

    tasks = [asyncio.create_task(run(i)) for i in range(n)]
    await asyncio.sleep(duration / 5)  # warm-up
    base = sum(counts)
    t0 = time.perf_counter()
    await asyncio.sleep(duration)
    done = sum(counts) - base
    elapsed = time.perf_counter() - t0
    stop.set()
    for outcome in await asyncio.gather(*tasks, return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome
    return done, elapsed


async def cycles_phase(url: str, prefix: str, workers: int, duration: float) -> dict[str, Any]:
    """Connect, REGISTER, await the confirmation, close: one cycle."""
    seq = [0]

    async def cycle(i: int) -> None:
        seq[0] += 1
        cid = f"{prefix}-cyc-{i}-{seq[0]}"
        ws = await registered(url, register_frame(cid, index=seq[0]))
        await ws.close()

    done, elapsed = await _for(duration, cycle, workers)
    return {"cycles": done, "cycles_per_s": done / elapsed}


async def peer(args: argparse.Namespace) -> dict[str, Any]:
    url, prefix, n, duration = args.url, args.prefix, args.connections, args.duration
    result: dict[str, Any] = {}
    cpu0 = cpu_seconds(os.getpid())
    result.update(await cycles_phase(url, prefix, args.workers, duration))
    devices = [f"{prefix}-hb-{i}" for i in range(n)]
    dev_ws = [await registered(url, register_frame(d, index=i)) for i, d in enumerate(devices)]

    async def heartbeat(i: int) -> None:
        await dev_ws[i].send(
            '{"type":"heartbeat","status":"ok","client_type":"device","client_id":"'
            + devices[i]
            + '","timestamp":"2026-05-01T09:32:12.400031+00:00"}'
        )
        await dev_ws[i].recv()

    done, elapsed = await _for(duration, heartbeat, n)
    result.update(heartbeats=done, heartbeats_per_s=done / elapsed)
    consts = [f"{prefix}-ci-{i}@{devices[i]}" for i in range(n)]
    con_ws = [
        await registered(url, register_constellation_frame(c, devices[i]))
        for i, c in enumerate(consts)
    ]
    seq = [0]

    async def device_info(i: int) -> None:
        seq[0] += 1
        await con_ws[i].send(
            '{"type":"device_info_request","status":"ok","client_type":"constellation",'
            '"client_id":"' + consts[i] + '","target_id":"' + devices[i] + '",'
            '"request_id":"device_info_' + devices[i] + "_" + str(seq[0]) + '"}'
        )
        reply = await con_ws[i].recv()
        if not reply.startswith('{"type":"device_info_response","status":"ok"'):
            raise RuntimeError(f"unexpected reply {reply[:200]}")

    done, elapsed = await _for(duration, device_info, n)
    result.update(device_infos=done, device_infos_per_s=done / elapsed)
    for ws in con_ws + dev_ws:
        await ws.close()
    result["loadgen_cpu_s"] = cpu_seconds(os.getpid()) - cpu0
    return result


# -- idle connections -------------------------------------------------------------------------


async def idle(args: argparse.Namespace) -> dict[str, Any]:
    """Open and register `count` devices (`concurrency` at a time), hold them, then close."""
    conns: list[Any] = []
    sem = asyncio.Semaphore(args.concurrency)
    failures = 0

    async def one(i: int) -> None:
        nonlocal failures
        async with sem:
            try:
                conns.append(
                    await registered(args.url, register_frame(f"{args.prefix}-idle-{i}", index=i))
                )
            except Exception as exc:
                failures += 1
                if failures <= 3:
                    print(f"registration failed: {exc!r}", file=sys.stderr)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(args.count)))
    elapsed = time.perf_counter() - t0
    emit(
        {
            "held": len(conns),
            "failures": failures,
            "seconds": elapsed,
            "registrations_per_s": len(conns) / elapsed,
        }
    )
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    alive = sum(1 for ws in conns if ws.state.name == "OPEN")
    t0 = time.perf_counter()
    await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)
    return {"alive_at_end": alive, "close_seconds": time.perf_counter() - t0}


async def burst(args: argparse.Namespace) -> dict[str, Any]:
    """`count` devices connect at once, as after a restart or a node's death, from `addresses`
    loopback addresses (127.1.x.y: a fleet is many hosts, and the server's per-address limits
    must see them so). Each retries what is refused with exponential backoff and full jitter
    (up to 0.25 s, doubling to 4 s), as a well-behaved reconnecting client does. Reports when
    the last one was registered; then holds them until stdin says so, and closes them."""
    conns: list[Any] = []
    refused = 0
    rng = random.Random(7)
    deadline = time.perf_counter() + 180

    async def one(i: int) -> None:
        nonlocal refused
        frame = register_frame(f"{args.prefix}-burst-{i}", index=i)
        a = i % args.addresses
        local = {"local_addr": (f"127.1.{a // 250}.{a % 250 + 1}", 0)} if args.addresses > 1 else {}
        attempt = 0
        while time.perf_counter() < deadline:
            try:
                conns.append(await registered(args.url, frame, **local))
                return
            except Exception as exc:
                refused += 1
                if refused <= 3:
                    print(f"registration refused, retrying: {exc!r}", file=sys.stderr)
                await asyncio.sleep(rng.uniform(0, min(4.0, 0.25 * 2**attempt)))
                attempt += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(args.count)))
    elapsed = time.perf_counter() - t0
    emit(
        {
            "held": len(conns),
            "retries": refused,
            "seconds": elapsed,
            "started_at": time.time() - elapsed,
            "registrations_per_s": len(conns) / elapsed,
        }
    )
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)
    return {"closed": len(conns)}


async def failover(args: argparse.Namespace) -> dict[str, Any]:
    """Register `count` devices on --url (`concurrency` at a time) and print a line. Each device
    then waits for its connection to end; when it does (the orchestrator killed that server)
    it reconnects to --fallback-url and registers the same id, retrying once a second (plus a
    little jitter) while the id is refused, as a device does that lost its server. The
    orchestrator writes the kill's time.monotonic() on stdin; the result is, from that
    moment, when the first and the last device were registered again."""
    sem = asyncio.Semaphore(args.concurrency)
    ids = [f"{args.prefix}-{i}" for i in range(args.count)]
    frames = [register_frame(cid, index=i) for i, cid in enumerate(ids)]
    again: list[float] = []
    attempts = 0
    refusals: dict[str, int] = {}
    held: list[Any] = []

    async def first(i: int) -> Any:
        async with sem:
            return await registered(args.url, frames[i])

    t0 = time.perf_counter()
    conns = await asyncio.gather(*(first(i) for i in range(args.count)))
    elapsed = time.perf_counter() - t0
    emit({"held": len(conns), "seconds": elapsed, "registrations_per_s": len(conns) / elapsed})

    async def device(i: int, ws: Any) -> None:
        nonlocal attempts
        try:
            async for _ in ws:
                pass
        except Exception:  # the connection ended without a close frame: the server died
            pass
        while True:
            async with sem:
                attempts += 1
                try:
                    new = await connect(args.fallback_url)
                    await new.send(frames[i])
                    reply = json.loads(await new.recv())
                except Exception as exc:
                    reply = {"error": type(exc).__name__}
                    new = None
            if reply.get("status") == "ok":
                again.append(time.monotonic())
                held.append(new)
                return
            reason = str(reply.get("error")).replace(repr(ids[i]), "<id>")[:80]
            refusals[reason] = refusals.get(reason, 0) + 1
            if new is not None:
                await new.close()
            await asyncio.sleep(1.0 + random.random() * 0.5)

    tasks = [asyncio.create_task(device(i, ws)) for i, ws in enumerate(conns)]
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    killed_at = float(line)
    _done, pending = await asyncio.wait(tasks, timeout=args.timeout)
    for task in pending:
        task.cancel()
    await asyncio.gather(*(ws.close() for ws in held), return_exceptions=True)
    ordered = sorted(t - killed_at for t in again)
    return {
        "count": args.count,
        "registered_again": len(ordered),
        "first_s": ordered[0] if ordered else float("nan"),
        "p50_s": percentile(ordered, 50) if ordered else float("nan"),
        "all_s": ordered[-1] if len(ordered) == args.count else float("nan"),
        "attempts": attempts,
        "refusals": refusals,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["relay", "peer", "idle", "cycles", "burst", "failover"])
    parser.add_argument("--url", required=True)
    parser.add_argument("--constellation-url", default=None, help="relay: default --url")
    parser.add_argument("--fallback-url", default=None, help="failover: the survivor")
    parser.add_argument("--timeout", type=float, default=120.0, help="failover: give up after")
    parser.add_argument("--prefix", default=f"lg{os.getpid()}")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--constellations", type=int, default=8)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--rate", type=float, default=0.0, help="tasks/s (0: closed loop)")
    parser.add_argument("--samples", default=None, help="relay: write (time, latency) pairs")
    parser.add_argument("--until-stdin", action="store_true")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--workers", type=int, default=32)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--addresses", type=int, default=1, help="burst: source addresses")
    args = parser.parse_args()
    raise_nofile_limit()
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    if args.mode == "relay":
        result = runner(Relay(args).run())
    elif args.mode == "peer":
        result = runner(peer(args))
    elif args.mode == "cycles":
        result = runner(cycles_phase(args.url, args.prefix, args.workers, args.duration))
    elif args.mode == "burst":
        result = runner(burst(args))
    elif args.mode == "failover":
        result = runner(failover(args))
    else:
        result = runner(idle(args))
    emit(result)


if __name__ == "__main__":
    main()
