"""Demo AIP clients for a two-terminal round trip: a device with a few built-in tools, and a
constellation that sends it one task. Both are real `websockets` clients that behave like UFO's;
they report what happens through `on_event`, and the CLI prints it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform as host
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI, WebSocketException

from ccm.domain import Mode
from ccm.errors import CcmError
from ccm.ids import new_id
from ccm.protocol import RELAY_METADATA_KEY, ResultStatus, timestamp
from ccm.toolplan import PlanError, parse_tool_plan

logger = logging.getLogger(__name__)

Frame = dict[str, Any]
EventSink = Callable[[str], None]

MAX_FRAME_BYTES = 100 * 1024 * 1024  # what UFO's clients accept
REGISTER_TIMEOUT = 30.0  # how long Galaxy waits for the registration reply
DEVICE_INFO_TIMEOUT = 10.0  # Galaxy's limit; device info is optional
CONSTELLATION_HEARTBEAT = 30.0  # Galaxy's default interval
MAX_SLEEP_SECONDS = 5.0
NAMESPACE = "DemoTools"
DEFAULT_FEATURES = ("demo_tools",)


class DemoError(CcmError):
    """A demo client gave up; the message says what happened and what to check."""


@dataclass(frozen=True, slots=True)
class TaskOutcome:
    """How the demo device's own run of a relayed task ended."""

    completed: bool
    result: Any = None
    error: str | None = None


class _Refused(Exception):
    """The server answered REGISTER with something other than `ok`."""


def _ignore(line: str) -> None:
    """Default event sink: the caller does not want progress lines."""


def ws_url(url: str, token: str | None) -> str:
    """`url` with `token` as its query parameter, where both UFO clients expect the API key."""
    if not token:
        return url
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "token"]
    return urlunsplit(parts._replace(query=urlencode([*query, ("token", token)])))


def _shown(url: str) -> str:
    """The URL without its query, so messages never print the API key."""
    return urlunsplit(urlsplit(url)._replace(query=""))


# -- the demo device's tools ---------------------------------------------------------------------


class ToolFailure(Exception):
    """A demo tool could not do what it was asked: its Result is `failure` with this text."""


@dataclass(frozen=True, slots=True)
class DemoTool:
    run: Callable[[Frame], Awaitable[Any]]
    description: str
    parameters: dict[str, str]


def _number(params: Frame, key: str) -> float:
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ToolFailure(f"parameter {key!r} must be a number, got {value!r}")
    return value


async def _list_tools(params: Frame) -> list[Frame]:
    return [
        {
            "tool_name": name,
            "namespace": NAMESPACE,
            "description": tool.description,
            "parameters": tool.parameters,
        }
        for name, tool in TOOLS.items()
    ]


async def _echo(params: Frame) -> Frame:
    return params


async def _add(params: Frame) -> float:
    return _number(params, "a") + _number(params, "b")


async def _sleep(params: Frame) -> Frame:
    seconds = _number(params, "seconds") if "seconds" in params else 1.0
    if seconds < 0:
        raise ToolFailure("parameter 'seconds' must not be negative")
    slept = min(float(seconds), MAX_SLEEP_SECONDS)
    await asyncio.sleep(slept)
    return {"slept": slept}


async def _fail(params: Frame) -> None:
    raise ToolFailure(str(params.get("message") or "the fail tool always fails"))


TOOLS: dict[str, DemoTool] = {
    "list_tools": DemoTool(_list_tools, "List the tools of this demo device.", {}),
    "echo": DemoTool(_echo, "Return the parameters unchanged.", {"*": "any"}),
    "add": DemoTool(_add, "Return a + b.", {"a": "number", "b": "number"}),
    "sleep": DemoTool(
        _sleep, f"Wait, at most {MAX_SLEEP_SECONDS:g} s, then return.", {"seconds": "number"}
    ),
    "fail": DemoTool(_fail, "Always fail, to show how failures look.", {"message": "string"}),
}


def _result(
    status: ResultStatus, call_id: Any, *, result: Any = None, error: str | None = None
) -> Frame:
    return {
        "status": status.value,
        "error": error,
        "result": result,
        "namespace": NAMESPACE,
        "call_id": call_id,
    }


