"""Profile evidence for RESULTS.md: py-spy samples of the ccm server under the relay load.

py-spy is not a project dependency: install it into the venv (`.venv/bin/pip install py-spy`).
Without it this step is skipped and RESULTS.md says so. Sampling is `--gil` (only the thread
holding the GIL), so the shares are of the Python CPU time that bounds one process.
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.benchmarks.common import Child, log, start_ccm


def py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def _label(frame: str) -> str:
    """`function (path/file.py:line)` -> `function (file.py)`."""
    name, _, where = frame.partition(" (")
    filename = where.rsplit("/", 1)[-1].split(":", 1)[0]
    return f"{name} ({filename})" if filename else name


# Where a sample's time goes: the leaf-most frame that matches decides (so logging called from the
# hub counts as logging). Matched on "function (path:line)" as py-spy writes it.
CATEGORIES: list[tuple[str, tuple[str, ...]]] = [
    (
        "logging (stdlib handler, ccm filters/formatter)",
        ("logging/__init__.py", "ccm/logs.py", "RedactTokens", "redact ("),
    ),
    ("metrics (prometheus_client)", ("prometheus_client/",)),
    ("store writer thread (SQLAlchemy, sqlite3/psycopg)", ("StoreWriter._run", "sqlalchemy/")),
    (
        "durable-point plumbing (futures, barriers)",
        (
            "StoreWriter.durable",
            "StoreWriter.flush",
            "Hub._durable",
            "CommitWaits.durable",
            "concurrent/futures",
            "futures.py",
            "GroupCommit",
        ),
    ),
    (
        "frame send (starlette -> uvicorn -> websockets)",
        (
            "Peer._send_queued",
            "WebSocket.send",
            "websockets/frames.py",
            "WebSocketsSansIOProtocol.send",
        ),
    ),
    (
        "frame receive + JSON/pydantic parse",
        (
            "_receive_text",
            "WebSocket.receive",
            "decode_client_message",
            "pydantic",
            "json/decoder.py",
            "data_received",
            "handle_events",
            "websockets/protocol.py",
            "websockets/streams.py",
            "frames.py",
        ),
    ),
    (
        "frame build (protocol.server_frame: JSON, uuid, time)",
        ("server_frame", "json/encoder.py", "uuid.py", "ccm/ids.py"),
    ),
    ("asyncio tasks/timers/queues", ("asyncio/",)),
    (
        "ccm logic (hub, sessions, registry, peer)",
        (
            "ccm/server/hub.py",
            "ccm/sessions.py",
            "ccm/registry.py",
            "ccm/server/peer.py",
            "ccm/store/repository.py",
            "ccm/clock.py",
            "ccm/server/ws.py",
        ),
    ),
]


def _label(frame: str) -> str:
    """`function (path/file.py:line)` -> `function (file.py)`."""
    name, _, where = frame.partition(" (")
    filename = where.rsplit("/", 1)[-1].split(":", 1)[0]
    return f"{name} ({filename})" if filename else name


def summarise(raw: Path, top: int = 15) -> dict[str, Any]:
    """Share of samples per category, and the top functions by self samples."""
    by_category: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[_label(frames[-1])] += n
        for frame in reversed(frames):
            hit = next((name for name, keys in CATEGORIES if any(k in frame for k in keys)), None)
            if hit is not None:
                by_category[hit] += n
                break
        else:
            by_category["event loop and other"] += n
    if not total:
        return {"samples": 0, "categories": [], "self": []}
    return {
        "samples": total,
        "categories": [(name, n / total) for name, n in by_category.most_common()],
        "self": [(name, n / total) for name, n in own.most_common(top)],
    }


def run(*, logs: Path, sqlite_url: str, seconds: float = 5.0) -> dict[str, Any]:
    """Profiles of the SQLite ccm server under the relay load and under the peer workload."""
    exe = py_spy()
    if exe is None:
        return {"skipped": "py-spy is not installed (.venv/bin/pip install py-spy)"}
    out: dict[str, Any] = {}
    for name, args in (
        ("relay", ["relay", "--duration", str(seconds + 3), "--warmup", "1"]),
        ("peer", ["peer", "--duration", str(seconds / 3 + 1)]),
    ):
        out[name] = _profile(exe, name, args, logs=logs, sqlite_url=sqlite_url, seconds=seconds)
    return out


def _profile(
    exe: str, name: str, args: list[str], *, logs: Path, sqlite_url: str, seconds: float
) -> dict[str, Any]:
    server = start_ccm(f"profile-{name}", logs, database_url=sqlite_url)
    lg = Child(
        [
            "-m",
            "tests.benchmarks.loadgen",
            args[0],
            "--url",
            server.url,
            *args[1:],
            "--prefix",
            f"prof{name}",
        ],
        log=logs / f"loadgen-profile-{name}.log",
    )
    raw = logs / f"profile-{name}-sqlite.txt"
    try:
        time.sleep(1.5)
        done = subprocess.run(
            [
                exe,
                "record",
                "--pid",
                str(server.pid),
                "--duration",
                str(int(seconds)),
                "--rate",
                "250",
                "--gil",
                "--format",
                "raw",
                "--output",
                str(raw),
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
        lg.read_json(120)
    finally:
        lg.stop()
        server.stop()
    if done.returncode != 0 or not raw.exists():
        log(f"py-spy failed: {done.stderr.strip()[-300:]}")
        return {"skipped": f"py-spy failed: {done.stderr.strip()[-200:]}"}
    return summarise(raw)
