"""Keys that prove their shape (`key_format`, CONTRACT "Key format") and keys bound to where they
may be used (`allowed_cidrs`, `allowed_referrers`), against a real Envoy."""
import random
import sys

import pytest

from testbed.harness import BASE62, ROOT, Stack, key_hash, with_checksum

from testbed.keyformat import new_key

SERVICE = {"cluster": "key_service", "timeout_ms": 1000}
SPEC_EXAMPLE = "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"


def code(response):
    return None if response.status == 200 else response.json()["error"]["code"]


def send(stack, key, headers=(), source=None, path="/"):
    return stack.request("GET", path, headers=[("x-api-key", key), *headers], source=source)


def lookups(stack):
    return stack.keyservice.lookups()["total"]


def test_keys_in_format_are_looked_up_and_others_refused_without_a_lookup():
    minted = new_key("ghp_")
    made_here = with_checksum("ghp_", "".join(random.choice(BASE62) for _ in range(30)))
    keys = {key_hash(k): {"key_id": f"k{i}"} for i, k in enumerate([SPEC_EXAMPLE, minted, made_here])}
    config = {"key_service": SERVICE, "key_format": {"prefixes": ["sk_live_", "ghp_"], "checksum": "crc32"}}
    with Stack(config, keys=keys, concurrency=2) as s:
        assert with_checksum("ghp_", "zQWBuTSOoRi4A9spHcVY5ncnsDkxkJ") == SPEC_EXAMPLE
        for key in (SPEC_EXAMPLE, minted, made_here):
            assert send(s, key).status == 200, key
        assert lookups(s) == 3
        wrong = [SPEC_EXAMPLE[:-1] + "8", "gho_" + SPEC_EXAMPLE[4:], SPEC_EXAMPLE.replace("Q", "-"),
                 "ghp_0mLq17", "ghp_"]
        for key in wrong:
            assert code(send(s, key)) == "api_key_invalid", key
        assert lookups(s) == 3, "none of them asked for"


def test_a_flood_of_random_keys_in_the_right_shape_makes_no_lookup():
    config = {"key_service": SERVICE, "key_format": {"prefixes": ["ghp_"], "checksum": "crc32"}}
    with Stack(config, concurrency=2) as s:
        rng = random.Random(7)
        for _ in range(300):
            key = "ghp_" + "".join(rng.choice(BASE62) for _ in range(36))
            if key == with_checksum("ghp_", key[4:-6]):
                continue  # one in 62^6: a real key
            assert code(send(s, key)) == "api_key_invalid"
        assert lookups(s) == 0


def test_a_key_out_of_format_counts_against_the_brute_force_budget():
    config = {"key_service": SERVICE, "key_format": {"prefixes": ["ghp_"], "checksum": "crc32"},
              "brute_force": {"max_failures": 3, "period_s": 3600}}
    with Stack(config, concurrency=2) as s:
        for _ in range(3):
            assert code(send(s, SPEC_EXAMPLE[:-1] + "8", source="127.0.0.7")) == "api_key_invalid"
        assert code(send(s, SPEC_EXAMPLE, source="127.0.0.7")) == "too_many_failed_attempts"
        assert lookups(s) == 0


BOUND = {
    "bound-ipv4": {"key_id": "k4", "allowed_cidrs": ["127.0.0.2", "10.0.0.0/8"],
                   "rate_limit": {"requests": 1, "period_s": 3600}},
    "bound-ipv6": {"key_id": "k6", "allowed_cidrs": ["::1/128"]},
    "bound-ipv6-elsewhere": {"key_id": "k6x", "allowed_cidrs": ["2001:db8::/32", "127.0.0.1"]},
    "bound-site": {"key_id": "ks", "allowed_referrers": ["https://app.example.com/*"]},
    "bound-subdomains": {"key_id": "kw", "allowed_referrers": ["*.example.com"]},
}


@pytest.fixture(scope="module")
def stack():
    keys = {key_hash(raw): record for raw, record in BOUND.items()}
    config = {"key_service": SERVICE, "brute_force": {"max_failures": 1000, "period_s": 60}}
    with Stack(config, keys=keys, concurrency=2) as s:
        yield s


def test_a_key_bound_to_addresses_is_refused_from_others_before_taking_a_token(stack):
    for _ in range(3):
        assert code(send(stack, "bound-ipv4", source="127.0.0.3")) == "address_not_allowed"
    # The shipped config believes the peer, not a forged X-Forwarded-For.
    forged = [("x-forwarded-for", "127.0.0.2")]
    assert code(send(stack, "bound-ipv4", headers=forged, source="127.0.0.3")) == "address_not_allowed"
    assert code(send(stack, "bound-ipv4", source="127.0.0.2")) is None, "its one token was not spent"
    assert code(send(stack, "bound-ipv4", source="127.0.0.2")) == "rate_limit_exceeded"


def test_a_key_bound_to_referrers(stack):
    def from_page(key, **headers):
        return code(send(stack, key, headers=[(k.replace("_", "-"), v) for k, v in headers.items()]))

    assert from_page("bound-site", referer="https://app.example.com/orders?x=1") is None
    assert from_page("bound-site", origin="https://app.example.com") is None, "Origin without Referer"
    assert from_page("bound-site", referer="HTTPS://APP.Example.COM/x") is None, "case-changed host"
    # A Referer may not hold userinfo (RFC 9110): Envoy drops such a header before any
    # filter runs, so it is as if there were none. (The filter would read the host after
    # the "@" in either case.)
    assert from_page("bound-site", referer="https://app.example.com@evil.test/") == "referrer_not_allowed"
    assert from_page("bound-site", referer="https://evil.test@app.example.com/") == "referrer_not_allowed"
    assert from_page("bound-site", referer="https://app.example.com:8443/") == "referrer_not_allowed"
    assert from_page("bound-site", referer="http://app.example.com/") == "referrer_not_allowed"
    assert from_page("bound-site", referer="https://evil.test/", origin="https://app.example.com") \
        == "referrer_not_allowed", "the Referer, when there is one"
    assert from_page("bound-site") == "referrer_not_allowed", "neither header"
    assert from_page("bound-subdomains", referer="https://shop.example.com/") is None
    assert from_page("bound-subdomains", referer="https://example.com/") == "referrer_not_allowed", \
        "not the bare domain"


def test_refusals_by_restriction_are_counted(stack):
    stats = stack.filter_stats()
    assert stats["denied.address_not_allowed"] >= 1
    assert stats["denied.referrer_not_allowed"] >= 1


def test_a_record_with_a_restriction_that_does_not_parse_is_a_key_service_failure():
    keys = {key_hash("bound-broken"): {"key_id": "kb", "allowed_referrers": ["https://*.*/"]}}
    with Stack({"key_service": SERVICE}, keys=keys, concurrency=1) as s:
        assert code(send(s, "bound-broken")) == "key_service_unavailable"
        assert s.filter_stats()["key_service.error.bad_record"] == 1


def test_ipv6_clients():
    keys = {key_hash(raw): record for raw, record in BOUND.items()}
    with Stack({"key_service": SERVICE}, keys=keys, concurrency=2, listen_address="::1") as s:
        assert code(send(s, "bound-ipv6")) is None
        assert code(send(s, "bound-ipv6-elsewhere")) == "address_not_allowed"
        assert code(send(s, "bound-ipv4")) == "address_not_allowed", "an IPv4 network, an IPv6 client"
