"""Building blocks of the server scenarios in tests/server: clients that register and check the
confirmation, the frames they send, what they must receive, and the SQL rows a flow leaves
behind. Clients come from `open_client`, so the scenario's `run` closes them, pass or fail.

A flow test checks the frames the clients see and the SQL rows (clients, connections, sessions)
the flow must leave behind. A refusal test (an attack class of the AIP reference) proves the
refusal and that the refused frame or request had no effect: on the registry, on other clients,
in SQL.

"Receives nothing" is checked without sleeping (`assert_quiet`): a client sends a HEARTBEAT and
the ack must be the next frame it reads. Frames of one connection are handled in order and each
peer's outbox is FIFO, so anything queued for it earlier would arrive first.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest
from sqlalchemy import Engine, Table, func, select
from websockets.exceptions import ConnectionClosed

from ccm.store.models import clients
from ccm.store.repository import (
    ConnectionRow,
    SessionRow,
    read_connection_history,
    read_sessions,
)
from tests.server.support import AipClient, ServerThread, open_client
from tests.support import wait_until

SERVER_FIELDS = [
    "type",
    "status",
    "user_request",
    "agent_name",
    "process_name",
    "root_name",
    "actions",
    "messages",
    "error",
    "session_id",
    "task_name",
    "timestamp",
    "response_id",
    "result",
]
SYSTEM_INFO: dict[str, Any] = {
    "os_version": "10.0.22631",
    "cpu_count": 16,
    "memory_total_gb": 31.73,
    "hostname": "LAB-PC-07",
    "ip_address": "10.20.0.17",
    "supported_features": ["gui", "cli"],
    "platform_type": "computer",
    "schema_version": "1.0",
    "custom_metadata": {},
}
ODD_SESSION_ID = "nightly@task_3/ü"
PLAN = json.dumps([{"tool_name": "echo", "parameters": {}, "tool_type": "action"}])

LIST_TOOLS = {
    "tool_name": "list_tools",
    "parameters": {"tool_type": "action"},
    "tool_type": "data_collection",
}
CLICK = {"tool_name": "click_input", "parameters": {"id": "12"}, "tool_type": "action"}


# -- clients that register -------------------------------------------------------------------------


async def device(server: ServerThread, client_id: str, **kwargs: Any) -> AipClient:
    client = await open_client(server)
    assert_ok_frame(await client.register_device(client_id, **SYSTEM_INFO, **kwargs))
    return client


async def constellation(server: ServerThread, client_id: str, target_id: str | None) -> AipClient:
    client = await open_client(server)
    assert_ok_frame(await client.register_constellation(client_id, target_id))
    return client


async def connect_device(server: ServerThread, client_id: str, **kwargs: Any) -> AipClient:
    client = await open_client(server)
    reply = await client.register_device(client_id, **kwargs)
    assert (reply["type"], reply["status"]) == ("heartbeat", "ok"), reply
    return client


async def connect_constellation(
    server: ServerThread, client_id: str, target_id: str | None
) -> AipClient:
    client = await open_client(server)
    reply = await client.register_constellation(client_id, target_id)
    assert (reply["type"], reply["status"]) == ("heartbeat", "ok"), reply
    return client


# -- frames a client sends -------------------------------------------------------------------------


async def send_task(
    client: AipClient,
    target_id: str | None,
    session_id: str | None,
    request: str = PLAN,
    task_name: str | None = "task",
    **fields: Any,
) -> None:
    """A constellation's TASK from `client`; `fields` override any field (a spoofed role or id)."""
    frame: dict[str, Any] = {
        "type": "task",
        "status": "continue",
        "client_type": "constellation",
        "client_id": client.client_id,
        "target_id": target_id,
        "session_id": session_id,
        "task_name": task_name,
        "request": request,
    }
    frame.update(fields)
    await client.send(**frame)


async def answer_command(
    client: AipClient, command: dict[str, Any], results: list[dict[str, Any]]
) -> None:
    """COMMAND_RESULTS as the stock device builds them: one Result per action, call_ids copied."""
    action_results = [
        {**result, "call_id": action["call_id"]}
        for action, result in zip(command["actions"], results, strict=True)
    ]
    await client.send(
        type="command_results",
        status=command["status"],
        client_id=client.client_id,
        session_id=command["session_id"],
        prev_response_id=command["response_id"],
        action_results=action_results,
        request_id=str(uuid.uuid4()),
    )


async def answer(device: AipClient, command: dict[str, Any], result: Any) -> None:
    """COMMAND_RESULTS as a stock device sends them: one success per action, call ids copied."""
    await device.send(
        type="command_results",
        status=command["status"],
        client_id=device.client_id,
        session_id=command["session_id"],
        prev_response_id=command["response_id"],
        action_results=[
            {"status": "success", "result": result, "call_id": action["call_id"]}
            for action in command["actions"]
        ],
    )


