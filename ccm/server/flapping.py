"""Flapping detection: a client id, or a remote address, that connects more than a configured
number of times in a window is refused for a while, with a text that says until when.

Counted per node, in memory (a deque of recent connect times per key, and the bans); each ban
is reported to `on_ban`, which records it in SQL and in /metrics.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from ccm.config import FlappingSettings

MAX_TRACKED = 100_000
"""Keys kept at most; past it, keys quiet for a whole window are forgotten first."""


class FlapKind(StrEnum):
    CLIENT_ID = "client_id"
    ADDRESS = "remote_address"


@dataclass(frozen=True, slots=True)
class Ban:
    kind: FlapKind
    subject: str
    connects: int
    until: datetime

    def text(self, window: timedelta) -> str:
        what = "client_id" if self.kind is FlapKind.CLIENT_ID else "address"
        return (
            f"{what} {self.subject!r} connected {self.connects} times in "
            f"{window.total_seconds():g} s: refused until {self.until.isoformat()} "
            "(flapping); if two devices share this id, give each its own"
        )


class FlapGuard:
    def __init__(
        self,
        settings: FlappingSettings,
        *,
        on_ban: Callable[[Ban], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._on_ban = on_ban
        self._clock = clock
        self._window = settings.window.total_seconds()
        self._recent: dict[tuple[FlapKind, str], list[float]] = {}
        """Connect times within the window, oldest first, at most limit + 1 (a list: a deque
        takes a 600-byte block even for the one entry most subjects ever have)."""
        self._bans: dict[tuple[FlapKind, str], tuple[float, Ban]] = {}

    def check_client(self, client_id: str) -> str | None:
        """Count one registration of `client_id`; the refusal text if it is flapping."""
        return self._check(FlapKind.CLIENT_ID, client_id, self._settings.max_connects)

    def check_address(self, host: str | None) -> str | None:
        """Count one connection from `host`; the refusal text if it is flapping."""
        if host is None or host in self._settings.exempt_addresses:
            return None
        return self._check(FlapKind.ADDRESS, host, self._settings.max_connects_per_address)

    def _check(self, kind: FlapKind, subject: str, limit: int) -> str | None:
        if not self._settings.enabled:
            return None
        now = self._clock()
        key = (kind, subject)
        banned = self._bans.get(key)
        if banned is not None:
            if now < banned[0]:
                return banned[1].text(self._settings.window)
            del self._bans[key]
        recent = self._recent.get(key)
        if recent is None:
            if len(self._recent) >= MAX_TRACKED:
                self._forget_quiet(now)
            recent = self._recent[key] = []
        stale = 0
        while stale < len(recent) and recent[stale] <= now - self._window:
            stale += 1
        recent.append(now)
        del recent[: max(stale, len(recent) - (limit + 1))]
        if len(recent) <= limit:
            return None
        ban_seconds = self._settings.ban.total_seconds()
        ban = Ban(
            kind=kind,
            subject=subject,
            connects=len(recent),
            until=datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=ban_seconds),
        )
        self._bans[key] = (now + ban_seconds, ban)
        del self._recent[key]
        self._on_ban(ban)
        return ban.text(self._settings.window)

    def _forget_quiet(self, now: float) -> None:
        quiet = [
            k for k, times in self._recent.items() if not times or times[-1] <= now - self._window
        ]
        for key in quiet or list(self._recent)[: len(self._recent) // 2]:
            del self._recent[key]
