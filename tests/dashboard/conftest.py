"""Dashboard fixtures: a server whose devices carry tags, and a headless Debian Chromium.

The browser test needs `/usr/bin/chromium` (Debian's package; override the path with
CCM_TEST_CHROMIUM) and the Python `playwright` package, which drives that binary: no browser is
ever downloaded. Without either the test is skipped with the reason; with CCM_REQUIRE_BROWSER=1
(set by .ci/run) it fails instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server.conftest import server, server_factory
from tests.server.support import ServerThread

__all__ = ["server", "server_factory"]  # the live-server fixtures, shared with tests/server

CHROMIUM = os.environ.get("CCM_TEST_CHROMIUM", "/usr/bin/chromium")
# What the machine notes prescribe for Chromium here: no sandbox as root, no GPU, and no
# background traffic (the network is closed; Chromium would retry its update hosts forever).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"

DEVICE_CONFIG = """\
devices:
  demo-device:
    tags: [lab, nightly]
    additional_features: [screenshot]
  win-bench-07:
    tags: [office]
"""


def _unavailable(reason: str) -> None:
    if os.environ.get("CCM_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason} (CCM_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


@pytest.fixture
def dashboard_server(server_factory: Callable[..., ServerThread], tmp_path: Path) -> ServerThread:
    """A live server with a device config that tags the demo devices."""
    config = tmp_path / "devices.yaml"
    config.write_text(DEVICE_CONFIG, encoding="utf-8")
    return server_factory(device_config=str(config))


@pytest.fixture
def browser_page() -> Iterator[Any]:
    """A Playwright page in headless Debian Chromium (skipped, or failed, when unavailable)."""
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is missing: pip install -e '.[test]'")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(15_000)
        try:
            yield page
        finally:
            browser.close()
