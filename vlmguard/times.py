"""The one time format on every wire: RFC 3339 in UTC with milliseconds and "Z",
2026-11-26T08:00:31.250Z. The REST API, the SSE stream, the X-Clip-Start and X-Export-*
headers, alert payloads, the playlists vlmguard writes and `vlmguard` JSON output all use
it: one length, so it sorts as text, and JavaScript's Date (whose toISOString writes the
same), Python's datetime.fromisoformat and any RFC 3339 parser read it."""

from __future__ import annotations

from datetime import datetime, timezone

EXAMPLE = "2026-11-26T08:00:00Z"


def iso(when: datetime | None) -> str | None:
    if when is None:
        return None
    if when.tzinfo is None:  # every stored time is UTC
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_epoch(seconds: float | None) -> str | None:
    return iso(datetime.fromtimestamp(seconds, timezone.utc)) if seconds else None


def parse_time(text: str) -> datetime:
    """An ISO 8601 time as an aware UTC datetime (no zone means UTC). The ValueError's
    message names the problem in words a user can act on."""
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"must be an ISO 8601 time, e.g. {EXAMPLE}") from None
    if when.tzinfo is None:
        return when.replace(tzinfo=timezone.utc)
    try:  # 9999-12-31T23:59:59-23:59 is a valid time that UTC cannot hold
        return when.astimezone(timezone.utc)
    except OverflowError:
        raise ValueError("out of range: years 1-9999 in UTC") from None
