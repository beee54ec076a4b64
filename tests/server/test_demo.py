"""The demo clients (`ccm demo-device`, `ccm demo-constellation`) against a real server, on SQLite
and Postgres: the round trips a README shows, and how they fail."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest
from sqlalchemy import Engine, select
from typer.testing import CliRunner

from ccm.cli import app
from ccm.demo import DemoError, run_actions, run_constellation, run_device
from ccm.domain import Mode
from ccm.server.runners import NO_RUNNER_ERROR
from ccm.store.models import sessions
from tests.server.support import API_KEY, ServerThread, free_port

PLAN = json.dumps(
    [
        {"tool_name": "echo", "parameters": {"text": "hi"}},
        {"tool_name": "add", "parameters": {"a": 2, "b": 3}},
    ]
)


class DemoDevice:
    """`run_device` in its own thread and event loop, so sync code (CliRunner) can talk to it."""

    def __init__(self, url: str, client_id: str = "demo-device", **options: Any) -> None:
        self.lines: list[str] = []
        self.error: BaseException | None = None
        self._registered = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(
            target=self._run, args=(url, client_id, options), daemon=True
        )

    def _record(self, line: str) -> None:
        self.lines.append(line)
        if line.startswith("registered"):
            self._registered.set()

    def _run(self, url: str, client_id: str, options: dict[str, Any]) -> None:
        device = run_device(url, client_id, stop=self._stop, on_event=self._record, **options)
        try:
            self._loop.run_until_complete(device)
        except BaseException as exc:
            self.error = exc
        finally:
            self._loop.close()

    def wait_for(self, prefix: str, timeout: float = 10) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next((line for line in self.lines if line.startswith(prefix)), None)
            if found is not None:
                return found
            time.sleep(0.02)
        raise AssertionError(f"no line starting {prefix!r} within {timeout} s: {self.lines}")

    def __enter__(self) -> DemoDevice:
        self._thread.start()
        if not self._registered.wait(10):
            raise AssertionError(f"demo device did not register: {self.lines} {self.error!r}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive(), "demo device did not stop"
        assert self.error is None, self.error


def constellation(server: ServerThread, request: str, **options: Any) -> dict[str, Any]:
    options.setdefault("task_timeout", 10)
    return asyncio.run(
        run_constellation(server.ws_url, "demo-constellation", "demo-device", request, **options)
    )


def session_row(server: ServerThread, engine: Engine, session_id: str) -> Any:
    server.flush()
    with engine.connect() as conn:
        return conn.execute(select(sessions).where(sessions.c.session_id == session_id)).one()


def test_tool_plan_round_trip_completes(server: ServerThread, engine: Engine) -> None:
    """An agent-mode demo device runs a JSON tool plan sent by the demo constellation."""
    with DemoDevice(server.ws_url) as device:
        end = constellation(server, PLAN)
        device.wait_for("task_end received")
    assert (end["type"], end["status"], end["error"]) == ("task_end", "completed", None)
    assert end["session_id"].startswith("demo-constellation@")
    assert [(r["tool_name"], r["status"], r["result"]) for r in end["result"]] == [
        ("echo", "success", {"text": "hi"}),
        ("add", "success", 5),
    ]
    assert sum(line.startswith("command received") for line in device.lines) == 2
    row = session_row(server, engine, end["session_id"])
    assert (row.state, row.mode, row.device_id, row.constellation_id) == (
        "completed",
        "agent",
        "demo-device",
        "demo-constellation@demo-device",
    )


def test_failed_tool_fails_session_and_skips_the_rest(server: ServerThread) -> None:
    """A failing tool fails the session; later calls in the same command come back skipped."""
    plan = json.dumps([[{"tool_name": "fail"}, {"tool_name": "echo"}]])
    with DemoDevice(server.ws_url):
        end = constellation(server, plan, session_id="demo-constellation@fail-1")
    assert (end["session_id"], end["status"]) == ("demo-constellation@fail-1", "failed")
    assert end["error"] == "tool call failed: the fail tool always fails"
    assert [r["status"] for r in end["result"]] == ["failure", "skipped"]


def test_relay_device_echoes_natural_language(server: ServerThread, engine: Engine) -> None:
    """A relay-mode demo device runs the task itself and reports it with a task_end."""
    with DemoDevice(server.ws_url, mode=Mode.RELAY, heartbeat=0.05) as device:
        end = constellation(server, "say hello")
        device.wait_for("task_end received")
    assert end["status"] == "completed"
    assert end["result"] == {"echo": "say hello", "handled_by": "demo-device"}
    assert device.wait_for("task received").endswith("'say hello' -> completed, task_end sent")
    assert not [line for line in device.lines if line.startswith("server error")]
    row = session_row(server, engine, end["session_id"])
    assert (row.state, row.mode, row.device_id) == ("completed", "relay", "demo-device")


def test_relay_device_runs_a_tool_plan_itself(server: ServerThread) -> None:
    """A relay-mode demo device runs a JSON tool plan locally; no COMMAND frames are sent."""
    with DemoDevice(server.ws_url, mode=Mode.RELAY) as device:
        end = constellation(server, PLAN)
    assert end["status"] == "completed"
    assert [(r["tool_name"], r["result"]) for r in end["result"]] == [
        ("echo", {"text": "hi"}),
        ("add", 5),
    ]
    assert not [line for line in device.lines if line.startswith("command received")]


def test_agent_device_natural_language_fails_without_runner(server: ServerThread) -> None:
    """Natural language to an agent-mode device fails at once: ccm has no runner for it."""
    with DemoDevice(server.ws_url):
        end = constellation(server, "open the calculator")
    assert (end["status"], end["error"]) == ("failed", NO_RUNNER_ERROR)


def test_constellation_times_out_with_a_message(server: ServerThread) -> None:
    """No task_end within the timeout is a DemoError that says what to check."""
    plan = json.dumps([{"tool_name": "sleep", "parameters": {"seconds": 2}}])
    with DemoDevice(server.ws_url), pytest.raises(DemoError, match="no task_end for session"):
        constellation(server, plan, task_timeout=0.5)


def test_constellation_refused_without_device(server: ServerThread) -> None:
    """Registering for a device that is not connected is refused with a hint to start it."""
    with pytest.raises(DemoError, match="registration refused: Target device 'demo-device'"):
        constellation(server, PLAN)


def test_device_with_wrong_token_gives_up_at_once(server: ServerThread) -> None:
    """A refused upgrade (HTTP 403) is not retried: the message names the token."""
    url = server.ws_url.replace(API_KEY, "wrong")
    with pytest.raises(DemoError, match=r"HTTP 403\): pass the server's API key with --token"):
        asyncio.run(asyncio.wait_for(run_device(url, "demo-device"), 10))


def test_device_gives_up_after_max_retries() -> None:
    """With nobody listening, the device retries with back-off, then gives up with a message."""
    lines: list[str] = []
    url = f"ws://127.0.0.1:{free_port()}/ws"
    device = run_device(url, "demo-device", max_retries=2, retry_delay=0.01, on_event=lines.append)
    with pytest.raises(DemoError, match="gave up after 3 failed attempts"):
        asyncio.run(asyncio.wait_for(device, 10))
    assert [line.rsplit(" ", 1)[-1] for line in lines] == ["(1/2)", "(2/2)"]


def test_unknown_tool_fails_and_keeps_call_ids() -> None:
    """Each Result carries its command's call_id; an unknown tool fails with a reason."""
    results = asyncio.run(
        run_actions(
            [
                {"tool_name": "add", "parameters": {"a": 1, "b": 2}, "call_id": "c1"},
                {"tool_name": "nope", "call_id": "c2"},
                {"tool_name": "echo", "call_id": "c3"},
            ]
        )
    )
    assert [(r["call_id"], r["status"], r["result"]) for r in results] == [
        ("c1", "success", 3),
        ("c2", "failure", None),
        ("c3", "skipped", None),
    ]
    assert results[1]["error"].startswith("unknown tool 'nope'")


def test_cli_demo_device_exits_1_with_a_wrong_token(server: ServerThread) -> None:
    """`ccm demo-device` parses its options and stops with DemoError (exit 1) on HTTP 403."""
    url = f"ws://127.0.0.1:{server.port}/ws"
    args = ["demo-device", "--url", url, "--token", "wrong", "--mode", "relay", "--heartbeat", "5s"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert isinstance(result.exception, DemoError)
    assert "wrong" not in str(result.exception)  # the token is never echoed


def test_cli_demo_constellation_prints_outcome(server: ServerThread) -> None:
    """`ccm demo-constellation` against a running demo device exits 0 and prints the outcome."""
    args = ["demo-constellation", "--url", server.ws_url, "--request", PLAN, "--timeout", "10s"]
    with DemoDevice(server.ws_url):
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "registered demo-constellation@demo-device (target demo-device)" in result.output
    assert "device info: device_id=demo-device" in result.output
    assert "task completed: session demo-constellation@" in result.output
