"""Microbenchmark: throughput of an in-memory relayc/relayd session pair (no sockets, no TLS).

    python -m bench.mux_pair [--mb 512] [--json FILE]

Moves ``--mb`` MiB from the client session to the server session over 1 stream and over 64
concurrent streams, the receiver consuming everything it gets (as a bridge with a fast socket
does).  The baseline, measured in the same run, is a naive framing of the same bytes: join header
and payload into one wire buffer, then copy the payload out again on the other side (two copies;
the session copies once and hands out views on receive).  Figures are MB/s (10^6 bytes) and the
ratio to that baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from shared.mux import DataReceived, Session

CHUNK = 256 * 1024


def baseline(total: int) -> float:
    block = os.urandom(CHUNK)
    t0 = time.perf_counter()
    moved = 0
    while moved < total:
        wire = b"".join([block[:12], block])  # header + payload into one write buffer
        view = memoryview(wire)
        out = bytes(view[12:])  # the receiver slices the payload back out
        moved += len(out)
    return total / (time.perf_counter() - t0) / 1e6


def run_pair(total: int, streams: int) -> float:
    client = Session(True, 0.0)
    server = Session(False, 0.0)
    block = os.urandom(CHUNK)
    ids = [client.open_stream() for _ in range(streams)]
    sent = {sid: 0 for sid in ids}
    per_stream = total // streams
    received = 0
    t0 = time.perf_counter()
    while received < per_stream * streams:
        for sid in ids:
            if sent[sid] < per_stream and client.send_buffered(sid) < CHUNK:
                client.send_data(sid, block)
                sent[sid] += CHUNK
        wire = client.data_to_send()
        if wire:
            for ev in server.receive_data(wire, 0.0):
                if type(ev) is DataReceived:
                    n = len(ev.data)
                    server.consume(ev.stream_id, n)
                    received += n
        back = server.data_to_send()
        if back:
            client.receive_data(back, 0.0)
    return received / (time.perf_counter() - t0) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=512, help="MiB to move per case (default 512)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args()
    total = args.mb * 1024 * 1024
    base = baseline(total)
    one = run_pair(total, 1)
    many = run_pair(total, 64)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"mux pair microbenchmark, {args.mb} MiB per case, {machine}")
    print(f"{'case':<28}{'MB/s':>10}{'x baseline':>12}")
    print(f"{'baseline (join + slice)':<28}{base:>10.0f}{1.0:>12.2f}")
    print(f"{'1 stream':<28}{one:>10.0f}{one / base:>12.2f}")
    print(f"{'64 concurrent streams':<28}{many:>10.0f}{many / base:>12.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": machine,
                    "mb": args.mb,
                    "baseline_mbps": base,
                    "one_stream_mbps": one,
                    "streams64_mbps": many,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
