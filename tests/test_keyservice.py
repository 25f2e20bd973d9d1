"""The key service (`apikey-keyservice`, docs/apikey-keyservice.md) on its own, against
the real binary on SQLite and on a real PostgreSQL: the admin API and its errors, the
filter's API and change feed, restarts, and that no key it made is ever stored, logged,
counted or audited."""
import itertools
import json
import threading

import pytest

from testbed.harness import key_hash
from testbed.postgres import Postgres
from testbed.real_keyservice import AdminClient, KeyService, as_json, files_below

DATABASES = itertools.count()


@pytest.fixture(scope="module")
def postgres():
    with Postgres() as pg:
        yield pg


@pytest.fixture(params=["sqlite", "postgres"])
def ks(request):
    """The service on each database; `ks.stored()`: every file the database and the
    service wrote, by path."""
    if request.param == "sqlite":
        with KeyService() as service:
            service.stored = service.files
            yield service
    else:
        pg = request.getfixturevalue("postgres")
        with KeyService(db=pg.database(f"keys{next(DATABASES)}")) as service:
            service.stored = lambda: {**files_below(pg.tmp), **service.files()}
            yield service


def error_code(response):
    return response.json()["error"]["code"]


def test_a_created_key_is_found_by_its_hash_with_the_record_the_filter_reads(ks):
    made = ks.admin.create(owner="acme", name="ci", scopes=["orders:read"],
                           rate_limit={"requests": 10, "period_s": 1})
    key = made["key"]
    assert key.startswith("ak_live_") and made["key_hash"] == key_hash(key)
    found = ks.lookup(key_hash(key))
    assert found.status == 200
    assert found.json() == {"key_id": made["key_id"], "owner": "acme", "scopes": ["orders:read"],
                            "rate_limit": {"requests": 10, "period_s": 1}}
    assert ks.lookup(key_hash("not-a-key")).status == 404
    assert ks.lookup("ABC").status == 400
    view = ks.admin.show(made["key_id"])
    assert "key" not in view, "the key is shown once, when made"
    assert view["name"] == "ci" and view["revoked"] is False and view["last_used_at"] is None


def test_update_revoke_and_delete_change_what_lookups_answer(ks):
    made = ks.admin.create(owner="acme")
    h = made["key_hash"]
    assert ks.lookup(h).json().get("scopes") is None
    ks.admin.update(made["key_id"], scopes=["admin"], expires_at=1_900_000_000)
    assert ks.lookup(h).json()["scopes"] == ["admin"]
    assert ks.admin.update(made["key_id"], expires_at=None)["expires_at"] is None
    assert ks.admin.revoke(made["key_id"])["revoked"] is True
    assert ks.lookup(h).json()["revoked"] is True
    ks.admin.delete(made["key_id"])
    assert ks.lookup(h).status == 404
    assert ks.admin.request("GET", f"/admin/v1/keys/{made['key_id']}").status == 404


def test_rotate_gives_a_new_key_with_the_old_record_and_the_old_one_a_deadline(ks):
    old = ks.admin.create(owner="acme", scopes=["read"], expires_at=4_000_000_000)
    new = ks.admin.rotate(old["key_id"], grace_s=600)
    assert new["key"] != old["key"] and new["rotated_from"] == old["key_id"]
    assert new["scopes"] == ["read"] and new["owner"] == "acme"
    assert new["expires_at"] == 4_000_000_000, "the new key keeps the record's own expiry"
    old_view = ks.admin.show(old["key_id"])
    assert old_view["rotated_to"] == new["key_id"]
    assert old_view["expires_at"] <= new["created_at"] + 600
    assert ks.lookup(old["key_hash"]).json()["expires_at"] == old_view["expires_at"]
    again = ks.admin.request("POST", f"/admin/v1/keys/{old['key_id']}/rotate", {})
    assert (again.status, error_code(again)) == (409, "conflict")


