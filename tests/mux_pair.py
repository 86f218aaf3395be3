"""An in-memory relayc/relayd session pair that moves bytes between two sans-IO sessions."""

from __future__ import annotations

from collections import defaultdict

from shared.mux import DataReceived, Event, Session, StreamEnded, StreamOpened, StreamReset


class Side:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.events: list[Event] = []
        self.received: dict[int, bytearray] = defaultdict(bytearray)
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.opened: list[int] = []
        self.auto_consume = True

    def absorb(self, events: list[Event]) -> None:
        for ev in events:
            self.events.append(ev)
            if isinstance(ev, DataReceived):
                self.received[ev.stream_id] += ev.data
                if self.auto_consume:
                    self.session.consume(ev.stream_id, len(ev.data))
            elif isinstance(ev, StreamEnded):
                self.ended.add(ev.stream_id)
            elif isinstance(ev, StreamReset):
                self.resets[ev.stream_id] = ev.code
            elif isinstance(ev, StreamOpened):
                self.opened.append(ev.stream_id)


class Pair:
    def __init__(self, now: float = 0.0, chunk: int | None = None, **kwargs: object) -> None:
        self.now = now
        self.client = Side(Session(True, now, **kwargs))  # type: ignore[arg-type]
        self.server = Side(Session(False, now, **kwargs))  # type: ignore[arg-type]
        self.chunk = chunk  # deliver in pieces of this size (1 = byte at a time)
        self.wire_bytes = 0

    def _deliver(self, dst: Side, data: bytes) -> None:
        self.wire_bytes += len(data)
        if self.chunk is None:
            dst.absorb(dst.session.receive_data(data, self.now))
            return
        for i in range(0, len(data), self.chunk):
            dst.absorb(dst.session.receive_data(data[i : i + self.chunk], self.now))

    def pump(self, max_rounds: int = 10_000) -> int:
        """Move bytes both ways until both sides are quiet; return the rounds used."""
        for rounds in range(max_rounds):
            a = self.client.session.data_to_send()
            b = self.server.session.data_to_send()
            if not a and not b:
                return rounds
            if a:
                self._deliver(self.server, a)
            if b:
                self._deliver(self.client, b)
        raise AssertionError("pair did not settle")
