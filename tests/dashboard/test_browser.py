"""The dashboard in a real headless Chromium against a live server: sign in, watch a demo device
appear, run a task and see it complete, open the device's history and a session's story; the
layout at 1,024 px and on a phone, with ids long and odd enough to break it. Leaves screenshots
in test-artifacts/ (dashboard.png, dashboard-session.png, dashboard-1024.png,
dashboard-phone.png)."""

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
        open_connection = page.locator("#detail-connections tbody tr").first
        expect(open_connection).to_contain_text("now (open)")
        expect(open_connection).not_to_contain_text("connected")  # no "Disconnected: connected"
        failed = page.locator("#detail-sessions tr[data-session='dash-fail-1']")
        expect(failed).to_contain_text("task_failed", timeout=WAIT_MS)  # the reason column
        expect(failed.locator("td[data-label='Error']")).not_to_have_text("—")
        expect(page.locator("#legend-disconnects")).to_contain_text("closed", timeout=WAIT_MS)

        page.click("#sessions tr[data-session='dash-plan-1'] button[data-open-session]")
        panel = page.locator("#session-detail")
        expect(panel).to_be_visible()
        expect(page.locator("#session-id")).to_have_text("dash-plan-1", timeout=WAIT_MS)
        expect(page.locator("#session-request")).to_contain_text('"tool_name": "echo"')
        expect(page.locator("#session-result")).to_contain_text("hello")
        expect(page.locator("#session-timeline")).to_contain_text("completed after")
        expect(page.locator("#session-timeline")).to_contain_text("connected from 127.0.0.1")
        expect(page.locator("#session-error-box")).to_be_hidden()
        ARTIFACTS.mkdir(exist_ok=True)
        panel.screenshot(path=str(ARTIFACTS / "dashboard-session.png"))
        page.click("#detail-sessions tr[data-session='dash-fail-1'] button[data-open-session]")
        expect(page.locator("#session-id")).to_have_text("dash-fail-1", timeout=WAIT_MS)
        expect(page.locator("#session-error-box")).to_be_visible()
        expect(page.locator("#session-error")).not_to_be_empty()
        expect(page.locator("#session-facts")).to_contain_text("task_failed")
        page.click("#session-close")
        expect(panel).to_be_hidden()

        page.select_option("#filter-platform", "windows")  # hides demo-device: its panel goes
        expect(page.locator("#detail")).to_be_hidden()
        page.click("#filter-clear")
        page.click("button[data-device='demo-device']")
        expect(page.locator("#detail")).to_be_visible()

        slow = start_task(pool, server, SLOW, "dash-slow-1")  # watched while it runs
        running = page.locator("#sessions tr[data-session='dash-slow-1']")
        expect(running).to_contain_text("running", timeout=WAIT_MS)
        expect(device).to_contain_text("1 running: dash-slow-1")
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


LONG_DEVICE = "lab bench #7?rack=12&slot=%20-with-a-much-longer-name-than-anyone-types"
"""An id that needs encoding in a URL (space, `#`, `?`, `&`, `%`) and is long enough to push a
table past its card if cells could not break it. (A `/` in a device id is the HTTP API's to
route; the page encodes it like the rest.)"""


def _overflow(page: Any) -> list[str]:
    """What sticks out: the page wider than the window, or a table wider than its card."""
    found: list[str] = page.evaluate(
        """() => {
          const out = [];
          const root = document.scrollingElement;
          if (root.scrollWidth > root.clientWidth) {
            out.push(`page ${root.scrollWidth}px > ${root.clientWidth}px`);
          }
          for (const table of document.querySelectorAll("main table")) {
            if (!table.offsetParent) continue;  // hidden
            const card = table.closest(".card").getBoundingClientRect();
            const box = table.getBoundingClientRect();
            if (box.right > card.right + 0.5) {
              out.push(`#${table.id} ends at ${box.right}, its card at ${card.right}`);
            }
          }
          return out;
        }"""
    )
    return found


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_layout_holds_long_ids_at_1024_px_and_on_a_phone(
    dashboard_server: ServerThread, browser_page: Any
) -> None:
    """Long ids with URL characters: every table stays in its card at 1,024 px and at 390 px
    (rows stacked as labelled cards), and the device's and session's panels load through
    encoded URLs."""
    from playwright.sync_api import expect

    server, page = dashboard_server, browser_page
    long_session = "nightly-regression/" + "x" * 60 + "#1?a=b"
    with (
        DemoDevice(server.ws_url, client_id=LONG_DEVICE, features=["demo_tools"]),
        ThreadPoolExecutor(1) as pool,
    ):
        task = run_constellation(
            server.ws_url, "nightly", LONG_DEVICE, PLAN, session_id=long_session, task_timeout=15
        )
        assert pool.submit(asyncio.run, task).result(30)["status"] == "completed"
        page.set_viewport_size({"width": 1024, "height": 900})
        page.goto(f"{server.http_url}/dashboard")
        page.fill("#api-key", API_KEY)
        page.click("#login-submit")
        row = page.locator("#sessions tbody tr").first
        expect(row).to_contain_text("completed", timeout=WAIT_MS)
        page.locator("#devices button[data-device]").first.click()
        expect(page.locator("#detail-connections tbody tr").first).to_contain_text(
            "now (open)", timeout=WAIT_MS
        )
        expect(page.locator("#detail-error")).to_be_hidden()  # the encoded URLs answered
        row.locator("button[data-open-session]").click()
        expect(page.locator("#session-id")).to_have_text(long_session, timeout=WAIT_MS)
        expect(page.locator("#session-result")).to_contain_text("hello")

        assert _overflow(page) == []
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "dashboard-1024.png"), full_page=True)

        page.set_viewport_size({"width": 390, "height": 844})
        expect(page.locator("#sessions thead")).to_be_hidden()  # rows are cards now
        expect(row.locator("td[data-label='State']")).to_contain_text("completed")
        assert _overflow(page) == []
        page.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"), full_page=True)
