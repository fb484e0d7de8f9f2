"""The ``sa-middleware`` command, through its real entry point."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sa_middleware import Guard
from sa_middleware.context import RequestInfo
from sa_middleware.denials import Denial
from sa_middleware.devkeys import DEV_AUDIENCE, DEV_ISSUER, dev_key

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "sa_middleware.cli", *args], capture_output=True, text=True,
                          timeout=300, env=full_env, cwd=cwd)


def step_rows(stdout: str) -> list[str]:
    """The numbered step lines of the demo's table (under a behaviour's title line, in the order sent)."""
    return [line for line in stdout.splitlines() if re.match(r"^ *\d+ \S", line)]


def titles(stdout: str) -> list[str]:
    return [line[0] for line in stdout.splitlines() if re.match(r"^\d\. ", line)]


def test_demo_plays_every_behaviour_as_expected() -> None:
    result = run_cli("demo", "--server", "both")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = step_rows(result.stdout)
    assert len(rows) == 32, result.stdout
    assert [int(row.split()[0]) for row in rows] == list(range(1, 33))
    assert all(row.endswith(" ok  ok") and "NO" not in row.split()[-2:] for row in rows), result.stdout
    assert titles(result.stdout) == list("12345")
    summary = [line for line in result.stdout.splitlines() if line.startswith(("T1 core ASGI", "T2 core WSGI"))]
    assert len(summary) == 2 and all(line.count(" ok") == 5 for line in summary), result.stdout
    assert "all behaviours as expected" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 120


@pytest.mark.slow
def test_demo_against_every_example_app() -> None:
    result = run_cli("demo", "--server", "asgi", "--examples", "examples")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = step_rows(result.stdout)
    assert len(rows) == 32 and all(row.split()[-7:] == ["ok"] * 7 for row in rows), result.stdout
    header = next(line for line in result.stdout.splitlines() if line.lstrip().startswith("# "))
    assert header.split()[-7:] == ["T1", "T2", "T3", "T4", "T5", "T6", "T7"]
    for column, framework in enumerate(("Starlette", "FastAPI", "Flask", "Django WSGI", "Django ASGI", "MCP"), 2):
        line = next(x for x in result.stdout.splitlines() if x.startswith(f"T{column} {framework}"))
        assert line.count(" ok") == 5 and "MISMATCH" not in line, line
    assert "skipped" not in result.stdout and "all behaviours as expected" in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 120


def test_demo_refuses_a_directory_that_is_not_the_examples(tmp_path: Path) -> None:
    result = run_cli("demo", "--server", "asgi", "--examples", str(tmp_path))
    assert result.returncode != 0
    assert "not the examples directory" in result.stdout + result.stderr


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


def test_token_mints_with_a_local_key_that_an_app_trusts(tmp_path: Path) -> None:
    key_file = tmp_path / "dev.pem"
    result = run_cli("token", "bot-1", "--kind", "agent", "--scope", "tickets payments:approve", "--sid", "s1",
                     "--gen", "3", "--act", "alice", "--claim", "acr=\"gold\"", "--claim", "tier=2",
                     "--key-file", str(key_file))
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    claims = _claims(token)
    assert claims["sub"] == "bot-1" and claims["sa_kind"] == "agent" and claims["gen"] == 3
    assert claims["scope"] == "tickets payments:approve" and claims["sid"] == "s1"
    assert claims["act"] == {"sub": "alice"} and claims["acr"] == "gold" and claims["tier"] == 2
    assert claims["iss"] == DEV_ISSUER and claims["aud"] == DEV_AUDIENCE and claims["exp"] - claims["iat"] == 600
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    # an app that trusts the same key file admits the token; a second key does not
    guard = Guard(store="memory://", keys=dev_key(key_file).public_pem, algorithms=["RS256"], issuer=DEV_ISSUER,
                  audience=DEV_AUDIENCE)
    other = Guard(store="memory://", keys=dev_key(tmp_path / "other.pem").public_pem, algorithms=["RS256"],
                  issuer=DEV_ISSUER, audience=DEV_AUDIENCE)
    try:
        request = RequestInfo("GET", "/x", {"authorization": f"Bearer {token}"})
        admitted = guard.admit(request)
        assert not isinstance(admitted, Denial) and admitted.context.principal == "bot-1"
        guard.release(admitted.ticket)
        refused = other.admit(request)
        assert isinstance(refused, Denial) and refused.code == "invalid_token"
    finally:
        guard.close()
        other.close()
    # the public key is printed on request, and the env var names the key file
    pem = run_cli("token", "x", "--public-key", env={"SA_DEV_KEY": str(key_file)})
    assert pem.stdout == dev_key(key_file).public_pem


def test_token_rejects_bad_claims(tmp_path: Path) -> None:
    result = run_cli("token", "x", "--claim", "novalue", "--key-file", str(tmp_path / "k.pem"))
    assert result.returncode == 2 and "NAME=JSON" in result.stderr
    result = run_cli("token", "x", "--gen", "-1", "--key-file", str(tmp_path / "k.pem"))
    assert result.returncode == 2


def test_dev_key_file_that_is_not_a_key_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    result = run_cli("token", "x", "--key-file", str(bad))
    assert result.returncode != 0 and "not a readable PEM private key" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert "0.1.0" in result.stdout
