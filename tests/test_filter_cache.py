"""The node-wide key cache and the key service callout (CONTRACT "Cache", "Key service
protocol"), seen from outside: what clients get and how often the key service is asked."""
import socket
import threading
import time

import pytest

from testbed.harness import Stack, key_hash

SERVICE = {"cluster": "key_service", "timeout_ms": 1000}
RECORD = {"key_id": "k_cache", "owner": "acme", "scopes": ["read"]}


def lookups_of(stack, raw_key):
    return stack.keyservice.lookups()["by_hash"].get(key_hash(raw_key), 0)


def get(stack, raw_key, path="/", headers=()):
    return stack.request("GET", path, headers=[("x-api-key", raw_key), *headers])


def code_of(response):
    return response.json()["error"]["code"]


@pytest.fixture(scope="module")
def stack():
    config = {"key_service": SERVICE, "cache": {"ttl_s": 1, "negative_ttl_s": 1, "stale_if_error_s": 30}}
    with Stack(config, concurrency=1) as s:
        yield s


@pytest.fixture(autouse=True)
def normal_key_service(request):
    """Every test starts with a key service that answers normally."""
    if "stack" in request.fixturenames:
        request.getfixturevalue("stack").keyservice.set_mode("normal")
    yield


def test_a_cached_key_is_looked_up_once(stack):
    stack.keyservice.add_key(key_hash("cached-key"), RECORD)
    hits_before = stack.stat("apikey_filter.cache.hit")
    for _ in range(5):
        r = get(stack, "cached-key")
        assert r.status == 200
        assert r.json()["path"] == "/"
    assert lookups_of(stack, "cached-key") == 1
    assert stack.stat("apikey_filter.cache.hit") - hits_before == 4


def test_a_revocation_is_seen_once_the_ttl_has_passed(stack):
    stack.keyservice.add_key(key_hash("revoked-later"), RECORD)
    assert get(stack, "revoked-later").status == 200
    stack.keyservice.revoke(key_hash("revoked-later"))
    assert get(stack, "revoked-later").status == 200, "trusted for ttl_s"
    time.sleep(1.1)
    r = get(stack, "revoked-later")
    assert (r.status, code_of(r)) == (401, "api_key_revoked")
    assert lookups_of(stack, "revoked-later") == 2


def test_an_unknown_key_is_remembered_for_the_negative_ttl(stack):
    negative_before = stack.stat("apikey_filter.cache.negative_hit")
    assert code_of(get(stack, "not-yet-issued")) == "api_key_invalid"
    stack.keyservice.add_key(key_hash("not-yet-issued"), RECORD)
    assert code_of(get(stack, "not-yet-issued")) == "api_key_invalid"
    assert lookups_of(stack, "not-yet-issued") == 1
    assert stack.stat("apikey_filter.cache.negative_hit") - negative_before == 1
    time.sleep(1.1)
    assert get(stack, "not-yet-issued").status == 200
    assert lookups_of(stack, "not-yet-issued") == 2


def test_expiry_is_checked_on_cached_entries():
    """A long TTL: the second answer can only come from the cached entry."""
    with Stack({"key_service": SERVICE, "cache": {"ttl_s": 600}}, concurrency=1) as s:
        s.keyservice.add_key(key_hash("expiring"), {**RECORD, "expires_at": int(time.time()) + 2})
        assert get(s, "expiring").status == 200
        time.sleep(2.1)
        r = get(s, "expiring")
        assert (r.status, code_of(r)) == (401, "api_key_expired")
        assert lookups_of(s, "expiring") == 1


def test_a_stale_entry_is_used_while_the_key_service_fails(stack):
    stack.keyservice.add_key(key_hash("stale-ok"), RECORD)
    assert get(stack, "stale-ok").status == 200
    stack.keyservice.set_mode("status", status=500)
    time.sleep(1.1)
    stale_before = stack.stat("apikey_filter.cache.stale")
    r = get(stack, "stale-ok")
    assert r.status == 200
    assert ["x-api-key-id", "k_cache"] in r.json()["headers"]
    assert stack.stat("apikey_filter.cache.stale") - stale_before == 1
    assert lookups_of(stack, "stale-ok") == 2


