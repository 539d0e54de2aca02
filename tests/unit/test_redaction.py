"""No command prints a database password: in the URL's userinfo or in its query string."""

from __future__ import annotations

import pytest

from worker.redaction import redact_text, redact_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://app:s3cret@db:5432/shop", "postgresql://app:***@db:5432/shop"),
        ("postgresql://app@db/shop?password=s3cret", "postgresql://app@db/shop?password=***"),
        ("postgresql://app@db/shop?PassWord=s3cret", "postgresql://app@db/shop?PassWord=***"),
        (
            "postgresql://app@db/shop?sslmode=require&password=s3cret&application_name=w",
            "postgresql://app@db/shop?sslmode=require&password=***&application_name=w",
        ),
        # An encoded name is still the password parameter; the value is replaced whole.
        (
            "postgresql://app@db/shop?pass%77ord=s3%2Fcret",
            "postgresql://app@db/shop?pass%77ord=***",
        ),
        (
            "postgresql://app:p%40ss@db/shop?password=a&password=b&sslpassword=c",
            "postgresql://app:***@db/shop?password=***&password=***&sslpassword=***",
        ),
        # Not a URL the parser likes (bad port, IPv6 typo): still no password out.
        ("postgresql://app:s3cret@db:notaport/shop", "postgresql://app:***@db:notaport/shop"),
        (
            "postgresql://app:s3cret@[::1/shop?password=x",
            "postgresql://app:***@[::1/shop?password=***",
        ),
        ("postgresql://app@db/shop", "postgresql://app@db/shop"),
        ("postgresql:///shop?host=/run/pg", "postgresql:///shop?host=/run/pg"),
    ],
)
def test_redact_url_hides_every_password(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_text_hides_the_passwords_wherever_a_message_echoes_them() -> None:
    url = "postgresql://app:p%40ss@db/shop?sslmode=disable&Password=q%2Fw"
    # dbmate echoes the URL with only userinfo masked; other tools print the decoded value.
    message = (
        'Error: parse "postgres://app:********@db/shop?Password=q%2Fw": invalid port\n'
        "auth failed for p@ss (q/w)"
    )
    redacted = redact_text(message, url)
    for secret in ("p%40ss", "p@ss", "q%2Fw", "q/w"):
        assert secret not in redacted
    assert "invalid port" in redacted
    assert redact_text("nothing secret here", "postgresql://app@db/shop") == "nothing secret here"
