"""Conformance of the store operations that security events use (``sa_middleware.events``): every store must pass.

``revoke_sessions``, ``disable_principal`` / ``enable_principal``, ``set_assurance``, ``raise_risk`` and the event
replay record ``seen_event`` / ``forget_event``. It runs on the stores of :data:`test_conformance.STORE_CASES`
through the same fixtures (``case``, ``clock``, ``store``, ``d``), so a store added there is checked here too.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from test_conformance import (  # the fixtures and helpers of the main conformance suite
    Clock,
    Driver,
    StoreCase,
    anyio_backend,
    case,
    clock,
    d,
    later,
    store,
)

from sa_middleware.stores.base import Store
from sa_middleware.stores.sqlite import SQLiteStore

__all__ = ["anyio_backend", "case", "clock", "d", "store"]  # fixtures, re-exported for pytest

GOLD = ("gold",)


# ---------------------------------------------------------------------------------------------------- revoke_sessions


def test_revoke_sessions_revokes_every_session_and_older_tokens(d: Driver) -> None:
    d.passes()
    d.passes(session_id="alice-2")
    d.passes(sub="bob")
    assert d.store.revoke_sessions("alice", None) == ["alice-1", "alice-2"]
    d.deny("session_revoked")
    d.deny("session_revoked", session_id="alice-2")
    d.deny("session_revoked", session_id="alice-3")  # a new session with a token issued before: refused too
    d.deny("session_revoked", session_id="alice-3", token_iat=None)  # fail closed
    d.deny("session_revoked", token_iat=later(d.clock))  # a stored revoked session stays revoked
    d.passes(session_id="alice-3", token_iat=d.clock())  # a token issued after the revocation: a new session
    d.passes(sub="bob")  # per principal
    assert d.status("alice", "alice-1") == "revoked"
    assert d.status("alice", "alice-3") == "active"


def test_revoke_sessions_before_a_time(d: Driver) -> None:
    d.passes(token_iat=d.clock() - 10)
    before = d.clock() - 30
    assert d.store.revoke_sessions("alice", before) == []  # the stored session was created after it
    d.passes(token_iat=d.clock() - 10)
    d.deny("session_revoked", token_iat=d.clock() - 60)
    d.deny("session_revoked", token_iat=before)  # at the time itself: refused (fail closed)


def test_revoke_sessions_in_the_future_is_now(d: Driver) -> None:
    d.passes()
    assert d.store.revoke_sessions("alice", d.clock() + 3600) == ["alice-1"]
    d.passes(session_id="alice-2", token_iat=later(d.clock))


def test_revoke_sessions_watermark_never_moves_back(d: Driver) -> None:
    first = d.clock()
    d.store.revoke_sessions("alice", None)
    d.store.revoke_sessions("alice", first - 600)
    d.deny("session_revoked", session_id="alice-2", token_iat=first - 1)


def test_revoke_sessions_wins_over_a_paused_session_and_keeps_the_order(d: Driver) -> None:
    d.passes()
    d.store.pause_session("alice-1")
    d.store.revoke_sessions("alice", None)
    d.deny("session_revoked")
    d.store.rotate("alice")
    d.deny("stale_generation", token_gen=0)  # generation is checked first


# ---------------------------------------------------------------------------------------------------- disable / enable


def test_disable_and_enable_principal(d: Driver) -> None:
    d.passes()
    at = d.store.disable_principal("alice")
    d.deny("token_revoked")
    d.deny("token_revoked", token_iat=later(d.clock))  # even a fresh token while disabled
    d.passes(sub="bob")
    assert d.store.enable_principal("alice") is True
    assert d.store.enable_principal("alice") is False
    fresh = later(d.clock)
    d.passes(session_id="alice-2", token_iat=fresh)
    d.deny("token_revoked", session_id="alice-3", token_iat=at - 1)  # issued before the disable: still dead
    assert d.store.enable_principal("carol") is False  # never disabled


def test_disable_twice_keeps_the_watermark_moving_forward(d: Driver) -> None:
    first = d.store.disable_principal("alice")
    d.clock.advance(0.05)
    second = d.store.disable_principal("alice")
    assert second >= first
    d.store.enable_principal("alice")
    d.deny("token_revoked", token_iat=second - 0.01)
    d.passes(token_iat=later(d.clock))


def test_disabled_principal_is_checked_after_the_generation(d: Driver) -> None:
    d.store.rotate("alice")
    d.store.disable_principal("alice")
    d.deny("stale_generation", token_gen=0)
    d.deny("token_revoked", token_gen=1)


# ---------------------------------------------------------------------------------------------------- set_assurance


def test_set_assurance_replaces_the_acr_of_older_tokens(d: Driver) -> None:
    d.passes(acr="gold", acr_values=GOLD)
    d.store.set_assurance("alice", "silver", None)
    d.deny("step_up_required", acr="gold", acr_values=GOLD)  # lowered since the token was issued
    d.passes(acr="gold", acr_values=GOLD, token_iat=later(d.clock))  # a newer token keeps its own acr
    d.deny("step_up_required", acr="silver", acr_values=GOLD, token_iat=later(d.clock))
    d.passes(acr="bronze")  # no acr requirement: no effect
    d.passes(sub="bob", acr="gold", acr_values=GOLD)  # per principal
    d.store.set_assurance("alice", "gold", None)
    d.passes(acr="bronze", acr_values=GOLD)  # raised since the token was issued
    d.passes(acr="bronze", acr_values=GOLD, token_iat=None)  # no iat: cannot be newer, the stored level counts
    d.store.set_assurance("alice", "silver", None)
    d.deny("step_up_required", acr="gold", acr_values=GOLD, token_iat=None)
    d.store.set_assurance("alice", None, None)
    d.deny("step_up_required", acr="bronze", acr_values=GOLD)
    d.passes(acr="gold", acr_values=GOLD)


def test_set_assurance_as_of_a_time(d: Driver) -> None:
    d.store.set_assurance("alice", "silver", d.clock() - 120)
    d.passes(acr="gold", acr_values=GOLD, token_iat=d.clock() - 60)  # issued after the change
    d.deny("step_up_required", acr="gold", acr_values=GOLD, token_iat=d.clock() - 200)
    d.store.set_assurance("alice", "gold", d.clock() + 3600)  # a time in the future counts as now
    d.passes(acr="bronze", acr_values=GOLD, token_iat=d.clock() - 60)
    d.deny("step_up_required", acr="bronze", acr_values=GOLD, token_iat=later(d.clock))


def test_step_up_keeps_the_order_of_checks(d: Driver) -> None:
    d.store.set_assurance("alice", "silver", None)
    d.deny("insufficient_scope", acr="gold", acr_values=GOLD, scopes=frozenset({"x"}))


# ---------------------------------------------------------------------------------------------------- raise_risk


def test_raise_risk_then_it_expires(d: Driver) -> None:
    # needs_clock
    d.store.raise_risk("alice", 3, 1.0)
    denial = d.deny("risk_too_high", max_risk=2)
    assert denial.retry_after is not None and denial.retry_after >= 1
    d.passes(max_risk=3)
    d.passes(sub="bob", max_risk=0)
    d.passes(raises_risk=1, risk_window=1.0)  # adds up with the risk of actions
    d.deny("risk_too_high", max_risk=3)
    d.clock.advance(1.5)
    d.passes(max_risk=0)


# ---------------------------------------------------------------------------------------------------- seen_event


def test_seen_event_records_once_and_forget_releases(store: Store) -> None:
    assert store.seen_event("iss|jti-1", 60.0) is False
    assert store.seen_event("iss|jti-1", 60.0) is True
    assert store.seen_event("iss|jti-2", 60.0) is False
    store.forget_event("iss|jti-1")
    assert store.seen_event("iss|jti-1", 60.0) is False
    assert store.seen_event("iss|jti-1", 60.0) is True
    store.forget_event("never-seen")


def test_seen_event_expires(store: Store, clock: Clock) -> None:
    # needs_clock
    assert store.seen_event("k", 1.0) is False
    clock.advance(1.5)
    assert store.seen_event("k", 60.0) is False
    assert store.seen_event("k", 60.0) is True


def test_seen_event_is_atomic_across_threads_and_clients(case: StoreCase, store: Store, clock: Clock,
                                                         tmp_path: Path) -> None:
    peer = case.peer(tmp_path, clock) if case.peer is not None else store
    threads, results, barrier = 8, [], threading.Barrier(8)
    lock = threading.Lock()

    def run(index: int) -> None:
        client = peer if index % 2 else store
        barrier.wait()
        seen = client.seen_event("iss|race", 60.0)
        with lock:
            results.append(seen)

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    try:
        assert sorted(results) == [False] + [True] * (threads - 1)
    finally:
        if peer is not store:
            peer.close()


# ---------------------------------------------------------------------------------------------------- async twins


@pytest.mark.anyio
async def test_async_twins(d: Driver) -> None:
    s = d.store
    d.passes()
    assert await s.arevoke_sessions("alice", None) == ["alice-1"]
    d.deny("session_revoked")
    await s.adisable_principal("bob")
    d.deny("token_revoked", sub="bob")
    assert await s.aenable_principal("bob") is True
    await s.aset_assurance("carol", "silver", None)
    d.deny("step_up_required", sub="carol", acr="gold", acr_values=GOLD)
    await s.araise_risk("dave", 1, 60.0)
    d.deny("risk_too_high", sub="dave", max_risk=0)
    assert await s.aseen_event("k", 60.0) is False
    assert await s.aseen_event("k", 60.0) is True
    await s.aforget_event("k")
    assert await s.aseen_event("k", 60.0) is False


# ---------------------------------------------------------------------------------------------------- SQLite upgrade


def test_sqlite_database_created_before_the_event_operations_is_upgraded(tmp_path: Path) -> None:
    path = str(tmp_path / "old.db")
    SQLiteStore(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    for column in ("sessions_before", "disabled_at", "assurance", "assurance_at"):
        conn.execute(f"ALTER TABLE principals DROP COLUMN {column}")  # the schema as it was before them
    conn.execute("DROP TABLE events_seen")
    conn.execute("INSERT INTO principals (sub, generation) VALUES ('alice', 2)")
    conn.close()
    upgraded = SQLiteStore(path)
    try:
        d = Driver(upgraded, time.time)  # type: ignore[arg-type]
        d.deny("stale_generation", token_gen=1)  # existing state kept
        d.passes(token_gen=2)
        upgraded.disable_principal("alice")
        d.deny("token_revoked", token_gen=2)
        assert upgraded.seen_event("k", 60.0) is False
    finally:
        upgraded.close()
