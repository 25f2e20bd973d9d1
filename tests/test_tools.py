"""The test helpers on their own, without Envoy: testbed/keyservice.py and testbed/upstream.py.
If these lie, every integration test built on them lies too."""
import hashlib
import http.client
import json
import re
import socket
import subprocess
import sys
import time
from urllib.parse import quote

import pytest

from testbed.harness import ROOT, KeyServiceClient, with_checksum, UpstreamClient, _Connection, http_request, key_hash, start_helper_server

ALICE = key_hash("k-alice")
BOB = key_hash("k-bob")
CAROL = key_hash("k-carol")
CHANGES = "/v1/key-changes"


def start_key_service(tmp_path, name, extra=()):
    """A key service with alice (from its keys file, written back on changes): (process, client)."""
    keys = tmp_path / f"{name}.json"
    keys.write_text(json.dumps({"keys": {ALICE: {"key_id": "k_1", "owner": "acme", "scopes": ["a", "b"]}}}))
    proc, port = start_helper_server("keyservice", "keyservice", 0, tmp_path / f"{name}.log",
                                     ["--keys", keys, "--save", *extra])
    client = KeyServiceClient(port)
    client.keys_path = keys
    return proc, client


@pytest.fixture
def ks(tmp_path):
    proc, client = start_key_service(tmp_path, "ks")
    yield client
    proc.stop()


@pytest.fixture
def up(tmp_path):
    proc, port = start_helper_server("upstream", "upstream", 0, tmp_path / "up.log")
    yield UpstreamClient(port)
    proc.stop()


def lookup(ks, h, timeout=5, headers=()):
    return http_request(ks.port, "GET", f"/v1/keys/{h}", headers, timeout=timeout)


def poll(ks, after=None, timeout=5, path=CHANGES):
    """One poll of the change feed, `after` URL-encoded as the filter sends it."""
    return http_request(ks.port, "GET", path if after is None else f"{path}?after={quote(after, safe='')}",
                        timeout=timeout)


def changes_since(ks, after):
    r = poll(ks, after)
    assert r.status == 200, r
    return r.json()["key_hashes"]


def set_changes_mode(ks, mode, status=None, delay_ms=None):
    return ks.call("POST", "/admin/changes-mode", {"mode": mode, "status": status, "delay_ms": delay_ms})


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
    assert ks.lookups() == {"total": 0, "by_hash": {}, "recent": [], "changes": {"total": 0, "recent": []}}
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


# -- key service: change feed ---------------------------------------------------------------


def test_feed_first_poll_tells_where_it_stands(ks):
    r = poll(ks)
    assert r.status == 200 and r.header("content-type") == "application/json"
    answer = r.json()
    assert answer["key_hashes"] == []
    assert re.fullmatch(r"[\x21-\x7e]{1,256}", answer["cursor"])  # visible ASCII, 1..256 bytes


def test_feed_lists_each_changed_key_once_in_the_order_of_its_latest_change(ks):
    ks.add_key(BOB, {"key_id": "k_2"})
    start = poll(ks).json()["cursor"]
    ks.revoke(ALICE)
    ks.add_key(CAROL, {"key_id": "k_3"})  # a new key
    ks.expire(ALICE)  # alice again: listed once, where her latest change puts her
    ks.delete(BOB)
    http_request(ks.port, "POST", f"/admin/keys/{BOB}/revoke")  # 404: changes nothing
    answer = poll(ks, start).json()
    assert answer["key_hashes"] == [CAROL, ALICE, BOB]
    assert answer["cursor"] != start and re.fullmatch(r"[\x21-\x7e]{1,256}", answer["cursor"])

    assert changes_since(ks, answer["cursor"]) == []
    ks.add_key("not-a-sha256", {"key_id": "k_4"})  # no client could look it up
    assert changes_since(ks, answer["cursor"]) == []
    assert changes_since(ks, start) == [CAROL, ALICE, BOB]  # a cursor can be polled again


