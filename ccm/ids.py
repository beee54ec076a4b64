"""Ids for sessions, runs and frames."""

from __future__ import annotations

from random import getrandbits


def new_id() -> str:
    """A random (version 4) UUID as text, like str(uuid.uuid4()) at a fifth of its cost: frames
    carry one or two each, so it shows in the relay profile. The bits come from `random` (seeded
    from os.urandom, reseeded after fork), not from a system call per id: these ids name
    sessions, connections and frames, they are never credentials."""
    h = f"{getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


# RFC 4122 variant: the top two bits of byte 8 are 10, so its first hex digit is 8, 9, a or b.
_VARIANT = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}
