#!/usr/bin/env python3
"""What HTTP/2 connections leave stepgate holding (docs/limits.md, "Per process").

Starts `stepgate serve` on the demo policy, opens CONNECTIONS connections, and on each sends ROUNDS
rounds of STREAMS `Check` calls at once (anonymous: each is answered with a denial), reading every
answer before the next round. Prints the server's resident memory before and after (and its peak),
how many calls the server refused (past its --max-concurrent-streams: the client sends as many as it
is told to, as a hostile one would) and how many connections it closed.

With --large-headers N each call also carries N headers of 4000 bytes (60 KB for N=15, under the
64 KiB header-list limit; HPACK sends them once per connection). With --unfinished the calls are
sent on every connection first and their streams never ended: they stay open until stepgate's
--request-timeout (5 s) answers them, all at once; memory is sampled for 10 s. --server-arg passes
a flag to `stepgate serve` (repeat it for each word: --server-arg=--max-concurrent-streams
--server-arg=256).

    .venv/bin/python bench/connection_memory.py [--bin target/release/stepgate]
        [--connections 200] [--streams 100] [--rounds 1] [--large-headers 0] [--unfinished]
        [--server-arg ARG ...]

Uses the `h2` package of the test virtualenv (scripts/setup-peers).
"""

import argparse
import os
import re
import socket
import struct
import subprocess
import sys
import tempfile
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = "/envoy.service.auth.v3.Authorization/Check"


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (lengths here stay under 128)."""
    return bytes([number << 3 | 2, len(payload)]) + payload


def check_message() -> bytes:
    """A CheckRequest for GET /api/orders/1 on app.example, as one gRPC frame."""
    http = field(2, b"GET") + field(4, b"/api/orders/1") + field(5, b"app.example") + field(6, b"https")
    message = field(1, field(4, field(2, http)))
    return b"\x00" + struct.pack(">I", len(message)) + message


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid`, in KiB."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        return {line.split(":")[0]: int(line.split()[1]) for line in status if line.startswith(("VmRSS", "VmHWM"))}


def start(binary: str, extra: list[str], log) -> tuple[subprocess.Popen, int]:
    """`stepgate serve` on a free port, its log in `log`: (the process, its port)."""
    server = subprocess.Popen(
        [binary, "serve", "--config", os.path.join(ROOT, "examples/stepgate.yaml"), "--listen", "127.0.0.1:0",
         # Every connection of this client comes from 127.0.0.1.
         "--max-connections-per-source", "0", "--ready-when", "always", "--log-format", "text",
         "--log-level", "warn,stepgate::server=info", *extra],
        stderr=log,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and server.poll() is None:
        found = re.search(r"stepgate listening on 127\.0\.0\.1:(\d+)", open(log.name, encoding="utf-8").read())
        if found:
            return server, int(found.group(1))
        time.sleep(0.1)
    server.kill()
    sys.exit(f"{binary} did not start listening:\n{open(log.name, encoding='utf-8').read()}")


def connect(port: int) -> tuple[socket.socket, h2.connection.H2Connection]:
    sock = socket.create_connection(("127.0.0.1", port))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def headers_of(large_headers: int) -> list[tuple[str, str]]:
    return [(":method", "POST"), (":scheme", "http"), (":path", CHECK), (":authority", "stepgate"),
            ("content-type", "application/grpc"), ("te", "trailers")] + [("x-large", "A" * 4000)] * large_headers


def send_calls(conn: h2.connection.H2Connection, streams: int, message: bytes, large_headers: int,
               end: bool) -> set[int]:
    """`streams` calls queued on `conn`, whatever the server's limit (which this client would
    otherwise keep to once it knows it): their stream ids."""
    conn.remote_settings.update({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2**31 - 1})
    conn.remote_settings.acknowledge()
    ids = set()
    for _ in range(streams):
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, headers_of(large_headers))
        conn.send_data(stream, message, end_stream=end)
        ids.add(stream)
    return ids


class Tally:
    refused = 0
    closed = 0


def burst(sock: socket.socket, conn: h2.connection.H2Connection, streams: int, message: bytes,
          large_headers: int, tally: Tally) -> bool:
    """`streams` calls sent at once, and every answer read (its window given back). False when
    the server closed the connection or told it to go away."""
    try:
        open_streams = send_calls(conn, streams, message, large_headers, end=True)
        sock.sendall(conn.data_to_send())
        while open_streams:
            data = sock.recv(1 << 20)
            if not data:
                return False
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if isinstance(event, h2.events.StreamReset):
                    tally.refused += 1
                if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    open_streams.discard(event.stream_id)
                if isinstance(event, h2.events.ConnectionTerminated):
                    return False
            pending = conn.data_to_send()
            if pending:
                sock.sendall(pending)
    except (OSError, h2.exceptions.ProtocolError):
        return False  # closed, or frames after GOAWAY, which this client takes for an error
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bin", default=os.path.join(ROOT, "target/release/stepgate"))
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--large-headers", type=int, default=0)
    parser.add_argument("--unfinished", action="store_true")
    parser.add_argument("--server-arg", action="append", default=[])
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile(prefix="stepgate-", suffix=".log") as log:
        server, port = start(args.bin, args.server_arg, log)
        try:
            run(args, server, port)
        finally:
            server.kill()
            server.wait()


def run(args: argparse.Namespace, server: subprocess.Popen, port: int) -> None:
    message = check_message()
    connections = [connect(port) for _ in range(args.connections)]
    time.sleep(0.5)
    before = memory(server.pid)["VmRSS"]
    what = f"{args.connections} connections, {args.streams} calls at once on each"
    if args.large_headers:
        what += f" with {args.large_headers} headers of 4000 bytes"
    if args.unfinished:
        for sock, conn in connections:
            send_calls(conn, args.streams, message, args.large_headers, end=False)
            sock.sendall(conn.data_to_send())
        samples = []
        for _ in range(100):  # 10 s: past the 5 s --request-timeout
            samples.append(memory(server.pid)["VmRSS"])
            time.sleep(0.1)
        print(f"{what}, never ended: RSS {before // 1024} MiB before, peak {max(samples) // 1024} MiB, "
              f"{samples[-1] // 1024} MiB 10 s later")
        return
    tally = Tally()
    for _ in range(args.rounds):
        for i, (sock, conn) in enumerate(connections):
            if not burst(sock, conn, args.streams, message, args.large_headers, tally):
                tally.closed += 1
                sock.close()
                connections[i] = connect(port)  # as a client told to go away does
    time.sleep(1)
    after = memory(server.pid)
    print(f"{what}, {args.rounds} round(s): RSS {before // 1024} MiB before, {after['VmRSS'] // 1024} MiB after "
          f"(peak {after['VmHWM'] // 1024} MiB); {tally.refused} calls refused, {tally.closed} connections closed "
          f"(each replaced by a fresh one)")


if __name__ == "__main__":
    main()
