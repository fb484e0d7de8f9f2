"""Conformance of the audit trail (README "Audit trail"): every store must pass.

What an admission records in its own atomic operation (its denial, the admission when asked, the sessions it paused
or evicted), ``record_audit`` (stamping with the store's clock), the ``audit`` query (filters, newest first, limit)
and retention by age and by count. It runs on the stores of :data:`test_conformance.STORE_CASES` through the same
fixtures (``case``, ``clock``, ``store``, ``d``), so a store added there is checked here too.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_conformance import (  # the fixtures and helpers of the main conformance suite
    Driver,
    anyio_backend,
    case,
    clock,
    d,
    store,
)

from sa_middleware.errors import ConfigurationError
from sa_middleware.records import AuditRecord, LockRequest

__all__ = ["anyio_backend", "case", "clock", "d", "store"]  # fixtures, re-exported for pytest

X = (LockRequest("obj:1"),)
NEAR = 5.0  # the store's clock and the test's agree within this (a real-clock store: its server's TIME)


def audit(d: Driver, **filters: Any) -> list[AuditRecord]:
    return d.store.audit(**{"limit": 1000, **filters})


def op(code: str, **fields: Any) -> AuditRecord:
    return AuditRecord("operation", code, fields.pop("source", "operator"), **fields)


# ---------------------------------------------------------------------------------------------------- admissions


def test_a_denial_is_recorded_by_the_admission_itself(d: Driver) -> None:
    assert audit(d) == []
    d.store.rotate("alice")  # a store operation writes no record: Operations (the Guard, the CLI) does
    assert audit(d) == []
    d.deny("stale_generation", token_gen=0, route="POST /payments/{id}/approve")
    [record] = audit(d)
    assert (record.kind, record.code, record.source) == ("denial", "stale_generation", "middleware")
    assert (record.sub, record.session_id, record.route) == ("alice", "alice-1", "POST /payments/{id}/approve")
    assert "superseded" in record.detail
    assert record.time is not None and abs(record.time - d.clock()) < NEAR


def test_every_kind_of_store_denial_is_recorded(d: Driver) -> None:
    d.store.revoke_session("alice-9")
    d.deny("session_revoked", session_id="alice-9")
    d.deny("insufficient_scope", scopes=frozenset({"admin"}))
    t = d.ok(sub="bob", locks=X)
    d.deny("object_locked", locks=X)
    d.deny("too_many_in_flight", sub="bob", session_id="bob-2", max_in_flight=1)
    d.store.release(t)
    codes = [r.code for r in audit(d, kind="denial")]
    assert codes == ["too_many_in_flight", "object_locked", "insufficient_scope", "session_revoked"]


def test_admissions_are_recorded_only_when_asked(d: Driver) -> None:
    d.passes()
    assert audit(d) == []
    ticket = d.passes(session_id="alice-2", audit_admitted=True, locks=X)
    [record] = audit(d)
    assert (record.kind, record.code, record.sub, record.session_id) == ("admission", "admitted", "alice", "alice-2")
    assert ticket.ticket_id in record.detail and f"obj:1#{ticket.fencing_tokens['obj:1']}" in record.detail
    d.deny("insufficient_scope", audit_admitted=True, scopes=frozenset({"admin"}))  # a denial is still a denial
    assert [r.code for r in audit(d)] == ["insufficient_scope", "admitted"]


def test_object_locked_is_not_recorded_while_the_guard_waits(d: Driver) -> None:
    t = d.ok(sub="bob", locks=X)
    d.deny("object_locked", locks=X, audit_locked=False)
    assert audit(d) == []
    d.deny("object_locked", locks=X)
    assert [r.code for r in audit(d)] == ["object_locked"]
    d.deny("insufficient_scope", audit_locked=False, scopes=frozenset({"admin"}))  # only object_locked is deferred
    assert [r.code for r in audit(d)] == ["insufficient_scope", "object_locked"]
    d.store.release(t)


def test_a_lock_conflict_pause_of_the_requester_is_recorded(d: Driver) -> None:
    held = d.ok(sub="bob", kind="human", locks=X)
    d.deny("session_paused", sub="agent", kind="agent", locks=X, on_lock_conflict="pause", route="PUT /objects/{id}")
    records = audit(d, sub="agent")
    assert [(r.kind, r.code) for r in records] in (
        [("change", "session_paused"), ("denial", "session_paused")],
        [("denial", "session_paused"), ("change", "session_paused")])  # same instant: either order
    change = next(r for r in records if r.kind == "change")
    assert (change.session_id, change.route, change.source) == ("agent-1", "PUT /objects/{id}", "middleware")
    assert "lock conflict" in change.detail
    d.deny("session_paused", sub="agent", kind="agent")  # refused while paused: no second change
    assert len(audit(d, sub="agent", kind="change")) == 1
    d.store.release(held)


def test_a_lock_conflict_pause_of_the_holder_is_recorded_once(d: Driver) -> None:
    held = d.ok(sub="agent", kind="agent", locks=X)
    d.deny("object_locked", sub="bob", kind="human", locks=X, on_lock_conflict="pause")
    d.deny("object_locked", sub="bob", kind="human", session_id="bob-2", locks=X, on_lock_conflict="pause")
    [change] = audit(d, kind="change")
    assert (change.code, change.sub, change.session_id) == ("session_paused", "agent", "agent-1")
    assert "bob-1" in change.detail and "bob" in change.detail
    assert [r.code for r in audit(d, sub="bob")] == ["object_locked", "object_locked"]
    assert d.status("agent", "agent-1") == "paused"
    d.store.release(held)


def test_an_eviction_is_recorded(d: Driver) -> None:
    d.passes(max_sessions=1)
    d.passes(session_id="alice-2", max_sessions=1, on_session_limit="evict_oldest", route="GET /things")
    [change] = audit(d)
    assert (change.kind, change.code, change.sub, change.session_id) == ("change", "session_evicted", "alice",
                                                                         "alice-1")
    assert "alice-2" in change.detail and change.route == "GET /things"
    d.deny("session_revoked")
    assert [r.code for r in audit(d)] == ["session_revoked", "session_evicted"]


# ---------------------------------------------------------------------------------------------------- record_audit


def test_record_audit_stamps_with_the_store_clock_and_keeps_given_times(d: Driver) -> None:
    now = d.clock()
    d.store.record_audit([op("rotate", sub="alice", detail="generation 1")])
    d.store.record_audit([op("rotate", sub="bob", time=now - 100, source="cli"),
                          AuditRecord("denial", "invalid_token", "middleware", route="GET /x", time=now - 50)])
    d.store.record_audit([])
    records = audit(d)
    assert [(r.code, r.sub) for r in records] == [("rotate", "alice"), ("invalid_token", None), ("rotate", "bob")]
    assert records[0].time is not None and abs(records[0].time - now) < NEAR
    assert [r.time for r in records[1:]] == [now - 50, now - 100]
    assert records[0].detail == "generation 1" and records[2].source == "cli" and records[1].route == "GET /x"
    assert records[1].sub is None and records[1].session_id is None and records[0].route is None


def test_records_of_one_instant_come_newest_first(d: Driver) -> None:
    now = d.clock()
    d.store.record_audit([op("rotate", sub="a", time=now), op("rotate", sub="b", time=now)])
    d.store.record_audit([op("rotate", sub="c", time=now)])
    assert [r.sub for r in audit(d)] == ["c", "b", "a"]


def test_a_long_detail_is_cut(d: Driver) -> None:
    d.store.record_audit([op("raise_risk", sub="alice", detail="x" * 5000)])
    [record] = audit(d)
    assert 0 < len(record.detail) <= 512


@pytest.mark.parametrize("char", ["\u00e9", "\u20ac", "\U0001f600"])  # 2, 3 and 4 bytes in UTF-8
def test_a_long_detail_is_cut_between_characters(d: Driver, char: str) -> None:
    for pad in range(4):  # wherever the cut falls in a character
        detail = "a" * (509 + pad) + char * 200
        d.store.record_audit([op("raise_risk", sub=f"u{pad}", detail=detail)])
        [record] = audit(d, sub=f"u{pad}")
        assert 500 < len(record.detail) <= 512 and detail.startswith(record.detail)


# ---------------------------------------------------------------------------------------------------- filters


def test_filters_combine(d: Driver) -> None:
    now = d.clock()
    d.store.record_audit([
        op("rotate", sub="alice", time=now - 300),
        op("revoke_session", sub="alice", session_id="s1", time=now - 200),
        AuditRecord("denial", "session_revoked", "middleware", "alice", "s1", "GET /x", time=now - 100),
        AuditRecord("denial", "session_revoked", "middleware", "bob", "s2", "GET /x", time=now - 50),
        op("rotate", sub="bob", time=now - 10),
    ])
    assert [r.time for r in audit(d)] == [now - 10, now - 50, now - 100, now - 200, now - 300]
    assert [r.code for r in audit(d, sub="alice")] == ["session_revoked", "revoke_session", "rotate"]
    assert [r.sub for r in audit(d, session_id="s1")] == ["alice", "alice"]
    assert [r.sub for r in audit(d, code="session_revoked")] == ["bob", "alice"]
    assert [r.code for r in audit(d, kind="operation", sub="bob")] == ["rotate"]
    assert [r.time for r in audit(d, since=now - 200)] == [now - 10, now - 50, now - 100, now - 200]
    assert [r.time for r in audit(d, until=now - 100)] == [now - 100, now - 200, now - 300]
    assert [r.time for r in audit(d, since=now - 250, until=now - 60, sub="alice")] == [now - 100, now - 200]
    assert [r.time for r in audit(d, limit=2)] == [now - 10, now - 50]
    assert [r.time for r in audit(d, sub="alice", limit=1)] == [now - 100]
    assert audit(d, sub="carol") == [] and audit(d, code="rotate", session_id="s1") == []
    assert audit(d, since=now + 10) == []


# ---------------------------------------------------------------------------------------------------- retention


def test_retention_by_count_keeps_the_newest(d: Driver) -> None:
    d.store.configure_audit(max_records=5)
    now = d.clock()
    d.store.record_audit([op("rotate", sub=f"u{i}", time=now - 100 + i) for i in range(4)])
    for i in range(4, 9):
        d.store.record_audit([op("rotate", sub=f"u{i}", time=now - 100 + i)])
    assert [r.sub for r in audit(d)] == ["u8", "u7", "u6", "u5", "u4"]
    d.deny("insufficient_scope", scopes=frozenset({"admin"}))  # admissions count too
    assert [r.sub for r in audit(d)] == ["alice", "u8", "u7", "u6", "u5"]


def test_retention_by_age(d: Driver) -> None:  # needs_clock
    d.store.configure_audit(retention=1.0)
    d.store.record_audit([op("rotate", sub="old")])
    d.store.record_audit([op("rotate", sub="ancient", time=d.clock() - 3600)])
    assert [r.sub for r in audit(d)] == ["old"]  # past the retention at once: never shown
    d.clock.advance(1.5)
    d.store.record_audit([op("rotate", sub="new")])
    d.deny("insufficient_scope", scopes=frozenset({"admin"}))
    assert [r.sub for r in audit(d)] == ["alice", "new"]
    assert audit(d, sub="old", since=0) == []


def test_configure_audit_checks_its_values(d: Driver) -> None:
    for bad in ({"retention": 0}, {"retention": -1}, {"retention": float("inf")}, {"retention": True},
                {"max_records": 0}, {"max_records": 1.5}, {"max_records": True}):
        with pytest.raises(ConfigurationError):
            d.store.configure_audit(**bad)
    d.store.configure_audit()  # nothing given: nothing changes
    d.store.configure_audit(retention=60, max_records=10)
    assert (d.store.audit_retention, d.store.audit_max_records) == (60.0, 10)


# ---------------------------------------------------------------------------------------------------- async


@pytest.mark.anyio
async def test_async_twins(d: Driver) -> None:
    await d.store.arecord_audit([op("rotate", sub="alice"), op("rotate", sub="bob")])
    d.deny("insufficient_scope", scopes=frozenset({"admin"}))
    records = await d.store.aaudit(sub="alice", kind="operation")
    assert [(r.code, r.sub) for r in records] == [("rotate", "alice")]
    assert len(await d.store.aaudit(limit=2)) == 2
