"""Requests through a real Envoy running the filter: where the key is read from, what the
client gets (CONTRACT "What the client gets", all but 429 and 503), what the upstream gets
("What the upstream gets"), bad input, and the raw key staying out of every log, lookup,
forwarded request and error body.

Every test uses keys of its own, so the shared cache of a module-scoped stack cannot make
one test pass or fail because of another.
"""
import re
import time

import pytest

from testbed.harness import Stack, http_request, key_hash

CHALLENGE_APIKEY = 'ApiKey realm="api"'
CHALLENGE_BOTH = 'ApiKey realm="api", Bearer realm="api"'

MAIN_CONFIG = {
    "key_service": {"cluster": "key_service"},
    "key_sources": [
        {"header": "x-api-key"},
        {"header": "authorization", "scheme": "Bearer"},
        {"query": "api_key"},
    ],
    "rate_limit": None,  # buckets are tested elsewhere; keep their headers out of the way
    "rules": [
        {"path_prefix": "/orders", "methods": ["POST"], "scopes": ["orders:write"]},
        {"path_prefix": "/orders", "scopes": ["orders:read"]},
        {"path_prefix": "/admin", "scopes": ["admin", "ops"]},
    ],
}


@pytest.fixture(scope="module")
def stack():
    # Debug, so the no-raw-key test sees the filter's own debug lines. Envoy's HTTP
    # connection manager dumps every incoming request's headers at debug, before any
    # filter runs: that is Envoy's, not the filter's, so that one logger goes to info.
    with Stack(MAIN_CONFIG, log_level="debug") as s:
        r = http_request(s.admin_port, "POST", "/logging?http=info")
        assert r.status == 200, r
        yield s


def add_key(stack, raw, key_id, **record):
    """Registers raw (by its hash) with the key service; returns its hash."""
    h = key_hash(raw)
    stack.keyservice.add_key(h, {"key_id": key_id, **record})
    return h


def upstream_headers(r):
    """The headers the upstream received, as [(lowercased name, value)], from its echo."""
    return [(k.lower(), v) for k, v in r.json()["headers"]]


def upstream_values(r, name):
    return [v for k, v in upstream_headers(r) if k == name]


def assert_error(r, status, code, challenge=CHALLENGE_BOTH):
    assert r.status == status, r
    assert r.header("content-type") == "application/json", r
    body = r.json()
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    if status == 401:
        assert r.header("www-authenticate") == challenge, r
    return body


def lookups_of(stack, raw):
    return stack.keyservice.lookups()["by_hash"].get(key_hash(raw), 0)


# -- the status table ------------------------------------------------------------------------


def test_no_key_is_401_missing_and_nothing_is_forwarded(stack):
    stack.upstream.clear()
    r = stack.request("GET", "/status/missing")
    assert_error(r, 401, "api_key_missing")
    assert stack.upstream.requests() == []


def test_unknown_key_is_401_invalid_after_asking_the_key_service(stack):
    r = stack.request("GET", "/status/unknown", headers=[("x-api-key", "req-unknown-key")])
    assert_error(r, 401, "api_key_invalid")
    assert lookups_of(stack, "req-unknown-key") == 1


def test_revoked_key_is_401_revoked(stack):
    add_key(stack, "req-revoked-key", "k_revoked", revoked=True)
    r = stack.request("GET", "/status/revoked", headers=[("x-api-key", "req-revoked-key")])
    assert_error(r, 401, "api_key_revoked")


def test_expired_key_is_401_expired_and_a_future_expiry_is_allowed(stack):
    add_key(stack, "req-expired-key", "k_expired", expires_at=int(time.time()) - 60)
    add_key(stack, "req-not-yet-expired-key", "k_later", expires_at=int(time.time()) + 3600)
    r = stack.request("GET", "/status/expired", headers=[("x-api-key", "req-expired-key")])
    assert_error(r, 401, "api_key_expired")
    r = stack.request("GET", "/status/expired", headers=[("x-api-key", "req-not-yet-expired-key")])
    assert r.status == 200, r


