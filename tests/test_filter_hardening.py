"""What a security review found, each against a real Envoy (CONTRACT "Hardening"): scope
rules on the path as upstreams read it, a revocation never undone by a lookup in flight,
no key in what Envoy itself logs or answers, load that cannot open the gate, and budgets
per IPv6 /64."""
import concurrent.futures
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from testbed.harness import BUILD, HOST, Stack, key_hash

SERVICE = {"cluster": "key_service", "timeout_ms": 3000}
READER = "hard-reader-3f9a"  # holds orders:read and reports:read, never orders:write
RULES = [
    {"path_prefix": "/orders", "methods": ["POST"], "scopes": ["orders:write"]},
    {"path_prefix": "/reports", "methods": ["GET"], "scopes": ["reports:write"]},
]


def code(response):
    return response.json()["error"]["code"] if response.status >= 400 and response.body else None


def normalisation_off(text):
    """Envoy as Istio's default leaves it: no slash merging, escaped slashes kept."""
    return (text.replace("normalize_path: true", "normalize_path: false")
            .replace("merge_slashes: true", "merge_slashes: false")
            .replace("path_with_escaped_slashes_action: UNESCAPE_AND_FORWARD",
                     "path_with_escaped_slashes_action: KEEP_UNCHANGED"))


BYPASSES = ["/orders", "//orders", "/;x/orders", "/.;/orders", "/orders;v=1", "/Orders",
            "/ORDERS/5", "/%2Forders", "/%6Frders", "/x/../orders", "/./orders"]


@pytest.mark.parametrize("normalised", [True, False], ids=["envoy-normalises", "istio-default"])
def test_scope_rules_match_the_path_as_upstreams_read_it(normalised):
    keys = {key_hash(READER): {"key_id": "k_reader", "scopes": ["orders:read", "reports:read"]}}
    config = {"key_service": SERVICE, "rules": RULES}
    with Stack(config, keys=keys, edit_config=None if normalised else normalisation_off) as s:
        for path in BYPASSES:
            r = s.request("POST", path, headers=[("x-api-key", READER)])
            assert (r.status, code(r)) == (403, "permission_denied"), path
        head = s.request("HEAD", "/reports/1", headers=[("x-api-key", READER)])
        assert head.status == 403, "HEAD is GET to a server"
        s.upstream.clear()
        # What no rule covers still goes through, as before.
        assert s.request("POST", "/order-notes", headers=[("x-api-key", READER)]).status == 200
        assert s.request("GET", "/orders/5", headers=[("x-api-key", READER)]).status == 200
        assert [r["path"] for r in s.upstream.requests()] == ["/order-notes", "/orders/5"]


def test_a_revocation_while_a_lookup_is_held_back_is_seen_within_an_interval():
    interval_ms = 200
    key = "hard-revoked-7c21"
    config = {"key_service": {**SERVICE, "changes": {"interval_ms": interval_ms, "ttl_s": 3600}},
              "cache": {"ttl_s": 3600, "negative_ttl_s": 3600, "refresh_ahead_pct": 0}}
    with Stack(config, keys={key_hash(key): {"key_id": "k_revoked"}}) as s:
        deadline = time.monotonic() + 5
        while s.keyservice.polls() < 2:  # the feed is followed before the key is used
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # The key service reads the record, then holds its answer: it lands after the feed
        # listed the revocation.
        s.keyservice.set_mode("normal", hold_ms=1500)
        asking, answers = request_while_looked_up(s, "/", key, lookups=1)
        s.keyservice.revoke(key_hash(key))
        s.keyservice.set_mode("normal")
        asking.join(10)
        assert [(r.status, code(r)) for r in answers] == [(401, "api_key_revoked")], \
            "the answer in flight predates the revocation: asked again"
        assert s.stat("apikey_filter.key_service.superseded") >= 1
        for _ in range(4):  # every worker thread: nothing cached the old record
            r = s.request("GET", "/", headers=[("x-api-key", key)])
            assert (r.status, code(r)) == (401, "api_key_revoked")


def request_while_looked_up(s, path, key, lookups):
    """Sends a request for `key` from a thread of its own, and returns once the key service
    has seen `lookups` lookups in all: the thread, and the list its answer lands in."""
    answers = []
    thread = threading.Thread(target=lambda: answers.append(
        s.request("GET", path, headers=[("x-api-key", key)])))
    thread.start()
    deadline = time.monotonic() + 3
    while s.keyservice.lookups()["total"] < lookups:
        assert time.monotonic() < deadline, "the lookup never reached the key service"
        time.sleep(0.02)
    return thread, answers


def raw_exchange(port, request, timeout=5):
    """Sends request (bytes) on a fresh connection; everything the server answered."""
    with socket.create_connection((HOST, port), timeout=timeout) as conn:
        conn.sendall(request)
        received = b""
        try:
            while chunk := conn.recv(65536):
                received += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    return received


