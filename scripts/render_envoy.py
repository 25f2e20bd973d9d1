#!/usr/bin/env python3
"""Render envoy/envoy.yaml.tmpl by replacing its {{NAME}} placeholders.

One template serves the tests, the demo and docker-compose; only the values differ.

    python3 scripts/render_envoy.py --set LISTEN_PORT=10000 --set ADMIN_PORT=9901 \
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


def render(values, out_path, template=TEMPLATE):
    """Render the template with `values` (NAME -> value; FILTER_CONFIG may be a dict) to out_path."""
    text = render_text(values, template)
    Path(out_path).write_text(text)
    return Path(out_path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="fill a placeholder")
    ap.add_argument("--filter-config", metavar="FILE", help="JSON file inserted as FILTER_CONFIG (on one line)")
    ap.add_argument("--template", default=str(TEMPLATE))
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
        render(values, args.output, args.template)
    except RenderError as e:
        print(f"render_envoy: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
