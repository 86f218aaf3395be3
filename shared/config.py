"""Validated models for relayd.toml and relayc.toml, and the one loader for both.

Every problem becomes a ``ConfigError`` naming the file, the key path (``tunnels[1].local_port``)
and what is wrong; unknown keys are errors, so a typo never silently does nothing.  Relative
paths in a file are taken relative to that file's directory.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from shared.checks import (
    check_address,
    check_domain,
    check_each,
    check_host,
    check_name,
    check_printable,
    is_loopback,
)
from shared.errors import ConfigError
from shared.limits import parse_rate
from shared.schema import SchemaError, Table, key, key_path
from shared.tls import normalize_fingerprint
from shared.tunnel import TunnelKind, TunnelSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLE_TOKENS = frozenset({"example-token-change-me", "change-me", "token", "secret", "...", "PASTE-TOKEN"})


def is_example_token(token: str) -> bool:
    """A token copied from the docs as it is: a known example, or a ``PASTE-...`` placeholder."""
    return token in EXAMPLE_TOKENS or token.upper().startswith("PASTE-")


def check_port_ranges(value: str) -> str:
    PortRanges(value)
    return value


def check_targets(value: list[str]) -> list[str]:
    for entry in value:
        TargetPolicy([entry])
    return value


class PortRanges:
    """A set of ports written like ``"6000-7000,8022"``."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.ranges: list[tuple[int, int]] = []
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            lo_s, _, hi_s = part.partition("-")
            try:
                lo = int(lo_s)
                hi = int(hi_s) if hi_s else lo
            except ValueError:
                raise ValueError(f"{part!r} is not a port or a range like 6000-7000") from None
            if not (1 <= lo <= hi <= 65535):
                raise ValueError(f"{part!r} is not within 1-65535 with low <= high")
            self.ranges.append((lo, hi))
        if not self.ranges:
            raise ValueError('no ports given; write e.g. "6000-7000,8022"')

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and any(lo <= port <= hi for lo, hi in self.ranges)

    def size(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.ranges)

    def ports(self) -> list[int]:
        return [p for lo, hi in self.ranges for p in range(lo, hi + 1)]


# --- relayd -------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ServerAuth(Table):
    token: str = key("")
    token_file: str = key("")  # the token from a file (relative to this config); exclusive with token
    block_after_failures: int = key(10, ge=1)
    failure_window: float = key(600.0, gt=0)
    block_seconds: float = key(600.0, ge=0)


@dataclass(kw_only=True)
class ServerLimits(Table):
    max_preauth_per_ip: int = key(32, ge=1)
    max_preauth_total: int = key(1024, ge=1)
    max_connections_per_tunnel: int = key(0, ge=0)
    max_connections_per_client: int = key(0, ge=0)
    bandwidth_per_tunnel: int = key(0, before=parse_rate)
    bandwidth_per_client: int = key(0, before=parse_rate)
    max_udp_flows_per_tunnel: int = key(1024, ge=1, le=65536)


@dataclass(kw_only=True)
class ServerTLS(Table):
    enable: bool = key(True)
    cert_file: str = key("")
    key_file: str = key("")


WEAK_PASSWORDS = frozenset(
    {"admin", "123", "1234", "12345", "123456", "12345678", "password", "passw0rd", "root", "relay",
     "changeme", "change-me", "secret", "test", "guest", "qwerty", "letmein", "default", "...",
     "example-dashboard-password"}
)  # fmt: skip


@dataclass(kw_only=True)
class DashboardConfig(Table):
    addr: str = key("127.0.0.1")
    port: int = key(7500, ge=0, le=65535)
    user: str = key("admin")
    password: str = key("")
    password_hash: str = key("")
    tls_cert_file: str = key("")
    tls_key_file: str = key("")
    metrics_public: bool = key(False)


@dataclass(kw_only=True)
class CertificateFiles(Table):
    """A ``[[certificates]]`` table: a certificate chain and its key (PEM), served on
    ``vhost_https_port`` for every name it covers (wildcards too), in preference to ACME."""

    cert_file: str = key()
    key_file: str = key()


LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"


@dataclass(kw_only=True)
class AcmeConfig(Table):
    """``[acme]``: certificates for http tunnels' domains from an ACME CA (RFC 8555)."""

    enable: bool = key(False)
    email: str = key("", max_len=254, check=check_printable)
    directory_url: str = key(LETS_ENCRYPT, max_len=2048,
                             check=lambda v: v if v.startswith(("https://", "http://")) else _bad_url(v))  # fmt: skip
    ca_file: str = key("")  # the CA bundle that verifies the ACME server (a private CA, a test server)
    challenge: Literal["tls-alpn-01", "http-01"] = key("tls-alpn-01")


