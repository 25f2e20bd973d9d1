"""rls-server on its own (Envoy's RLS API on Limitador, counters in memory), through a real gRPC
client (grpcio) sending hand-encoded protobuf: the filter's rate limit tests trust it."""
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

grpc = pytest.importorskip("grpc", reason="grpcio: run scripts/setup-python")

from testbed.rls_client import (DAY, HOUR, MINUTE, OK, OVER_LIMIT, UNKNOWN, RlsClient as Client,  # noqa: E402
                        decode_response, descriptor, request)
from testbed.rls_service import RlsService  # noqa: E402

# func_only: the first test may build rls-server (scripts/build-rls-server, minutes when
# cold) in its fixture; only the tests themselves are held to the timeout.
pytestmark = pytest.mark.timeout(120, func_only=True)


@pytest.fixture
def rls():
    with RlsService() as service:
        yield service


@pytest.fixture
def client(rls):
    c = Client(rls.grpc_port)
    yield c
    c.close()


def key_day(key, n=None):
    return descriptor(("key_id", key), ("window", "day"), limit=(n, DAY) if n else None)


def owner_day(owner, n=None):
    return descriptor(("owner", owner), ("window", "day"), limit=(n, DAY) if n else None)


# -- override mode (the default) ----------------------------------------------------------


def test_an_override_of_3_per_minute_admits_3_then_is_over_limit(rls, client):
    d = descriptor(("key_id", "k_1"), ("window", "minute"), limit=(3, MINUTE))
    for remaining in (2, 1, 0):
        r = client(d)
        assert r["code"] == OK
        [s] = r["statuses"]
        assert (s["code"], s["limit"], s["remaining"]) == (OK, ("", 3, MINUTE), remaining)
        assert 0 < s["reset_s"] <= 60
    r = client(d)
    assert r["code"] == OVER_LIMIT
    [s] = r["statuses"]
    assert (s["code"], s["remaining"]) == (OVER_LIMIT, 0) and 0 < s["reset_s"] <= 60
    assert rls.calls() == {"calls": 4, "hits": 4}


def test_hits_addend_counts_that_many_and_an_over_limit_call_counts_nothing(rls, client):
    d = descriptor(("key_id", "k_2"), ("window", "minute"), limit=(5, MINUTE))
    assert client(d, hits=2)["statuses"][0]["remaining"] == 3
    r = client(d, hits=4)
    assert r["code"] == OVER_LIMIT and r["statuses"][0]["remaining"] == 3
    r = client(d, hits=3)
    assert r["code"] == OK and r["statuses"][0]["remaining"] == 0
    assert rls.calls() == {"calls": 3, "hits": 9}


def test_descriptors_are_checked_together_one_status_each_in_order(client):
    minute = descriptor(("key_id", "k_3"), ("window", "minute"), limit=(1, MINUTE))
    plain = descriptor(("path", "/orders"))
    r = client(minute, owner_day("acme", 10), plain)
    assert r["code"] == OK
    assert [(s["code"], s["remaining"]) for s in r["statuses"]] == [(OK, 0), (OK, 9), (OK, 0)]
    assert r["statuses"][1]["limit"] == ("", 10, DAY) and 86_000 < r["statuses"][1]["reset_s"] <= 86_400
    assert r["statuses"][2]["limit"] is None and r["statuses"][2]["reset_s"] is None
    r = client(minute, owner_day("acme", 10), plain)
    assert r["code"] == OVER_LIMIT
    # Nothing counted: the owner's day still has 9.
    assert [(s["code"], s["remaining"]) for s in r["statuses"]] == [(OVER_LIMIT, 0), (OK, 9), (OK, 0)]


def test_a_descriptor_counts_the_same_wherever_it_is_in_the_call(client):
    assert client(key_day("k_4", 5), owner_day("o_4", 9))["statuses"][0]["remaining"] == 4
    assert client(owner_day("o_4", 9), key_day("k_4", 5))["statuses"][1]["remaining"] == 3
    assert client(key_day("k_4", 5))["statuses"][0]["remaining"] == 2
    # Other keys and other domains have counters of their own.
    assert client(key_day("k_5", 5))["statuses"][0]["remaining"] == 4
    assert client(key_day("k_4", 5), domain="other")["statuses"][0]["remaining"] == 4


