"""The demo device: registers like a UFO device, answers COMMANDs with its tools, runs relayed
tasks itself, and reconnects with back-off like UFO's device does."""

from __future__ import annotations

import asyncio
import logging
import os
import platform as host
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI, WebSocketException

from ccm.demo.link import (
    DEFAULT_FEATURES,
    REGISTER_TIMEOUT,
    DemoError,
    EventSink,
    Frame,
    Refused,
    bad_url,
    client_frame,
    connected,
    ignore,
    recv_frame,
    shown,
    upgrade_refused,
)
from ccm.demo.tools import run_actions, run_task
from ccm.domain import Mode
from ccm.ids import new_id
from ccm.protocol import RELAY_METADATA_KEY, timestamp

logger = logging.getLogger(__name__)


def _memory_total_gb() -> float:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 2)
    except (AttributeError, ValueError, OSError):
        return 0.0  # UFO reports 0.0 when it cannot tell


def device_metadata(
    client_id: str, *, platform: str, features: Sequence[str], relay: bool
) -> Frame:
    """REGISTER metadata shaped like a UFO device's, plus the relay flag ccm reads."""
    system_info = {
        "device_id": client_id,
        "platform": host.system().lower() or "unknown",
        "os_version": host.version() or "unknown",
        "cpu_count": os.cpu_count() or 0,
        "memory_total_gb": _memory_total_gb(),
        "hostname": socket.gethostname() or "unknown",
        "ip_address": "127.0.0.1",
        "supported_features": list(features),
        "platform_type": "computer",
        "schema_version": "1.0",
        "custom_metadata": {},
    }
    metadata: Frame = {
        "system_info": system_info,
        "registration_time": timestamp(),
        "platform": platform,
    }
    if relay:
        metadata[RELAY_METADATA_KEY] = "relay"
    return metadata


# -- demo device ----------------------------------------------------------------------------------


@dataclass
class _Device:
    """One demo device's identity and its reactions to server frames."""

    client_id: str
    platform: str
    mode: Mode
    features: tuple[str, ...]
    on_event: EventSink

    def frame(self, kind: str, status: str = "ok", **fields: Any) -> str:
        return client_frame(kind, self.client_id, "device", status, **fields)

    async def register(self, ws: ClientConnection) -> None:
        metadata = device_metadata(
            self.client_id,
            platform=self.platform,
            features=self.features,
            relay=self.mode is Mode.RELAY,
        )
        await ws.send(self.frame("register", metadata=metadata))
        try:
            reply = await recv_frame(ws, REGISTER_TIMEOUT)
        except TimeoutError:
            raise Refused(f"no reply to REGISTER within {REGISTER_TIMEOUT:g} s") from None
        if reply.get("status") != "ok":  # like UFO's device, only the status counts
            raise Refused(str(reply.get("error") or f"unexpected reply {reply}"))
        self.on_event(f"registered {self.client_id} ({self.mode} mode, platform {self.platform})")

    async def serve(self, ws: ClientConnection, heartbeat: float, stop: asyncio.Event) -> None:
        """Handle frames one at a time and send heartbeats until `stop` is set or the link drops."""
        tasks = [
            asyncio.create_task(self._read(ws)),
            asyncio.create_task(self._beat(ws, heartbeat)),
            asyncio.create_task(stop.wait()),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if not stop.is_set():
            for task in done:
                task.result()  # re-raises why the link dropped

    async def _beat(self, ws: ClientConnection, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await ws.send(self.frame("heartbeat"))

    async def _read(self, ws: ClientConnection) -> None:
        while True:
            frame = await recv_frame(ws, None)
            kind = frame.get("type")
            if kind == "command":
                await self._on_command(ws, frame)
            elif kind == "task":
                await self._on_task(ws, frame)
            elif kind == "task_end":
                error = f": {frame['error']}" if frame.get("error") else ""
                session, status = frame.get("session_id"), frame.get("status")
                self.on_event(f"task_end received: session {session} {status}{error}")
            elif kind == "error":
                self.on_event(f"server error: {frame.get('error')}")
            else:
                logger.debug("ignored frame type=%s", kind)

    async def _on_command(self, ws: ClientConnection, command: Frame) -> None:
        actions = [a for a in command.get("actions") or [] if isinstance(a, dict)]
        results = await run_actions(actions)
        await ws.send(
            self.frame(
                "command_results",
                status=command.get("status") or "continue",
                session_id=command.get("session_id"),
                prev_response_id=command.get("response_id"),
                action_results=results,
                request_id=new_id(),
            )
        )
        ran = ", ".join(
            f"{a.get('tool_name')} {r['status']}" for a, r in zip(actions, results, strict=True)
        )
        self.on_event(
            f"command received: session {command.get('session_id')}: {ran or 'no tool calls'}"
        )

    async def _on_task(self, ws: ClientConnection, task: Frame) -> None:
        session_id, request = task.get("session_id"), task.get("user_request")
        if self.mode is Mode.AGENT:
            # Like UFO's device: hand the task back and let the server run a session for it.
            await ws.send(
                self.frame(
                    "task",
                    status="continue",
                    session_id=None,
                    task_name=task.get("task_name") or new_id(),
                    request=request,
                    request_id=new_id(),
                    metadata={"platform": self.platform},
                )
            )
            self.on_event(f"task received: session {session_id}: sent back to the server to run")
            return
        outcome = await run_task(request, self.client_id)
        status = "completed" if outcome.completed else "failed"
        await ws.send(
            self.frame(
                "task_end",
                status=status,
                session_id=session_id,
                error=outcome.error,
                metadata={"result": outcome.result},
            )
        )
        self.on_event(
            f"task received: session {session_id}: {request!r} -> {status}, task_end sent"
        )


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def run_device(
    url: str,
    client_id: str,
    *,
    platform: str = "linux",
    mode: Mode = Mode.AGENT,
    features: Sequence[str] = DEFAULT_FEATURES,
    heartbeat: float = 30.0,
    max_retries: int = 5,
    retry_delay: float = 2.0,
    stop: asyncio.Event | None = None,
    on_event: EventSink = ignore,
) -> None:
    """Serve as a demo device until `stop` is set, reconnecting after drops and refusals with
    back-off `retry_delay` x 2, 4, 8... like UFO's device. DemoError once it gives up."""
    stop = stop or asyncio.Event()
    device = _Device(client_id, platform, mode, tuple(features), on_event)
    failures = 0
    while not stop.is_set():
        try:
            async with connected(url, ping_interval=20) as ws:  # UFO's device pings every 20 s
                await device.register(ws)
                failures = 0
                await device.serve(ws, heartbeat, stop)
                return
        except InvalidURI:
            raise bad_url(url) from None
        except InvalidStatus as exc:
            if 400 <= exc.response.status_code < 500:
                raise upgrade_refused(url, exc) from None
            reason = f"HTTP {exc.response.status_code}"
        except Refused as exc:
            reason = f"registration refused: {exc}"
        except ConnectionClosed as exc:
            reason = f"connection lost ({exc})"
        except (OSError, TimeoutError, WebSocketException) as exc:
            reason = f"cannot connect to {shown(url)}: {str(exc) or type(exc).__name__}"
        failures += 1
        if failures > max_retries:
            raise DemoError(
                f"gave up after {failures} failed attempts: {reason}; check that `ccm serve` "
                f"is running at {shown(url)} and no other client uses the id {client_id!r}"
            )
        delay = retry_delay * 2 ** (failures - 1)
        on_event(f"{reason}; retrying in {delay:g} s ({failures}/{max_retries})")
        if await _stopped_within(stop, delay):
            return