def test_listing_pages_by_key_id_and_filters_by_owner(ks):
    for owner in ["a", "b", "a", "a"]:
        ks.admin.create(owner=owner)
    first = ks.admin.list("?owner=a&limit=2")
    assert len(first["keys"]) == 2 and first["next"]
    rest = ks.admin.list(f"?owner=a&limit=2&after={first['next']}")
    assert len(rest["keys"]) == 1 and rest["next"] is None
    assert {k["owner"] for k in first["keys"] + rest["keys"]} == {"a"}


BAD_CALLS = [
    ("POST", "/admin/v1/keys", {"scopes": "read"}, 400, "invalid_field", "scopes"),
    ("POST", "/admin/v1/keys", {"rate_limit": {"requests": 0, "period_s": 1}}, 400, "invalid_field",
     "rate_limit.requests"),
    ("POST", "/admin/v1/keys", {"allowed_cidrs": ["10.0.0.0/33"]}, 400, "invalid_field", "allowed_cidrs"),
    ("POST", "/admin/v1/keys", {"owner": "x", "ownr": "y"}, 400, "invalid_field", "ownr"),
    ("POST", "/admin/v1/keys", {"prefix": "sk_other_"}, 400, "invalid_field", "prefix"),
    ("POST", "/admin/v1/keys", "{not json", 400, "invalid_field", "not JSON"),
    ("POST", "/admin/v1/keys", [1, 2], 400, "invalid_field", "object"),
    ("PATCH", "/admin/v1/keys/{id}", {"expires_at": "soon"}, 400, "invalid_field", "expires_at"),
    ("PATCH", "/admin/v1/keys/{id}", {"key_id": "k_mine"}, 400, "invalid_field", "key_id"),
    ("PATCH", "/admin/v1/keys/k_none", {"owner": "x"}, 404, "not_found", ""),
    ("POST", "/admin/v1/keys/{id}/rotate", {"grace_s": -1}, 400, "invalid_field", "grace_s"),
    ("POST", "/admin/v1/keys/k_none/revoke", None, 404, "not_found", ""),
    ("DELETE", "/admin/v1/keys/k_none", None, 404, "not_found", ""),
    ("GET", "/admin/v1/keys?limit=0", None, 400, "invalid_field", "limit"),
    ("GET", "/admin/v1/keys?limit=many", None, 400, "invalid_field", "limit"),
    ("GET", "/admin/v1/audit?after=x", None, 400, "invalid_field", "after"),
]


@pytest.mark.parametrize("method,path,body,status,code,names", BAD_CALLS,
                         ids=[f"{c[0]} {c[1]} {c[5] or c[3]}" for c in BAD_CALLS])
def test_bad_input_gets_the_contracts_error_and_changes_nothing(ks, method, path, body, status, code, names):
    made = ks.admin.create(owner="acme", scopes=["read"])
    ks.settled()
    before = (ks.admin.show(made["key_id"]), ks.admin.list(), ks.admin.audit(), ks.changes(after="c-0").json())
    r = ks.admin.request(method, path.replace("{id}", made["key_id"]), body)
    assert (r.status, error_code(r)) == (status, code), r.text
    assert names in r.json()["error"]["message"]
    ks.settled()
    after = (ks.admin.show(made["key_id"]), ks.admin.list(), ks.admin.audit(), ks.changes(after="c-0").json())
    assert after == before


def test_without_a_valid_admin_token_nothing_changes(ks):
    made = ks.admin.create(owner="acme")
    before = ks.admin.list(), ks.admin.audit()
    for token in [None, "akadm_wrong", ks.token + "x"]:
        anonymous = AdminClient(ks.admin_port, token)
        for method, path, body in [("POST", "/admin/v1/keys", {"owner": "x"}),
                                   ("POST", f"/admin/v1/keys/{made['key_id']}/revoke", None),
                                   ("PATCH", f"/admin/v1/keys/{made['key_id']}", {"owner": "x"}),
                                   ("DELETE", f"/admin/v1/keys/{made['key_id']}", None),
                                   ("GET", "/admin/v1/keys", None), ("GET", "/admin/v1/audit", None)]:
            r = anonymous.request(method, path, body)
            assert (r.status, error_code(r)) == (401, "unauthorized"), (token, method, path)
    assert (ks.admin.list(), ks.admin.audit()) == before
    ks.cli("admin-token", "revoke", "--db", ks.db, "--name", "tests")
    r = ks.admin.request("GET", "/admin/v1/keys")
    assert r.status == 401, "a revoked admin token is refused"


