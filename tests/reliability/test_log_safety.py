"""Logs are safe to read: a real `ccm serve` at DEBUG, in text and JSON format, is sent the key
in every spelling of the query parameter and in headers, and ids and error texts full of control
and format characters. No line of its output holds the key (plain or percent-encoded), and no
line holds a raw control or format character."""

from __future__ import annotations

import asyncio
import json
import unicodedata
from collections.abc import Callable
from urllib.parse import quote

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.reliability.support import API_KEY, ServeProcess

# ESC sequences that move the cursor and erase a line, VT, FF, BS, DEL, NEL, the line and
# paragraph separators, bidi overrides and isolates, zero-width characters, a BOM, a tag char.
NASTY = (
    "\x1b[1A\x1b[2K\x0b\x0c\x08\x7f\x85\x9b\u2028\u2029\u202e\u2066\u2069\u200b\u200d\ufeff"
    "\U000e0041\r\n\t"
)
KEY_SPELLINGS = ["Token", "TOKEN", "tok%65n", "%74oken", "t%6Fken", "token"]
UNSAFE = {"Cc", "Cf", "Zl", "Zp", "Cs"}


def raw_unsafe(text: str) -> list[str]:
    """Control and format characters in the log output itself (newlines end lines, fine)."""
    return sorted(
        {f"U+{ord(c):04X}" for c in text if c != "\n" and unicodedata.category(c) in UNSAFE}
    )


async def provoke(server: ServeProcess) -> None:
    base = f"ws://127.0.0.1:{server.port}/ws"
    for name in KEY_SPELLINGS:
        for url in (f"{base}?{name}={API_KEY}", f"{base}?x=1&{name}={API_KEY}"):
            try:
                ws = await websockets.connect(url)
            except InvalidStatus:
                continue
            await ws.close()
    with pytest.raises(InvalidStatus):
        await websockets.connect(
            f"{base}?token={API_KEY}x", additional_headers={"X-Api-Key": API_KEY}
        )
    device_id = f"evil{NASTY}dev"
    async with websockets.connect(f"{base}?token={API_KEY}") as ws:
        await ws.send(
            json.dumps(
                {
                    "type": "register",
                    "status": "ok",
                    "client_type": "device",
                    "client_id": device_id,
                    "metadata": {"platform": f"linux{NASTY}"},
                }
            )
        )
        assert json.loads(await ws.recv())["status"] == "ok"
        await ws.send(
            json.dumps(
                {"type": "error", "status": "error", "client_id": device_id, "error": f"x{NASTY}y"}
            )
        )
        await ws.send(json.dumps({"type": "heartbeat", "status": "ok", "client_id": f"o{NASTY}"}))
        await asyncio.wait_for(ws.recv(), 10)
    async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        for name in KEY_SPELLINGS:
            await http.get(f"/api/health?{name}={API_KEY}", headers={"X-API-Key": API_KEY})
            await http.get(f"/healthz?{name}={quote(API_KEY)}")
        await http.get("/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
        await http.get(f"/api/devices/{quote(device_id, safe='')}", headers={"X-API-Key": API_KEY})


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_key_and_no_raw_control_character_in_any_log_line(
    serve: Callable[..., ServeProcess], log_format: str
) -> None:
    """At DEBUG, every refused and accepted spelling of the key parameter, plus headers,
    leaves no trace of the key; client text with ESC, NEL, U+2028, bidi controls is escaped."""
    server = serve(env={"CCM_LOGGING_FORMAT": log_format}, log_level="DEBUG")
    asyncio.run(provoke(server))
    server.stop()
    log = server.log()
    assert "client registered" in log  # the lines in question were written
    assert "client reported error" in log
    for secret in (API_KEY, quote(API_KEY), API_KEY.lower(), API_KEY.upper()):
        assert secret not in log
    assert raw_unsafe(log) == []
    escaped = r"\x1b[1A\x1b[2K\x0b\x0c\x08\x7f\x85\x9b\u2028\u2029\u202e"
    if log_format == "text":
        assert escaped in log
    else:  # escaped the JSON way: every line parses back to the text the client sent
        entries = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        assert any(f"evil{NASTY}dev" in entry["message"] for entry in entries)
