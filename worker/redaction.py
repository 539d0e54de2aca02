"""Keep database passwords out of what commands print (DESIGN §7).

A PostgreSQL URL carries a password in its userinfo (`user:secret@host`) or in its
query string (`?password=secret`, libpq's `sslpassword=` too). Both are masked, in
the URL itself and in any text a tool or driver wrote about it: dbmate, for one,
echoes the URL in its errors with only the userinfo masked. The parsing is by hand
on purpose: `urllib.parse` raises on a malformed port or host, and a URL that does
not parse is exactly the one an error message is about to print.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, unquote_plus

MASK = "***"
_URL = re.compile(
    r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)?(?P<authority>[^/?#]*)(?P<rest>.*)$", re.S
)


def _is_secret_parameter(name: str) -> bool:
    return "password" in unquote_plus(name).lower()


def redact_url(url: str) -> str:
    """The URL with every password replaced by `***`, safe to print."""
    match = _URL.match(url)
    assert match is not None  # every part of the pattern may be empty
    scheme, authority, rest = match.group("scheme", "authority", "rest")
    if scheme is None:  # no authority without `//`: all of it is path and query
        authority, rest = "", url
    userinfo, at, host = authority.rpartition("@")
    if at and ":" in userinfo:
        authority = f"{userinfo.split(':', 1)[0]}:{MASK}@{host}"
    path, question, query_fragment = rest.partition("?")
    if not question:
        return (scheme or "") + authority + rest
    query, hash_sign, fragment = query_fragment.partition("#")
    parameters = []
    for parameter in query.split("&"):
        name, equals, _ = parameter.partition("=")
        parameters.append(f"{name}={MASK}" if equals and _is_secret_parameter(name) else parameter)
    return f"{scheme or ''}{authority}{path}?{'&'.join(parameters)}{hash_sign}{fragment}"


def passwords(url: str) -> set[str]:
    """Every password the URL holds, as written in it and decoded."""
    match = _URL.match(url)
    assert match is not None
    found: list[str] = []
    userinfo, at, _ = (match.group("authority") if match.group("scheme") else "").rpartition("@")
    if at and ":" in userinfo:
        found.append(userinfo.split(":", 1)[1])
    query = url.partition("?")[2].partition("#")[0]
    for parameter in query.split("&") if query else []:
        name, equals, value = parameter.partition("=")
        if equals and _is_secret_parameter(name):
            found.append(value)
    return {form for raw in found for form in (raw, unquote(raw), unquote_plus(raw)) if form}


def redact_text(text: str, url: str) -> str:
    """`text` (an error message, a tool's output) without any password of `url`."""
    for secret in sorted(passwords(url), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text
