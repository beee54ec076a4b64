"""The dashboard in a real headless Chromium against a live server: sign in, watch a demo device
appear, run a task and see it complete, open the device's history. Leaves a screenshot in
test-artifacts/dashboard.png."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from ccm.demo import run_constellation
from tests.dashboard.conftest import ARTIFACTS
from tests.server.support import API_KEY, ServerThread
from tests.server.test_demo import DemoDevice

WAIT_MS = 15_000
PLAN = json.dumps(
    [
        {"tool_name": "echo", "parameters": {"text": "hello"}},
        {"tool_name": "add", "parameters": {"a": 2, "b": 3}},
    ]
)


SLOW = json.dumps([{"tool_name": "sleep", "parameters": {"seconds": 5}}])  # the demo's longest


def start_task(
    pool: ThreadPoolExecutor, server: ServerThread, request: str, session_id: str
) -> Future[dict[str, Any]]:
    """The demo constellation in a worker thread: Playwright's sync API owns this thread's loop."""
    task = run_constellation(
        server.ws_url,
        "demo-constellation",
        "demo-device",
        request,
        session_id=session_id,
        task_timeout=15,
    )
    return pool.submit(asyncio.run, task)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # SQL reads: test_events
def test_dashboard_follows_a_demo_task(dashboard_server: ServerThread, browser_page: Any) -> None:
    """Sign in, see the device, watch tasks run and end, open the device's history, sign out."""
    from playwright.sync_api import expect

    server, page = dashboard_server, browser_page
    urls: list[str] = []
    console: list[tuple[str, str]] = []
    page.on("request", lambda request: urls.append(request.url))
    page.on("console", lambda message: console.append((message.type, message.text)))

    with (
        DemoDevice(server.ws_url, features=["demo_tools"]),
        DemoDevice(server.ws_url, client_id="win-bench-07", platform="windows"),
        ThreadPoolExecutor(1) as pool,
    ):
        page.goto(f"{server.http_url}/dashboard")
        page.fill("#api-key", "not-the-key")
        page.click("#login-submit")
        expect(page.locator("#login-error")).to_have_text("The API key was refused.")
        page.fill("#api-key", API_KEY)
        page.click("#login-submit")
        expect(page.locator("#status")).to_have_text("live", timeout=WAIT_MS)

        device = page.locator("#devices tbody tr[data-device='demo-device']")
        expect(device).to_contain_text("linux", timeout=WAIT_MS)
        expect(device).to_contain_text("lab")  # tags from the server's device config
        expect(device).to_contain_text("screenshot")  # capabilities merged with the config's
        expect(page.locator("#n-devices")).to_have_text("2")

        assert start_task(pool, server, PLAN, "dash-plan-1").result(30)["status"] == "completed"
        fail = json.dumps([{"tool_name": "fail"}])
        assert start_task(pool, server, fail, "dash-fail-1").result(30)["status"] == "failed"
        done = page.locator("#sessions tr[data-session='dash-plan-1']")
        expect(done).to_contain_text("completed", timeout=WAIT_MS)
        expect(done).to_contain_text("demo-constellation@demo-device")
        expect(page.locator("#sessions tr[data-session='dash-fail-1']")).to_contain_text(
            "task_failed", timeout=WAIT_MS
        )

        page.select_option("#filter-platform", "windows")
        expect(page.locator("#devices tbody tr")).to_have_count(1)
        expect(page.locator("#sessions-empty")).to_be_visible()  # the sessions ran on linux
        page.click("#filter-clear")
        expect(page.locator("#devices tbody tr")).to_have_count(2)

        page.click("button[data-device='demo-device']")
        history = page.locator("#detail-sessions tr[data-session='dash-plan-1']")
        expect(history).to_contain_text("completed", timeout=WAIT_MS)
        expect(page.locator("#detail-connections tbody tr").first).to_contain_text("connected")
        expect(page.locator("#legend-disconnects")).to_contain_text("closed", timeout=WAIT_MS)

        slow = start_task(pool, server, SLOW, "dash-slow-1")  # watched while it runs
        running = page.locator("#sessions tr[data-session='dash-slow-1']")
        expect(running).to_contain_text("running", timeout=WAIT_MS)
        expect(device).to_contain_text("1: dash-slow-1")
        expect(page.locator("#constellations tbody")).to_contain_text("demo-device")
        expect(page.locator("#detail-sessions tr[data-session='dash-slow-1']")).to_be_visible()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        assert slow.result(30)["status"] == "completed"
        expect(running).to_contain_text("completed", timeout=WAIT_MS)
        expect(page.locator("#detail-sessions tr[data-session='dash-slow-1']")).to_contain_text(
            "completed", timeout=WAIT_MS
        )

        page.click("#logout")
        expect(page.locator("#login")).to_be_visible()
        assert page.evaluate("sessionStorage.length") == 0

    assert API_KEY not in page.url
    assert not [url for url in urls if API_KEY in url], "the API key must never be in a URL"
    assert not [text for _, text in console if API_KEY in text]
    errors = [text for kind, text in console if kind == "error" and "status of 401" not in text]
    assert not errors  # CSP violations and script errors land here
