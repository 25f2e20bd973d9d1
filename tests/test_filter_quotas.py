"""Quotas across Envoy nodes (CONTRACT "Quotas"): two Envoy processes, two workers each, on
one real RLS server (rls-server: Limitador's counting, in memory), in both modes and both
failure modes, and what the filter does with bad, slow or missing answers."""
import contextlib
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from testbed.harness import Stack, key_hash
from testbed.rls_client import DAY, RlsClient, descriptor
from testbed.rls_service import RlsService

KEY_SERVICE = {"cluster": "key_service", "timeout_ms": 1000}


def rls_config(**overrides):
    return {"key_service": KEY_SERVICE, "rate_limit": None,
            "rate_limit_service": {"cluster": "ratelimit", "timeout_ms": 500, **overrides}}


def record(key_id, quotas, owner="acme"):
    return {"key_id": key_id, "owner": owner, "quotas": quotas}


@contextlib.contextmanager
def nodes(rls, config, keys, count=2):
    """`count` Envoy nodes (processes) with the filter, each with `--concurrency 2`, on
    `rls`, each with its own key service holding `keys` ({raw: record})."""
    by_hash = {key_hash(raw): rec for raw, rec in keys.items()}
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(Stack(config, keys=by_hash, concurrency=2, rls_port=rls.grpc_port))
               for _ in range(count)]


def spread(envoys, raw_keys, n, workers=12):
    """n requests spread over the nodes and keys in turn, `workers` at a time."""
    def one(i):
        envoy = envoys[i % len(envoys)]
        raw = raw_keys[i % len(raw_keys)]
        return envoy.request("GET", "/", headers=[("x-api-key", raw)])
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(n)))


def codes(responses):
    return Counter(r.status if r.status == 200 else f"{r.status} {r.json()['error']['code']}" for r in responses)


def rls_calls(envoy):
    return sum(envoy.stat(f"apikey_filter.rate_limit_service.{s}") for s in ("ok", "over_limit", "error"))


def wait_until(what, timeout=10):
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def rls():
    with RlsService() as service:
        yield service


def test_exact_mode_passes_exactly_n_across_two_nodes_per_key_and_per_owner(rls):
    keys = {
        "exact-key": record("k_exact", [{"requests": 30, "unit": "hour"}]),
        "team-a": record("k_team_a", [{"requests": 20, "unit": "hour", "per": "owner"}], owner="team"),
        "team-b": record("k_team_b", [{"requests": 20, "unit": "hour", "per": "owner"}], owner="team"),
    }
    with nodes(rls, rls_config(sync_interval_ms=0), keys) as envoys:
        assert codes(spread(envoys, ["exact-key"], 80)) == {200: 30, "429 quota_exceeded": 50}
        # Two keys of one owner share its quota.
        assert codes(spread(envoys, ["team-a", "team-b"], 60)) == {200: 20, "429 quota_exceeded": 40}
        for envoy in envoys:
            assert envoy.stat("apikey_filter.quota.allowance") == 0, "every request asked"
            assert envoy.stat("apikey_filter.rate_limit_service.ok") >= 1


def test_a_counted_response_carries_the_quota_fields_and_a_429_retry_after(rls):
    keys = {"fields-key": record("k_fields", [{"requests": 2, "unit": "day"}])}
    with nodes(rls, rls_config(sync_interval_ms=0), keys, count=1) as (envoy,):
        first = envoy.request("GET", "/", headers=[("x-api-key", "fields-key")])
        assert first.status == 200
        assert first.header("ratelimit-policy") == '"key-day";q=2;w=86400'
        m = re.fullmatch(r'"key-day";r=(\d+);t=(\d+)', first.header("ratelimit"))
        assert m and int(m[1]) == 1 and 0 < int(m[2]) <= 86400, first.header("ratelimit")
        envoy.request("GET", "/", headers=[("x-api-key", "fields-key")])
        spent = envoy.request("GET", "/", headers=[("x-api-key", "fields-key")])
        assert (spent.status, spent.json()["error"]["code"]) == (429, "quota_exceeded")
        assert 0 < int(spent.header("retry-after")) <= 86400
        # The key reaches the upstream only as its identity; the service sees no key.
        assert all("fields-key" not in str(r) for r in envoy.upstream.requests())


