"""Waiting for the store's group commits off the receive loops: the bounded wait itself, and the
tasks that wait (held until they end, drained and then cancelled on shutdown).

What they hold: session launches (ACK, then the task to the device), TASK_END announcements,
refusals of sessions recorded as failed, and `completed` TASK_ENDs held while the database is
away (see SessionOrchestrator._announce).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from ccm.errors import NodeFenced
from ccm.store import Store

logger = logging.getLogger(__name__)


class CommitWaits:
    """The orchestrator's waits for commits; `timeout` bounds each one (the ACK timeout)."""

    def __init__(self, store: Store | None, timeout: float) -> None:
        self._store = store
        self._timeout = timeout
        self._held: set[asyncio.Task[None]] = set()

    async def without_blocking(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run `work` so that the calling receive loop need not wait for it. With a store, the
        waits inside are for group commits: a receive loop that awaited each one would put every
        session of its connection into a commit of its own, one after the other. Without a store
        nothing inside waits, so it runs here (no task to pay for)."""
        if self._store is None:
            await work
            return
        self.hold(work)

    def hold(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run `work` in a task kept until it ends (shutdown waits for these)."""
        task = asyncio.get_running_loop().create_task(work)
        self._held.add(task)
        task.add_done_callback(self._held.discard)

    async def durable(self) -> bool:
        """Wait (bounded) until queued writes are committed. False if the store did not confirm,
        at once while the database is known to be away (no connection stalls on it)."""
        store = self._store
        if store is None:
            return True
        if store.writer.degraded:
            return False
        try:
            async with asyncio.timeout(self._timeout):  # no extra task, unlike wait_for
                await store.writer.durable()
        except TimeoutError:
            logger.error("store did not confirm writes within %.1f s", self._timeout)
            return False
        except NodeFenced:
            return False
        return True

    async def drain(self) -> None:
        """Give what is held up to the timeout to finish (the server is stopping)."""
        if self._held:
            await asyncio.wait(list(self._held), timeout=self._timeout)

    async def cancel(self) -> None:
        """Cancel what still waits for a commit (its clients are gone; the states stay queued)."""
        for held in list(self._held):
            held.cancel()
        await asyncio.gather(*self._held, return_exceptions=True)