def test_every_change_is_audited_with_who_and_what_never_a_key(ks):
    made = ks.admin.create(owner="acme", name="n1")
    kid = made["key_id"]
    ks.admin.update(kid, scopes=["a"])
    new = ks.admin.rotate(kid, grace_s=0)
    ks.admin.revoke(new["key_id"])
    ks.admin.delete(kid)
    events = ks.admin.audit()["events"]
    assert [(e["action"], e["actor"]) for e in events] == [
        ("create", "tests"), ("update", "tests"), ("rotate", "tests"), ("revoke", "tests"), ("delete", "tests")]
    assert events[1]["changes"] == {"scopes": ["a"]}
    assert ks.admin.audit(f"?key_id={new['key_id']}")["events"][0]["action"] == "revoke"
    text = json.dumps(events)
    assert made["key"] not in text and new["key"] not in text


def test_the_feed_lists_every_changed_hash_and_says_410_for_a_cursor_it_did_not_make(ks):
    start = ks.changes().json()
    assert start["key_hashes"] == []
    a = ks.admin.create(owner="a")
    b = ks.admin.create(owner="b")
    ks.admin.revoke(a["key_id"])
    ks.settled()
    listed = ks.changes(after=start["cursor"]).json()
    assert listed["key_hashes"] == [a["key_hash"], b["key_hash"]], "each hash once, in order"
    assert ks.changes(after=listed["cursor"]).json() == {"cursor": listed["cursor"], "key_hashes": []}
    for cursor in ["c-999999", "x-1", "c--1"]:
        assert ks.changes(after=cursor).status == 410, cursor


