"""The development key: one per user, in one documented place, announced when it is made."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jwt
import pytest

from sa_middleware.devkeys import DEV_AUDIENCE, DEV_ISSUER, default_dev_key_path, dev_key

BIN = Path(sys.executable).parent


def test_default_location_is_per_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SA_DEV_KEY", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    assert default_dev_key_path() == tmp_path / "config" / "sa-middleware" / "dev-key.pem"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_dev_key_path() == tmp_path / "home" / ".config" / "sa-middleware" / "dev-key.pem"
    monkeypatch.setenv("SA_DEV_KEY", str(tmp_path / "mine.pem"))
    assert default_dev_key_path() == tmp_path / "mine.pem"


def test_a_new_key_is_announced_once(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "keys" / "dev-key.pem"
    first = dev_key(path)
    assert f"created a new development key at {path}" in capsys.readouterr().err
    assert (path.stat().st_mode & 0o777, path.parent.stat().st_mode & 0o777) == (0o600, 0o700)
    assert dev_key(path).public_pem == first.public_pem
    assert capsys.readouterr().err == ""


def test_minting_from_any_directory_uses_the_one_key(tmp_path: Path) -> None:
    """Two shells in two directories, no SA_DEV_KEY: one key, made once (said on stderr), trusted by the app."""
    env = {k: v for k, v in os.environ.items() if k != "SA_DEV_KEY"} | {"XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    runs = []
    for where in ("project", "elsewhere"):
        (tmp_path / where).mkdir()
        runs.append(subprocess.run([str(BIN / "sa-middleware"), "token", "alice"], cwd=tmp_path / where, env=env,
                                   capture_output=True, text=True, timeout=60))
    assert [r.returncode for r in runs] == [0, 0]
    key_file = tmp_path / "cfg" / "sa-middleware" / "dev-key.pem"
    assert f"created a new development key at {key_file}" in runs[0].stderr and runs[1].stderr == ""
    public = dev_key(key_file).public_pem
    for run in runs:
        claims = jwt.decode(run.stdout.strip(), public, algorithms=["RS256"], audience=DEV_AUDIENCE,
                            issuer=DEV_ISSUER)
        assert claims["sub"] == "alice"
    assert not list((tmp_path / "project").iterdir()) and not list((tmp_path / "elsewhere").iterdir())
