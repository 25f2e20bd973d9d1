"""Prometheus rules and dashboards (observability/), checked with promtool and for real.

- `promtool check` and `promtool test rules` on observability/prometheus/ (skipped, with
  the reason, only when scripts/install-prometheus cannot provide promtool).
- A real run: Envoy with the filter (`--concurrency 2`, the change feed, `per_key_stats`
  with docs/observability.md's `stats_tags` rule, `brute_force`, quotas on a real rate limit service)
  under a small mixed load, scraped every second by a real Prometheus loading
  observability/prometheus/rules.yml through a copy of prometheus.yml (only its target
  and intervals changed). Then every PromQL expression of the rules and of every
  observability/grafana/dashboards/*.json panel is evaluated through /api/v1/query.

What "evaluates" means. Each expression must be accepted as it is (parsed and run:
`status: success`). It must also return data, but a condition is empty while all is
well (an alert's `x > 0.5`, a panel's `... > 0`, an `unless`), and an empty answer would
hide a misspelled metric. So the expression is cut at its top-level set operators (`and`,
`or`, `unless`) into operands, and each operand, with `bool` added to its comparisons
(`x > 0.5` becomes `x > bool 0.5`: 0 or 1 for every series instead of a filter), must
return at least one series. So every series any alert or panel reads must exist with the
labels it matches on, which is what breaks when a stat is renamed; and recording rules
(no comparison, no set operator) are evaluated exactly as written. On top of that, every
metric name mentioned anywhere must be one Prometheus has (a `{__name__=~"..."}` regex
must match one), which names the culprit.

Grafana's variables are given fixed values: `$__rate_interval`, `$__interval` and
`$__range` become 1m, `$key_id` a key of the load. A dashboard may list `ALERTS`, which
exists only while an alert is pending or firing: a sentinel rule that always fires is
loaded next to rules.yml, so that query returns data too. Finally, the two alerts the
load should trip on real data (a key whose quota is spent, brute-force budgets spent by
one address) must show up as pending in ALERTS.
"""
import json
import re
import subprocess
import tempfile
import time
import urllib.parse
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from testbed.harness import (BUILD, HOST, ROOT, SCRIPTS, HarnessError, Process, Stack, _remove, free_port,
                     http_request, key_hash)
from testbed.rls_service import RlsService

PROM_DIR = ROOT / "observability" / "prometheus"
RULES = PROM_DIR / "rules.yml"
RULES_TEST = PROM_DIR / "rules_test.yml"
CONFIG = PROM_DIR / "prometheus.yml"
DASHBOARDS = ROOT / "observability" / "grafana" / "dashboards"

# Values of Grafana's variables in dashboard queries (longest names first).
GRAFANA_VARIABLES = {"__rate_interval": "1m", "__interval": "1m", "__range": "1m", "key_id": "k_good"}

STATS_CONFIG = r"""stats_config:
  stats_tags:
  - tag_name: key_id
    regex: '^wasmcustom\.apikey_filter\.key\.((.+?)\.)(?:allowed|denied)$'
# Histograms reach /stats/prometheus on Envoy's stats flush: every second, not every 5.
stats_flush_interval: 1s
"""
FILTER_CONFIG = {
    "key_service": {"cluster": "key_service", "timeout_ms": 1000,
                    "changes": {"interval_ms": 500, "ttl_s": 3600}},
    "per_key_stats": {"max_keys": 100},
    "brute_force": {"max_failures": 3, "period_s": 3600},
    "rate_limit": None,
    "rate_limit_service": {"cluster": "ratelimit", "timeout_ms": 1000, "sync_interval_ms": 0},
}
KEYS = {
    "prom-good": {"key_id": "k_good", "quotas": [{"requests": 100000, "unit": "day"}]},
    "prom-quota": {"key_id": "k_quota", "quotas": [{"requests": 2, "unit": "hour"}]},
    "prom-limited": {"key_id": "k_limited", "rate_limit": {"requests": 2, "period_s": 3600}},
    "prom-revoked": {"key_id": "k_revoked", "revoked": True},
}
GUESSER = "127.0.0.9"  # the address that sprays bad keys
GUESSES = 60           # 3 cost its brute_force budget, the other 57 are refused before any lookup
# Series that appear with the load rather than when Envoy starts.
NEW_SERIES = ("apikey_filter_key_allowed", "apikey_filter_key_denied", "apikey_filter_key_service_latency_ms_bucket",
              "apikey_filter_rate_limit_service_latency_ms_bucket")
