"""Shared by lab/soak and lab/flood: processes, Envoy, stats, RSS, logs.

Every process is started through testbed/harness.py's Process (its log in the run directory,
and PR_SET_PDEATHSIG, so none outlives a script killed hard) and registered in PROCS;
stop_all() stops them in reverse order. The scripts call it in a `finally`, and SIGTERM and
SIGHUP are turned into SystemExit so that the `finally` runs for them too (Ctrl-C raises
KeyboardInterrupt by itself). Standard library only.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
SCRIPTS = ROOT / "scripts"
LOAD = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))  # the test bed
from testbed import harness, render_envoy  # noqa: E402

HOST = harness.HOST
key_hash = harness.key_hash
free_port = harness.free_port
http_request = harness.http_request
admin_ready = harness.admin_ready
KeyServiceClient = harness.KeyServiceClient

PROCS = []
_tag = "load"


def set_tag(tag):
    global _tag
    _tag = tag


def log(msg):
    print(f"{_tag}: {msg}", file=sys.stderr, flush=True)


class Failed(RuntimeError):
    pass


def on_signals_exit():
    def handler(signum, _frame):
        raise SystemExit(128 + signum)
    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, handler)
    # Started in the background by a non-interactive shell, SIGINT comes ignored: take it back.
    signal.signal(signal.SIGINT, signal.default_int_handler)


# -- tools --------------------------------------------------------------------------------


def ensure_wrk():
    if shutil.which("wrk"):
        return shutil.which("wrk")
    cmd = "apt-get update && apt-get install -y wrk"
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log(f"wrk is missing: running `{cmd}`")
        r = subprocess.run(["sh", "-c", cmd], stdout=sys.stderr, stderr=sys.stderr)
        if r.returncode == 0 and shutil.which("wrk"):
            return shutil.which("wrk")
    raise Failed(f"wrk is missing: install it with `{cmd}` (as root)")


def build_wasm(env_prefix):
    """scripts/build (unless <PREFIX>_SKIP_BUILD=1), or <PREFIX>_WASM=FILE."""
    given = os.environ.get(f"{env_prefix}_WASM")
    if given:
        wasm = Path(given).resolve()
    elif os.environ.get(f"{env_prefix}_SKIP_BUILD") == "1":
        wasm = harness.DEFAULT_WASM
    else:
        log("building the filter (scripts/build)")
        out = subprocess.run([str(SCRIPTS / "build")], check=True, stdout=subprocess.PIPE, text=True).stdout
        wasm = Path(out.splitlines()[0].strip())
    if not wasm.is_file():
        raise Failed(f"{wasm} not found: run scripts/build")
    return wasm


def envoy_binary():
    return harness.envoy_binary()


def env_int(name, default):
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw.replace("_", "").replace(",", ""))
    except ValueError:
        raise Failed(f"{name}={raw!r} is not a whole number")


def run_dir(name):
    d = ROOT / ".run" / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return d


# -- processes ----------------------------------------------------------------------------


def start(name, argv, log_path):
    p = harness.Process(name, argv, log_path).start()
    PROCS.append(p)
    return p


def stop(p, timeout=5):
    p.stop(timeout)
    if p in PROCS:
        PROCS.remove(p)


def stop_all():
    for p in reversed(list(PROCS)):
        try:
            stop(p)
        except BaseException as e:  # keep stopping the others, even on a second Ctrl-C
            log(f"stopping {p.name}: {e!r}")
            try:
                p.proc.kill()
            except Exception:
                pass


def start_server(module, port, log_path, extra=()):
    """testbed/<module>.py (keyservice or upstream). Returns (Process, bound port)."""
    p = start(module, [sys.executable, "-m", f"testbed.{module}", "--host", HOST, "--port", port, *extra],
              log_path)
    try:
        line = p.wait_for_line(f"{module} listening on ")
    except BaseException:
        stop(p)
        raise
    return p, int(line.split()[3].rsplit(":", 1)[1])


class Envoy:
    """An Envoy started from a config file, its log in the run directory."""

    def __init__(self, name, run, concurrency):
        self.name, self.run, self.concurrency = name, Path(run), concurrency
        self.proc = None
        self.log_path = self.run / f"{name}.log"

    def start(self, config_path, admin_port, listen_port, timeout=30):
        argv = [envoy_binary(), "-c", config_path, "--concurrency", self.concurrency, "--disable-hot-restart",
                "--log-level", "info", "--log-path", self.log_path, "--file-flush-interval-msec", "500"]
        self.admin_port, self.listen_port = admin_port, listen_port
        self.proc = start(self.name, argv, self.run / f"{self.name}.out")
        deadline = time.monotonic() + timeout
        while self.proc.running():
            if admin_ready(admin_port):
                try:
                    http_request(listen_port, "GET", "/", timeout=2)
                    return True
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise Failed(f"{self.name} not ready in {timeout} s:\n{tail(self.log())}")
            time.sleep(0.05)
        log_text = self.log()
        stop(self.proc)
        if "Address already in use" in log_text or "cannot bind" in log_text:
            return False  # the caller picks other ports
        raise Failed(f"{self.name} exited with {self.proc.proc.returncode}:\n{tail(log_text)}")

    @property
    def pid(self):
        return self.proc.proc.pid

    def running(self):
        return self.proc is not None and self.proc.running()

    def log(self):
        text = ""
        for p in (self.log_path, self.run / f"{self.name}.out"):
            try:
                text += p.read_text(errors="replace")
            except FileNotFoundError:
                pass
        return text

    def stats(self):
        """Counters and gauges: {name: int}."""
        return harness.envoy_stats(self.admin_port)

    def histograms(self):
        return harness.envoy_histograms(self.admin_port)


def start_filter_envoy(run, wasm, filter_config, upstream_port, key_service_port, concurrency=2,
                       access_log="/dev/null"):
    """Envoy from envoy/envoy.yaml.tmpl (the shipped config) with the filter; free ports."""
    envoy = Envoy("envoy", run, concurrency)
    for _attempt in range(3):
        listen, admin = free_port(), free_port()
        config = Path(run) / "envoy.yaml"
        render_envoy.render({
            "LISTEN_PORT": listen, "ADMIN_PORT": admin, "UPSTREAM_PORT": upstream_port,
            "KEY_SERVICE_PORT": key_service_port, "WASM_PATH": wasm, "ACCESS_LOG": access_log,
            "FILTER_CONFIG": filter_config,
        }, config)
        if envoy.start(config, admin, listen):
            return envoy
    raise Failed("Envoy could not bind its ports three times")


def tail(text, lines=40):
    return "\n".join(text.splitlines()[-lines:])


# -- measuring ----------------------------------------------------------------------------


def rss_kib(pid):
    """VmRSS of a process in KiB, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def mib(kib):
    return "n/a" if kib is None else f"{kib / 1024:.1f} MiB"


