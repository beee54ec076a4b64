"""Durations in settings and options: a number and a unit, always (`30s`, `15m`, `7d`).

A bare number is refused: `7` could mean seconds or days, and `cleanup --finished-before 7` read as
seconds deletes the whole history.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated

from pydantic import BeforeValidator

from ccm.settings_report import shown

_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)$")
_BARE_NUMBER = re.compile(r"^\d+(?:\.\d+)?$")
DURATION_EXAMPLES = "30s, 15m, 12h, 7d, 2w"


def parse_duration(value: object) -> timedelta:
    """Parse `500ms`, `30s`, `15m`, `12h`, `7d`, `2w`.

    A bare number is refused: `7` could mean seconds or days, and `cleanup --finished-before 7`
    read as seconds deletes the whole history. An empty value is refused, not defaulted."""
    if isinstance(value, timedelta):
        return value
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"is empty: give a duration with a unit ({DURATION_EXAMPLES})")
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        text = str(value).strip()
        if _BARE_NUMBER.match(text):
            raise ValueError(f"{text} has no unit: write {text}s, {text}m, {text}h or {text}d")
        match = _DURATION.match(text)
        if match:
            return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    raise ValueError(
        f"{shown(value)} is not a duration: write a number and a unit ({DURATION_EXAMPLES})"
    )


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