SENTINEL_RULES = """groups:
  - name: test-sentinel
    rules:
      - alert: TestSentinelAlwaysFiring
        expr: vector(1)
"""


# -- promtool -------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _install():
    r = subprocess.run([str(SCRIPTS / "install-prometheus")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=900)
    return r.returncode, r.stdout.strip().splitlines(), r.stderr.strip()


@pytest.fixture(scope="module")
def binaries():
    """(prometheus, promtool) from scripts/install-prometheus, or skip saying why not."""
    code, lines, err = _install()
    if code != 0 or len(lines) < 2:
        pytest.skip(f"scripts/install-prometheus could not provide prometheus and promtool: {err[-500:]}")
    return lines[-2], lines[-1]


def promtool(binaries, *args):
    r = subprocess.run([binaries[1], *args], cwd=PROM_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=120)
    assert r.returncode == 0, f"promtool {' '.join(args)}:\n{r.stdout}"
    return r.stdout


def test_promtool_checks_the_rules_and_the_configuration(binaries):
    assert "SUCCESS" in promtool(binaries, "check", "rules", RULES.name)
    assert "SUCCESS" in promtool(binaries, "check", "config", CONFIG.name)


def test_promtool_unit_tests_of_the_rules_pass(binaries):
    assert "SUCCESS" in promtool(binaries, "test", "rules", RULES_TEST.name)


def alerting_rules():
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r]


def test_every_alert_is_complete_and_unit_tested_firing_and_quiet():
    text = RULES.read_text() + RULES_TEST.read_text()
    assert not re.search(r"https?://", text), "runbooks stay in the repository: no external links"
    tested = {}
    for group in yaml.safe_load(RULES_TEST.read_text())["tests"]:
        for case in group.get("alert_rule_test", []):
            tested.setdefault(case["alertname"], set()).add(bool(case.get("exp_alerts")))
    alerts = alerting_rules()
    assert {r["alert"] for r in alerts} >= {
        "ApikeyKeyServiceDown", "ApikeyAvailabilityBudgetBurn", "ApikeyChangeFeedUnhealthy",
        "ApikeyWasmVmCrashed", "ApikeyRequestsNotDecided", "ApikeyKeyQuotaSpent", "ApikeyBruteForceSurge"}
    for rule in alerts:
        name = rule["alert"]
        assert rule.get("labels", {}).get("severity") in ("page", "ticket"), name
        assert {"summary", "description", "runbook"} <= set(rule.get("annotations", {})), name
        assert tested.get(name) == {True, False}, f"{name}: rules_test.yml must show it firing and quiet"


def test_the_shipped_configuration_scrapes_envoy_admin_for_compose():
    config = yaml.safe_load(CONFIG.read_text())
    assert config["rule_files"] == ["rules.yml"]
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "envoy"]
    assert job["metrics_path"] == "/stats/prometheus"
    assert job["static_configs"] == [{"targets": ["envoy:9901"]}]


# -- PromQL, as text ------------------------------------------------------------------------

KEYWORDS = {"and", "or", "unless", "bool", "by", "without", "on", "ignoring", "group_left", "group_right",
            "offset", "inf", "nan"}


def _scan(expr):
    """Yields (index, char, nesting) for the characters of expr outside strings, label
    matchers {...} and ranges [...]; nesting is the parenthesis depth."""
    depth, quote, skip_until, i = 0, None, None, 0
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif skip_until:
            if c in "\"'`":
                quote = c
            elif c == skip_until:
                skip_until = None
        elif c in "\"'`":
            quote = c
        elif c == "{":
            skip_until = "}"
        elif c == "[":
            skip_until = "]"
        else:
            if c == ")":
                depth -= 1
            yield i, c, depth
            if c == "(":
                depth += 1
        i += 1


def _strip_parens(expr):
    expr = expr.strip()
    while expr.startswith("(") and expr.endswith(")"):
        closes = [i for i, c, d in _scan(expr) if c == ")" and d == 0]
        if closes != [len(expr) - 1]:
            break
        expr = expr[1:-1].strip()
    return expr


