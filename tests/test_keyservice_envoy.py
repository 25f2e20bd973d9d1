"""The key lifecycle end to end: keys made, revoked and rotated through the key service's
admin API (`apikey-keyservice`, on SQLite), used through a real Envoy and the filter (either
build) following the service's change feed."""
import re
import time

import pytest

from testbed.harness import Stack
from testbed.real_keyservice import KeyService, wait_until

INTERVAL_MS = 200
CONFIG = {
    "key_service": {"cluster": "key_service", "timeout_ms": 1000,
                    "changes": {"interval_ms": INTERVAL_MS, "ttl_s": 3600}},
    "key_format": {"prefixes": ["ak_live_"], "checksum": "crc32"},
    "cache": {"ttl_s": 3600, "negative_ttl_s": 3600},
}


@pytest.fixture(scope="module")
def stack():
    with Stack(CONFIG, start_key_service=False, concurrency=2) as s:
        with KeyService(port=s.key_service_port) as ks:
            s.ks = ks
            yield s


def send(stack, key):
    return stack.request("GET", "/orders", headers=[("x-api-key", key)])


def outcome(response):
    return response.status if response.status == 200 else response.json()["error"]["code"]


def outcomes(stack, key, n=8):
    """What n requests for key get, over both worker threads."""
    return {outcome(send(stack, key)) for _ in range(n)}


def feed_polls(ks):
    return int(re.search(r"^apikey_keyservice_feed_polls_total (\d+)$", ks.metrics(), re.M).group(1))


def after_two_polls(ks):
    """Until the feed lists what changed and the node polled twice more: it is seen."""
    ks.settled()
    target = feed_polls(ks) + 2
    wait_until(lambda: feed_polls(ks) >= target, "two more feed polls")


def test_a_key_made_through_the_admin_api_works_and_the_upstream_gets_its_identity(stack):
    made = stack.ks.admin.create(owner="acme", scopes=["orders:read"])
    stack.upstream.clear()
    assert outcomes(stack, made["key"]) == {200}
    headers = dict(stack.upstream.requests()[-1]["headers"])
    assert headers["x-api-key-id"] == made["key_id"] and headers["x-api-key-owner"] == "acme"
    assert "x-api-key" not in headers


def test_a_revoked_key_is_refused_once_the_node_polled_the_feed(stack):
    made = stack.ks.admin.create(owner="acme")
    assert outcomes(stack, made["key"]) == {200}
    stack.ks.admin.revoke(made["key_id"])
    after_two_polls(stack.ks)
    assert outcomes(stack, made["key"]) == {"api_key_revoked"}


def test_a_deleted_key_is_refused_as_invalid(stack):
    made = stack.ks.admin.create(owner="acme")
    assert outcomes(stack, made["key"]) == {200}
    stack.ks.admin.delete(made["key_id"])
    after_two_polls(stack.ks)
    assert outcomes(stack, made["key"]) == {"api_key_invalid"}


def test_a_rotated_key_and_its_successor_both_work_until_the_grace_ends(stack):
    old = stack.ks.admin.create(owner="acme", scopes=["orders:read"])
    assert outcomes(stack, old["key"]) == {200}
    new = stack.ks.admin.rotate(old["key_id"], grace_s=5)
    deadline = stack.ks.admin.show(old["key_id"])["expires_at"]
    after_two_polls(stack.ks)
    assert outcomes(stack, old["key"]) == {200}, "the old key works through its grace"
    assert outcomes(stack, new["key"]) == {200}
    wait_until(lambda: time.time() >= deadline + 1, "the grace to end", timeout=8)
    assert outcomes(stack, old["key"]) == {"api_key_expired"}
    assert outcomes(stack, new["key"]) == {200}, "only the new key works"


def test_a_key_the_service_never_made_fails_the_key_format_without_a_lookup(stack):
    made = stack.ks.admin.create(owner="acme")
    forged = made["key"][:-1] + ("A" if made["key"][-1] != "A" else "B")
    before = stack.ks.metrics()
    assert outcome(send(stack, forged)) == "api_key_invalid"
    lookups = r"^apikey_keyservice_lookups_(found|not_found)_total (\d+)$"
    assert re.findall(lookups, stack.ks.metrics(), re.M) == re.findall(lookups, before, re.M)


def test_two_serve_processes_on_one_postgresql_act_as_one_service():
    """A fleet: the filter polls and asks one process; keys are made and revoked through
    the other."""
    from testbed.postgres import Postgres
    with Postgres() as pg, Stack(CONFIG, start_key_service=False) as s:
        url = pg.database("fleet")
        with KeyService(port=s.key_service_port, db=url) as polled, \
                KeyService(db=url, token=polled.token) as other:
            made = other.admin.create(owner="acme")
            assert outcomes(s, made["key"]) == {200}
            other.admin.revoke(made["key_id"])
            after_two_polls(polled)
            assert outcomes(s, made["key"]) == {"api_key_revoked"}
            assert polled.admin.show(made["key_id"])["revoked"] is True
