"""Shared pieces of the benchmark suite: figures (median with min-max), the machine, processes.

Nothing here is a test. Figures are medians of repeats taken in one run, because the machine is
shared and noisy: a ratio of two medians from the same run means more than any absolute number.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
API_KEY = "bench-key-0123456789abcdef"
DEFAULT_POSTGRES_URL = os.environ.get(
    "CCM_BENCH_POSTGRES_URL",
    os.environ.get("CCM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"),
)


# -- figures -----------------------------------------------------------------------------------


@dataclass
class Figure:
    """One measured quantity over repeats: shown as `median (min-max)`."""

    samples: list[float] = field(default_factory=list)
    unit: str = ""

    def add(self, value: float) -> None:
        self.samples.append(float(value))

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    @property
    def low(self) -> float:
        return min(self.samples) if self.samples else float("nan")

    @property
    def high(self) -> float:
        return max(self.samples) if self.samples else float("nan")

    def show(self, digits: int | None = None) -> str:
        if not self.samples:
            return "n/a"
        med, lo, hi = self.median, self.low, self.high
        if len(self.samples) == 1:
            return f"{fmt(med, digits)} {self.unit}".strip()
        return f"{fmt(med, digits)} ({fmt(lo, digits)}–{fmt(hi, digits)}) {self.unit}".strip()

    def as_dict(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "min": self.low,
            "max": self.high,
            "n": len(self.samples),
            "unit": self.unit,
            "samples": self.samples,
        }


def fmt(value: float, digits: int | None = None) -> str:
    """Readable number: thousands separators, few decimals for small values."""
    if value != value:  # NaN
        return "n/a"
    if digits is not None:
        return f"{value:,.{digits}f}"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:,.1f}"
    if magnitude >= 1:
        return f"{value:,.2f}"
    return f"{value:,.3f}"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


@dataclass
class Row:
    """One line of the results table: a figure, optionally a ratio and a target verdict."""

    section: str
    name: str
    value: str
    ratio: str = ""
    target: str = ""
    met: bool | None = None
    note: str = ""

    @property
    def verdict(self) -> str:
        return "" if self.met is None else ("met" if self.met else "MISSED")


# -- the machine and this process ---------------------------------------------------------------


def raise_nofile_limit() -> int:
    """Raise the soft open-files limit to the hard one (both processes hold 10k sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem_kb = int(line.split()[1])
    load = os.getloadavg()
    versions: dict[str, str] = {}
    for name in (
        "uvicorn",
        "websockets",
        "fastapi",
        "starlette",
        "sqlalchemy",
        "psycopg",
        "uvloop",
    ):
        try:
            from importlib.metadata import version

            versions[name] = version(name)
        except Exception:
            versions[name] = "?"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_at_start": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "versions": versions,
    }


# -- /proc readings of another process -----------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads)."""
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """User + system CPU time of one thread of a process (the main thread: tid == pid)."""
    with open(f"/proc/{pid}/task/{tid}/stat", encoding="utf-8") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm", encoding="utf-8") as f:
        return int(f.read().split()[1]) * _PAGE


# -- child processes -----------------------------------------------------------------------------


class Child:
    """A child Python process of this suite (a server or a load generator)."""

    def __init__(
        self, args: list[str], *, log: Path | None = None, env: dict[str, str] | None = None
    ):
        self.log = log
        out = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - kept open for the child's lifetime
        self.proc = subprocess.Popen(
            [PYTHON, *args],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=out,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
        )
        if log is not None:
            out.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read_json(self, timeout: float = 120) -> dict[str, Any]:
        """The next JSON line the child prints (children print one per phase)."""
        import select

        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"child {self.proc.args[1:3]} printed nothing in {timeout} s")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if not ready:
                continue
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"child {self.proc.args[1:3]} ended: {self.tail()}")
            text = line.decode().strip()
            if text.startswith("{"):
                return dict(json.loads(text))

    def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM (a graceful stop for servers), then SIGKILL if it does not end."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def tail(self, lines: int = 15) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def wait_for_port(port: int, child: Child, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            raise RuntimeError(f"server exited with {child.proc.returncode}:\n{child.tail()}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"server did not listen on {port}:\n{child.tail()}")


# -- databases -----------------------------------------------------------------------------------


def sqlite_database(folder: Path, name: str = "ccm.db") -> str:
    from ccm.store import migrate

    path = folder / name
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    url = f"sqlite:///{path}"
    migrate.upgrade(url)
    return url


def log(message: str) -> None:
    """Progress on stderr, so stdout keeps only the table."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# -- servers under test --------------------------------------------------------------------------


@dataclass
class Server:
    """A server child process on a loopback port."""

    name: str
    child: Child
    port: int

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws?token={API_KEY}"

    @property
    def pid(self) -> int:
        return self.child.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def loop_cpu(self) -> float:
        """CPU time of the main thread, where uvicorn runs the event loop."""
        return thread_cpu_seconds(self.pid, self.pid)

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def stop(self) -> None:
        self.child.stop()


def start_ccm(
    name: str,
    logs: Path,
    *,
    database_url: str | None = None,
    memory: bool = False,
    extra: Sequence[str] = (),
) -> Server:
    """ccm as `ccm serve` runs it (INFO logs to a file), on SQLite/Postgres or in memory."""
    port = free_port()
    args = ["-m", "tests.benchmarks.server_proc", "--port", str(port), *extra]
    args += ["--memory"] if memory else ["--database-url", str(database_url)]
    child = Child(args, log=logs / f"server-{name}.log")
    wait_for_port(port, child)
    return Server(name, child, port)


def start_seed(logs: Path) -> Server:
    port = free_port()
    child = Child(
        ["-m", "tests.benchmarks.seed_server", "--port", str(port)], log=logs / "server-seed.log"
    )
    wait_for_port(port, child)
    return Server("seed", child, port)


def loadgen(mode: str, url: str, logs: Path, *args: str, timeout: float = 180) -> dict[str, Any]:
    """Run the load generator to completion; its last JSON line."""
    child = Child(
        ["-m", "tests.benchmarks.loadgen", mode, "--url", url, *args],
        log=logs / f"loadgen-{mode}.log",
    )
    try:
        result = child.read_json(timeout)
        child.wait(30)
        return result
    finally:
        child.stop()
