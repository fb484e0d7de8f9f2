"""Conformance of ``all_sessions``, the store-wide listing behind the console and the metrics' session gauge:
every store must pass. Runs on the stores of :data:`test_conformance.STORE_CASES` through the same fixtures."""

from __future__ import annotations

import pytest
from test_conformance import (  # the fixtures and helpers of the main conformance suite
    Driver,
    anyio_backend,
    case,
    clock,
    d,
    store,
)

__all__ = ["anyio_backend", "case", "clock", "d", "store"]  # fixtures, re-exported for pytest

IDLE = 900.0


def test_all_sessions_lists_every_principal_most_recent_first(d: Driver) -> None:
    assert d.store.all_sessions(IDLE, 100) == []
    d.passes(sub="alice")
    d.passes(sub="bob", kind="agent")
    d.passes(sub="odd{sub}%7B", session_id="odd-1")  # characters a store must escape in its keys
    d.passes(sub="alice", session_id="alice-2")
    d.store.pause_session("bob-1")
    listed = d.store.all_sessions(IDLE, 100)
    assert {(s.sub, s.session_id, s.kind, s.status) for s in listed} == {
        ("alice", "alice-1", "human", "active"), ("alice", "alice-2", "human", "active"),
        ("bob", "bob-1", "agent", "paused"), ("odd{sub}%7B", "odd-1", "human", "active")}
    assert [s.last_seen for s in listed] == sorted((s.last_seen for s in listed), reverse=True)
    assert len(d.store.all_sessions(IDLE, 2)) == 2
    assert {s.session_id for s in d.store.all_sessions(IDLE, 100)} == {s.session_id for s in listed}


def test_all_sessions_leaves_out_idle_ones(d: Driver) -> None:
    d.passes(sub="alice")
    d.clock.advance(0.3)
    assert d.store.all_sessions(0.2, 100) == []
    assert [s.session_id for s in d.store.all_sessions(IDLE, 100)] == ["alice-1"]


@pytest.mark.anyio
async def test_async_twin(d: Driver) -> None:
    d.passes(sub="carol")
    assert [s.session_id for s in await d.store.aall_sessions(IDLE, 10)] == ["carol-1"]
