from __future__ import annotations

import pytest

from shared.limits import SourceFilter, TokenBucket, parse_rate


@pytest.mark.parametrize(
    "text,value",
    [(0, 0), (1000, 1000), ("10MB", 10_000_000), ("512KiB", 524_288), ("1.5 GB/s", 1_500_000_000), ("7", 7)],
)
def test_parse_rate(text: int | str, value: int) -> None:
    assert parse_rate(text) == value


@pytest.mark.parametrize("bad", ["fast", "10 parsecs", "-5", -1])
def test_parse_rate_rejects(bad: int | str) -> None:
    with pytest.raises(ValueError):
        parse_rate(bad)


def test_token_bucket_allows_a_burst_then_paces() -> None:
    b = TokenBucket(1000, now=0.0)
    assert b.take(1000, 0.0) == 0.0  # one second's worth at once
    assert b.take(500, 0.0) == pytest.approx(0.5)  # in debt: wait half a second
    assert b.take(0, 0.5) == 0.0  # repaid
    assert b.take(1000, 10.0) == 0.0  # idle time refills only up to the burst size
    assert b.take(1, 10.0) > 0


def test_bucket_long_run_average_matches_the_rate() -> None:
    b = TokenBucket(1_000_000, now=0.0)
    now, sent = 0.0, 0
    while now < 10.0:
        now += b.take(65536, now)
        sent += 65536
    assert sent / now == pytest.approx(1_000_000, rel=0.15)


def test_source_filter() -> None:
    f = SourceFilter(["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"])
    assert f.allows("10.255.0.1") and f.allows("192.0.2.7") and f.allows("2001:db8::1")
    assert f.allows("::ffff:10.0.0.1")  # an IPv4 visitor on a dual-stack socket
    assert not f.allows("192.0.2.8") and not f.allows("127.0.0.1") and not f.allows("garbage")
    assert SourceFilter([]).allows("203.0.113.9")  # no list: everyone