def operands(expr):
    """expr cut at its top-level `and`/`or`/`unless`, recursively (with the `on(...)` or
    `ignoring(...)` of a cut operator dropped)."""
    expr = _strip_parens(expr)
    top = {i for i, _, d in _scan(expr) if d == 0}
    cuts = [m for m in re.finditer(r"\b(and|or|unless)\b", expr) if m.start() in top]
    if not cuts:
        return [expr]
    parts, start = [], 0
    for m in cuts:
        parts.append(expr[start:m.start()])
        start = m.end()
    parts.append(expr[start:])
    parts = [re.sub(r"^\s*(on|ignoring)\s*\([^)]*\)", "", p) for p in parts]
    return [leaf for p in parts for leaf in operands(p)]


def with_bool(expr):
    """Every comparison of expr (outside label matchers) made a `bool` one."""
    out, last = [], 0
    positions = {i: c for i, c, _ in _scan(expr)}
    i = 0
    while i < len(expr):
        if i in positions and expr[i] in "<>=!":
            op = expr[i:i + 2] if expr[i:i + 2] in ("==", "!=", ">=", "<=") else expr[i]
            if op in ("==", "!=", ">=", "<=", ">", "<"):
                end = i + len(op)
                if not re.match(r"\s*bool\b", expr[end:]):
                    out += [expr[last:end], " bool"]
                    last = end
                i = end
                continue
        i += 1
    return "".join(out) + expr[last:]


def metric_names(expr):
    """(names, name regexes) that expr selects."""
    regexes = re.findall(r'__name__\s*=~\s*"([^"]*)"', expr)
    names = set(re.findall(r'__name__\s*=\s*"([^"]*)"', expr))
    kept = "".join(c if i in {j for j, _, _ in _scan(expr)} else " " for i, c in enumerate(expr))
    kept = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", kept)
    for m in re.finditer(r"(?<![\w.:])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", kept):
        if m.group(1).lower() not in KEYWORDS:
            names.add(m.group(1))
    return names, regexes


def grafana_expr(expr, where):
    """A dashboard query with Grafana's variables given values."""
    def value(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in GRAFANA_VARIABLES:
            raise AssertionError(f"{where}: no test value for Grafana variable ${name}: add it to GRAFANA_VARIABLES")
        return GRAFANA_VARIABLES[name]
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", value, expr)


def rule_expressions():
    """[(where, expr)] of every rule of rules.yml."""
    out = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            out.append((f"rules.yml {rule.get('record') or rule.get('alert')}", rule["expr"]))
    return out


def dashboards():
    return sorted(DASHBOARDS.glob("*.json"))


def _panels(panels):
    for panel in panels or []:
        yield panel
        yield from _panels(panel.get("panels"))


def dashboard_expressions():
    """[(where, expr)] of every panel target of every dashboard, and [(where, metric,
    label)] of their `label_values(metric, label)` variables."""
    exprs, label_values = [], []
    for path in dashboards():
        board = json.loads(path.read_text())
        for panel in _panels(board.get("panels")):
            for target in panel.get("targets") or []:
                if target.get("expr", "").strip():
                    where = f"{path.name} panel {panel.get('title')!r} {target.get('refId', '')}"
                    exprs.append((where, grafana_expr(target["expr"], where)))
        for var in board.get("templating", {}).get("list", []):
            query = var.get("query")
            query = query.get("query") if isinstance(query, dict) else query
            m = re.fullmatch(r"\s*label_values\(\s*(.+?)\s*,\s*(\w+)\s*\)\s*", query or "")
            if var.get("type") == "query" and m:
                label_values.append((f"{path.name} variable ${var.get('name')}", m.group(1), m.group(2)))
    return exprs, label_values


def test_the_promql_text_helpers():
    expr = 'a{x!="y"} > 0.5 and on (job) (b >= bool 1 unless c{l=~"a|b"}[5m] < 2) or topk(3, d == 1)'
    assert operands(expr) == ['a{x!="y"} > 0.5', "b >= bool 1", 'c{l=~"a|b"}[5m] < 2', "topk(3, d == 1)"]
    assert with_bool('a{x!="y"} > 0.5') == 'a{x!="y"} > bool 0.5'
    assert with_bool("topk(3, d == 1) >= bool 2") == "topk(3, d == bool 1) >= bool 2"
    assert metric_names('sum by (key_id) (rate(m_a{k="v"}[5m])) / on (job) m:b offset 5m > 10 * vector(1)') == (
        {"m_a", "m:b"}, [])
    assert metric_names('sum(rate({__name__=~"x_.+"}[1m]))') == (set(), ["x_.+"])
    assert grafana_expr("rate(a{key_id=\"$key_id\"}[$__rate_interval])", "t") == 'rate(a{key_id="k_good"}[1m])'


# -- the real thing -------------------------------------------------------------------------


class Prometheus:
    """A Prometheus on 127.0.0.1 with its data in a temp dir; a context manager."""

    def __init__(self, binary, config_text):
        self.binary, self.config_text = binary, config_text
        self.tmp = Path(tempfile.mkdtemp(prefix="apikey-prometheus-"))
        self.process = None

    def __enter__(self):
        try:
            config = self.tmp / "prometheus.yml"
            config.write_text(self.config_text)
            for _attempt in range(3):  # free_port leaves a window for another process
                self.port = free_port()
                self.process = Process("prometheus", [
                    self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.tmp / 'data'}",
                    f"--web.listen-address={HOST}:{self.port}", "--log.level=warn",
                ], self.tmp / "prometheus.log").start()
                deadline = time.monotonic() + 30
                while self.process.running() and not self._ready():
                    if time.monotonic() > deadline:
                        raise HarnessError(f"Prometheus not ready in 30 s:\n{self.process.log()[-3000:]}")
                    time.sleep(0.1)
                if self.process.running():
                    return self
                if "address already in use" not in self.process.log():
                    break
            raise HarnessError(f"Prometheus exited:\n{self.process.log()[-3000:]}")
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc):
        if self.process is not None:
            self.process.stop()
        _remove(self.tmp)
        return False

    def _ready(self):
        try:
            return http_request(self.port, "GET", "/-/ready", timeout=1).status == 200
        except OSError:
            return False

    def api(self, path, **params):
        r = http_request(self.port, "GET", f"/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}",
                         timeout=10)
        try:
            return r.json()
        except ValueError:
            return {"status": "error", "error": f"HTTP {r.status}: {r.text[:300]}"}

    def query(self, expr):
        return self.api("query", query=expr)

    def value(self, expr):
        """The single value of expr now, or None."""
        result = self.query(expr).get("data", {}).get("result", [])
        return float(result[0]["value"][1]) if len(result) == 1 else None

    def wait_until(self, what, condition, timeout=20):
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus: not within {timeout} s: {what}\n{self.process.log()[-2000:]}")
            time.sleep(0.2)


