"""Whether the server can listen where the settings say, asked before it does any database work,
with the option that changes the address in the answer."""

from __future__ import annotations

import errno
import socket

from ccm.errors import CcmError


def check_port(host: str, port: int, change: str) -> None:
    """CcmError unless a socket can be bound to `host:port` the way uvicorn binds it
    (SO_REUSEADDR, so a port whose last connections are in TIME_WAIT counts as free).
    `change` names the option and variables that move it (`--port, server.port or ...`)."""
    if port == 0:
        return  # the system picks a free one
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise CcmError(f"cannot listen on host {host!r}: {exc.strerror}; fix server.host") from None
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise CcmError(
                    f"port {port} on {host} is already in use (another ccm, or another program: "
                    f"`ss -ltnp 'sport = :{port}'` shows which); choose a free one with {change}"
                ) from None
            if exc.errno == errno.EACCES:
                raise CcmError(
                    f"not allowed to listen on port {port} on {host} (ports below 1024 need "
                    f"privileges); choose another with {change}"
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise CcmError(
                    f"{host} is not an address of this machine; fix the host (--host, "
                    "server.host or CCM_SERVER_HOST)"
                ) from None
            raise CcmError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


SERVER_PORT = "--port, server.port or CCM_SERVER_PORT"
METRICS_PORT = "metrics.port or CCM_METRICS_PORT"
