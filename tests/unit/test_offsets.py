"""The consumer's offset books, without Kafka."""

from __future__ import annotations

from aiokafka.structs import TopicPartition

from worker.offsets import OffsetBook

P0 = TopicPartition("cart.abandoned", 0)
P1 = TopicPartition("cart.abandoned", 1)


def test_reading_rewinds_to_the_first_record_not_handed_to_a_lane() -> None:
    book = OffsetBook()
    assert book.rewind_point(P0) is None
    book.assigned(P0, position=40, stored=40)
    assert book.rewind_point(P0) == 40
    book.handed(P0, 57)
    assert book.rewind_point(P0) == 58


def test_only_what_the_database_committed_is_committed_to_kafka() -> None:
    book = OffsetBook()
    book.assigned(P0, position=0, stored=None)
    book.assigned(P1, position=10, stored=10)
    book.handed(P0, 99)
    assert book.to_commit({P0, P1}) == {P1: 10}  # the stored offset, nothing handed
    book.applied({("cart.abandoned", 0): 50})
    assert book.to_commit({P0, P1}) == {P0: 50, P1: 10}
    assert book.to_commit({P0}) == {P0: 50}


def test_a_kafka_commit_is_not_repeated_and_database_offsets_never_go_back() -> None:
    book = OffsetBook()
    book.assigned(P0, position=0, stored=None)
    book.applied({("cart.abandoned", 0): 50})
    book.committed({P0: 50})
    assert book.to_commit({P0}) == {}
    # Lanes of one partition commit in order, but a split batch reports its halves' max.
    book.applied({("cart.abandoned", 0): 30})
    assert book.to_commit({P0}) == {}
    book.applied({("cart.abandoned", 0): 70})
    assert book.to_commit({P0}) == {P0: 70}


def test_lag_counts_from_kafkas_commit_and_backlog_from_the_databases() -> None:
    book = OffsetBook()
    book.assigned(P0, position=0, stored=None)
    assert book.lag(P0, 100) == 100
    assert book.backlog(P0, 100) == 100
    book.applied({("cart.abandoned", 0): 60})
    assert book.lag(P0, 100) == 40  # before the first commit, the database's offset
    book.committed({P0: 20})
    assert book.lag(P0, 100) == 80
    assert book.backlog(P0, 100) == 40
    assert book.backlog(P0, 50) == 0  # a stale high watermark is not negative lag


def test_a_revoked_partition_is_forgotten() -> None:
    book = OffsetBook()
    book.assigned(P0, position=5, stored=5)
    book.applied({("cart.abandoned", 0): 9})
    book.forget({P0})
    assert book.rewind_point(P0) is None
    assert book.to_commit({P0}) == {}
    assert book.backlog(P0, 9) == 9
