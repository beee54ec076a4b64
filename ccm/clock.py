"""Time: aware UTC everywhere, and a Clock type so time-dependent code can take a fake one."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)