def _bad_url(value: str) -> str:
    raise ValueError(f"{value[:60]!r} is not an https:// URL")


@dataclass(kw_only=True)
class StoreConfig(Table):
    """``[store]``: where relayd keeps clients, tunnels and traffic.  No url: the embedded SQLite
    file in ``state_dir``; ``postgresql://...``: a PostgreSQL database several nodes share."""

    url: str = key("", max_len=2048, check=lambda v: v if not v or v.startswith(("postgresql://", "postgres://"))
                   else _bad_store_url(v))  # fmt: skip


def _bad_store_url(value: str) -> str:
    raise ValueError(f"{value[:40]!r}... is not a postgresql:// URL (leave url out for the embedded SQLite)")


@dataclass(kw_only=True)
class ServerConfig(Table):
    bind_addr: str = key("127.0.0.1")
    bind_port: int = key(7000, ge=0, le=65535)
    # where relayc reaches this node, "host" or "host:port" (default: bind_addr and bind_port); in
    # a cluster, what the other nodes tell relayc about this one
    public_addr: str = key("", max_len=300, check=lambda v: check_address(v) if v else v)
    proxy_bind_addr: str = key("")
    state_dir: str = key("relayd-state")
    allow_ports: str = key("1024-65535", check=check_port_ranges)
    max_ports_per_client: int = key(0, ge=0)
    max_tunnels_per_client: int = key(64, ge=0)
    keepalive_timeout: float = key(30.0, ge=1.0, le=600.0)
    handshake_timeout: float = key(10.0, ge=1.0, le=120.0)
    vhost_http_port: int = key(0, ge=0, le=65535)
    vhost_https_port: int = key(0, ge=0, le=65535)
    subdomain_host: str = key("", check=lambda v: check_domain(v) if v else "")
    vhost_header_timeout: float = key(10.0, ge=1.0, le=300.0)
    auth: ServerAuth = key(factory=ServerAuth)
    tls: ServerTLS = key(factory=ServerTLS)
    limits: ServerLimits = key(factory=ServerLimits)
    dashboard: DashboardConfig | None = key(None)  # on when the [dashboard] table is present
    acme: AcmeConfig = key(factory=AcmeConfig)
    store: StoreConfig = key(factory=StoreConfig)
    certificates: list[CertificateFiles] = key([])

    @property
    def port_ranges(self) -> PortRanges:
        return PortRanges(self.allow_ports)

    @property
    def public_bind_addr(self) -> str:
        return self.proxy_bind_addr or self.bind_addr

    def public_address(self, bound_port: int = 0) -> str:
        """``host:port`` where relayc reaches this node (``public_addr``, else bind_addr and the
        port bound)."""
        from shared.checks import split_host_port

        host, port = split_host_port(self.public_addr, bound_port or self.bind_port) if self.public_addr else \
            (self.bind_addr, bound_port or self.bind_port)  # fmt: skip
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --- relayc -------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class ClientAuth(Table):
    token: str = key("")
    token_file: str = key("")  # the token from a file (relative to this config); exclusive with token


@dataclass(kw_only=True)
class ClientTLS(Table):
    enable: bool = key(True)
    # pins: one fingerprint, or a list (a cluster's nodes); nodes learned from the cluster's member
    # list are trusted through a node verified with these
    server_fingerprint: list[str] = key([], before=lambda v: ([v] if v else []) if isinstance(v, str) else v,
                                        max_len=64, check=lambda v: [normalize_fingerprint(f) for f in v])  # fmt: skip
    server_name: str = key("")
    ca_file: str = key("")


class TargetPolicy:
    """Which local targets relayc may dial for tunnels pushed by relayd (``allow_targets``).

    Entries: a host (``"localhost"``, ``"10.1.2.3"``), ``host:port`` (``"gpu-box:8888"``,
    ``"[::1]:22"``) or a CIDR (``"10.0.0.0/8"``).  Matching is on the names as written: relayc
    does not resolve a pushed host name to compare it with a CIDR.
    """

    def __init__(self, entries: list[str]) -> None:
        self.hosts: set[str] = set()
        self.host_ports: set[tuple[str, int]] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for raw in entries:
            entry = raw.strip().lower()
            if "/" in entry:
                try:
                    self.networks.append(ipaddress.ip_network(entry, strict=False))
                except ValueError:
                    raise ValueError(f"{raw!r} is not a valid CIDR") from None
                continue
            host, port = entry, None
            if entry.startswith("["):
                host, _, rest = entry[1:].partition("]")
                port = rest[1:] if rest.startswith(":") else None
            elif entry.count(":") == 1:
                host, port = entry.split(":")
            if not host:
                raise ValueError(f"{raw!r} has no host")
            if port is None:
                self.hosts.add(host)
            elif port.isdigit() and 1 <= int(port) <= 65535:
                self.host_ports.add((host, int(port)))
            else:
                raise ValueError(f"{raw!r}: port must be 1-65535")

    def allows(self, host: str, port: int) -> bool:
        h = host.strip().lower().strip("[]")
        if h in self.hosts or (h, port) in self.host_ports:
            return True
        try:
            ip = ipaddress.ip_address(h)
        except ValueError:
            return False
        return any(ip in net for net in self.networks)


