"""Transport limits below the app: connections that have not registered yet, requests that never
complete, and the process's open files.

A TCP connection is *pending* from accept until its first request's headers are in (a plain HTTP
request) or, for a WebSocket, until its REGISTER is accepted; pending connections are capped in
total and per remote address, and one over the cap is answered `503` with the reason and closed.
A request (or upgrade) whose headers and body have not all arrived `limits.request_timeout` after
the connection opened, or after the previous response on it, is answered `408` and closed. The
total cap is never more than half the open-files limit, so sockets that never register cannot
take the descriptors that registered clients, the database and `/healthz` need.

uvicorn's protocol classes (whichever implementation it picked) are subclassed here, since only
the protocol sees a connection before its request is complete: `install(config, gate)`.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from ccm.config import LimitsSettings
from ccm.logs import Throttle

logger = logging.getLogger(__name__)

PEER_SCOPE_KEY = "ccm.peer"
"""The connection's own (host, port), put in every ASGI scope before uvicorn's proxy-headers
middleware may replace `client` with a forwarded address."""

FD_SHORT = 0.9
"""Open descriptors at this share of the limit count as running short (WARNING, degraded)."""
FD_RECOVERED = 0.8
FD_CHECK_SECONDS = 1.0
OPEN_FILES_CEILING = 1 << 20
"""What the soft limit is raised to when the hard limit is unlimited (the kernel's nr_open)."""

Peer = tuple[str, int]


@dataclass(frozen=True)
class FdStatus:
    """Open file descriptors against the soft limit; `open` is None where it cannot be counted."""

    open: int | None
    limit: int
    short: bool

    def as_dict(self) -> dict[str, Any]:
        return {"open": self.open, "limit": self.limit, "short": self.short}


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one (a common default is 1024 soft, far more
    hard). Returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = OPEN_FILES_CEILING if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.warning(
                "could not raise the open-files limit from %d to %d: %s", soft, target, exc
            )
            return soft, soft
        logger.info("open-files limit raised from %d to %d", soft, target)
        return soft, target
    return soft, soft


def _soft_open_files_limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return OPEN_FILES_CEILING if soft == resource.RLIM_INFINITY else soft


def _count_open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # the listing's own descriptor
    except OSError:  # no procfs (not Linux)
        return None


class ConnectionGate:
    """Counts pending connections per remote address and watches file descriptors. Owned by the
    app (`app.state.connections`); the protocol subclasses of `install` and the WebSocket
    endpoint report to it. Used on the event loop only."""

    def __init__(
        self,
        limits: LimitsSettings,
        *,
        fd_limit: Callable[[], int] = _soft_open_files_limit,
        count_fds: Callable[[], int | None] = _count_open_fds,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.request_timeout = limits.request_timeout.total_seconds()
        self._max_total = limits.max_pending_connections
        self._max_per_address = limits.max_pending_per_address
        self._fd_limit = fd_limit
        self._count_fds = count_fds
        self._clock = clock
        self._pending: dict[Peer, str] = {}
        self._by_host: Counter[str] = Counter()
        self._fds = FdStatus(None, fd_limit(), False)
        self._fds_checked_at = float("-inf")
        self._refusals = Throttle(logger, 10.0)
        self._timeouts = Throttle(logger, 10.0)
        self._short_warning = Throttle(logger, 60.0)

    @property
    def max_pending(self) -> int:
        """`limits.max_pending_connections`, but never more than half the open-files limit."""
        return max(1, min(self._max_total, self._fd_limit() // 2))

    def pending_count(self) -> int:
        return len(self._pending)

    def admit(self, peer: Peer) -> str | None:
        """Count a new connection as pending; the refusal text instead if a cap is reached."""
        self._check_fds()
        host = peer[0]
        if len(self._pending) >= self.max_pending:
            reason = (
                f"too many connections waiting to register ({len(self._pending)}, limit "
                f"{self.max_pending}: limits.max_pending_connections); try again in a few seconds"
            )
        elif self._by_host[host] >= self._max_per_address:
            reason = (
                f"too many connections from {host} waiting to register ({self._by_host[host]}, "
                "limit limits.max_pending_per_address); try again in a few seconds"
            )
        else:
            self._pending[peer] = host
            self._by_host[host] += 1
            return None
        self._refusals.warning("refused connection remote=%s: %s", host, reason)
        return reason

    def release(self, peer: Peer | None) -> None:
        """The connection is no longer pending (request in, registered, or closed). Idempotent."""
        if peer is None:
            return
        host = self._pending.pop(peer, None)
        if host is not None:
            self._by_host[host] -= 1
            if self._by_host[host] <= 0:
                del self._by_host[host]

    def registered(self, scope: Scope) -> None:
        """The WebSocket endpoint accepted this connection's REGISTER."""
        peer = scope.get(PEER_SCOPE_KEY)
        self.release((str(peer[0]), int(peer[1])) if peer else None)

    def timed_out(self, peer: Peer | None) -> None:
        self._timeouts.warning(
            "closed a connection whose request did not arrive within %g s "
            "(limits.request_timeout) remote=%s",
            self.request_timeout,
            peer[0] if peer else None,
        )

    def file_descriptors(self) -> FdStatus:
        """Counted now (for `/api/health`)."""
        self._check_fds(force=True)
        return self._fds

    def _check_fds(self, *, force: bool = False) -> None:
        now = self._clock()
        if not force and now - self._fds_checked_at < FD_CHECK_SECONDS:
            return
        self._fds_checked_at = now
        limit, count = self._fd_limit(), self._count_fds()
        was_short = self._fds.short
        short = count is not None and count >= limit * (FD_RECOVERED if was_short else FD_SHORT)
        self._fds = FdStatus(count, limit, short)
        if short:
            self._short_warning.warning(
                "file descriptors running short: %d open, limit %d; new connections and database "
                "connections may fail: raise the open-files limit (ulimit -n) or lower "
                "limits.max_pending_connections",
                count,
                limit,
            )
        elif was_short:
            logger.info("file descriptors back to normal: %s open, limit %d", count, limit)


def _peer_of(transport: Any) -> Peer | None:
    name = transport.get_extra_info("peername")
    if isinstance(name, tuple) and len(name) >= 2:
        return (str(name[0]), int(name[1]))
    return None  # a Unix socket: no remote address to count


def _plain_response(status: str, text: str) -> bytes:
    body = (text + "\n").encode("utf-8")
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


REFUSAL_GRACE_SECONDS = 1.0
"""A refused connection is answered once its request arrives (a response sent before the
request may be lost to a reset), or closed after this long."""


def _gated_http(base: type[Any], gate: ConnectionGate) -> type[Any]:
    class GatedHttpProtocol(base):  # type: ignore[misc]
        """uvicorn's HTTP protocol with the gate's cap and the request deadline."""

        _ccm_peer: Peer | None = None
        _ccm_refusal: str | None = None
        _ccm_timer: Any = None
        _ccm_seen: Any = None  # the cycle that was current when the deadline was armed

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._ccm_peer = _peer_of(transport)
            if self._ccm_peer is not None:
                self._ccm_refusal = gate.admit(self._ccm_peer)
                if self._ccm_refusal is not None:
                    self._ccm_peer = None  # not counted
                    self._ccm_timer = self.loop.call_later(REFUSAL_GRACE_SECONDS, transport.close)
                    return
            self._ccm_arm()

        def data_received(self, data: bytes) -> None:
            if self._ccm_refusal is not None:
                if not self.transport.is_closing():
                    self.transport.write(
                        _plain_response("503 Service Unavailable", self._ccm_refusal)
                    )
                    self.transport.close()
                return
            super().data_received(data)
            cycle = self.cycle
            # A new request's headers are in (an upgrade hands the transport to the WebSocket).
            if cycle is not None and cycle is not self._ccm_seen and self._ccm_owns_transport():
                gate.release(self._ccm_peer)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._ccm_arm()  # the next request on this connection gets its own deadline

        def connection_lost(self, exc: Exception | None) -> None:
            if self._ccm_timer is not None:
                self._ccm_timer.cancel()
            if self.transport.get_protocol() is self:  # after an upgrade the WebSocket owns it
                gate.release(self._ccm_peer)
            super().connection_lost(exc)

        def _ccm_owns_transport(self) -> bool:
            return bool(self.transport.get_protocol() is self)

        def _ccm_arm(self) -> None:
            if self._ccm_timer is not None:
                self._ccm_timer.cancel()
            self._ccm_seen = self.cycle
            self._ccm_timer = self.loop.call_later(gate.request_timeout, self._ccm_expired)

        def _ccm_expired(self) -> None:
            self._ccm_timer = None
            transport = self.transport
            if transport.is_closing() or transport.get_protocol() is not self:
                return  # closed, or upgraded: the WebSocket's REGISTER deadline applies
            cycle = self.cycle
            if cycle is not None and cycle is not self._ccm_seen and not cycle.more_body:
                return  # the whole request is in; the app is answering (an event stream, say)
            if cycle is None or cycle is self._ccm_seen or not cycle.response_started:
                transport.write(
                    _plain_response(
                        "408 Request Timeout",
                        f"request not complete within {gate.request_timeout:g} s "
                        "(limits.request_timeout)",
                    )
                )
            gate.timed_out(self._ccm_peer)
            gate.release(self._ccm_peer)
            transport.close()

    GatedHttpProtocol.__name__ = f"Gated{base.__name__}"
    return GatedHttpProtocol


def _gated_ws(base: type[Any], gate: ConnectionGate) -> type[Any]:
    class GatedWebSocketProtocol(base):  # type: ignore[misc]
        """uvicorn's WebSocket protocol: a connection closed before REGISTER leaves the count."""

        _ccm_peer: Peer | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._ccm_peer = _peer_of(transport)

        def connection_lost(self, exc: Exception | None) -> None:
            gate.release(self._ccm_peer)
            super().connection_lost(exc)

    GatedWebSocketProtocol.__name__ = f"Gated{base.__name__}"
    return GatedWebSocketProtocol


class _StampPeer:
    """Outermost ASGI layer: records the connection's own address in the scope."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            scope[PEER_SCOPE_KEY] = scope.get("client")
        await self.app(scope, receive, send)


def install(config: uvicorn.Config, gate: ConnectionGate) -> None:
    """Load `config` and put the gate into its protocols (whichever implementations uvicorn
    chose) and in front of its app."""
    if not config.loaded:
        config.load()
    config.http_protocol_class = _gated_http(config.http_protocol_class, gate)
    if config.ws_protocol_class is not None:
        config.ws_protocol_class = _gated_ws(config.ws_protocol_class, gate)
    config.loaded_app = _StampPeer(config.loaded_app)
