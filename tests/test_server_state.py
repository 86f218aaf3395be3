"""relayd in-process: what a hostile client leaves behind, and the same-name rule, over real sockets."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay_server.cli import Relayd
from shared import auth
from shared.config import ServerConfig, parse_config
from shared.messages import (
    Challenge,
    Hello,
    Login,
    LoginFailed,
    LoginOk,
    MessageDecoder,
    TunnelAdd,
    TunnelStatus,
    encode_message,
)
from shared.mux import DataReceived, Session
from shared.tls import fingerprint_of_der
from shared.tunnel import TunnelKind, TunnelSpec
from tests.e2e.harness import free_port

TOKEN = "state-test-token-0123456789"


class AsyncRawClient:
    """A relayc reduced to the protocol: the sans-IO session over an asyncio TLS stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.session = Session(True, 0.0)
        self.decoder = MessageDecoder()
        self.messages: list[Any] = []
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        self.fingerprint = fingerprint_of_der(der)
        self.flush()

    @classmethod
    async def connect(cls, port: int) -> AsyncRawClient:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
        return cls(reader, writer)

    def flush(self) -> None:
        data = self.session.data_to_send()
        if data:
            self.writer.write(data)

    async def message(self, timeout: float = 10.0) -> Any:
        """The next control message from relayd, or None when it closed the connection."""
        return await asyncio.wait_for(self._next_message(), timeout)

    async def _next_message(self) -> Any:
        while not self.messages:
            data = await self.reader.read(65536)
            if not data:
                return None
            for ev in self.session.receive_data(data, 0.0):
                if isinstance(ev, DataReceived) and ev.stream_id == 1:
                    self.messages += self.decoder.feed(bytes(ev.data))
                    self.session.consume(1, len(ev.data))  # credit back, as relayc does
            self.flush()
        return self.messages.pop(0)

    async def login(self, name: str, token: str = TOKEN) -> Any:
        nonce = auth.new_nonce()
        self.session.open_stream(encode_message(Hello(name=name, client_nonce=nonce)))
        self.flush()
        challenge = await self.message()
        if not isinstance(challenge, Challenge):
            return challenge
        proof = auth.client_proof(token, name, nonce, challenge.server_nonce, self.fingerprint)
        self.send(Login(proof=proof))
        return await self.message()

    def send(self, message: Any) -> None:
        self.session.send_data(1, encode_message(message))
        self.flush()

    def close(self) -> None:
        self.writer.close()


@pytest.fixture
async def relayd(tmp_path: Path) -> AsyncIterator[Relayd]:
    data = {"bind_addr": "127.0.0.1", "bind_port": 0, "state_dir": str(tmp_path / "state"),
            "allow_ports": "40000-40010", "keepalive_timeout": 6, "vhost_http_port": free_port(),
            "subdomain_host": "localhost", "auth": {"token": TOKEN}}  # fmt: skip
    config = parse_config(ServerConfig, data, str(tmp_path / "relayd.toml"))
    server = Relayd(config, tmp_path / "relayd.toml")
    await server.start()
    yield server
    await server.shutdown(grace=0.1)


async def wait_for(predicate: Any, what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.02)


async def test_per_client_state_is_bounded_and_freed_when_the_client_leaves(relayd: Relayd) -> None:
    client = await AsyncRawClient.connect(relayd.port)
    assert isinstance(await client.login("hostile"), LoginOk)
    # thousands of tunnels with names the client makes up, every one refused (port not allowed)
    for i in range(3000):
        client.send(TunnelAdd(tunnel=TunnelSpec(name=f"t{i}", local_port=22, remote_port=50000 + i % 1000)))
    statuses = 0
    while statuses < 3000:
        msg = await client.message()
        assert isinstance(msg, TunnelStatus) and not msg.ok
        statuses += 1
    session = relayd.sessions["hostile"]
    assert len(session.refusals) <= 256  # remembered for the dashboard, but bounded
    assert len(relayd.burst_log) <= relayd.burst_log.max_keys
    client.close()
    await wait_for(lambda: "hostile" not in relayd.sessions, "the session ended")
    assert relayd.registry.refusals() == {}
    assert not session.refusals and not session.tunnels
    assert relayd.registry.ports.holders == {} and relayd.registry.ports.count_for("hostile") == 0
    assert "tunnel-refused:hostile" not in relayd.burst_log._last


async def test_max_tunnels_per_client_caps_every_kind(relayd: Relayd) -> None:
    relayd.config.max_tunnels_per_client = 3
    client = await AsyncRawClient.connect(relayd.port)
    assert isinstance(await client.login("lab"), LoginOk)
    for i in range(5):
        client.send(TunnelAdd(tunnel=TunnelSpec(name=f"w{i}", local_port=80, type=TunnelKind.HTTP, subdomain=f"w{i}",
                                                custom_domains=[])))  # fmt: skip
    results = [await client.message() for _ in range(5)]
    assert [(m.name, m.ok) for m in results] == [("w0", True), ("w1", True), ("w2", True), ("w3", False),
                                                 ("w4", False)]  # fmt: skip
    assert results[3].error == "client 'lab' already has max_tunnels_per_client=3 tunnels"
    # replacing one of its own tunnels is not a new one
    client.send(TunnelAdd(tunnel=TunnelSpec(name="w1", local_port=81, type=TunnelKind.HTTP, subdomain="w1")))
    again = await client.message()
    assert again.ok, again.error
    client.close()


async def test_a_live_session_keeps_its_name_and_a_dead_one_is_replaced(relayd: Relayd) -> None:
    first = await AsyncRawClient.connect(relayd.port)
    assert isinstance(await first.login("lab"), LoginOk)
    pump = asyncio.create_task(keep_answering(first))  # alive: it answers PINGs
    second = await AsyncRawClient.connect(relayd.port)
    refused = await second.login("lab")
    assert isinstance(refused, LoginFailed) and refused.code == "name_in_use"
    assert "is in use by a live session from 127.0.0.1, logged in at" in refused.reason
    assert refused.retry_after == 60
    assert relayd.sessions["lab"].mux.is_open
    pump.cancel()  # now `first` stops reading: its PINGs go unanswered, like a machine that died
    third = await AsyncRawClient.connect(relayd.port)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert isinstance(await third.login("lab"), LoginOk)
    assert loop.time() - t0 < 5.0  # it took over within the ~2 s liveness probe
    assert relayd.sessions["lab"].mux is not None
    for c in (first, second, third):
        c.close()


async def keep_answering(client: AsyncRawClient) -> None:
    while True:
        data = await client.reader.read(65536)
        if not data:
            return
        client.session.receive_data(data, 0.0)
        client.flush()
