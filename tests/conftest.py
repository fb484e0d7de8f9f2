"""Fixtures shared by the test modules; plain helpers are in ``support.py``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support import make_guard

from sa_middleware import Guard
from sa_middleware.demo import DemoIssuer


@pytest.fixture(scope="module")
def issuer() -> DemoIssuer:
    return DemoIssuer()


@pytest.fixture
def guard(issuer: DemoIssuer, tmp_path: Path) -> Iterator[Guard]:
    """A Guard over a fresh SQLite store file, trusting ``issuer``, with ``support.POLICIES``."""
    g = make_guard(issuer, f"sqlite:///{tmp_path / 'guard.db'}")
    try:
        yield g
    finally:
        g.close()
