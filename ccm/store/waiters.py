"""Group-commit wake-ups: event-loop coroutines waiting for "every write queued before me is
committed", woken once per loop per batch.

A waiter is a sequence number (the writes queued when it started waiting) and a loop future.
After each batch the writer counts the writes it applied and wakes every loop once for all the
waiters that batch covered, so many sessions acknowledged by one commit cost one wake-up.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading


def _resolve(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        if future.done():  # a waiter that timed out cancelled its future
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)


class CommitWaiters:
    """Sequence numbers of queued and applied writes, and who waits for which. `lock` is the
    writer's: `queued` is counted under it together with the queue itself."""

    def __init__(self, lock: threading.Condition) -> None:
        self._lock = lock
        self._submitted = 0
        """Writes queued so far; the n-th write is done once `_done` reaches n."""
        self._done = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    def queued(self) -> None:
        """One more write was queued (caller holds the lock)."""
        self._submitted += 1

    async def wait(self) -> None:
        """Until every write queued before this call is done; raises what refused them."""
        future = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._done >= self._submitted:
                return
            self._waiters.append((self._submitted, future))
        await future

    def release(self, applied: int, error: BaseException | None = None) -> None:
        """Count `applied` more writes as done and wake the loops of covered waiters (with
        `error` if those writes were refused instead of committed)."""
        ready: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        with self._lock:
            self._done += applied
            while self._waiters and self._waiters[0][0] <= self._done:
                future = self._waiters.popleft()[1]
                ready.setdefault(future.get_loop(), []).append(future)
        for loop, futures in ready.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting
                loop.call_soon_threadsafe(_resolve, futures, error)