def test_valid_key_is_forwarded_with_identity_headers(stack):
    h = add_key(stack, "req-valid-key", "k_valid", owner="acme", scopes=["orders:read", "reports"])
    stack.upstream.clear()
    r = stack.request("GET", "/status/valid?x=1", headers=[("x-api-key", "req-valid-key")])
    assert r.status == 200, r
    seen = r.json()
    assert seen["path"] == "/status/valid?x=1"
    assert upstream_values(r, "x-api-key-id") == ["k_valid"]
    assert upstream_values(r, "x-api-key-owner") == ["acme"]
    assert upstream_values(r, "x-api-key-scopes") == ["orders:read,reports"]
    assert upstream_values(r, "x-api-key") == []
    assert stack.upstream.requests() == [seen]
    assert stack.keyservice.lookups()["by_hash"][h] == 1


@pytest.mark.parametrize("headers, path", [
    pytest.param([("x-api-key", "req-dup-h1"), ("x-api-key", "req-dup-h2")], "/dup", id="header-twice"),
    pytest.param([("x-api-key", "req-dup-same"), ("x-api-key", "req-dup-same")], "/dup", id="header-twice-same"),
    pytest.param([], "/dup?api_key=req-dup-q1&api_key=req-dup-q2", id="query-twice"),
    pytest.param([("x-api-key", "req-dup-single")], "/dup?api_key=req-dup-q3&api_key=req-dup-q4",
                 id="query-twice-beside-a-single-header"),
    pytest.param([("x-api-key", "req-dup-h5"), ("x-api-key", "req-dup-h6")], "/dup?api_key=req-dup-single-q",
                 id="header-twice-beside-a-single-query"),
])
def test_a_key_given_twice_in_one_source_is_401_duplicate(stack, headers, path):
    for raw in ("req-dup-h1", "req-dup-same", "req-dup-single", "req-dup-single-q"):
        add_key(stack, raw, "k_" + raw)  # valid keys: the duplicate alone must decide
    stack.upstream.clear()
    before = stack.keyservice.lookups()["total"]
    r = stack.request("GET", path, headers=headers)
    assert_error(r, 401, "api_key_duplicate")
    assert stack.upstream.requests() == []
    assert stack.keyservice.lookups()["total"] == before


def test_bearer_header_sent_twice_is_401_duplicate(stack):
    """Envoy folds a repeated `authorization` (one of its inline headers) into one value,
    "Bearer req-dup-b1,Bearer req-dup-b2", before the filter sees it: still two keys."""
    add_key(stack, "req-dup-b1", "k_dup_b1")
    r = stack.request("GET", "/dup-bearer", headers=[("authorization", "Bearer req-dup-b1"),
                                                     ("authorization", "Bearer req-dup-b2")])
    assert_error(r, 401, "api_key_duplicate")


def test_a_bearer_key_after_another_schemes_authorization_line_does_not_leak(stack):
    """Envoy folds the two `authorization` lines into "Basic cmVxOmxlYWs=,Bearer zqSECRET-...":
    the Bearer part is a key, and is stripped like any other."""
    add_key(stack, "req-fold-winner", "k_fold")
    secret = "zqSECRET-fold-91d0c4"
    stack.upstream.clear()
    r = stack.request("GET", "/fold", headers=[
        ("x-api-key", "req-fold-winner"),
        ("authorization", "Basic cmVxOmxlYWs="), ("authorization", f"Bearer {secret}"),
    ])
    assert secret not in r.text  # the upstream's echo, or the error
    assert secret not in repr(stack.upstream.requests())
    assert secret not in stack.wait_for("access", '"GET /fold ')


