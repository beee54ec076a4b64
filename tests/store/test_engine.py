"""make_engine on a real PostgreSQL: every connection carries timeouts and TCP keepalives."""

from __future__ import annotations

import socket

import pytest
from sqlalchemy import make_url

from ccm.store.engine import POSTGRES_CONNECT_ARGS, make_engine

pytestmark = pytest.mark.postgres


def _libpq_parameters(url: str) -> tuple[dict[str, str], dict[str, int]]:
    """The libpq parameters of a pooled connection, and the TCP options of its socket."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            pg = conn.connection.driver_connection
            assert pg is not None
            params = dict(pg.info.get_parameters())
            sock = socket.socket(fileno=pg.pgconn.socket)
            try:
                options = {
                    "SO_KEEPALIVE": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    "TCP_KEEPIDLE": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    "TCP_KEEPINTVL": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                    "TCP_KEEPCNT": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                    "TCP_USER_TIMEOUT": sock.getsockopt(
                        socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT
                    ),
                }
            finally:
                sock.detach()  # the socket belongs to libpq
    finally:
        engine.dispose()
    return params, options


def test_postgres_connections_get_timeouts_and_keepalives(postgres_template_url: str) -> None:
    """A plain URL gets connect_timeout, keepalives and tcp_user_timeout, on the real socket."""
    params, options = _libpq_parameters(postgres_template_url)

    for name, value in POSTGRES_CONNECT_ARGS.items():
        assert params[name] == str(value), name
    assert options == {
        "SO_KEEPALIVE": 1,
        "TCP_KEEPIDLE": POSTGRES_CONNECT_ARGS["keepalives_idle"],
        "TCP_KEEPINTVL": POSTGRES_CONNECT_ARGS["keepalives_interval"],
        "TCP_KEEPCNT": POSTGRES_CONNECT_ARGS["keepalives_count"],
        "TCP_USER_TIMEOUT": POSTGRES_CONNECT_ARGS["tcp_user_timeout"],
    }


def test_url_settings_win_over_the_defaults(postgres_template_url: str) -> None:
    """Options the URL sets itself are kept; the others still get the defaults."""
    url = make_url(postgres_template_url).update_query_dict(
        {"connect_timeout": "3", "keepalives_idle": "7"}
    )
    params, options = _libpq_parameters(url.render_as_string(hide_password=False))

    assert params["connect_timeout"] == "3"
    assert params["keepalives_idle"] == "7"
    assert options["TCP_KEEPIDLE"] == 7
    assert params["keepalives_count"] == str(POSTGRES_CONNECT_ARGS["keepalives_count"])