def test_requests_envoy_refuses_itself_put_no_key_in_its_log_or_answers():
    key = "hard-early-answer-5e0b"
    sources = [{"header": "x-api-key"}, {"header": "authorization", "scheme": "Bearer"},
               {"query": "api_key"}]
    config = {"key_service": SERVICE, "key_sources": sources}
    with Stack(config, keys={key_hash(key): {"key_id": "k_early"}}) as s:
        port = s.listen_port
        carried = f"x-api-key: {key}\r\nauthorization: Bearer {key}\r\n"
        answers = [
            # An escaped slash: forwarded, never redirected with the query in Location.
            raw_exchange(port, f"GET /a%2Fb?api_key={key} HTTP/1.1\r\nhost: x\r\n{carried}"
                               "connection: close\r\n\r\n".encode()),
            # A path Envoy refuses (a fragment, then a control character).
            raw_exchange(port, f"GET /bad#frag?api_key={key} HTTP/1.1\r\nhost: x\r\n{carried}"
                               "connection: close\r\n\r\n".encode()),
            raw_exchange(port, f"GET /bad\x01?api_key={key} HTTP/1.1\r\nhost: x\r\n{carried}"
                               "connection: close\r\n\r\n".encode()),
            # Headers too large.
            raw_exchange(port, f"GET /big?api_key={key} HTTP/1.1\r\nhost: x\r\n{carried}"
                               f"x-filler: {'a' * 100_000}\r\nconnection: close\r\n\r\n".encode()),
            # Not HTTP at all, with a key in it.
            raw_exchange(port, f"GARBAGE /?api_key={key}\r\n{carried}\r\n".encode()),
        ]
        statuses = [a.split(b" ", 2)[1] if a.startswith(b"HTTP/") else b"-" for a in answers]
        assert statuses[0] != b"307", "no redirect that echoes the query"
        assert any(st in (b"400", b"431") for st in statuses[1:]), statuses
        for answer in answers:
            assert key.encode() not in answer, answer[:300]
        time.sleep(0.3)  # the access log is flushed every 50 ms
        log = s.access_log()
        assert '"GET /a/b HTTP/1.1" 200' in log, "forwarded, its key stripped"
        assert " 400 " in log or " 431 " in log, "the refused requests are logged"
        assert key not in log
        assert key not in s.envoy_log()


CIRCUIT_BREAKER = """
    circuit_breakers:
      thresholds:
      - { max_connections: 1, max_pending_requests: 1, max_requests: 1, max_retries: 0 }
"""


def small_key_service_cluster(text):
    anchor = "  - name: key_service\n"
    at = text.index(anchor) + len(anchor)
    return text[:at] + CIRCUIT_BREAKER.lstrip("\n") + text[at:]


def test_a_flood_of_made_up_keys_never_opens_the_gate_and_a_cached_key_keeps_working():
    cached = "hard-cached-91d2"
    config = {"key_service": SERVICE, "failure_mode": "open",
              "cache": {"ttl_s": 3600, "negative_ttl_s": 1}}
    with Stack(config, keys={key_hash(cached): {"key_id": "k_cached"}}, concurrency=2,
               edit_config=small_key_service_cluster) as s:
        for _ in range(4):  # cached on the node, and copied on both worker threads
            assert s.request("GET", "/", headers=[("x-api-key", cached)]).status == 200
        s.keyservice.set_mode("normal", delay_ms=300)
        s.upstream.clear()

        def made_up(i):
            return s.request("GET", f"/flood/{i}", headers=[("x-api-key", f"made-up-{i:04d}-x7")],
                             source=f"127.0.1.{i % 50 + 1}")

        def cached_key(i):
            return s.request("GET", f"/cached/{i}", headers=[("x-api-key", cached)])

        with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
            flood = [pool.submit(made_up, i) for i in range(200)]
            good = [pool.submit(cached_key, i) for i in range(20)]
            flood = [f.result() for f in flood]
            good = [f.result() for f in good]
        assert [r.status for r in good] == [200] * 20
        assert {r.status for r in flood} <= {401, 503}, {r.status for r in flood}
        assert 503 in {r.status for r in flood}, "the circuit breaker was reached"
        reached = [r["path"] for r in s.upstream.requests() if r["path"].startswith("/flood")]
        assert reached == [], f"{len(reached)} made-up keys reached the upstream"
        assert s.stat("apikey_filter.key_service.error.overloaded") > 0
        assert s.stat("apikey_filter.failure_open") == 0


def trusted_forwarded_for(text):
    """Envoy behind one trusted proxy: the client is the X-Forwarded-For address."""
    return text.replace("use_remote_address: true",
                        "use_remote_address: true\n          xff_num_trusted_hops: 1")