def test_a_bearer_key_holding_a_comma_is_read_whole(stack):
    # The filter splits a folded `authorization` value at commas to see repeats, but only
    # where another credential starts: "Bearer req-comma,1" is the key "req-comma,1", not
    # "req-comma" (here another key's, k_prefix). A comma is visible ASCII, so it is read
    # whole from every source.
    add_key(stack, "req-comma,1", "k_comma")
    add_key(stack, "req-comma", "k_prefix")
    for headers, path in (([("x-api-key", "req-comma,1")], "/comma"), ([], "/comma?api_key=req-comma,1"),
                          ([("authorization", "Bearer req-comma,1")], "/comma")):
        r = stack.request("GET", path, headers=headers)
        assert r.status == 200, (headers, path, r)
        assert upstream_values(r, "x-api-key-id") == ["k_comma"], (headers, path)


# -- scope rules --------------------------------------------------------------------------------


@pytest.mark.parametrize("method, path, scopes, status", [
    pytest.param("GET", "/orders/7", ["orders:read"], 200, id="read-rule"),
    pytest.param("POST", "/orders", ["orders:read"], 403, id="post-needs-write"),
    pytest.param("POST", "/orders", ["orders:write"], 200, id="post-with-write"),
    # POST matches only the first rule's method list; PUT falls through to the second.
    pytest.param("PUT", "/orders/7", ["orders:write"], 403, id="put-falls-to-read-rule"),
    pytest.param("PUT", "/orders/7", ["orders:read"], 200, id="put-with-read"),
    pytest.param("GET", "/orders-archive", ["reports"], 403, id="plain-byte-prefix"),
    pytest.param("GET", "/admin/users", ["admin"], 403, id="needs-every-scope"),
    pytest.param("GET", "/admin/users", ["ops", "admin"], 200, id="holds-every-scope"),
    pytest.param("GET", "/public?next=/admin", [], 200, id="query-is-not-matched"),
    # Rules match the path as upstreams read it: case folded, as IIS does.
    pytest.param("GET", "/Orders", [], 403, id="case-is-folded"),
    pytest.param("GET", "/public/orders", [], 200, id="no-rule-matches"),
])
def test_rules_demand_scopes(stack, method, path, scopes, status):
    raw = f"req-rule-{method}-{path}-{'+'.join(scopes)}".replace("/", "_").replace("?", "_").replace("+", "_")
    add_key(stack, raw, "k_rule", scopes=scopes)
    r = stack.request(method, path, headers=[("x-api-key", raw)])
    if status == 200:
        assert r.status == 200, r
        assert r.json()["method"] == method and r.json()["path"] == path
    else:
        assert_error(r, 403, "permission_denied")


# -- key sources --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["Bearer req-bearer-key", "bearer req-bearer-key", "BEARER req-bearer-key",
                                   "bEaReR   req-bearer-key"])
def test_bearer_scheme_is_any_case_and_the_header_is_stripped(stack, value):
    h = add_key(stack, "req-bearer-key", "k_bearer")
    r = stack.request("GET", "/src/bearer", headers=[("authorization", value)])
    assert r.status == 200, r
    assert upstream_values(r, "x-api-key-id") == ["k_bearer"]
    assert upstream_values(r, "authorization") == []
    assert h in stack.keyservice.lookups()["by_hash"]


def test_query_key_is_form_decoded_and_removed_keeping_the_rest_byte_for_byte(stack):
    h = add_key(stack, "req-query/key~1", "k_query")
    r = stack.request("GET", "/src/query?a=1&api_key=req-query%2Fkey~1&b=%2F&c&d=x+y&e=%zz",
                      headers=[])
    assert r.status == 200, r
    assert r.json()["path"] == "/src/query?a=1&b=%2F&c&d=x+y&e=%zz"
    assert upstream_values(r, "x-api-key-id") == ["k_query"]
    assert stack.keyservice.lookups()["by_hash"][h] == 1


@pytest.mark.parametrize("path, forwarded", [
    pytest.param("/src/query-alone?api_key=req-query-alone", "/src/query-alone", id="alone"),
    pytest.param("/src/query-first?api_key=req-query-alone&z=9", "/src/query-first?z=9", id="first"),
    pytest.param("/src/query-last?z=9&api_key=req-query-alone", "/src/query-last?z=9", id="last"),
])
def test_query_key_removal_drops_the_question_mark_only_when_nothing_is_left(stack, path, forwarded):
    add_key(stack, "req-query-alone", "k_query_alone")
    r = stack.request("GET", path)
    assert r.status == 200, r
    assert r.json()["path"] == forwarded


