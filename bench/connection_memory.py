#!/usr/bin/env python3
"""What HTTP/2 connections leave stepgate holding (docs/limits.md, "Per process").

Starts `stepgate serve` on the demo policy, opens CONNECTIONS connections, and on each sends ROUNDS
rounds of STREAMS `Check` calls at once (anonymous: each is answered with a denial), reading every
answer before the next round. Prints the server's resident memory before, just after, and two
seconds after, and its peak. With --large-headers N each call also carries N headers of 4000 bytes
(60 KB for N=15, under the 64 KiB header-list limit; HPACK sends them once per connection).
With --unfinished the calls are sent on every connection first and their streams never ended:
they stay open until stepgate's --request-timeout (5 s) answers them, all at once.

    .venv/bin/python bench/connection_memory.py [--bin target/release/stepgate]
        [--connections 200] [--streams 100] [--rounds 1] [--large-headers 0] [--unfinished]

Uses the `h2` package of the test virtualenv (scripts/setup-peers).
"""

import argparse
import os
import re
import socket
import struct
import subprocess
import sys
import time

import h2.config
import h2.connection
import h2.events
import h2.exceptions

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


def start(binary: str) -> tuple[subprocess.Popen, int]:
    server = subprocess.Popen(
        [binary, "serve", "--config", os.path.join(ROOT, "examples/stepgate.yaml"),
         "--listen", "127.0.0.1:0", "--max-connections-per-source", "0", "--ready-when", "always", "--log-format", "text", "--log-level", "warn,stepgate::server=info"],
        stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 30
    for line in server.stderr:
        found = re.search(r"stepgate listening on 127\.0\.0\.1:(\d+)", line)
        if found:
            return server, int(found.group(1))
        if time.monotonic() > deadline:
            break
    server.kill()
    sys.exit(f"{binary} did not start listening")


def connect(port: int) -> tuple[socket.socket, h2.connection.H2Connection]:
    sock = socket.create_connection(("127.0.0.1", port))
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def headers_of(large_headers: int) -> list[tuple[str, str]]:
    return [(":method", "POST"), (":scheme", "http"), (":path", CHECK), (":authority", "stepgate"),
            ("content-type", "application/grpc"), ("te", "trailers")] + [("x-large", "A" * 4000)] * large_headers


def unfinished(sock: socket.socket, conn: h2.connection.H2Connection, streams: int, message: bytes,
               large_headers: int) -> None:
    """`streams` calls whose message is sent and whose stream is never ended."""
    for _ in range(streams):
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, headers_of(large_headers))
        conn.send_data(stream, message)
    sock.sendall(conn.data_to_send())


def burst(
    sock: socket.socket, conn: h2.connection.H2Connection, streams: int, message: bytes, large_headers: int
) -> bool:
    """`streams` calls sent at once, and every answer read (its window given back). False when
    the server told the connection to go away."""
    headers = headers_of(large_headers)
    open_streams = set()
    for _ in range(streams):
        stream = conn.get_next_available_stream_id()
        conn.send_headers(stream, headers)
        conn.send_data(stream, message, end_stream=True)
        open_streams.add(stream)
    sock.sendall(conn.data_to_send())
    going_away = False
    while open_streams:
        data = sock.recv(1 << 20)
        if not data:
            return False
        try:
            events = conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            return False  # frames after GOAWAY, which this client takes for an error
        for event in events:
            if isinstance(event, h2.events.DataReceived) and event.flow_controlled_length:
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                open_streams.discard(event.stream_id)
            if isinstance(event, h2.events.ConnectionTerminated):
                going_away = True
        pending = conn.data_to_send()
        if pending:
            sock.sendall(pending)
    return not going_away


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bin", default=os.path.join(ROOT, "target/release/stepgate"))
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--large-headers", type=int, default=0)
    parser.add_argument("--unfinished", action="store_true")
    args = parser.parse_args()
    server, port = start(args.bin)
    connections = []
    try:
        message = check_message()
        connections.extend(connect(port) for _ in range(args.connections))
        time.sleep(0.5)
        before = memory(server.pid)["VmRSS"]
        if args.unfinished:
            for sock, conn in connections:
                unfinished(sock, conn, args.streams, message, args.large_headers)
            peak = 0
            for _ in range(80):  # 8 s: past the 5 s --request-timeout
                peak = max(peak, memory(server.pid)["VmRSS"])
                time.sleep(0.1)
            print(f"{args.connections} connections of {args.streams} unfinished calls"
                  f"{f' with {args.large_headers} headers of 4000 bytes' if args.large_headers else ''}: "
                  f"RSS {before // 1024} MiB before, peak {peak // 1024} MiB, "
                  f"{memory(server.pid)['VmRSS'] // 1024} MiB 8 s later")
            return
        for _ in range(args.rounds):
            for i, (sock, conn) in enumerate(connections):
                if not burst(sock, conn, args.streams, message, args.large_headers):
                    sock.close()
                    connections[i] = connect(port)  # as a client told to go away does
        after = memory(server.pid)["VmRSS"]
        time.sleep(2)
        later = memory(server.pid)
        headers = f" with {args.large_headers} headers of 4000 bytes" if args.large_headers else ""
        print(f"{args.connections} connections, {args.rounds} round(s) of {args.streams} calls at once{headers}: "
              f"RSS {before // 1024} MiB before, {after // 1024} MiB after, {later['VmRSS'] // 1024} MiB 2 s later "
              f"(peak {later['VmHWM'] // 1024} MiB)")
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
