"""How far each owned partition's freshly applied results are known acknowledged.

A fresh apply stores its results once, in its inbox row, and they are published from
memory after the commit (no outbox row). `consumer_offsets.published_offset` of a
partition is a claim: every inbox row of that partition with `source_offset` below it
has had its results acknowledged by the broker. Claims are full prefixes, so the
greater of two true claims is true (the UPDATEs take GREATEST), also when a zombie and
the new owner both claim.

This process claims `covered` only from evidence it holds:
- a catch-up: the partition's `next_offset` E read from the database, then every inbox
  row below E from `covered` on republished and acknowledged (every inbox row of a
  partition lies below its `next_offset`: a row and the offset past it commit together);
- a committed batch: its transaction locked the offset row and read `next_offset` as S,
  so the inbox rows in [S, E) are exactly the rows it wrote; once they are acknowledged
  and `covered` >= S, `covered` becomes E.
A batch whose S lies above `covered` (another worker applied [covered, S): a zombie, or
a predecessor not yet caught up), or whose publication failed (broker away: its copies
are dropped, memory stays bounded), leaves a gap: `covered` stops there until a catch-up
republishes the range from the inbox.

No I/O here: `publisher.Publisher` sends and stores, this only keeps the books.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

TopicPartition = tuple[str, int]


@dataclass(slots=True)
class Batch:
    """The fresh results of one committed transaction of one partition: inbox rows in
    [start, end), published from memory."""

    tp: TopicPartition
    start: int
    end: int
    done: bool = False
    failed: bool = False


@dataclass(slots=True)
class _Partition:
    covered: int  # every inbox row below is acknowledged
    stored: int  # the watermark the database holds, as far as this process wrote or read it
    claimed: int | None = None  # folded into a batch's offset UPDATE, commit not yet known
    batches: deque[Batch] = field(default_factory=deque)
    gap: bool = True  # a catch-up from the inbox is due (always after an assignment)


class Watermarks:
    def __init__(self) -> None:
        self._parts: dict[TopicPartition, _Partition] = {}

    def assign(self, tp: TopicPartition, published: int) -> None:
        """`tp` is now ours; its database watermark is `published`. A catch-up is due."""
        self._parts[tp] = _Partition(covered=published, stored=published)

    def forget(self, tp: TopicPartition) -> None:
        self._parts.pop(tp, None)

    def owned(self) -> list[TopicPartition]:
        return sorted(self._parts)

    def covered(self, tp: TopicPartition) -> int | None:
        part = self._parts.get(tp)
        return None if part is None else part.covered

    def committed(self, tp: TopicPartition, start: int, end: int, results: int) -> Batch:
        """A transaction of `tp` committed its fresh inbox rows [start, end) with `results`
        results to publish. The batch is tracked if `tp` is ours (else its results are
        published, but claim nothing: the owner's catch-up covers them)."""
        batch = Batch(tp, start, max(start, end), done=results == 0)
        part = self._parts.get(tp)
        if part is not None:
            part.batches.append(batch)
            self._advance(part)
        return batch

    def settled(self, batch: Batch, failed: bool) -> None:
        """The broker acknowledged all of `batch`'s results, or not (`failed`)."""
        batch.done = True
        batch.failed = failed
        part = self._parts.get(batch.tp)
        if part is not None:
            self._advance(part)

    def gapped(self) -> list[TopicPartition]:
        """Owned partitions that need a catch-up from the inbox."""
        return sorted(tp for tp, part in self._parts.items() if part.gap)

    def adopt(self, tp: TopicPartition, published: int) -> None:
        """The database's watermark of `tp` is `published` (a true claim, whoever made it)."""
        part = self._parts.get(tp)
        if part is not None:
            part.covered = max(part.covered, published)
            part.stored = max(part.stored, published)
            self._advance(part)

    def caught_up(self, tp: TopicPartition, start: int, end: int) -> None:
        """Every inbox row of `tp` in [start, end) was republished and acknowledged, `start`
        being at or below `covered` when the catch-up read `end` (the database's
        next_offset then, or its watermark)."""
        part = self._parts.get(tp)
        if part is None or start > part.covered:
            return
        part.covered = max(part.covered, end)
        part.gap = False
        # Batches wholly below are covered by the catch-up (a batch committed after the
        # catch-up read `end` starts at or above it).
        while part.batches and part.batches[0].end <= part.covered:
            part.batches.popleft()
        self._advance(part)

    def claim(self, tp: TopicPartition) -> int | None:
        """The watermark to fold into a transaction's offset UPDATE (None: nothing new)."""
        part = self._parts.get(tp)
        if part is None or part.covered <= part.stored:
            return None
        part.claimed = part.covered
        return part.covered

    def claims_committed(self, partitions: list[TopicPartition]) -> None:
        """The transactions that folded this process's claims for `partitions` committed."""
        for tp in partitions:
            part = self._parts.get(tp)
            if part is not None and part.claimed is not None:
                part.stored = max(part.stored, part.claimed)
                part.claimed = None

    def to_store(self, partitions: list[TopicPartition] | None = None) -> dict[TopicPartition, int]:
        """Watermarks known higher than stored (of `partitions`, default all owned)."""
        wanted = self._parts.keys() if partitions is None else partitions
        return {
            tp: part.covered
            for tp in wanted
            if (part := self._parts.get(tp)) is not None and part.covered > part.stored
        }

    def stored(self, marks: dict[TopicPartition, int]) -> None:
        for tp, mark in marks.items():
            part = self._parts.get(tp)
            if part is not None:
                part.stored = max(part.stored, mark)

    def _advance(self, part: _Partition) -> None:
        while part.batches:
            head = part.batches[0]
            if head.end <= part.covered:
                part.batches.popleft()  # covered already (by a catch-up)
                continue
            if not head.done:
                return
            if head.failed or head.start > part.covered:
                part.gap = True  # its rows, or rows before it, come back from the inbox
                return
            part.covered = head.end
            part.batches.popleft()