def test_sources_are_tried_in_order_and_all_are_stripped(stack):
    for n in (1, 2, 3):
        add_key(stack, f"req-order-{n}", f"k_order_{n}")

    r = stack.request("GET", "/src/order?api_key=req-order-3&z=1",
                      headers=[("authorization", "Bearer req-order-2"), ("x-api-key", "req-order-1")])
    assert r.status == 200, r
    assert upstream_values(r, "x-api-key-id") == ["k_order_1"]  # the header is the first source
    assert r.json()["path"] == "/src/order?z=1"
    assert upstream_values(r, "authorization") == [] and upstream_values(r, "x-api-key") == []

    r = stack.request("GET", "/src/order?api_key=req-order-3", headers=[("authorization", "Bearer req-order-2")])
    assert r.status == 200, r
    assert upstream_values(r, "x-api-key-id") == ["k_order_2"]
    assert r.json()["path"] == "/src/order"
    assert upstream_values(r, "authorization") == []


def test_an_empty_source_is_skipped_for_the_next(stack):
    add_key(stack, "req-skip-empty", "k_skip_empty")
    r = stack.request("GET", "/src/skip", headers=[("x-api-key", ""), ("authorization", "Bearer req-skip-empty")])
    assert r.status == 200, r
    assert upstream_values(r, "x-api-key-id") == ["k_skip_empty"]
    assert upstream_values(r, "x-api-key") == [] and upstream_values(r, "authorization") == []


def test_authorization_with_another_scheme_is_not_a_key_and_reaches_the_upstream(stack):
    add_key(stack, "req-basic-beside", "k_basic")
    basic = "Basic dXNlcjpwYXNzd29yZA=="
    r = stack.request("GET", "/src/basic", headers=[("authorization", basic), ("x-api-key", "req-basic-beside")])
    assert r.status == 200, r
    assert upstream_values(r, "authorization") == [basic]
    assert upstream_values(r, "x-api-key-id") == ["k_basic"]

    r = stack.request("GET", "/src/basic-alone", headers=[("authorization", basic)])
    assert_error(r, 401, "api_key_missing")


# -- identity headers -----------------------------------------------------------------------------


def test_identity_headers_sent_by_the_client_are_replaced(stack):
    add_key(stack, "req-spoof-key", "k_spoof", owner="acme", scopes=["a"])
    r = stack.request("GET", "/identity/spoof", headers=[
        ("x-api-key-id", "k_admin"), ("x-api-key-id", "k_other"),
        ("X-API-Key-Owner", "evil"), ("x-api-key-scopes", "admin,ops"),
        ("x-api-key", "req-spoof-key"),
    ])
    assert r.status == 200, r
    assert upstream_values(r, "x-api-key-id") == ["k_spoof"]
    assert upstream_values(r, "x-api-key-owner") == ["acme"]
    assert upstream_values(r, "x-api-key-scopes") == ["a"]


@pytest.mark.parametrize("record", [
    pytest.param({}, id="defaults"),
    pytest.param({"owner": "", "scopes": []}, id="explicit-empty"),
])
def test_identity_headers_with_empty_values_are_left_out_even_when_spoofed(stack, record):
    raw = f"req-bare-key-{len(record)}"
    add_key(stack, raw, "k_bare", **record)
    r = stack.request("GET", "/identity/bare", headers=[
        ("x-api-key-owner", "evil"), ("x-api-key-scopes", "admin"), ("x-api-key", raw),
    ])
    assert r.status == 200, r
    assert upstream_values(r, "x-api-key-id") == ["k_bare"]
    assert upstream_values(r, "x-api-key-owner") == []
    assert upstream_values(r, "x-api-key-scopes") == []


# -- bad input ----------------------------------------------------------------------------------

MALFORMED = "The API key is malformed."

