"""Control messages and their encoding: 4-byte big-endian length, then one JSON object.

Every object has a ``"type"``.  Unknown fields are ignored (so a newer peer may add some); an
unknown ``type``, a missing or mistyped field, or a message over ``MAX_MESSAGE_SIZE`` is a
``RemoteProtocolError`` that names the problem.  Messages are frozen dataclasses checked by a few
lines of code rather than pydantic: one is decoded per visitor connection, and relayc's memory
budget has no room for schema machinery it does not need.  ``MessageDecoder`` is sans-IO: feed it bytes,
take whole messages out.
"""

from __future__ import annotations

import enum
import functools
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Final

from shared.errors import RemoteProtocolError
from shared.schema import SchemaError, ShapeProblem, key_path
from shared.tunnel import InvalidTunnel, TunnelSpec

MAX_MESSAGE_SIZE: Final = 64 * 1024
_LEN = struct.Struct("!I")


@dataclass(frozen=True)
class _Field:
    """How one field of a message is checked: its type and bounds."""

    kind: type
    default: Any = None
    min_len: int = 0
    max_len: int = 1024
    lo: int = 0
    hi: int = 65535
    required: bool = True
    choices: tuple[str, ...] = ()
    max_items: int = 64
    omit_default: bool = False  # not written when it holds its default (a field older peers lack)


def _spec(kind: type, **kw: Any) -> Any:
    return field(default=kw.get("default"), metadata={"spec": _Field(kind, **kw)})


class _FieldError(Exception):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(reason)
        self.path = path
        self.reason = reason


