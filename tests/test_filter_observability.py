"""What operators see (CONTRACT "Observability"): stats that count exactly what happened,
an access log that says who called, and log lines that name keys only by fingerprint."""
import time

import pytest

from testbed.harness import Stack, key_hash

SERVICE = {"cluster": "key_service", "timeout_ms": 1000}
KEYS = {
    key_hash("obs-valid-6d1c"): {"key_id": "k_obs", "owner": "acme", "scopes": ["read"]},
    key_hash("obs-revoked"): {"key_id": "k_rev", "revoked": True},
    key_hash("obs-limited"): {"key_id": "k_lim", "rate_limit": {"requests": 1, "period_s": 3600, "burst": 1}},
}


def fingerprint(raw):
    return key_hash(raw)[:12]


CONFIG = {"key_service": SERVICE, "rules": [{"path_prefix": "/admin", "scopes": ["admin"]}]}


@pytest.fixture(scope="module")
def stack():
    with Stack(CONFIG, keys=KEYS, concurrency=2) as s:
        yield s


def filter_stats(stack):
    return stack.filter_stats(nonzero=True)


def send(stack, key=None, path="/"):
    return stack.request("GET", path, headers=[("x-api-key", key)] if key else [])


def test_stats_count_a_known_mix_of_requests_exactly():
    # An Envoy of its own: what other tests send cannot show in the counts.
    with Stack(CONFIG, keys=KEYS, concurrency=2) as stack:
        count_a_known_mix_of_requests(stack)


def count_a_known_mix_of_requests(stack):
    for _ in range(3):
        assert send(stack, "obs-valid-6d1c").status == 200
    assert send(stack, "obs-valid-6d1c", "/admin").status == 403
    for _ in range(2):
        assert send(stack, "obs-unknown").status == 401
    assert send(stack).status == 401
    assert send(stack, "obs-revoked").status == 401
    assert [send(stack, "obs-limited").status for _ in range(2)] == [200, 429]
    stack.keyservice.set_mode("status", status=500)
    assert send(stack, "obs-while-failing").status == 503
    stack.keyservice.set_mode("hang")
    assert send(stack, "obs-while-hanging").status == 503
    stack.keyservice.set_mode("normal")

    assert filter_stats(stack) == {
        "allowed": 4,
        "denied.permission_denied": 1,
        "denied.api_key_invalid": 2,
        "denied.api_key_missing": 1,
        "denied.api_key_revoked": 1,
        "denied.rate_limit_exceeded": 1,
        "denied.key_service_unavailable": 2,
        "cache.miss": 6,  # valid, unknown, revoked, limited, failing, hanging
        "cache.hit": 4,  # valid x3 after the first (one is the 403), limited once
        "cache.negative_hit": 1,
        "key_service.found": 3,
        "key_service.not_found": 1,
        "key_service.error": 2,
        "key_service.error.status": 1,
        "key_service.error.timeout": 1,
    }


def test_the_access_log_says_who_called_and_never_holds_the_key(stack):
    assert send(stack, "obs-valid-6d1c", "/whoami").status == 200
    assert send(stack, "obs-valid-6d1c", "/admin/whoami").status == 403
    assert send(stack, "obs-unknown-2", "/whoami").status == 401
    stack.wait_for("access", fingerprint("obs-unknown-2"))
    lines = [line for line in stack.access_log().splitlines() if "/whoami" in line]
    # An accepted key is named by the identity headers the filter set; a refused one
    # by its fingerprint too, and by its identity when it is known.
    allowed = next(line for line in lines if '" 200 ' in line)
    assert allowed.endswith(" key_id=k_obs owner=acme key=-"), allowed
    refused = next(line for line in lines if '" 403 ' in line)
    assert f"key_id=k_obs owner=acme key={fingerprint('obs-valid-6d1c')}" in refused
    denied = next(line for line in lines if '" 401 ' in line)
    assert f"key_id=- owner=- key={fingerprint('obs-unknown-2')}" in denied
    log = stack.access_log()
    for raw in ("obs-valid-6d1c", "obs-unknown-2"):
        assert raw not in log
        assert key_hash(raw) not in log, "only the fingerprint, never the whole hash"


