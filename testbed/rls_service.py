"""A rate limit service for the tests: rls-server (rls-server/, Envoy's RLS API on
Kuadrant's Limitador, counters in memory) on free ports of 127.0.0.1.

    from rls_service import RlsService

    with RlsService() as rls:          # or RlsService(statuses=False, limits_file=path)
        ...                            # point Envoy's RLS cluster at rls.grpc_port
        rls.stop_server(); rls.start_server()   # same gRPC port; the counts start again
        rls.set_mode("grpc-error")     # normal | grpc-error | garbage | slow (with ms=...)
        assert rls.calls() == {"calls": 3, "hits": 3}

The binary is $RLS_SERVER if set, else what scripts/build-rls-server builds (run once per
test session; a cold build takes a few minutes, see that script). Everything is stopped and the temp dir (logs) removed on close(), also when
starting fails; APIKEY_KEEP_TMP=1 keeps the temp dir. Standard library only.
"""
import os
import subprocess
import tempfile
import time
from functools import lru_cache
from pathlib import Path

from testbed.harness import (HOST, POLL_S, SCRIPTS, HarnessError, Process, Service, _JsonClient, _remove,
                     free_port)

START_TIMEOUT_S = 20
MODES = ("normal", "grpc-error", "garbage", "slow")


@lru_cache(maxsize=None)
def rls_server_binary():
    """$RLS_SERVER if set, else the binary scripts/build-rls-server builds (once)."""
    env = os.environ.get("RLS_SERVER")
    if env:
        return env
    out = subprocess.run([str(SCRIPTS / "build-rls-server")], check=True, stdout=subprocess.PIPE, text=True)
    return out.stdout.strip().splitlines()[-1]


class RlsService(Service):
    """Attributes once started: grpc_port, admin_port, tmp (logs), binary."""

    def __init__(self, statuses=True, limits_file=None):
        self.statuses = statuses
        self.limits_file = limits_file
        self.tmp = None
        self.server = None
        self.grpc_port = self.admin_port = None
        self.binary = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self):
        self.binary = rls_server_binary()
        self.tmp = Path(tempfile.mkdtemp(prefix="apikey-rls-"))
        self.start_server()

    def start_server(self):
        """Start rls-server: on free ports the first time, then on the same ones."""
        if self.server is not None and self.server.running():
            raise HarnessError("rls-server is already running")
        argv = [
            self.binary, "--grpc", f"{HOST}:{self.grpc_port or 0}", "--admin", f"{HOST}:{self.admin_port or 0}",
        ]
        if not self.statuses:
            argv.append("--no-statuses")
        if self.limits_file is not None:
            argv += ["--limits", self.limits_file]
        self.server = Process("rls-server", argv, self.tmp / "rls-server.log").start()
        try:
            admin = self.server.wait_for_line("rls-server admin on ", timeout=START_TIMEOUT_S)
            grpc = self.server.wait_for_line("rls-server listening on ", timeout=START_TIMEOUT_S)
        except BaseException:
            self.server.stop()
            raise
        self.admin_port = int(admin.rsplit(":", 1)[1])
        self.grpc_port = int(grpc.rsplit(":", 1)[1])
        self.admin = _JsonClient(self.admin_port)

    def stop_server(self):
        """Stop rls-server (its counts go with it: set_mode("grpc-error") keeps them)."""
        if self.server is not None:
            self.server.stop()

    def close(self):
        """Stop everything and remove the temp dir; safe to call more than once."""
        if self.server is not None:
            self.server.stop()
        if self.tmp is not None:
            _remove(self.tmp)
            self.tmp = None

    # -- admin --------------------------------------------------------------------------

    def set_mode(self, name, ms=None):
        """normal | grpc-error (every call fails with UNAVAILABLE) | garbage (grpc-status 0,
        a message that is no RateLimitResponse) | slow (every answer waits ms)."""
        if name not in MODES:
            raise ValueError(f"mode {name!r}: one of {MODES}")
        if name == "slow":
            if ms is None:
                raise ValueError("slow mode needs ms")
            name = f"slow/{int(ms)}"
        return self.admin.call("POST", f"/mode/{name}")

    def calls(self):
        """{"calls": C, "hits": H}: calls answered with a RateLimitResponse in normal or
        slow mode since this rls-server started, and the hits they carried (0 counted as 1)."""
        return self.admin.call("GET", "/calls")

    def log(self):
        """rls-server's output (every run of it)."""
        return self.server.log() if self.server else ""

    @property
    def address(self):
        return f"{HOST}:{self.grpc_port}"
