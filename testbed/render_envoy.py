#!/usr/bin/env python3
"""Render envoy/envoy.yaml.tmpl by replacing its {{NAME}} placeholders.

One template serves the tests, the demo and docker-compose; only the values differ.

    python3 -m testbed.render_envoy --set LISTEN_PORT=10000 --set ADMIN_PORT=9901 \
        --set UPSTREAM_PORT=8082 --set KEY_SERVICE_PORT=8081 \
        --set WASM_PATH=$PWD/target/wasm32-wasip1/release/apikey_filter.wasm \
        --set ACCESS_LOG=/tmp/access.log --filter-config envoy/demo/filter-config.json -o envoy.yaml

Unknown names and placeholders left unfilled are errors: a typo must not turn into a
config that Envoy reads differently from what was meant.
"""
import argparse
import json
import re
import sys
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent.parent / "envoy" / "envoy.yaml.tmpl"
PLACEHOLDER = re.compile(r"\{\{([A-Z0-9_]+)\}\}")

DEFAULTS = {
    "BIND_ADDRESS": "127.0.0.1",
    "UPSTREAM_HOST": "127.0.0.1",
    "KEY_SERVICE_HOST": "127.0.0.1",
    # docker-compose uses STRICT_DNS with host names (scripts/render-compose); here
    # everything is an IP, and a STATIC cluster takes only IPs.
    "UPSTREAM_DISCOVERY": "STATIC",
    "KEY_SERVICE_DISCOVERY": "STATIC",
    # The rate limit service: the demo's and scripts' usual port; tests name their own.
    "RLS_HOST": "127.0.0.1",
    "RLS_PORT": 8083,
    "RLS_DISCOVERY": "STATIC",
}


class RenderError(ValueError):
    pass


def placeholders(text):
    return set(PLACEHOLDER.findall(text))


def filter_config_line(config):
    """FILTER_CONFIG sits in a YAML `|` block scalar: it must be a single line."""
    if not isinstance(config, str):
        config = json.dumps(config, separators=(",", ":"))
    if "\n" in config or "\r" in config:
        raise RenderError("FILTER_CONFIG must be one line (json.dumps it)")
    return config


def render_text(values, template=TEMPLATE):
    text = Path(template).read_text()
    merged = {**DEFAULTS, **values}
    # The listener binds where everything else does, unless told otherwise (IPv6 clients).
    merged.setdefault("LISTEN_ADDRESS", merged["BIND_ADDRESS"])
    if "FILTER_CONFIG" in merged:
        merged["FILTER_CONFIG"] = filter_config_line(merged["FILTER_CONFIG"])
    wanted = placeholders(text)
    unknown = sorted(set(merged) - wanted)
    if unknown:
        raise RenderError(f"unknown placeholder(s): {', '.join(unknown)} (template has {', '.join(sorted(wanted))})")
    missing = sorted(wanted - set(merged))
    if missing:
        raise RenderError(f"placeholder(s) left unfilled: {', '.join(missing)}")
    return PLACEHOLDER.sub(lambda m: str(merged[m.group(1)]), text)


WASM_FILTER_START = "          - name: envoy.filters.http.wasm\n"
ROUTER_FILTER_START = "          - name: envoy.filters.http.router\n"
WASM_FINGERPRINT = "%FILTER_STATE(wasm.apikey_filter.fingerprint:PLAIN)%"
MODULE_FILTER = """\
          - name: envoy.filters.http.dynamic_modules
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter
              dynamic_module_config:
                # libapikey_filter.so, found in $ENVOY_DYNAMIC_MODULES_SEARCH_PATH.
                name: apikey_filter
                do_not_close: true
              filter_name: apikey_filter
              filter_config:
                "@type": type.googleapis.com/google.protobuf.StringValue
                value: |
                  {config}
"""
# Prometheus then names the module's stats as the .wasm's (apikey_filter_allowed, not
# envoy_dynamicmodulescustom_apikey_filter_allowed), so one set of dashboards serves both.
MODULE_RUNTIME = """
layered_runtime:
  layers:
  - name: static
    static_layer:
      envoy.reloadable_features.dynamic_modules_strip_custom_stat_prefix: true
"""


def as_module(text, filter_config):
    """The same Envoy configuration, loading libapikey_filter.so (Envoy 1.40's dynamic
    modules filter) instead of the .wasm: the filter block, and the access log's filter
    state name (a wasm filter's properties are under `wasm.`)."""
    start = text.index(WASM_FILTER_START)
    end = text.index(ROUTER_FILTER_START, start)
    module = MODULE_FILTER.replace("{config}", filter_config_line(filter_config))
    text = text[:start] + module + text[end:] + MODULE_RUNTIME
    return text.replace(WASM_FINGERPRINT, "%FILTER_STATE(apikey_filter.fingerprint:PLAIN)%")


def render(values, out_path, template=TEMPLATE, build="wasm"):
    """Render the template with `values` (NAME -> value; FILTER_CONFIG may be a dict) to
    out_path; build="module" loads libapikey_filter.so instead of the .wasm."""
    text = render_text(values, template)
    if build == "module":
        text = as_module(text, values["FILTER_CONFIG"])
    Path(out_path).write_text(text)
    return Path(out_path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="fill a placeholder")
    ap.add_argument("--filter-config", metavar="FILE", help="JSON file inserted as FILTER_CONFIG (on one line)")
    ap.add_argument("--template", default=str(TEMPLATE))
    ap.add_argument("--build", choices=("wasm", "module"), default="wasm",
                    help="load the .wasm (WASM_PATH) or libapikey_filter.so (Envoy 1.40+; set "
                         "ENVOY_DYNAMIC_MODULES_SEARCH_PATH to its folder; WASM_PATH is then unused)")
    ap.add_argument("-o", "--output", required=True, metavar="OUT")
    args = ap.parse_args(argv)

    values = {}
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name:
            ap.error(f"--set wants NAME=VALUE, got {item!r}")
        values[name] = value
    if args.filter_config:
        values["FILTER_CONFIG"] = json.loads(Path(args.filter_config).read_text())
    try:
        render(values, args.output, args.template, args.build)
    except RenderError as e:
        print(f"render_envoy: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
