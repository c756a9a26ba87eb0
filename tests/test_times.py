"""The one time format on the wire, and the one parser of times people send."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from vlmguard.times import iso, iso_epoch, parse_time

T0 = datetime(2026, 11, 26, 8, 0, 31, 250999, tzinfo=timezone.utc)


def test_iso_is_rfc3339_utc_with_milliseconds_and_z():
    assert iso(T0) == "2026-11-26T08:00:31.250Z"
    assert iso(T0.astimezone(timezone(timedelta(hours=-5)))) == "2026-11-26T08:00:31.250Z"
    assert iso(T0.replace(tzinfo=None)) == "2026-11-26T08:00:31.250Z"  # stored times are UTC
    assert iso(None) is None
    assert iso_epoch(T0.timestamp()) == "2026-11-26T08:00:31.250Z" and iso_epoch(None) is None


def test_iso_reads_back_and_sorts_as_text():
    times = [T0 + timedelta(milliseconds=n) for n in (0, 1, 999, 1000, 86_400_000)]
    texts = [iso(t) for t in times]
    assert sorted(texts) == texts and len({len(t) for t in texts}) == 1
    assert [parse_time(t) for t in texts] == [t.replace(microsecond=t.microsecond // 1000 * 1000)
                                             for t in times]


@pytest.mark.parametrize("text,expected", [
    ("2026-11-26T08:00:00Z", datetime(2026, 11, 26, 8, tzinfo=timezone.utc)),
    ("2026-11-26T10:00:00+02:00", datetime(2026, 11, 26, 8, tzinfo=timezone.utc)),
    ("2026-11-26T08:00:00", datetime(2026, 11, 26, 8, tzinfo=timezone.utc)),
    ("2026-11-26", datetime(2026, 11, 26, tzinfo=timezone.utc)),
])
def test_parse_time_gives_aware_utc(text, expected):
    when = parse_time(text)
    assert when == expected and when.utcoffset() == timedelta(0)


@pytest.mark.parametrize("text,problem", [
    ("yesterday", "must be an ISO 8601 time, e.g. 2026-11-26T08:00:00Z"),
    ("2026-02-30T00:00:00", "must be an ISO 8601 time, e.g. 2026-11-26T08:00:00Z"),
    ("9999-12-31T23:59:59-23:59", "out of range: years 1-9999 in UTC"),
    ("0001-01-01T00:00:00+23:59", "out of range: years 1-9999 in UTC"),
])
def test_parse_time_names_the_problem(text, problem):
    with pytest.raises(ValueError) as raised:
        parse_time(text)
    assert str(raised.value) == problem