def success(result: Any, namespace: str = "UICollector") -> dict[str, Any]:
    return {"status": "success", "error": None, "result": result, "namespace": namespace}


def plan(*calls: dict[str, Any]) -> str:
    return json.dumps(list(calls))


# -- what a client must receive --------------------------------------------------------------------


def assert_full_frame(message: dict[str, Any]) -> None:
    """Every ServerMessage field is present, in UFO's order; the timestamp uses `+00:00`."""
    assert list(message) == SERVER_FIELDS
    assert message["timestamp"].endswith("+00:00")
    assert message["response_id"]


def assert_ok_frame(message: dict[str, Any], session_id: str | None = None) -> None:
    """heartbeat/ok: confirmation, heartbeat ack or task ACK (decision D1); nothing else set."""
    assert_full_frame(message)
    assert (message["type"], message["status"]) == ("heartbeat", "ok")
    assert message["session_id"] == session_id
    unset = set(SERVER_FIELDS) - {"type", "status", "session_id", "timestamp", "response_id"}
    assert {key: message[key] for key in unset} == dict.fromkeys(unset)


async def closed_with(client: AipClient, timeout: float = 10) -> tuple[int | None, str | None]:
    """Wait (bounded) until the server closes the socket; its close code and reason."""
    await asyncio.wait_for(client.ws.wait_closed(), timeout)
    return client.ws.close_code, client.ws.close_reason


async def assert_quiet(*clients: AipClient) -> None:
    """Nothing is queued for each client: the ack of a fresh HEARTBEAT is the next frame."""
    for client in clients:
        await client.send(type="heartbeat", client_id=client.client_id)
        reply = await client.recv()
        assert (reply["type"], reply["status"], reply["session_id"]) == (
            "heartbeat",
            "ok",
            None,
        ), reply


async def expect_error(client: AipClient, text: str) -> dict[str, Any]:
    reply = await client.recv()
    assert (reply["type"], reply["status"]) == ("error", "error"), reply
    assert text in reply["error"], reply
    assert reply["session_id"] is None
    assert reply["result"] is None
    return reply


async def expect_refused_task(client: AipClient, session_id: str, text: str) -> None:
    """ERROR, then (decision D4) TASK_END failed for the session, without any result."""
    await expect_error(client, text)
    end = await client.recv()
    assert (end["type"], end["status"], end["session_id"]) == ("task_end", "failed", session_id)
    assert text in end["error"]
    assert end["result"] is None


async def expect_close(client: AipClient) -> int:
    """The server closes the connection; returns the close code the client received."""
    with pytest.raises(ConnectionClosed) as info:
        await client.recv()
    assert info.value.rcvd is not None, "the server did not send a close frame"
    return info.value.rcvd.code


# -- rows in SQL -----------------------------------------------------------------------------------


def engine_of(server: ServerThread) -> Engine:
    engine: Engine = server.app.state.store.engine
    return engine


def session_rows(server: ServerThread, session_id: str) -> list[SessionRow]:
    server.flush()
    return read_sessions(engine_of(server), session_id=session_id)


def one_session(server: ServerThread, session_id: str) -> SessionRow:
    rows = session_rows(server, session_id)
    assert len(rows) == 1, rows
    return rows[0]


def connection_rows(server: ServerThread, client_id: str) -> list[ConnectionRow]:
    """Connections of a client, oldest first."""
    server.flush()
    return sorted(
        read_connection_history(engine_of(server), client_id), key=lambda r: r.connected_at
    )


def closed_connection(server: ServerThread, client_id: str) -> ConnectionRow:
    """The client's only connection row, once the server has recorded its end."""

    def closed() -> ConnectionRow | None:
        rows = connection_rows(server, client_id)
        return rows[0] if len(rows) == 1 and rows[0].disconnected_at is not None else None

    row: ConnectionRow = wait_until(closed, what=f"closed connection row of {client_id}")
    return row


def client_row(server: ServerThread, client_id: str) -> dict[str, Any]:
    server.flush()
    with engine_of(server).connect() as conn:
        row = conn.execute(select(clients).where(clients.c.client_id == client_id)).one()
    return dict(row._mapping)


async def sessions_in_sql(server: ServerThread, **filters: Any) -> list[SessionRow]:
    await asyncio.to_thread(server.flush)
    return read_sessions(server.app.state.store.engine, **filters)


async def connections_in_sql(server: ServerThread, client_id: str) -> list[ConnectionRow]:
    await asyncio.to_thread(server.flush)
    return read_connection_history(server.app.state.store.engine, client_id)


async def count_rows(server: ServerThread, table: Table) -> int:
    await asyncio.to_thread(server.flush)
    with server.app.state.store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())