def test_concurrent_calls_never_overshoot(rls, client):
    """rls-server runs one check at a time, so 30 calls at once against a limit of 10
    admit exactly 10."""
    d = key_day("k_13", 10)
    with ThreadPoolExecutor(30) as pool:
        codes = list(pool.map(lambda _: client(d)["code"], range(30)))
    assert codes.count(OK) == 10 and codes.count(OVER_LIMIT) == 20
    assert rls.calls() == {"calls": 30, "hits": 30}


def test_a_new_limit_for_a_descriptor_keeps_its_count(client):
    assert client(key_day("k_6", 3))["statuses"][0]["remaining"] == 2
    r = client(key_day("k_6", 10))
    assert r["statuses"][0]["limit"] == ("", 10, DAY) and r["statuses"][0]["remaining"] == 8
    assert client(key_day("k_6", 2))["code"] == OVER_LIMIT


def test_without_statuses_only_the_overall_code(tmp_path):
    with RlsService(statuses=False) as rls:
        c = Client(rls.grpc_port)
        d = key_day("k_7", 1)
        assert client_codes(c, d, d) == [(OK, []), (OVER_LIMIT, [])]
        c.close()


def client_codes(c, *calls):
    return [(r["code"], r["statuses"]) for r in (c(d) for d in calls)]


def test_counts_survive_a_failing_spell_and_a_restart_starts_again(rls):
    d = descriptor(("key_id", "k_8"), ("window", "hour"), limit=(3, HOUR))
    c = Client(rls.grpc_port)
    assert [c(d)["statuses"][0]["remaining"] for _ in range(2)] == [2, 1]
    rls.set_mode("grpc-error")
    with pytest.raises(grpc.RpcError):
        c(d)
    rls.set_mode("normal")
    assert c(d)["statuses"][0]["remaining"] == 0, "the failing spell counted nothing"
    assert c(d)["code"] == OVER_LIMIT
    c.close()
    port = rls.grpc_port
    rls.stop_server()
    rls.start_server()
    assert rls.grpc_port == port
    c = Client(rls.grpc_port)
    assert c(d)["statuses"][0]["remaining"] == 2, "counters in memory: a new server starts at 0"
    assert rls.calls() == {"calls": 1, "hits": 1}  # since this run of the server
    c.close()


# -- a Limitador limits file --------------------------------------------------------------

# Limitador's conditions reach descriptors by position only (a CEL macro such as
# descriptors.exists(d, ...) never matches: Limitador takes `d` for a variable the call
# must bind), and it fails the whole call when a condition reads past the last descriptor:
# hence the size() guards. These two match their descriptor first or second in the call.
LIMITS = """\
- namespace: apikey
  name: key-day
  max_value: 2
  seconds: 86400
  conditions:
    - "size(descriptors) > 0 && has(descriptors[0].key_id) && descriptors[0].window == 'day' || size(descriptors) > 1 && has(descriptors[1].key_id) && descriptors[1].window == 'day'"
  variables:
    - "has(descriptors[0].key_id) && descriptors[0].window == 'day' ? descriptors[0].key_id : descriptors[1].key_id"
- namespace: apikey
  name: owner-day
  max_value: 3
  seconds: 86400
  conditions:
    - "size(descriptors) > 0 && has(descriptors[0].owner) && descriptors[0].window == 'day' || size(descriptors) > 1 && has(descriptors[1].owner) && descriptors[1].window == 'day'"
  variables:
    - "has(descriptors[0].owner) && descriptors[0].window == 'day' ? descriptors[0].owner : descriptors[1].owner"
"""


def test_a_limits_file_limits_descriptors_without_overrides(tmp_path):
    limits = tmp_path / "limits.yaml"
    limits.write_text(LIMITS)
    with RlsService(limits_file=limits) as rls:
        c = Client(rls.grpc_port)
        r = c(key_day("k_9"), owner_day("acme"))
        assert r["code"] == OK
        assert [(s["limit"], s["remaining"]) for s in r["statuses"]] == [
            (("key-day", 2, DAY), 1), (("owner-day", 3, DAY), 2)]
        # The other order, each alone: the same counters. An override is ignored.
        r = c(owner_day("acme"), key_day("k_9", 100))
        assert r["code"] == OK and [s["remaining"] for s in r["statuses"]] == [1, 0]
        assert c(owner_day("acme"))["statuses"][0]["remaining"] == 0
        r = c(key_day("k_10"), owner_day("acme"))
        assert r["code"] == OVER_LIMIT
        assert [(s["code"], s["remaining"]) for s in r["statuses"]] == [(OK, 2), (OVER_LIMIT, 0)]
        assert c(key_day("k_9"))["code"] == OVER_LIMIT
        # Descriptors no limit matches are not limited.
        r = c(descriptor(("key_id", "k_9"), ("window", "minute")))
        assert r["code"] == OK and r["statuses"][0]["limit"] is None
        assert rls.calls() == {"calls": 6, "hits": 6}
        c.close()


