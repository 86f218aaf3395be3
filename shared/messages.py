"""Control messages and their encoding: 4-byte big-endian length, then one JSON object.

Every object has a ``"type"``.  Unknown fields are ignored (so a newer peer may add some); an
unknown ``type``, a missing or mistyped field, or a message over ``MAX_MESSAGE_SIZE`` is a
``RemoteProtocolError`` that names the problem.  ``MessageDecoder`` is sans-IO: feed it bytes,
take whole messages out.
"""

from __future__ import annotations

import json
import struct
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from shared.errors import RemoteProtocolError

MAX_MESSAGE_SIZE: Final = 64 * 1024
_LEN = struct.Struct("!I")


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Hello(_Message):
    """relayc -> relayd, first message on the control stream."""

    type: Literal["hello"] = "hello"
    name: str = Field(min_length=1, max_length=128)
    version: str = ""
    client_nonce: str = Field(min_length=32, max_length=128)


class Challenge(_Message):
    """relayd -> relayc: a fresh random nonce to sign."""

    type: Literal["challenge"] = "challenge"
    server_nonce: str = Field(min_length=32, max_length=128)


class Login(_Message):
    """relayc -> relayd: proof of the token, HMAC over the transcript (see shared.auth)."""

    type: Literal["login"] = "login"
    proof: str = Field(min_length=64, max_length=64)


class LoginOk(_Message):
    """relayd -> relayc: login accepted; ``proof`` shows relayd knows the token too."""

    type: Literal["login_ok"] = "login_ok"
    proof: str = Field(min_length=64, max_length=64)
    version: str = ""


class LoginFailed(_Message):
    type: Literal["login_failed"] = "login_failed"
    reason: str


class TunnelSpec(_Message):
    """What a tunnel is, as carried on the wire (the config model maps onto it)."""

    name: str = Field(min_length=1, max_length=128)
    type: Literal["tcp"] = "tcp"
    local_ip: str = "127.0.0.1"
    local_port: int = Field(ge=1, le=65535)
    remote_port: int = Field(default=0, ge=0, le=65535)


class TunnelAdd(_Message):
    """relayc -> relayd: please open a public listener for this tunnel."""

    type: Literal["tunnel_add"] = "tunnel_add"
    tunnel: TunnelSpec


class TunnelStatus(_Message):
    """relayd -> relayc: the result of a TunnelAdd."""

    type: Literal["tunnel_status"] = "tunnel_status"
    name: str
    ok: bool
    remote_port: int = 0
    error: str = ""


class StreamOpen(_Message):
    """relayd -> relayc, the first message on every stream relayd opens for a visitor."""

    type: Literal["stream_open"] = "stream_open"
    tunnel: str
    visitor: str = ""


ControlMessage = Annotated[
    Hello | Challenge | Login | LoginOk | LoginFailed | TunnelAdd | TunnelStatus | StreamOpen,
    Field(discriminator="type"),
]
_adapter: TypeAdapter[Any] = TypeAdapter(ControlMessage)
MESSAGE_TYPES: Final = frozenset(
    ["hello", "challenge", "login", "login_ok", "login_failed", "tunnel_add", "tunnel_status", "stream_open"]
)


def encode_message(message: _Message) -> bytes:
    body = message.model_dump_json().encode()
    if len(body) > MAX_MESSAGE_SIZE:
        raise ValueError(f"{message.__class__.__name__} message is {len(body)} bytes, over {MAX_MESSAGE_SIZE}")
    return _LEN.pack(len(body)) + body


def decode_message(body: bytes) -> Any:
    """Decode one message body (without its length prefix)."""
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RemoteProtocolError(f"control message is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError(f"control message must be a JSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    if kind not in MESSAGE_TYPES:
        raise RemoteProtocolError(f"unknown control message type {kind!r}")
    try:
        return _adapter.validate_python(obj)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"][1:]) or "?"
        raise RemoteProtocolError(f"bad {kind} message: field {field}: {err['msg']}") from None


class MessageDecoder:
    """Splits a byte stream into control messages.  Holds at most one partial message."""

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._buf = bytearray()
        self._max_size = max_size

    def feed(self, data: bytes | memoryview, limit: int = 0) -> list[Any]:
        """Add bytes; return the whole messages now available (at most ``limit`` if non-zero)."""
        self._buf += data
        out: list[Any] = []
        while len(self._buf) >= 4 and not (limit and len(out) >= limit):
            (size,) = _LEN.unpack_from(self._buf)
            if size > self._max_size:
                raise RemoteProtocolError(f"control message of {size} bytes exceeds the maximum {self._max_size}")
            if len(self._buf) < 4 + size:
                break
            body = bytes(self._buf[4 : 4 + size])
            del self._buf[: 4 + size]
            out.append(decode_message(body))
        return out

    def take_rest(self) -> bytes:
        """Return (and forget) bytes after the last whole message: a stream's payload."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    @property
    def buffered(self) -> int:
        return len(self._buf)
