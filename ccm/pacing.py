"""How the cleanup paces its batches beside a live server on the same database.

Each batch runs in its own transaction (`_Pacer.run`), and the job rests between batches:

- SQLite has one write lock, and a writer that finds it taken polls for it, sleeping up to
  100 ms between tries. While another connection writes, a batch holds the lock about 2 ms and
  the job rests about three times as long (`_SqlitePacer`): the server's commits wait a few
  milliseconds at most, and the job deletes about 2,000 rows/s. While nobody else writes (a
  stopped server), batches grow to `batch_size` (about 15,000 to 20,000 rows/s).
- PostgreSQL locks rows, so the server's writes never wait on the cleanup; but deleting is CPU
  and WAL I/O (heap pages rewritten, full-page images) that the server's commits queue behind.
  The job rests half as long as each batch took (`_POSTGRES_REST_RATIO`).

tests/benchmarks/cleanup_bench.py measures both against a live relay load.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import Connection

_POSTGRES_REST_RATIO = 0.5
"""On PostgreSQL, rest half as long as each batch took. Measured beside a live server: with no
rest the p99 of its small commits went from about 5 ms to 10-17 ms, with this rest to about 7 ms
(at about 200,000 rows/s); longer rests cost rows/s without a measurable gain."""
_POSTGRES_LOCAL: tuple[str, ...] = ("enable_seqscan = off",)
"""Settings for the cleanup's own transactions on PostgreSQL (see `_PostgresPacer`)."""


class _Pacer:
    """Runs each batch in its own transaction, resting between batches: after a batch that
    deleted rows, the next one waits `pause` seconds, or (`pause` None) `rest_ratio` times as
    long as that batch took."""

    def __init__(
        self, conn: Connection, batch_size: int, pause: float | None, rest_ratio: float = 0.0
    ) -> None:
        self.conn = conn
        self.batch_size = batch_size
        self.pause = pause
        self.rest_ratio = rest_ratio
        self.took = 0.0
        self.owed = False
        """The last batch deleted rows: rest before the next one."""

    def batch(self) -> int:
        return self.batch_size

    def run(self, work: Callable[[], int]) -> int:
        if self.owed:
            self.rest()
        started = time.perf_counter()
        try:
            deleted = self._transaction(work)
            self.conn.commit()
        except BaseException:
            self.conn.rollback()
            raise
        self.took = time.perf_counter() - started
        self.owed = deleted > 0
        self._measured(deleted)
        return deleted

    def _transaction(self, work: Callable[[], int]) -> int:
        return work()

    def _measured(self, deleted: int) -> None:
        """Called after each committed batch."""

    def rest(self) -> None:
        rest = self.took * self.rest_ratio if self.pause is None else self.pause
        if rest > 0:
            time.sleep(rest)


class _PostgresPacer(_Pacer):
    """Batches of `batch_size`, each with `_POSTGRES_LOCAL` set for its transaction only.

    `enable_seqscan = off`: a window the planner thinks large would otherwise be searched by a
    sequential scan from the first heap page, stepping over every row deleted before it.

    Not `synchronous_commit = off`, though a lost deletion would only come back whole and be
    deleted by the next run: measured, it made the server's own commits slower (p99 of a small
    commit 10-17 ms -> 65-69 ms), since they then flush the cleanup's WAL."""

    def _transaction(self, work: Callable[[], int]) -> int:
        for setting in _POSTGRES_LOCAL:
            self.conn.exec_driver_sql(f"SET LOCAL {setting}")
        return work()


