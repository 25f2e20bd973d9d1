"""The project's key service (crates/keyservice, `apikey-keyservice`) run for a test: its
database in a temp dir, an admin token made with its own CLI, both listeners on free
127.0.0.1 ports; stopped (and its temp dir removed) on exit, also on an exception.

    with KeyService() as ks:
        made = ks.admin.create(owner="acme", scopes=["read"])
        ks.lookup(made["key_hash"]).status  # 200

APIKEY_KEYSERVICE=FILE runs another build (scripts/test builds target/debug/...).
"""
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

from testbed.harness import (HOST, POLL_S, ROOT, HarnessError, Process, Service, _remove,
                             free_port, http_request)

BINARY = Path(os.environ.get("APIKEY_KEYSERVICE") or ROOT / "target" / "debug" / "apikey-keyservice")


def binary():
    if not BINARY.is_file():
        raise HarnessError(f"{BINARY} not found: run `cargo build -p apikey-keyservice` first")
    return BINARY


class AdminClient:
    """The admin API, with a token (None: without one)."""

    def __init__(self, port, token):
        self.port, self.token = port, token

    def request(self, method, path, body=None):
        headers = [("authorization", f"Bearer {self.token}")] if self.token else []
        if body is not None and not isinstance(body, (bytes, str)):
            headers.append(("content-type", "application/json"))
        return http_request(self.port, method, path, headers, body)

    def call(self, method, path, body=None, expect=(200,)):
        r = self.request(method, path, body)
        if r.status not in expect:
            raise HarnessError(f"{method} {path} -> {r.status}: {r.text}")
        return r.json() if r.body else None

    def create(self, **fields):
        return self.call("POST", "/admin/v1/keys", fields, expect=(201,))

    def show(self, key_id):
        return self.call("GET", f"/admin/v1/keys/{key_id}")

    def update(self, key_id, **fields):
        return self.call("PATCH", f"/admin/v1/keys/{key_id}", fields)

    def revoke(self, key_id):
        return self.call("POST", f"/admin/v1/keys/{key_id}/revoke")

    def rotate(self, key_id, grace_s=None):
        body = {} if grace_s is None else {"grace_s": grace_s}
        return self.call("POST", f"/admin/v1/keys/{key_id}/rotate", body, expect=(201,))

    def delete(self, key_id):
        return self.call("DELETE", f"/admin/v1/keys/{key_id}", expect=(204,))

    def list(self, query=""):
        return self.call("GET", f"/admin/v1/keys{query}")

    def audit(self, query=""):
        return self.call("GET", f"/admin/v1/audit{query}")


class KeyService(Service):
    """`apikey-keyservice serve`, on SQLite in its temp dir or on the database `db` (a
    PostgreSQL URL: testbed/postgres.py). port: where the filter's API listens (0: any free
    port; a Stack names its own). token: an admin token already in `db` (another process
    on the same database); else one named "tests" is made. Attributes once started: port,
    admin_port, tmp, db, token, admin (AdminClient)."""

    def __init__(self, port=0, extra=(), db=None, token=None):
        self.want_port, self.extra = port, list(extra)
        self.db, self.token = db, token
        self.tmp = self.proc = None

    def start(self):
        self.tmp = Path(tempfile.mkdtemp(prefix="apikey-keyservice-"))
        self.db = self.db or f"sqlite:{self.tmp / 'keys.db'}"
        if self.token is None:
            self.token = self.cli("admin-token", "create", "--db", self.db, "--name", "tests").strip()
        self.port = self.want_port or free_port()
        self.admin_port = free_port()
        self.admin = AdminClient(self.admin_port, self.token)
        self.start_serving()
        return self

    def cli(self, *args):
        done = subprocess.run([binary(), *args], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise HarnessError(f"apikey-keyservice {' '.join(map(str, args))}: {done.stderr}")
        return done.stdout

    def start_serving(self):
        """(Re)starts `serve` on the same database and ports."""
        if self.proc is not None and self.proc.running():
            return
        argv = [binary(), "serve", "--db", self.db, "--listen", f"{HOST}:{self.port}",
                "--admin-listen", f"{HOST}:{self.admin_port}", *self.extra]
        self.proc = Process("apikey-keyservice", argv, self.tmp / "keyservice.log").start()
        self.proc.wait_for_line("apikey-keyservice: serving")

    def stop_serving(self):
        if self.proc is not None:
            self.proc.stop()

    def log(self):
        return self.proc.log() if self.proc else ""

    def close(self):
        self.stop_serving()
        if self.tmp is not None:
            _remove(self.tmp)
            self.tmp = None

    def lookup(self, key_hash, headers=()):
        return http_request(self.port, "GET", f"/v1/keys/{key_hash}", headers)

    def changes(self, after=None, headers=()):
        path = "/v1/key-changes" + (f"?after={after}" if after is not None else "")
        return http_request(self.port, "GET", path, headers)

    def settled(self):
        """Waits until the feed lists every change made so far (it lists a change once every
        live process has read it from the log: within a tail period, 50 ms)."""
        cursor = self.changes().json()["cursor"]
        while True:
            time.sleep(0.3)
            now = self.changes().json()["cursor"]
            if now == cursor:
                return cursor
            cursor = now

    def metrics(self):
        return http_request(self.admin_port, "GET", "/metrics").text

    def files(self):
        """Every file of its temp dir (a SQLite database, its WAL, the log), as bytes."""
        return files_below(self.tmp)


def files_below(folder):
    """Every file below folder, as bytes, by path."""
    return {str(p): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}


def wait_until(condition, what, timeout=5):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise HarnessError(f"not within {timeout} s: {what}")
        time.sleep(POLL_S)


def as_json(response):
    return json.loads(response.body) if response.body else None
