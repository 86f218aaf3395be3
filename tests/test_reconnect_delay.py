"""relayc's waits between attempts, by how the last attempt ended (no clock, no sockets)."""

from __future__ import annotations

from relay_client.client import ReconnectDelay
from shared.errors import AuthError, RelayError


def test_network_failures_back_off_to_ten_seconds_and_a_session_resets_it() -> None:
    d = ReconnectDelay()
    assert [d.next(False, OSError("refused")) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]
    assert d.next(True, RelayError("session ended")) == 0.5
    assert d.next(False, OSError()) == 0.5


def test_a_name_in_use_waits_a_minute_doubling_to_ten() -> None:
    d = ReconnectDelay()
    refused = AuthError("in use", code="name_in_use", retry_after=60)
    assert [d.next(False, refused) for _ in range(6)] == [60.0, 120.0, 240.0, 480.0, 600.0, 600.0]


def test_a_wrong_token_backs_off_and_a_block_is_waited_out() -> None:
    d = ReconnectDelay()
    wrong = AuthError("wrong token", code="wrong_token")
    assert [d.next(False, wrong) for _ in range(7)] == [10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0]
    blocked = AuthError("blocked", code="blocked", retry_after=450)
    assert d.next(False, blocked) == 450.0  # waits until the block ends, not before
    assert d.next(False, AuthError("blocked", code="blocked", retry_after=86400)) == 600.0  # capped
    # an old relayd without codes: the plain schedule
    assert ReconnectDelay().next(False, AuthError("login failed")) == 0.5
