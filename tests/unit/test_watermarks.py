"""The published watermark's books: a claim is made only from evidence (worker/watermarks.py)."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from worker.watermarks import Batch, Watermarks

TP = ("in", 0)


def test_acknowledged_batches_advance_in_order_and_a_later_one_waits_for_an_earlier() -> None:
    marks = Watermarks()
    marks.assign(TP, 0)
    marks.caught_up(TP, 0, 10)  # the assignment's catch-up: [0, 10) acknowledged
    assert marks.covered(TP) == 10
    first = marks.committed(TP, 10, 20, results=3)
    second = marks.committed(TP, 20, 25, results=1)
    marks.settled(second, failed=False)
    assert marks.covered(TP) == 10  # the earlier batch is not acknowledged yet
    marks.settled(first, failed=False)
    assert marks.covered(TP) == 25
    assert marks.gapped() == []


def test_a_batch_without_results_advances_at_once() -> None:
    marks = Watermarks()
    marks.assign(TP, 4)
    marks.caught_up(TP, 4, 4)
    marks.committed(TP, 4, 9, results=0)
    assert marks.covered(TP) == 9


def test_a_failed_publication_leaves_a_gap_until_a_catch_up_covers_it() -> None:
    marks = Watermarks()
    marks.assign(TP, 0)
    marks.caught_up(TP, 0, 0)
    lost = marks.committed(TP, 0, 10, results=5)
    after = marks.committed(TP, 10, 12, results=1)
    marks.settled(lost, failed=True)
    marks.settled(after, failed=False)
    assert marks.covered(TP) == 0
    assert marks.gapped() == [TP]
    marks.caught_up(TP, 0, 12)  # republished from the inbox up to the next offset read
    assert marks.covered(TP) == 12
    assert marks.gapped() == []


def test_rows_another_worker_wrote_are_not_claimed_without_a_catch_up() -> None:
    marks = Watermarks()
    marks.assign(TP, 0)
    marks.caught_up(TP, 0, 10)
    # A zombie applied [10, 15): this process's next transaction found the offset at 15.
    batch = marks.committed(TP, 15, 20, results=2)
    marks.settled(batch, failed=False)
    assert marks.covered(TP) == 10
    assert marks.gapped() == [TP]
    marks.caught_up(TP, 10, 15)  # the catch-up read next_offset 15, before our batch
    assert marks.covered(TP) == 20


def test_nothing_is_claimed_before_the_assignments_catch_up() -> None:
    marks = Watermarks()
    marks.assign(TP, 0)
    batch = marks.committed(TP, 7, 9, results=1)  # a predecessor left [0, 7)
    marks.settled(batch, failed=False)
    assert marks.covered(TP) == 0
    assert marks.claim(TP) is None
    marks.adopt(TP, 7)  # the database's watermark: a true claim, whoever made it
    assert marks.covered(TP) == 9


def test_claims_stored_once_and_partitions_not_owned_claim_nothing() -> None:
    marks = Watermarks()
    marks.assign(TP, 3)
    marks.caught_up(TP, 3, 8)
    assert marks.to_store() == {TP: 8}
    assert marks.claim(TP) == 8
    marks.claims_committed([TP])
    assert marks.to_store() == {}
    assert marks.claim(TP) is None
    marks.forget(TP)
    zombie = marks.committed(TP, 8, 9, results=1)  # published, but claims nothing
    marks.settled(zombie, failed=False)
    assert marks.covered(TP) is None
    assert marks.claim(TP) is None
    marks.caught_up(TP, 8, 9)
    assert marks.owned() == []


class WatermarkModel(RuleBasedStateMachine):
    """I3 for the books, against a ground truth: whatever the interleaving of this
    process's commits, a zombie's, acknowledgements in any order, failed publications,
    catch-ups that read the offset and finish later (or fail), claims folded into
    commits, stores, and a revoke followed by a new assignment, neither this process's
    `covered` nor the database's watermark ever passes an offset whose results the
    broker has not acknowledged."""

    def __init__(self) -> None:
        super().__init__()
        self.marks = Watermarks()
        self.next_offset = 0  # consumer_offsets.next_offset
        self.database = 0  # consumer_offsets.published_offset
        self.unacked: set[int] = set()  # inbox rows whose results were never acknowledged
        self.batches: list[tuple[Batch, int, int]] = []  # ours, handed to the producer
        self.catch_ups: list[tuple[int, int]] = []  # read (start, end), not finished
        self.owned = False

    def _rows(self, size: int, results: bool) -> tuple[int, int]:
        start, self.next_offset = self.next_offset, self.next_offset + size
        if results:
            self.unacked |= set(range(start, self.next_offset))
        return start, self.next_offset

    @initialize()
    def assigned(self) -> None:
        self.marks.assign(TP, 0)
        self.owned = True

    @rule(size=st.integers(1, 3), results=st.booleans())
    def we_commit(self, size: int, results: bool) -> None:
        claim = self.marks.claim(TP)  # folded into the transaction's offset UPDATE
        start, end = self._rows(size, results)
        if claim is not None:
            self.database = max(self.database, claim)
        self.marks.claims_committed([TP])
        batch = self.marks.committed(TP, start, end, results=size if results else 0)
        if results:
            self.batches.append((batch, start, end))

    @rule()
    def a_transaction_rolls_back_after_its_claim(self) -> None:
        self.marks.claim(TP)

    @rule(size=st.integers(1, 3), acknowledged=st.booleans())
    def a_zombie_commits(self, size: int, acknowledged: bool) -> None:
        start, end = self._rows(size, True)
        if acknowledged:
            self.unacked -= set(range(start, end))

    @precondition(lambda self: self.batches)
    @rule(data=st.data(), acknowledged=st.booleans())
    def the_broker_answers(self, data: st.DataObject, acknowledged: bool) -> None:
        batch, start, end = self.batches.pop(data.draw(st.integers(0, len(self.batches) - 1)))
        if acknowledged:
            self.unacked -= set(range(start, end))
        self.marks.settled(batch, failed=not acknowledged)

    @precondition(lambda self: self.owned)
    @rule()
    def a_catch_up_reads(self) -> None:
        # catch_up: adopt the database's watermark, then read the next offset.
        self.marks.adopt(TP, self.database)
        start = self.marks.covered(TP)
        assert start is not None
        self.catch_ups.append((start, self.next_offset))

    @precondition(lambda self: self.catch_ups)
    @rule(data=st.data(), acknowledged=st.booleans())
    def a_catch_up_ends(self, data: st.DataObject, acknowledged: bool) -> None:
        start, end = self.catch_ups.pop(data.draw(st.integers(0, len(self.catch_ups) - 1)))
        if acknowledged:
            self.unacked -= set(range(start, end))
            self.marks.caught_up(TP, start, end)

    @rule()
    def watermarks_stored(self) -> None:
        marks = self.marks.to_store()
        if marks:
            self.database = max(self.database, marks[TP])
            self.marks.stored(marks)

    @precondition(lambda self: self.owned)
    @rule()
    def revoked_and_assigned_again(self) -> None:
        self.marks.forget(TP)
        self.marks.assign(TP, 0)

    @invariant()
    def nothing_unacknowledged_is_passed(self) -> None:
        first_unacked = min(self.unacked, default=self.next_offset)
        covered = self.marks.covered(TP)
        assert covered is None or covered <= first_unacked
        assert self.database <= first_unacked


TestWatermarkModel = WatermarkModel.TestCase
TestWatermarkModel.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
