"""Test support: a real ccm server (uvicorn on a free loopback port, in a thread) and a small
AIP client over a real `websockets` connection."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from ccm.config import Settings
from ccm.logs import protect_uvicorn_loggers
from ccm.server.app import create_app
from ccm.server.runners import SessionRunner
from ccm.server.serve import CcmServer, uvicorn_config
from tests.support import free_port

API_KEY = "test-key-0123456789"


class ServerThread:
    """ccm served by uvicorn in a background thread; `app.state` is reachable for assertions."""

    def __init__(self, settings: Settings, runners: list[SessionRunner] | None = None) -> None:
        self.settings = settings
        self.port = settings.server.port
        self.app = create_app(settings, api_key=API_KEY, runners=runners)
        protect_uvicorn_loggers()  # what `ccm serve` does through configure_logging
        # The config `ccm serve` uses (transport limits included), on the asyncio loop.
        config = uvicorn_config(
            self.app,
            settings,
            host="127.0.0.1",
            port=self.port,
            timeout_graceful_shutdown=5,
            loop="asyncio",
            http="h11",
        )
        self.server = CcmServer(config, self.app)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws?token={API_KEY}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("ccm test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.http_url, headers={"X-API-Key": API_KEY}, timeout=10)

    @property
    def registry(self) -> Any:
        return self.app.state.registry

    def flush(self) -> None:
        """Wait until the server's store has committed everything queued so far."""
        self.app.state.store.writer.flush().result(10)


def make_settings(database_url: str, data_dir: Path, **overrides: Any) -> Settings:
    base = Settings(
        data_dir=data_dir,
        database={"url": database_url},
        cleanup={"enabled": False},
        server={"port": free_port(), "api_key": API_KEY},
    )
    return base.with_overrides(overrides)


def frame(**fields: Any) -> str:
    """A client frame: `status` ok and `client_type` device unless given."""
    data: dict[str, Any] = {"status": "ok", "client_type": "device"}
    data.update(fields)
    return json.dumps(data)


class AipClient:
    """A real websockets client speaking AIP, with receive timeouts so tests cannot hang."""

    def __init__(self, ws: ClientConnection, client_id: str | None = None) -> None:
        self.ws = ws
        self.client_id = client_id

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> AipClient:
        return cls(await websockets.connect(url, max_size=None, **kwargs))

    async def send(self, **fields: Any) -> None:
        await self.ws.send(frame(**fields))

    async def recv(self, timeout: float = 5) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        message: dict[str, Any] = json.loads(raw)
        return message

    async def recv_type(self, kind: str, timeout: float = 5) -> dict[str, Any]:
        """Skip frames until one of type `kind` arrives."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            message = await self.recv(max(left, 0.01))
            if message["type"] == kind:
                return message

    async def register_device(
        self, client_id: str, *, platform: str = "windows", relay: bool = False, **system_info: Any
    ) -> dict[str, Any]:
        self.client_id = client_id
        metadata: dict[str, Any] = {
            "platform": platform,
            "system_info": {"device_id": client_id, "platform": platform, **system_info},
        }
        if relay:
            metadata["ccm_execution"] = "relay"
        await self.send(type="register", client_id=client_id, metadata=metadata)
        return await self.recv()

    async def register_constellation(self, client_id: str, target_id: str | None) -> dict[str, Any]:
        self.client_id = client_id
        await self.send(
            type="register",
            client_type="constellation",
            client_id=client_id,
            target_id=target_id,
            metadata={"type": "constellation_client"},
        )
        return await self.recv()

    async def close(self) -> None:
        await self.ws.close()


_opened: contextvars.ContextVar[list[AipClient]] = contextvars.ContextVar("opened")
T = TypeVar("T")


def run(scenario: Coroutine[Any, Any, T]) -> T:
    """Run a client scenario; every client it opened (see `track`) is closed at the end."""

    async def main() -> T:
        opened: list[AipClient] = []
        _opened.set(opened)
        try:
            return await scenario
        finally:
            for client in opened:
                with contextlib.suppress(Exception):
                    await client.close()

    return asyncio.run(main())


def track(client: AipClient) -> AipClient:
    """Close `client` when the scenario started by `run` ends, pass or fail."""
    _opened.get().append(client)
    return client


async def open_client(server: ServerThread) -> AipClient:
    """A client connected to `server`, closed when the scenario `run` started ends."""
    return track(await AipClient.connect(server.ws_url))