def test_batched_mode_stays_within_the_bound_and_loses_no_count(rls):
    n = 200
    keys = {"batch-key": record("k_batch", [{"requests": n, "unit": "hour"}])}
    hits_before = rls.calls()["hits"]
    with nodes(rls, rls_config(), keys) as envoys:
        passed = codes(spread(envoys, ["batch-key"], 3 * n, workers=6))[200]
        # At most N plus the allowances outstanding: each node holds at most a tenth of
        # what is left (docs/limits.md "Quotas").
        assert n <= passed <= n + 2 * (n // 10), passed
        assert sum(e.stat("apikey_filter.quota.allowance") for e in envoys) > 0
        # Every admitted request reaches the service's count, reported by the nodes.
        wait_until(lambda: rls.calls()["hits"] - hits_before >= passed)
        assert rls.calls()["hits"] - hits_before >= passed


def test_batched_mode_calls_at_most_once_per_key_per_interval_in_steady_use(rls):
    keys = {"steady-key": record("k_steady", [{"requests": 1_000_000, "unit": "day"}])}
    with nodes(rls, rls_config(sync_interval_ms=1000), keys) as envoys:
        def traffic(seconds):
            end = time.monotonic() + seconds
            sent = 0
            while time.monotonic() < end:
                spread(envoys, ["steady-key"], 20, workers=4)
                sent += 20
            return sent
        traffic(2)  # the allowance grows to the nodes' traffic
        before = [rls_calls(e) for e in envoys]
        sent = traffic(3)
        after = [rls_calls(e) for e in envoys]
        for b, a in zip(before, after):
            # Three intervals, plus one for where the ticks fall.
            assert a - b <= 4, (before, after, sent)
        assert sent > 100


def test_failure_open_admits_and_reports_once_the_service_is_back(rls):
    keys = {"open-key": record("k_open", [{"requests": 1000, "unit": "day"}])}
    hits_before = rls.calls()["hits"]
    with nodes(rls, rls_config(failure_mode="open"), keys, count=1) as (envoy,):
        assert envoy.request("GET", "/", headers=[("x-api-key", "open-key")]).status == 200
        rls.set_mode("grpc-error")  # failing, its counts kept
        try:
            # More than the node's allowance: the rest are admitted as the service fails.
            got = codes(spread([envoy], ["open-key"], 60, workers=4))
        finally:
            rls.set_mode("normal")
        assert got == {200: 60}
        assert envoy.stat("apikey_filter.rate_limit_service.error") >= 1
        assert envoy.stat("apikey_filter.quota.failure_open") >= 1
        # Nothing is lost from the day's count: the 60 arrive once the service is back,
        # and the service's own count says 61.
        wait_until(lambda: rls.calls()["hits"] - hits_before >= 61, timeout=15)
        client = RlsClient(rls.grpc_port)
        try:
            probe = client(descriptor(("key_id", "k_open"), ("window", "day"), limit=(1000, DAY)), hits=1)
        finally:
            client.close()
        assert probe["statuses"][0]["remaining"] == 1000 - 61 - 1


def test_failure_closed_answers_503_and_a_slow_service_never_holds_a_request(rls):
    keys = {"closed-key": record("k_closed", [{"requests": 1000, "unit": "day"}])}
    config = rls_config(failure_mode="closed", sync_interval_ms=0, timeout_ms=100)
    with nodes(rls, config, keys, count=1) as (envoy,):
        rls.set_mode("slow", ms=2000)
        try:
            started = time.monotonic()
            slow = envoy.request("GET", "/", headers=[("x-api-key", "closed-key")])
            held = time.monotonic() - started
        finally:
            rls.set_mode("normal")
        assert (slow.status, slow.json()["error"]["code"]) == (503, "rate_limit_service_unavailable")
        assert held < 1.0, held  # timeout_ms is 100; the service answers after 2 s
        assert envoy.stat("apikey_filter.rate_limit_service.error.timeout") == 1
        time.sleep(1.1)  # the failure pause
        rls.stop_server()
        try:
            down = envoy.request("GET", "/", headers=[("x-api-key", "closed-key")])
        finally:
            rls.start_server()
        assert (down.status, down.json()["error"]["code"]) == (503, "rate_limit_service_unavailable")
        assert envoy.stat("apikey_filter.rate_limit_service.error.grpc_status") == 1


@pytest.mark.parametrize("mode,kind", [("garbage", "bad_answer"), ("grpc-error", "grpc_status")])
def test_a_bad_answer_is_classified_and_counted(rls, mode, kind):
    keys = {"bad-key": record("k_bad", [{"requests": 1000, "unit": "day"}])}
    with nodes(rls, rls_config(failure_mode="closed", sync_interval_ms=0), keys, count=1) as (envoy,):
        rls.set_mode(mode)
        try:
            r = envoy.request("GET", "/", headers=[("x-api-key", "bad-key")])
        finally:
            rls.set_mode("normal")
        assert (r.status, r.json()["error"]["code"]) == (503, "rate_limit_service_unavailable")
        assert envoy.stat(f"apikey_filter.rate_limit_service.error.{kind}") == 1


def test_without_statuses_as_limitador_answers_the_quota_still_holds():
    n = 50
    keys = {"plain-key": record("k_plain", [{"requests": n, "unit": "hour"}])}
    with RlsService(statuses=False) as limitador, nodes(limitador, rls_config(), keys) as envoys:
        responses = spread(envoys, ["plain-key"], 3 * n, workers=6)
        passed = codes(responses)[200]
        # Each node's allowance is at most a tenth of the quota without statuses.
        assert n <= passed <= n + 2 * (n // 10), passed
        # Nothing is known of the window: the quota item says what the quota grants.
        admitted = [r.header("ratelimit") or "" for r in responses if r.status == 200]
        assert all(re.fullmatch(rf'"key-hour";r={n};t=\d+', h) for h in admitted), admitted[:3]


def test_an_owners_quota_of_keys_without_an_owner_counts_each_key_alone(rls):
    quota = [{"requests": 5, "unit": "hour", "per": "owner"}]
    keys = {"lone-a": record("k_lone_a", quota, owner=""), "lone-b": record("k_lone_b", quota, owner="")}
    with nodes(rls, rls_config(sync_interval_ms=0), keys, count=1) as envoys:
        assert codes(spread(envoys, ["lone-a"], 8)) == {200: 5, "429 quota_exceeded": 3}
        assert codes(spread(envoys, ["lone-b"], 8)) == {200: 5, "429 quota_exceeded": 3}, \
            "not one counter for every key without an owner"


def test_quota_fields_without_a_bucket_while_nothing_is_known_of_the_window(rls):
    keys = {"unknown-window": record("k_unknown_window", [{"requests": 50, "unit": "day"}])}
    config = rls_config(sync_interval_ms=0, failure_mode="open")
    with nodes(rls, config, keys, count=1) as (envoy,):
        rls.stop_server()
        try:
            r = envoy.request("GET", "/", headers=[("x-api-key", "unknown-window")])
        finally:
            rls.start_server()
        assert r.status == 200
        assert r.header("ratelimit-policy") == '"key-day";q=50;w=86400'
        m = re.fullmatch(r'"key-day";r=50;t=(\d+)', r.header("ratelimit") or "")
        assert m and 0 < int(m[1]) <= 86400, r.header("ratelimit")