class _SqlitePacer(_Pacer):
    """Sizes batches by how long they hold SQLite's write lock, and rests between them.

    Busy (another connection writes): a batch holds the lock about `BUSY_HOLD` seconds and the
    job then rests `BUSY_REST_RATIO` times as long (at least `MIN_REST`). A writer that finds the
    lock taken sleeps 1, 2, 5, 10 ... 100 ms between tries (SQLite's busy handler), so a hold of
    a couple of milliseconds costs it one or two short sleeps, and the rest lets it in before
    the next batch. Idle (nobody else has committed for `LISTEN` seconds): batches grow towards
    `batch_size`, each holding the lock at most `IDLE_HOLD`, with no rest but a `LISTEN` every
    `IDLE_WORK` seconds of deleting; any commit by another connection means busy again.

    Another connection's commits show in `PRAGMA data_version`. One that waits in its busy
    handler does not, so only a silence longer than that handler's longest sleep counts as
    idle: the job listens (polls data_version) for `LISTEN` seconds, without the lock.

    The batch takes the lock with BEGIN IMMEDIATE, so the time measured is the time it held
    the lock. The WAL checkpoint runs in every rest, outside the lock: left to SQLite's
    autocheckpoint (1,000 pages) it runs on whichever connection commits next, often the
    server's writer, on its commit path (checkpointing only every 100 ms raised the p99 of a
    concurrent writer's commits from 24 ms to 227 ms)."""

    BUSY_HOLD = 0.002
    BUSY_REST_RATIO = 3.0
    MIN_REST = 0.006
    IDLE_HOLD = 0.25
    IDLE_WORK = 1.0
    LISTEN = 0.2
    POLL = 0.005
    START = 20

    def __init__(self, conn: Connection, batch_size: int, pause: float | None) -> None:
        super().__init__(conn, batch_size, pause)
        self.adaptive = pause is None
        self.size = min(batch_size, self.START) if self.adaptive else batch_size
        self.busy = True
        self.quiet = False
        """The last rest saw no commit by another connection."""
        self.worked = 0.0
        """Seconds holding the lock since the last listen (idle)."""
        self.held = 0.0
        self.locked_at = 0.0
        self.data_version = self._data_version()

    def _data_version(self) -> int:
        version = int(self.conn.exec_driver_sql("PRAGMA data_version").scalar_one())
        self.conn.commit()
        return version

    def _others_committed(self) -> bool:
        version = self._data_version()
        changed = version != self.data_version
        self.data_version = version
        return changed

    def batch(self) -> int:
        return self.size

    def _transaction(self, work: Callable[[], int]) -> int:
        self.conn.exec_driver_sql("BEGIN IMMEDIATE")  # waits for the lock, then holds it
        self.locked_at = time.perf_counter()
        return work()

    def _measured(self, deleted: int) -> None:
        self.held = time.perf_counter() - self.locked_at
        self.worked += self.held
        if self.adaptive and deleted == self.size:
            goal = self.BUSY_HOLD if self.busy else self.IDLE_HOLD
            scale = min(2.0, max(0.5, goal / max(self.held, 1e-4)))
            self.size = max(1, min(self.batch_size, int(self.size * scale)))

    def rest(self) -> None:
        started = time.perf_counter()
        self.conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")  # every rest: see above
        self.conn.commit()
        if not self.adaptive:
            super().rest()
            return
        if self.busy:
            left = max(self.MIN_REST, self.held * self.BUSY_REST_RATIO)
            left -= time.perf_counter() - started
            if left > 0:
                time.sleep(left)
            if self._others_committed():
                self.quiet = False
            elif not self.quiet:
                self.quiet = True  # listen at the next rest
            elif self._listen():
                self.busy, self.worked = False, 0.0
        elif self._others_committed() or (self.worked >= self.IDLE_WORK and not self._listen()):
            self.busy, self.quiet = True, False
            self.size = min(self.size, self.START)
        elif self.worked >= self.IDLE_WORK:
            self.worked = 0.0

    def _listen(self) -> bool:
        """Poll for `LISTEN` seconds without the lock: True if nobody else committed."""
        deadline = time.perf_counter() + self.LISTEN
        while time.perf_counter() < deadline:
            time.sleep(self.POLL)
            if self._others_committed():
                return False
        return True


@contextmanager
def pacer_for(
    conn: Connection, dialect: str, batch_size: int, pause: float | None
) -> Iterator[_Pacer]:
    if dialect == "sqlite":
        with _sqlite_tuned(conn):
            yield _SqlitePacer(conn, batch_size, pause)
    elif dialect == "postgresql":
        yield _PostgresPacer(conn, batch_size, pause, rest_ratio=_POSTGRES_REST_RATIO)
    else:
        yield _Pacer(conn, batch_size, pause)


@contextmanager
def _sqlite_tuned(conn: Connection) -> Iterator[None]:
    """The cleanup does its own WAL checkpoints (in `_SqlitePacer.rest`); SQLite's automatic
    one is put back before the pool hands the connection out again."""
    saved = int(conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar_one())
    conn.exec_driver_sql("PRAGMA wal_autocheckpoint = 0")
    conn.commit()
    try:
        yield
    finally:
        conn.rollback()
        conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")  # the last batch's pages
        conn.exec_driver_sql(f"PRAGMA wal_autocheckpoint = {saved}")
        conn.commit()
