"""A hand-driven relay client for hostile tests: the sans-IO session over a blocking TLS socket."""

from __future__ import annotations

import socket
import ssl
from typing import Any

from shared import auth
from shared.errors import RemoteProtocolError
from shared.messages import Challenge, Hello, Login, LoginOk, MessageDecoder, encode_message
from shared.mux import DataReceived, Event, Session, StreamReset
from shared.tls import fingerprint_of_der


class RawClient:
    def __init__(self, port: int, source_ip: str = "127.0.0.1", tls: bool = True, timeout: float = 10) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source_ip, 0))
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            self.sock: socket.socket = ctx.wrap_socket(raw)
            self.fingerprint = fingerprint_of_der(self.sock.getpeercert(binary_form=True) or b"")  # type: ignore[attr-defined]
        else:
            self.sock = raw
            self.fingerprint = ""
        self.session = Session(True, 0.0)
        self.decoder = MessageDecoder()
        self.events: list[Event] = []
        self.flush()

    def flush(self) -> None:
        data = self.session.data_to_send()
        if data:
            self.sock.sendall(data)

    def pump(self) -> bool:
        """Read once; False when the server closed the connection."""
        try:
            data = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError):
            return False
        if not data:
            return False
        try:
            self.events += self.session.receive_data(data, 0.0)
        except RemoteProtocolError:
            return False
        self.flush()
        return True

    def control_message(self) -> Any:
        while True:
            for i, ev in enumerate(self.events):
                if isinstance(ev, DataReceived) and ev.stream_id == 1:
                    del self.events[i]
                    msgs = self.decoder.feed(ev.data)
                    if msgs:
                        return msgs[0]
                    break
            else:
                if not self.pump():
                    return None

    def login(self, token: str, name: str = "raw") -> bool:
        return isinstance(self.login_answer(token, name), LoginOk)

    def login_answer(self, token: str, name: str = "raw", version: str = "") -> Any:
        """Log in; relayd's answer (LoginOk, LoginFailed, a challenge refused... None if it closed)."""
        nonce = auth.new_nonce()
        self.session.open_stream(encode_message(Hello(name=name, client_nonce=nonce, version=version)))
        self.flush()
        challenge = self.control_message()
        if not isinstance(challenge, Challenge):
            return challenge
        args = (name, nonce, challenge.server_nonce, self.fingerprint)
        self.session.send_data(1, encode_message(Login(proof=auth.client_proof(token, *args))))
        self.flush()
        return self.control_message()

    def wait_reset(self, stream_id: int) -> int | None:
        while True:
            for ev in self.events:
                if isinstance(ev, StreamReset) and ev.stream_id == stream_id:
                    return ev.code
            if not self.pump():
                return None

    def closed_by_server(self) -> bool:
        """Read until the server closes; True if it did (within the socket timeout)."""
        try:
            while self.pump():
                pass
        except TimeoutError:
            return False
        return True

    def close(self) -> None:
        self.sock.close()
