"""What both demo clients share: the connection (closed with 1000 on a deliberate exit), the
frames they send and read, the URL with its token, and their errors in plain words."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from ccm.errors import CcmError
from ccm.protocol import timestamp

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


class Refused(Exception):
    """The server answered REGISTER with something other than `ok`."""


def ignore(line: str) -> None:
    """Default event sink: the caller does not want progress lines."""


def ws_url(url: str, token: str | None) -> str:
    """`url` with `token` as its query parameter, where both UFO clients expect the API key."""
    if not token:
        return url
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "token"]
    return urlunsplit(parts._replace(query=urlencode([*query, ("token", token)])))


def shown(url: str) -> str:
    """The URL without its query, so messages never print the API key."""
    return urlunsplit(urlsplit(url)._replace(query=""))


def client_frame(
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


async def recv_frame(ws: ClientConnection, within: float | None) -> Frame:
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
async def connected(url: str, *, ping_interval: float) -> AsyncIterator[ClientConnection]:
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


def bad_url(url: str) -> DemoError:
    return DemoError(f"{shown(url)} is not a WebSocket URL: use one like ws://127.0.0.1:5000/ws")


def upgrade_refused(url: str, exc: InvalidStatus) -> DemoError:
    code = exc.response.status_code
    if code in (401, 403):  # uvicorn also answers 403 for a path with no WebSocket route
        hint = "pass the server's API key with --token, and check that the URL's path is /ws"
    else:
        hint = "check that the URL points at ccm's WebSocket endpoint (it ends with /ws)"
    return DemoError(f"the server at {shown(url)} refused the WebSocket (HTTP {code}): {hint}")