async def run_tool(action: Frame) -> Frame:
    """One Result for one Command; a demo tool never raises, it reports `failure`."""
    name, call_id = action.get("tool_name"), action.get("call_id")
    if not name:
        return _result(ResultStatus.SUCCESS, call_id, result="No action taken.")  # as UFO does
    tool = TOOLS.get(str(name))
    if tool is None:
        known = ", ".join(TOOLS)
        return _result(
            ResultStatus.FAILURE,
            call_id,
            error=f"unknown tool {name!r} (this demo device has: {known})",
        )
    params = action.get("parameters") or {}
    if not isinstance(params, dict):
        return _result(ResultStatus.FAILURE, call_id, error="parameters must be an object")
    try:
        value = await tool.run(params)
    except ToolFailure as exc:
        return _result(ResultStatus.FAILURE, call_id, error=str(exc))
    return _result(ResultStatus.SUCCESS, call_id, result=value)


async def run_actions(actions: Sequence[Frame]) -> list[Frame]:
    """One Result per Command, in order, like a UFO device: after a failure the rest are skipped."""
    results: list[Frame] = []
    for action in actions:
        if results and results[-1]["status"] != ResultStatus.SUCCESS.value:
            error = "skipped because an earlier command failed"
            results.append(_result(ResultStatus.SKIPPED, action.get("call_id"), error=error))
        else:
            results.append(await run_tool(action))
    return results


async def run_task(request: str | None, client_id: str) -> TaskOutcome:
    """Relay mode: a JSON tool plan runs here, round by round; anything else is echoed back."""
    try:
        plan = parse_tool_plan(request)
    except PlanError as exc:
        return TaskOutcome(False, error=f"invalid tool plan: {exc}")
    if plan is None:
        return TaskOutcome(True, result={"echo": request, "handled_by": client_id})
    done: list[Frame] = []
    for actions in plan.rounds:
        answers = await run_actions([{**a, "call_id": new_id()} for a in actions])
        done.extend(
            {"tool_name": a["tool_name"], **r} for a, r in zip(actions, answers, strict=True)
        )
        failed = next((r for r in answers if r["status"] != ResultStatus.SUCCESS.value), None)
        if failed is not None:
            return TaskOutcome(False, result=done, error=f"tool call failed: {failed['error']}")
    return TaskOutcome(True, result=done)


# -- frames ---------------------------------------------------------------------------------------


def _client_frame(
    kind: str, client_id: str, client_type: str, status: str = "ok", **fields: Any
) -> str:
    return json.dumps(
        {
            "type": kind,
            "status": status,
            "client_type": client_type,
            "client_id": client_id,
            "timestamp": timestamp(),
            **fields,
        },
        default=str,
    )


async def _recv_frame(ws: ClientConnection, within: float | None) -> Frame:
    """The next server frame as a dict (`{}` if not a JSON object); TimeoutError on silence."""
    async with asyncio.timeout(within):
        raw = await ws.recv()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        logger.debug("ignored a frame that is not JSON")
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.asynccontextmanager
async def _connected(url: str, *, ping_interval: float) -> AsyncIterator[ClientConnection]:
    """A connection that a deliberate exit (Ctrl-C, giving up) closes with 1000, so the server
    records `closed`; websockets alone would send 1011 (`connection_lost`) for any exception."""
    async with connect(
        url,
        max_size=MAX_FRAME_BYTES,
        ping_interval=ping_interval,
        ping_timeout=180,
        close_timeout=10,
    ) as ws:
        try:
            yield ws
        except (asyncio.CancelledError, DemoError):
            await ws.close()
            raise


def _memory_total_gb() -> float:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 2)
    except (AttributeError, ValueError, OSError):
        return 0.0  # UFO reports 0.0 when it cannot tell


def device_metadata(
    client_id: str, *, platform: str, features: Sequence[str], relay: bool
) -> Frame:
    """REGISTER metadata shaped like a UFO device's (3.1), plus the relay flag ccm reads."""
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
        return _client_frame(kind, self.client_id, "device", status, **fields)

    async def register(self, ws: ClientConnection) -> None:
        metadata = device_metadata(
            self.client_id,
            platform=self.platform,
            features=self.features,
            relay=self.mode is Mode.RELAY,
        )
        await ws.send(self.frame("register", metadata=metadata))
        try:
            reply = await _recv_frame(ws, REGISTER_TIMEOUT)
        except TimeoutError:
            raise _Refused(f"no reply to REGISTER within {REGISTER_TIMEOUT:g} s") from None
        if reply.get("status") != "ok":  # like UFO's device, only the status counts
            raise _Refused(str(reply.get("error") or f"unexpected reply {reply}"))
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
            frame = await _recv_frame(ws, None)
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
            # Like UFO's device (3.8): hand the task back and let the server run a session for it.
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


