"""What ships besides the .wasm: the docker-compose harness (envoy/docker-compose.yaml, the
Envoy config rendered for it, the rate limit service's configuration in envoy/ratelimit/, the
Prometheus and Grafana of observability/ with their dashboards), the Istio manifests (envoy/istio/) and the supported Envoy range (envoy/SUPPORTED_VERSIONS).
Docker and Kubernetes do not run here, so these check structure and cross-references, and let
the real Envoy judge every Envoy config we ship: `envoy --mode validate` loads the .wasm and
runs the filter's on_configure, so a refused filter configuration fails validation
(test_validation_runs_the_filters_on_configure proves it)."""
import json
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import pytest
import yaml

from testbed.harness import (ROOT, WASM_PATH, HarnessError, Process, envoy_binary, free_port, http_request,
                     render_envoy, start_helper_server)
from testbed.real_keyservice import binary as keyservice_binary
from testbed.rls_service import RlsService

ENVOY_DIR = ROOT / "envoy"
COMPOSE_FILE = ENVOY_DIR / "docker-compose.yaml"
COMPOSE_ENVOY = ENVOY_DIR / "compose" / "envoy.yaml"
ISTIO = ENVOY_DIR / "istio"
DEMO_FILTER_CONFIG = ENVOY_DIR / "demo" / "filter-config.json"
RATELIMIT_CONFIG = ENVOY_DIR / "ratelimit" / "envoyproxy-ratelimit.yaml"
PROMETHEUS_DIR = ROOT / "observability" / "prometheus"
GRAFANA_DIR = ROOT / "observability" / "grafana"
DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
ISTIO_CLUSTER = re.compile(r"^outbound\|(\d+)\|\|([a-z0-9.-]+)$")  # Istio's name for a Service port's cluster


def supported_versions():
    """{"newest": "1.40.0", "oldest": ...} from envoy/SUPPORTED_VERSIONS."""
    pairs = (line.split("=", 1) for line in (ENVOY_DIR / "SUPPORTED_VERSIONS").read_text().splitlines()
             if line.strip() and not line.startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def load_yaml(path):
    return yaml.safe_load(Path(path).read_text())


def wasm_config(envoy_config):
    """The `config` of the template's one wasm filter."""
    listener = envoy_config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    wasm = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm")
    return wasm["typed_config"]["config"]


def clusters(envoy_config):
    """{cluster name: (discovery type, address, port)}"""
    out = {}
    for c in envoy_config["static_resources"]["clusters"]:
        sa = c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        out[c["name"]] = (c["type"], sa["address"], sa["port_value"])
    return out


def validate(config_path, tmp_path):
    """`envoy --mode validate`: (exit code, output). Loads the .wasm and runs on_configure."""
    r = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config_path), "--log-level", "warn",
                        "--disable-hot-restart"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=60, cwd=tmp_path)
    return r.returncode, r.stdout


def assert_valid(config_path, tmp_path):
    code, out = validate(config_path, tmp_path)
    assert code == 0, f"Envoy refuses {config_path}:\n{out[-3000:]}"