def prometheus_config(admin_port, extra_rule_file):
    """prometheus.yml as shipped, but scraping this Envoy every second, evaluating every
    second, and loading the rules by absolute path."""
    config = yaml.safe_load(CONFIG.read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROM_DIR / f) for f in config["rule_files"]] + [str(extra_rule_file)]
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "envoy"]
    job["static_configs"] = [{"targets": [f"{HOST}:{admin_port}"]}]
    return yaml.safe_dump(config)


def send(stack, key=None, source=None):
    r = stack.request("GET", "/orders", headers=[("x-api-key", key)] if key else [], source=source)
    return r.status if r.status == 200 else f"{r.status} {r.json()['error']['code']}"


def mixed_load(stack):
    """The load: every kind of answer a quiet day has, and one address guessing keys."""
    sent = {
        "good": [send(stack, "prom-good") for _ in range(10)],
        "quota": [send(stack, "prom-quota") for _ in range(3)],
        "limited": [send(stack, "prom-limited") for _ in range(4)],
        "revoked": [send(stack, "prom-revoked", "127.0.0.3") for _ in range(2)],
        "unknown": [send(stack, f"prom-unknown-{i}", "127.0.0.4") for i in range(2)],
        "missing": [send(stack, None, "127.0.0.5")],
        "guesses": [send(stack, f"prom-guess-{i}", GUESSER) for i in range(GUESSES)],
    }
    assert sent == {
        "good": [200] * 10,
        "quota": ["429 quota_exceeded"] * 3,  # its 2 an hour went before Prometheus started
        "limited": [200, 200, "429 rate_limit_exceeded", "429 rate_limit_exceeded"],
        "revoked": ["401 api_key_revoked"] * 2,
        "unknown": ["401 api_key_invalid"] * 2,
        "missing": ["401 api_key_missing"],
        "guesses": ["401 api_key_invalid"] * 3 + ["429 too_many_failed_attempts"] * (GUESSES - 3),
    }, sent


