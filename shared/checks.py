"""Checks of the names and values a peer or a file gives: each returns the value (normalized) or
raises ``ValueError`` saying what is wrong.  One rule per kind of value, used by the config files,
the wire and the dashboard's API alike."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

# Matched with fullmatch: "$" would also accept a trailing newline.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_LABEL_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def check_name(value: str) -> str:
    """A client or tunnel name (the same rule in config files and the dashboard API)."""
    if not _NAME_RE.fullmatch(value):
        raise ValueError("must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return value


def check_label(value: str) -> str:
    """A subdomain: one DNS label, lowercased; "" stays "" (no subdomain)."""
    v = value.lower() if value.isascii() else "-"
    if value and not _LABEL_RE.fullmatch(v):
        raise ValueError("must be one DNS label: letters, digits and '-' (e.g. \"jupyter\")")
    return v


def check_domain(value: str) -> str:
    """A host name, lowercased; ValueError naming the problem otherwise."""
    v = value.lower() if value.isascii() else ""  # lower() would turn some non-ASCII into ASCII
    v = v[:-1] if v.endswith(".") else v  # one trailing dot: the same name, fully qualified
    labels = v.split(".")
    if not v or len(v) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise ValueError(f"{value!r} is not a valid domain name")
    return v


def check_sources(value: list[str]) -> list[str]:
    for cidr in value:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ValueError(f"{cidr!r} is not an address or CIDR like 10.0.0.0/8") from None
    return value


_LOCATION_RE = re.compile(r"/[\x21-\x7e]*")


def check_locations(value: list[str]) -> list[str]:
    """Path prefixes: each starts with '/', printable ASCII without spaces (they are matched
    against request paths; relayd normalizes both sides)."""
    for loc in value:
        if not loc.startswith("/"):
            raise ValueError(f"{loc!r} must start with '/'")
        if not _LOCATION_RE.fullmatch(loc):
            raise ValueError(f"{loc!r} may hold only printable ASCII without spaces")
    return value


def check_host_rewrite(value: str) -> str:
    """``host_header_rewrite``: empty, or a host name or address with an optional port, in ASCII
    (it becomes a request header)."""
    if not value:
        return value
    if not value.isascii() or not value.isprintable():
        raise ValueError(f"{value!r} must be printable ASCII")
    host, port = value, ""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{value!r} is not host, host:port or [v6]:port")
        port = rest[1:]
    elif value.count(":") == 1:
        host, port = value.split(":")
    if port and not (re.fullmatch(r"[0-9]{1,5}", port) and 1 <= int(port) <= 65535):
        raise ValueError(f"{value!r}: the port must be 1-65535")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        check_domain(host)  # raises naming the value
    return value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_host(value: str) -> str:
    """A host to dial (``local_ip``): an address or a host name, printable ASCII without spaces."""
    if not value or len(value) > 255 or not value.isascii() or not value.isprintable() or " " in value:
        raise ValueError(f"{value!r} is not an address or host name")
    return value


def check_probe_path(value: str) -> str:
    """An HTTP health check's path: starts with ``/``, printable ASCII without spaces."""
    if not value.startswith("/") or not value.isascii() or not value.isprintable() or " " in value:
        raise ValueError(f"{value[:40]!r} is not a path starting with /")
    return value


def check_printable(value: str) -> str:
    """A value that ends up in a header or a log line: no control characters."""
    if not value.isprintable():
        raise ValueError("holds control characters")
    return value


def check_each(check: Callable[[str], str], max_len: int) -> Callable[[list[str]], list[str]]:
    """A check for a list of strings: ``check`` on each item, each at most ``max_len`` characters."""

    def checked(values: list[str]) -> list[str]:
        for item in values:
            if len(item) > max_len:
                raise ValueError(f"{item[:40]!r}... is longer than {max_len} characters")
        return [check(item) for item in values]

    return checked


def split_host_port(value: str, default_port: int) -> tuple[str, int]:
    """``"host"``, ``"host:port"`` or ``"[v6]:port"`` -> (host, port); ValueError when malformed."""
    text = value.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"{value!r} is not host or host:port")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    check_host(host)
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: the port must be 1-65535")
    return host, int(port_text)


def check_address(value: str) -> str:
    """``"host"`` or ``"host:port"`` (the port defaults elsewhere)."""
    split_host_port(value, 1)
    return value
