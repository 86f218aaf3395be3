"""The project's one small exception hierarchy.

``RelayError`` is the base.  Protocol errors are split the h11 way: ``LocalProtocolError`` means
*we* misused the API (a bug on this side); ``RemoteProtocolError`` means the peer sent something
invalid, and carries the GO_AWAY code to answer it with.  ``ConfigError`` carries the file and the
key path so the CLI can print one precise line and exit 2.  A refusal (``TunnelRefused``,
``Conflict``, ``NotFound``, ``InvalidField``) carries a typed reason or the key at fault, so that
callers branch on it rather than on English text.
"""

from __future__ import annotations

import enum


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


class TunnelRefusal(str, enum.Enum):
    """Why relayd refuses (or stopped) a tunnel; sent as ``tunnel_status.code``, shown in the API."""

    BAD_SPEC = "bad_spec"  # a field breaks the tunnel model's rules
    TOO_MANY_TUNNELS = "too_many_tunnels"  # max_tunnels_per_client
    TOO_MANY_PORTS = "too_many_ports"  # max_ports_per_client
    PORT_NOT_ALLOWED = "port_not_allowed"  # not in allow_ports
    PORT_TAKEN = "port_taken"  # another tunnel holds it
    PORT_RESERVED = "port_reserved"  # reserved for an offline client
    CANNOT_LISTEN = "cannot_listen"  # the operating system refused the port
    DOMAIN_TAKEN = "domain_taken"  # another client owns the domain, or another tunnel the location
    DOMAIN_RESERVED = "domain_reserved"  # reserved for an offline client
    NO_SUBDOMAIN_HOST = "no_subdomain_host"  # a subdomain while relayd has no subdomain_host
    KIND_OFF = "kind_off"  # this relayd does not serve the kind (its vhost port is not set)
    NAME_TAKEN = "name_taken"  # the name is used by a tunnel from elsewhere (config vs dashboard)
    CLIENT_REFUSED = "client_refused"  # relayc refused a pushed tunnel (allow_targets)


class TunnelRefused(RelayError):
    """A tunnel relayd will not open; ``reason`` says why in a word, ``str()`` in a sentence."""

    def __init__(self, reason: TunnelRefusal, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class StoreUnavailable(RelayError):
    """The shared database cannot be reached now: changes are refused until it is back."""


class NotFound(RelayError):
    """A command named a client or tunnel that does not exist."""


class Conflict(RelayError):
    """A command would take what is already taken (a name, a port); ``reason`` when it is about a
    tunnel's claim."""

    def __init__(self, message: str, reason: TunnelRefusal | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class InvalidField(RelayError):
    """A command's value is invalid; ``key`` is the field's name (or key path)."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason
