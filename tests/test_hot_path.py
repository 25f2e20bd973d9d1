"""What a cached request costs in host calls, counted by lab/wasm-cost.mjs, which runs
the real .wasm under a stand-in proxy-wasm host in Node (no Envoy).

On Envoy, a host call that hands data back costs ~2 µs and any other ~0.2 µs, while
lab/bench varies by ±12 % (~3 µs) from one Envoy start to the next: a change that
adds such a call to the hot path would pass unseen there. Here it fails. The counts are
what the contract's features need: one read of the request headers, one read and one write
of the key's bucket, the key's removal, three identity headers, two RateLimit fields,
two counters and the clock. The access log reads the identity from the identity headers:
no filter state for an accepted request."""
import re
import subprocess

import pytest

from testbed.harness import BUILD, ROOT, WASM_PATH

pytestmark = pytest.mark.skipif(BUILD != "wasm", reason="counts the .wasm's proxy-wasm host calls")

DATA_CALLS = 2
ALL_CALLS = 12


def test_a_cached_request_reads_headers_and_bucket_once_and_makes_no_other_call():
    out = subprocess.run(["node", ROOT / "lab" / "wasm-cost.mjs", WASM_PATH, "--requests", "2000"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    counted = re.search(r"host calls per cached request: (\d+), (\d+) of them handing data back", out.stdout)
    assert counted, out.stdout
    calls = dict((name, int(n)) for n, name in re.findall(r"^  (\d+)  (proxy_\w+)", out.stdout, re.M))
    assert calls.get("proxy_get_header_map_pairs") == 1, out.stdout
    assert calls.get("proxy_get_shared_data") == 1, out.stdout
    assert "proxy_set_property" not in calls, out.stdout
    assert (int(counted[2]), int(counted[1])) == (DATA_CALLS, ALL_CALLS), out.stdout
