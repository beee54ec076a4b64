"""JSON answers for values clients sent: encoded by ccm, nested as deep as they are, and never a
500 for what is already stored. A document nested deeper than SHOWN_DEPTH (only rows stored
before the frame depth limit existed) shows the parts below that depth as TOO_DEEP.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fastapi import Response

from ccm.protocol import exceeds_depth

SHOWN_DEPTH = 500
"""Deepest nesting an answer is encoded with. Above `limits.max_json_depth`'s ceiling (400) plus
the envelope, so anything stored since that limit is shown whole; inside what Python's encoder
manages on any thread's stack."""
TOO_DEEP = f"[not shown: nested deeper than {SHOWN_DEPTH} levels; the stored value is intact]"

_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=str)


def _shown(value: Any) -> Any:
    """A copy of `value` with containers below SHOWN_DEPTH replaced by TOO_DEEP and numbers JSON
    cannot write (NaN, infinity, from rows older than the edge check) by null. Iterative."""
    root: list[Any] = [None]
    stack: list[tuple[Any, Any, Any, int]] = [(value, root, 0, 1)]
    while stack:
        source, parent, key, depth = stack.pop()
        if isinstance(source, dict | list):
            if depth > SHOWN_DEPTH:
                parent[key] = TOO_DEEP
                continue
            copy: Any = {} if isinstance(source, dict) else [None] * len(source)
            parent[key] = copy
            items = source.items() if isinstance(source, dict) else enumerate(source)
            for child_key, child in items:
                copy[child_key] = None  # keeps the keys' order; filled when popped
                stack.append((child, copy, child_key, depth + 1))
        elif isinstance(source, float) and not math.isfinite(source):
            parent[key] = None
        else:
            parent[key] = source
    return root[0]


class JsonAnswer(Response):
    """JSON encoded by ccm, not by FastAPI's serialiser (pydantic's stops at 255 levels and
    answers 500): whatever a client stored, the answer is a 200 with the value in it."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        try:
            text = _ENCODER.encode(content)
        except (RecursionError, ValueError):  # deeper than the stack allows, or NaN
            text = None
        # A document cannot nest deeper than it has brackets: most answers skip the walk.
        if text is None or (
            text.count("{") + text.count("[") > SHOWN_DEPTH and exceeds_depth(content, SHOWN_DEPTH)
        ):
            text = _ENCODER.encode(_shown(content))
        return text.encode("utf-8")
