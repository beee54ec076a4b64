"""Registration over a real socket, on SQLite and Postgres: a device's or a constellation's
REGISTER is confirmed with a full heartbeat/ok and recorded in SQL (online, then closed); a
constellation naming an absent device is refused; heartbeats are acked; DEVICE_INFO_REQUEST
answers with the device's system info."""

from __future__ import annotations

from collections.abc import Callable

from tests.server.scenario import (
    SYSTEM_INFO,
    assert_full_frame,
    assert_ok_frame,
    client_row,
    closed_connection,
    closed_with,
    connection_rows,
    constellation,
    device,
)
from tests.server.support import ServerThread, open_client, run


class TestRegistration:
    def test_device_registration_is_confirmed_and_recorded(self, server: ServerThread) -> None:
        """A device's first frame back is a full heartbeat/ok; SQL has it online, then closed."""

        async def scenario() -> None:
            client = await open_client(server)
            reply = await client.register_device("lab-pc-07", platform="windows", **SYSTEM_INFO)
            assert_ok_frame(reply)
            online = client_row(server, "lab-pc-07")
            rows = connection_rows(server, "lab-pc-07")
            assert online["client_type"] == "device"
            assert online["platform"] == "windows"
            assert online["online"] is True
            assert online["system_info"] == {
                "device_id": "lab-pc-07",
                "platform": "windows",
                **SYSTEM_INFO,
            }
            assert online["metadata"]["platform"] == "windows"
            assert len(rows) == 1
            assert online["current_connection_id"] == rows[0].connection_id
            assert rows[0].client_type == "device"
            assert rows[0].disconnected_at is None
            assert rows[0].remote_address
            assert rows[0].remote_address.startswith("127.0.0.1:")
            assert rows[0].server_run_id == server.app.state.store.run_id

        run(scenario())
        closed = closed_connection(server, "lab-pc-07")
        assert closed.disconnect_reason == "closed"
        after = client_row(server, "lab-pc-07")
        assert (after["online"], after["current_connection_id"]) == (False, None)

    def test_constellation_registration_is_confirmed_and_recorded(
        self, server: ServerThread
    ) -> None:
        """A constellation naming a live device is confirmed with a full heartbeat/ok."""

        async def scenario() -> None:
            await device(server, "lab-pc-07")
            client = await open_client(server)
            assert_ok_frame(await client.register_constellation("nightly@lab-pc-07", "lab-pc-07"))

        run(scenario())
        row = client_row(server, "nightly@lab-pc-07")
        assert row["client_type"] == "constellation"
        assert row["metadata"] == {"type": "constellation_client"}
        assert row["system_info"] is None
        closed = closed_connection(server, "nightly@lab-pc-07")
        assert (closed.client_type, closed.disconnect_reason) == ("constellation", "closed")

    def test_constellation_for_absent_device_is_refused(self, server: ServerThread) -> None:
        """A constellation naming a device that is not live gets ERROR, then close 1008, no row."""

        async def scenario() -> None:
            client = await open_client(server)
            reply = await client.register_constellation("nightly@ghost", "ghost")
            assert_full_frame(reply)
            assert (reply["type"], reply["status"]) == ("error", "error")
            assert reply["error"] == "Target device 'ghost' is not connected"
            code, _reason = await closed_with(client)
            assert code == 1008

        run(scenario())
        assert connection_rows(server, "nightly@ghost") == []

    def test_heartbeat_is_acked(self, server: ServerThread) -> None:
        """A device HEARTBEAT gets heartbeat/ok without a session id."""

        async def scenario() -> None:
            dev = await device(server, "lab-pc-07")
            await dev.send(type="heartbeat", client_id="lab-pc-07")
            assert_ok_frame(await dev.recv())

        run(scenario())
        assert closed_connection(server, "lab-pc-07").disconnect_reason == "closed"

    def test_constellation_heartbeat_claiming_device_role_is_acked(
        self, server: ServerThread
    ) -> None:
        """Decision D2: Galaxy's heartbeat says client_type "device"; it is acked, not refused."""

        async def scenario() -> None:
            await device(server, "lab-pc-07")
            con = await constellation(server, "nightly@lab-pc-07", "lab-pc-07")
            await con.send(
                type="heartbeat",
                client_type="device",
                client_id="nightly@lab-pc-07",
                metadata={"device_id": "lab-pc-07"},
            )
            assert_ok_frame(await con.recv())

        run(scenario())
        assert closed_connection(server, "nightly@lab-pc-07").disconnect_reason == "closed"

    def test_device_info_request_returns_system_info(self, server: ServerThread) -> None:
        """device_info_response echoes request_id as response_id and carries the system info."""
        request_id = "device_info_lab-pc-07_1777627862.125914"

        async def scenario() -> None:
            await device(server, "lab-pc-07")
            con = await constellation(server, "nightly@lab-pc-07", "lab-pc-07")
            await con.send(
                type="device_info_request",
                client_type="constellation",
                client_id="nightly@lab-pc-07",
                target_id="lab-pc-07",
                request_id=request_id,
            )
            reply = await con.recv()
            assert_full_frame(reply)
            assert (reply["type"], reply["status"]) == ("device_info_response", "ok")
            assert reply["response_id"] == request_id
            assert reply["result"] == {
                "device_id": "lab-pc-07",
                "platform": "windows",
                **SYSTEM_INFO,
            }
            assert reply["error"] is None

        run(scenario())

    def test_device_info_for_unknown_device_is_an_error_response(
        self, server_factory: Callable[..., ServerThread]
    ) -> None:
        """An unknown device gets status "error" and result {"error": ...}, response_id echoed."""
        server = server_factory(**{"server.allow_unscoped_constellations": True})

        async def scenario() -> None:
            con = await constellation(server, "nightly", None)
            await con.send(
                type="device_info_request",
                client_type="constellation",
                client_id="nightly",
                target_id="ghost",
                request_id="req-ghost",
            )
            reply = await con.recv()
            assert_full_frame(reply)
            assert (reply["type"], reply["status"]) == ("device_info_response", "error")
            assert reply["response_id"] == "req-ghost"
            assert set(reply["result"]) == {"error"}
            assert "ghost" in reply["result"]["error"]

        run(scenario())
        assert closed_connection(server, "nightly").disconnect_reason == "closed"
