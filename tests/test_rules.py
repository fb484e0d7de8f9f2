"""Tests for sa_middleware.rules.evaluate on hand-made snapshots (the stores' conformance suite drives it through
real stores)."""

from __future__ import annotations

import itertools

import pytest
from support import admission_of

from sa_middleware.records import Admission, PrincipalState, SessionInfo, Snapshot
from sa_middleware.rules import evaluate

NOW = 1_700_000_000.0


def _session(session_id: str, created: float) -> SessionInfo:
    return SessionInfo(session_id, "alice", "human", "active", created, NOW - 1, NOW + 600)


def _snapshot(sessions: list[SessionInfo]) -> Snapshot:
    return Snapshot(NOW, PrincipalState(), sessions, [], {}, {})


def _admission(session_id: str, **policy: object) -> Admission:
    return admission_of(ticket_id="t1", sub="alice", kind="human", session_id=session_id, token_hash="h",
                        token_exp=NOW + 600, token_iat=NOW - 60, token_gen=None, jti=None, actor=None,
                        credential=None, device=None, client="10.0.0.1", user_agent="ua", route="GET /x", **policy)


AGES = {"s-old": NOW - 300, "s-mid": NOW - 200, "s-new": NOW - 100}
ORDERS = [order for size in (2, 3) for order in itertools.permutations(AGES, size)]


def _oldest(order: tuple[str, ...], count: int) -> set[str]:
    return set(sorted(order, key=AGES.__getitem__)[:count])


@pytest.mark.parametrize("order", ORDERS)
def test_the_oldest_sessions_are_evicted_in_whatever_order_the_snapshot_lists_them(order: tuple[str, ...]) -> None:
    snapshot = _snapshot([_session(sid, AGES[sid]) for sid in order])
    for limit in range(1, len(order) + 1):
        verdict = evaluate(_admission("s-newest", max_sessions=limit, on_session_limit="evict_oldest"), snapshot)
        assert verdict.code is None and verdict.ticket is not None
        assert verdict.session_status == dict.fromkeys(_oldest(order, len(order) - limit + 1), "revoked")


@pytest.mark.parametrize("order", ORDERS)
def test_a_session_among_the_oldest_is_admitted_in_whatever_order_the_snapshot_lists_them(
        order: tuple[str, ...]) -> None:
    snapshot = _snapshot([_session(sid, AGES[sid]) for sid in order])
    for sid in order:
        older = sum(AGES[other] < AGES[sid] for other in order)
        assert evaluate(_admission(sid, max_sessions=older + 1), snapshot).code is None
        if older:
            assert evaluate(_admission(sid, max_sessions=older), snapshot).code == "too_many_sessions"