BAD_INPUT = [
    # (headers, path, code, raw key whose lookup must not happen or None)
    pytest.param([("x-api-key", "")], "/bad/empty", "api_key_missing", None, id="empty-header"),
    pytest.param([], "/bad/empty-query?api_key=&z=1", "api_key_missing", None, id="empty-query"),
    pytest.param([("authorization", "Bearer")], "/bad/bearer-alone", "api_key_missing", None, id="bearer-alone"),
    pytest.param([("authorization", "Bearer ")], "/bad/bearer-space", "api_key_missing", None, id="bearer-space"),
    pytest.param([("x-api-key", b"\xff\xfe")], "/bad/non-utf8", "api_key_invalid", b"\xff\xfe", id="non-utf8-header"),
    pytest.param([("x-api-key", b"req-caf\xc3\xa9")], "/bad/utf8", "api_key_invalid", "req-café",
                 id="non-ascii-header"),
    pytest.param([("authorization", b"Bearer \xff\xfe")], "/bad/non-utf8-bearer", "api_key_invalid", b"\xff\xfe",
                 id="non-utf8-bearer"),
    pytest.param([("x-api-key", "k" * 8192)], "/bad/8k", "api_key_invalid", "k" * 8192, id="8KiB-key"),
    pytest.param([("x-api-key", "k" * 1025)], "/bad/1025", "api_key_invalid", "k" * 1025, id="1025-byte-key"),
    pytest.param([], "/bad/q?api_key=%FF%FE", "api_key_invalid", b"\xff\xfe", id="non-utf8-query"),
    pytest.param([], "/bad/q?api_key=req%01ctl", "api_key_invalid", "req\x01ctl", id="control-byte-query"),
    pytest.param([], "/bad/q?api_key=req%7Fdel", "api_key_invalid", "req\x7fdel", id="del-byte-query"),
    pytest.param([], "/bad/q?api_key=req+space", "api_key_invalid", "req space", id="plus-is-a-space"),
    pytest.param([], "/bad/q?api_key=req%20space2", "api_key_invalid", "req space2", id="encoded-space"),
    pytest.param([("x-api-key", "req-bad-dup"), ("x-api-key", "")], "/bad/dup", "api_key_duplicate", None,
                 id="duplicate-with-an-empty-one"),
]


@pytest.mark.parametrize("headers, path, code, raw", BAD_INPUT)
def test_bad_input_is_401_without_a_lookup(stack, headers, path, code, raw):
    before = stack.keyservice.lookups()["total"]
    stack.upstream.clear()
    r = stack.request("GET", path, headers=headers)
    body = assert_error(r, 401, code)
    if code == "api_key_invalid":
        assert body["error"]["message"] == MALFORMED
    assert stack.upstream.requests() == []
    assert stack.keyservice.lookups()["total"] == before
    if raw is not None:
        assert lookups_of(stack, raw) == 0


def test_a_1024_byte_key_is_still_a_key(stack):
    raw = "req-long-" + "x" * (1024 - len("req-long-"))
    h = add_key(stack, raw, "k_long")
    r = stack.request("GET", "/bad/1024", headers=[("x-api-key", raw)])
    assert r.status == 200, r
    assert upstream_values(r, "x-api-key-id") == ["k_long"]
    assert stack.keyservice.lookups()["by_hash"][h] == 1


def test_envoy_stays_healthy_after_bad_input(stack):
    add_key(stack, "req-healthy-after", "k_healthy")
    bad = [
        [("x-api-key", b"\xff\xfe\x80")], [("x-api-key", "z" * 8192)], [("authorization", "Bearer")],
        [("authorization", b"bearer \xc0\xaf")], [("x-api-key", "a"), ("x-api-key", "b")], [("x-api-key", "")],
    ]
    for headers in bad:
        assert stack.request("GET", "/healthy/bad", headers=headers).status == 401
    for path in ("/healthy/q?api_key=%00", "/healthy/q?api_key=%", "/healthy/q?api_key=%F", "/healthy/q?&&=&api_key",
                 "/healthy/q?api_key=a&api_key", "/healthy/q?" + "api_key=x&" * 200):
        assert stack.request("GET", path).status == 401, path
    r = stack.request("GET", "/healthy/good", headers=[("x-api-key", "req-healthy-after")])
    assert r.status == 200, r
    assert upstream_values(r, "x-api-key-id") == ["k_healthy"]
    log = stack.envoy_log()
    assert "panicked" not in log and "Uncaught" not in log


