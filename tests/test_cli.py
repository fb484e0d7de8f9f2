"""The ``sa-middleware`` command, through its real entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "sa_middleware.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)


def test_demo_plays_every_behaviour_as_expected() -> None:
    result = run_cli("demo", "--server", "both")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.endswith((" ok", "MISMATCH"))]
    assert len(lines) >= 60, result.stdout
    assert all(line.endswith(" ok") for line in lines), result.stdout
    for behaviour in ("1 agent risk", "2 rotation", "3 object lock", "4 compromise", "5 sessions"):
        assert sum(line.startswith(behaviour) for line in lines) >= 4, behaviour
    assert "all behaviours as expected" in result.stdout


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert "0.1.0" in result.stdout
