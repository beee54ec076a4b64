"""Shared helpers of the fault suite: real `ccm serve` processes, the load generator process, a
TCP proxy in front of Postgres, a raw WebSocket client for hostile frames, SQL checks, and the
measurement file the report is built from.

Every wait here is bounded in time; every loop in count. Only loopback addresses are used.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self, TypeVar

import httpx
from sqlalchemy import Engine, func, make_url, select, text

from ccm.domain import FINISHED_STATES
from ccm.store.engine import make_engine
from ccm.store.models import clients, connections, sessions
from tests.support import free_port, wait_until

REPO = Path(__file__).resolve().parents[2]
CCM = Path(sys.executable).parent / "ccm"
API_KEY = "reliability-key-0123456789"
FULL = os.environ.get("CCM_RELIABILITY_FULL") == "1"
OUT_DIR = Path(os.environ.get("CCM_RELIABILITY_OUT") or REPO / "test-artifacts" / "reliability")
START_TIMEOUT = 40.0

T = TypeVar("T")


def scale(short: T, full: T) -> T:
    """The short figure by default (CI), the full one with CCM_RELIABILITY_FULL=1."""
    return full if FULL else short


def backend_of(database_url: str) -> str:
    return make_url(database_url).get_backend_name()


def record(scenario: str, backend: str, **figures: Any) -> None:
    """Append one measurement for the report (test-artifacts/ is never committed)."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    line = {"scenario": scenario, "backend": backend, "full": FULL, "at": time.time(), **figures}
    with (OUT_DIR / "measurements.jsonl").open("a", encoding="utf-8") as out:
        out.write(json.dumps(line, default=str) + "\n")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


# -- ccm serve ----------------------------------------------------------------------------------

# Log lines that mean the server failed to handle something: a traceback, or an ERROR/CRITICAL
# record (ccm logs what it could not handle at ERROR with its traceback, uvicorn likewise).
# Anchored at the start of a line: client text inside a message is not a record.
_PROBLEM = re.compile(r"^(Traceback|\S+ \S+ (ERROR|CRITICAL)\b)")


