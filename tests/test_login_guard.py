from __future__ import annotations

from relay_server.server import LoginGuard
from shared import auth


def test_failures_slow_down_then_block_then_expire() -> None:
    g = LoginGuard(window=60, block_after=5, block_for=100)
    delays = [g.record_failure("1.2.3.4", float(t)) for t in range(4)]
    assert delays == sorted(delays) and delays[-1] > delays[0]
    assert not g.is_blocked("1.2.3.4", 4.0)
    g.record_failure("1.2.3.4", 4.0)
    assert g.is_blocked("1.2.3.4", 5.0)
    assert not g.is_blocked("5.6.7.8", 5.0)  # another address is unaffected
    assert not g.is_blocked("1.2.3.4", 105.0)


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