def race(reader, writers, keys_each, change):
    """Each of `writers` (key services, one thread each) makes `keys_each` keys and changes
    each with `change(service, key)` while a thread polls `reader`'s feed from where it
    stands; once they are done and the feed has settled: the hashes made, and those seen."""
    cursor = reader.changes().json()["cursor"]
    made, seen, stop = [], set(), threading.Event()

    def write(service):
        for _ in range(keys_each):
            key = service.admin.create(owner="race")
            made.append(key["key_hash"])
            change(service, key)

    def poll():
        nonlocal cursor
        while True:
            answer = reader.changes(after=cursor).json()
            seen.update(answer["key_hashes"])
            cursor = answer["cursor"]
            if stop.is_set() and not answer["key_hashes"]:
                return

    poller = threading.Thread(target=poll)
    poller.start()
    threads = [threading.Thread(target=write, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader.settled()
    stop.set()
    poller.join(30)
    return made, seen


def test_writers_racing_on_one_database_lose_no_change_in_the_feed(ks):
    """Eight writers make changes while a reader polls the feed: every changed hash appears."""
    made, seen = race(ks, [ks] * 8, 40, lambda service, key: service.admin.revoke(key["key_id"]))
    assert len(made) == 320
    assert set(made) <= seen


def test_a_restart_keeps_every_key_and_the_feeds_cursor(ks):
    made = [ks.admin.create(owner=f"o{i}") for i in range(5)]
    cursor = ks.settled()
    ks.stop_serving()
    ks.start_serving()
    for key in made:
        assert ks.lookup(key["key_hash"]).status == 200
    assert ks.changes(after=cursor).json() == {"cursor": cursor, "key_hashes": []}


def test_the_proxy_token_guards_the_filters_api(tmp_path):
    token_file = tmp_path / "proxy-token"
    token_file.write_text("s3cret\n")
    with KeyService(extra=["--proxy-token-file", token_file]) as ks:
        made = ks.admin.create(owner="acme")
        assert ks.lookup(made["key_hash"]).status == 401
        assert ks.lookup(made["key_hash"], [("authorization", "Bearer wrong")]).status == 401
        assert ks.lookup(made["key_hash"], [("authorization", "Bearer s3cret")]).status == 200
        assert ks.changes(headers=[("authorization", "Bearer s3cret")]).status == 200
        assert ks.changes().status == 401


def test_no_key_it_made_is_in_its_database_log_metrics_or_audit(ks):
    made = [ks.admin.create(owner="acme")]
    made.append(ks.admin.rotate(made[0]["key_id"]))
    for key in made:
        ks.lookup(key["key_hash"])
    ks.admin.revoke(made[1]["key_id"])
    keys = [m["key"] for m in made]
    where = {**ks.stored(), "metrics": ks.metrics().encode(),
             "audit": json.dumps(ks.admin.audit()).encode(), "list": json.dumps(ks.admin.list()).encode()}
    for name, content in where.items():
        for key in keys:
            assert key.encode() not in content, f"a key in {name}"
    assert as_json(ks.lookup(made[0]["key_hash"]))["key_id"] == made[0]["key_id"]
    for name, content in ks.stored().items():
        assert ks.token.encode() not in content, f"an admin token in {name}: they are stored hashed"


def test_writers_on_two_processes_on_one_postgresql_lose_no_change_in_the_feed(postgres):
    """Eight writers on two `serve` processes make changes while a reader polls one of
    them: every changed hash appears, whichever process made it."""
    url = postgres.database("two-writers")
    with KeyService(db=url) as a, KeyService(db=url, token=a.token) as b:
        made, seen = race(a, [a, b] * 4, 125,
                          lambda service, key: service.admin.update(key["key_id"], scopes=["x"]))
        assert len(made) == 1000
        assert set(made) <= seen
        assert b.lookup(made[0]).json()["scopes"] == ["x"]


def test_keys_made_elsewhere_are_imported_by_hash_once(ks, tmp_path):
    """The demo's keys file (hashes and records): what a key service being replaced hands over."""
    from testbed.harness import ROOT
    demo = ROOT / "envoy" / "demo" / "keys.json"
    ks.cli("keys", "import", "--db", ks.db, "--file", demo)
    alice = ks.lookup(key_hash("demo-key-alice"))
    assert alice.status == 200 and alice.json()["key_id"] == "k_alice"
    assert ks.lookup(key_hash("demo-key-revoked")).json()["revoked"] is True
    assert ks.admin.show("k_revoked")["revoked_at"] is not None
    events = ks.admin.audit()["events"]
    assert {e["action"] for e in events} == {"import"} and len(events) == len(json.loads(demo.read_text())["keys"])
    ks.cli("keys", "import", "--db", ks.db, "--file", demo)
    assert len(ks.admin.audit()["events"]) == len(events), "run again: nothing changes"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"keys": {"ABC": {"key_id": "k_x"}}}))
    with pytest.raises(Exception, match="key_hash"):
        ks.cli("keys", "import", "--db", ks.db, "--file", bad)
    bad.write_text(json.dumps({"keys": {key_hash("x"): {"key_id": "k_x", "scopes": "all"}}}))
    with pytest.raises(Exception, match="scopes"):
        ks.cli("keys", "import", "--db", ks.db, "--file", bad)
    assert ks.lookup(key_hash("x")).status == 404


WRITE_LOCK = 0x61_706B_6B73_0002  # store/postgres.rs: the lock every write takes first


