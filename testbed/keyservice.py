#!/usr/bin/env python3
"""Reference key service for apikey-filter (CONTRACT "Key service protocol"), for tests and the demo.

    python3 -m testbed.keyservice --port 8081 [--host 127.0.0.1] [--keys FILE] [--save]
                                  [--changes-path /v1/key-changes] [--changes-kept 10000]

Keys file: {"keys": {"<lowercase sha256 hex of the raw key>": {record}}}. It holds hashes
only: this service never sees a raw key, and neither does anything it stores or prints.

Protocol:
    GET /v1/keys/<hash>             ->  200 record JSON | 404 {"error": "not_found"}
    GET /v1/key-changes             ->  200 {"cursor": c, "key_hashes": []}: where the feed stands now
    GET /v1/key-changes?after=<c>   ->  200 {"cursor": c2, "key_hashes": [h, ...]}
             every key hash the admin API changed (upsert, revoke, expire, delete) after c, each
             once, in the order of its latest change; c2 is the cursor to send next
                                    ->  410 {"error": "cursor_gone"}: c is older than the last
             --changes-kept changes, from the future, or not one of this run's (a restart loses
             the log, so earlier cursors must not get a plausible but incomplete answer); the
             client starts again without after.
    The feed is served at --changes-path (default /v1/key-changes). Cursors are opaque to
    clients; here "c-<this run's id>-<sequence number>". Hashes that are not 64 lowercase hex
    (the admin API takes any string) stay out of the feed: no client could look them up.

Admin API (JSON in and out), used by tests to change keys and to make the service misbehave:
    POST   /admin/keys                 {"key_hash": h, "record": {...}}  upsert, record kept as given
    POST   /admin/keys/mint            {"prefix": p, "record": {...}}  a new key in the filter's
                                       key_format (crc32): {"key", "key_hash", "record"}; the
                                       key is answered once, only its hash is kept
    DELETE /admin/keys/<hash>          remove (lookups then get 404)
    POST   /admin/keys/<hash>/revoke   set "revoked": true
    POST   /admin/keys/<hash>/expire   set "expires_at" to now - 1
    GET    /admin/keys                 {"keys": {...}}
    POST   /admin/mode                 {"mode": M, "status": S, "delay_ms": D}
             normal     answer from the keys (the default)
             status     answer every lookup with status S (default 500) and a small JSON body
             hang       never answer: block until the mode changes or 60 s pass
             close      close the connection without any response
             malformed  200 with the body `{"key_id": ` (not JSON)
             delay_ms   (default 0) delays every lookup answer, in any mode
             hold_ms    (default 0) holds a normal answer after reading the record: an
                        answer older than a change made meanwhile
    POST   /admin/changes-mode         {"mode": M, "status": S, "delay_ms": D}  the same for feed polls
             normal     answer from the change log (the default)
             status     answer every poll with status S (default 500) and a small JSON body
             gone       answer every poll 410, whatever the cursor
             hang       never answer: block until the feed mode changes or 60 s pass
             malformed  200 with the body `{"cursor": ` (not JSON)
             bad_hashes 200 with {"cursor": "c-bad", "key_hashes": ["not-a-hash"]}
             huge       200 with a valid {"cursor": "c-huge", "key_hashes": [...]} just over 1 MiB
             delay_ms   (default 0) delays every poll answer, in any mode
    GET    /admin/lookups              {"total": N, "by_hash": {h: n}, "recent": [{"path", "headers"}],
                                        "changes": {"total": N, "recent": [{"path", "headers"}]}}
             feed polls are counted under "changes" only, never as lookups
    POST   /admin/reset                zero the counters and recent lookups and polls, both modes back
                                       to normal (the change log is kept: cursors stay valid)
    GET    /healthz                    200

Lookups and polls are counted in every mode, so a test can count callouts even while they fail.
--save writes admin changes back to the keys file, so a restarted service keeps them.
--port 0 picks a free port; the start line on stdout names the one bound.
"""
import argparse
import collections
import hashlib
import json
import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs

from testbed.keyformat import is_prefix, new_key
from testbed.threaded_server import serve

