"""Sockets that never finish a request against a real `ccm serve` (uvloop and httptools, as in
production): 1,100 of them, half silent, half dribbling a header byte at a time. Those over the
per-address cap are answered 503 naming the limit at once; the rest are closed after
`limits.request_timeout`; meanwhile a client from another address registers and `/healthz`
answers, and afterwards the server holds no more descriptors than before."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import websockets

from tests.reliability.support import ServeProcess, wait_until

REQUEST_TIMEOUT = 2.0
PER_ADDRESS = 400
SOCKETS = 1100
BOUND = 30.0  # generous: without a deadline these sockets stayed open indefinitely
OTHER_ADDRESS = "127.0.0.2"


async def open_socket(port: int, dribble: bool) -> tuple[bytes, bool]:
    """Connect; dribble a request header (or stay silent) until the server ends it. Returns
    what the server sent and whether it closed the connection within BOUND."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    try:
        async with asyncio.timeout(BOUND):
            if dribble:
                writer.write(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            while True:
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), 0.5)
                except TimeoutError:
                    if dribble:
                        writer.write(b"a")
                    continue
                if not chunk:
                    return received, True
                received += chunk
    except TimeoutError:
        return received, False
    except ConnectionError:
        return received, True
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def flood(server: ServeProcess) -> dict[str, Any]:
    tasks = [
        asyncio.create_task(open_socket(server.port, dribble=n % 2 == 1)) for n in range(SOCKETS)
    ]
    await asyncio.sleep(0.5)
    # A client elsewhere is not locked out by one address's flood.
    async with websockets.connect(server.ws_url, local_addr=(OTHER_ADDRESS, 0)) as ws:
        await ws.send(
            json.dumps(
                {"type": "register", "status": "ok", "client_id": "bystander", "metadata": {}}
            )
        )
        registered = json.loads(await asyncio.wait_for(ws.recv(), 10))
    async with httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(local_address=OTHER_ADDRESS), timeout=10
    ) as http:
        healthz = (await http.get(f"{server.http_url}/healthz")).status_code
    results = await asyncio.gather(*tasks)
    return {"registered": registered, "healthz": healthz, "results": results}


def test_sockets_that_never_finish_are_refused_or_closed(
    serve: Callable[..., ServeProcess],
) -> None:
    """Over the cap: 503 naming `limits.max_pending_per_address`; under it: 408 after the
    request timeout; every socket closed by the server; a bystander unaffected."""
    server = serve(
        env={
            "CCM_LIMITS_REQUEST_TIMEOUT": f"{REQUEST_TIMEOUT:g}s",
            "CCM_LIMITS_MAX_PENDING_PER_ADDRESS": str(PER_ADDRESS),
        }
    )
    baseline = server.fd_count()
    started = time.monotonic()
    outcome = asyncio.run(flood(server))
    results: list[tuple[bytes, bool]] = outcome["results"]
    assert outcome["registered"]["status"] == "ok"
    assert outcome["healthz"] == 200
    assert all(closed for _, closed in results), "a socket was left open"
    refused = [data for data, _ in results if data.startswith(b"HTTP/1.1 503 ")]
    timed_out = [data for data, _ in results if data.startswith(b"HTTP/1.1 408 ")]
    silent_refused = [data for data, _ in results if data == b""]
    # The first PER_ADDRESS are admitted and time out; the rest are refused: with a 503 once
    # their request starts (the dribbling half), closed after a second if they say nothing.
    assert abs(len(timed_out) - PER_ADDRESS) <= 10, len(timed_out)
    assert len(refused) >= (SOCKETS - PER_ADDRESS) // 2 - 10, len(refused)
    assert len(timed_out) + len(refused) + len(silent_refused) == SOCKETS
    assert all(b"limits.max_pending_per_address" in data for data in refused)
    assert time.monotonic() - started < BOUND
    wait_until(lambda: server.fd_count() <= baseline + 10, 20, "descriptors to be released")
    assert server.health()["pending_connections"] == 0
