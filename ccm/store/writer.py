"""The store writer: one thread that applies queued writes in batches, one transaction per batch.

Callers on the event loop (or any thread) only append to a queue, so they never wait on I/O. A
caller that needs the durable point awaits `durable()`: it resolves once every write queued before
it is committed. While the database is away, the batch is retried with the same writes, which are
idempotent (upserts and guarded updates), so nothing is lost or applied twice.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError, StatementError

from ccm.errors import NodeFenced, StoreBacklogFull, StoreUnavailable
from ccm.store.ordering import batch_order
from ccm.store.statements import bind_rows, prepared_for, statements_for
from ccm.store.waiters import CommitWaiters
from ccm.store.writes import BatchHooks, CustomWrite, QueuedWrite, Write, WriterStats, describe

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Barrier:
    future: concurrent.futures.Future[None] = field(default_factory=concurrent.futures.Future)


class StoreWriter:
    """Drains queued writes into the database in batches (group commit)."""

    def __init__(
        self,
        engine: Engine,
        *,
        batch_size: int = 500,
        max_queue: int = 100_000,
        retry_interval: float = 1.0,
        stall_after: float = 2.0,
    ) -> None:
        self._engine = engine
        self._batch_size = batch_size
        self._max_queue = max_queue
        self._retry_interval = retry_interval
        self._stall_after = stall_after
        self._busy_since: float | None = None
        """monotonic() when the batch being applied was first tried; None when idle."""
        self._queue: collections.deque[QueuedWrite | _Barrier] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._batches = 0
        self._committed = 0
        self._failed = 0
        self._failed_by_kind: dict[str, int] = {}
        self._last_failure: str | None = None
        self._degraded = False
        self._last_error: str | None = None
        self._last_batch = 0
        self._last_commit = 0.0
        self.on_commit: Callable[[int, float], None] | None = None
        """Called from the writer thread after each committed batch: (writes, seconds)."""
        self.hooks: BatchHooks | None = None
        self._fenced: NodeFenced | None = None
        self._waiters = CommitWaiters(self._cond)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="ccm-store-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> bool:
        """Apply everything queued, then stop. Returns False if the queue could not be drained."""
        thread = self._thread
        if thread is None:
            # Never started: apply the queue here, so stop() keeps its promise either way.
            with contextlib.suppress(OperationalError):  # logged by _mark_degraded; reported below
                self._drain_inline()
            if self._queue:
                logger.error("store writer stopped with %d writes not applied", len(self._queue))
            return not self._queue
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread.join(timeout)
        self._thread = None
        drained = not thread.is_alive() and not self._queue
        if not drained:
            logger.error(
                "store writer stopped with %d writes not applied (database unavailable: %s)",
                len(self._queue),
                self._last_error,
            )
        return drained

    @property
    def running(self) -> bool:
        return self._thread is not None

    # -- producers ---------------------------------------------------------------------------

    def submit(self, write: QueuedWrite) -> None:
        """Queue a write. Never blocks on I/O."""
        with self._cond:
            self._queue.append(write)
            self._waiters.queued()
            if len(self._queue) == 1 or len(self._queue) >= self._batch_size:
                self._cond.notify()

    def has_capacity(self) -> bool:
        """Whether new durable work (a session) may be accepted."""
        return len(self._queue) < self._max_queue

    @property
    def degraded(self) -> bool:
        """The database is not taking writes: the last attempt failed, or one is stuck."""
        return self._degraded or self._stalled_for() is not None

    def reserve(self) -> None:
        """Raise StoreBacklogFull when the queue is at its bound, StoreUnavailable while the
        database is not taking writes: new durable work (a session) cannot be confirmed."""
        if self._fenced is not None:
            raise self._fenced
        if not self.has_capacity():
            raise StoreBacklogFull(
                f"the database is not keeping up ({len(self._queue)} writes queued, "
                f"bound {self._max_queue}); new sessions are refused until it recovers"
            )
        if self.degraded:
            raise StoreUnavailable(
                f"the database is not taking writes ({self.stats().last_error}); "
                "new sessions are refused until it recovers"
            )

    def flush(self) -> concurrent.futures.Future[None]:
        """A future that resolves once every write queued so far is committed."""
        barrier = _Barrier()
        if self._thread is None:
            # Not running: apply synchronously so callers still get the durable point.
            self._drain_inline()
            barrier.future.set_result(None)
            return barrier.future
        with self._cond:
            self._queue.append(barrier)
            self._cond.notify()
        return barrier.future

    async def durable(self) -> None:
        """Await the commit of every write queued before this call.

        Group commit for event loops: a waiter is a sequence number and a loop future, and
        after each batch the writer wakes every loop once for all the waiters it covered, so
        many sessions acknowledged by one commit cost one wake-up, not one barrier each."""
        if self._fenced is not None:
            raise self._fenced
        if self._thread is None:
            await asyncio.wrap_future(self.flush())  # not running: flush applies inline
            return
        await self._waiters.wait()

    def discard(self, error: NodeFenced) -> int:
        """Drop every queued write (a fenced node's, which must lose), failing their waiters
        with `error`. Returns how many were dropped."""
        with self._cond:
            queued, self._queue = list(self._queue), collections.deque()
        for item in queued:
            if isinstance(item, _Barrier) and not item.future.done():
                item.future.set_exception(error)
        dropped = sum(1 for item in queued if not isinstance(item, _Barrier))
        self._waiters.release(dropped, error)
        return dropped

    def unfence(self) -> None:
        """The node rejoined the cluster under a new run: writes may land again."""
        self._fenced = None

    @property
    def fenced(self) -> bool:
        return self._fenced is not None

    def stats(self) -> WriterStats:
        stalled = self._stalled_for()
        return WriterStats(
            queue_depth=sum(1 for item in list(self._queue) if not isinstance(item, _Barrier)),
            max_queue=self._max_queue,
            batches_committed=self._batches,
            writes_committed=self._committed,
            writes_failed=self._failed,
            failed_by_kind=dict(self._failed_by_kind),
            last_failure=self._last_failure,
            degraded=self._degraded or stalled is not None,
            last_error=(
                f"a commit has waited {stalled:.0f} s for the database (locked or unreachable)"
                if stalled is not None and not self._degraded
                else self._last_error
            ),
            last_batch_size=self._last_batch,
            last_commit_seconds=self._last_commit,
        )

    # -- the writer thread -------------------------------------------------------------------

    def _take_batch(self) -> list[QueuedWrite | _Barrier]:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            batch: list[QueuedWrite | _Barrier] = []
            writes = 0
            while self._queue and writes < self._batch_size:
                item = self._queue.popleft()
                batch.append(item)
                if not isinstance(item, _Barrier):
                    writes += 1
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                if self._stopping:
                    return
                continue
            if not self._apply_until_done(batch):
                # Stopping while the database is away: put the batch back so stop() reports it.
                with self._cond:
                    self._queue.extendleft(reversed(batch))
                return

    def _drain_inline(self) -> None:
        while self._queue:
            batch: list[QueuedWrite | _Barrier] = []
            while self._queue and len(batch) < self._batch_size:
                batch.append(self._queue.popleft())
            try:
                self._apply_until_done(batch, retry=False)
            except OperationalError:
                self._queue.extendleft(reversed(batch))  # keep them queued, not lost
                raise

    def _stalled_for(self) -> float | None:
        """Seconds the current batch has waited, if longer than `stall_after`: a database that
        blocks (a lock held elsewhere, a port that drops packets) raises nothing for a long
        time, but it is not taking writes either."""
        since = self._busy_since
        if since is None:
            return None
        waited = time.monotonic() - since
        return waited if waited > self._stall_after else None

    def _apply_until_done(self, batch: list[QueuedWrite | _Barrier], *, retry: bool = True) -> bool:
        writes = [item for item in batch if not isinstance(item, _Barrier)]
        deadline: float | None = None
        self._busy_since = time.monotonic() if writes else None
        while writes:  # a batch of only flush markers needs no transaction
            try:
                started = time.perf_counter()
                self._commit(writes)
                self._last_commit = time.perf_counter() - started
                break
            except NodeFenced as exc:
                # The cluster declared this node dead: these writes must lose, and nobody may be
                # told they are durable. The node fences itself and rejoins (unfence).
                if self._fenced is None:
                    logger.warning("store writes refused: %s", exc)
                self._fenced = exc
                self._failed += len(writes)
                self._busy_since = None
                for item in batch:
                    if isinstance(item, _Barrier) and not item.future.done():
                        item.future.set_exception(exc)
                self._waiters.release(len(writes), exc)
                return True
            except OperationalError as exc:
                # Transient: the database is away or locked. Keep the batch and try again.
                self._mark_degraded(exc)
                if not retry:
                    self._busy_since = None
                    raise
                if self._stopping:
                    deadline = deadline or time.monotonic() + 10 * self._retry_interval
                    if time.monotonic() > deadline:
                        return False
                time.sleep(self._retry_interval)
            except Exception as exc:  # noqa: BLE001 - the writer thread is an edge: it must never die
                # Not transient: one write is bad (refused by the database, or a value that cannot
                # be bound, which SQLAlchemy raises before the DBAPI is called, or that the driver
                # cannot even encode). Apply them one by one and drop only the bad one.
                logger.error("batch of %d writes failed (%s); retrying singly", len(writes), exc)
                self._commit_singly(writes)
                break
        self._busy_since = None
        if self._degraded:
            logger.warning("database writes recovered after: %s", self._last_error)
        self._degraded = False
        if writes:
            self._batches += 1
            self._last_batch = len(writes)
            if self.on_commit is not None:
                self.on_commit(len(writes), self._last_commit)
        for item in batch:
            if isinstance(item, _Barrier) and not item.future.done():
                item.future.set_result(None)
        self._waiters.release(len(writes))
        return True

    def _commit(self, writes: list[QueuedWrite]) -> None:
        with self._engine.begin() as conn:
            hooks = self.hooks
            if hooks is not None:
                hooks.before(conn)
            statements = statements_for(conn.dialect.name)
            prepared = prepared_for(conn.dialect)
            writes = batch_order(writes)
            i = 0
            while i < len(writes):
                write = writes[i]
                if isinstance(write, CustomWrite):
                    write.apply(conn)
                    i += 1
                    continue
                # Group consecutive writes of the same kind into one executemany per statement.
                keys = {write.key}
                params = [write.params]
                j = i + 1
                while j < len(writes):
                    other = writes[j]
                    if not isinstance(other, Write) or other.kind != write.kind:
                        break
                    if other.key in keys:
                        break
                    keys.add(other.key)
                    params.append(other.params)
                    j += 1
                for statement, fast in zip(
                    statements[write.kind], prepared[write.kind], strict=True
                ):
                    if fast is None:
                        conn.execute(statement, params if len(params) > 1 else params[0])
                    else:
                        rows = bind_rows(fast, params)
                        conn.exec_driver_sql(fast.sql, rows if len(rows) > 1 else rows[0])
                i = j
            if hooks is not None:
                hooks.after(conn, writes)
        self._committed += len(writes)

    def _commit_singly(self, writes: list[QueuedWrite]) -> None:
        for write in writes:
            while True:
                try:
                    self._commit([write])
                except OperationalError as exc:  # the database went away meanwhile: same write
                    self._mark_degraded(exc)
                    if not self._stopping:
                        time.sleep(self._retry_interval)
                        continue
                    self._lost(write, exc, traceback=False)
                except Exception as exc:  # noqa: BLE001 - refused by the database: report, go on
                    # A driver-level error (not a StatementError) is unexpected: keep its traceback.
                    self._lost(write, exc, traceback=not isinstance(exc, StatementError))
                break

    def _lost(self, write: QueuedWrite, exc: Exception, *, traceback: bool) -> None:
        """A write the database refused for good: never silent. It is logged at ERROR with
        what was lost, and counted by kind (`stats().failed_by_kind`, /metrics, /api/health)."""
        kind = write.kind if isinstance(write, Write) else write.name
        self._failed += 1
        self._failed_by_kind[kind] = self._failed_by_kind.get(kind, 0) + 1
        what = describe(write)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        self._last_failure = f"{kind} {what}: {reason}"
        logger.error(
            "write refused by the database and lost: kind=%s %s error=%s",
            kind,
            what,
            reason,
            exc_info=traceback,
        )

    def _mark_degraded(self, exc: Exception) -> None:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not self._degraded or message != self._last_error:
            logger.warning(
                "database unavailable, writes queued (%d): %s", len(self._queue), message
            )
        self._degraded = True
        self._last_error = message
