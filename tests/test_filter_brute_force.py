"""`brute_force`: a client that keeps sending bad keys is refused before any lookup."""
import pytest

from testbed.harness import Stack, key_hash

CONFIG = {
    "key_service": {"cluster": "key_service", "timeout_ms": 1000},
    "brute_force": {"max_failures": 3, "period_s": 3600},
    "rules": [{"path_prefix": "/admin", "scopes": ["admin"]}],
}


@pytest.fixture(scope="module")
def stack():
    with Stack(CONFIG, keys={key_hash("valid-key"): {"key_id": "k_valid"}}, concurrency=2) as s:
        yield s


def send(stack, source, key=None, path="/", headers=()):
    key_header = [("x-api-key", key)] if key is not None else []
    return stack.request("GET", path, headers=[*key_header, *headers], source=source)


def code_of(response):
    return response.json()["error"]["code"]


def test_a_guessing_client_is_refused_before_any_lookup_and_others_are_not(stack):
    guesser = "127.0.0.2"
    for i in range(3):
        assert code_of(send(stack, guesser, f"guess-{i}")) == "api_key_invalid"
    lookups = stack.keyservice.lookups()["total"]

    refused = send(stack, guesser, "valid-key")
    assert refused.status == 429
    assert code_of(refused) == "too_many_failed_attempts"
    assert 1 <= int(refused.header("retry-after")) <= 3600
    assert code_of(send(stack, guesser, "guess-new")) == "too_many_failed_attempts"
    assert code_of(send(stack, guesser)) == "too_many_failed_attempts", "checked before the key"
    assert stack.keyservice.lookups()["total"] == lookups, "no callout for a refused client"

    assert send(stack, "127.0.0.3", "valid-key").status == 200


def test_a_forged_x_forwarded_for_does_not_reset_the_budget(stack):
    client = "127.0.0.4"
    for i in range(3):
        forged = [("x-forwarded-for", f"203.0.113.{i}")]
        assert code_of(send(stack, client, f"xff-guess-{i}", headers=forged)) == "api_key_invalid"
    forged = [("x-forwarded-for", "203.0.113.99")]
    assert code_of(send(stack, client, "valid-key", headers=forged)) == "too_many_failed_attempts"


def test_only_failed_keys_are_charged(stack):
    client = "127.0.0.5"
    for _ in range(5):
        assert code_of(send(stack, client)) == "api_key_missing"
        assert code_of(send(stack, client, "valid-key", path="/admin")) == "permission_denied"
        assert send(stack, client, "valid-key").status == 200
    for kind, headers in [
        ("duplicate", [("x-api-key", "a"), ("x-api-key", "b")]),
        ("malformed", [("x-api-key", "x" * 2000)]),
    ]:
        assert send(stack, client, headers=headers).status == 401, kind
    assert code_of(send(stack, client, "unknown-key")) == "api_key_invalid"
    assert code_of(send(stack, client, "valid-key")) == "too_many_failed_attempts"
