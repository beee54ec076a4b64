"""One AIP client in its own process, for a test to freeze with SIGSTOP (a half-open
connection: the socket stays, nothing is sent or read).

    python -m tests.reliability.stoppable PORT device ID
    python -m tests.reliability.stoppable PORT constellation ID TARGET

A device registers in relay mode and never answers its tasks; a constellation registers for
TARGET and sends one task. Both send a heartbeat every 0.5 s. Every event is printed as one
JSON line (with the wall-clock time) and flushed, so what was sent before the freeze is known.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from tests.reliability.support import RawWs


def say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "t": time.time(), **fields}), flush=True)


async def main(port: int, role: str, client_id: str, target: str | None) -> None:
    ws = await RawWs.connect(port)
    if role == "device":
        reply = await ws.register(client_id, metadata={"ccm_execution": "relay"})
    else:
        reply = await ws.register(client_id, client_type="constellation", target_id=target)
    say("registered", status=reply.get("status"))
    if role == "constellation":
        await ws.send_json(
            type="task",
            status="continue",
            client_type="constellation",
            client_id=client_id,
            target_id=target,
            session_id=f"{client_id}/frozen-task",
            request="never answered",
        )
    kind = "constellation" if role == "constellation" else "device"

    async def beat() -> None:
        for _ in range(1200):  # bounded: 10 minutes at most
            await ws.send_json(type="heartbeat", client_id=client_id, client_type=kind)
            say("heartbeat")
            await asyncio.sleep(0.5)

    async def read() -> None:
        while True:
            frame = await ws.recv_json(600)
            say("frame", type=frame.get("type"), session_id=frame.get("session_id"))

    await asyncio.gather(beat(), read())


if __name__ == "__main__":
    asyncio.run(
        main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
    )