class ServeProcess:
    """`ccm serve` in a subprocess on a fixed loopback port, restartable on the same port.

    Settings come from CCM_* variables (`env`), the database from `database_url`; each start
    logs to its own file under `workdir`.
    """

    def __init__(
        self,
        database_url: str,
        workdir: Path,
        *,
        env: dict[str, str] | None = None,
        name: str = "serve",
        log_level: str = "WARNING",
        open_files: tuple[int, int] | None = None,
    ) -> None:
        self.database_url = database_url
        self.workdir = workdir
        self.port = free_port()
        self.name = name
        self.log_level = log_level
        self.open_files = open_files
        """(soft, hard) RLIMIT_NOFILE for the server process; None: inherited."""
        self.env = {
            **os.environ,
            # To check that a test fails without a fix: point this at an older tree of ccm.
            **(
                {"PYTHONPATH": old}
                if (old := os.environ.get("CCM_RELIABILITY_SERVER_PYTHONPATH"))
                else {}
            ),
            "CCM_DATA_DIR": str(workdir / "data"),
            "CCM_CLEANUP_ENABLED": "false",
            **(env or {}),
        }
        self.env.pop("CCM_CONFIG", None)
        self.process: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        self.starts = 0

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws?token={API_KEY}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> ServeProcess:
        assert self.process is None or self.process.poll() is not None, "already running"
        log_path = self.workdir / f"{self.name}{self.starts}.log"
        self.starts += 1
        self.logs.append(log_path)
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    str(CCM),
                    "serve",
                    "--port",
                    str(self.port),
                    "--api-key",
                    API_KEY,
                    "--database-url",
                    self.database_url,
                    "--log-level",
                    self.log_level,
                ],
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=self._limit_open_files if self.open_files else None,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"ccm serve exited with {self.process.returncode}:\n{self.log()}"
                )
            try:
                if httpx.get(f"{self.http_url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"ccm serve not healthy within {START_TIMEOUT} s:\n{self.log()}"
                )
            time.sleep(0.05)

    def _limit_open_files(self) -> None:
        assert self.open_files is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, self.open_files)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, exactly as in a crash."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(20)

    def terminate(self, timeout: float = 30) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def problems(self, *allowed: str) -> list[str]:
        """Log lines that show an unhandled error, minus the `allowed` regexes."""
        found = []
        for line in self.log().splitlines():
            if _PROBLEM.search(line) and not any(re.search(a, line) for a in allowed):
                found.append(line)
        return found

    # -- the process, seen from outside ------------------------------------------------------

    def rss_bytes(self) -> int:
        status = Path(f"/proc/{self.pid}/status").read_text()
        kb = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]
        return kb * 1024

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    # -- HTTP --------------------------------------------------------------------------------

    def get(self, path: str, timeout: float = 10, **params: Any) -> Any:
        reply = httpx.get(
            self.http_url + path, headers={"X-API-Key": API_KEY}, params=params, timeout=timeout
        )
        reply.raise_for_status()
        return reply.json()

    def post(self, path: str, body: Any, timeout: float = 30) -> httpx.Response:
        return httpx.post(
            self.http_url + path, headers={"X-API-Key": API_KEY}, json=body, timeout=timeout
        )

    def health(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/api/health")
        return result

    def online(self) -> set[str]:
        return set(self.get("/api/clients")["online_clients"])

    def wait_drained(self, timeout: float = 60) -> dict[str, Any]:
        """Until the writer's queue is empty and the database takes writes."""

        def drained() -> dict[str, Any] | None:
            health = self.health()
            db = health["database"]
            return health if db["queue_depth"] == 0 and not db["degraded"] else None

        return wait_until(drained, timeout, "the store writer to drain", interval=0.1)


# -- the load generator process -----------------------------------------------------------------


class LoadGen:
    """`python -m tests.reliability.loadgen` in its own process."""

    def __init__(self, ws_url: str, workdir: Path, name: str, **options: Any) -> None:
        self.out = workdir / f"{name}.json"
        self.progress_path = workdir / f"{name}.progress.json"
        self.log_path = workdir / f"{name}.log"
        args = [sys.executable, "-m", "tests.reliability.loadgen", "--url", ws_url]
        prefix = options.pop("prefix", name)  # client ids; two processes may share them
        args += ["--out", str(self.out), "--progress", str(self.progress_path), "--prefix", prefix]
        for key, value in options.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        self.result: dict[str, Any] | None = None

    def progress(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.progress_path.read_text())
            return data
        except (OSError, ValueError):
            return {}

    def wait(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str
    ) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            if self.process.poll() is not None:
                raise AssertionError(f"load generator exited early:\n{self.log()}")
            progress = self.progress()
            return progress if progress and predicate(progress) else None

        return wait_until(check, timeout, what)

    def stop(self, timeout: float = 40) -> dict[str, Any]:
        """SIGTERM (clean end: sessions drained, sockets closed with 1000), then the result."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout)
        assert self.process.returncode == 0, self.log()
        self.result = json.loads(self.out.read_text())
        return self.result

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(20)

    def pause(self) -> None:
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def latency_figures(
    result: dict[str, Any], since: float = 0.0, until: float = float("inf")
) -> dict[str, Any]:
    """p50/p99 of the load generator's samples that started and ended in [since, until)."""
    beats = [rtt for t, rtt in result["heartbeat_rtt"] if since <= t and t + rtt < until]
    runs = [rtt for t, rtt in result["session_rtt"] if since <= t and t + rtt < until]
    return {
        "heartbeat_samples": len(beats),
        "heartbeat_p50_ms": ms(percentile(beats, 50)),
        "heartbeat_p99_ms": ms(percentile(beats, 99)),
        "session_samples": len(runs),
        "session_p50_ms": ms(percentile(runs, 50)),
        "session_p99_ms": ms(percentile(runs, 99)),
    }


# -- TCP proxy in front of Postgres -------------------------------------------------------------


class Proxy:
    """`python -m tests.reliability.proxy` on a fixed port: kill it to take Postgres away."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Proxy:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.reliability.proxy",
                str(self.port),
                str(self.target_port),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        self.process.stdout.close()  # it prints nothing else
        assert b"proxy ready" in line, line
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def url_for(self, database_url: str) -> str:
        return (
            make_url(database_url)
            .set(host="127.0.0.1", port=self.port)
            .render_as_string(hide_password=False)
        )


# -- SQL checks ---------------------------------------------------------------------------------


def engine_for(database_url: str) -> Engine:
    return make_engine(database_url)


def integrity_check(engine: Engine) -> str:
    """SQLite: PRAGMA integrity_check ('ok' when sound). Postgres: every table scans cleanly."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            return str(conn.execute(text("PRAGMA integrity_check")).scalar())
        for table in ("clients", "connections", "sessions", "server_runs"):
            conn.execute(text(f"SELECT count(*) FROM {table}")).scalar()
    return "ok"


def session_rows(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """Every session row by wire session id."""
    rows: dict[str, list[dict[str, Any]]] = {}
    with engine.connect() as conn:
        for row in conn.execute(select(sessions)):
            rows.setdefault(row.session_id, []).append(dict(row._mapping))
    return rows


@dataclass
class Loss:
    """What SQL is missing of what clients were told (every figure must be 0)."""

    acked: int
    missing: int
    not_finished: int
    completed_told: int
    completed_lost: int
    duplicates: int

    @property
    def rows_lost(self) -> int:
        return self.missing + self.completed_lost


def check_sessions(engine: Engine, result: dict[str, Any], *, finished: bool = True) -> Loss:
    """Sessions a client got an ACK for exist in SQL (in a final state when `finished`); a
    task_end `completed` a client received is `completed` in SQL; no session id twice."""
    rows = session_rows(engine)
    told = result["sessions"]
    acked = [sid for sid, s in told.items() if s["acked"] is not None]
    missing = [sid for sid in acked if sid not in rows]
    final = {s.value for s in FINISHED_STATES}
    not_finished = [sid for sid in acked if sid in rows and rows[sid][-1]["state"] not in final]
    completed = [sid for sid, s in told.items() if s["status"] == "completed"]
    completed_lost = [
        sid for sid in completed if sid not in rows or rows[sid][-1]["state"] != "completed"
    ]
    duplicates = [sid for sid in told if len(rows.get(sid, ())) > 1]
    return Loss(
        acked=len(acked),
        missing=len(missing),
        not_finished=len(not_finished) if finished else 0,
        completed_told=len(completed),
        completed_lost=len(completed_lost),
        duplicates=len(duplicates),
    )


def read_connection_rows(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(connections)).all())


def open_connections(engine: Engine) -> dict[str, int]:
    """client_id -> number of connection rows still open."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(connections.c.client_id, func.count())
            .where(connections.c.disconnected_at.is_(None))
            .group_by(connections.c.client_id)
        ).all()
    return {client_id: count for client_id, count in rows}


def online_in_sql(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        return set(
            conn.execute(select(clients.c.client_id).where(clients.c.online.is_(True))).scalars()
        )


def connection_counts(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            select(connections.c.client_id, func.count()).group_by(connections.c.client_id)
        ).all()
    return {client_id: count for client_id, count in rows}


def disconnect_reasons(engine: Engine, **where: Any) -> dict[str | None, int]:
    query = select(connections.c.disconnect_reason, func.count()).group_by(
        connections.c.disconnect_reason
    )
    for column, value in where.items():
        query = query.where(connections.c[column] == value)
    with engine.connect() as conn:
        return {reason: count for reason, count in conn.execute(query).all()}


def registry_matches_sql(server: ServeProcess, engine: Engine) -> dict[str, Any]:
    """The live registry, `clients.online` and the open connection rows name the same ids,
    with exactly one open row each."""
    live = server.online()
    online = online_in_sql(engine)
    open_rows = open_connections(engine)
    return {
        "live": len(live),
        "registry_equals_sql": live == online == set(open_rows),
        "more_than_one_open_row": sorted(c for c, n in open_rows.items() if n > 1),
        "only_in_registry": sorted(live - online)[:10],
        "only_in_sql": sorted(online - live)[:10],
    }


# -- a raw WebSocket client, for frames no well-behaved library would send ----------------------


class Closed(Exception):
    """The server closed the connection; `code` is from its close frame (None: no close frame)."""

    def __init__(self, code: int | None, reason: str = "") -> None:
        super().__init__(f"closed {code} {reason}")
        self.code = code
        self.reason = reason


OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def _mask(data: bytes, key: bytes) -> bytes:
    if not data:
        return data
    n = len(data)
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(stream, "big")).to_bytes(n, "big")


class RawPool:
    """Opens RawWs connections and aborts every one still open when the block ends, whatever
    happened in it (no socket outlives its event loop)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.opened: list[RawWs] = []

    async def connect(self, **kw: Any) -> RawWs:
        ws = await RawWs.connect(self.port, **kw)
        self.opened.append(ws)
        return ws

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        for ws in self.opened:
            ws.abort()
        await asyncio.sleep(0)  # let the transports finish closing


class RawWs:
    """WebSocket client over a plain socket: sends any frame (invalid UTF-8, reserved opcodes,
    oversized), reads the server's frames and its close code. `rcvbuf` shrinks the socket's
    receive buffer, so a client that stops reading backs up the server quickly."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.close_code: int | None = None

    @classmethod
    async def connect(
        cls, port: int, token: str = API_KEY, *, rcvbuf: int | None = None, timeout: float = 10
    ) -> RawWs:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), timeout)
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 24)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        if not head.startswith(b"HTTP/1.1 101"):
            writer.close()
            raise ConnectionError(head.split(b"\r\n")[0].decode(errors="replace"))
        return cls(reader, writer)

    def send_frame(self, opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0) -> None:
        head = bytes([(0x80 if fin else 0) | (rsv << 4) | opcode])
        n = len(payload)
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        key = os.urandom(4)
        self.writer.write(head + key + _mask(payload, key))

    async def send(self, opcode: int, payload: bytes | str, **kw: Any) -> None:
        self.send_frame(opcode, payload.encode() if isinstance(payload, str) else payload, **kw)
        await self.writer.drain()

    async def send_json(self, **fields: Any) -> None:
        data = {"status": "ok", "client_type": "device", **fields}
        await self.send(OP_TEXT, json.dumps(data))

    async def _read_frame(self) -> tuple[int, bytes]:
        try:
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", await self.reader.readexactly(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
            payload = await self.reader.readexactly(n)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise Closed(self.close_code, "connection ended without a close frame") from exc
        return b0 & 0x0F, payload

    async def recv(self, timeout: float = 10) -> tuple[int, bytes]:
        """The next data frame; pings are answered; Closed on a close frame or EOF."""
        async with asyncio.timeout(timeout):
            while True:
                opcode, payload = await self._read_frame()
                if opcode == OP_PING:
                    await self.send(OP_PONG, payload)
                    continue
                if opcode == OP_PONG:  # the answer to a ping we sent
                    continue
                if opcode == OP_CLOSE:
                    code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
                    self.close_code = code
                    reason = payload[2:].decode(errors="replace")
                    try:
                        self.send_frame(OP_CLOSE, payload[:2])
                        await self.writer.drain()
                    except ConnectionError:
                        pass
                    self.abort()
                    raise Closed(code, reason)
                return opcode, payload

    async def recv_json(self, timeout: float = 10) -> dict[str, Any]:
        opcode, payload = await self.recv(timeout)
        assert opcode == OP_TEXT, f"server sent opcode {opcode}"
        data: dict[str, Any] = json.loads(payload)
        return data

    async def register(self, client_id: str, **fields: Any) -> dict[str, Any]:
        await self.send_json(type="register", client_id=client_id, **fields)
        return await self.recv_json()

    async def close(self, code: int = 1000) -> None:
        try:
            await self.send(OP_CLOSE, struct.pack("!H", code))
            async with asyncio.timeout(5):
                while True:
                    await self._read_frame()
        except (Closed, ConnectionError, TimeoutError):
            pass
        self.abort()

    def stop_reading(self) -> None:
        """Stop taking bytes off the socket: the kernel buffers fill and the server's sends
        back up, as with a client that hangs or is flooded."""
        self.writer.transport.pause_reading()

    def abort(self) -> None:
        transport = self.writer.transport
        if not transport.is_closing():
            transport.abort()
