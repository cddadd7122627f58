"""An upstream that serves any request line, raw non-UTF-8 bytes included, as Go, Node and
Python's own servers do (hyper, the echo upstream of the Rust tests, refuses them with 400).

    lenient_upstream.py

Listens on 127.0.0.1:<ephemeral>, prints `port <n>`, then answers 200 to every request and prints
`request <case> <hex of the raw request line>` for each (`case` is its x-e2e-case header).
Run by tests/envoy_e2e.rs with the project's .venv.
"""

import http.server
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    def handle_one_request(self):
        super().handle_one_request()

    def do_GET(self):
        raw = self.raw_requestline.rstrip(b"\r\n")
        case = self.headers.get("x-e2e-case", "-")
        print(f"request {case} {raw.hex()}", flush=True)
        body = b"served\n"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main() -> int:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"port {server.server_address[1]}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
