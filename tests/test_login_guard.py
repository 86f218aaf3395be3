from __future__ import annotations

from relay_server.guard import BlockKind, BlockScope, LoginGuard
from shared import auth


def test_failures_slow_down_then_block_the_pair_not_the_neighbours() -> None:
    g = LoginGuard(window=60, block_after=5, block_seconds=100)
    delays = [g.record_failure("1.2.3.4", "bad", float(t)).delay for t in range(4)]
    assert delays == sorted(delays) and delays[-1] > delays[0]
    assert g.pair_blocked_until("1.2.3.4", "bad", 4.0) is None
    assert g.record_failure("1.2.3.4", "bad", 4.0).pair_blocked
    assert g.pair_blocked_until("1.2.3.4", "bad", 5.0) == 104.0
    # one broken client behind a NAT: its neighbours (other names, same address) are not blocked
    assert g.pair_blocked_until("1.2.3.4", "good", 5.0) is None
    assert g.address_blocked_until("1.2.3.4", 5.0) is None
    assert g.pair_blocked_until("5.6.7.8", "bad", 5.0) is None  # the same name elsewhere is unaffected
    assert g.pair_blocked_until("1.2.3.4", "bad", 105.0) is None  # blocks end


def test_an_address_naming_several_clients_is_blocked_whole() -> None:
    g = LoginGuard(window=60, block_after=4, block_seconds=100, names_to_block_address=3)
    verdicts = [g.record_failure("6.6.6.6", name, 1.0) for name in ("root", "admin", "lab", "x")]
    assert [v.address_blocked for v in verdicts] == [False, False, False, True]
    assert g.address_blocked_until("6.6.6.6", 2.0) == 101.0
    assert g.pair_blocked_until("6.6.6.6", "anyone", 2.0) == 101.0
    # two names failing (two broken clients behind one NAT) never block the address
    for t in range(20):
        g.record_failure("7.7.7.7", "a" if t % 2 else "b", 1.0 + t / 100)
    assert g.address_blocked_until("7.7.7.7", 2.0) is None


def test_blocks_are_listed_and_lifted() -> None:
    g = LoginGuard(BlockScope.RELAYC, window=60, block_after=2, block_seconds=100, names_to_block_address=2)
    for _ in range(2):
        g.record_failure("10.0.0.1", "lab", 0.0)
    listed = [b.as_dict() for b in g.blocks(now=1.0, wall_now=1000.0)]
    assert listed == [{"kind": "client", "value": "lab", "scope": "relayc", "failures": 2, "until": 1099.0,
                       "address": "10.0.0.1"}]  # fmt: skip
    assert g.unblock(BlockKind.CLIENT, "lab")
    assert g.pair_blocked_until("10.0.0.1", "lab", 1.0) is None
    assert not g.unblock(BlockKind.CLIENT, "lab")
    g.record_failure("10.0.0.2", "a", 0.0)
    g.record_failure("10.0.0.2", "b", 0.0)
    assert [(b.kind, b.value) for b in g.blocks(1.0, 1000.0)] == [(BlockKind.ADDRESS, "10.0.0.2")]
    assert g.unblock(BlockKind.ADDRESS, "10.0.0.2")
    assert g.blocks(1.0, 1000.0) == []


def test_dashboard_scope_blocks_addresses() -> None:
    g = LoginGuard(BlockScope.DASHBOARD, window=60, block_after=3, block_seconds=50, names_to_block_address=1)
    for t in range(3):
        g.record_failure("10.1.1.1", "", float(t))
    assert [b.as_dict()["kind"] for b in g.blocks(3.0, 0.0)] == ["address"]
    assert g.address_blocked_until("10.1.1.1", 3.0) == 52.0
    g.record_success("10.1.1.2", "")  # another address: nothing to forget, nothing breaks


def test_memory_is_bounded_and_stale_entries_leave() -> None:
    g = LoginGuard(window=10, block_after=3, block_seconds=10, max_entries=100)
    for i in range(5000):  # names and addresses chosen by the peer
        g.record_failure(f"10.0.{i // 256}.{i % 256}", f"name-{i}", float(i) / 1000)
    assert len(g) <= 200
    for i in range(300):  # much later: old entries are pruned as new failures come
        g.record_failure("10.9.9.9", f"n{i}", 1000.0 + i)
    assert len(g) <= 2 * 3 + 2 + 100


def test_proofs_bind_name_nonces_and_fingerprint() -> None:
    base = ("lab", "c" * 64, "s" * 64, "sha256:" + "0" * 64)
    p = auth.client_proof("token", *base)
    assert auth.proofs_equal(p, auth.client_proof("token", *base))
    assert not auth.proofs_equal(p, auth.client_proof("other", *base))
    for i in range(4):
        changed = list(base)
        changed[i] = changed[i] + "x"
        assert not auth.proofs_equal(p, auth.client_proof("token", *changed))  # type: ignore[arg-type]
    assert auth.server_proof("token", *base) != p  # the server's proof cannot be replayed as the client's


def test_a_flood_of_failures_from_elsewhere_does_not_lift_a_block() -> None:
    g = LoginGuard(window=60, block_after=3, block_seconds=100, max_entries=50, names_to_block_address=2)
    for name in ("a", "b", "c"):
        g.record_failure("6.6.6.6", name, 0.0)
    assert g.address_blocked_until("6.6.6.6", 1.0) is not None
    for i in range(5000):
        g.record_failure(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", "x", 1.0)
    assert g.address_blocked_until("6.6.6.6", 2.0) is not None


def test_ipv6_addresses_count_by_their_64() -> None:
    g = LoginGuard(window=60, block_after=3, block_seconds=100, names_to_block_address=3)
    for i, name in enumerate(("a", "b", "c")):
        g.record_failure(f"2001:db8:1:2::{i + 1}", name, 0.0)  # three addresses of one host
    assert g.address_blocked_until("2001:db8:1:2::ffff", 1.0) is not None
    assert g.address_blocked_until("2001:db8:1:3::1", 1.0) is None  # another /64
    assert [b.value for b in g.blocks(1.0, 0.0)] == ["2001:db8:1:2::/64"]
    assert g.unblock(BlockKind.ADDRESS, "2001:db8:1:2::7")


def test_a_sign_in_from_a_shared_address_does_not_wipe_a_guessers_record() -> None:
    g = LoginGuard(BlockScope.DASHBOARD, window=600, block_after=5, block_seconds=50, names_to_block_address=1)
    for t in range(4):
        g.record_failure("127.0.0.1", "", float(t))
        g.record_success("127.0.0.1", "")  # a scraper on the same address signs in fine
    assert g.record_failure("127.0.0.1", "", 5.0).address_blocked
