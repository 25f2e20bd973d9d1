"""Keys across a fleet (CONTRACT "Change feed", "Cache"): the key service's change feed makes a
node forget changed keys within an interval, refresh ahead keeps keys in use from ever
waiting on the key service, and a failing key service is not asked in a storm. Against a
real Envoy running four worker threads."""
import time

import pytest

from testbed.harness import Stack, key_hash

INTERVAL_MS = 200
FEED = {"interval_ms": INTERVAL_MS, "ttl_s": 3600}
HOUR = {"ttl_s": 3600, "negative_ttl_s": 3600, "refresh_ahead_pct": 0}


def feed_config(cache=HOUR, **extra):
    return {"key_service": {"cluster": "key_service", "timeout_ms": 1000, "changes": FEED},
            "cache": cache, **extra}


def filter_stats(stack):
    return stack.filter_stats()


def send(stack, key, path="/"):
    return stack.request("GET", path, headers=[("x-api-key", key)])


def code(response):
    return response.json()["error"]["code"] if response.status != 200 else None


def wait_until(condition, what, timeout=5):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def wait_for_polls(stack, n=2):
    """Until the node has polled n more times: whatever was changed before is seen."""
    target = stack.keyservice.polls() + n
    wait_until(lambda: stack.keyservice.polls() >= target, f"{n} more polls")


def lookups_of(stack, raw):
    return stack.keyservice.lookups()["by_hash"].get(key_hash(raw), 0)


def all_of(stack, raw, n=16, path="/"):
    """The statuses (or codes) of n requests for raw, over every worker thread."""
    return {code(send(stack, raw, path)) for _ in range(n)}


RECORDS = {
    "feed-revoked": {"key_id": "k_rev"},
    "feed-expiring": {"key_id": "k_exp"},
    "feed-scoped": {"key_id": "k_scope", "scopes": ["read"]},
}


def test_changes_reach_every_worker_within_an_interval_with_hour_long_ttls():
    keys = {key_hash(raw): record for raw, record in RECORDS.items()}
    config = feed_config(rules=[{"path_prefix": "/admin", "scopes": ["admin"]}])
    with Stack(config, keys=keys, concurrency=4) as s:
        for raw in RECORDS:
            assert all_of(s, raw) == {None}, raw
        assert all_of(s, "feed-new") == {"api_key_invalid"}
        assert all_of(s, "feed-scoped", path="/admin") == {"permission_denied"}
        wait_for_polls(s)
        before = {raw: lookups_of(s, raw) for raw in [*RECORDS, "feed-new"]}

        s.keyservice.revoke(key_hash("feed-revoked"))
        s.keyservice.expire(key_hash("feed-expiring"))
        s.keyservice.add_key(key_hash("feed-scoped"), {"key_id": "k_scope", "scopes": ["read", "admin"]})
        s.keyservice.add_key(key_hash("feed-new"), {"key_id": "k_new"})
        wait_for_polls(s)

        assert all_of(s, "feed-revoked") == {"api_key_revoked"}
        assert all_of(s, "feed-expiring") == {"api_key_expired"}
        assert all_of(s, "feed-scoped", path="/admin") == {None}
        assert all_of(s, "feed-new") == {None}
        after = {raw: lookups_of(s, raw) for raw in before}
        assert after == {raw: n + 1 for raw, n in before.items()}, "each changed key fetched once by the node"
        assert filter_stats(s)["key_service.changes.forgotten"] == 4


def test_one_poll_per_interval_for_the_whole_node():
    with Stack(feed_config(), concurrency=4) as s:
        wait_for_polls(s, 1)
        first = s.keyservice.polls()
        time.sleep(3)
        polls = s.keyservice.polls() - first
        # Four workers each polling would make ~60 in 3 s; the node makes ~15.
        assert 3000 / INTERVAL_MS - 5 <= polls <= 3000 / INTERVAL_MS + 3, polls
        paths = [p["path"] for p in s.keyservice.lookups()["changes"]["recent"]]
        assert paths[0] == "/v1/key-changes" and all("?after=c-" in p for p in paths[1:]), paths[:3]


def test_a_410_makes_the_node_fetch_every_cached_key_once_more():
    keys = {key_hash(f"feed-gone-{i}"): {"key_id": f"k{i}"} for i in range(5)}
    with Stack(feed_config(), keys=keys, concurrency=4) as s:
        for i in range(5):
            assert all_of(s, f"feed-gone-{i}", n=4) == {None}
        wait_for_polls(s)
        before = s.keyservice.lookups()["total"]
        s.keyservice.set_changes_mode("gone")
        wait_until(lambda: filter_stats(s).get("key_service.changes.reset", 0) >= 1, "a reset")
        s.keyservice.set_changes_mode("normal")
        wait_for_polls(s)
        for i in range(5):
            assert all_of(s, f"feed-gone-{i}", n=8) == {None}
        assert s.keyservice.lookups()["total"] - before == 5


