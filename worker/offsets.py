"""The offset books of one consumer: per partition, how far records were handed to lanes,
committed to the database and committed to Kafka.

No I/O here: the consumer tells the book what happened and asks it where to rewind, what
to commit and how far behind it is. Every number is a *next* offset (the offset of the
first record not yet covered), as Kafka commits and `consumer_offsets.next_offset` store.
Offsets need not be contiguous (compaction and transaction markers leave gaps), so the
book never derives one offset from another by adding one, except past a record it was
told about.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from aiokafka.structs import TopicPartition


class OffsetBook:
    def __init__(self) -> None:
        self._handed: dict[TopicPartition, int] = {}  # next offset not yet handed to a lane
        self._done: dict[TopicPartition, int] = {}  # next offset committed to the database
        self._committed: dict[TopicPartition, int] = {}  # next offset committed to Kafka

    # ------------------------------------------------------------------ assignment

    def assigned(self, tp: TopicPartition, *, position: int, stored: int | None) -> None:
        """A partition was assigned: reading starts at `position`; `stored` is the database's
        next offset, if it has one (the consumer seeks there, so it equals `position`)."""
        if stored is not None:
            self._done[tp] = stored
        self._handed[tp] = position

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """The partitions were revoked: their next owner keeps its own books."""
        for tp in partitions:
            self._handed.pop(tp, None)
            self._done.pop(tp, None)
            self._committed.pop(tp, None)

    # ------------------------------------------------------------------ fetching

    def handed(self, tp: TopicPartition, last_offset: int) -> None:
        """Records up to `last_offset` (inclusive) were handed to a lane."""
        self._handed[tp] = last_offset + 1

    def given_back(self, tp: TopicPartition, offset: int) -> None:
        """Records from `offset` on were taken back from a lane: reading resumes there."""
        self._handed[tp] = offset

    def rewind_point(self, tp: TopicPartition) -> int | None:
        """Where reading must resume so that no record is skipped (None: not known yet)."""
        return self._handed.get(tp)

    # ------------------------------------------------------------------ committing

    def applied(self, next_offsets: Mapping[tuple[str, int], int]) -> None:
        """The database committed a batch; `next_offsets` is its `BatchReport.next_offsets`."""
        for (topic, partition), offset in next_offsets.items():
            tp = TopicPartition(topic, partition)
            self._done[tp] = max(self._done.get(tp, 0), offset)

    def to_commit(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """What to commit to Kafka for these partitions: the database's offsets not yet sent."""
        wanted = set(partitions)
        return {
            tp: offset
            for tp, offset in self._done.items()
            if tp in wanted and offset > self._committed.get(tp, -1)
        }

    def committed(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Kafka acknowledged these commits."""
        self._committed.update(offsets)

    # ------------------------------------------------------------------ lag

    def lag(self, tp: TopicPartition, highwater: int) -> int:
        """Records behind the high watermark as Kafka sees it (the committed offset, before
        the first commit the database's): the per-partition lag metric."""
        return max(0, highwater - self._committed.get(tp, self._done.get(tp, 0)))

    def backlog(self, tp: TopicPartition, highwater: int) -> int:
        """Records behind the high watermark not yet committed to the database."""
        return max(0, highwater - self._done.get(tp, 0))
