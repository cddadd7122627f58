"""One HTTP/2 request whose :path may hold bytes no URL can (a raw 0xFF), for the Envoy tests.

    raw_h2_request.py PORT PATH_HEX [NAME=VALUE ...]

Sends GET with :path = bytes.fromhex(PATH_HEX) and the given headers to 127.0.0.1:PORT (h2c,
prior knowledge) with the `h2` library's header validation off, and prints the response's
:status, or `reset <code>` / `closed` when there is none. Run by tests/envoy_e2e.rs with the
project's .venv (scripts/setup-peers installs h2 there).
"""

import socket
import sys

import h2.config
import h2.connection
import h2.events


def main() -> int:
    port, path_hex, *headers = sys.argv[1:]
    extra = [tuple(h.encode().split(b"=", 1)) for h in headers]
    sock = socket.create_connection(("127.0.0.1", int(port)), timeout=10)
    config = h2.config.H2Configuration(
        client_side=True,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    request = [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":path", bytes.fromhex(path_hex)),
        (b":authority", b"api.example.com"),
    ] + extra
    conn.send_headers(1, request, end_stream=True)
    sock.sendall(conn.data_to_send())
    while True:
        data = sock.recv(65535)
        if not data:
            print("closed")
            return 0
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                print(dict(event.headers)[b":status"].decode())
                return 0
            if isinstance(event, h2.events.StreamReset):
                print(f"reset {event.error_code}")
                return 0
        sock.sendall(conn.data_to_send())


if __name__ == "__main__":
    sys.exit(main())
