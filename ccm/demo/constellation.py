"""The demo constellation: registers as Galaxy does (`<name>@<target>`, scoped to one device),
shows the device's info, sends one task and waits for its task_end."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI, WebSocketException

from ccm.demo.link import (
    CONSTELLATION_HEARTBEAT,
    DEVICE_INFO_TIMEOUT,
    REGISTER_TIMEOUT,
    DemoError,
    EventSink,
    Frame,
    bad_url,
    client_frame,
    connected,
    ignore,
    recv_frame,
    shown,
    upgrade_refused,
)


@dataclass
class _Constellation:
    """One Galaxy-style connection: `<name>@<target>`, scoped to one device."""

    ws: ClientConnection
    client_id: str
    target: str
    on_event: EventSink

    def frame(self, kind: str, status: str = "ok", **fields: Any) -> str:
        return client_frame(kind, self.client_id, "constellation", status, **fields)

    async def next_frame(self, deadline: float) -> Frame:
        return await recv_frame(self.ws, max(deadline - time.monotonic(), 0.0))

    async def register(self, name: str) -> None:
        metadata = {
            "type": "constellation_client",
            "task_name": name,
            "targeted_device_id": self.target,
            "capabilities": ["task_distribution", "session_management", "device_coordination"],
            "version": "2.0",
        }
        await self.ws.send(self.frame("register", target_id=self.target, metadata=metadata))
        deadline = time.monotonic() + REGISTER_TIMEOUT
        while True:
            try:
                reply = await self.next_frame(deadline)
            except TimeoutError:
                raise DemoError(f"no reply to REGISTER within {REGISTER_TIMEOUT:g} s") from None
            if reply.get("type") == "heartbeat" and reply.get("status") == "ok":
                self.on_event(f"registered {self.client_id} (target {self.target})")
                return
            if reply.get("type") == "error":
                raise DemoError(
                    f"registration refused: {reply.get('error')}; check that the device is running "
                    f"(ccm demo-device --id {self.target}) and that no other client uses the id "
                    f"{self.client_id!r}"
                )

    async def show_device_info(self) -> None:
        request_id = f"device_info_{self.target}_{time.time()}"  # Galaxy's form
        await self.ws.send(
            self.frame("device_info_request", target_id=self.target, request_id=request_id)
        )
        deadline = time.monotonic() + DEVICE_INFO_TIMEOUT
        while True:
            try:
                reply = await self.next_frame(deadline)
            except TimeoutError:
                self.on_event(f"device info: no answer within {DEVICE_INFO_TIMEOUT:g} s")
                return
            if (
                reply.get("type") == "device_info_response"
                and reply.get("response_id") == request_id
            ):
                info = reply.get("result")
                if isinstance(info, dict) and "error" not in info:
                    shown = ", ".join(
                        f"{k}={_plain(v)}" for k, v in info.items() if v not in (None, {}, [])
                    )
                    self.on_event(f"device info: {shown}")
                else:
                    self.on_event(f"device info unavailable: {reply.get('error') or info}")
                return

    async def run_task(
        self, session_id: str, task_name: str, request: str, task_timeout: float
    ) -> Frame:
        await self.ws.send(
            self.frame(
                "task",
                status="continue",
                target_id=self.target,
                session_id=session_id,
                task_name=task_name,
                request=request,
            )
        )
        self.on_event(f"task sent: session {session_id}, request {request!r}")
        deadline, acked = time.monotonic() + task_timeout, False
        while True:
            try:
                reply = await self.next_frame(deadline)
            except TimeoutError:
                message = _timeout_message(session_id, self.target, task_timeout, acked)
                raise DemoError(message) from None
            kind, same = reply.get("type"), reply.get("session_id") == session_id
            if kind == "task_end" and same:
                return reply
            if kind == "heartbeat" and same:
                acked = True
                self.on_event(f"task acknowledged: session {session_id}")
            elif kind == "error":
                self.on_event(f"server error: {reply.get('error')}")


def _plain(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _timeout_message(session_id: str, target: str, timeout: float, acked: bool) -> str:
    if not acked:
        return (
            f"the server did not acknowledge the task (session {session_id}) within {timeout:g} s; "
            "check the server's log"
        )
    return (
        f"no task_end for session {session_id} within {timeout:g} s; check that the device "
        f"{target!r} is running and answering (its terminal shows each command), or raise --timeout"
    )


async def _heartbeats(link: _Constellation, interval: float) -> None:
    """Keep the connection from looking silent while a long task runs."""
    while True:
        await asyncio.sleep(interval)
        await link.ws.send(link.frame("heartbeat", metadata={"device_id": link.target}))


async def run_constellation(
    url: str,
    name: str,
    target: str,
    request: str,
    *,
    task_name: str = "demo",
    session_id: str | None = None,
    task_timeout: float = 60.0,
    on_event: EventSink = ignore,
) -> Frame:
    """Send one task to `target` as Galaxy does and return the task_end frame of its session
    (completed or failed). DemoError if the server is unreachable, refuses us, or time runs out."""
    session_id = session_id or f"{name}@{uuid.uuid4().hex[:8]}"
    try:
        async with connected(url, ping_interval=30) as ws:  # Galaxy pings every 30 s
            link = _Constellation(ws, f"{name}@{target}", target, on_event)
            await link.register(name)
            beating = asyncio.create_task(_heartbeats(link, CONSTELLATION_HEARTBEAT))
            try:
                await link.show_device_info()
                return await link.run_task(session_id, task_name, request, task_timeout)
            finally:
                beating.cancel()
                await asyncio.gather(beating, return_exceptions=True)
    except InvalidURI:
        raise bad_url(url) from None
    except InvalidStatus as exc:
        raise upgrade_refused(url, exc) from None
    except ConnectionClosed as exc:
        raise DemoError(
            f"the server closed the connection before the task ended ({exc}); "
            "check the server's log"
        ) from None
    except (OSError, TimeoutError, WebSocketException) as exc:
        raise DemoError(
            f"cannot reach the server at {shown(url)} ({str(exc) or type(exc).__name__}); "
            "check that `ccm serve` is running there"
        ) from None


def describe_task_end(frame: Frame) -> str:
    """One line for people: the outcome, the error if any, and the result as JSON."""
    line = f"task {frame.get('status')}: session {frame.get('session_id')}"
    if frame.get("error"):
        line += f", error: {frame['error']}"
    return f"{line}, result: {json.dumps(frame.get('result'), default=str)}"
