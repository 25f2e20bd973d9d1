#!/usr/bin/env python3
"""Does a flood of random keys take stale-if-error away from valid keys?

    python3 lab/load/flood_then_outage.py [K] [MAX_ENTRIES]     # 100000 100000

A stub key service (an Envoy with direct_response routes: 200 keys answered 200, everything
else 404), the recording upstream and Envoy with the filter (cache.max_entries MAX_ENTRIES,
ttl_s 600, stale_if_error_s 600). It asks for the 200 valid keys (cached), sends K never-seen
random keys (wrk, lab/load/flood.lua), stops the stub key service, then asks for the 200
valid keys again and prints what they got. Every one should get 200 from the cache: an unknown
key's negative entry never displaces a found one that may still be used (src/cache_entry.rs).
Before that rule, with one slot per key, about 1 - exp(-K / MAX_ENTRIES) of the valid keys
lost their entry and got 503 (129 of 200 at K = MAX_ENTRIES = 100000). Uses the built .wasm
(scripts/build).
"""
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loadlib as L  # noqa: E402

L.set_tag("flood_then_outage")
VALID = [f"fto-valid-{i}" for i in range(200)]


def stub_config(port, admin):
    ct = [{"header": {"key": "content-type", "value": "application/json"}}]
    routes = [{"match": {"path": f"/v1/keys/{L.key_hash(k)}"},
               "direct_response": {"status": 200, "body": {"inline_string": json.dumps({"key_id": k, "rate_limit": None})}},
               "response_headers_to_add": ct} for k in VALID]
    routes.append({"match": {"prefix": "/"}, "direct_response": {"status": 404, "body": {"inline_string": "{}"}}})
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "stub", "route_config": {"virtual_hosts": [{"name": "k", "domains": ["*"], "routes": routes}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    return {"admin": {"address": {"socket_address": {"address": L.HOST, "port_value": admin}}},
            "static_resources": {"listeners": [{
                "name": "stub", "address": {"socket_address": {"address": L.HOST, "port_value": port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                 "typed_config": hcm}]}]}]}}


def main():
    k = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    m = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
    wrk = L.ensure_wrk()
    run = L.run_dir("flood_then_outage")
    stub = L.Envoy("stub", run, 1)
    port, admin = L.free_port(), L.free_port()
    (run / "stub.yaml").write_text(json.dumps(stub_config(port, admin)))
    if not stub.start(run / "stub.yaml", admin, port):
        raise L.Failed("stub: port in use")
    _, upstream = L.start_server("upstream", 0, run / "upstream.log")
    config = {"key_service": {"cluster": "key_service"},
              "cache": {"max_entries": m, "ttl_s": 600, "stale_if_error_s": 600}}
    envoy = L.start_filter_envoy(run, L.harness.DEFAULT_WASM, config, upstream, port)

    def ask_all():
        got = {}
        for key in VALID:
            r = L.http_request(envoy.listen_port, "GET", "/orders", headers=[("x-api-key", key)])
            got[r.status] = got.get(r.status, 0) + 1
        return got

    print(f"200 valid keys, first time: {ask_all()}; again (cached): {ask_all()}")
    if k:
        p = L.start("wrk", [wrk, "-t", 2, "-c", 32, "-d", "600s", "-s", L.LOAD / "flood.lua",
                            f"http://{L.HOST}:{envoy.listen_port}/", "--", -(-k // 2), 7], run / "wrk.out")
        deadline = time.time() + 600
        while time.time() < deadline:
            denied = sum(v for n, v in L.filter_stats(envoy.stats()).items() if n.startswith("denied."))
            if denied >= k:
                break
            time.sleep(0.5)
        L.stop(p)
    L.stop(stub.proc)
    print(f"after {k} random keys into max_entries {m}, key service stopped: {ask_all()}")
    f = L.filter_stats(envoy.stats())
    print({n: f.get(n, 0) for n in ("cache.hit", "cache.stale", "denied.key_service_unavailable",
                                      "key_service.not_found")})


if __name__ == "__main__":
    L.on_signals_exit()
    try:
        main()
    except L.Failed as e:
        L.log(f"error: {e}")
        sys.exit(2)
    finally:
        L.stop_all()
