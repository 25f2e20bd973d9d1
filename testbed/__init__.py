"""The test bed: the servers and helpers the tests, the demo and the lab (lab/) share.

- keyservice.py: the reference key service (a test double of the contract's protocol and
  change feed, with an admin API); upstream.py: an upstream that records what it received
- harness.py: a whole stack for a test (Envoy with the filter, key service, upstream);
  rls_service.py and rls_client.py: the project's rate limit service and a client for it
- render_envoy.py: Envoy's configuration from envoy/envoy.yaml.tmpl; keyformat.py: keys in
  the `key_format` shape

Run the servers from the repository's root: `python3 -m testbed.keyservice --port 8081`.
"""