# -- the raw key goes nowhere ---------------------------------------------------------------------

# Distinctive, so a grep cannot match anything else.
SECRET_HEADER = "zqSECRET-hdr-5be1c7d0"
SECRET_BEARER = "zqSECRET-brr-0a9e44f2"
SECRET_QUERY = "zqSECRET-qry-77c3b6aa"
SECRET_REVOKED = "zqSECRET-rev-c81d2e35"
SECRET_UNKNOWN = "zqSECRET-unk-3f6b90d1"
SECRETS = (SECRET_HEADER, SECRET_BEARER, SECRET_QUERY, SECRET_REVOKED, SECRET_UNKNOWN)


def test_the_raw_key_appears_in_no_log_lookup_forwarded_request_or_error(stack):
    add_key(stack, SECRET_HEADER, "k_secret_h")
    add_key(stack, SECRET_BEARER, "k_secret_b")
    add_key(stack, SECRET_QUERY, "k_secret_q")
    revoked_hash = add_key(stack, SECRET_REVOKED, "k_secret_r", revoked=True)
    stack.upstream.clear()

    responses = [
        stack.request("GET", "/secret/h", headers=[("x-api-key", SECRET_HEADER)]),
        stack.request("GET", "/secret/b", headers=[("authorization", f"Bearer {SECRET_BEARER}")]),
        stack.request("GET", f"/secret/q?api_key={SECRET_QUERY}&z=1"),
        stack.request("GET", "/secret/r", headers=[("x-api-key", SECRET_REVOKED)]),
        stack.request("GET", "/secret/u", headers=[("authorization", f"bearer {SECRET_UNKNOWN}")]),
        stack.request("GET", f"/secret/d?api_key={SECRET_QUERY}&api_key={SECRET_UNKNOWN}"),
    ]
    assert [r.status for r in responses] == [200, 200, 200, 401, 401, 401]

    for r in responses:
        for secret in SECRETS:
            assert secret not in r.text and all(secret not in v for _, v in r.headers)
    forwarded = repr(stack.upstream.requests())
    lookups = repr(stack.keyservice.lookups()["recent"])
    access = stack.wait_for("access", '"GET /secret/d ')
    # The filter logs a denied known key at debug by its fingerprint: proof that its debug
    # lines reach this log, so their lack of the raw key means something.
    log = stack.wait_for("envoy", revoked_hash[:12])
    for secret in SECRETS:
        assert secret not in forwarded
        assert secret not in lookups
        assert secret not in access and key_hash(secret) not in access
        assert secret not in log, [line for line in log.splitlines() if secret in line]
    filter_lines = [line for line in log.splitlines() if "wasm log" in line]
    assert all(revoked_hash not in line for line in filter_lines)  # a fingerprint, not the whole hash


def access_status(stack, path):
    """The status the access log shows for the one request to path."""
    log = stack.wait_for("access", f'"GET {path} ')
    line = next(line for line in log.splitlines() if f'"GET {path} ' in line)
    return line.split('" ', 1)[1].split()[0]


def test_a_denied_requests_key_is_gone_before_the_access_log(stack):
    stack.request("GET", "/acclog/header", headers=[("x-api-key", "req-acclog-unknown")])
    stack.request("GET", "/acclog/bearer", headers=[("authorization", "Bearer req-acclog-unknown")])
    stack.request("GET", "/acclog/query?api_key=req-acclog-unknown")
    stack.request("GET", "/acclog/basic", headers=[("authorization", "Basic cmVxOmFjY2xvZw==")])

    for path in ("/acclog/header", "/acclog/bearer", "/acclog/query", "/acclog/basic"):
        assert access_status(stack, path) == "401", path
    # The shipped format prints no header that can carry a key, nor the query.
    assert "req-acclog-unknown" not in stack.access_log()
    assert "cmVxOmFjY2xvZw==" not in stack.access_log()