def test_the_configuration_is_logged_once_and_failures_are_warned_sparingly():
    with Stack({"key_service": SERVICE}, concurrency=2) as s:
        s.keyservice.set_mode("status", status=500)
        for i in range(5):
            assert send(s, f"obs-outage-{i}").status == 503
        time.sleep(0.2)
        log = s.envoy_log()
        assert log.count("apikey-filter 0.1.0 configured:") == 1
        warnings = [line for line in log.splitlines() if "key service lookup for key" in line]
        # One per worker thread at most in the first ten seconds, not one per failure.
        assert 1 <= len(warnings) <= 2, warnings
        assert fingerprint("obs-outage-0") in log or fingerprint("obs-outage-1") in log
        assert "answered HTTP 500" in warnings[0]
        assert not any(f"obs-outage-{i}" in log for i in range(5))


def test_a_callout_envoy_refuses_to_send_is_counted_and_answered():
    # A cluster Envoy does not have: the callout is never sent.
    with Stack({"key_service": {"cluster": "no_such_cluster"}}, keys=KEYS, concurrency=1) as s:
        r = send(s, "obs-valid-6d1c")
        assert r.status == 503 and r.json()["error"]["code"] == "key_service_unavailable"
        stats = filter_stats(s)
        assert stats.get("key_service.error") == 1, stats
        assert stats.get("key_service.error.not_sent") == 1, stats
        assert s.keyservice.lookups()["total"] == 0
        s.wait_for("envoy", "could not be sent (does the cluster exist?)")


def test_callout_latency_is_recorded_in_the_histogram():
    with Stack({"key_service": SERVICE}, keys=KEYS, concurrency=1) as s:
        s.keyservice.set_mode("normal", delay_ms=50)
        assert send(s, "obs-valid-6d1c").status == 200
        time.sleep(5.5)  # Envoy shows histograms after its stats flush, every 5 s
        [line] = [l for l in s.admin("/stats?filter=key_service.latency_ms").text.splitlines() if l]
        p50 = float(line.split("P50(")[1].split(",")[0])
        assert p50 >= 50, line


STATS_TAGS = r"""stats_config:
  stats_tags:
  - tag_name: key_id
    regex: '^wasmcustom\.apikey_filter\.key\.((.+?)\.)(?:allowed|denied)$'
"""


def test_per_key_stats_count_the_first_keys_of_the_node_and_the_rest_together():
    keys = {key_hash(f"obs-per-key-{i}"): {"key_id": f"k.{i}"} for i in range(4)}
    config = {"key_service": SERVICE, "per_key_stats": {"max_keys": 2},
              "rules": [{"path_prefix": "/admin", "scopes": ["admin"]}]}
    with Stack(config, keys=keys, concurrency=2, bootstrap_extra=STATS_TAGS) as s:
        for i in range(4):
            for _ in range(3):
                assert send(s, f"obs-per-key-{i}").status == 200
        assert send(s, "obs-per-key-0", "/admin").status == 403
        assert send(s, "obs-unknown-per-key").status == 401
        prometheus = s.admin("/stats/prometheus").text
        counts = {}
        for line in prometheus.splitlines():
            if line.startswith(("apikey_filter_key_allowed", "apikey_filter_key_denied")):
                name, value = line.rsplit(" ", 1)
                counts[name] = int(float(value))
        assert counts == {
            'apikey_filter_key_allowed{key_id="k_0"}': 3,
            'apikey_filter_key_denied{key_id="k_0"}': 1,
            'apikey_filter_key_allowed{key_id="k_1"}': 3,
            'apikey_filter_key_denied{key_id="k_1"}': 0,
            'apikey_filter_key_allowed{key_id="other"}': 6,
            'apikey_filter_key_denied{key_id="other"}': 0,
        }, prometheus
