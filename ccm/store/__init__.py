"""Durable history in SQL: models, engine, the batching writer and the Store that uses it."""

from __future__ import annotations

from ccm.config import Settings
from ccm.store.engine import make_engine
from ccm.store.repository import Store
from ccm.store.writer import StoreWriter

__all__ = ["Store", "StoreWriter", "open_store"]


def open_store(settings: Settings, *, url: str | None = None) -> Store:
    """Build the engine, writer and Store for `settings` (the writer is not started yet)."""
    engine = make_engine(
        url or settings.database_url,
        sqlite_synchronous=settings.database.sqlite_synchronous,
        pool_size=settings.database.pool_size,
    )
    writer = StoreWriter(
        engine,
        batch_size=settings.writer.batch_size,
        max_queue=settings.writer.max_queue,
        retry_interval=settings.writer.retry_interval.total_seconds(),
    )
    return Store(engine, writer)
