"""History reads for the HTTP API: SQL run off the event loop, at most `limits.max_history_reads`
at once, each answered within `limits.history_timeout`, and every database failure a
HistoryUnavailable (503) instead of a traceback (500).

The reads run in threads of their own, never in the thread pool that FastAPI uses for sync code,
so a frozen database cannot starve anything else. A read the caller stopped waiting for keeps
its slot until its thread returns (the engine's connect and TCP timeouts bound that), so a frozen
database holds at most `max_history_reads` threads, however many requests arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from ccm.config import LimitsSettings
from ccm.errors import HistoryUnavailable, StoreUnavailable, first_line
from ccm.logs import Throttle

logger = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")

_AWAY = (OperationalError, DisconnectionError, PoolTimeout, StoreUnavailable)
"""What a database that is down, unreachable, locked or out of connections raises."""


class HistoryReads:
    """Runs blocking history queries with a bound on how many and how long. App lifetime."""

    def __init__(self, limits: LimitsSettings) -> None:
        self.max_reads = limits.max_history_reads
        self.timeout = limits.history_timeout.total_seconds()
        self._slots: asyncio.Semaphore | None = None  # made on the loop that uses it
        self.running = 0
        self._warn = Throttle(logger, 10.0)

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn(*args, **kwargs)` in a thread; HistoryUnavailable if the database is away, does
        not answer within the timeout, or every slot is still held by reads it left waiting."""
        loop = asyncio.get_running_loop()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_reads)
        slots = self._slots
        try:
            async with asyncio.timeout(self.timeout):
                await slots.acquire()
                future: asyncio.Future[T] = loop.create_future()
                self.running += 1
                threading.Thread(
                    target=self._work,
                    args=(loop, future, functools.partial(fn, *args, **kwargs)),
                    name="ccm-history-read",
                    daemon=True,  # a read stuck on a frozen database must not hold up exit
                ).start()
                return await asyncio.shield(future)
        except TimeoutError:
            self._warn.warning(
                "history read not answered within %g s (database slow or unreachable)",
                self.timeout,
            )
            raise HistoryUnavailable(
                f"the database did not answer within {self.timeout:g} s "
                "(limits.history_timeout); live routes still work, try again later"
            ) from None
        except _AWAY as exc:
            self._warn.warning("history read failed, database unavailable: %s", _first_line(exc))
            raise HistoryUnavailable(
                f"the database is unavailable ({_first_line(exc)}); live routes still work, "
                "try again later"
            ) from None
        except DBAPIError as exc:
            if exc.connection_invalidated:  # the connection broke under the query
                raise HistoryUnavailable(
                    f"the database connection was lost ({_first_line(exc)}); try again"
                ) from None
            raise

    def _work(
        self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[T], call: Callable[[], T]
    ) -> None:
        try:
            result = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting request, as raised
            self._deliver(loop, future, None, exc)
        else:
            self._deliver(loop, future, result, None)

    def _deliver(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[T],
        result: T | None,
        exc: BaseException | None,
    ) -> None:
        def settle() -> None:
            self.running -= 1
            if self._slots is not None:
                self._slots.release()  # only now: a frozen read keeps its slot while it waits
            if future.done():
                return  # the request gave up waiting (timeout) or went away
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(result)  # type: ignore[arg-type]

        with contextlib.suppress(RuntimeError):  # the loop closed while the read waited
            loop.call_soon_threadsafe(settle)


def _first_line(exc: BaseException) -> str:
    """The driver's own message (SQLAlchemy's adds the statement and a link), one line."""
    return first_line(getattr(exc, "orig", None) or exc)[:200]