def test_on_postgresql_a_write_commits_only_after_one_that_took_its_change_number_first(postgres):
    """The feed's promise, shown with a writer held open on purpose: a transaction that took
    the write lock and its change number, then waits before committing. A change made through
    the service meanwhile waits for it, so it cannot commit a later number first; a reader
    polling all along never moves past the held change without listing it. (Without the lock,
    the service's change would commit at once, and a reader could pass the held number while
    it is still invisible, never to list it.)"""
    import subprocess
    import time
    from testbed.postgres import bin_dir
    url = postgres.database("held-writer")
    with KeyService(db=url) as ks:
        held = key_hash("held-writer")
        sql = (f"SET application_name = 'held-writer'; BEGIN; SELECT pg_advisory_xact_lock({WRITE_LOCK}); "
               f"INSERT INTO changes (key_hash, at) VALUES ('{held}', 0); SELECT pg_sleep(1.5); COMMIT;")
        writer = subprocess.Popen(postgres._as_server_user(
            [bin_dir() / "psql", "-h", "127.0.0.1", "-p", postgres.port, "-U", "apikey", "-d", "held-writer",
             "-v", "ON_ERROR_STOP=1", "-c", sql]), stdout=subprocess.DEVNULL)
        try:
            taken = ("SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                     f"WHERE l.locktype = 'advisory' AND l.granted AND l.objid = {WRITE_LOCK & 0xFFFFFFFF} "
                     "AND a.application_name = 'held-writer'")
            deadline = time.monotonic() + 10
            while postgres.psql(taken, "held-writer").strip() != "1":
                assert time.monotonic() < deadline, "the held writer never took the lock"
                time.sleep(0.02)
            made = ks.admin.create(owner="after-the-held-one")
            committed = postgres.psql(f"SELECT count(*) FROM changes WHERE key_hash = '{held}'", "held-writer")
            assert committed.strip() == "1", "the service's write committed before the held one"
        finally:
            writer.wait(10)
        ks.settled()
        listed = ks.changes(after="c-0").json()["key_hashes"]
        assert listed.index(held) < listed.index(made["key_hash"])


def test_the_cli_makes_revokes_rotates_and_audits_keys_through_the_admin_api():
    import os
    import subprocess
    from testbed.real_keyservice import binary
    with KeyService() as ks:
        url = f"--url=http://127.0.0.1:{ks.admin_port}"

        def cli(*args, token=ks.token):
            env = {**os.environ, "APIKEY_ADMIN_TOKEN": token}
            done = subprocess.run([binary(), *args, url], capture_output=True, text=True, env=env, timeout=30)
            return done.returncode, json.loads(done.stdout) if done.stdout.strip() else None, done.stderr

        code, made, _ = cli("keys", "create", "--owner", "acme", "--scope", "read", "--scope", "write",
                            "--json", '{"rate_limit": {"requests": 5, "period_s": 1}}')
        assert code == 0 and made["scopes"] == ["read", "write"] and made["rate_limit"]["requests"] == 5
        assert ks.lookup(key_hash(made["key"])).json()["owner"] == "acme"
        assert cli("keys", "list", "--owner", "acme")[1]["keys"][0]["key_id"] == made["key_id"]
        assert cli("keys", "update", made["key_id"], "--name", "ci")[1]["name"] == "ci"
        code, new, _ = cli("keys", "rotate", made["key_id"], "--grace-s", "60")
        assert code == 0 and new["rotated_from"] == made["key_id"]
        assert cli("keys", "revoke", new["key_id"])[1]["revoked"] is True
        assert cli("keys", "delete", made["key_id"])[0] == 0
        assert cli("keys", "show", made["key_id"])[0] == 1
        actions = [e["action"] for e in cli("audit")[1]["events"]]
        assert actions == ["create", "update", "rotate", "revoke", "delete"]
        code, _, err = cli("keys", "create", "--owner", "x", token="akadm_wrong")
        assert code == 1 and "unauthorized" in err
        code, _, err = cli("keys", "create", "--json", '{"scopes": "all"}')
        assert code == 1 and "invalid_field" in err
        assert len(cli("audit")[1]["events"]) == 5, "refused calls change nothing"
