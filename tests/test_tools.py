"""The test helpers on their own, without Envoy: scripts/keyservice.py and scripts/upstream.py.
If these lie, every integration test built on them lies too."""
import http.client
import json
import socket
import time

import pytest

from harness import KeyServiceClient, UpstreamClient, _Connection, http_request, key_hash, start_helper_server

ALICE = key_hash("k-alice")
BOB = key_hash("k-bob")


@pytest.fixture
def ks(tmp_path):
    """A key service with alice (from its keys file, written back on changes) and its client."""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": {ALICE: {"key_id": "k_1", "owner": "acme", "scopes": ["a", "b"]}}}))
    proc, port = start_helper_server("keyservice", "keyservice.py", 0, tmp_path / "ks.log", ["--keys", keys, "--save"])
    client = KeyServiceClient(port)
    client.keys_path = keys
    yield client
    proc.stop()


@pytest.fixture
def up(tmp_path):
    proc, port = start_helper_server("upstream", "upstream.py", 0, tmp_path / "up.log")
    yield UpstreamClient(port)
    proc.stop()


def lookup(ks, h, timeout=5, headers=()):
    return http_request(ks.port, "GET", f"/v1/keys/{h}", headers, timeout=timeout)


def test_key_hash_is_lowercase_sha256_hex():
    assert key_hash("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert key_hash(b"\xff") == key_hash(b"\xff".decode("latin-1").encode("latin-1"))
    assert key_hash("é") == key_hash("é".encode())


# -- key service: protocol ------------------------------------------------------------------


def test_lookup_found_and_not_found_are_counted(ks):
    r = lookup(ks, ALICE, headers=[("x-trace", "t1"), ("x-trace", "t2")])
    assert r.status == 200 and r.header("content-type") == "application/json"
    assert r.json() == {"key_id": "k_1", "owner": "acme", "scopes": ["a", "b"]}
    r = lookup(ks, BOB)
    assert (r.status, r.json()) == (404, {"error": "not_found"})
    lookup(ks, BOB)

    seen = ks.lookups()
    assert seen["total"] == 3
    assert seen["by_hash"] == {ALICE: 1, BOB: 2}
    assert [x["path"] for x in seen["recent"]] == [f"/v1/keys/{ALICE}", f"/v1/keys/{BOB}", f"/v1/keys/{BOB}"]
    assert ["x-trace", "t1"] in seen["recent"][0]["headers"] and ["x-trace", "t2"] in seen["recent"][0]["headers"]


def test_recent_lookups_keep_the_last_200(ks):
    for i in range(205):
        lookup(ks, f"h{i}")
    seen = ks.lookups()
    assert seen["total"] == 205 and len(seen["recent"]) == 200
    assert seen["recent"][0]["path"] == "/v1/keys/h5" and seen["recent"][-1]["path"] == "/v1/keys/h204"


def test_keep_alive_serves_several_requests_on_one_connection(ks):
    conn = http.client.HTTPConnection("127.0.0.1", ks.port, timeout=5)
    try:
        for h, status in ((ALICE, 200), (BOB, 404), (ALICE, 200)):
            conn.request("GET", f"/v1/keys/{h}")
            r = conn.getresponse()
            assert r.status == status and int(r.getheader("content-length")) == len(r.read())
            assert r.getheader("connection", "").lower() != "close"
    finally:
        conn.close()
    assert ks.lookups()["total"] == 3


def test_healthz_and_unknown_paths(ks):
    assert http_request(ks.port, "GET", "/healthz").status == 200
    assert http_request(ks.port, "GET", "/nope").status == 404
    assert ks.lookups()["total"] == 0  # neither is a lookup


# -- key service: admin API ----------------------------------------------------------------


def test_add_key_upserts_the_record_as_given(ks):
    record = {"key_id": "k_2", "rate_limit": None, "expires_at": None, "extra": {"x": 1}}
    ks.add_key(BOB, record)
    assert lookup(ks, BOB).json() == record
    ks.add_key(BOB, {"key_id": "k_3"})
    assert lookup(ks, BOB).json() == {"key_id": "k_3"}
    assert json.loads(ks.keys_path.read_text())["keys"][BOB] == {"key_id": "k_3"}  # --save


def test_delete_makes_the_key_unknown(ks):
    ks.delete(ALICE)
    assert lookup(ks, ALICE).status == 404
    assert http_request(ks.port, "DELETE", f"/admin/keys/{ALICE}").status == 404  # already gone
    assert ALICE not in ks.keys()


def test_revoke_and_expire_change_the_record(ks):
    ks.revoke(ALICE)
    assert lookup(ks, ALICE).json()["revoked"] is True
    before = int(time.time())
    ks.expire(ALICE)
    record = lookup(ks, ALICE).json()
    assert before - 2 <= record["expires_at"] < time.time() and record["key_id"] == "k_1"
    assert http_request(ks.port, "POST", f"/admin/keys/{BOB}/revoke").status == 404


def test_bad_admin_requests_are_refused(ks):
    assert http_request(ks.port, "POST", "/admin/keys", body={"record": {}}).status == 400
    assert http_request(ks.port, "POST", "/admin/keys", body=b"{not json").status == 400
    assert http_request(ks.port, "POST", "/admin/mode", body={"mode": "sulk"}).status == 400


def test_reset_zeroes_counters_and_mode_but_keeps_keys(ks):
    lookup(ks, ALICE)
    ks.set_mode("status", status=503)
    ks.reset()
    assert ks.lookups() == {"total": 0, "by_hash": {}, "recent": []}
    assert lookup(ks, ALICE).status == 200


# -- key service: misbehaviour ---------------------------------------------------------------


def test_mode_status_answers_every_lookup_with_it_and_counts(ks):
    ks.set_mode("status", status=503)
    r = lookup(ks, ALICE)
    assert r.status == 503 and r.json()["error"]
    ks.set_mode("status")
    assert lookup(ks, BOB).status == 500  # default status
    assert ks.lookups()["total"] == 2
    ks.set_mode("normal")
    assert lookup(ks, ALICE).status == 200


def test_mode_hang_never_answers_until_the_mode_changes(ks):
    ks.set_mode("hang")
    with pytest.raises(socket.timeout):
        lookup(ks, ALICE, timeout=0.3)
    assert ks.lookups()["by_hash"] == {ALICE: 1}

    # A hung lookup is released (answered by the new mode) once the mode changes.
    conn = _Connection("127.0.0.1", ks.port, timeout=5)
    conn.request("GET", f"/v1/keys/{ALICE}")
    time.sleep(0.2)
    ks.set_mode("normal")
    assert conn.getresponse().status == 200
    conn.close()


def test_mode_close_drops_the_connection_without_a_response(ks):
    ks.set_mode("close")
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        lookup(ks, ALICE)
    assert ks.lookups()["total"] == 1


def test_mode_malformed_answers_200_with_broken_json(ks):
    ks.set_mode("malformed")
    r = lookup(ks, ALICE)
    assert r.status == 200 and r.body == b'{"key_id": '
    with pytest.raises(ValueError):
        r.json()


def test_delay_applies_in_any_mode(ks):
    ks.set_mode("normal", delay_ms=150)
    t = time.monotonic()
    assert lookup(ks, ALICE).status == 200
    assert time.monotonic() - t >= 0.15
    ks.set_mode("status", status=502, delay_ms=150)
    t = time.monotonic()
    assert lookup(ks, ALICE).status == 502
    assert time.monotonic() - t >= 0.15


# -- upstream ----------------------------------------------------------------------------------


def test_upstream_echoes_and_records_exactly_what_it_got(up):
    headers = [("X-Rep", "1"), ("X-Rep", "2"), ("X-Raw", b"caf\xe9\xff")]
    r = http_request(up.port, "POST", "/orders?x=1&y=%20", headers, body="hello")
    assert r.status == 200 and r.header("content-type") == "application/json"
    seen = r.json()
    assert seen["method"] == "POST" and seen["path"] == "/orders?x=1&y=%20" and seen["body"] == "hello"
    assert [h for h in seen["headers"] if h[0] in ("X-Rep", "X-Raw")] == [
        ["X-Rep", "1"], ["X-Rep", "2"], ["X-Raw", "caf\xe9\xff"]]  # latin-1: the bytes survive
    assert up.requests() == [seen]


def test_upstream_answers_any_method_and_clears(up):
    for method in ("GET", "PUT", "PATCH", "DELETE", "OPTIONS"):
        assert http_request(up.port, method, "/x").json()["method"] == method
    assert [r["method"] for r in up.requests()] == ["GET", "PUT", "PATCH", "DELETE", "OPTIONS"]
    up.clear()
    assert up.requests() == []


def test_upstream_reads_a_chunked_body(up):
    r = http_request(up.port, "POST", "/c", [("Transfer-Encoding", "chunked")], body=b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert r.json()["body"] == "abcde"
    assert http_request(up.port, "GET", "/after").json()["path"] == "/after"