@pytest.mark.parametrize(
    "mode, status",
    [("status", 500), ("status", 403), ("status", 200), ("hang", None), ("close", None), ("malformed", None)],
    ids=["500", "4xx", "200-not-a-record", "timeout", "connection-closed", "malformed-json"],
)
def test_each_key_service_failure_is_a_503_and_never_cached(stack, mode, status):
    raw = f"failing-{mode}-{status}"
    stack.keyservice.add_key(key_hash(raw), RECORD)
    stack.keyservice.set_mode(mode, status=status)
    errors_before = stack.stat("apikey_filter.key_service.error")
    r = get(stack, raw)
    assert (r.status, code_of(r)) == (503, "key_service_unavailable")
    assert r.header("content-type") == "application/json"
    assert stack.stat("apikey_filter.key_service.error") - errors_before == 1
    stack.keyservice.set_mode("normal")
    assert get(stack, raw).status == 200, "the failure must not have been cached"
    assert lookups_of(stack, raw) == 2


def test_an_unreachable_key_service_is_a_503(stack):
    stack.keyservice.add_key(key_hash("while-down"), RECORD)
    stack.stop_key_service()
    resets = stack.stat("apikey_filter.key_service.error.reset")
    try:
        r = get(stack, "while-down")
        assert (r.status, code_of(r)) == (503, "key_service_unavailable")
        assert stack.stat("apikey_filter.key_service.error.reset") == resets + 1
    finally:
        stack.start_key_service()
    assert get(stack, "while-down").status == 200


def test_requests_for_one_uncached_key_share_one_callout(stack):
    stack.keyservice.add_key(key_hash("popular"), RECORD)
    stack.keyservice.set_mode("normal", delay_ms=300)
    responses = stack.requests_concurrently(20, "GET", "/", headers=[("x-api-key", "popular")])
    assert [r.status for r in responses] == [200] * 20
    assert lookups_of(stack, "popular") == 1


def test_waiters_are_answered_when_the_client_that_caused_the_callout_leaves(stack):
    stack.keyservice.add_key(key_hash("abandoned"), RECORD)
    stack.keyservice.set_mode("normal", delay_ms=500)
    first = socket.create_connection(("127.0.0.1", stack.listen_port))
    first.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nx-api-key: abandoned\r\n\r\n")
    time.sleep(0.1)  # the callout is under way
    second = {}
    thread = threading.Thread(target=lambda: second.update(r=get(stack, "abandoned")))
    thread.start()
    time.sleep(0.1)
    first.close()  # the client whose request started the callout goes away
    thread.join(10)
    assert second["r"].status == 200
    assert lookups_of(stack, "abandoned") == 1


def test_the_callout_carries_only_the_hash_and_the_configured_headers():
    config = {
        "key_service": {
            "cluster": "key_service",
            "authority": "keys.internal",
            "path": "/v1/keys/{key_hash}",
            "headers": {"x-proxy-credential": "proxy-secret"},
        }
    }
    with Stack(config, concurrency=1) as s:
        s.keyservice.add_key(key_hash("callout-key-7f3a"), RECORD)
        assert get(s, "callout-key-7f3a").status == 200
        [lookup] = s.keyservice.lookups()["recent"]
        assert lookup["path"] == f"/v1/keys/{key_hash('callout-key-7f3a')}"
        headers = {name.lower(): value for name, value in lookup["headers"]}
        assert headers["host"] == "keys.internal"
        assert headers["x-proxy-credential"] == "proxy-secret"
        assert "callout-key-7f3a" not in repr(lookup)


def test_failure_mode_open_forwards_without_identity():
    config = {"key_service": SERVICE, "failure_mode": "open"}
    with Stack(config, concurrency=1) as s:
        s.keyservice.add_key(key_hash("open-key"), RECORD)
        s.keyservice.set_mode("status", status=500)
        r = get(s, "open-key", headers=[("x-api-key-id", "spoofed")])
        assert r.status == 200
        received = {name for name, _ in r.json()["headers"]}
        assert not received & {"x-api-key", "x-api-key-id", "x-api-key-owner", "x-api-key-scopes"}
        # Only failures open the gate: a verdict still closes it.
        s.keyservice.set_mode("normal")
        r = get(s, "unknown-while-open")
        assert (r.status, code_of(r)) == (401, "api_key_invalid")


