"""A real `ccm serve` process: SIGTERM closes every client with 1001 and records `server_shutdown`;
a server killed with connections open has them closed as `server_restart` by the next start."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, select
from websockets.exceptions import ConnectionClosed

from ccm.store.engine import make_engine
from ccm.store.models import clients, server_runs
from ccm.store.repository import ConnectionRow, SessionRow, read_connection_history, read_sessions
from tests.server.support import API_KEY, AipClient, run, track
from tests.support import free_port

CCM = Path(sys.executable).parent / "ccm"
START_TIMEOUT = 30.0
EXIT_TIMEOUT = 20.0
LEASE_SECONDS = 2.0


def wait_until(condition: Callable[[], Any], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


class ServeProcess:
    """`ccm serve` in a subprocess on a free port, its output in a log file under `workdir`."""

    def __init__(self, database_url: str, workdir: Path, name: str) -> None:
        self.port = free_port()
        self.log_path = workdir / f"{name}.log"
        env = {
            **os.environ,
            "CCM_DATA_DIR": str(workdir / "data"),
            "CCM_CLEANUP_ENABLED": "false",
            "CCM_CLUSTER_LEASE": f"{LEASE_SECONDS}s",  # PostgreSQL: a killed node is reaped soon
        }
        env.pop("CCM_CONFIG", None)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    str(CCM),
                    "serve",
                    "--port",
                    str(self.port),
                    "--api-key",
                    API_KEY,
                    "--database-url",
                    database_url,
                ],
                cwd=workdir,  # no config/ccm.yaml here: defaults plus the environment
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws?token={API_KEY}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self) -> ServeProcess:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"ccm serve exited with {self.process.returncode}:\n{self.log()}"
                )
            try:
                reply = httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1)
                if reply.status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"ccm serve not healthy within {START_TIMEOUT} s:\n{self.log()}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(EXIT_TIMEOUT)


@pytest.fixture
def serve(database_url: str, tmp_path: Path) -> Iterator[Callable[[], ServeProcess]]:
    """Start `ccm serve` processes on the test database; any still running is killed at the end."""
    started: list[ServeProcess] = []

    def start() -> ServeProcess:
        process = ServeProcess(database_url, tmp_path, f"serve{len(started)}")
        started.append(process)
        return process.wait_healthy()

    yield start
    for process in started:
        process.stop()


@pytest.fixture
def db(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


def only_connection(engine: Engine, client_id: str) -> ConnectionRow:
    [row] = read_connection_history(engine, client_id)
    return row


def only_session(engine: Engine, session_id: str) -> SessionRow:
    [row] = read_sessions(engine, session_id=session_id)
    return row


def online_flags(engine: Engine) -> dict[str, bool]:
    with engine.connect() as conn:
        return {row.client_id: row.online for row in conn.execute(select(clients))}


async def start_relay_session(ws_url: str, session_id: str) -> tuple[AipClient, AipClient]:
    """A relay device and its constellation with one acknowledged, running session."""
    device = track(await AipClient.connect(ws_url))
    assert (await device.register_device("lab-pc-07", relay=True))["status"] == "ok"
    con = track(await AipClient.connect(ws_url))
    assert (await con.register_constellation("nightly@lab-pc-07", "lab-pc-07"))["status"] == "ok"
    await con.send(
        type="task",
        status="continue",
        client_type="constellation",
        client_id="nightly@lab-pc-07",
        target_id="lab-pc-07",
        session_id=session_id,
        task_name="galaxy/nightly/task_3",
        request="Long job.",
    )
    ack = await con.recv()
    assert (ack["type"], ack["session_id"]) == ("heartbeat", session_id)  # durable from here on
    assignment = await device.recv()
    assert (assignment["type"], assignment["session_id"]) == ("task", session_id)
    return device, con


async def frames_until_closed(client: AipClient, timeout: float = 15) -> list[dict[str, Any]]:
    """Every frame the client receives until the server closes the connection (bounded)."""
    frames: list[dict[str, Any]] = []
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = deadline - asyncio.get_running_loop().time()
        try:
            frames.append(await client.recv(max(left, 0.01)))
        except ConnectionClosed:
            return frames


def test_sigterm_closes_clients_with_1001_and_records_shutdown(
    serve: Callable[[], ServeProcess], db: Engine
) -> None:
    """SIGTERM: owners told, both sockets closed 1001, exit 0, SQL says server_shutdown."""
    server = serve()
    session_id = "nightly@task_3/ü"

    async def scenario() -> dict[str, Any]:
        device, con = await start_relay_session(server.ws_url, session_id)
        server.process.send_signal(signal.SIGTERM)
        device_frames, con_frames = await asyncio.gather(
            frames_until_closed(device), frames_until_closed(con)
        )
        return {
            "device": (device_frames, device.ws.close_code),
            "constellation": (con_frames, con.ws.close_code),
        }

    seen = run(scenario())
    returncode = server.process.wait(EXIT_TIMEOUT)
    assert returncode == 0, server.log()
    for frames, code in seen.values():
        assert code == 1001
        [end] = frames
        assert (end["type"], end["status"], end["session_id"]) == ("task_end", "failed", session_id)
        assert end["error"] == "the server is shutting down"

    for client_id in ("lab-pc-07", "nightly@lab-pc-07"):
        row = only_connection(db, client_id)
        assert row.disconnected_at is not None
        assert row.disconnect_reason == "server_shutdown"
    session = only_session(db, session_id)
    assert (session.state, session.reason) == ("interrupted", "server_shutdown")
    assert session.ended_at is not None
    assert online_flags(db) == {"lab-pc-07": False, "nightly@lab-pc-07": False}
    with db.connect() as conn:
        stopped = conn.execute(select(server_runs.c.stopped_at)).scalars().all()
    assert len(stopped) == 1
    assert stopped[0] is not None


def test_restart_closes_connections_left_open_by_a_killed_server(
    serve: Callable[[], ServeProcess], db: Engine
) -> None:
    """After SIGKILL, the next start closes leftover connections and sessions: at once on SQLite
    (`server_restart`, one server per file), on PostgreSQL once the killed node's lease has
    expired (`node_lost`: a starting node never touches a live node's rows)."""
    first = serve()
    session_id = "nightly@task_4"

    async def connect_and_kill() -> None:
        device, con = await start_relay_session(first.ws_url, session_id)
        first.process.kill()
        await asyncio.gather(frames_until_closed(device), frames_until_closed(con))

    run(connect_and_kill())
    assert first.process.wait(EXIT_TIMEOUT) == -signal.SIGKILL
    assert only_connection(db, "lab-pc-07").disconnected_at is None  # what the kill left behind
    assert only_session(db, session_id).state == "running"

    second = serve()  # healthy means the start-up recovery has run
    if db.dialect.name == "postgresql":
        reason, state = "node_lost", "failed"
        wait_until(
            lambda: only_session(db, session_id).state != "running",
            timeout=LEASE_SECONDS * 4 + 5,
            what="the killed node's session ended by its reaper",
        )
    else:
        reason, state = "server_restart", "interrupted"
    for client_id in ("lab-pc-07", "nightly@lab-pc-07"):
        row = only_connection(db, client_id)
        assert row.disconnected_at is not None
        assert row.disconnect_reason == reason
    session = only_session(db, session_id)
    assert (session.state, session.reason) == (state, reason)
    assert online_flags(db) == {"lab-pc-07": False, "nightly@lab-pc-07": False}

    second.process.send_signal(signal.SIGTERM)
    assert second.process.wait(EXIT_TIMEOUT) == 0, second.log()
