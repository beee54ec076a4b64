"""HistoryReads: history queries run in threads of their own, at most `limits.max_history_reads`
at once, each answered within `limits.history_timeout`, database failures as HistoryUnavailable.
The reads here are plain blocking functions (what the repository's read functions are to it); the
frozen and stopped Postgres cases are tests/reliability/test_history_outage.py."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta

import pytest
from sqlalchemy.exc import OperationalError, ProgrammingError

from ccm.config import LimitsSettings
from ccm.errors import HistoryUnavailable
from ccm.server.history import HistoryReads

LIMITS = LimitsSettings(history_timeout=timedelta(seconds=0.3), max_history_reads=2)


def test_a_read_returns_its_result() -> None:
    """A read that answers in time gives its value back."""
    assert asyncio.run(HistoryReads(LIMITS).run(lambda a, b: a + b, 2, b=3)) == 5


def test_a_read_past_the_timeout_is_unavailable_naming_the_setting() -> None:
    """A read that blocks (a frozen database) is answered within the timeout, with a text that
    names `limits.history_timeout`."""
    release = threading.Event()
    reads = HistoryReads(LIMITS)

    async def scenario() -> str:
        with pytest.raises(HistoryUnavailable) as caught:
            await reads.run(release.wait, 30)
        return str(caught.value)

    try:
        text = asyncio.run(scenario())
    finally:
        release.set()
    assert "limits.history_timeout" in text


def test_reads_left_hanging_keep_their_slots() -> None:
    """With both slots held by reads that hang, a third read is refused at the timeout without
    starting a thread; once the hanging reads return, reads run again."""
    release = threading.Event()
    reads = HistoryReads(LIMITS)
    started: list[int] = []

    def hang(n: int) -> int:
        started.append(n)
        release.wait(30)
        return n

    async def scenario() -> tuple[list[object], int]:
        outcomes = await asyncio.gather(
            *(reads.run(hang, n) for n in range(3)), return_exceptions=True
        )
        release.set()
        # The two hanging threads return and give their slots back (from their own threads,
        # through the loop: there is no event to wait on).
        while reads.running:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        return outcomes, await reads.run(lambda: 7)

    outcomes, after = asyncio.run(scenario())
    assert all(isinstance(o, HistoryUnavailable) for o in outcomes)
    assert sorted(started) == [0, 1]  # the third never got a thread
    assert after == 7


def test_a_database_error_is_unavailable() -> None:
    """OperationalError (connection refused, server gone) becomes HistoryUnavailable."""

    def refused() -> None:
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))

    with pytest.raises(HistoryUnavailable, match="database is unavailable"):
        asyncio.run(HistoryReads(LIMITS).run(refused))


def test_a_bug_is_not_hidden_as_unavailable() -> None:
    """A ProgrammingError (bad SQL: our bug, not an outage) is raised as it is."""

    def bad_sql() -> None:
        raise ProgrammingError("SELECT nope", {}, Exception("no such column"))

    with pytest.raises(ProgrammingError):
        asyncio.run(HistoryReads(LIMITS).run(bad_sql))
