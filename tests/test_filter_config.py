"""The plugin configuration as Envoy sees it (CONTRACT "Configuration"): a refused configuration
makes Envoy exit with code 1 and log one line naming the field and the reason; a valid one,
however complete, lets Envoy become ready. Each case is one Envoy start (about 0.2 s)."""
import json

import pytest

from testbed.harness import envoy_refuses

REFUSED_PREFIX = "apikey-filter configuration refused: "
CLUSTER = {"cluster": "key_service"}  # the template's key service cluster


def with_service(**fields):
    """A configuration that is valid but for `fields`, as one line of JSON."""
    return json.dumps({"key_service": CLUSTER, **fields})


def refusal_lines(log):
    return [line.split(REFUSED_PREFIX, 1)[1] for line in log.splitlines() if REFUSED_PREFIX in line]


REFUSED = [
    pytest.param("", "key_service.cluster: is required", id="empty"),
    pytest.param("{}", "key_service.cluster: is required", id="empty-object"),
    pytest.param("{key_service: cluster}", "configuration is not valid JSON", id="not-json"),
    pytest.param('["key_service"]', "configuration must be a JSON object", id="not-an-object"),
    pytest.param(with_service(colour="blue"), "colour: unknown field (", id="unknown-top-level-field"),
    pytest.param(json.dumps({"key_service": {"cluster": "key_service", "clsuter": "x"}}),
                 "key_service.clsuter: unknown field (", id="unknown-nested-field"),
    pytest.param(json.dumps({"key_service": {"cluster": ""}}), "key_service.cluster: must not be empty",
                 id="empty-cluster"),
    pytest.param(with_service(cache={"ttl_s": "60"}), "cache.ttl_s: must be a whole number, 0 or more",
                 id="wrong-type"),
    pytest.param(with_service(cache={"ttl_s": -1}), "cache.ttl_s: must be a whole number, 0 or more",
                 id="negative"),
    pytest.param(json.dumps({"key_service": {"cluster": "key_service", "timeout_ms": 0}}),
                 "key_service.timeout_ms: must be between 1 and ", id="out-of-range"),
    pytest.param(with_service(key_sources=[{"header": "x-api-key"}, {"query": "api_key", "scheme": "Bearer"}]),
                 'key_sources[1].scheme: goes only with "header"', id="bad-key-source"),
    pytest.param(with_service(key_sources=[]), "key_sources: must list at least one source", id="no-key-source"),
    pytest.param(with_service(rules=[{"path_prefix": "/ok"}, {"path_prefix": "orders", "scopes": ["x"]}]),
                 "rules[1].path_prefix: must start with /", id="bad-rule"),
    pytest.param(with_service(failure_mode="ajar"), 'failure_mode: must be "closed" or "open"', id="bad-enum"),
]


@pytest.mark.parametrize("config, reason", REFUSED)
def test_envoy_refuses_a_bad_configuration_naming_the_field(config, reason):
    code, log = envoy_refuses(config)
    assert code == 1, f"Envoy exit code {code}; log tail:\n{log[-2000:]}"
    lines = refusal_lines(log)
    assert len(lines) == 1, lines
    assert lines[0].startswith(reason), lines[0]


FULL = {
    "key_sources": [
        {"header": "X-API-Key"},
        {"header": "authorization", "scheme": "Bearer"},
        {"query": "api_key"},
    ],
    "key_service": {
        "cluster": "key_service",
        "authority": "keys.internal",
        "path": "/v2/keys/{key_hash}/record",
        "timeout_ms": 250,
        "headers": {"x-proxy-token": "proxy-credential"},
    },
    "cache": {"ttl_s": 5, "negative_ttl_s": 2, "stale_if_error_s": 0, "max_entries": 1000},
    "rate_limit": {"requests": 10, "period_s": 1, "burst": 20},
    "rules": [
        {"path_prefix": "/orders", "methods": ["POST", "DELETE"], "scopes": ["orders:write"]},
        {"path_prefix": "/orders", "scopes": ["orders:read"]},
    ],
    "identity_headers": {"key_id": "x-client-id", "owner": "x-client-owner", "scopes": "x-client-scopes"},
    "brute_force": {"max_failures": 5, "period_s": 60},
    "failure_mode": "open",
}

ACCEPTED = [
    pytest.param(FULL, id="every-field"),
    pytest.param({"key_service": CLUSTER, "rate_limit": None, "brute_force": None, "rules": []}, id="nulls"),
]


@pytest.mark.parametrize("config", ACCEPTED)
def test_envoy_accepts_a_valid_configuration(config):
    code, log = envoy_refuses(config)
    assert code is None, f"Envoy exited with {code}; refusals: {refusal_lines(log)}"
    assert refusal_lines(log) == []