def test_without_stale_if_error_a_failing_key_service_closes_the_gate():
    config = {"key_service": SERVICE, "cache": {"ttl_s": 1, "stale_if_error_s": 0}}
    with Stack(config, concurrency=1) as s:
        s.keyservice.add_key(key_hash("no-stale"), RECORD)
        assert get(s, "no-stale").status == 200
        s.keyservice.set_mode("status", status=500)
        time.sleep(1.1)
        assert code_of(get(s, "no-stale")) == "key_service_unavailable"


def test_with_ttls_of_zero_every_request_asks_the_key_service_and_is_answered():
    """Nothing is remembered, even moments after the previous answer for the same key
    (when the lookup lock still says "answered": the cache is checked, then asked anyway)."""
    config = {"key_service": SERVICE, "cache": {"ttl_s": 0, "negative_ttl_s": 0}}
    with Stack(config, keys={key_hash("zero-ttl-found"): RECORD}, concurrency=1) as s:
        assert [get(s, "zero-ttl-found").status for _ in range(3)] == [200] * 3
        assert [code_of(get(s, "zero-ttl-unknown")) for _ in range(3)] == ["api_key_invalid"] * 3
        assert (lookups_of(s, "zero-ttl-found"), lookups_of(s, "zero-ttl-unknown")) == (3, 3)


def test_a_small_cache_still_serves_valid_keys_after_a_flood_of_unknown_ones():
    config = {"key_service": SERVICE, "cache": {"max_entries": 4}}
    with Stack(config, concurrency=1) as s:
        s.keyservice.add_key(key_hash("survivor"), RECORD)
        assert get(s, "survivor").status == 200
        for i in range(40):
            assert code_of(get(s, f"random-{i}")) == "api_key_invalid"
        assert get(s, "survivor").status == 200


@pytest.mark.parametrize("mode, expected", [("normal", 200), ("unknown", 401), ("failing", 503)])
def test_a_burst_on_every_worker_thread_makes_one_callout_for_the_node(mode, expected):
    """Envoy with four worker threads: each sees the cold key, one asks, all are answered."""
    with Stack({"key_service": SERVICE, "rate_limit": None}, concurrency=4) as s:
        raw = f"node-wide-{mode}"
        if mode != "unknown":
            s.keyservice.add_key(key_hash(raw), RECORD)
        s.keyservice.set_mode("status" if mode == "failing" else "normal", status=500, delay_ms=200)
        responses = s.requests_concurrently(120, "GET", "/", headers=[("x-api-key", raw)])
        assert [r.status for r in responses] == [expected] * 120
        assert lookups_of(s, raw) == 1
        # A worker per thread in both builds: the others joined the one lookup.
        assert s.stat("apikey_filter.key_service.joined") >= 1, "the other workers waited on the lease"


def test_a_flood_of_unknown_keys_does_not_strip_valid_keys_of_their_cache():
    """Unknown keys never displace a found key that may still be used: after a flood,
    valid keys still ride out a key service outage on their stale entries."""
    config = {
        "key_service": SERVICE,
        "cache": {"ttl_s": 1, "stale_if_error_s": 120, "max_entries": 256},
        "rate_limit": None,
    }
    valid = [f"flood-valid-{i}" for i in range(20)]
    with Stack(config, keys={key_hash(k): RECORD for k in valid}, concurrency=2) as s:
        assert [get(s, k).status for k in valid] == [200] * 20
        for i in range(1000):
            assert get(s, f"flood-random-{i}").status == 401
        s.keyservice.set_mode("status", status=500)
        time.sleep(1.1)  # past ttl_s: only stale entries can answer now
        assert [get(s, k).status for k in valid] == [200] * 20
        assert s.stat("apikey_filter.cache.stale") == 20
