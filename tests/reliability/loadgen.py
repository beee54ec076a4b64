"""Load generator for the fault suite: a separate process that plays relay devices and
constellations over loopback, and records what every client was told.

    python -m tests.reliability.loadgen --url WS --out result.json [--devices N]
        [--constellations C] [--in-flight K] [--heartbeat S] [--duration S] [--progress FILE]

Devices register in relay mode and answer each `task` with a `task_end` of their own.
Constellation i registers as `<prefix>-con-<i>@<device i>` (scoped to that device, as Galaxy
does) and keeps K sessions in flight, each with a unique session id. Every client reconnects
after a drop (server killed, connection closed) until the run ends, so a test can kill and
restart the server under it. SIGTERM ends the run cleanly: no new sessions, outstanding ones
get a short grace period, every socket is closed with 1000, then the result is written.

What is recorded, for the tests to check against SQL: every session ACK a client received,
every task_end (status, error), every ERROR frame a client was sent, registrations and refusals,
and latency samples (heartbeat round trip, session round trip) with their wall-clock times.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import resource
import signal
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websockets
from websockets.exceptions import InvalidHandshake, WebSocketException

CONNECT: dict[str, Any] = {
    "compression": None,
    "ping_interval": None,
    "max_size": None,
    "open_timeout": 10,
    "close_timeout": 2,
}
REPLY_TIMEOUT = 10.0
SESSION_TIMEOUT = 30.0
DRAIN_GRACE = 5.0
MAX_BACKOFF = 1.0


def raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _frame(**fields: Any) -> str:
    return json.dumps({"status": "ok", "client_type": "device", **fields})


@dataclass
class Recorder:
    """Everything the clients saw; written as JSON at the end."""

    started: float = field(default_factory=time.time)
    registrations: dict[str, int] = field(default_factory=dict)
    refusals: list[tuple[float, str, str]] = field(default_factory=list)
    drops: int = 0
    errors: list[tuple[float, str, str]] = field(default_factory=list)
    sent: dict[str, float] = field(default_factory=dict)
    acks: dict[str, float] = field(default_factory=dict)
    ends: dict[str, tuple[float, str, str | None]] = field(default_factory=dict)
    heartbeat_rtt: list[tuple[float, float]] = field(default_factory=list)
    session_rtt: list[tuple[float, float]] = field(default_factory=list)
    online: set[str] = field(default_factory=set)
    last_sent: dict[str, float] = field(default_factory=dict)

    def progress(self) -> dict[str, Any]:
        return {
            "t": time.time(),
            "online": len(self.online),
            "registrations": sum(self.registrations.values()),
            "sent": len(self.sent),
            "acks": len(self.acks),
            "ends": len(self.ends),
            "errors": len(self.errors),
            "drops": self.drops,
        }

    def result(self) -> dict[str, Any]:
        return {
            **self.progress(),
            "started": self.started,
            "registrations_by_client": self.registrations,
            "refusals": self.refusals,
            "error_frames": self.errors,
            "sessions": {
                sid: {
                    "sent": t,
                    "acked": self.acks.get(sid),
                    "ended": self.ends.get(sid, (None, None, None))[0],
                    "status": self.ends.get(sid, (None, None, None))[1],
                    "error": self.ends.get(sid, (None, None, None))[2],
                }
                for sid, t in self.sent.items()
            },
            "heartbeat_rtt": self.heartbeat_rtt,
            "session_rtt": self.session_rtt,
            "last_sent": self.last_sent,
        }


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.url: str = args.url
        self.rec = Recorder()
        self.stopping = asyncio.Event()
        self.devices_stopping = asyncio.Event()
        self.tag = uuid.uuid4().hex[:6]
        self.rng = random.Random(args.seed)
        self.background: set[asyncio.Task[None]] = set()

    def device_id(self, i: int) -> str:
        return f"{self.args.prefix}-dev-{i:05d}"

    # -- shared connection loop ---------------------------------------------------------------

    async def client(self, client_id: str, register: str, serve: Any) -> None:
        """Connect, register, serve; reconnect after drops until the run stops."""
        backoff = 0.05
        while not self.stopping.is_set():
            ws = None
            try:
                ws = await websockets.connect(self.url, **CONNECT)
                await ws.send(register)
                self.rec.last_sent[client_id] = time.time()
                reply = json.loads(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT))
                if reply.get("type") != "heartbeat" or reply.get("status") != "ok":
                    self.rec.refusals.append((time.time(), client_id, str(reply.get("error"))))
                    await ws.close()
                    raise ConnectionError("refused")
                self.rec.registrations[client_id] = self.rec.registrations.get(client_id, 0) + 1
                self.rec.online.add(client_id)
                backoff = 0.05
                await serve(ws)
                if self.stopping.is_set():
                    return
            except (OSError, TimeoutError, WebSocketException, InvalidHandshake, ConnectionError):
                pass
            except json.JSONDecodeError:
                pass
            finally:
                if client_id in self.rec.online:
                    self.rec.online.discard(client_id)
                    if not self.stopping.is_set():
                        self.rec.drops += 1
                if ws is not None:
                    with contextlib.suppress(Exception):
                        await ws.close()
            if self.stopping.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), backoff * (1 + self.rng.random()))
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def heartbeats(self, ws: Any, client_id: str, pending: list[float], **extra: Any) -> None:
        while True:
            await asyncio.sleep(self.args.heartbeat * (0.5 + self.rng.random()))
            if not pending:
                pending.append(time.time())
            await ws.send(_frame(type="heartbeat", client_id=client_id, **extra))
            self.rec.last_sent[client_id] = time.time()

    def heartbeat_ack(self, pending: list[float]) -> None:
        if pending:
            sent = pending.pop()
            self.rec.heartbeat_rtt.append((sent, time.time() - sent))

    def error(self, client_id: str, frame: dict[str, Any]) -> None:
        self.rec.errors.append((time.time(), client_id, str(frame.get("error"))))

    # -- devices ------------------------------------------------------------------------------

    async def device(self, i: int) -> None:
        client_id = self.device_id(i)
        register = _frame(
            type="register",
            client_id=client_id,
            metadata={
                "platform": "linux",
                "ccm_execution": "relay",
                "system_info": {
                    "device_id": client_id,
                    "platform": "linux",
                    "supported_features": ["cli", "file_system"],
                    "tags": [f"group-{i % 10}"],
                },
            },
        )

        async def serve(ws: Any) -> None:
            pending: list[float] = []

            async def reader() -> None:
                async for raw in ws:
                    frame = json.loads(raw)
                    kind = frame.get("type")
                    if kind == "task":
                        task = asyncio.create_task(self.answer(ws, client_id, frame))
                        self.background.add(task)
                        task.add_done_callback(self.background.discard)
                    elif kind == "heartbeat" and frame.get("session_id") is None:
                        self.heartbeat_ack(pending)
                    elif kind == "error":
                        self.error(client_id, frame)

            read = asyncio.create_task(reader())
            beat = asyncio.create_task(self.heartbeats(ws, client_id, pending))
            # Devices stay until the constellations are done, so no session in flight fails.
            stop = asyncio.create_task(self.devices_stopping.wait())
            try:
                await asyncio.wait([read, stop], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (read, beat, stop):
                    task.cancel()
                await asyncio.gather(read, beat, stop, return_exceptions=True)

        await self.client(client_id, register, serve)

    async def answer(self, ws: Any, client_id: str, task: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            if self.args.task_delay:
                await asyncio.sleep(self.args.task_delay * self.rng.random())
            await ws.send(
                _frame(
                    type="task_end",
                    status="completed",
                    client_id=client_id,
                    session_id=task.get("session_id"),
                    metadata={"result": {"session_id": task.get("session_id"), "by": client_id}},
                )
            )
            self.rec.last_sent[client_id] = time.time()

    # -- constellations -----------------------------------------------------------------------

    async def constellation(self, j: int) -> None:
        target = self.device_id(j % self.args.devices)
        client_id = f"{self.args.prefix}-con-{j:03d}@{target}"
        register = _frame(
            type="register",
            client_type="constellation",
            client_id=client_id,
            target_id=target,
            metadata={"type": "constellation_client", "task_name": f"con-{j}"},
        )
        counter = iter(range(10**9))

        async def serve(ws: Any) -> None:
            waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
            pending: list[float] = []

            async def reader() -> None:
                async for raw in ws:
                    frame = json.loads(raw)
                    kind, sid = frame.get("type"), frame.get("session_id")
                    if kind == "heartbeat" and sid is None:
                        self.heartbeat_ack(pending)
                    elif kind == "heartbeat":
                        self.rec.acks.setdefault(sid, time.time())
                    elif kind == "task_end" and sid is not None:
                        self.rec.ends[sid] = (time.time(), frame.get("status"), frame.get("error"))
                        future = waiting.pop(sid, None)
                        if future is not None and not future.done():
                            future.set_result(frame)
                    elif kind == "error":
                        self.error(client_id, frame)

            async def worker(w: int) -> None:
                while not self.stopping.is_set():
                    sid = f"{self.args.prefix}-{self.tag}-s{j}.{w}.{next(counter)}"
                    future: asyncio.Future[dict[str, Any]] = (
                        asyncio.get_running_loop().create_future()
                    )
                    waiting[sid] = future
                    self.rec.sent[sid] = time.time()
                    await ws.send(
                        _frame(
                            type="task",
                            status="continue",
                            client_type="constellation",
                            client_id=client_id,
                            target_id=target,
                            session_id=sid,
                            task_name=f"galaxy/{self.args.prefix}/{sid}",
                            request=f"relay task {sid}",
                        )
                    )
                    self.rec.last_sent[client_id] = time.time()
                    try:
                        end = await asyncio.wait_for(future, SESSION_TIMEOUT)
                    except TimeoutError:
                        waiting.pop(sid, None)
                        continue
                    if end.get("status") == "completed":
                        self.rec.session_rtt.append(
                            (self.rec.sent[sid], self.rec.ends[sid][0] - self.rec.sent[sid])
                        )
                    else:  # refused or failed: back off a little, as a real client would
                        await asyncio.sleep(0.1 + 0.2 * self.rng.random())
                    if self.args.think:
                        await asyncio.sleep(self.args.think * self.rng.random())

            read = asyncio.create_task(reader())
            beat = asyncio.create_task(
                self.heartbeats(ws, client_id, pending, client_type="constellation")
            )
            workers = [asyncio.create_task(worker(w)) for w in range(self.args.in_flight)]
            stop = asyncio.create_task(self.stopping.wait())
            try:
                await asyncio.wait([read, stop], return_when=asyncio.FIRST_COMPLETED)
                if self.stopping.is_set() and not read.done():
                    # Grace period: let sessions in flight end before the socket closes.
                    for worker_task in workers:
                        worker_task.cancel()
                    deadline = time.monotonic() + DRAIN_GRACE
                    while waiting and time.monotonic() < deadline and not read.done():
                        await asyncio.sleep(0.05)
            finally:
                for task in (read, beat, stop, *workers):
                    task.cancel()
                await asyncio.gather(read, beat, stop, *workers, return_exceptions=True)
                if self.stopping.is_set():
                    with contextlib.suppress(Exception):
                        await ws.close()

        await self.client(client_id, register, serve)

    # -- the run ------------------------------------------------------------------------------

    async def write_progress(self) -> None:
        path = Path(self.args.progress) if self.args.progress else None
        while path is not None:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.rec.progress()))
            tmp.replace(path)
            await asyncio.sleep(0.1)

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        progress = asyncio.create_task(self.write_progress())
        devices = []
        for i in range(self.args.devices):
            devices.append(asyncio.create_task(self.device(i)))
            if i % 50 == 49:
                await asyncio.sleep(0.01)  # spread the first registrations a little
        await asyncio.sleep(self.args.constellation_delay)
        constellations = [
            asyncio.create_task(self.constellation(j)) for j in range(self.args.constellations)
        ]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), self.args.duration)
        self.stopping.set()
        # Constellations first (they drain their sessions), then devices.
        await asyncio.wait(constellations, timeout=DRAIN_GRACE + 5) if constellations else None
        self.devices_stopping.set()
        await asyncio.wait(devices, timeout=10) if devices else None
        for task in (*constellations, *devices):
            task.cancel()
        await asyncio.gather(*constellations, *devices, return_exceptions=True)
        progress.cancel()
        await asyncio.gather(progress, return_exceptions=True)
        if self.args.progress:
            Path(self.args.progress).write_text(json.dumps(self.rec.progress()))
        out = Path(self.args.out)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.rec.result()))
        tmp.replace(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--progress")
    parser.add_argument("--prefix", default="rl")
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--constellations", type=int, default=20)
    parser.add_argument("--in-flight", type=int, default=2)
    parser.add_argument("--heartbeat", type=float, default=1.0)
    parser.add_argument("--task-delay", type=float, default=0.02)
    parser.add_argument("--think", type=float, default=0.0)
    parser.add_argument("--constellation-delay", type=float, default=0.5)
    parser.add_argument("--duration", type=float, default=60.0, help="hard upper bound, seconds")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    raise_nofile_limit()
    args = parse_args(argv)
    asyncio.run(Run(args).main())


if __name__ == "__main__":
    main()