def test_feed_answers_410_to_a_cursor_it_cannot_answer(ks, tmp_path):
    foreign = poll(ks).json()["cursor"]
    proc, small = start_key_service(tmp_path, "small", ["--changes-kept", "3"])
    try:
        c0 = poll(small).json()["cursor"]
        small.revoke(ALICE)
        c1 = poll(small).json()["cursor"]
        small.add_key(BOB, {"key_id": "k_2"})
        small.add_key(CAROL, {"key_id": "k_3"})
        assert changes_since(small, c0) == [ALICE, BOB, CAROL]  # 3 changes kept: c0 still answered
        small.delete(BOB)
        assert poll(small, c0).status == 410  # its first change is no longer kept
        assert changes_since(small, c1) == [CAROL, BOB]

        # Not ours: garbage, empty, another run's (a restart loses the log), from the future.
        for cursor in ("garbage", "", "c-1", foreign, c1 + "0", "c-\u00e9"):
            r = poll(small, cursor)
            assert (r.status, r.json()) == (410, {"error": "cursor_gone"}), cursor
        assert http_request(small.port, "GET", f"{CHANGES}?after={quote(c1)}&after={quote(c1)}").status == 410

        # The client then starts again without after.
        again = poll(small).json()
        small.revoke(CAROL)
        assert again["key_hashes"] == [] and changes_since(small, again["cursor"]) == [CAROL]
    finally:
        proc.stop()


def test_feed_polls_are_counted_apart_from_lookups(ks):
    cursor = poll(ks).json()["cursor"]
    poll(ks, cursor)
    lookup(ks, ALICE)
    seen = ks.lookups()
    assert (seen["total"], seen["by_hash"], len(seen["recent"])) == (1, {ALICE: 1}, 1)
    assert seen["changes"]["total"] == 2
    paths = [x["path"] for x in seen["changes"]["recent"]]
    assert paths == [CHANGES, f"{CHANGES}?after={quote(cursor, safe='')}"]
    assert ["Host", f"127.0.0.1:{ks.port}"] in seen["changes"]["recent"][0]["headers"]
    for _ in range(205):
        poll(ks)
    seen = ks.lookups()
    assert seen["total"] == 1 and seen["changes"]["total"] == 207 and len(seen["changes"]["recent"]) == 200


def test_feed_served_at_changes_path(tmp_path):
    proc, other = start_key_service(tmp_path, "other", ["--changes-path", "/feed/keys"])
    try:
        cursor = poll(other, path="/feed/keys").json()["cursor"]
        other.revoke(ALICE)
        r = poll(other, cursor, path="/feed/keys")
        assert r.status == 200 and r.json()["key_hashes"] == [ALICE]
        assert poll(other).status == 404
        assert other.lookups()["changes"]["total"] == 2
    finally:
        proc.stop()


def test_feed_modes_misbehave_as_told_and_are_counted(ks):
    cursor = poll(ks).json()["cursor"]
    set_changes_mode(ks, "status", status=503)
    r = poll(ks, cursor)
    assert r.status == 503 and r.json()["error"]
    set_changes_mode(ks, "status")
    assert poll(ks).status == 500  # default status

    set_changes_mode(ks, "gone")
    for after in (None, cursor, "garbage"):
        r = poll(ks, after)
        assert (r.status, r.json()) == (410, {"error": "cursor_gone"}), after

    set_changes_mode(ks, "malformed")
    r = poll(ks, cursor)
    assert r.status == 200 and r.body == b'{"cursor": '
    with pytest.raises(ValueError):
        r.json()

    set_changes_mode(ks, "bad_hashes")
    r = poll(ks, cursor)
    assert (r.status, r.json()) == (200, {"cursor": "c-bad", "key_hashes": ["not-a-hash"]})

    set_changes_mode(ks, "huge")
    r = poll(ks, cursor)
    assert r.status == 200 and 1_000_000 <= len(r.body) <= 1_100_000
    answer = r.json()
    assert answer["cursor"] == "c-huge" and all(re.fullmatch("[0-9a-f]{64}", h) for h in answer["key_hashes"])

    assert ks.lookups()["changes"]["total"] == 9 and ks.lookups()["total"] == 0
    assert lookup(ks, ALICE).status == 200  # the feed's mode is not the lookups'
    set_changes_mode(ks, "normal")
    ks.set_mode("status", status=503)
    assert poll(ks, cursor).json()["key_hashes"] == []  # nor the other way round


