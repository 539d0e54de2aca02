"""The published watermark's books: a claim is made only from evidence (worker/watermarks.py)."""

from __future__ import annotations

from worker.watermarks import Watermarks

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
