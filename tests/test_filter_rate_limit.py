"""Per-key token buckets shared by every worker thread (CONTRACT "Rate limiting" and the
429 row), against Envoy running several workers."""
import re
import time
from collections import Counter

import pytest

from testbed.harness import BUILD, Stack, key_hash

SERVICE = {"cluster": "key_service", "timeout_ms": 1000}
SLOW_REFILL = {"requests": 1, "period_s": 3600}


def record(key_id, rate_limit="absent"):
    r = {"key_id": key_id, "owner": "acme"}
    if rate_limit != "absent":
        r["rate_limit"] = rate_limit
    return r


def get(stack, raw_key):
    return stack.request("GET", "/", headers=[("x-api-key", raw_key)])


def ratelimit(response):
    """`RateLimit: "apikey";r=N;t=T` as (N, T)."""
    m = re.fullmatch(r'"apikey";r=(\d+);t=(\d+)', response.header("ratelimit") or "")
    assert m, response.headers
    return int(m[1]), int(m[2])


@pytest.fixture(scope="module")
def stack():
    config = {"key_service": SERVICE, "rate_limit": {"requests": 2, "period_s": 3600}}
    with Stack(config, concurrency=4) as s:
        yield s


def test_exactly_burst_of_many_concurrent_requests_pass(stack):
    stack.keyservice.add_key(key_hash("exact-key"), record("k_exact", {**SLOW_REFILL, "burst": 40}))
    responses = stack.requests_concurrently(300, "GET", "/", headers=[("x-api-key", "exact-key")])
    statuses = Counter(r.status for r in responses)
    assert statuses == {200: 40, 429: 260}
    assert stack.stat("apikey_filter.denied.rate_limit_exceeded") >= 260


def test_every_response_that_took_a_token_carries_the_ratelimit_fields(stack):
    stack.keyservice.add_key(key_hash("headers-key"), record("k_headers", {"requests": 10, "period_s": 60, "burst": 3}))
    first = get(stack, "headers-key")
    assert first.status == 200
    assert first.header("ratelimit-policy") == '"apikey";q=10;w=60'
    assert ratelimit(first) == (2, 6)  # one token used, back in 6 s
    assert ratelimit(get(stack, "headers-key"))[0] == 1
    assert ratelimit(get(stack, "headers-key"))[0] == 0


def test_an_empty_bucket_answers_429_with_retry_after(stack):
    stack.keyservice.add_key(key_hash("empty-key"), record("k_empty", {"requests": 1, "period_s": 30, "burst": 1}))
    assert get(stack, "empty-key").status == 200
    r = get(stack, "empty-key")
    assert r.status == 429
    assert r.header("content-type") == "application/json"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.header("retry-after")) <= 30
    assert r.header("ratelimit-policy") == '"apikey";q=1;w=30'
    remaining, full_in = ratelimit(r)
    assert remaining == 0 and 1 <= full_in <= 30
    assert r.header("www-authenticate") is None


