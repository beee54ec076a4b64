"""The baseline for (3) and (4): the obvious server the seed describes, and nothing more.

FastAPI + uvicorn, one `/ws` endpoint, the seed's ClientConnectionManager (a dict of ClientInfo
under one threading.Lock, see registry_bench.SeedRegistry), in memory only. It speaks the same
AIP frames as ccm for what the peer workload uses (REGISTER and its confirmation, HEARTBEAT and
its ack, DEVICE_INFO_REQUEST and its response), parsed with the AIP pydantic model as UFO's server
does, each reply written straight to the socket. No history, no auth beyond the token, no limits.

    python -m tests.benchmarks.seed_server --port P
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from ccm.domain import ClientType
from ccm.protocol import ClientMessage
from tests.benchmarks.common import API_KEY, raise_nofile_limit
from tests.benchmarks.registry_bench import SeedRegistry

logger = logging.getLogger("seed")


def server_message(type_: str, status: str, **fields: Any) -> str:
    """A ServerMessage with every field, as UFO sends it."""
    return json.dumps(
        {
            "type": type_,
            "status": status,
            "user_request": None,
            "agent_name": None,
            "process_name": None,
            "root_name": None,
            "actions": None,
            "messages": None,
            "error": fields.get("error"),
            "session_id": fields.get("session_id"),
            "task_name": None,
            "timestamp": datetime.now(UTC).isoformat(),
            "response_id": fields.get("response_id") or str(uuid.uuid4()),
            "result": fields.get("result"),
        },
        separators=(",", ":"),
    )


def create_app() -> FastAPI:
    app = FastAPI()
    registry = SeedRegistry()

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        if websocket.query_params.get("token") != API_KEY:
            await websocket.close(code=1008)
            return
        await websocket.accept()
        first = ClientMessage.model_validate_json(await websocket.receive_text())
        client_id = first.client_id or ""
        client_type = ClientType(first.client_type.value)
        metadata = first.metadata or {}
        registry.add_client(
            client_id, metadata.get("platform", "windows"), websocket, client_type, metadata
        )
        logger.info("Registered client %s (%s)", client_id, client_type.value)
        await websocket.send_text(server_message("heartbeat", "ok"))
        try:
            while True:
                msg = ClientMessage.model_validate_json(await websocket.receive_text())
                if msg.type.value == "heartbeat":
                    await websocket.send_text(server_message("heartbeat", "ok"))
                elif msg.type.value == "device_info_request":
                    with registry.lock:
                        info = registry.online_clients.get(msg.target_id or "")
                        system_info = info.system_info if info else None
                    result = system_info or {
                        "error": f"Device {msg.target_id} not found or no system info available"
                    }
                    await websocket.send_text(
                        server_message(
                            "device_info_response", "ok", result=result, response_id=msg.request_id
                        )
                    )
                else:
                    await websocket.send_text(
                        server_message("error", "error", error=f"Unknown message type: {msg.type}")
                    )
        except WebSocketDisconnect:
            pass
        finally:
            with registry.lock:
                registry.online_clients.pop(client_id, None)
            logger.info("Removed client %s", client_id)

    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    raise_nofile_limit()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    print(json.dumps({"pid": os.getpid()}), flush=True)
    uvicorn.run(
        create_app(),
        host="127.0.0.1",
        port=args.port,
        log_config=None,
        ws_per_message_deflate=False,
        server_header=False,
    )


if __name__ == "__main__":
    main()
