"""Challenge-response login: the token never crosses the wire.

Both sides compute HMAC-SHA256 keyed with the token over a transcript that binds the client name,
both nonces and the SHA-256 fingerprint of relayd's TLS certificate as relayc saw it.  A man in
the middle with another certificate gets a proof for the wrong fingerprint, useless to replay.
relayd then answers with its own proof (a different label), so relayc knows it reached a server
that holds the token, which matters most on a trust-on-first-use connection.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

_CLIENT_LABEL = b"relay-login-client-v1"
_SERVER_LABEL = b"relay-login-server-v1"
_VISIT_LABEL = b"relay-visit-v1"


def new_nonce() -> str:
    return secrets.token_hex(32)


def _transcript(label: bytes, name: str, client_nonce: str, server_nonce: str, fingerprint: str) -> bytes:
    parts = [label, name.encode(), client_nonce.encode(), server_nonce.encode(), fingerprint.encode()]
    return b"\0".join(len(p).to_bytes(4, "big") + p for p in parts)


def client_proof(token: str, name: str, client_nonce: str, server_nonce: str, fingerprint: str) -> str:
    msg = _transcript(_CLIENT_LABEL, name, client_nonce, server_nonce, fingerprint)
    return hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()


def server_proof(token: str, name: str, client_nonce: str, server_nonce: str, fingerprint: str) -> str:
    msg = _transcript(_SERVER_LABEL, name, client_nonce, server_nonce, fingerprint)
    return hmac.new(token.encode(), msg, hashlib.sha256).hexdigest()


def proofs_equal(a: str, b: str) -> bool:
    """Constant-time comparison."""
    return hmac.compare_digest(a.encode(), b.encode())


def visit_proof(secret_key: str, visitor: str, client: str, tunnel: str, fingerprint: str) -> str:
    """What a visitor presents for a secret tunnel's ``secret_key``: an HMAC keyed with it over the
    visitor's client name, the tunnel and relayd's certificate fingerprint, so the key itself is
    never sent and a proof is worth nothing to another visitor or another relayd."""
    msg = _transcript(_VISIT_LABEL, visitor, client, tunnel, fingerprint)
    return hmac.new(secret_key.encode(), msg, hashlib.sha256).hexdigest()