# -- other configurations -------------------------------------------------------------------------

CUSTOM_CONFIG = {
    "key_service": {"cluster": "key_service"},
    "key_sources": [{"header": "X-Token", "scheme": "Token"}, {"query": "key"}, {"header": "X-Alt-Key"}],
    "rate_limit": None,
    "identity_headers": {"key_id": "x-client-id", "owner": "x-client-owner", "scopes": "x-client-scopes"},
}


@pytest.fixture(scope="module")
def custom():
    with Stack(CUSTOM_CONFIG, concurrency=1) as s:
        yield s


def test_custom_sources_and_identity_header_names(custom):
    add_key(custom, "req-custom-key", "k_custom", owner="initech", scopes=["x", "y"])
    r = custom.request("GET", "/custom?keep=1", headers=[
        ("x-token", "token req-custom-key"), ("x-client-id", "k_spoofed"), ("X-Client-Scopes", "root"),
    ])
    assert r.status == 200, r
    assert upstream_values(r, "x-client-id") == ["k_custom"]
    assert upstream_values(r, "x-client-owner") == ["initech"]
    assert upstream_values(r, "x-client-scopes") == ["x,y"]
    assert upstream_values(r, "x-api-key-id") == [] and upstream_values(r, "x-api-key-owner") == []
    assert upstream_values(r, "x-token") == []
    assert r.json()["path"] == "/custom?keep=1"


def test_custom_query_name_and_header_are_stripped_whichever_wins(custom):
    add_key(custom, "req-custom-q", "k_custom_q")
    r = custom.request("GET", "/custom?key=req-custom-q&api_key=not-a-source",
                       headers=[("x-alt-key", "req-custom-unused"), ("x-token", "Basic abc")])
    assert r.status == 200, r
    assert upstream_values(r, "x-client-id") == ["k_custom_q"]
    assert r.json()["path"] == "/custom?api_key=not-a-source"
    assert upstream_values(r, "x-alt-key") == []
    assert upstream_values(r, "x-token") == ["Basic abc"]  # another scheme: not a key, left alone


def test_challenge_follows_the_sources_in_order_without_repeats(custom):
    r = custom.request("GET", "/custom")
    assert_error(r, 401, "api_key_missing", challenge='Token realm="api", ApiKey realm="api"')


def test_a_scheme_header_sent_twice_is_401_duplicate(custom):
    add_key(custom, "req-custom-dup", "k_custom_dup")
    r = custom.request("GET", "/custom", headers=[("x-token", "Token req-custom-dup"),
                                                  ("x-token", "Token req-custom-dup")])
    assert_error(r, 401, "api_key_duplicate", challenge='Token realm="api", ApiKey realm="api"')


@pytest.fixture(scope="module")
def defaults():
    with Stack({"key_service": {"cluster": "key_service"}}, concurrency=1) as s:
        yield s


def test_default_configuration_reads_x_api_key_only(defaults):
    add_key(defaults, "req-default-key", "k_default", owner="acme", scopes=["s"])
    r = defaults.request("GET", "/d?api_key=req-default-key", headers=[("authorization", "Bearer req-default-key")])
    assert_error(r, 401, "api_key_missing", challenge=CHALLENGE_APIKEY)

    r = defaults.request("GET", "/d?api_key=other", headers=[("X-Api-Key", "req-default-key")])
    assert r.status == 200, r
    assert upstream_values(r, "x-api-key-id") == ["k_default"]
    assert upstream_values(r, "x-api-key-owner") == ["acme"]
    assert upstream_values(r, "x-api-key-scopes") == ["s"]
    assert upstream_values(r, "x-api-key") == []
    # Not a configured source: left as it is.
    assert r.json()["path"] == "/d?api_key=other"
