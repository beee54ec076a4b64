"""Run a coroutine's first step at once, on the caller's stack, and finish it in a task only if
it had to wait.

The Peer writes most frames this way: an ASGI send completes without waiting unless the client
reads slower than the server writes, and a task per frame would cost more than the write. This
drives the coroutine by hand (`coroutine.send(None)`), and to resume one that waits it awaits
the future the coroutine yielded, which takes asyncio's future protocol: clearing
`_asyncio_future_blocking`, an attribute private to asyncio. That is the only use of a library's
private API in ccm's send path, kept here alone; tests/server/test_eager_send.py fails loudly if
asyncio changes it. (Python 3.12's eager task factory is the public form; ccm supports 3.11.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class Suspended:
    """A coroutine started by `start` that is waiting on `waiting_on` (what it yielded: a
    future, or None for a bare yield)."""

    coroutine: Coroutine[Any, Any, None]
    waiting_on: Any

    async def finish(self) -> None:
        """Drive the coroutine to its end from a task, passing a cancellation (a timeout) into
        it as asyncio would."""
        while True:
            try:
                if self.waiting_on is None:
                    await asyncio.sleep(0)
                else:
                    self.waiting_on._asyncio_future_blocking = False
                    await self.waiting_on
            except BaseException as exc:  # noqa: BLE001 - passed on into the coroutine, as asyncio does
                try:
                    self.waiting_on = self.coroutine.throw(exc)
                except StopIteration:
                    return
                continue
            try:
                self.waiting_on = self.coroutine.send(None)
            except StopIteration:
                return


def start(coroutine: Coroutine[Any, Any, None]) -> Suspended | None:
    """Run `coroutine` until it first waits. None if it finished; a Suspended to finish later
    if it waits. Whatever it raises on the way is raised here."""
    try:
        waiting_on = coroutine.send(None)
    except StopIteration:
        return None
    return Suspended(coroutine, waiting_on)
