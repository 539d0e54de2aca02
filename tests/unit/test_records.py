"""`RawRecord.header`: the first header of a name, matched case-insensitively."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from worker.records import RawRecord


def test_the_first_header_of_a_name_whatever_its_case() -> None:
    record = RawRecord(
        "t", 0, 0, None, None, (("Rokt-Tag-Id", b"first"), ("rokt-tag-id", b"second"), ("x", None))
    )
    assert record.header("rokt-tag-id") == b"first"
    assert record.header("x") is None
    assert record.header("missing") is None


@given(
    st.lists(st.tuples(st.text(max_size=6), st.none() | st.binary(max_size=4)), max_size=6),
    st.sampled_from(["a", "ab", "k", "rokt-tag-id", "content-type"]),
)
def test_header_is_a_scan_for_the_first_name_that_lowers_to_it(
    headers: list[tuple[str, bytes | None]], name: str
) -> None:
    record = RawRecord("t", 0, 0, None, None, tuple(headers))
    expected = next((v for k, v in headers if k.lower() == name), None)
    assert record.header(name) == expected
    assert record.header(name) == expected  # again, from what the first call built
