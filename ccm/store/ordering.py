"""The order in which the writer applies a batch: writes of one kind grouped together where
that cannot change the result, so that each group goes out as one executemany."""

from __future__ import annotations

from ccm.store.writes import MOVABLE, QueuedWrite, Write

# Within a batch, writes of the kinds in `MOVABLE` (ccm.store.writes) may be moved so that writes
# of one kind run as one executemany (relay traffic interleaves session creates and ends, which
# would otherwise be groups of one). A batch is applied as segments, each sorted stably by rank.
# The order only changes where that cannot change the result: each movable write reads and
# writes only the rows it names, so writes on different rows commute; and a segment ends before
# any write whose rank is lower than that of an earlier write on one of its rows, so every row
# sees its writes in their queued order. Any other kind, or a CustomWrite, is a barrier.
_RANKS = 1 + max(movable.rank for movable in MOVABLE.values())


def batch_order(writes: list[QueuedWrite]) -> list[QueuedWrite]:
    """`writes` in the order the writer applies them: grouped by kind where that gives the same
    final state as applying them one by one in queued order (see the comment above)."""
    out: list[QueuedWrite] = []
    by_rank: list[list[QueuedWrite]] = [[] for _ in range(_RANKS)]
    """The current segment, stably partitioned by rank."""
    last_rank: dict[tuple[str, object], int] = {}
    """Highest rank among the segment's writes on each row."""

    def close() -> None:
        for bucket in by_rank:
            out.extend(bucket)
            bucket.clear()
        last_rank.clear()

    for write in writes:
        movable = MOVABLE.get(write.kind) if isinstance(write, Write) else None
        if movable is not None:
            assert isinstance(write, Write)
            try:
                rows = movable.rows(write.params)
            except KeyError:  # a write without its key parameters: keep it in place
                rows = ()
            if rows and all(type(key) is str for _, key in rows):
                rank = movable.rank
                for row in rows:
                    if last_rank.get(row, rank) > rank:
                        close()  # an earlier write on this row must stay before this one
                        break
                for row in rows:
                    last_rank[row] = rank  # the highest: lower ranks closed the segment
                by_rank[rank].append(write)
                continue
        close()  # a barrier: nothing moves across it
        out.append(write)
    close()
    return out
