"""Integration-test harness: a real Envoy loading the real apikey_filter.wasm, in front of
the reference key service (testbed/keyservice.py) and a recording upstream
(testbed/upstream.py), all on 127.0.0.1.

    from harness import Stack, key_hash

    with Stack({"key_service": {"cluster": "key_service"}},
               keys={key_hash("k-alice"): {"key_id": "k_1"}}) as s:
        r = s.request("GET", "/orders", headers=[("x-api-key", "k-alice")])
        assert r.status == 200

Stack stops every process it started and removes its temp dir on exit, also on an
exception. APIKEY_KEEP_TMP=1 keeps the temp dir (configs and logs) for a post-mortem.
Standard library only.
"""
import ctypes
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
# The helper servers run as `python -m testbed.<module>`: the repository's root on their path.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
# APIKEY_WASM=FILE runs the tests against another build (a debug one, an older release).
DEFAULT_WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "apikey_filter.wasm"
WASM_PATH = Path(os.environ.get("APIKEY_WASM") or DEFAULT_WASM).resolve()
# APIKEY_BUILD=module runs the same tests against libapikey_filter.so, Envoy 1.40's dynamic
# module (scripts/build-module), instead of the .wasm.
BUILD = os.environ.get("APIKEY_BUILD") or "wasm"
MODULE_PATH = (ROOT / "target" / "module" / "libapikey_filter.so").resolve()
if BUILD == "module":
    os.environ["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = str(MODULE_PATH.parent)
FILTER_PATH = MODULE_PATH if BUILD == "module" else WASM_PATH
# Where Envoy puts the filter's stats: a wasm filter's under wasmcustom., a dynamic module's
# under dynamicmodulescustom. (Prometheus drops both: apikey_filter_allowed from either).
STATS_NAMESPACE = "dynamicmodulescustom." if BUILD == "module" else "wasmcustom."
STATS_PREFIX = STATS_NAMESPACE + "apikey_filter."
HOST = "127.0.0.1"
POLL_S = 0.05  # every wait polls at this pace: start-up must stay quick on 2 cores
START_TIMEOUT_S = 20

from testbed import render_envoy  # noqa: E402


def key_hash(raw):
    """Lowercase hex SHA-256 of a raw key (str is taken as UTF-8): what the key service sees."""
    if isinstance(raw, str):
        raw = raw.encode()
    return hashlib.sha256(raw).hexdigest()


BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def with_checksum(prefix, random_part):
    """A key in the filter's key_format, its CRC-32 checksum made here with Python's zlib,
    apart from the filter's code and from testbed/keyformat.py."""
    n, digits = zlib.crc32(random_part.encode()), ""
    for _ in range(6):
        n, d = divmod(n, 62)
        digits = BASE62[d] + digits
    return prefix + random_part + digits


class HarnessError(RuntimeError):
    pass


# -- processes --------------------------------------------------------------------------


@lru_cache(maxsize=None)
def envoy_binary():
    """$ENVOY if set, else the pinned Envoy that scripts/install-envoy installs (once)."""
    env = os.environ.get("ENVOY")
    if env:
        return env
    out = subprocess.run([str(SCRIPTS / "install-envoy")], check=True, stdout=subprocess.PIPE, text=True)
    return out.stdout.strip().splitlines()[-1]


def free_port():
    """A port free right now. Envoy needs its ports named in the config, so there is a small
    window for another process to take it; Stack retries Envoy on 'address already in use'."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _die_with_parent():
    """Runs in the child before exec: if pytest dies hard (kill -9, CI timeout), the kernel
    sends the child SIGTERM, so no Envoy or helper outlives the test run. (The signal follows
    the thread that started the child: start stacks from the main thread, as fixtures do.)"""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class Process:
    """A child process whose stdout and stderr go to one log file."""

    def __init__(self, name, argv, log_path):
        self.name, self.argv, self.log_path = name, [str(a) for a in argv], Path(log_path)
        self.proc = None
        self.log_start = 0

    def start(self):
        # The log may hold an earlier run's lines (a restarted key service): wait_for_line
        # must only read what this run writes.
        self.log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        return self

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def log(self, since_start=False):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_start if since_start else 0)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_line(self, prefix, timeout=10):
        """Wait until the log has a line starting with prefix; return that line."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log(since_start=True).splitlines():
                if line.startswith(prefix):
                    return line
            if not self.running():
                raise HarnessError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise HarnessError(f"{self.name} did not start in {timeout} s:\n{self.log()[-3000:]}")
            time.sleep(POLL_S)

    def stop(self, timeout=5):
        """terminate, wait, kill: never leave a process behind."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_helper_server(name, module, port, log_path, extra=()):
    """Start testbed/<module>.py on port (0: any) and return (Process, bound port)."""
    argv = [sys.executable, "-m", f"testbed.{module}", "--host", HOST, "--port", port, *extra]
    p = Process(name, argv, log_path).start()
    try:
        line = p.wait_for_line(f"{name} listening on ")
    except BaseException:
        p.stop()
        raise
    bound = int(line.split()[3].rsplit(":", 1)[1])  # "<name> listening on http://127.0.0.1:PORT ..."
    return p, bound


def _envoy_argv(config_path, concurrency, log_path, log_level):
    return [
        envoy_binary(), "-c", config_path,
        "--concurrency", concurrency,
        # No shared memory and no base id: several Envoys (parallel runs) never collide.
        "--disable-hot-restart",
        "--log-level", log_level,
        "--log-path", log_path,
        # The access log and --log-path file are flushed every 10 s by default: far too
        # slow for a test that reads them right after a request.
        "--file-flush-interval-msec", "50",
    ]


def _tail(text, lines=60):
    return "\n".join(text.splitlines()[-lines:])


# -- HTTP -------------------------------------------------------------------------------


class _Connection(http.client.HTTPConnection):
    # The request line goes out as latin-1, not ASCII, so a test can put raw bytes
    # 0x80-0xFF in a path or query (http.client would refuse them).
    def _encode_request(self, request):
        return request.encode("latin-1")


class Response:
    def __init__(self, status, reason, headers, body):
        self.status = status
        self.reason = reason
        self.headers = headers  # [(lowercased name, value)], in order, repeats kept
        self.body = body

    def header(self, name):
        """First value of a header (case-insensitive name), or None."""
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name):
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    @property
    def text(self):
        return self.body.decode("utf-8", errors="replace")

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Response {self.status} {self.headers!r} {self.body[:300]!r}>"


def _encode_body(body):
    if body is None or isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return json.dumps(body).encode()  # dict or list


def _send(conn, method, path, headers, body):
    """Send one request at the low level: repeated headers and raw bytes values go out as given."""
    if isinstance(path, bytes):
        path = path.decode("latin-1")
    names = {n.lower() if isinstance(n, str) else n.decode("latin-1").lower() for n, _ in headers}
    conn.putrequest(method, path, skip_host="host" in names, skip_accept_encoding=True)
    for name, value in headers:
        conn.putheader(name, value)  # str values go out as latin-1, bytes as they are
    body = _encode_body(body)
    if body is not None and "content-length" not in names and "transfer-encoding" not in names:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)


def _receive(conn):
    r = conn.getresponse()
    body = r.read()
    return Response(r.status, r.reason, [(k.lower(), v) for k, v in r.getheaders()], body)


def http_request(port, method, path, headers=(), body=None, timeout=10, source=None, host=HOST):
    """One request on a fresh connection to host:port (127.0.0.1), from the loopback
    address `source` (e.g. "127.0.0.2") when given."""
    conn = _Connection(host, port, timeout=timeout, source_address=(source, 0) if source else None)
    try:
        _send(conn, method, path, list(headers), body)
        return _receive(conn)
    finally:
        conn.close()


class _JsonClient:
    """Small client of a JSON admin API (the key service's, the upstream's)."""

    def __init__(self, port):
        self.port = port

    def call(self, method, path, body=None, expect=(200,)):
        r = http_request(self.port, method, path, body=body)
        if r.status not in expect:
            raise HarnessError(f"{method} {path} -> {r.status}: {r.text}")
        return r.json()


class KeyServiceClient(_JsonClient):
    """The key service's admin API (see testbed/keyservice.py)."""

    def add_key(self, key_hash, record):
        return self.call("POST", "/admin/keys", {"key_hash": key_hash, "record": record})

    def delete(self, key_hash):
        return self.call("DELETE", f"/admin/keys/{key_hash}")

    def revoke(self, key_hash):
        return self.call("POST", f"/admin/keys/{key_hash}/revoke")

    def expire(self, key_hash):
        return self.call("POST", f"/admin/keys/{key_hash}/expire")

    def keys(self):
        return self.call("GET", "/admin/keys")["keys"]

    def set_mode(self, mode, status=None, delay_ms=None, hold_ms=None):
        """normal | status (answer `status`, default 500) | hang | close | malformed;
        delay_ms delays every lookup answer in any mode; hold_ms holds a normal answer
        after reading the record (an answer older than a change made meanwhile)."""
        return self.call("POST", "/admin/mode",
                         {"mode": mode, "status": status, "delay_ms": delay_ms, "hold_ms": hold_ms})

    def lookups(self):
        """{"total": N, "by_hash": {hash: n}, "recent": [{"path": p, "headers": [[k, v]]}],
        "changes": {"total": polls, "recent": [...]}}"""
        return self.call("GET", "/admin/lookups")

    def set_changes_mode(self, mode, status=None, delay_ms=None):
        """The change feed's misbehaviour: normal | status | gone (410) | hang | malformed |
        bad_hashes | huge; delay_ms delays every poll answer."""
        return self.call("POST", "/admin/changes-mode", {"mode": mode, "status": status, "delay_ms": delay_ms})

    def polls(self):
        """How many times the change feed was polled."""
        return self.lookups()["changes"]["total"]

    def reset(self):
        """Zero the counters and recent lookups, mode back to normal; keys are kept."""
        return self.call("POST", "/admin/reset")


class UpstreamClient(_JsonClient):
    """The recording upstream, called directly (never through Envoy)."""

    def requests(self):
        """Recorded requests: [{"method", "path", "headers": [[name, value]], "body"}]."""
        return self.call("GET", "/__upstream/requests")

    def clear(self):
        self.call("DELETE", "/__upstream/requests")


# -- Envoy ------------------------------------------------------------------------------


def envoy_stats(admin_port):
    """Counters and gauges of the Envoy whose admin is on admin_port: {name: int}."""
    out = {}
    for s in http_request(admin_port, "GET", "/stats?format=json", timeout=5).json().get("stats", []):
        if isinstance(s.get("value"), int):  # text readouts (e.g. with LDS) are not numbers
            out[s["name"]] = s["value"]
    return out


def envoy_histograms(admin_port):
    """{name: {"p50": v, "p99": v, ...}} of cumulative quantiles. Envoy merges histograms on
    its stats flush (every 5 s), so they lag behind."""
    out = {}
    for s in http_request(admin_port, "GET", "/stats?format=json", timeout=5).json().get("stats", []):
        h = s.get("histograms")
        if not h:
            continue
        qs = h.get("supported_quantiles", [])
        for entry in h.get("computed_quantiles", []):
            out[entry["name"]] = {f"p{q:g}": v.get("cumulative") for q, v in zip(qs, entry.get("values", []))}
    return out


def _check_wasm():
    if not FILTER_PATH.is_file():
        raise HarnessError(f"{FILTER_PATH} not found: run scripts/build (or scripts/build-module) first")


def _render(tmp, filter_config, listen_port, admin_port, upstream_port, key_service_port,
            lds=False, wasm_path=WASM_PATH, access_log=None, listen_address=HOST, rls_port=None):
    """filter_config: a dict/list (sent as one line of JSON) or a str sent as it is (one
    line), e.g. to try malformed JSON. The template's YAML `|` block adds a final newline.

    lds=True serves the very same listener over file-based LDS (tmp/lds.yaml), so that a
    test can push a new filter configuration into the running Envoy."""
    config = Path(tmp) / "envoy.yaml"
    render_envoy.render({
        "LISTEN_PORT": listen_port,
        "ADMIN_PORT": admin_port,
        "UPSTREAM_PORT": upstream_port,
        "KEY_SERVICE_PORT": key_service_port,
        "WASM_PATH": wasm_path,
        "ACCESS_LOG": access_log or Path(tmp) / "access.log",
        "FILTER_CONFIG": filter_config,
        "LISTEN_ADDRESS": f'"{listen_address}"' if ":" in listen_address else listen_address,  # YAML
        **({"RLS_PORT": rls_port} if rls_port else {}),
    }, config, build=BUILD)
    if lds:
        _move_listener_to_lds(config, Path(tmp) / "lds.yaml")
    return config


def _move_listener_to_lds(config, lds_path):
    """Cuts the template's `listeners:` block out of the bootstrap into an LDS file."""
    lines = config.read_text().splitlines(keepends=True)
    start = lines.index("  listeners:\n")
    end = lines.index("  clusters:\n")
    listener = [line[2:] for line in lines[start + 1:end]]
    listener.insert(1, '  "@type": type.googleapis.com/envoy.config.listener.v3.Listener\n')
    staged = lds_path.with_suffix(".new")
    staged.write_text("resources:\n" + "".join(listener))
    staged.rename(lds_path)  # Envoy watches for the file being moved into place
    bootstrap = lines[:start] + lines[end:]
    bootstrap += [
        "node: { id: apikey-test, cluster: apikey-test }\n",
        "dynamic_resources:\n",
        "  lds_config:\n",
        "    resource_api_version: V3\n",
        f"    path_config_source: {{ path: {lds_path} }}\n",
    ]
    config.write_text("".join(bootstrap))


def admin_ready(admin_port):
    """Whether the Envoy whose admin is on admin_port says it is LIVE."""
    try:
        r = http_request(admin_port, "GET", "/ready", timeout=1)
    except OSError:
        return False
    return r.status == 200 and r.text.strip() == "LIVE"


def _accepts(port, host=HOST):
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def _port_clash(log):
    return "Address already in use" in log or "cannot bind" in log


def envoy_refuses(filter_config, timeout=START_TIMEOUT_S, concurrency=1):
    """Start Envoy with this filter configuration, expecting it to refuse it and exit.

    Returns (exit_code, envoy_log). If Envoy becomes ready instead, it is stopped and
    (None, envoy_log) is returned. Nothing listens on the key service or upstream ports:
    the configuration alone is judged.
    """
    _check_wasm()
    tmp = Path(tempfile.mkdtemp(prefix="apikey-refuses-"))
    try:
        for _attempt in range(3):
            admin = free_port()
            config = _render(tmp, filter_config, free_port(), admin, free_port(), free_port())
            log_path = tmp / "envoy.log"
            log_path.unlink(missing_ok=True)
            envoy = Process("envoy", _envoy_argv(config, concurrency, log_path, "info"), tmp / "envoy.out").start()
            ready = False
            deadline = time.monotonic() + timeout
            try:
                while envoy.running() and not ready:
                    if time.monotonic() > deadline:
                        raise HarnessError(f"Envoy neither exited nor became ready in {timeout} s; log tail:\n"
                                           + _tail(_read(log_path) + envoy.log()))
                    time.sleep(POLL_S)
                    ready = admin_ready(admin)
            finally:
                envoy.stop()
            log = _read(log_path) + envoy.log()
            if ready:
                return None, log
            if _port_clash(log):
                continue  # not the filter's doing: try other ports
            return envoy.proc.returncode, log
        raise HarnessError("Envoy could not bind its ports three times; log tail:\n" + _tail(log))
    finally:
        _remove(tmp)


def _read(path):
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _remove(tmp):
    if os.environ.get("APIKEY_KEEP_TMP"):
        print(f"harness: kept {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)


class Service:
    """A set of processes used as a context manager: start() on entry (and close() if
    that fails half way), close() on exit. close() must stop whatever was started."""

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()
        return False


class Stack(Service):
    """Envoy + apikey_filter.wasm + key service + recording upstream, on 127.0.0.1.

    Attributes once started: listen_port, admin_port, key_service_port, upstream_port,
    tmp (temp dir: envoy.yaml, envoy.log, access.log, keys.json, process logs),
    keyservice (KeyServiceClient), upstream (UpstreamClient).

    The key service runs with --save on tmp/keys.json, so admin changes (add_key, revoke,
    ...) are written back and a stop_key_service()/start_key_service() restart keeps the
    keys as last changed; its counters and mode start afresh.
    """

    def __init__(self, filter_config, keys=None, concurrency=2, start_key_service=True, log_level="info",
                 lds=False, listen_address=HOST, bootstrap_extra="", rls_port=None, edit_config=None):
        """listen_address: where Envoy's listener binds ("::1" for IPv6 clients); the
        admin and the other services stay on 127.0.0.1. bootstrap_extra: YAML appended to
        the bootstrap at its top level (e.g. a stats_config). rls_port: where the
        `ratelimit` cluster points (a running RLS server, testbed/rls_service.py)."""
        self.rls_port = rls_port
        self.filter_config = filter_config
        self.listen_address = listen_address
        self.bootstrap_extra = bootstrap_extra
        # A function of the rendered Envoy configuration's text to the text Envoy runs.
        self.edit_config = edit_config
        self.lds = lds
        self.initial_keys = dict(keys or {})
        self.concurrency = concurrency
        self.start_key_service_at_start = start_key_service
        self.log_level = log_level
        self.tmp = None
        self.envoy = self._keyservice_proc = self._upstream_proc = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self):
        _check_wasm()
        self.tmp = Path(tempfile.mkdtemp(prefix="apikey-stack-"))
        self.keys_path = self.tmp / "keys.json"
        self.keys_path.write_text(json.dumps({"keys": self.initial_keys}))

        self._upstream_proc, self.upstream_port = start_helper_server(
            "upstream", "upstream", 0, self.tmp / "upstream.log")
        self.upstream = UpstreamClient(self.upstream_port)

        if self.start_key_service_at_start:
            self._keyservice_proc, self.key_service_port = start_helper_server(
                "keyservice", "keyservice", 0, self.tmp / "keyservice.log",
                ["--keys", self.keys_path, "--save"])
        else:
            self.key_service_port = free_port()  # named in the config; start_key_service() binds it later
        self.keyservice = KeyServiceClient(self.key_service_port)

        self._start_envoy()
        return self

    def _start_envoy(self):
        for _attempt in range(3):
            self.listen_port, self.admin_port = free_port(), free_port()
            self.config_path = _render(self.tmp, self.filter_config, self.listen_port, self.admin_port,
                                       self.upstream_port, self.key_service_port, lds=self.lds,
                                       listen_address=self.listen_address, rls_port=self.rls_port)
            if self.bootstrap_extra:
                self.config_path.write_text(self.config_path.read_text() + "\n" + self.bootstrap_extra)
            if self.edit_config:
                self.config_path.write_text(self.edit_config(self.config_path.read_text()))
            self.envoy_log_path = self.tmp / "envoy.log"
            self.envoy_log_path.unlink(missing_ok=True)
            self.envoy = Process("envoy", _envoy_argv(self.config_path, self.concurrency, self.envoy_log_path,
                                                      self.log_level), self.tmp / "envoy.out").start()
            deadline = time.monotonic() + START_TIMEOUT_S
            while self.envoy.running():
                if admin_ready(self.admin_port) and _accepts(self.listen_port, self.listen_address):
                    return
                if time.monotonic() > deadline:
                    self.envoy.stop()
                    raise HarnessError(f"Envoy not ready in {START_TIMEOUT_S} s; log tail:\n"
                                       + _tail(self.envoy_log()))
                time.sleep(POLL_S)
            log = self.envoy_log()
            if not _port_clash(log):
                raise HarnessError(f"Envoy exited with {self.envoy.proc.returncode}; log tail:\n{_tail(log)}")
        raise HarnessError("Envoy could not bind its ports three times; log tail:\n" + _tail(log))

    def push_listener(self, filter_config, wasm_path=WASM_PATH, timeout=10):
        """Pushes a new filter configuration (and optionally another .wasm) to the running
        Envoy over LDS (needs lds=True) and waits until the new listener serves."""
        assert self.lds, "push_listener needs Stack(..., lds=True)"
        modified = self.stat("listener_manager.listener_modified")
        scratch = self.tmp / "push"
        scratch.mkdir(exist_ok=True)
        _render(scratch, filter_config, self.listen_port, self.admin_port, self.upstream_port,
                self.key_service_port, lds=True, wasm_path=wasm_path, access_log=self.tmp / "access.log",
                listen_address=self.listen_address, rls_port=self.rls_port)
        (scratch / "lds.yaml").rename(self.tmp / "lds.yaml")
        deadline = time.monotonic() + timeout
        while self.stat("listener_manager.listener_modified") == modified:
            if time.monotonic() > deadline:
                raise HarnessError("Envoy did not take the pushed listener; log tail:\n" + _tail(self.envoy_log()))
            time.sleep(POLL_S)
        while self.stat("listener_manager.total_listeners_warming"):
            time.sleep(POLL_S)
        self.filter_config = filter_config

    def close(self):
        """Stop every process this stack started, then remove its temp dir. Idempotent."""
        for p in (self.envoy, self._keyservice_proc, self._upstream_proc):
            if p is not None:
                p.stop()
        if self.tmp is not None:
            _remove(self.tmp)
            self.tmp = None

    def stop_key_service(self):
        if self._keyservice_proc is not None:
            self._keyservice_proc.stop()

    def start_key_service(self):
        """(Re)start the key service on the same port, with the keys as last changed."""
        if self._keyservice_proc is not None and self._keyservice_proc.running():
            return
        self._keyservice_proc, _ = start_helper_server(
            "keyservice", "keyservice", self.key_service_port, self.tmp / "keyservice.log",
            ["--keys", self.keys_path, "--save"])

    # -- traffic ------------------------------------------------------------------------

    def request(self, method, path, headers=(), body=None, timeout=10, source=None):
        """Send one request through Envoy on a fresh connection.

        headers: (name, value) pairs, sent in order and as given (repeats kept; a bytes
        value goes out byte for byte, a str one as latin-1). body: bytes, str (UTF-8),
        dict/list (JSON) or None; Content-Length is added unless given. source: the
        client's loopback address (127.0.0.0/8), so tests can be several clients.
        """
        return http_request(self.listen_port, method, path, headers, body, timeout, source,
                            self.listen_address)

    def requests_concurrently(self, n, method, path, headers=(), body=None, timeout=10):
        """n requests through Envoy, each on its own connection, released together.

        Every thread connects first, then all wait on a barrier and send at once, so the
        requests really overlap. headers may be a list of pairs (the same for all) or a
        function i -> list of pairs. Returns the n Responses in order; raises the first
        exception any thread hit.
        """
        barrier = threading.Barrier(n)
        results = [None] * n

        def one(i):
            conn = _Connection(HOST, self.listen_port, timeout=timeout)
            try:
                try:
                    conn.connect()
                finally:
                    barrier.wait(timeout)  # even a failed connect must not strand the others
                hs = headers(i) if callable(headers) else headers
                _send(conn, method, path, list(hs), body)
                results[i] = _receive(conn)
            except BaseException as e:  # handed to the caller below
                results[i] = e
            finally:
                conn.close()

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 5)
        for r in results:
            if isinstance(r, BaseException):
                raise r
            if r is None:
                raise HarnessError("a concurrent request did not finish")
        return results

    # -- observing ----------------------------------------------------------------------

    def admin(self, path):
        """GET on Envoy's admin interface; returns the Response."""
        return http_request(self.admin_port, "GET", path)

    def stats(self):
        """Envoy's counters and gauges: {name: int}. The filter's own metrics appear as
        wasmcustom.apikey_filter.*. Histograms are left out (see histograms())."""
        return envoy_stats(self.admin_port)

    def stat(self, name, default=0):
        """One counter or gauge. "apikey_filter.allowed" also finds "wasmcustom.apikey_filter.allowed"
        (or the module's "dynamicmodulescustom.apikey_filter.allowed")."""
        stats = self.stats()
        if name in stats:
            return stats[name]
        return stats.get(STATS_NAMESPACE + name, default)

    def filter_stats(self, nonzero=False):
        """The filter's own counters and gauges without their prefix, {"allowed": 3, ...}:
        the .wasm's are wasmcustom.apikey_filter.*, the module's apikey_filter.*."""
        prefix = STATS_PREFIX
        return {k[len(prefix):]: v for k, v in self.stats().items()
                if k.startswith(prefix) and (v or not nonzero)}

    def histograms(self):
        """{name: {"p50": v, "p99": v, ...}} of cumulative quantiles (see envoy_histograms)."""
        return envoy_histograms(self.admin_port)

    def envoy_log(self):
        """Envoy's log (--log-path) followed by anything it wrote to stdout/stderr."""
        return _read(self.envoy_log_path) + (self.envoy.log() if self.envoy else "")

    def access_log(self):
        """The access log (flushed every 50 ms: wait_for() a line when a test needs it)."""
        return _read(self.tmp / "access.log")

    def wait_for(self, what, text, timeout=3):
        """Wait until envoy_log() or access_log() (what = "envoy" or "access") contains
        text; returns the log. Raises HarnessError with the log's tail on timeout."""
        read = self.envoy_log if what == "envoy" else self.access_log
        deadline = time.monotonic() + timeout
        while True:
            log = read()
            if text in log:
                return log
            if time.monotonic() > deadline:
                raise HarnessError(f"{text!r} not in the {what} log after {timeout} s; tail:\n{_tail(log, 30)}")
            time.sleep(POLL_S)
