"""The one tunnel model: every field of a tunnel declared once, converted only at the edges.

A ``TunnelSpec`` is what a tunnel *is*: the ``[[tunnels]]`` table of relayc.toml, the ``tunnel``
object of the wire's ``tunnel_add`` and ``tunnel_push``, the JSON a dashboard tunnel is stored as,
and the body of ``POST /api/v1/tunnels`` (plus ``client``) are all its ``to_dict`` form, read back
by ``TunnelSpec.parse``, which applies every check below and the kind rules.  A field is declared
here with its default, bounds, check and the kinds it is for (``meta={"kinds": ...}``); nothing
else in the project lists the fields (the dashboard's form is built from ``field_list``).

Kinds are ``TunnelKind``; each is served by one frontend of relayd (``relay_server/frontends``).
"""

from __future__ import annotations

import enum
from dataclasses import MISSING, dataclass
from typing import Any, Final, Literal, get_args, get_origin

from shared.checks import (
    check_domain,
    check_each,
    check_host,
    check_host_rewrite,
    check_label,
    check_locations,
    check_name,
    check_printable,
    check_probe_path,
    check_sources,
)
from shared.limits import parse_rate
from shared.schema import Loc, SchemaError, ShapeProblem, Table, key


class TunnelKind(str, enum.Enum):
    """What a tunnel carries and how visitors reach it."""

    TCP = "tcp"  # a public TCP port
    HTTP = "http"  # a domain (and locations) on relayd's HTTP vhost port
    HTTPS = "https"  # a domain on relayd's HTTPS vhost port, TLS passed through (routed by SNI)
    UDP = "udp"  # a public UDP port: datagrams of each visitor address travel as one flow
    SECRET = "secret"  # no public port: only relayc visitors that are allowed reach it

    def __str__(self) -> str:
        return self.value


HTTP_KINDS: Final = (TunnelKind.HTTP, TunnelKind.HTTPS)
HTTP_ONLY: Final = (TunnelKind.HTTP,)
PORT_KINDS: Final = (TunnelKind.TCP, TunnelKind.UDP)  # reached on a public port of their own
GROUP_KINDS: Final = (TunnelKind.TCP, TunnelKind.HTTP, TunnelKind.HTTPS)  # may be served by a group
PROBED_KINDS: Final = (TunnelKind.TCP, TunnelKind.HTTP, TunnelKind.HTTPS, TunnelKind.SECRET)  # health checks
MAX_LIST: Final = 64  # items in any list of a tunnel
PROBLEM_KEY_MAX: Final = 64  # characters of a key named in a refusal
PROBLEM_MAX: Final = 512  # characters of a refusal's text


def check_shared_secret(value: str) -> str:
    """A secret_key or group_key: printable, and long enough not to be guessed (16 characters)."""
    check_printable(value)
    if value and len(value) < 16:
        raise ValueError("is too short to be a secret: use at least 16 characters (a random one)")
    return value


def _kinds(*kinds: TunnelKind, label: str = "") -> dict[str, Any]:
    return {"kinds": kinds, "label": label}


