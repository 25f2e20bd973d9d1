#!/usr/bin/env python3
"""Recording upstream for apikey-filter tests and the demo: echoes what it received.

    python3 -m testbed.upstream --port 8082 [--host 127.0.0.1]

Any request (any method, any path) -> 200 application/json
    {"method": m, "path": p, "headers": [[name, value], ...], "body": text}
exactly as received (headers and body decoded as latin-1, so every byte survives), and
records it. Tests call these directly on this port, never through Envoy:
    GET    /__upstream/requests   JSON list of the recorded requests (same shape)
    DELETE /__upstream/requests   clear them
--port 0 picks a free port; the start line on stdout names the one bound.
"""
import argparse
import collections
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler

from testbed.threaded_server import serve

ADMIN_PATH = "/__upstream/requests"
RECORDED_MAX = 10000  # bounded: benchmarks send far more than tests ever read


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: Envoy pools its connections to us
    server_version = "upstream"
    lock = threading.Lock()
    recorded = collections.deque(maxlen=RECORDED_MAX)

    def log_message(self, format, *args):  # noqa: A002 - quiet: benchmarks go through here
        pass

    def read_body(self):
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()  # CRLF after the chunk
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def send(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def handle_any(self):
        body = self.read_body()
        if self.path == ADMIN_PATH and self.command == "GET":
            with self.lock:
                return self.send(200, list(self.recorded))
        if self.path == ADMIN_PATH and self.command == "DELETE":
            with self.lock:
                self.recorded.clear()
            return self.send(200, [])
        # http.server already decoded the header block as latin-1: values keep their bytes.
        seen = {
            "method": self.command,
            "path": self.path,
            "headers": [[k, v] for k, v in self.headers.items()],
            "body": body.decode("latin-1"),
        }
        with self.lock:
            self.recorded.append(seen)
        self.send(200, seen)

    # http.server dispatches on do_<METHOD>; answer every method the same way.
    def __getattr__(self, name):
        if name.startswith("do_"):
            return self.handle_any
        raise AttributeError(name)


def main(argv=None):
    ap = argparse.ArgumentParser(description="recording upstream for apikey-filter")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    serve(Handler, args.host, args.port, "upstream listening on {url}")


if __name__ == "__main__":
    sys.exit(main())