_SPECS: dict[type, tuple[tuple[str, str, _Field], ...]] = {}
# One encoder for every message: json.dumps with non-default arguments builds a new one per call.
_JSON = json.JSONEncoder(separators=(",", ":"))
_JSON_DECODE = json.JSONDecoder().decode  # json.loads would sniff the encoding of bytes on every call
# The C scanner under that decoder: parses one value with no whitespace handling around it, which
# is what our encoder writes.  Anything else goes through the full decoder (for its exact errors).
_JSON_SCAN: Callable[[str, int], tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


class _Message:
    """Base of the control messages: frozen dataclasses that check their fields on decode.

    ``wire_names`` renames attributes on the wire.  A nested ``TunnelSpec`` (``shared.tunnel``)
    is checked by the tunnel model's own rules, the same as relayc.toml's.
    """

    type: ClassVar[str]
    wire_names: ClassVar[dict[str, str]] = {}

    @classmethod
    def _specs(cls) -> tuple[tuple[str, str, _Field], ...]:
        """(attribute, wire key, spec) per field; computed once per class (dataclasses.fields is slow)."""
        cached = _SPECS.get(cls)
        if cached is None:
            cached = tuple(
                (f.name, cls.wire_names.get(f.name, f.name), f.metadata["spec"])
                for f in fields(cls)  # type: ignore[arg-type]
            )
            _SPECS[cls] = cached
        return cached

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, key, spec in self._specs():
            value = getattr(self, name)
            if spec.omit_default and value == spec.default:
                continue
            if isinstance(value, _Message):
                value = value.to_dict()
            elif isinstance(value, TunnelSpec):
                value = value.to_dict(omit_defaults=True)
            elif isinstance(value, tuple):
                value = list(value)
            out[key] = value
        return out

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> Any:
        values: dict[str, Any] = {}
        for name, key, spec in cls._specs():
            if key not in obj:
                if spec.required:
                    raise _FieldError(key, "missing")
                values[name] = spec.default
                continue
            values[name] = _check(key, spec, obj[key])
        return cls(**values)


def _check(key: str, spec: _Field, value: Any) -> Any:
    if spec.kind is bool:
        if not isinstance(value, bool):
            raise _FieldError(key, "expected true or false")
    elif spec.kind is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _FieldError(key, "expected an integer")
        if not spec.lo <= value <= spec.hi:
            raise _FieldError(key, f"{value} is not within {spec.lo}-{spec.hi}")
    elif spec.kind is str:
        if not isinstance(value, str):
            raise _FieldError(key, "expected a string")
        if not spec.min_len <= len(value) <= spec.max_len:
            raise _FieldError(key, f"length {len(value)} is not within {spec.min_len}-{spec.max_len}")
        if spec.choices and value not in spec.choices:
            raise _FieldError(key, f"{value!r} is not one of {', '.join(spec.choices)}")
    elif spec.kind is list:
        if not isinstance(value, list) or len(value) > spec.max_items:
            raise _FieldError(key, f"expected a list of at most {spec.max_items} strings")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not 1 <= len(item) <= spec.max_len:
                raise _FieldError(f"{key}[{i}]", f"expected a string of 1-{spec.max_len} characters")
        return list(value)
    elif spec.kind is TunnelSpec:
        # a spec that breaks the tunnel rules is refused by name (the session goes on); one that
        # is not even an object is a protocol error
        if not isinstance(value, dict):
            raise _FieldError(key, "expected an object")
        try:
            return TunnelSpec.parse(value)
        except RecursionError:
            raise _FieldError(key, "nested too deeply") from None
        except SchemaError as exc:
            shape = next((p for p in exc.problems if isinstance(p, ShapeProblem)), None)
            if shape is not None:  # a missing field, a wrong type, a number out of bounds
                raise _FieldError(f"{key}.{key_path(shape[0])}", shape[1]) from None
            return InvalidTunnel.of(value, exc)
    else:
        if not isinstance(value, dict):
            raise _FieldError(key, "expected an object")
        try:
            return spec.kind.from_dict(value)  # type: ignore[attr-defined]
        except _FieldError as exc:
            raise _FieldError(f"{key}.{exc.path}", exc.reason) from None
    return value


def _str(min_len: int = 0, max_len: int = 1024, default: str | None = None) -> Any:
    return _spec(str, min_len=min_len, max_len=max_len, default=default, required=default is None)


def _int(lo: int, hi: int, default: int | None = None) -> Any:
    return _spec(int, lo=lo, hi=hi, default=default, required=default is None)


@dataclass(frozen=True)
class Hello(_Message):
    """relayc -> relayd, first message on the control stream."""

    type: ClassVar[str] = "hello"
    name: str = _str(1, 128)
    client_nonce: str = _str(32, 128)
    version: str = _str(0, 64, default="")
    # "visitor": a session that only visits secret tunnels (``relayc connect``): it registers no
    # tunnel and never conflicts with the client's own session of the same name
    role: str = _spec(str, max_len=16, default="", required=False, omit_default=True, choices=("", "visitor"))


@dataclass(frozen=True)
class Challenge(_Message):
    """relayd -> relayc: a fresh random nonce to sign."""

    type: ClassVar[str] = "challenge"
    server_nonce: str = _str(32, 128)


@dataclass(frozen=True)
class Login(_Message):
    """relayc -> relayd: proof of the token, HMAC over the transcript (see shared.auth)."""

    type: ClassVar[str] = "login"
    proof: str = _str(64, 64)


@dataclass(frozen=True)
class LoginOk(_Message):
    """relayd -> relayc: login accepted; ``proof`` shows relayd knows the token too."""

    type: ClassVar[str] = "login_ok"
    proof: str = _str(64, 64)
    version: str = _str(0, 64, default="")
    # a cluster's live nodes, "host:port sha256:..." each: relayc keeps a session to every one,
    # trusting each certificate because this authenticated answer names it
    members: tuple[str, ...] = _spec(list, default=(), required=False, omit_default=True, max_len=400,
                                     max_items=64)  # fmt: skip


class LoginRefusal(str, enum.Enum):
    """Why relayd refused a login (``LoginFailed.code``); relayc backs off according to it."""

    WRONG_TOKEN = "wrong_token"
    BLOCKED = "blocked"  # too many failures: not checked until ``retry_after`` seconds from now
    NAME_IN_USE = "name_in_use"  # a live session holds the name
    BAD_NAME = "bad_name"
    TOO_MANY_SESSIONS = "too_many_sessions"  # visitor sessions of one client name


@dataclass(frozen=True)
class LoginFailed(_Message):
    """relayd -> relayc: login refused.  ``code`` is a ``LoginRefusal`` value ("" from older
    relayd versions); ``retry_after`` says how many seconds trying again is pointless (0: unknown)."""

    type: ClassVar[str] = "login_failed"
    reason: str = _str(0, 1024)
    code: str = _str(0, 32, default="")
    retry_after: int = _int(0, 86400, default=0)


@dataclass(frozen=True)
class TunnelAdd(_Message):
    """relayc -> relayd: please open a public listener for this tunnel."""

    type: ClassVar[str] = "tunnel_add"
    tunnel: TunnelSpec | InvalidTunnel = _spec(TunnelSpec)


@dataclass(frozen=True)
class TunnelStatus(_Message):
    """relayd -> relayc: the result of a TunnelAdd."""

    type: ClassVar[str] = "tunnel_status"
    name: str = _str(1, 128)
    ok: bool = _spec(bool)
    remote_port: int = _int(0, 65535, default=0)
    error: str = _str(0, 4096, default="")
    url: str = _str(0, 4096, default="")  # http/https tunnels: where visitors reach it
    code: str = _str(0, 32, default="")  # a refusal: a ``TunnelRefusal`` value ("" from older relayd)


@dataclass(frozen=True)
class TunnelPush(_Message):
    """relayd -> relayc: a tunnel defined in the dashboard; relayc checks allow_targets, then
    registers it with tunnel_add (or answers tunnel_push_refused)."""

    type: ClassVar[str] = "tunnel_push"
    tunnel: TunnelSpec | InvalidTunnel = _spec(TunnelSpec)


@dataclass(frozen=True)
class TunnelPushRefused(_Message):
    """relayc -> relayd: a pushed tunnel was refused before any dial; ``error`` says why."""

    type: ClassVar[str] = "tunnel_push_refused"
    name: str = _str(1, 128)
    error: str = _str(0, 4096, default="")


@dataclass(frozen=True)
class TunnelRemove(_Message):
    """Both ways.  relayd -> relayc: forget a pushed tunnel (deleted or disabled in the
    dashboard).  relayc -> relayd: close a tunnel it registered (its config was reloaded without
    it); handled in order with its ``tunnel_add`` messages."""

    type: ClassVar[str] = "tunnel_remove"
    name: str = _str(1, 128)


@dataclass(frozen=True)
class StreamOpen(_Message):
    """relayd -> relayc, the first message on every stream relayd opens for a visitor."""

    type: ClassVar[str] = "stream_open"
    tunnel: str = _str(1, 128)
    visitor: str = _str(0, 300, default="")
    # relayd's address the visitor reached: only for PROXY protocol tunnels, so every other
    # stream_open is byte for byte what encode_stream_open writes
    public: str = _spec(str, max_len=300, default="", required=False, omit_default=True)


@dataclass(frozen=True)
class ClusterMembers(_Message):
    """relayd -> relayc: the cluster's live nodes changed ("host:port sha256:..." each, as in
    ``login_ok.members``)."""

    type: ClassVar[str] = "cluster_members"
    members: tuple[str, ...] = _spec(list, default=(), required=False, max_len=400, max_items=64)


@dataclass(frozen=True)
class TunnelHealth(_Message):
    """relayc -> relayd: the health check of a tunnel's local service changed its verdict."""

    type: ClassVar[str] = "tunnel_health"
    name: str = _str(1, 128)
    healthy: bool = _spec(bool)
    error: str = _str(0, 1024, default="")


@dataclass(frozen=True)
class VisitOpen(_Message):
    """visitor relayc -> relayd, the first message on a stream the visitor opens: join it to the
    secret tunnel ``tunnel`` of client ``client``.  ``proof`` (``shared.auth.visit_proof``) shows
    the tunnel's secret_key without sending it; "" for a visitor allowed by name."""

    type: ClassVar[str] = "visit_open"
    client: str = _str(1, 128)
    tunnel: str = _str(1, 128)
    proof: str = _str(0, 64, default="")


class VisitRefusal(str, enum.Enum):
    """Why relayd refused a visit (``VisitResult.code``)."""

    NOT_ALLOWED = "not_allowed"  # neither in allow_visitors nor the right secret_key
    NOT_FOUND = "not_found"  # no such secret tunnel open now (its client offline, or no such name)
    BUSY = "busy"  # the tunnel's or owner's connection limits


@dataclass(frozen=True)
class VisitResult(_Message):
    """relayd -> visitor relayc, the first message back on a visit stream; after ``ok`` the
    stream carries the tunnel's bytes, otherwise relayd ends it."""

    type: ClassVar[str] = "visit_result"
    ok: bool = _spec(bool)
    error: str = _str(0, 1024, default="")
    code: str = _str(0, 32, default="")


Message = (
    Hello
    | Challenge
    | Login
    | LoginOk
    | LoginFailed
    | TunnelAdd
    | TunnelStatus
    | TunnelPush
    | TunnelPushRefused
    | TunnelRemove
    | StreamOpen
    | TunnelHealth
    | ClusterMembers
    | VisitOpen
    | VisitResult
)  # what a decoder returns: one of the messages above

MESSAGE_CLASSES: Final[dict[str, type[_Message]]] = {
    cls.type: cls
    for cls in (
        Hello,
        Challenge,
        Login,
        LoginOk,
        LoginFailed,
        TunnelAdd,
        TunnelStatus,
        TunnelPush,
        TunnelPushRefused,
        TunnelRemove,
        StreamOpen,
        TunnelHealth,
        ClusterMembers,
        VisitOpen,
        VisitResult,
    )
}


def encode_message(message: _Message) -> bytes:
    body = _JSON.encode({"type": message.type, **message.to_dict()}).encode()
    if len(body) > MAX_MESSAGE_SIZE:
        raise ValueError(f"{message.type} message is {len(body)} bytes, over {MAX_MESSAGE_SIZE}")
    return _LEN.pack(len(body)) + body


def encode_stream_open(tunnel: str, visitor: str) -> bytes:
    """``encode_message(StreamOpen(tunnel=tunnel, visitor=visitor))``, byte for byte, in a fraction
    of the time: relayd writes one per visitor connection (bench row 4)."""
    body = _stream_open_head(tunnel) + _JSON.encode(visitor).encode() + b"}"
    return _LEN.pack(len(body)) + body


@functools.lru_cache(maxsize=256)
def _stream_open_head(tunnel: str) -> bytes:
    return b'{"type":"stream_open","tunnel":' + _JSON.encode(tunnel).encode() + b',"visitor":'


def decode_message(body: bytes | memoryview) -> Message:
    """Decode one message body (without its length prefix)."""
    try:
        text = str(body, "utf-8")
        try:
            obj, end = _JSON_SCAN(text, 0)
        except StopIteration:
            end = -1
        if end != len(text):
            obj = _JSON_DECODE(text)  # whitespace around the object, or not JSON: the full decoder
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RemoteProtocolError(f"control message is not valid JSON: {exc}") from None
    except RecursionError:
        raise RemoteProtocolError("control message is nested too deeply") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"control message must be a JSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    cls = MESSAGE_CLASSES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise RemoteProtocolError(f"unknown control message type {kind!r}")
    try:
        message: Message = cls.from_dict(obj)
        return message
    except _FieldError as exc:
        raise RemoteProtocolError(f"bad {kind} message: field {exc.path}: {exc.reason}") from None


def decode_first(data: bytes | memoryview, max_size: int = MAX_MESSAGE_SIZE) -> tuple[Message, int] | None:
    """The first message in ``data`` and where it ends, or None if it is not all there yet.

    For a reader that wants one message and then raw bytes (a stream's preamble) and usually gets
    it whole: no ``MessageDecoder`` and no buffer.  Raises like ``MessageDecoder.feed``."""
    if len(data) < 4:
        return None
    (size,) = _LEN.unpack_from(data)
    if size > max_size:
        raise RemoteProtocolError(f"control message of {size} bytes exceeds the maximum {max_size}")
    if len(data) < 4 + size:
        return None
    return decode_message(data[4 : 4 + size]), 4 + size


class MessageDecoder:
    """Splits a byte stream into control messages.  Holds at most one partial message."""

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._buf = bytearray()
        self._max_size = max_size

    def feed(self, data: bytes | memoryview, limit: int = 0) -> list[Message]:
        """Add bytes; return the whole messages now available (at most ``limit`` if non-zero)."""
        out: list[Message] = []
        buffered = bool(self._buf)
        if buffered:
            self._buf += data
        # Messages are decoded straight from the bytes given (the usual case: each arrives whole);
        # only a partial message, or what follows ``limit`` messages, is kept in ``self._buf``.
        pos, end = 0, len(self._buf) if buffered else len(data)
        with memoryview(self._buf if buffered else data) as view:
            while end - pos >= 4 and not (limit and len(out) >= limit):
                (size,) = _LEN.unpack_from(view, pos)
                if size > self._max_size:
                    raise RemoteProtocolError(f"control message of {size} bytes exceeds the maximum {self._max_size}")
                if end - pos < 4 + size:
                    break
                with view[pos + 4 : pos + 4 + size] as body:
                    out.append(decode_message(body))
                pos += 4 + size
            if not buffered and pos < end:
                self._buf += view[pos:]
        if buffered:
            del self._buf[:pos]
        return out

    def append(self, data: bytes | memoryview) -> None:
        """Keep bytes to be decoded by a later ``feed`` (``feed(b"", limit)`` decodes from them;
        the caller bounds what it appends, as a ControlChannel does by withholding credit)."""
        self._buf += data

    def take_rest(self) -> bytes:
        """Return (and forget) bytes after the last whole message: a stream's payload."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    @property
    def buffered(self) -> int:
        return len(self._buf)