def test_feed_delay_applies_in_any_mode(ks):
    set_changes_mode(ks, "normal", delay_ms=150)
    t = time.monotonic()
    assert poll(ks).status == 200
    assert time.monotonic() - t >= 0.15
    set_changes_mode(ks, "gone", delay_ms=150)
    t = time.monotonic()
    assert poll(ks).status == 410
    assert time.monotonic() - t >= 0.15
    set_changes_mode(ks, "normal", delay_ms=2000)
    t = time.monotonic()
    assert lookup(ks, ALICE).status == 200 and time.monotonic() - t < 1  # lookups are not delayed


def test_feed_mode_hang_never_answers_until_the_feed_mode_changes(ks):
    set_changes_mode(ks, "hang")
    with pytest.raises(socket.timeout):
        poll(ks, timeout=0.3)
    assert lookup(ks, ALICE).status == 200  # lookups still answer
    conn = _Connection("127.0.0.1", ks.port, timeout=5)
    conn.request("GET", CHANGES)
    time.sleep(0.2)
    set_changes_mode(ks, "status", status=502)
    assert conn.getresponse().status == 502  # answered by the new mode
    conn.close()


def test_bad_feed_mode_requests_are_refused(ks):
    for body in ({"mode": "sulk"}, {"mode": "close"}, {"mode": "status", "status": 99},
                 {"mode": "normal", "delay_ms": -1}):
        assert http_request(ks.port, "POST", "/admin/changes-mode", body=body).status == 400, body
    assert poll(ks).status == 200


def test_reset_brings_the_feed_back_to_normal_and_keeps_the_log(ks):
    cursor = poll(ks).json()["cursor"]
    ks.revoke(ALICE)
    set_changes_mode(ks, "gone")
    assert poll(ks, cursor).status == 410
    set_changes_mode(ks, "gone", delay_ms=2000)
    ks.reset()
    assert ks.lookups()["changes"] == {"total": 0, "recent": []}
    t = time.monotonic()
    assert changes_since(ks, cursor) == [ALICE]  # normal again, and the log survives a reset
    assert time.monotonic() - t < 1  # no delay either


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


# -- keys in the filter's key_format ---------------------------------------------------------


def test_keygen_prints_keys_in_the_format_with_their_hashes():
    out = subprocess.run([sys.executable, ROOT / "scripts" / "keygen", "sk_test_", "--count", "3"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 3 and len(set(out)) == 3
    for line in out:
        key, digest = line.split("\t")
        assert key.startswith("sk_test_") and len(key) == len("sk_test_") + 36
        assert key == with_checksum("sk_test_", key[len("sk_test_"):-6])
        assert digest == hashlib.sha256(key.encode()).hexdigest()


def test_mint_answers_a_new_key_once_and_keeps_only_its_hash(ks):
    minted = ks.call("POST", "/admin/keys/mint", {"prefix": "ghp_", "record": {"key_id": "k_minted"}})
    key = minted["key"]
    assert key.startswith("ghp_") and key == with_checksum("ghp_", key[4:-6])
    assert minted["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    keys = ks.call("GET", "/admin/keys")["keys"]
    assert keys[minted["key_hash"]] == {"key_id": "k_minted"}
    assert key not in json.dumps(keys)
    assert http_request(ks.port, "GET", f"/v1/keys/{minted['key_hash']}").status == 200
    assert http_request(ks.port, "POST", "/admin/keys/mint", body={"prefix": "a b", "record": {}}).status == 400