# relayc.toml's [[tunnels]] table is the one tunnel model
TunnelConfig = TunnelSpec


@dataclass(kw_only=True)
class VisitorConfig(Table):
    """A ``[[visitors]]`` table: a local port that leads to another client's secret tunnel."""

    client: str = key(check=check_name)  # the client that owns the tunnel
    tunnel: str = key(check=check_name)
    secret_key: str = key("", max_len=256)
    bind_addr: str = key("127.0.0.1", check=check_host)
    bind_port: int = key(ge=0, le=65535)  # 0: any free port (relayc logs which)


@dataclass(kw_only=True)
class ClientConfig(Table):
    # one relayd, or several nodes of a cluster: "host" or "host:port" each (server_port by default)
    server_addr: list[str] = key(["127.0.0.1"], before=lambda v: [v] if isinstance(v, str) else v, max_len=64,
                                 check=check_each(check_address, 300))  # fmt: skip
    server_port: int = key(7000, ge=1, le=65535)
    name: str = key(factory=socket.gethostname, check=check_name)
    keepalive_timeout: float = key(30.0, ge=1.0, le=600.0)
    # where relayc keeps its state (the servers it trusts on first use): default this file's folder;
    # a writable directory when the config is mounted read-only (Docker)
    state_dir: str = key(".", max_len=4096)
    auth: ClientAuth = key(factory=ClientAuth)
    tls: ClientTLS = key(factory=ClientTLS)
    allow_targets: list[str] = key(["127.0.0.1", "::1", "localhost"], check=check_targets)
    tunnels: list[TunnelConfig] = key([])
    visitors: list[VisitorConfig] = key([])


# --- loading ------------------------------------------------------------------------------------

ModelT = TypeVar("ModelT", ServerConfig, ClientConfig)


def parse_config(model: type[ModelT], data: dict[str, Any], path: str) -> ModelT:
    try:
        cfg = model.from_table(data)
    except SchemaError as exc:
        (loc, reason), *others = exc.problems
        if others:
            reason += "  (also: " + "; ".join(f"{key_path(o)}: {why}" for o, why in others[:3]) + ")"
        raise ConfigError(path, key_path(loc), reason) from None
    _check_semantics(cfg, path)
    return cfg


