"""Dashboard password hashes: scrypt, in a self-describing string.

scrypt runs in OpenSSL through ``hashlib.scrypt``, which releases the GIL while it works: the
dashboard verifies passwords in worker threads, and a hash that held the GIL (as cryptography's
``Scrypt`` does) would stall relayd's event loop for its whole ~0.1 s anyway.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

# Parameters accepted from a stored hash: enough for any sensible cost, never gigabytes of memory.
_MAX_N = 2**20
_MAX_R = 32
_MAX_P = 16


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    if not (1 < n <= _MAX_N and n & (n - 1) == 0 and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P):
        raise ValueError("scrypt parameters out of range")
    secret = password.encode()
    scrypt = getattr(hashlib, "scrypt", None)
    if scrypt is None:  # a Python built without OpenSSL's scrypt
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

        return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(secret)
    maxmem = 128 * r * (n + p + 2) + (1 << 20)  # what scrypt needs, plus slack (the default cap is 32 MiB)
    digest: bytes = scrypt(secret, salt=salt, n=n, r=r, p=p, maxmem=maxmem, dklen=32)
    return digest


def hash_password(password: str, n: int = 2**15, r: int = 8, p: int = 1) -> str:
    """``scrypt$N$r$p$salt$hash`` (base64), what `relayd hash-password` prints."""
    salt = os.urandom(16)
    digest = _scrypt(password, salt, n, r, p)
    b64 = base64.b64encode
    return f"scrypt${n}${r}${p}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """True when ``password`` matches ``encoded``; False for a malformed hash too.  CPU-bound
    (~0.1 s): call it from a worker thread, not on the event loop."""
    try:
        kind, n, r, p, salt, digest = encoded.split("$")
        if kind != "scrypt":
            return False
        expected = base64.b64decode(digest, validate=True)
        got = _scrypt(password, base64.b64decode(salt, validate=True), int(n), int(r), int(p))
    except (ValueError, TypeError):  # binascii.Error and UnicodeEncodeError are ValueErrors
        return False
    return hmac.compare_digest(got, expected)