def test_fifty_failed_keys_from_one_ipv6_64_run_out_its_budget():
    config = {"key_service": SERVICE, "brute_force": {"max_failures": 10, "period_s": 3600}}
    with Stack(config, edit_config=trusted_forwarded_for) as s:
        def from_address(i, address):
            r = s.request("GET", "/", headers=[("x-api-key", f"guess-{address}-{i}"),
                                               ("x-forwarded-for", address)])
            return code(r)

        codes = [from_address(i, f"2001:db8:0:7:{i:x}::{i + 1:x}") for i in range(50)]
        assert codes[:10] == ["api_key_invalid"] * 10
        assert codes[10:] == ["too_many_failed_attempts"] * 40, "one budget for the /64"
        assert from_address(0, "2001:db8:0:8::1") == "api_key_invalid", "another /64"


PANIC_PROBE = os.environ.get("APIKEY_PANIC_PROBE_MODULE")


@pytest.mark.skipif(BUILD != "module" or not PANIC_PROBE,
                    reason="the .so's panic probe build (scripts/test builds it for the .so run)")
def test_after_a_panic_the_so_answers_what_it_held_rebuilds_its_worker_and_serves_on():
    cached, cold = "hard-panic-cached-1", "hard-panic-cold-2"
    keys = {key_hash(cached): {"key_id": "k_cached"}, key_hash(cold): {"key_id": "k_cold"}}
    search_path = os.environ["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"]
    os.environ["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = str(Path(PANIC_PROBE).parent)
    try:
        with Stack({"key_service": SERVICE, "rate_limit": {"requests": 1000, "period_s": 3600}},
                   keys=keys, concurrency=1) as s:
            os.environ["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = search_path  # Envoy has it
            panic_and_serve_on(s, cached, cold)
    finally:
        os.environ["ENVOY_DYNAMIC_MODULES_SEARCH_PATH"] = search_path


def panic_and_serve_on(s, cached, cold):
    """A panic while the worker holds a parked request: both answered 503, the worker
    rebuilt, and the next request served from the node-wide state."""
    first = s.request("GET", "/", headers=[("x-api-key", cached)])
    assert first.status == 200
    s.keyservice.set_mode("normal", delay_ms=1500)
    waiting, parked = request_while_looked_up(s, "/parked", cold, lookups=2)
    boom = s.request("GET", "/", headers=[("x-api-key", cached), ("x-apikey-filter-panic", "1")])
    waiting.join(10)
    assert (boom.status, code(boom)) == (503, "key_service_unavailable")
    assert [(r.status, code(r)) for r in parked] == [(503, "key_service_unavailable")], \
        "the request the worker held is answered, not forwarded"
    assert s.stat("apikey_filter.panics") == 1
    s.keyservice.set_mode("normal")
    again = s.request("GET", "/", headers=[("x-api-key", cached)])
    assert again.status == 200, "a new worker serves"
    # The node-wide bucket was kept: the rebuilt worker goes on counting from it.
    remaining = int(again.header("ratelimit").split("r=")[1].split(";")[0])
    assert remaining == 1000 - 2, again.header("ratelimit")  # the first and this one
    assert all(r["path"] != "/parked" for r in s.upstream.requests())


def test_lookups_past_max_pending_are_refused_not_forwarded():
    config = {"key_service": {**SERVICE, "max_pending": 1}, "failure_mode": "open"}
    with Stack(config, concurrency=2) as s:
        s.keyservice.set_mode("normal", delay_ms=800)
        waiting, first = request_while_looked_up(s, "/first", "pending-first-1", lookups=1)
        second = s.request("GET", "/second", headers=[("x-api-key", "pending-second-2")])
        waiting.join(10)
        assert (second.status, code(second)) == (503, "key_service_unavailable")
        assert [(r.status, code(r)) for r in first] == [(401, "api_key_invalid")]
        assert s.stat("apikey_filter.key_service.error.overloaded") == 1
        assert s.stat("apikey_filter.failure_open") == 0
        assert s.upstream.requests() == []


def test_ipv4_budgets_follow_ipv4_prefix():
    config = {"key_service": SERVICE,
              "brute_force": {"max_failures": 3, "period_s": 3600, "ipv4_prefix": 24}}
    with Stack(config, edit_config=trusted_forwarded_for) as s:
        def from_address(i, address):
            r = s.request("GET", "/", headers=[("x-api-key", f"v4-guess-{i}"),
                                               ("x-forwarded-for", address)])
            return code(r)

        codes = [from_address(i, f"198.51.100.{i + 1}") for i in range(5)]
        assert codes == ["api_key_invalid"] * 3 + ["too_many_failed_attempts"] * 2, "one /24"
        assert from_address(9, "198.51.101.1") == "api_key_invalid", "another /24"