def compose_config_locally(tmp_path, replace=None):
    """The committed compose Envoy config with the .wasm at its local path and the text
    replacements {old: new} made, written to tmp_path/envoy.yaml."""
    text = COMPOSE_ENVOY.read_text()
    wasm_in_container = wasm_config(yaml.safe_load(text))["vm_config"]["code"]["local"]["filename"]
    text = text.replace(wasm_in_container, str(WASM_PATH))
    for old, new in (replace or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    out = tmp_path / "envoy.yaml"
    out.write_text(text)
    return out


# -- docker-compose ----------------------------------------------------------------------


def test_compose_envoy_config_is_a_fresh_render(tmp_path):
    fresh = tmp_path / "envoy.yaml"
    subprocess.run([ROOT / "scripts" / "render-compose", fresh], check=True, timeout=30)
    assert COMPOSE_ENVOY.read_text() == fresh.read_text(), (
        f"{COMPOSE_ENVOY.relative_to(ROOT)} differs from envoy/envoy.yaml.tmpl rendered now: "
        "run scripts/render-compose and commit the result")


def test_compose_file_structure():
    """What `docker compose up` needs, cross-checked with the rendered Envoy config."""
    compose = load_yaml(COMPOSE_FILE)
    services = compose["services"]
    assert set(services) == {"envoy", "keyservice", "upstream", "ratelimit", "redis", "prometheus", "grafana"}
    assert services["envoy"]["image"] == f"envoyproxy/envoy:v{supported_versions()['newest']}"
    assert services["upstream"]["image"] == "python:3.11-slim"
    # The key service is built from the repository, by the Dockerfile the project ships.
    build = services["keyservice"]["build"]
    dockerfile = (ENVOY_DIR / build["context"] / build["dockerfile"]).resolve()
    assert dockerfile == ROOT / "crates" / "keyservice" / "Dockerfile"
    assert "cargo build --release --locked -p apikey-keyservice" in dockerfile.read_text()
    # envoyproxy/ratelimit tags only commits (no releases): pinned to one, never master/latest.
    assert re.fullmatch(r"envoyproxy/ratelimit:[0-9a-f]{8,40}", services["ratelimit"]["image"])
    assert services["redis"]["image"] == "redis:7-alpine"
    # Pinned releases, never latest.
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", services["prometheus"]["image"])
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", services["grafana"]["image"])

    mounts = {}  # (service, target in the container) -> source on the host
    for name, service in services.items():
        for v in service.get("volumes", []):
            # Read-only binds of files that exist: never a directory Docker invents in their place.
            assert v["type"] == "bind" and v["read_only"] is True, (name, v)
            assert v["bind"]["create_host_path"] is False, (name, v)
            source = (ENVOY_DIR / v["source"]).resolve()
            assert source.exists(), f"{name}: {v['source']} does not exist"
            mounts[name, v["target"]] = source

    envoy = load_yaml(COMPOSE_ENVOY)
    command = services["envoy"]["command"]
    assert mounts["envoy", command[command.index("-c") + 1]] == COMPOSE_ENVOY
    wasm_target = wasm_config(envoy)["vm_config"]["code"]["local"]["filename"]
    assert mounts["envoy", wasm_target] == (ROOT / "target/wasm32-wasip1/release/apikey_filter.wasm")

    # Envoy listens on all of the container's interfaces; the host publishes exactly those
    # ports, on its loopback only.
    listen_at = envoy["static_resources"]["listeners"][0]["address"]["socket_address"]
    admin_at = envoy["admin"]["address"]["socket_address"]
    assert listen_at["address"] == admin_at["address"] == "0.0.0.0"
    listen, admin = listen_at["port_value"], admin_at["port_value"]
    assert sorted(services["envoy"]["ports"]) == sorted(f"127.0.0.1:{p}:{p}" for p in (listen, admin))

    # Each helper: its module is in the test bed's mount under its working directory, it
    # listens on all interfaces, on the port that the config's cluster names, under the
    # service name that the cluster resolves.
    discovery, host, port = clusters(envoy)["upstream"]
    assert (discovery, host) == ("STRICT_DNS", "upstream")
    cmd = services["upstream"]["command"]
    assert cmd[cmd.index("--port") + 1] == str(port) and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[:2] == ["python3", "-m"], cmd
    package, module = cmd[2].split(".")
    workdir = services["upstream"]["working_dir"]
    assert (mounts["upstream", f"{workdir}/{package}"] / f"{module}.py").is_file(), cmd
    # The key service: the cluster resolves its name, at the port it serves the filter's API
    # on, and it takes in the mounted demo keys.
    discovery, host, port = clusters(envoy)["key_service"]
    assert (discovery, host) == ("STRICT_DNS", "keyservice")
    steps = keyservice_steps(services["keyservice"])
    assert [s[:3] for s in steps] == [["apikey-keyservice", "keys", "import"],
                                      ["exec", "apikey-keyservice", "serve"]]
    serve = steps[1]
    assert serve[serve.index("--listen") + 1] == f"0.0.0.0:{port}"
    assert mounts["keyservice", steps[0][steps[0].index("--file") + 1]] == ENVOY_DIR / "demo" / "keys.json"
    filter_config = json.loads(wasm_config(envoy)["configuration"]["value"])
    assert filter_config == json.loads(DEMO_FILTER_CONFIG.read_text())

    # The rate limit service: the filter's cluster resolves the service's name, at its gRPC
    # port; it reads the mounted configuration, which names the filter's domain; Envoy starts
    # once it is healthy, and it once Redis is.
    rls = filter_config["rate_limit_service"]
    discovery, host, port = clusters(envoy)[rls["cluster"]]
    assert (discovery, host) == ("STRICT_DNS", "ratelimit")
    env = services["ratelimit"]["environment"]
    assert env["GRPC_PORT"] == str(port)
    assert services["envoy"]["depends_on"]["ratelimit"] == {"condition": "service_healthy"}
    assert services["ratelimit"]["depends_on"]["redis"] == {"condition": "service_healthy"}
    redis_host, redis_port = env["REDIS_URL"].split(":")
    assert (env["REDIS_SOCKET_TYPE"], redis_host, redis_port) == ("tcp", "redis", "6379")
    # Files are read from RUNTIME_ROOT/RUNTIME_SUBDIRECTORY/config/*.yaml; RUNTIME_WATCH_ROOT
    # false, or it would wait for that root to be swapped by a symlink.
    config_dir = f"{env['RUNTIME_ROOT']}/{env['RUNTIME_SUBDIRECTORY']}/config"
    assert env["RUNTIME_WATCH_ROOT"] == "false" and env.get("RUNTIME_APPDIRECTORY", "config") == "config"
    [(target, source)] = [(t, src) for (svc, t), src in mounts.items() if svc == "ratelimit"]
    assert source == RATELIMIT_CONFIG and target == f"{config_dir}/{Path(target).name}", target
    assert target.endswith(".yaml")
    assert "wget" in services["ratelimit"]["healthcheck"]["test"]  # busybox's: the image is Alpine's
    ratelimit_config = load_yaml(RATELIMIT_CONFIG)
    assert ratelimit_config["domain"] == rls["domain"]


def compose_mounts(service):
    """{target in the container: source on the host} of a compose service's binds."""
    volumes = load_yaml(COMPOSE_FILE)["services"][service].get("volumes", [])
    return {v["target"]: (ENVOY_DIR / v["source"]).resolve() for v in volumes}


def test_compose_prometheus_scrapes_envoy_with_the_rules():
    """observability/prometheus/prometheus.yml and rules.yml, mounted where the configuration
    finds them; its `envoy` job scrapes the compose Envoy's admin port."""
    services = load_yaml(COMPOSE_FILE)["services"]
    prometheus = services["prometheus"]
    mounts = compose_mounts("prometheus")
    [config_target] = [a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file=")]
    assert mounts[config_target] == PROMETHEUS_DIR / "prometheus.yml"
    assert mounts[str(PurePosixPath(config_target).parent / "rules.yml")] == PROMETHEUS_DIR / "rules.yml"
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    for rule_file in config["rule_files"]:  # relative to the configuration file, as Prometheus reads them
        target = PurePosixPath(config_target).parent / rule_file
        assert str(target) in mounts and mounts[str(target)].is_file(), rule_file

    envoy = load_yaml(COMPOSE_ENVOY)
    admin_port = envoy["admin"]["address"]["socket_address"]["port_value"]
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "envoy"]
    assert job["metrics_path"] == "/stats/prometheus"
    assert [t for c in job["static_configs"] for t in c["targets"]] == [f"envoy:{admin_port}"]
    assert prometheus["ports"] == ["127.0.0.1:9090:9090"]  # loopback only, as Envoy's
    assert "wget" in prometheus["healthcheck"]["test"]  # busybox's: the image has no curl


def datasource_refs(node):
    """Every `datasource` reference of a dashboard, Grafana's own (annotations) left out."""
    if isinstance(node, dict):
        ref = node.get("datasource")
        if isinstance(ref, dict) and ref.get("type") != "grafana":
            yield ref
        for value in node.values():
            yield from datasource_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from datasource_refs(value)


def test_compose_grafana_provisions_the_data_source_and_the_dashboards():
    services = load_yaml(COMPOSE_FILE)["services"]
    grafana = services["grafana"]
    mounts = compose_mounts("grafana")
    provisioning = GRAFANA_DIR / "provisioning"
    assert mounts["/etc/grafana/provisioning/datasources"] == provisioning / "datasources"
    assert mounts["/etc/grafana/provisioning/dashboards"] == provisioning / "dashboards"

    # The data source: the compose Prometheus, at the port it listens on, with its scrape
    # interval (Grafana's $__rate_interval is at least four of them).
    [datasource] = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus"
    url = urlparse(datasource["url"])
    prometheus_port = int(services["prometheus"]["ports"][0].rsplit(":", 1)[1])
    assert (url.hostname, url.port) == ("prometheus", prometheus_port)
    scrape_interval = load_yaml(PROMETHEUS_DIR / "prometheus.yml")["global"]["scrape_interval"]
    assert datasource["jsonData"]["timeInterval"] == scrape_interval

    # The dashboards: a file provider reading the mounted directory; the home dashboard is one.
    [provider] = load_yaml(provisioning / "dashboards" / "apikey-filter.yml")["providers"]
    assert provider["type"] == "file"
    assert mounts[provider["options"]["path"]] == GRAFANA_DIR / "dashboards"
    env = grafana["environment"]
    home = PurePosixPath(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert (mounts[str(home.parent)] / home.name).is_file(), home
    assert (env["GF_AUTH_ANONYMOUS_ENABLED"], env["GF_AUTH_ANONYMOUS_ORG_ROLE"]) == ("true", "Viewer")
    assert grafana["ports"] == ["127.0.0.1:3000:3000"]
    assert grafana["depends_on"]["prometheus"] == {"condition": "service_healthy"}

    # Every panel, target and variable names the provisioned data source by its uid.
    for path in DASHBOARDS:
        refs = list(datasource_refs(json.loads(path.read_text())))
        assert refs and all(r == {"type": "prometheus", "uid": datasource["uid"]} for r in refs), path.name


GRAFANA_VARIABLES = {"__rate_interval", "__range", "__interval"}


def test_dashboards_are_the_three_with_their_pictures():
    assert [p.stem for p in DASHBOARDS] == ["debug", "executive", "on-call"]
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(set(uids)) == len(uids), uids
    for path in DASHBOARDS:  # docs/observability.md's pictures (lab/dashboard-pictures)
        assert (ROOT / "docs" / "dashboards" / f"{path.stem}.png").is_file(), path.stem


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_is_well_formed(path):
    """Parses; unique panel ids; every panel described, with queries; on the 24-column grid;
    no variable used that the dashboard does not define. tests/test_prometheus.py runs the
    queries against a real Prometheus."""
    board = json.loads(path.read_text())
    panels = board["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat: {ids}"
    variables = GRAFANA_VARIABLES | {v["name"] for v in board.get("templating", {}).get("list", [])}
    for panel in panels:
        where = f"{path.name}, panel {panel['id']} ({panel.get('title')})"
        assert panel["title"] and panel["description"].strip(), where
        assert panel["targets"], where
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), where
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, where
        for target in panel["targets"]:
            assert target["expr"].strip(), where
            used = set(re.findall(r"\$\{?(\w+)", target["expr"] + panel["title"]))
            assert used <= variables, f"{where}: undefined {used - variables}"


def test_ratelimit_config_describes_the_filters_descriptors():
    """envoyproxy/ratelimit applies an override in any domain it has loaded; the entries
    spell out the descriptors the filter sends (per key, per owner, then the window), with no
    limit of their own (the override is the limit) and only keys it knows."""
    config = load_yaml(RATELIMIT_CONFIG)
    assert set(config) == {"domain", "descriptors"}
    shapes = {(d["key"], tuple(n["key"] for n in d["descriptors"])) for d in config["descriptors"]}
    assert shapes == {("key_id", ("window",)), ("owner", ("window",))}

    def walk(descriptors):
        for d in descriptors:
            assert set(d) <= {"key", "descriptors"}, d  # no value, no rate_limit
            walk(d.get("descriptors", []))
    walk(config["descriptors"])


def compose_cli():
    """`docker compose` (plugin) or a standalone docker-compose of Compose v2 or later, if one
    works here. Compose v1 (docker-compose 1.x, Debian 12's package) predates the Compose
    Specification's `name` and `bind.create_host_path` and refuses the file for them."""
    candidates = [["docker", "compose"], ["docker-compose"]]
    for cli in candidates:
        if not shutil.which(cli[0]):
            continue
        r = subprocess.run([*cli, "version", "--short"], capture_output=True, text=True)
        if r.returncode == 0 and re.match(r"v?([2-9]|\d{2,})\.", r.stdout.strip()):
            return cli
    return None


def test_compose_file_passes_docker_compose_config():
    """The Compose schema check proper; needs no engine, but a Compose v2 CLI, which CI lacks
    (test_compose_file_structure stands in there)."""
    cli = compose_cli()
    if cli is None:
        pytest.skip("no Compose v2 CLI here (docker compose, or docker-compose 2.x)")
    r = subprocess.run([*cli, "-f", COMPOSE_FILE, "config", "--quiet"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_compose_envoy_config_validates(tmp_path):
    assert_valid(compose_config_locally(tmp_path), tmp_path)


def test_validation_runs_the_filters_on_configure(tmp_path):
    """Without this, a validation that ignored the filter's configuration would pass the tests above."""
    bad = compose_config_locally(tmp_path, {'"timeout_ms":500': '"timeout_ms":500,"no_such_field":1'})
    code, out = validate(bad, tmp_path)
    assert code != 0 and "key_service.no_such_field" in out, out[-3000:]


def test_demo_envoy_config_validates(tmp_path):
    """As scripts/demo renders it."""
    config = render_envoy.render({
        "LISTEN_PORT": 10000, "ADMIN_PORT": 9901, "UPSTREAM_PORT": 8082, "KEY_SERVICE_PORT": 8081,
        "WASM_PATH": WASM_PATH, "ACCESS_LOG": tmp_path / "access.log",
        "FILTER_CONFIG": json.loads(DEMO_FILTER_CONFIG.read_text()),
    }, tmp_path / "demo.yaml")
    assert_valid(config, tmp_path)


def test_compose_envoy_config_serves_the_demo_keys(tmp_path):
    """The compose config run for real, with only what Docker provides swapped for local
    equivalents: 127.0.0.1 for the service names (still STRICT_DNS) and for 0.0.0.0, free ports,
    the project's rls-server (the override, as envoyproxy/ratelimit takes it) for ratelimit.
    Its access log goes to /dev/stdout, as in the container."""
    envoy = load_yaml(COMPOSE_ENVOY)
    (_, _, ks_port), (_, _, up_port) = clusters(envoy)["key_service"], clusters(envoy)["upstream"]
    (_, _, rls_port) = clusters(envoy)["ratelimit"]
    procs, rls = [], RlsService()
    try:
        rls.start()
        # The compose key service's own commands, with a local database, file and ports.
        ks_bound, ks_admin = free_port(), free_port()
        local = {"sqlite:/data/keys.db": f"sqlite:{tmp_path / 'keys.db'}",
                 "/app/keys.json": str(ENVOY_DIR / "demo" / "keys.json"),
                 f"0.0.0.0:{ks_port}": f"127.0.0.1:{ks_bound}", "0.0.0.0:8082": f"127.0.0.1:{ks_admin}",
                 "apikey-keyservice": str(keyservice_binary())}
        compose_services = load_yaml(COMPOSE_FILE)["services"]
        import_keys, serve = [[local.get(a, a) for a in step if a != "exec"]
                              for step in keyservice_steps(compose_services["keyservice"])]
        subprocess.run(import_keys, check=True, timeout=30)
        ks = Process("keyservice", serve, tmp_path / "ks.log").start()
        procs.append(ks)
        ks.wait_for_line("apikey-keyservice: serving")
        up, up_bound = start_helper_server("upstream", "upstream", 0, tmp_path / "up.log")
        procs.append(up)
        listen, admin = free_port(), free_port()
        config = compose_config_locally(tmp_path, {
            "address: 0.0.0.0, port_value: 10000": f"address: 127.0.0.1, port_value: {listen}",
            "address: 0.0.0.0, port_value: 9901": f"address: 127.0.0.1, port_value: {admin}",
            f"address: keyservice, port_value: {ks_port}": f"address: 127.0.0.1, port_value: {ks_bound}",
            f"address: upstream, port_value: {up_port}": f"address: 127.0.0.1, port_value: {up_bound}",
            f"address: ratelimit, port_value: {rls_port}": f"address: 127.0.0.1, port_value: {rls.grpc_port}",
        })
        proxy = Process("envoy", [envoy_binary(), "-c", config, "--concurrency", "1", "--disable-hot-restart",
                                  "--log-level", "warn", "--file-flush-interval-msec", "50"],
                        tmp_path / "envoy.out").start()
        procs.append(proxy)
        wait_ready(proxy, admin)

        r = http_request(listen, "GET", "/orders", [("x-api-key", "demo-key-alice")])
        assert r.status == 200, r
        assert ["x-api-key-id", "k_alice"] in r.json()["headers"]
        assert http_request(listen, "GET", "/orders", [("x-api-key", "demo-key-revoked")]).status == 401
        def access_logged():  # the line of alice's request (the template sets its format)
            return any("/orders" in line and "k_alice" in line for line in proxy.log().splitlines())
        deadline = time.monotonic() + 5
        while not access_logged() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert access_logged(), "access log line not on stdout:\n" + proxy.log()[-2000:]

        # demo-key-frank's 5 a day (envoy/demo/keys.json), kept by the rate limit service.
        frank = [http_request(listen, "GET", "/orders", [("x-api-key", "demo-key-frank")]) for _ in range(6)]
        assert [r.status for r in frank] == [200] * 5 + [429], frank
        assert frank[-1].json()["error"]["code"] == "quota_exceeded"
        assert rls.calls()["hits"] >= 6

        # The Istio stats matcher's prefix must let every metric of the filter through.
        prefixes = proxy_stats_matcher()["inclusionPrefixes"]
        stats = http_request(admin, "GET", "/stats?format=json").json()["stats"]
        names = [s["name"] for s in stats  # wasm.<plugin>.* are Envoy's own stats of the VM
                 if "apikey_filter" in s.get("name", "") and not s["name"].startswith("wasm.")]
        assert "wasmcustom.apikey_filter.allowed" in names
        assert all(any(n.startswith(p) for p in prefixes) for n in names), names
    finally:
        for p in reversed(procs):
            p.stop()
        rls.close()


def keyservice_steps(service):
    """The compose key service's `sh -c` command, as the commands it runs."""
    command = service["command"]
    assert command[:2] == ["sh", "-c"], command
    return [shlex.split(step) for step in command[2].split("&&")]


def wait_ready(proxy, admin_port, timeout=20):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if http_request(admin_port, "GET", "/ready", timeout=1).status == 200:
                return
        except OSError:
            pass
        if not proxy.running() or time.monotonic() > deadline:
            raise HarnessError("Envoy did not become ready:\n" + proxy.log()[-3000:])
        time.sleep(0.05)


# -- Istio -------------------------------------------------------------------------------


def wasm_plugin():
    return load_yaml(ISTIO / "wasmplugin.yaml")


def proxy_stats_matcher():
    patch = load_yaml(ISTIO / "proxy-stats-patch.yaml")
    proxy_config = yaml.safe_load(patch["spec"]["template"]["metadata"]["annotations"]["proxy.istio.io/config"])
    return proxy_config["proxyStatsMatcher"]


def test_wasm_plugin_manifest():
    plugin = wasm_plugin()
    assert (plugin["apiVersion"], plugin["kind"]) == ("extensions.istio.io/v1alpha1", "WasmPlugin")
    spec = plugin["spec"]
    assert spec["phase"] == "AUTHN" and spec["failStrategy"] == "FAIL_CLOSE" and spec["type"] == "HTTP"
    assert spec["imagePullPolicy"] in ("IfNotPresent", "Always")
    assert spec["url"].startswith("oci://") and spec["selector"]["matchLabels"]
    template = load_yaml(COMPOSE_ENVOY)
    assert spec["pluginName"] == wasm_config(template)["root_id"]
    # Istio's WasmPlugin.vmConfig has only `env`; vm_id cannot be set (docs/operations.md explains).
    assert set(spec.get("vmConfig") or {}) <= {"env"}


def test_wasm_plugin_calls_the_key_service_the_manifests_define():
    key_service = wasm_plugin()["spec"]["pluginConfig"]["key_service"]
    m = ISTIO_CLUSTER.match(key_service["cluster"])
    assert m, f"{key_service['cluster']!r} is not Istio's outbound|PORT||HOST"
    port, host = int(m.group(1)), m.group(2)
    rule = load_yaml(ISTIO / "keyservice.yaml")
    assert rule["kind"] == "DestinationRule" and rule["spec"]["host"] == host
    assert port == 8080 and host == "keys.keys-system.svc.cluster.local"
    assert key_service["authority"] == host  # the default (the cluster name) is no Host a sidecar routes
    connect_ms = int(rule["spec"]["trafficPolicy"]["connectionPool"]["tcp"]["connectTimeout"].removesuffix("ms"))
    assert connect_ms < key_service["timeout_ms"]


def test_the_key_service_deployment_serves_what_the_wasm_plugin_calls():
    """keyservice-deployment.yaml: Service `keys` port 8080 (the cluster wasmplugin.yaml names)
    reaches the processes' --listen port; every process is on the one PostgreSQL the Secret
    names, which is the StatefulSet's Service."""
    docs = {(d["kind"], d["metadata"]["name"]): d
            for d in yaml.safe_load_all((ISTIO / "keyservice-deployment.yaml").read_text())}
    assert {d["metadata"]["namespace"] for d in docs.values()} == {"keys-system"}
    deployment = docs["Deployment", "keys"]
    assert deployment["spec"]["replicas"] >= 2, "a fleet: several processes on one database"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[0] == "serve" and args[args.index("--db") + 1] == "$(DATABASE_URL)"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args[args.index("--listen") + 1] == f"0.0.0.0:{ports['http-filter']}"
    assert args[args.index("--admin-listen") + 1] == f"0.0.0.0:{ports['http-admin']}"
    keys = docs["Service", "keys"]["spec"]["ports"]
    assert [(p["port"], p["targetPort"]) for p in keys] == [(8080, "http-filter")]
    cluster = wasm_plugin()["spec"]["pluginConfig"]["key_service"]["cluster"]
    assert cluster == "outbound|8080||keys.keys-system.svc.cluster.local"
    secret = docs["Secret", "keys-database"]["stringData"]["url"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert env["DATABASE_URL"] == {"name": "keys-database", "key": "url"}
    db = urlparse(secret)
    assert (db.scheme, db.hostname, db.port) == ("postgres", "keys-postgres.keys-system.svc.cluster.local", 5432)
    postgres = docs["StatefulSet", "keys-postgres"]["spec"]["template"]["spec"]["containers"][0]
    postgres_env = {e["name"]: e.get("value") for e in postgres["env"]}
    assert (db.username, db.password, db.path) == (
        postgres_env["POSTGRES_USER"], postgres_env["POSTGRES_PASSWORD"], "/" + postgres_env["POSTGRES_DB"])
    assert docs["Service", "keys-postgres"]["spec"]["ports"][0]["port"] == 5432


def test_wasm_plugin_config_is_accepted_by_the_filter(tmp_path):
    """pluginConfig, as Istio hands it over (JSON), into the one template; only the cluster
    name is swapped for the template's local one, since Envoy checks that a cluster exists."""
    config = wasm_plugin()["spec"]["pluginConfig"]
    config["key_service"]["cluster"] = "key_service"
    rendered = render_envoy.render({
        "LISTEN_PORT": free_port(), "ADMIN_PORT": free_port(), "UPSTREAM_PORT": 8082, "KEY_SERVICE_PORT": 8081,
        "WASM_PATH": WASM_PATH, "ACCESS_LOG": tmp_path / "access.log", "FILTER_CONFIG": config,
    }, tmp_path / "istio.yaml")
    assert_valid(rendered, tmp_path)


def test_proxy_stats_matcher_includes_the_filters_metrics():
    assert proxy_stats_matcher()["inclusionPrefixes"] == ["wasmcustom.apikey_filter"]


def test_oci_image_is_istios_compat_format():
    """One layer holding plugin.wasm: FROM scratch, one COPY, nothing that adds a layer."""
    lines = [line.split() for line in (ISTIO / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines == [["FROM", "scratch"], ["COPY", "apikey_filter.wasm", "./plugin.wasm"]]


def test_build_oci_image_explains_when_no_builder_works(tmp_path):
    """Run without docker, podman or buildah on PATH: it must say so and exit non-zero."""
    path = tmp_path / "bin"
    path.mkdir()
    for tool in ("bash", "dirname", "mktemp", "cp", "rm", "cat", "sha256sum", "cut", "head"):
        (path / tool).symlink_to(shutil.which(tool))
    r = subprocess.run([ROOT / "scripts" / "build-oci-image", "example.com/apikey-filter:test"],
                       env={"PATH": str(path), "APIKEY_WASM": str(WASM_PATH)}, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 1 and "no working image builder" in r.stderr, r.stderr


# -- Envoy versions ----------------------------------------------------------------------


def test_supported_versions_are_ordered():
    v = supported_versions()
    as_tuple = lambda s: tuple(int(x) for x in s.split("."))  # noqa: E731
    assert as_tuple(v["oldest"]) <= as_tuple(v["newest"]), v
