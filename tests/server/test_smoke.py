"""Smoke test of the server fixture itself: a device registers over a real socket."""

from __future__ import annotations

from tests.server.support import AipClient, ServerThread, run, track


def test_device_registers_and_is_recorded(server: ServerThread) -> None:
    """A device's REGISTER is confirmed with heartbeat/ok and lands in the registry."""

    async def scenario() -> None:
        client = track(await AipClient.connect(server.ws_url))
        reply = await client.register_device("dev-smoke")
        assert server.registry.is_device_connected("dev-smoke")
        assert (reply["type"], reply["status"]) == ("heartbeat", "ok")

    run(scenario())
