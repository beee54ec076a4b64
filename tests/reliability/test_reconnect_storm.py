"""Reconnect storm: every device drops and comes back within seconds, as after a network blip
or a server restart, and, with `duplicate_policy: takeover`, while the old connections are
still half-open. Afterwards: exactly one online row per client, one connection row per
registration (no duplicate history), and the registry equals SQL."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine

from tests.reliability.support import (
    LoadGen,
    ServeProcess,
    connection_counts,
    disconnect_reasons,
    record,
    registry_matches_sql,
    scale,
)

CLIENTS = scale(300, 2000)


def _consistent(server: ServeProcess, db: Engine) -> dict[str, Any]:
    server.wait_drained()
    state = registry_matches_sql(server, db)
    assert state["registry_equals_sql"], state
    assert state["more_than_one_open_row"] == [], state
    assert state["live"] == CLIENTS, state
    return state


def _registrations(load: LoadGen) -> dict[str, int]:
    return dict((load.result or {}).get("registrations_by_client", {}))


def test_storm_after_drop_and_after_restart(
    serve: Callable[..., ServeProcess],
    loadgen: Callable[..., LoadGen],
    db: Engine,
    backend: str,
) -> None:
    """All clients' sockets reset at once, the same ids return at once; then the server is
    killed and restarted under them. One online row each, history rows = registrations."""
    server = serve(env={"CCM_SERVER_HEARTBEAT_INTERVAL": "30s"})
    first = loadgen(server.ws_url, "storm", devices=CLIENTS, constellations=0, duration=600)
    first.wait(lambda p: p["online"] >= CLIENTS, 120, "all clients online")
    first.kill()  # every socket reset by the kernel at once
    dropped = time.monotonic()
    second = loadgen(
        server.ws_url, "storm2", prefix="storm", devices=CLIENTS, constellations=0, duration=600
    )
    second.wait(lambda p: p["online"] >= CLIENTS, 120, "all clients back")
    back_after_drop = time.monotonic() - dropped
    _consistent(server, db)

    killed_run = server.health()["run_id"]
    at_restart = second.progress()
    server.kill()
    restarted = time.monotonic()
    server.start()
    second.wait(
        lambda p: (
            p["online"] >= CLIENTS and p["registrations"] >= at_restart["registrations"] + CLIENTS
        ),
        120,
        "all clients back after the restart",
    )
    back_after_restart = time.monotonic() - restarted
    state = _consistent(server, db)

    second.stop()
    assert server.terminate() == 0, server.log()
    counts = connection_counts(db)
    again = _registrations(second)
    for i in range(CLIENTS):
        client_id = f"storm-dev-{i:05d}"
        assert counts.get(client_id) == 1 + again.get(client_id, 0), (
            client_id,
            counts.get(client_id),
        )
    assert set(disconnect_reasons(db, server_run_id=killed_run)) <= {
        "connection_lost",
        "server_restart",
    }
    assert server.problems() == []
    record(
        "reconnect_storm",
        backend,
        clients=CLIENTS,
        policy="reject",
        back_after_drop_s=round(back_after_drop, 2),
        back_after_restart_s=round(back_after_restart, 2),
        refusals_while_old_sockets_closed=len(second.result["refusals"]) if second.result else None,
        registry_equals_sql=state["registry_equals_sql"],
        connection_rows=sum(counts.values()),
    )


@pytest.mark.parametrize("policy", ["takeover"])
def test_storm_over_half_open_connections_with_takeover(
    serve: Callable[..., ServeProcess],
    loadgen: Callable[..., LoadGen],
    db: Engine,
    backend: str,
    policy: str,
) -> None:
    """The old client process is frozen (its sockets half-open) and the same ids return from a
    new one: each takes over at once; the frozen sockets' late ends never remove the new ones."""
    server = serve(env={"CCM_SERVER_HEARTBEAT_INTERVAL": "30s", "CCM_DUPLICATE_POLICY": policy})
    frozen = loadgen(server.ws_url, "storm", devices=CLIENTS, constellations=0, duration=600)
    frozen.wait(lambda p: p["online"] >= CLIENTS, 120, "all clients online")
    frozen.pause()
    began = time.monotonic()
    fresh = loadgen(
        server.ws_url, "storm2", prefix="storm", devices=CLIENTS, constellations=0, duration=600
    )
    fresh.wait(lambda p: p["online"] >= CLIENTS, 120, "all ids taken over")
    took_over_in = time.monotonic() - began
    _consistent(server, db)
    frozen.kill()  # the half-open sockets finally end
    time.sleep(1.0)
    state = _consistent(server, db)
    fresh.stop()
    assert server.terminate() == 0, server.log()
    counts = connection_counts(db)
    again = _registrations(fresh)
    for i in range(CLIENTS):
        client_id = f"storm-dev-{i:05d}"
        assert counts.get(client_id) == 1 + again.get(client_id, 0), (
            client_id,
            counts.get(client_id),
        )
    reasons = disconnect_reasons(db)
    assert reasons.get("replaced", 0) >= CLIENTS, reasons
    assert server.problems() == []
    record(
        "reconnect_storm",
        backend,
        clients=CLIENTS,
        policy=policy,
        took_over_in_s=round(took_over_in, 2),
        replaced=reasons.get("replaced", 0),
        registry_equals_sql=state["registry_equals_sql"],
        connection_rows=sum(counts.values()),
    )
