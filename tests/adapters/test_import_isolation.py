"""Importing the core or one adapter never imports another framework (each import in a fresh interpreter)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

FRAMEWORKS = ("starlette", "fastapi", "flask", "django", "mcp")

# module -> the frameworks it may import (FastAPI is built on Starlette)
ALLOWED: dict[str, set[str]] = {
    "sa_middleware": set(),
    "sa_middleware.asgi": set(),
    "sa_middleware.wsgi": set(),
    "sa_middleware.adapters": set(),
    "sa_middleware.adapters._common": set(),
    "sa_middleware.adapters.starlette": {"starlette"},
    "sa_middleware.adapters.fastapi": {"fastapi", "starlette"},
    "sa_middleware.adapters.flask": {"flask"},
    "sa_middleware.adapters.django": {"django"},
    "sa_middleware.adapters.mcp": {"mcp", "starlette"},  # the MCP SDK serves over Starlette
    "sa_middleware.policy": set(),
    "sa_middleware.guard": set(),
    "sa_middleware.demo": set(),
    "sa_middleware.demo_examples": set(),
    "sa_middleware.cli": set(),
}

PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules} & set(sys.argv[2:]))))
"""


@pytest.mark.parametrize("module", list(ALLOWED))
def test_import_pulls_in_no_other_framework(module: str) -> None:
    if module in ("sa_middleware.adapters.flask", "sa_middleware.adapters.django") \
            and importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not written yet")
    done = subprocess.run([sys.executable, "-c", PROBE, module, *FRAMEWORKS], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    imported = set(json.loads(done.stdout.strip().splitlines()[-1]))
    assert imported <= ALLOWED[module], f"{module} imported {sorted(imported - ALLOWED[module])}"
    if module.startswith("sa_middleware.adapters.") and ALLOWED[module]:
        assert module.rsplit(".", 1)[1] in imported  # the probe sees what it should: the adapter's own framework