def check_expression(prom, where, expr):
    """Problems with expr: it must run as it is, and each operand, its comparisons made
    `bool`, must return data (see the module docstring)."""
    problems = []
    answer = prom.query(expr)
    if answer.get("status") != "success":
        return [f"{where}: {answer.get('error')}\n    {' '.join(expr.split())}"]
    for operand in operands(expr):
        probe = with_bool(operand)
        answer = prom.query(probe)
        if answer.get("status") != "success":
            problems.append(f"{where}: operand fails: {answer.get('error')}\n    {' '.join(probe.split())}")
        elif not answer["data"]["result"]:
            problems.append(f"{where}: no data for\n    {' '.join(probe.split())}")
    return problems


def test_every_rule_and_dashboard_expression_returns_data_from_a_real_envoy(binaries):
    rules = rule_expressions()
    if BUILD == "module":
        # The dynamic module runs in no wasm VM: the alert on VM crashes has nothing to read.
        rules = [(where, expr) for where, expr in rules if "envoy_wasm_" not in expr]
    panels, label_values = dashboard_expressions()
    keys = {key_hash(raw): record for raw, record in KEYS.items()}
    with RlsService() as rls, \
            Stack(FILTER_CONFIG, keys=keys, concurrency=2, bootstrap_extra=STATS_CONFIG, rls_port=rls.grpc_port) as s:
        # Spent before Prometheus starts: all it ever sees of k_quota is refusals.
        assert [send(s, "prom-quota") for _ in range(2)] == [200, 200]
        sentinel = s.tmp / "sentinel-rules.yml"
        sentinel.write_text(SENTINEL_RULES)
        with Prometheus(binaries[0], prometheus_config(s.admin_port, sentinel)) as prom:
            prom.wait_until("a first scrape", lambda: prom.value('up{job="envoy"}') == 1)
            mixed_load(s)
            # Scraped after the load, histograms included (Envoy flushes them every second),
            # and the series the load created (per key) scraped 3 times, so that rate()
            # has two samples in any window; then the rules evaluated on it.
            prom.wait_until("the load scraped", lambda: (
                prom.value("sum(apikey_filter_denied_too_many_failed_attempts)") == GUESSES - 3
                and (prom.value("sum(apikey_filter_rate_limit_service_latency_ms_count)") or 0) >= 10
                and (prom.value("sum(apikey_filter_key_service_latency_ms_count)") or 0) >= 4
                and all((prom.value(f"min(count_over_time({m}[1m]))") or 0) >= 3 for m in NEW_SERIES)))
            prom.wait_until("rules evaluated on the load", lambda: (
                prom.value("sum(apikey:requests:rate5m)") or 0) > 0)

            problems = []
            for where, expr in rules + panels:
                problems += check_expression(prom, where, expr)

            existing = set(prom.api("label/__name__/values")["data"])
            used, regexes = set(), set()
            for where, expr in rules + panels:
                names, name_regexes = metric_names(expr)
                used |= names
                regexes |= {(where, r) for r in name_regexes}
                problems += [f"{where}: no metric {n} in Prometheus" for n in sorted(names - existing)]
            for where, regex in sorted(regexes):
                if not any(re.fullmatch(regex, n) for n in existing):
                    problems.append(f"{where}: no metric matches {{__name__=~{regex!r}}}")
            for where, metric, label in label_values:
                values = prom.api(f"label/{label}/values", **{"match[]": metric}).get("data")
                if not values:
                    problems.append(f"{where}: label_values({metric}, {label}) is empty")

            assert not problems, (f"{len(problems)} problem(s) with {len(rules)} rule and {len(panels)} "
                                  "dashboard expressions:\n" + "\n".join(problems))
            assert used >= {"apikey_filter_allowed", "apikey_filter_key_service_changes_age_s",
                            "apikey_filter_key_denied", "apikey_filter_key_service_latency_ms_bucket"}
            if BUILD == "wasm":
                assert "envoy_wasm_apikey_filter_vm_reload_backoff" in used

            # Two alerts the load trips for real (held pending by their `for`).
            def pending():
                result = prom.query('ALERTS{alertname=~"ApikeyKeyQuotaSpent|ApikeyBruteForceSurge"}')
                return {(a["metric"]["alertname"], a["metric"].get("key_id")) for a in result["data"]["result"]}
            prom.wait_until("the quota and brute-force alerts pending", lambda: pending() >= {
                ("ApikeyKeyQuotaSpent", "k_quota"), ("ApikeyBruteForceSurge", None)}, timeout=10)
