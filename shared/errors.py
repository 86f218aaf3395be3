"""The project's one small exception hierarchy.

``RelayError`` is the base.  Protocol errors are split the h11 way: ``LocalProtocolError`` means
*we* misused the API (a bug on this side); ``RemoteProtocolError`` means the peer sent something
invalid, and carries the GO_AWAY code to answer it with.  ``ConfigError`` carries the file and the
key path so the CLI can print one precise line and exit 2.
"""

from __future__ import annotations


class RelayError(Exception):
    """Base of every error raised on purpose by relay code."""


class ProtocolError(RelayError):
    """The wire protocol was violated, by us or by the peer."""


class LocalProtocolError(ProtocolError):
    """This side misused the protocol API (for example, wrote to a stream it already closed)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that break the protocol.

    ``code`` is the GO_AWAY code this side should send before closing the session.
    """

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class PeerTimeoutError(RelayError):
    """The peer sent nothing (not even a PING answer) for longer than the keepalive timeout."""


class AuthError(RelayError):
    """Login failed: wrong token, unknown client, or the server could not prove it knows the token.

    ``code`` is relayd's reason (a ``shared.messages.LoginRefusal`` value, "" when unknown) and
    ``retry_after`` how many seconds relayd said trying again is pointless (0 when unknown).
    """

    def __init__(self, message: str, code: str = "", retry_after: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.retry_after = retry_after


class TrustError(RelayError):
    """The server's certificate does not match the pinned or remembered fingerprint."""


class ConfigError(RelayError):
    """A configuration file is unreadable or invalid.

    ``path`` is the file, ``key`` the dotted key path (``tunnels[1].local_port``) or ``""`` for the
    whole file, and ``reason`` says what is wrong.  ``str()`` gives the one line the CLI prints.
    """

    def __init__(self, path: str, key: str, reason: str) -> None:
        self.path = path
        self.key = key
        self.reason = reason
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {reason}")