@dataclass(kw_only=True)
class TunnelSpec(Table):
    """One tunnel, as relayc.toml's ``[[tunnels]]`` declares it."""

    name: str = key(check=check_name, meta={"label": "name, e.g. jupyter"})
    type: TunnelKind = key(TunnelKind.TCP)
    local_ip: str = key("127.0.0.1", check=check_host, meta={"label": "target host on the lab side"})
    local_port: int = key(ge=1, le=65535, meta={"label": "target port on the lab side"})
    remote_port: int = key(0, ge=0, le=65535, meta=_kinds(*PORT_KINDS, label="public port (0 = any)"))
    # http and https tunnels: routed by host name on relayd's vhost ports
    subdomain: str = key("", check=check_label, meta=_kinds(*HTTP_KINDS, label="subdomain of subdomain_host"))
    custom_domains: list[str] = key([], max_len=MAX_LIST, check=check_each(check_domain, 253),
                                    meta=_kinds(*HTTP_KINDS, label="custom domains"))  # fmt: skip
    locations: list[str] = key([], max_len=MAX_LIST, check=lambda v: check_locations(check_each(str, 1024)(v)),
                               meta=_kinds(*HTTP_ONLY, label="path prefixes, e.g. /api"))  # fmt: skip
    http_user: str = key("", max_len=256, check=check_printable, meta=_kinds(*HTTP_ONLY, label="basic auth user"))
    http_password: str = key("", max_len=256, check=check_printable,
                             meta={**_kinds(*HTTP_ONLY, label="basic auth password"), "secret": True})  # fmt: skip
    host_header_rewrite: str = key("", max_len=253, check=check_host_rewrite,
                                   meta=_kinds(*HTTP_ONLY, label="Host header sent to the app"))  # fmt: skip
    # plain HTTP answers 308 to https:// while relayd holds a valid certificate for the domain
    https_redirect: bool = key(False, meta=_kinds(*HTTP_ONLY, label="redirect http to https"))
    # Strict-Transport-Security on the first answer of each HTTPS connection relayd terminates
    hsts: bool = key(False, meta=_kinds(*HTTP_ONLY, label="HSTS (browsers insist on https)"))
    # limits, enforced by relayd (its own [limits] can only make them stricter)
    max_connections: int = key(0, ge=0, le=2**31, meta={"label": "max connections (0 = no limit)"})
    bandwidth_limit: int = key(0, before=parse_rate, le=2**62, meta={"label": "bandwidth, e.g. 10MB (per second)"})
    # the visitor's address to the local service, before its bytes (tcp, and https passed through)
    proxy_protocol: Literal["", "v1", "v2"] = key("", meta=_kinds(TunnelKind.TCP, TunnelKind.HTTPS,
                                                                  label="PROXY protocol header: v1 or v2"))  # fmt: skip
    allow_sources: list[str] = key([], max_len=MAX_LIST, check=lambda v: check_sources(check_each(str, 64)(v)),
                                   meta={"label": "visitor CIDRs allowed (empty = all)"})  # fmt: skip
    # udp tunnels: a flow (one visitor address) ends after this long without a datagram
    udp_idle_timeout: int = key(60, ge=1, le=86400, meta=_kinds(TunnelKind.UDP, label="UDP flow idle timeout (s)"))
    # secret tunnels: who may visit (client names), or anyone who presents secret_key
    allow_visitors: list[str] = key([], max_len=MAX_LIST, check=check_each(check_name, 128),
                                    meta=_kinds(TunnelKind.SECRET, label="clients allowed to visit"))  # fmt: skip
    secret_key: str = key("", max_len=256, check=check_shared_secret,
                          meta={**_kinds(TunnelKind.SECRET, label="key a visitor may present instead"),
                                "secret": True})  # fmt: skip
    # several clients serving one port or domain: members share group and group_key
    group: str = key("", check=lambda v: check_name(v) if v else v,
                     meta=_kinds(*GROUP_KINDS, label="group name (load balancing)"))  # fmt: skip
    group_key: str = key("", max_len=256, check=check_shared_secret,
                         meta={**_kinds(*GROUP_KINDS, label="group key (shared by its members)"),
                               "secret": True})  # fmt: skip
    # relayc probes the local service; a failing one is taken out of its group, shown as service down
    health_check: Literal["", "tcp", "http"] = key("", meta=_kinds(*PROBED_KINDS, label="health check: tcp or http"))
    health_check_path: str = key("/", max_len=1024, check=check_probe_path,
                                 meta=_kinds(*PROBED_KINDS, label="health check path (http)"))  # fmt: skip
    health_check_interval: int = key(10, ge=1, le=3600, meta=_kinds(*PROBED_KINDS, label="health check every (s)"))
    health_check_timeout: int = key(3, ge=1, le=60, meta=_kinds(*PROBED_KINDS, label="health check timeout (s)"))
    health_check_max_failures: int = key(3, ge=1, le=100,
                                         meta=_kinds(*PROBED_KINDS, label="failed checks before down"))  # fmt: skip

    # --- the edges ------------------------------------------------------------------------------

    @classmethod
    def parse(cls, data: Any, loc: Loc = ()) -> TunnelSpec:
        """A tunnel from its dict form (TOML table, wire object, stored JSON, API body), checked by
        the field rules and the kind rules; ``SchemaError`` (key paths under ``loc``) otherwise."""
        try:
            spec = cls.from_table(data)
        except SchemaError as exc:
            if loc:
                exc.problems = [_moved(p, loc) for p in exc.problems]
            raise
        problem = spec.kind_problem()
        if problem is not None:
            raise SchemaError([((*loc, problem[0]), problem[1])])
        return spec

    def to_dict(self, omit_defaults: bool = False, secrets: bool = True) -> dict[str, Any]:
        """The dict form (as TOML writes it).  ``omit_defaults``: only keys that differ from their
        default (what goes on the wire, so an older peer is not sent keys it does not know);
        ``secrets=False``: without write-only keys (``http_password``), for views."""
        out: dict[str, Any] = {}
        for name, _, _, f in self.schema():
            value = getattr(self, name)
            if not secrets and f.metadata.get("secret"):
                continue
            if omit_defaults and name not in ("name", "local_port") and value == _default(f):
                continue
            if isinstance(value, enum.Enum):
                value = value.value
            out[name] = list(value) if isinstance(value, list) else value
        return out

    # --- kind rules -----------------------------------------------------------------------------

    def kind_problem(self) -> tuple[str, str] | None:
        """(key, reason) for a key that does not fit the tunnel's kind, or None.  Keys that belong
        to some kinds only are errors on the others (a typo'd type must not silently publish a
        port)."""
        kind = self.type
        for name, _, _, f in self.schema():
            kinds = f.metadata.get("kinds")
            if kinds and kind not in kinds and getattr(self, name) != _default(f):
                if kind is TunnelKind.HTTPS and TunnelKind.HTTP in kinds:
                    return name, "only for http tunnels (https is passed through untouched)"
                if kinds == PORT_KINDS and kind in HTTP_KINDS:
                    return (
                        name,
                        f"only for tcp and udp tunnels; a {kind} tunnel is reached by its domain on relayd's "
                        "vhost port",
                    )
                if kinds == PORT_KINDS:
                    return name, "only for tcp and udp tunnels; a secret tunnel has no public port"
                return name, f'only for {"/".join(k.value for k in kinds)} tunnels (this one is type "{kind}")'
        if kind in HTTP_KINDS and not self.subdomain and not self.custom_domains:
            return "subdomain", f"a {kind} tunnel needs subdomain or custom_domains"
        if bool(self.http_user) != bool(self.http_password):
            return "http_password", "http_user and http_password must be given together"
        if self.group and not self.group_key:
            return "group_key", "a group needs group_key, the secret every member of the group shares"
        if self.group_key and not self.group:
            return "group", "group_key without group"
        if self.group and kind in PORT_KINDS and not self.remote_port:
            return "remote_port", "a group needs a fixed remote_port: its members meet on that port"
        return None