def _bad_url(url: str) -> DemoError:
    return DemoError(f"{_shown(url)} is not a WebSocket URL: use one like ws://127.0.0.1:5000/ws")


def _upgrade_refused(url: str, exc: InvalidStatus) -> DemoError:
    code = exc.response.status_code
    if code in (401, 403):  # uvicorn also answers 403 for a path with no WebSocket route
        hint = "pass the server's API key with --token, and check that the URL's path is /ws"
    else:
        hint = "check that the URL points at ccm's WebSocket endpoint (it ends with /ws)"
    return DemoError(f"the server at {_shown(url)} refused the WebSocket (HTTP {code}): {hint}")


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
    on_event: EventSink = _ignore,
) -> None:
    """Serve as a demo device until `stop` is set, reconnecting after drops and refusals with
    back-off `retry_delay` x 2, 4, 8... like UFO's device. DemoError once it gives up."""
    stop = stop or asyncio.Event()
    device = _Device(client_id, platform, mode, tuple(features), on_event)
    failures = 0
    while not stop.is_set():
        try:
            async with _connected(url, ping_interval=20) as ws:  # UFO's device pings every 20 s
                await device.register(ws)
                failures = 0
                await device.serve(ws, heartbeat, stop)
                return
        except InvalidURI:
            raise _bad_url(url) from None
        except InvalidStatus as exc:
            if 400 <= exc.response.status_code < 500:
                raise _upgrade_refused(url, exc) from None
            reason = f"HTTP {exc.response.status_code}"
        except _Refused as exc:
            reason = f"registration refused: {exc}"
        except ConnectionClosed as exc:
            reason = f"connection lost ({exc})"
        except (OSError, TimeoutError, WebSocketException) as exc:
            reason = f"cannot connect to {_shown(url)}: {str(exc) or type(exc).__name__}"
        failures += 1
        if failures > max_retries:
            raise DemoError(
                f"gave up after {failures} failed attempts: {reason}; check that `ccm serve` "
                f"is running at {_shown(url)} and no other client uses the id {client_id!r}"
            )
        delay = retry_delay * 2 ** (failures - 1)
        on_event(f"{reason}; retrying in {delay:g} s ({failures}/{max_retries})")
        if await _stopped_within(stop, delay):
            return


# -- demo constellation ---------------------------------------------------------------------------


@dataclass
class _Constellation:
    """One Galaxy-style connection: `<name>@<target>`, scoped to one device."""

    ws: ClientConnection
    client_id: str
    target: str
    on_event: EventSink

    def frame(self, kind: str, status: str = "ok", **fields: Any) -> str:
        return _client_frame(kind, self.client_id, "constellation", status, **fields)

    async def next_frame(self, deadline: float) -> Frame:
        return await _recv_frame(self.ws, max(deadline - time.monotonic(), 0.0))

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
        request_id = f"device_info_{self.target}_{time.time()}"  # Galaxy's form (2.6)
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
    on_event: EventSink = _ignore,
) -> Frame:
    """Send one task to `target` as Galaxy does and return the task_end frame of its session
    (completed or failed). DemoError if the server is unreachable, refuses us, or time runs out."""
    session_id = session_id or f"{name}@{uuid.uuid4().hex[:8]}"
    try:
        async with _connected(url, ping_interval=30) as ws:  # Galaxy pings every 30 s
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
        raise _bad_url(url) from None
    except InvalidStatus as exc:
        raise _upgrade_refused(url, exc) from None
    except ConnectionClosed as exc:
        raise DemoError(
            f"the server closed the connection before the task ended ({exc}); "
            "check the server's log"
        ) from None
    except (OSError, TimeoutError, WebSocketException) as exc:
        raise DemoError(
            f"cannot reach the server at {_shown(url)} ({str(exc) or type(exc).__name__}); "
            "check that `ccm serve` is running there"
        ) from None


def describe_task_end(frame: Frame) -> str:
    """One line for people: the outcome, the error if any, and the result as JSON."""
    line = f"task {frame.get('status')}: session {frame.get('session_id')}"
    if frame.get("error"):
        line += f", error: {frame['error']}"
    return f"{line}, result: {json.dumps(frame.get('result'), default=str)}"