def test_a_record_without_a_limit_gets_the_configured_default(stack):
    stack.keyservice.add_key(key_hash("default-key"), record("k_default"))
    statuses = [get(stack, "default-key").status for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert stack.request("GET", "/", headers=[("x-api-key", "default-key")]).header("ratelimit-policy") == (
        '"apikey";q=2;w=3600'
    )


def test_a_record_with_a_null_limit_is_not_limited(stack):
    stack.keyservice.add_key(key_hash("unlimited-key"), record("k_unlimited", None))
    responses = [get(stack, "unlimited-key") for _ in range(10)]
    assert [r.status for r in responses] == [200] * 10
    assert all(r.header("ratelimit") is None for r in responses)


def test_keys_sharing_a_key_id_share_a_bucket(stack):
    shared = record("k_shared", {**SLOW_REFILL, "burst": 2})
    stack.keyservice.add_key(key_hash("shared-a"), shared)
    stack.keyservice.add_key(key_hash("shared-b"), shared)
    assert [get(stack, k).status for k in ("shared-a", "shared-b", "shared-a")] == [200, 200, 429]


def test_a_denied_request_takes_no_token():
    config = {
        "key_service": SERVICE,
        "rate_limit": {**SLOW_REFILL, "burst": 1},
        "rules": [{"path_prefix": "/admin", "scopes": ["admin"]}],
    }
    with Stack(config, concurrency=1) as s:
        s.keyservice.add_key(key_hash("scoped-key"), record("k_scoped"))
        assert s.request("GET", "/admin", headers=[("x-api-key", "scoped-key")]).status == 403
        assert s.request("GET", "/admin", headers=[("x-api-key", "scoped-key")]).status == 403
        assert get(s, "scoped-key").status == 200


def test_refill_follows_the_rate():
    """Ten tokens a second, burst 1, hammered for two seconds: the count of passes is
    what the rate allows over the window the requests really spanned, within one."""
    config = {"key_service": SERVICE, "rate_limit": {"requests": 10, "period_s": 1, "burst": 1}}
    with Stack(config, concurrency=2) as s:
        s.keyservice.add_key(key_hash("refill-key"), record("k_refill"))
        get(s, "refill-key")  # fill the cache; empties the bucket
        allowed, sent = 0, []
        end = time.monotonic() + 2.0
        while time.monotonic() < end:
            before = time.monotonic()
            r = get(s, "refill-key")
            sent.append((before, time.monotonic()))
            allowed += r.status == 200
        shortest = sent[-1][0] - sent[0][1]
        longest = sent[-1][1] - sent[0][0]
        assert int(10 * shortest) - 1 <= allowed <= int(10 * longest) + 1, (allowed, shortest, longest)


def test_a_changed_limit_applies_after_the_cache_refresh_without_a_fresh_bucket():
    config = {"key_service": SERVICE, "cache": {"ttl_s": 1}}
    with Stack(config, concurrency=2) as s:
        s.keyservice.add_key(key_hash("changing-key"), record("k_changing", {**SLOW_REFILL, "burst": 5}))
        for expected_left in (4, 3, 2):
            assert ratelimit(get(s, "changing-key"))[0] == expected_left
        s.keyservice.add_key(key_hash("changing-key"), record("k_changing", {"requests": 2, "period_s": 3600, "burst": 50}))
        time.sleep(1.1)
        r = get(s, "changing-key")
        assert r.header("ratelimit-policy") == '"apikey";q=2;w=3600'
        assert ratelimit(r)[0] == 1, "two tokens were left; the new limit must not refill the bucket"


def test_a_pushed_default_limit_applies_at_once_to_keys_already_cached():
    # Workers keep their own copies of found keys, with the default limit worked out:
    # a new configuration must not be answered with the old one's.
    config = {"key_service": SERVICE, "cache": {"ttl_s": 600}, "rate_limit": {**SLOW_REFILL, "burst": 10}}
    with Stack(config, concurrency=1, lds=True) as s:
        s.keyservice.add_key(key_hash("cached-key"), record("k_cached"))
        for _ in range(3):
            assert get(s, "cached-key").header("ratelimit-policy") == '"apikey";q=1;w=3600'
        s.push_listener({**config, "rate_limit": {"requests": 7, "period_s": 60, "burst": 10}})
        r = get(s, "cached-key")
        assert r.header("ratelimit-policy") == '"apikey";q=7;w=60'
        assert s.keyservice.lookups()["by_hash"].get(key_hash("cached-key")) == 1, "the key came from the cache"
        s.push_listener({**config, "rate_limit": None})
        assert get(s, "cached-key").header("ratelimit-policy") is None


def test_no_rate_limit_configured_means_no_bucket():
    with Stack({"key_service": SERVICE, "rate_limit": None}, concurrency=1) as s:
        s.keyservice.add_key(key_hash("free-key"), record("k_free"))
        responses = [get(s, "free-key") for _ in range(5)]
        assert [r.status for r in responses] == [200] * 5
        assert responses[-1].header("ratelimit-policy") is None


def with_custom_section(wasm, out):
    """A copy of the .wasm with a custom section appended: the same filter, but bytes
    Envoy has not seen, so it must start new VMs for it."""
    def leb128(n):
        out_bytes = bytearray()
        while True:
            byte, n = n & 0x7F, n >> 7
            out_bytes.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out_bytes)
    name, payload = b"apikey-test", str(time.time()).encode()
    body = leb128(len(name)) + name + payload
    out.write_bytes(wasm.read_bytes() + b"\x00" + leb128(len(body)) + body)
    return out


def test_pushing_a_new_configuration_or_new_code_keeps_running_buckets():
    from testbed.harness import WASM_PATH

    config = {"key_service": SERVICE, "rate_limit": {**SLOW_REFILL, "burst": 10}}
    with Stack(config, concurrency=2, lds=True) as s:
        s.keyservice.add_key(key_hash("steady-key"), record("k_steady"))
        for expected_left in (9, 8, 7):
            assert ratelimit(get(s, "steady-key"))[0] == expected_left

        s.push_listener({**config, "identity_headers": {"owner": "x-tenant"}})
        r = get(s, "steady-key")
        assert ["x-tenant", "acme"] in r.json()["headers"], "the new configuration is in force"
        assert ratelimit(r)[0] == 6

        if BUILD == "module":
            return  # Envoy keeps a loaded module until it restarts: new code needs a restart
        vms_created = s.stat("wasm.envoy.wasm.runtime.v8.created")
        s.push_listener(config, wasm_path=with_custom_section(WASM_PATH, s.tmp / "rebuilt.wasm"))
        assert s.stat("wasm.envoy.wasm.runtime.v8.created") > vms_created, "new code runs in new VMs"
        assert ratelimit(get(s, "steady-key"))[0] == 5
