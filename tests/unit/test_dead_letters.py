"""A dead letter always fits the DLQ topic (DESIGN.md §7): shrunk, never refused."""

from __future__ import annotations

from aiokafka.record.default_records import DefaultRecordBatchBuilder

from worker.contract import Rejection
from worker.records import Headers, OutboxMessage, RawRecord
from worker.results import dead_letter

KAFKA_DEFAULT = 1_048_588  # the broker's default message.max.bytes
INVALID_JSON = Rejection(400, "invalid_json", "not JSON", dead_letter=True)
HEADERS: Headers = (("content-type", b"application/json"), ("x-trace", None))


def size(m: OutboxMessage) -> int:
    """The message's size as the producer measures it against its limit."""
    estimate: int = DefaultRecordBatchBuilder.estimate_size_in_bytes(
        m.key, m.payload, list(m.headers)
    )
    return estimate


def record(value: bytes | None, headers: Headers = HEADERS) -> RawRecord:
    return RawRecord("in", 3, 41, b"cart-key", value, headers)


def test_a_dead_letter_over_the_limit_is_truncated_to_fit_and_says_how_big_it_was() -> None:
    # The record: just under the input limit, so its DLQ headers push it over.
    value = b"{" + b"x" * 1_048_399
    letter = dead_letter(record(value), INVALID_JSON, "dlq", KAFKA_DEFAULT)
    headers = dict(letter.headers)
    assert size(letter) <= KAFKA_DEFAULT
    assert letter.key == b"cart-key"
    assert letter.payload is not None
    assert value.startswith(letter.payload)
    assert len(letter.payload) > KAFKA_DEFAULT - 1024, "only what does not fit is cut"
    assert headers["dlq-truncated"] == str(len(value)).encode()
    assert headers["dlq-code"] == b"invalid_json"
    assert headers["x-trace"] is None
    assert headers["content-type"] == b"application/json"


def test_a_dead_letter_that_fits_is_the_original_bytes_without_a_truncation_header() -> None:
    value = b"{" + b"x" * 1_000_000
    letter = dead_letter(record(value), INVALID_JSON, "dlq", KAFKA_DEFAULT)
    assert letter.payload == value
    assert "dlq-truncated" not in dict(letter.headers)


def test_headers_too_large_for_any_dead_letter_are_dropped_and_counted() -> None:
    huge: Headers = tuple((f"h{n}", b"v" * 10_000) for n in range(12))
    letter = dead_letter(record(b"{" * 500, huge), INVALID_JSON, "dlq", 64 * 1024)
    headers = dict(letter.headers)
    assert size(letter) <= 64 * 1024
    assert letter.key == b"cart-key"
    assert headers["dlq-headers-dropped"] == b"12"
    assert headers["dlq-truncated"] == b"500"
    assert headers["dlq-code"] == b"invalid_json"
    assert not any(name.startswith("h") for name in headers)


def test_every_limit_is_met_exactly_or_under() -> None:
    value = bytes(range(256)) * 400
    for limit in range(4096, 110_000, 997):
        letter = dead_letter(record(value), INVALID_JSON, "dlq", limit)
        assert size(letter) <= limit, limit
        assert letter.payload is not None
        assert size(letter) > limit - 16 or letter.payload == value, limit


def test_an_authenticated_records_dead_letter_names_its_partner_and_no_sender_can_forge_it() -> (
    None
):
    forged: Headers = (("DLQ-Partner-Id", b"victim"), ("dlq-status", b"200"), ("x-trace", b"t"))
    poison = Rejection(500, "internal_error", "failed", dead_letter=True, partner_id="acme")
    letter = dead_letter(record(b"{}", forged), poison, "dlq")
    names = [n.lower() for n, _ in letter.headers]
    assert names.count("dlq-partner-id") == 1
    assert names.count("dlq-status") == 1
    headers = dict(letter.headers)
    assert headers["dlq-partner-id"] == b"acme"
    assert headers["dlq-status"] == b"500"
    assert headers["x-trace"] == b"t"
    unknown = dead_letter(record(b"{}", forged), INVALID_JSON, "dlq")
    assert not any(n.lower() == "dlq-partner-id" for n, _ in unknown.headers)