# -- modes and bad calls ------------------------------------------------------------------


def test_failure_modes(rls, client):
    d = key_day("k_11", 100)
    rls.set_mode("grpc-error")
    with pytest.raises(grpc.RpcError) as e:
        client(d)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    rls.set_mode("garbage")
    assert client.raw(request("apikey", d), timeout=5) == b"\xff\xff\xff"
    with pytest.raises(Exception):
        decode_response(b"\xff\xff\xff")
    rls.set_mode("slow", ms=300)
    start = time.monotonic()
    assert client(d)["statuses"][0]["remaining"] == 99
    assert time.monotonic() - start >= 0.3
    rls.set_mode("normal")
    assert client(d)["statuses"][0]["remaining"] == 98
    assert rls.calls() == {"calls": 2, "hits": 2}


def test_bad_calls_are_refused_and_logged_and_the_server_carries_on(rls, client):
    with pytest.raises(grpc.RpcError) as e:
        client.raw(b"\x0a\xff", timeout=5)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert client(key_day("k_12", 5), domain="") == {"code": UNKNOWN, "statuses": []}
    other = client.channel.unary_unary("/envoy.service.ratelimit.v3.RateLimitService/Nope",
                                       request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as e:
        other(b"", timeout=5)
    assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert client(key_day("k_12", 5))["statuses"][0]["remaining"] == 4
    log = rls.log()
    assert "bad request: not a RateLimitRequest" in log
    assert "bad request: empty domain" in log
    assert "bad request: no method /envoy.service.ratelimit.v3.RateLimitService/Nope" in log


# -- the limits file shipped for Limitador ------------------------------------------------


def test_the_shipped_limitador_limits_file_keeps_the_demo_quotas():
    """envoy/ratelimit/limitador-limits.yaml as Limitador reads it: demo-key-frank's 5 a day,
    whatever override the filter sends (1000 here), and the per-owner example."""
    from testbed.harness import ROOT
    with RlsService(limits_file=ROOT / "envoy" / "ratelimit" / "limitador-limits.yaml") as rls:
        c = Client(rls.grpc_port)
        frank = descriptor(("key_id", "k_frank"), ("window", "day"), limit=(1000, DAY))
        for remaining in (4, 3, 2, 1, 0):
            r = c(frank)
            assert r["code"] == OK, r
            assert [(s["limit"], s["remaining"]) for s in r["statuses"]] == [(("key-day", 5, DAY), remaining)]
        r = c(frank)
        assert r["code"] == OVER_LIMIT and r["statuses"][0]["code"] == OVER_LIMIT, r
        # Another key has a day of its own, under the same max_value.
        assert c(key_day("k_other", 1000))["statuses"][0]["remaining"] == 4

        # Per owner: 1,000 a day shared by the owner's keys; the descriptor alone, or second
        # in a key's call.
        r = c(owner_day("umbrella", 5), hits=999)
        assert r["code"] == OK and r["statuses"][0]["limit"] == ("owner-day", 1000, DAY), r
        assert r["statuses"][0]["remaining"] == 1
        r = c(key_day("k_frank2", 5), owner_day("umbrella", 5))
        assert r["code"] == OK and [s["remaining"] for s in r["statuses"]] == [4, 0], r
        r = c(key_day("k_frank2", 5), owner_day("umbrella", 5))
        assert r["code"] == OVER_LIMIT, r
        assert [(s["code"], s["remaining"]) for s in r["statuses"]] == [(OK, 4), (OVER_LIMIT, 0)]
        assert c(owner_day("globex"))["statuses"][0]["remaining"] == 999  # other owners: their own
        assert rls.calls() == {"calls": 11, "hits": 1009}
        c.close()