MODES = ("normal", "status", "hang", "close", "malformed")
CHANGES_MODES = ("normal", "status", "gone", "hang", "malformed", "bad_hashes", "huge")
HANG_MAX_S = 60
RECENT_MAX = 200
KEY_HASH = re.compile(r"[0-9a-f]{64}")
# "huge": each hash costs 68 bytes in json.dumps' list ('"<64 hex>", '); one more than fits
# in 1 MiB puts the body just over it, so a client's cap of 1 MiB or less trips.
HUGE_HASHES = (1 << 20) // 68 + 1


class State:
    """Everything the handlers share, behind one lock."""

    def __init__(self, keys, keys_file=None, save=False, changes_kept=10000):
        self.lock = threading.Lock()
        self.mode_changed = threading.Condition(self.lock)  # wakes hung lookups and polls
        self.keys = keys
        self.keys_file = keys_file if save else None
        # The change log: (seq, hash) for the last changes_kept admin changes. Entries leave
        # only from the left, so the kept ones are always seq - len + 1 .. seq.
        self.seq = 0
        self.changes = collections.deque(maxlen=changes_kept)
        # In every cursor: a restarted service (same port, same keys file) has lost the log,
        # so its predecessor's cursors must get 410.
        self.run_id = f"{time.time_ns():x}"
        with self.lock:
            self.reset_modes()
        self.reset_counters()

    def reset_modes(self):
        """Both modes back to normal. Lock held."""
        self.mode = {"mode": "normal", "status": 500, "delay_ms": 0}
        self.changes_mode = {"mode": "normal", "status": 500, "delay_ms": 0}
        self.mode_changed.notify_all()  # a hung request answers in the new mode

    def reset_counters(self):
        self.total = 0
        self.by_hash = collections.Counter()
        self.recent = collections.deque(maxlen=RECENT_MAX)
        self.polls = 0
        self.recent_polls = collections.deque(maxlen=RECENT_MAX)

    def changed(self, key_hash):
        """Log an admin change to key_hash for the feed. Lock held."""
        if KEY_HASH.fullmatch(key_hash):
            self.seq += 1
            self.changes.append((self.seq, key_hash))

    def cursor(self):
        return f"c-{self.run_id}-{self.seq}"

    def changes_after(self, cursor):
        """The hashes changed after `cursor`, each once in the order of its latest change, or
        None if the log cannot tell (too old, from the future, not ours). Lock held."""
        prefix = f"c-{self.run_id}-"
        after = cursor[len(prefix):] if cursor.startswith(prefix) else ""
        if not (after.isascii() and after.isdigit()) or str(int(after)) != after:
            return None
        after = int(after)
        # A cursor one below the oldest kept entry still lists everything since: that is
        # the oldest one the log can answer.
        if not self.seq - len(self.changes) <= after <= self.seq:
            return None
        latest = {}
        for seq, h in self.changes:
            if seq > after:
                latest.pop(h, None)  # re-inserted: dicts keep insertion order
                latest[h] = seq
        return list(latest)

    def save(self):
        """Write the keys back (atomically: a reader never sees half a file). Lock held."""
        if self.keys_file:
            tmp = f"{self.keys_file}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump({"keys": self.keys}, f, indent=1, sort_keys=True)
            os.replace(tmp, self.keys_file)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: Envoy pools its connections to us
    server_version = "keyservice"
    state: State  # set on the class by main()
    changes_path = "/v1/key-changes"  # --changes-path

    def log_message(self, format, *args):  # noqa: A002 - quiet: benchmarks go through here
        pass

    # -- plumbing -------------------------------------------------------------------------

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def read_json(self):
        raw = self.read_body()
        try:
            return json.loads(raw) if raw else {}
        except ValueError:
            return None

    def send(self, status, body, content_type="application/json"):
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.route("GET")

    def do_POST(self):
        self.route("POST")

    def do_DELETE(self):
        self.route("DELETE")

    def do_PUT(self):
        self.route("PUT")

    def route(self, method):
        path, _, query = self.path.partition("?")
        parts = [p for p in path.split("/") if p]
        if path == self.changes_path and method == "GET":
            return self.poll_changes(query)
        if parts[:2] == ["v1", "keys"] and len(parts) == 3 and method == "GET":
            return self.lookup(parts[2])
        body = self.read_json() if method in ("POST", "PUT") else {}
        if not isinstance(body, dict):
            return self.send(400, {"error": "body is not a JSON object"})
        if parts == ["healthz"] and method == "GET":
            return self.send(200, {"ok": True})
        if parts[:1] == ["admin"]:
            return self.admin(method, parts[1:], body)
        self.send(404, {"error": "no_such_endpoint"})

    def seen(self):
        return {"path": self.path, "headers": [[k, v] for k, v in self.headers.items()]}

    def await_mode(self, mode, which):
        """Delay as `mode` says, then, while it is hang, block until State.<which> changes
        or HANG_MAX_S pass. Returns the mode to answer in: "close" if still hung."""
        st = self.state
        if mode["delay_ms"]:
            time.sleep(mode["delay_ms"] / 1000)
        if mode["mode"] == "hang":
            deadline = time.monotonic() + HANG_MAX_S
            with st.lock:
                while getattr(st, which)["mode"] == "hang" and time.monotonic() < deadline:
                    st.mode_changed.wait(deadline - time.monotonic())
                mode = dict(getattr(st, which))
            if mode["mode"] == "hang":  # 60 s passed: give up without an answer
                mode["mode"] = "close"
        return mode

    # -- the protocol ---------------------------------------------------------------------

    def lookup(self, key_hash):
        st = self.state
        with st.lock:
            st.total += 1
            st.by_hash[key_hash] += 1
            st.recent.append(self.seen())
            mode = dict(st.mode)
        mode = self.await_mode(mode, "mode")
        if mode["mode"] == "status":
            return self.send(mode["status"], {"error": "injected", "status": mode["status"]})
        if mode["mode"] == "close":
            self.close_connection = True  # no bytes written: the server just closes the socket
            return
        if mode["mode"] == "malformed":
            return self.send(200, b'{"key_id": ')
        with st.lock:  # serialised under the lock: an admin call may be changing the record
            record = st.keys.get(key_hash)
            body = None if record is None else json.dumps(record).encode()
        if mode.get("hold_ms"):
            time.sleep(mode["hold_ms"] / 1000)
        if body is None:
            return self.send(404, {"error": "not_found"})
        self.send(200, body)

    def poll_changes(self, query):
        st = self.state
        with st.lock:
            st.polls += 1
            st.recent_polls.append(self.seen())
            mode = dict(st.changes_mode)
        mode = self.await_mode(mode, "changes_mode")
        if mode["mode"] == "status":
            return self.send(mode["status"], {"error": "injected", "status": mode["status"]})
        if mode["mode"] == "gone":
            return self.send(410, {"error": "cursor_gone"})
        if mode["mode"] == "close":  # hung for HANG_MAX_S
            self.close_connection = True
            return
        if mode["mode"] == "malformed":
            return self.send(200, b'{"cursor": ')
        if mode["mode"] == "bad_hashes":
            return self.send(200, {"cursor": "c-bad", "key_hashes": ["not-a-hash"]})
        if mode["mode"] == "huge":
            return self.send(200, {"cursor": "c-huge", "key_hashes": [f"{i:064x}" for i in range(HUGE_HASHES)]})
        # keep_blank_values: "?after=" is a cursor (a foreign one), not a first poll.
        after = parse_qs(query, keep_blank_values=True).get("after")
        with st.lock:
            if after is None:  # a first poll: where the feed stands now
                hashes = []
            elif len(after) == 1:
                hashes = st.changes_after(after[0])
            else:  # which one would the client mean?
                hashes = None
            answer = {"cursor": st.cursor(), "key_hashes": hashes}
        if hashes is None:
            return self.send(410, {"error": "cursor_gone"})
        self.send(200, answer)

    # -- the admin API --------------------------------------------------------------------

    def admin(self, method, parts, body):
        st = self.state
        # Answers are built under the lock and sent after it: a slow client must not
        # hold up lookups.
        if parts == ["keys"] and method == "GET":
            with st.lock:
                keys = json.dumps({"keys": st.keys}).encode()
            return self.send(200, keys)
        if parts == ["keys", "mint"] and method == "POST":
            # A new key in the filter's key_format: answered once, only its hash is kept.
            prefix, record = body.get("prefix", "sk_live_"), body.get("record")
            if not is_prefix(prefix) or not isinstance(record, dict):
                return self.send(400, {"error": 'want {"prefix": str, "record": {...}}'})
            key = new_key(prefix)
            h = hashlib.sha256(key.encode()).hexdigest()
            with st.lock:
                st.keys[h] = record
                st.changed(h)
                st.save()
            return self.send(200, {"key": key, "key_hash": h, "record": record})
        if parts == ["keys"] and method == "POST":
            h, record = body.get("key_hash"), body.get("record")
            if not isinstance(h, str) or not h or not isinstance(record, dict):
                return self.send(400, {"error": 'want {"key_hash": str, "record": {...}}'})
            with st.lock:
                st.keys[h] = record
                st.changed(h)
                st.save()
            return self.send(200, {"key_hash": h, "record": record})
        if len(parts) in (2, 3) and parts[0] == "keys":
            h, action = parts[1], (parts[2] if len(parts) == 3 else None)
            with st.lock:
                status, answer = self.change_key(h, method, action)
            return self.send(status, answer)
        if parts in (["mode"], ["changes-mode"]) and method == "POST":
            modes, which = (MODES, "mode") if parts == ["mode"] else (CHANGES_MODES, "changes_mode")
            mode = body.get("mode", "normal")
            status = body.get("status")
            delay = body.get("delay_ms")
            hold = body.get("hold_ms") or 0
            if mode not in modes:
                return self.send(400, {"error": f"mode must be one of {', '.join(modes)}"})
            status = 500 if status is None else status
            delay = 0 if delay is None else delay
            if not (isinstance(status, int) and 100 <= status <= 599 and isinstance(delay, (int, float)) and delay >= 0
                    and isinstance(hold, (int, float)) and hold >= 0):
                return self.send(400, {"error": "status must be 100..599, delay_ms and hold_ms >= 0"})
            with st.lock:
                setattr(st, which, {"mode": mode, "status": status, "delay_ms": delay, "hold_ms": hold})
                st.mode_changed.notify_all()
            return self.send(200, {"mode": mode, "status": status, "delay_ms": delay})
        if parts == ["lookups"] and method == "GET":
            with st.lock:
                seen = {"total": st.total, "by_hash": dict(st.by_hash), "recent": list(st.recent),
                        "changes": {"total": st.polls, "recent": list(st.recent_polls)}}
                seen = json.dumps(seen).encode()
            return self.send(200, seen)
        if parts == ["reset"] and method == "POST":
            with st.lock:
                st.reset_counters()
                st.reset_modes()
            return self.send(200, {"ok": True})
        self.send(404, {"error": "no_such_endpoint"})

    def change_key(self, h, method, action):
        """DELETE /admin/keys/<h>, POST .../revoke, POST .../expire. Lock held."""
        st = self.state
        if h not in st.keys:
            return 404, {"error": "not_found"}
        if method == "DELETE" and action is None:
            del st.keys[h]
        elif method == "POST" and action == "revoke":
            st.keys[h]["revoked"] = True
        elif method == "POST" and action == "expire":
            st.keys[h]["expires_at"] = int(time.time()) - 1
        else:
            return 404, {"error": "no_such_endpoint"}
        st.changed(h)
        st.save()
        return 200, ({"deleted": h} if method == "DELETE" else {"key_hash": h, "record": dict(st.keys[h])})


