"""pytest support: a clear message when the .wasm is missing, and a per-test timeout so a hung Envoy or key service fails one test, not the whole run."""
import os
import sys
from pathlib import Path

import pytest

from testbed.harness import FILTER_PATH

DEFAULT_TIMEOUT_S = 120
# These run the helper servers on their own; they need neither the .wasm nor Envoy.
NO_ENVOY_MODULES = {"test_tools.py", "test_rls_server.py", "test_keyservice.py"}


@pytest.hookimpl(tryfirst=True)  # before pytest-timeout reads its settings
def pytest_configure(config):
    try:
        unset = config.getvalue("timeout") is None
    except (AttributeError, ValueError):
        return  # pytest-timeout not installed: scripts/setup-python installs it
    if unset and not os.environ.get("PYTEST_TIMEOUT") and not config.getini("timeout"):
        config.option.timeout = DEFAULT_TIMEOUT_S


def pytest_collection_modifyitems(session, config, items):
    needs_wasm = any(item.path.name not in NO_ENVOY_MODULES for item in items)
    if needs_wasm and not FILTER_PATH.is_file():
        pytest.exit(f"{FILTER_PATH} not found: run scripts/build (or scripts/build-module) first", returncode=2)