def _moved(problem: tuple[Loc, str], loc: Loc) -> tuple[Loc, str]:
    """``problem`` under the key path ``loc``, still a shape problem if it was one."""
    moved = ((*loc, *problem[0]), problem[1])
    return ShapeProblem(moved) if isinstance(problem, ShapeProblem) else moved  # type: ignore[return-value]


def _default(f: Any) -> Any:
    """A field's default (None for a required field)."""
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None if f.default is MISSING else f.default


def field_list() -> list[dict[str, Any]]:
    """Every field of a tunnel for a form: name, JSON type, default, the kinds it is for, a label,
    whether it is write-only.  The dashboard builds its tunnel form from this."""
    out: list[dict[str, Any]] = []
    for name, tp, _, f in TunnelSpec.schema():
        meta = TunnelSpec.key_meta(name)
        default = _default(f)
        if isinstance(default, enum.Enum):
            default = default.value
        kind = "list" if getattr(tp, "__origin__", None) is list else "int" if tp is int else \
            "bool" if tp is bool else "str"  # fmt: skip
        choices = [k.value for k in TunnelKind] if tp is TunnelKind else None
        if get_origin(tp) is Literal:
            choices = [c for c in get_args(tp) if c]
        out.append({
            "name": name, "type": kind, "default": default, "required": default is None,
            "kinds": [k.value for k in meta.get("kinds") or TunnelKind], "label": meta.get("label", ""),
            "secret": bool(meta.get("secret")), "choices": choices,
        })  # fmt: skip
    return out


@dataclass(frozen=True)
class InvalidTunnel:
    """A tunnel a peer sent that breaks the model's rules: refused by name, the session goes on.
    ``name`` is what the peer sent as the name (printable, cut short), ``problem`` the sentence."""

    name: str
    problem: str

    @classmethod
    def of(cls, data: dict[str, Any], error: SchemaError) -> InvalidTunnel:
        raw = data.get("name")
        name = raw[:128] if isinstance(raw, str) and raw.isprintable() and raw else "?"
        where, why = error.problems[0]
        field = ".".join(str(part) for part in where)[:PROBLEM_KEY_MAX]  # a key a peer made up: cut short
        problem = f"tunnel {name!r}: {field}: {why}" if field else f"tunnel {name!r}: {why}"
        return cls(name=name, problem=problem[:PROBLEM_MAX])