def test_a_node_forgets_what_it_cached_before_its_first_cursor():
    """A change made while the node has no cursor (its feed failing since a 410) is never
    listed to it: its first cursor makes it forget what it cached before."""
    with Stack(feed_config(), keys={key_hash("feed-first"): {"key_id": "k_first"}}, concurrency=2) as s:
        wait_for_polls(s)
        s.keyservice.set_changes_mode("gone")  # every poll 410: a reset, then no cursor
        wait_until(lambda: filter_stats(s).get("key_service.changes.reset", 0) >= 1, "a reset")
        wait_until(lambda: filter_stats(s).get("key_service.changes.error", 0) >= 1,
                   "a poll without a cursor failing")
        assert all_of(s, "feed-first") == {None}
        s.keyservice.revoke(key_hash("feed-first"))
        s.keyservice.set_changes_mode("normal")
        wait_for_polls(s)
        assert all_of(s, "feed-first") == {"api_key_revoked"}


def test_a_dead_feed_falls_back_to_cache_ttl():
    cache = {"ttl_s": 1, "refresh_ahead_pct": 0}
    with Stack(feed_config(cache), keys={key_hash("feed-dead"): {"key_id": "k"}}, concurrency=2) as s:
        wait_for_polls(s)
        assert all_of(s, "feed-dead", n=4) == {None}
        time.sleep(1.5)
        assert all_of(s, "feed-dead", n=4) == {None}
        assert lookups_of(s, "feed-dead") == 1, "past cache.ttl_s, trusted while the feed is healthy"
        assert filter_stats(s)["key_service.changes.age_s"] <= 1
        s.keyservice.set_changes_mode("status", status=503)
        time.sleep(3 * INTERVAL_MS / 1000 + 0.3)
        assert all_of(s, "feed-dead", n=4) == {None}
        assert lookups_of(s, "feed-dead") == 2, "feed dead: cache.ttl_s again"
        # How old the last good poll is, for dashboards and alerts.
        wait_until(lambda: filter_stats(s)["key_service.changes.age_s"] >= 2, "the feed's age to grow")


@pytest.mark.parametrize("mode", ["malformed", "bad_hashes", "huge", "hang", "status"])
def test_a_bad_feed_answer_is_a_failure_and_flushes_nothing(mode):
    config = feed_config()
    config["key_service"]["timeout_ms"] = 300  # so a hung poll times out within the test
    with Stack(config, keys={key_hash("feed-kept"): {"key_id": "k"}}, concurrency=4) as s:
        wait_for_polls(s)
        assert all_of(s, "feed-kept", n=8) == {None}
        s.keyservice.set_changes_mode(mode)
        wait_until(lambda: filter_stats(s).get("key_service.changes.error", 0) >= 2, "two failed polls")
        assert all_of(s, "feed-kept", n=8) == {None}
        assert lookups_of(s, "feed-kept") == 1, "nothing forgotten"
        assert "panicked" not in s.envoy_log()
        s.keyservice.set_changes_mode("normal")
        wait_for_polls(s)
        assert filter_stats(s)["key_service.changes.forgotten"] == 0


def test_a_key_in_steady_use_never_waits_for_a_slow_key_service():
    cache = {"ttl_s": 3, "refresh_ahead_pct": 50}
    config = {"key_service": {"cluster": "key_service", "timeout_ms": 3000}, "cache": cache, "rate_limit": None}
    with Stack(config, keys={key_hash("feed-steady"): {"key_id": "k"}}, concurrency=2) as s:
        s.keyservice.set_mode("normal", delay_ms=1000)
        assert send(s, "feed-steady").status == 200  # cold: waits once
        slowest = 0
        started = time.monotonic()
        while time.monotonic() - started < 7:
            t0 = time.monotonic()
            assert send(s, "feed-steady").status == 200
            slowest = max(slowest, time.monotonic() - t0)
            time.sleep(0.1)
        assert slowest < 0.5, f"a request waited {slowest:.2f} s"
        # Refreshed every ~2.5 s (at 1.5 s of age, taking 1 s): about 3 in 7 s, one each time.
        refreshes = lookups_of(s, "feed-steady") - 1
        assert 2 <= refreshes <= 4, refreshes
        assert filter_stats(s)["cache.refresh"] == refreshes

        s.keyservice.revoke(key_hash("feed-steady"))
        deadline = time.monotonic() + 5
        while send(s, "feed-steady").status == 200:
            assert time.monotonic() < deadline, "the refresh should find the revocation"
            time.sleep(0.1)
        assert code(send(s, "feed-steady")) == "api_key_revoked"


def test_a_failing_key_service_is_not_asked_in_a_storm():
    config = {"key_service": {"cluster": "key_service", "timeout_ms": 1000}}
    with Stack(config, keys={key_hash("feed-other"): {"key_id": "k_other"}}, concurrency=2) as s:
        s.keyservice.set_mode("status", status=500)
        started = time.monotonic()
        statuses = set()
        requests = 0
        while time.monotonic() - started < 2.5:
            statuses.add(code(send(s, "feed-storm")))
            requests += 1
            time.sleep(0.05)
        assert statuses == {"key_service_unavailable"}
        # Failed at 0 s and again at once, then paused 1 s, then 2 s: 3 lookups (4 if a
        # second worker's first lookup raced the first).
        assert 3 <= lookups_of(s, "feed-storm") <= 4, (lookups_of(s, "feed-storm"), requests)
        assert filter_stats(s)["key_service.paused"] >= requests - 5
        s.keyservice.set_mode("normal")
        s.keyservice.add_key(key_hash("feed-storm"), {"key_id": "k_storm"})
        assert send(s, "feed-other").status == 200, "any answer ends every pause"
        assert send(s, "feed-storm").status == 200