FILTER_PREFIX = "wasmcustom.apikey_filter."


def filter_stats(stats):
    return {k[len(FILTER_PREFIX):]: v for k, v in stats.items() if k.startswith(FILTER_PREFIX)}


def delta(after, before):
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


# A VM failure: the SDK's panic message, V8's trap, Envoy failing or reloading a wasm VM,
# and anything logged at critical. The filter itself logs `error` only for a refused
# configuration, which would not get this far.
VM_FAILURE = re.compile(r"panicked|Uncaught|RuntimeError|\[critical\]|\[error\]\[wasm\]")


def vm_failures(log_text):
    return [line for line in log_text.splitlines() if VM_FAILURE.search(line)]


def count_log_levels(log_text):
    """{(level, logger): lines} of warning and above."""
    out = {}
    for m in re.finditer(r"^\[[^\]]*\]\[\d+\]\[(warning|error|critical)\]\[([\w.]+)\]", log_text, re.MULTILINE):
        out[(m.group(1), m.group(2))] = out.get((m.group(1), m.group(2)), 0) + 1
    return out


def wasm_runtime_stats(stats):
    """Envoy's own counters about wasm VMs (created, active, ...): a VM reload shows here."""
    return {k: v for k, v in stats.items() if k.startswith("wasm.") and not k.startswith("wasmcustom.")}


def fmt_table(rows, header):
    """A plain-text table (right-aligned numbers)."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    def line(cells):
        return "  ".join(c.rjust(w) if c[:1].isdigit() or c[:1] == "-" else c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line([str(h) for h in header]), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def wait_json_line(path, prefix):
    for line in Path(path).read_text(errors="replace").splitlines():
        if line.startswith(prefix):
            return json.loads(line[len(prefix):])
    return None