def load_keys(path):
    if not path:
        return {}
    with open(path) as f:
        keys = json.load(f).get("keys", {})
    if not isinstance(keys, dict):
        raise SystemExit(f"keyservice: {path}: \"keys\" must be an object of hash -> record")
    return keys


def main(argv=None):
    ap = argparse.ArgumentParser(description="reference key service for apikey-filter")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--keys", help='JSON file {"keys": {sha256hex: record}}')
    ap.add_argument("--save", action="store_true", help="write admin changes back to --keys")
    ap.add_argument("--changes-path", default="/v1/key-changes", help="where to serve the change feed")
    ap.add_argument("--changes-kept", type=int, default=10000, help="changes the feed keeps (older cursors get 410)")
    args = ap.parse_args(argv)
    if not args.changes_path.startswith("/") or "?" in args.changes_path:
        ap.error("--changes-path must be a path: /..., without a query")
    if args.changes_kept < 1:
        ap.error("--changes-kept must be at least 1")

    Handler.changes_path = args.changes_path
    Handler.state = State(load_keys(args.keys), args.keys, args.save, args.changes_kept)
    serve(Handler, args.host, args.port, f"keyservice listening on {{url}} ({len(Handler.state.keys)} keys)")


if __name__ == "__main__":
    sys.exit(main())