def load_config(model: type[ModelT], path: str | Path) -> ModelT:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(str(p), "", f"cannot read: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(str(p), "", f"not valid TOML: {exc}") from None
    return parse_config(model, data, str(p))


TOKEN_ENV = "RELAY_TOKEN"  # the token from the environment, when neither token nor token_file is set


def _resolve_token(auth: ServerAuth | ClientAuth, path: str) -> None:
    """``[auth] token``, else ``token_file`` (its first line), else ``$RELAY_TOKEN``: into
    ``auth.token`` (a token file keeps the secret out of a config that is shared or checked in)."""
    if auth.token and auth.token_file:
        raise ConfigError(path, "auth.token_file", "set token or token_file, not both")
    if auth.token_file:
        file = resolve_path(path, auth.token_file)
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(path, "auth.token_file", f"cannot read {str(file)!r}: {reason}") from None
        token = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not token:
            raise ConfigError(path, "auth.token_file", f"{str(file)!r} is empty")
        auth.token = token
    elif not auth.token:
        auth.token = os.environ.get(TOKEN_ENV, "").strip()


def _check_semantics(cfg: ServerConfig | ClientConfig, path: str) -> None:
    _resolve_token(cfg.auth, path)
    if isinstance(cfg, ClientConfig):
        seen: dict[str, int] = {}
        for i, t in enumerate(cfg.tunnels):
            if t.name in seen:
                raise ConfigError(path, f"tunnels[{i}].name", f"{t.name!r} is already used by tunnels[{seen[t.name]}]")
            seen[t.name] = i
        for i, t in enumerate(cfg.tunnels):
            _check_tunnel_kind(t, f"tunnels[{i}]", path)
        ports: dict[tuple[TunnelKind, int], int] = {}
        for i, t in enumerate(cfg.tunnels):
            if t.type not in (TunnelKind.TCP, TunnelKind.UDP) or not t.remote_port:
                continue
            if (t.type, t.remote_port) in ports:
                raise ConfigError(
                    path,
                    f"tunnels[{i}].remote_port",
                    f"{t.type} port {t.remote_port} is already used by tunnels[{ports[t.type, t.remote_port]}]",
                )
            ports[t.type, t.remote_port] = i
        binds: dict[tuple[str, int], int] = {}
        for i, v in enumerate(cfg.visitors):
            if v.bind_port and (v.bind_addr, v.bind_port) in binds:
                other = binds[v.bind_addr, v.bind_port]
                raise ConfigError(path, f"visitors[{i}].bind_port",
                                  f"{v.bind_addr}:{v.bind_port} is already used by visitors[{other}]")  # fmt: skip
            binds[v.bind_addr, v.bind_port] = i
        if not cfg.auth.token:
            raise ConfigError(path, "auth.token", f"empty: set the same token as in relayd.toml [auth] (or token_file, "
                              f"or ${TOKEN_ENV})")  # fmt: skip
        if cfg.tls.enable and cfg.tls.server_fingerprint and cfg.tls.server_name:
            raise ConfigError(
                path, "tls.server_name", "set either tls.server_fingerprint (pin) or tls.server_name (CA), not both"
            )
        return
    if bool(cfg.tls.cert_file) != bool(cfg.tls.key_file):
        key = "tls.key_file" if cfg.tls.cert_file else "tls.cert_file"
        raise ConfigError(path, key, "tls.cert_file and tls.key_file must be given together")
    if not cfg.auth.token:
        raise ConfigError(
            path,
            "auth.token",
            "empty: set a long random secret, e.g. the output of "
            f"python3 -c 'import secrets; print(secrets.token_urlsafe(32))' (or token_file, or ${TOKEN_ENV})",
        )
    if cfg.dashboard is not None:
        _check_dashboard(cfg.dashboard, path)
    if cfg.acme.enable:
        port_key = "vhost_https_port" if cfg.acme.challenge == "tls-alpn-01" else "vhost_http_port"
        if not getattr(cfg, port_key):
            raise ConfigError(path, "acme.challenge", f"{cfg.acme.challenge} is answered on {port_key}, which is 0 "
                              f"(off): set {port_key}, or choose the other challenge")  # fmt: skip
        if not cfg.vhost_https_port:
            raise ConfigError(path, "acme.enable", "certificates are served on vhost_https_port, which is 0 (off)")
    for i, files in enumerate(cfg.certificates):
        for name in ("cert_file", "key_file"):
            if not resolve_path(path, getattr(files, name)).is_file():
                raise ConfigError(path, f"certificates[{i}].{name}", f"{getattr(files, name)!r}: no such file")
    if not is_loopback(cfg.bind_addr) and is_example_token(cfg.auth.token):
        raise ConfigError(
            path,
            "auth.token",
            f"is the example token while bind_addr is {cfg.bind_addr!r}: anyone could log in; set your own secret",
        )


def _check_dashboard(dash: DashboardConfig, path: str) -> None:
    if not dash.password and not dash.password_hash:
        raise ConfigError(path, "dashboard.password", "empty: the dashboard never runs without a password "
                          "(set password, or password_hash made by `relayd hash-password`)")  # fmt: skip
    if dash.password and dash.password_hash:
        raise ConfigError(path, "dashboard.password_hash", "set password or password_hash, not both")
    if dash.password_hash and not dash.password_hash.startswith("scrypt$"):
        raise ConfigError(path, "dashboard.password_hash", "not a hash made by `relayd hash-password`")
    if (
        dash.password
        and not is_loopback(dash.addr)
        and (dash.password.lower() in WEAK_PASSWORDS or len(dash.password) < 8)
    ):
        raise ConfigError(path, "dashboard.password", f"too weak for a dashboard on {dash.addr!r} (a well-known "
                          "or short password): use a long random one, or keep addr on 127.0.0.1")  # fmt: skip
    if bool(dash.tls_cert_file) != bool(dash.tls_key_file):
        raise ConfigError(path, "dashboard.tls_key_file", "tls_cert_file and tls_key_file must be given together")


def _check_tunnel_kind(t: TunnelConfig, key: str, path: str) -> None:
    problem = t.kind_problem()
    if problem is not None:
        raise ConfigError(path, f"{key}.{problem[0]}", problem[1])


def resolve_path(config_path: str | Path, value: str) -> Path:
    """A path from a config file, taken relative to that file's directory."""
    p = Path(value).expanduser()
    return p if p.is_absolute() else Path(config_path).resolve().parent / p
