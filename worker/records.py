"""Plain data that travels between the modules: consumed records and messages to publish."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

# Kafka allows a header without a value (None); dead letters keep such headers as they came.
Headers = tuple[tuple[str, bytes | None], ...]


@dataclass(slots=True, unsafe_hash=True)
class RawRecord:
    """A consumed record, decoupled from aiokafka's types. Treat it as immutable (change
    one with `dataclasses.replace`): it is not `frozen` only because a frozen dataclass
    sets each field through `object.__setattr__`, which made building one per consumed
    record cost 2.0 µs instead of 0.6 (its hash is a frozen one's: `unsafe_hash`)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    # Not in repr: the headers carry rokt-api-key, and a repr can end up in a log or trace.
    headers: Headers = field(default=(), repr=False)
    timestamp_ms: int = 0
    # The client could not decode it (e.g. a header name that is not UTF-8): only its
    # position is known, its bytes are not.
    unreadable: bool = False
    # An unreadable record stands for the offsets up to this one (exclusive): where it sits
    # among them is unknown (see `ReleaseConsumer._skip_unreadable`). None: offset + 1.
    span_end: int | None = None
    # How many times this record waited for a row lock held elsewhere and was given back
    # to its lane (`BatchReport.deferred`): its partition's backoff grows with it.
    lock_waits: int = field(default=0, compare=False)
    # The `traceparent` of the span processing it, for its results; empty unless tracing
    # is on (worker/tracing.py).
    trace_headers: Headers = field(default=(), compare=False, repr=False)
    # `size`, counted once: the consumer's memory bounds read it several times a record.
    _size: int = field(init=False, default=0, compare=False, repr=False)
    # Lower-cased header name -> the first value of that name, built by the first `header`
    # call (validation, authorisation and the results look up about nine a record).
    _by_name: dict[str, bytes | None] | None = field(
        init=False, default=None, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        size = len(self.value or b"") + len(self.key or b"")
        for k, v in self.headers:
            size += len(k) + len(v or b"")
        self._size = size

    @property
    def size(self) -> int:
        """Bytes this record holds in memory, about: what the memory bounds count."""
        return self._size

    @property
    def next_offset(self) -> int:
        """The offset to resume from once this record is applied."""
        return self.offset + 1 if self.span_end is None else self.span_end

    @property
    def position(self) -> str:
        """The identity of a record without an eventId: `<topic>/<partition>/<offset>`."""
        return f"{self.topic}/{self.partition}/{self.offset}"

    def header(self, name: str) -> bytes | None:
        """First header of that name, matched case-insensitively (`name` is lower case)."""
        return self.named_headers().get(name)

    def named_headers(self) -> dict[str, bytes | None]:
        """Lower-cased name -> the first value of that name: `header` for several names with
        one call (`.get(name)`). Do not change it."""
        by_name = self._by_name
        if by_name is None:
            by_name = {}
            for key, value in self.headers:
                by_name.setdefault(key.lower(), value)
            self._by_name = by_name
        return by_name


class OutboxMessage(NamedTuple):
    """A record to publish: a result, a rejection or a dead letter.

    A named tuple: one is made per item result, and a frozen dataclass's __init__ sets
    each field through object.__setattr__ (~5% of the worker's instructions per item).
    Equal, as it was, when the message is: its outbox id and source time are left out."""

    topic: str
    key: bytes | None
    payload: bytes | None
    headers: Headers = ()
    outbox_id: int | None = None
    # CreateTime of the input record, for the record->result latency histogram.
    source_ts_ms: int = 0

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OutboxMessage):
            return NotImplemented
        return self[:4] == other[:4]

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash(self[:4])


@dataclass(frozen=True, slots=True)
class Publication:
    """The results of one committed transaction's fresh inbox rows of one partition: stored
    only in the inbox, published from memory (no outbox rows). The transaction found the
    partition's next offset at `start` and left it at `end`: the inbox rows it wrote are
    exactly those of [start, end) (`worker/watermarks.py`)."""

    topic: str
    partition: int
    start: int
    end: int
    messages: list[OutboxMessage]
