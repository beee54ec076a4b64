"""ccm.server.eager_send drives a coroutine by hand and resumes it with asyncio's future protocol
(private to asyncio). These tests fail loudly if asyncio or starlette change what it relies on."""

from __future__ import annotations

import asyncio

import pytest

from ccm.server import eager_send


async def _no_wait(log: list[str]) -> None:
    log.append("ran")


async def _waits_on(future: asyncio.Future[str], log: list[str]) -> None:
    log.append("started")
    log.append(await future)


def test_a_coroutine_that_does_not_wait_finishes_on_the_callers_stack() -> None:
    """No suspension: `start` returns None and the coroutine's work is done."""
    log: list[str] = []
    assert eager_send.start(_no_wait(log)) is None
    assert log == ["ran"]


def test_a_coroutine_that_waits_is_finished_by_a_task() -> None:
    """It runs up to its first wait at once; a task finishes it once the future resolves."""

    async def scenario() -> list[str]:
        log: list[str] = []
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        suspended = eager_send.start(_waits_on(future, log))
        assert suspended is not None
        assert log == ["started"]
        task = asyncio.create_task(suspended.finish())
        await asyncio.sleep(0)
        future.set_result("resumed")
        await task
        return log

    assert asyncio.run(scenario()) == ["started", "resumed"]


def test_a_timeout_cancels_the_suspended_coroutine() -> None:
    """A cancellation of the finishing task (the send timeout) reaches the coroutine."""

    async def scenario() -> None:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        suspended = eager_send.start(_waits_on(future, []))
        assert suspended is not None
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await suspended.finish()
        assert future.cancelled()

    asyncio.run(scenario())


def test_what_the_coroutine_raises_at_once_is_raised_by_start() -> None:
    """A send on a closed socket fails in its first step: the caller sees the error."""

    async def broken() -> None:
        raise OSError("gone")

    with pytest.raises(OSError, match="gone"):
        eager_send.start(broken())
