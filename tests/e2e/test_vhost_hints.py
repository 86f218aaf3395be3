"""relayd points at the fix when an answer tells it what is wrong: a 403 from the app (Jupyter's
refusal of a Host it does not know, the usual cause behind relayd) and a 502 (nothing answers on
the lab machine) get a line in relayd's log naming the likely cause and the README recipe, at most
once per tunnel every few minutes; the 502 page tells the visitor what relayc could not do without
naming the lab machine's address."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.e2e.harness import Proc, TcpServer, free_port, relayc_config, relayd_config, spawn, vhost_get


def forbidden(conn: socket.socket) -> None:
    conn.recv(65536)
    body = b"Forbidden"
    conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))


def test_a_403_from_the_app_and_a_502_get_a_hint(tmp_path: Path, procs: list[Proc]) -> None:
    app = TcpServer(forbidden)
    nothing = free_port()
    try:
        port, http_port = free_port(), free_port()
        d = spawn(procs, "relay_server.cli", relayd_config(tmp_path, port, vhost_http_port=http_port,
                                                          subdomain_host="relay.test"))  # fmt: skip
        d.wait_for("listening for relayc")
        tunnels = [
            {"name": "nb", "type": "http", "local_port": app.port, "subdomain": "nb"},
            {"name": "gone", "type": "http", "local_port": nothing, "subdomain": "gone"},
        ]
        c = spawn(procs, "relay_client.cli", relayc_config(tmp_path, port, tunnels))
        c.wait_for(r"tunnel gone: http://gone\.relay\.test")
        c.wait_for(r"tunnel nb: http://nb\.relay\.test")
        for _ in range(3):
            status, body = vhost_get(http_port, "nb.relay.test")
            assert (status, body) == (403, b"Forbidden")  # the app's answer, untouched
        d.wait_for(r"client 'lab' tunnel 'nb': the app answered 403 Forbidden to a request for 'nb\.relay\.test'; "
                   r"if it is Jupyter, it refuses a Host it does not know: start it with "
                   r"--ServerApp.local_hostnames=nb\.relay\.test \(see the README's recipe")  # fmt: skip
        status, body = vhost_get(http_port, "gone.relay.test")
        assert status == 502
        assert b"relayc on the lab machine could not connect to it" in body and b"local_port" in body
        assert str(nothing).encode() not in body  # the lab machine's port is not told to visitors
        d.wait_for(rf"client 'lab' tunnel 'gone': 502 for 'gone\.relay\.test': relayc could not reach "
                   rf"127\.0\.0\.1:{nothing} on the lab machine; is the service running there\?")  # fmt: skip
        for _ in range(3):
            assert vhost_get(http_port, "gone.relay.test")[0] == 502
            assert vhost_get(http_port, "nb.relay.test")[0] == 403
        # one line per tunnel and cause while the same thing happens again and again
        assert d.output.count("tunnel 'nb': the app answered 403") == 1, d.output
        assert d.output.count("tunnel 'gone': 502 for") == 1, d.output
    finally:
        app.close()
