"""The HTTP server the reference key service and the recording upstream share."""
import socket
import sys
from http.server import ThreadingHTTPServer


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung request must not keep the process alive
    # The default backlog of 5 resets connections under the concurrent bursts the tests
    # send, which Envoy then reports as 503s that look like the filter's.
    request_queue_size = 1024

    def get_request(self):
        # http.server writes a response's headers and body separately: with Nagle's
        # algorithm and delayed ACKs the body would wait ~40 ms on a keep-alive connection.
        conn, address = super().get_request()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn, address

    def handle_error(self, request, client_address):
        # A peer that went away (Envoy giving up on a callout, a test's short timeout) is
        # expected here; only a real bug deserves a traceback in the log.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def serve(handler, host, port, banner):
    """Serves `handler` until interrupted; prints `banner` with the bound address (port 0
    picks a free one, so callers read it from this line)."""
    server = Server((host, port), handler)
    bound_host, bound_port = server.server_address[:2]
    print(banner.format(url=f"http://{bound_host}:{bound_port}"), flush=True)
    try:
        server.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass
