"""The store conformance suite: every store must pass these tests unchanged.

Each test drives a store through its public methods only (``admit``, ``release``, ``renew``, the operations and the
listings), with :class:`~sa_middleware.records.Admission` objects built by :func:`make_admission`.

Adding a store: add a :class:`StoreCase` to :data:`STORE_CASES`. A store that keeps its own clock (Redis uses the
server's ``TIME``) sets ``fake_clock=False``: its tests then get a :class:`RealClock`, whose ``advance`` waits for
real time to pass. Tests that need time to pass take the ``clock`` fixture and call ``clock.advance``; they use
short leases / windows (about a second) so a real-clock store can satisfy them by waiting. They are marked with
the ``needs_clock`` comment. Every other test is time-independent: it reads ``clock()`` only to place token
timestamps relative to the store's "now".
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
from support import admission_of

from sa_middleware.denials import Denial
from sa_middleware.records import Admission, LockRequest, Ticket
from sa_middleware.rules import SEEN_PRECISION
from sa_middleware.stores.base import Store
from sa_middleware.stores.memory import MemoryStore
from sa_middleware.stores.sqlite import SQLiteStore

# ---------------------------------------------------------------------------------------------------- clocks


class Clock(Protocol):
    def __call__(self) -> float: ...

    def advance(self, seconds: float) -> None: ...


class FakeClock:
    """A controllable clock, handed to stores that accept ``clock=``; ``advance`` moves it forward."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RealClock:
    """For stores that keep their own clock: advancing means waiting for the store's time to pass."""

    def __call__(self) -> float:
        return time.time()

    def advance(self, seconds: float) -> None:
        time.sleep(seconds)  # waiting for a lease to lapse, not synchronising threads


# ---------------------------------------------------------------------------------------------------- stores

StoreFactory = Callable[[Path, Callable[[], float]], Store]


@dataclass(frozen=True)
class StoreCase:
    """How to open one kind of store for a test.

    ``make(tmp_path, clock)`` opens the store under test; ``peer(tmp_path, clock)``, when given, opens a second,
    independent client on the same state (another connection, another process's view) for the concurrency tests.
    ``fake_clock=False`` means the store ignores ``clock`` and uses its own time source.
    """

    make: StoreFactory
    peer: StoreFactory | None = None
    fake_clock: bool = True
    marks: tuple[Any, ...] = field(default_factory=tuple)


def _sqlite(tmp_path: Path, clock: Callable[[], float]) -> Store:
    return SQLiteStore(str(tmp_path / "sa.db"), timeout=30.0, clock=clock)


# Redis: the machine's shared Redis, and the private Cluster and Sentinel of tests/redis_support.py. Each test gets a
# fresh key prefix, bootstrapped as a brand-new store, and deleted when the store closes. The Redis store uses the
# server's TIME; here it takes the test's FakeClock instead (its ``clock`` test hook), so the clock tests do not
# wait in real time: SA_REDIS_REAL_CLOCK=1 runs them on the server's TIME with a RealClock (about a minute more per
# case). tests/stores/test_redis.py checks TIME-based expiry on its own. Under CI=true these cases never skip.
_REDIS_REAL_CLOCK = os.environ.get("SA_REDIS_REAL_CLOCK", "").strip().lower() not in ("", "0", "false", "no")
_redis_uris: dict[tuple[str, Path], str] = {}


def _redis(kind: str, *, first: bool) -> StoreFactory:
    def make(tmp_path: Path, clock: Callable[[], float]) -> Store:
        import redis_support

        from sa_middleware.stores.redis import RedisStore

        if (kind, tmp_path) not in _redis_uris:
            _redis_uris[(kind, tmp_path)] = redis_support.store_uri(kind, tmp_path)
        uri = _redis_uris[(kind, tmp_path)]
        store = RedisStore.from_uri(uri, timeout=10.0, clock=None if _REDIS_REAL_CLOCK else clock)
        if first:  # the store under test cleans up after the test; peers only close
            close = store.close

            def close_and_forget() -> None:
                try:
                    close()
                finally:
                    redis_support.forget_prefix(_redis_uris.pop((kind, tmp_path), uri))
            store.close = close_and_forget  # type: ignore[method-assign]
        return store
    return make


def _redis_case(kind: str) -> StoreCase:
    return StoreCase(make=_redis(kind, first=True), peer=_redis(kind, first=False), fake_clock=not _REDIS_REAL_CLOCK)


STORE_CASES: dict[str, StoreCase] = {
    "memory": StoreCase(make=lambda tmp_path, clock: MemoryStore(clock=clock)),
    "sqlite": StoreCase(make=_sqlite, peer=_sqlite),
    "redis": _redis_case("redis"),
    "redis-cluster": _redis_case("cluster"),
    "redis-sentinel": _redis_case("sentinel"),
}


@pytest.fixture(params=[pytest.param(name, marks=case.marks) for name, case in STORE_CASES.items()])
def case(request: pytest.FixtureRequest) -> StoreCase:
    return STORE_CASES[request.param]


@pytest.fixture
def clock(case: StoreCase) -> Clock:
    return FakeClock() if case.fake_clock else RealClock()


@pytest.fixture
def store(case: StoreCase, clock: Clock, tmp_path: Path) -> Iterator[Store]:
    s = case.make(tmp_path, clock)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ---------------------------------------------------------------------------------------------------- helpers


def make_admission(clock: Callable[[], float], **overrides: Any) -> Admission:
    """An Admission with a default for every field. ``sub`` defaults to ``alice``, ``session_id`` to
    ``"<sub>-1"``, ``token_hash`` to one per session; tokens were issued a minute ago and expire in an hour."""
    now = clock()
    sub = overrides.get("sub", "alice")
    session_id = overrides.get("session_id", f"{sub}-1")
    values: dict[str, Any] = {
        "ticket_id": uuid.uuid4().hex,
        "sub": sub,
        "kind": "human",
        "session_id": session_id,
        "token_hash": f"hash:{session_id}",
        "token_exp": now + 3600,
        "token_iat": now - 60,
        "token_gen": None,
        "jti": None,
        "actor": None,
        "credential": None,
        "device": None,
        "client": "10.0.0.1|pytest",
        "user_agent": "pytest",
        "route": "POST /things",
    }
    values.update(overrides)
    return admission_of(**values)


class Driver:
    """Builds admissions against one store and checks their outcome."""

    def __init__(self, store: Store, clock: Clock) -> None:
        self.store = store
        self.clock = clock

    def admission(self, **overrides: Any) -> Admission:
        return make_admission(self.clock, **overrides)

    def admit(self, **overrides: Any) -> Ticket | Denial:
        return self.store.admit(self.admission(**overrides))

    def ok(self, **overrides: Any) -> Ticket:
        result = self.admit(**overrides)
        assert isinstance(result, Ticket), f"expected a ticket, got {result!r}"
        return result

    def passes(self, **overrides: Any) -> Ticket:
        """Admit and release at once (the request ran and finished)."""
        ticket = self.ok(**overrides)
        self.store.release(ticket)
        return ticket

    def deny(self, code: str, **overrides: Any) -> Denial:
        result = self.admit(**overrides)
        assert isinstance(result, Denial), f"expected {code}, got a ticket {result!r}"
        assert result.code == code, f"expected {code}, got {result.code}: {result.detail}"
        return result

    def status(self, sub: str, session_id: str, idle: float = 900.0) -> str | None:
        return next((s.status for s in self.store.sessions(sub, idle) if s.session_id == session_id), None)


@pytest.fixture
def d(store: Store, clock: Clock) -> Driver:
    return Driver(store, clock)


def later(clock: Clock) -> float:
    """A timestamp strictly after everything the store did so far (for "issued after" tokens)."""
    clock.advance(0.05)
    return clock()


X = (LockRequest("obj:1"),)
S = (LockRequest("obj:1", "shared"),)


# ---------------------------------------------------------------------------------------------------- basics


def test_admit_returns_ticket_and_release_frees_it(d: Driver) -> None:
    ticket = d.ok(max_in_flight=1, locks=X)
    assert ticket.sub == "alice"
    assert ticket.session_id == "alice-1"
    assert set(ticket.fencing_tokens) == {"obj:1"}
    assert ticket.expires > d.clock()
    d.deny("too_many_in_flight", max_in_flight=1)
    d.deny("object_locked", sub="bob", locks=X)
    d.store.release(ticket)
    d.passes(max_in_flight=1)
    d.passes(sub="bob", locks=X)
    assert d.store.locks() == []


def test_release_of_unknown_ticket_is_harmless(d: Driver) -> None:
    held = d.ok(locks=X, max_in_flight=1)
    # an unknown ticket naming the same principal, session and lock frees nothing of the ticket that holds them
    d.store.release(Ticket("no-such-ticket", held.sub, held.session_id, dict(held.fencing_tokens), held.expires))
    d.deny("object_locked", sub="bob", locks=X)
    d.deny("too_many_in_flight", max_in_flight=1)
    d.store.release(held)
    d.passes(sub="bob", locks=X)


# ---------------------------------------------------------------------------------------------------- generation


def test_stale_generation_token_below_store_generation(d: Driver) -> None:
    assert d.store.rotate("alice") == 1
    d.deny("stale_generation", token_gen=0)
    d.passes(token_gen=1)
    assert d.store.rotate("alice") == 2
    d.deny("stale_generation", token_gen=1)
    d.passes(sub="bob", token_gen=0)  # per principal


def test_genless_token_is_stale_after_a_rotation(d: Driver) -> None:
    d.passes(token_gen=None)
    d.store.rotate("alice")
    d.deny("stale_generation", token_gen=None)


def test_genless_token_after_a_rotation_is_told_a_new_token_cannot_help(d: Driver) -> None:
    d.store.rotate("alice")
    denial = d.deny("stale_generation", token_gen=None)
    assert "no generation claim" in denial.detail and "obtain a new token" not in denial.detail
    assert "obtain a new token" in d.deny("stale_generation", session_id="alice-2", token_gen=0).detail


def test_reset_generation_undoes_rotations(d: Driver) -> None:
    assert d.store.reset_generation("nobody") == 0
    d.store.rotate("alice")
    d.store.rotate("alice")
    d.deny("stale_generation", token_gen=None)
    assert d.store.reset_generation("alice") == 2
    d.passes(token_gen=None)
    assert d.store.rotate("alice") == 1


def test_generation_claim_notes_per_principal(d: Driver) -> None:
    assert d.store.generation_claim("alice") is None
    d.store.note_generation_claims({("", "alice"): False, ("", "bob"): True})
    assert (d.store.generation_claim("alice"), d.store.generation_claim("bob")) == (False, True)
    d.store.note_generation_claims({("", "alice"): True})
    assert d.store.generation_claim("alice") is True
    d.passes(token_gen=None)  # a note is not principal state that refuses anything
    d.store.note_generation_claims({("", "carol"): False})
    d.passes(sub="carol", token_gen=None)


def test_generation_claim_notes_and_reset_are_per_issuer(d: Driver) -> None:
    d.store.note_generation_claims({("https://a", "erin"): False, ("https://b", "erin"): True})
    assert d.store.generation_claim("erin", "https://a") is False
    assert d.store.generation_claim("erin", "https://b") is True
    assert d.store.generation_claim("erin") is None
    d.store.rotate("erin", "https://a")
    d.store.rotate("erin", "https://b")
    assert d.store.reset_generation("erin", "https://a") == 1
    assert d.store.rotate("erin", "https://a") == 1 and d.store.rotate("erin", "https://b") == 2


def test_key_notes_count_refreshes_and_keep_dropped_key_ids(d: Driver) -> None:
    assert d.store.key_notes() == (0, ())
    assert d.store.note_keys(None) == 1
    assert d.store.note_keys("kid-b") == 2
    assert d.store.note_keys("kid-a") == 3
    assert d.store.note_keys("kid-a") == 4
    assert d.store.key_notes() == (4, ("kid-a", "kid-b"))


@pytest.mark.anyio
async def test_key_and_generation_notes_async_twins(store: Store) -> None:
    assert await store.anote_keys("k") == 1
    assert await store.akey_notes() == (1, ("k",))
    await store.anote_generation_claims({("", "dave"): False})
    assert await store.ageneration_claim("dave") is False
    await store.arotate("dave")
    assert await store.areset_generation("dave") == 1


def test_higher_generation_ratchets_the_store_forward(d: Driver) -> None:
    d.passes(token_gen=0)
    d.passes(session_id="alice-2", token_gen=3)
    d.deny("stale_generation", token_gen=2)
    d.deny("stale_generation", token_gen=0)
    d.passes(token_gen=3)
    assert d.store.rotate("alice") == 4


def test_ratchet_applies_even_when_the_request_is_refused(d: Driver) -> None:
    d.store.revoke_session("alice-1")
    d.deny("session_revoked", session_id="alice-1", token_gen=5)
    d.deny("stale_generation", session_id="alice-2", token_gen=4)
    d.passes(session_id="alice-2", token_gen=5)


def test_ratchet_applies_when_refused_for_scope(d: Driver) -> None:
    d.deny("insufficient_scope", token_gen=2, scopes=frozenset({"admin"}))
    d.deny("stale_generation", token_gen=1)


# ---------------------------------------------------------------------------------------------------- watermark


def test_token_revoked_before_watermark(d: Driver) -> None:
    d.passes(token_iat=d.clock() - 60)
    d.passes(token_iat=None)  # no watermark yet: tokens without iat are fine
    watermark = d.store.revoke_principal("alice")
    d.deny("token_revoked", token_iat=watermark - 60)
    d.deny("token_revoked", token_iat=watermark - 0.5)
    d.deny("token_revoked", token_iat=None)
    d.passes(token_iat=watermark)  # iat must be >= the watermark
    d.passes(token_iat=later(d.clock))
    d.passes(sub="bob", token_iat=watermark - 60)  # per principal


def test_revoke_principal_watermark_never_moves_back(d: Driver) -> None:
    first = d.store.revoke_principal("alice")
    d.clock.advance(0.05)
    second = d.store.revoke_principal("alice")
    assert second >= first
    d.deny("token_revoked", token_iat=second - 0.01)


# ---------------------------------------------------------------------------------------------------- session status


def test_session_revoked(d: Driver) -> None:
    d.passes()
    assert d.store.revoke_session("alice-1") is True
    d.deny("session_revoked")
    d.deny("session_revoked", token_iat=later(d.clock))  # a fresh token does not revive it
    d.passes(session_id="alice-2")
    assert d.status("alice", "alice-1") == "revoked"


def test_session_revoked_before_it_was_ever_seen(d: Driver) -> None:
    assert d.store.revoke_session("ghost") is False
    d.deny("session_revoked", session_id="ghost")
    d.deny("session_revoked", sub="bob", session_id="ghost")


def test_revoked_session_stays_revoked_after_its_token_expires(d: Driver) -> None:
    # needs_clock. A revoked session must not come back when a refreshed token carries the same sid: the
    # revocation has to outlive the token that was current when it was revoked (a never-seen session's
    # revocation is remembered for a day).
    d.passes(token_exp=d.clock() + 2)
    d.store.revoke_session("alice-1")
    d.clock.advance(15)  # the old token expired, and stores prune periodically
    d.passes(session_id="alice-other")  # any admission (gives stores a chance to prune)
    d.deny("session_revoked", token_iat=d.clock(), token_exp=d.clock() + 3600)


def test_paused_session_stays_paused_after_its_token_expires(d: Driver) -> None:
    # needs_clock. Only an operator resumes a paused session: a refreshed token with the same sid, presented after
    # the old one expired and the store pruned, must still be refused.
    d.passes(token_exp=d.clock() + 2)
    d.store.pause_session("alice-1")
    d.clock.advance(15)
    d.passes(session_id="alice-other")  # any admission (gives stores a chance to prune)
    d.deny("session_paused", token_iat=d.clock(), token_exp=d.clock() + 3600)
    assert d.store.resume_session("alice-1") is True
    d.passes(token_iat=d.clock(), token_exp=d.clock() + 3600)


def test_session_id_of_another_principal_is_refused(d: Driver) -> None:
    d.passes(session_id="shared-sid")
    d.deny("invalid_token", sub="bob", session_id="shared-sid")
    assert d.status("alice", "shared-sid") == "active"
    assert d.store.sessions("bob", 900) == []
    d.passes(session_id="shared-sid")


def test_session_paused_and_resumed(d: Driver) -> None:
    d.passes()
    assert d.store.pause_session("alice-1") is True
    d.deny("session_paused")
    d.deny("session_paused", token_iat=later(d.clock))
    d.passes(session_id="alice-2")
    assert d.status("alice", "alice-1") == "paused"
    assert d.store.resume_session("alice-1") is True
    d.passes()
    assert d.status("alice", "alice-1") == "active"
    assert d.store.resume_session("alice-1") is False  # nothing to clear


def test_pause_unknown_session(d: Driver) -> None:
    assert d.store.pause_session("nobody") is False
    d.passes(session_id="nobody")


def test_revoked_session_cannot_be_paused_or_resumed(d: Driver) -> None:
    d.passes()
    d.store.revoke_session("alice-1")
    assert d.store.pause_session("alice-1") is False
    assert d.store.resume_session("alice-1") is False
    d.deny("session_revoked")


# ---------------------------------------------------------------------------------------------------- compromise


def test_compromise_by_sub_hits_every_session_of_the_principal(d: Driver) -> None:
    d.passes(session_id="alice-1")
    d.passes(session_id="alice-2")
    d.passes(sub="bob")
    hit = d.store.report_compromise("alice", None)
    assert set(hit) == {"alice-1", "alice-2"}
    d.deny("credential_compromised", session_id="alice-1")
    d.deny("credential_compromised", session_id="alice-2")
    assert d.status("alice", "alice-1") == "compromised"
    d.passes(sub="bob")


def test_compromise_by_session_hits_the_principals_other_sessions(d: Driver) -> None:
    d.passes(session_id="alice-1")
    d.passes(session_id="alice-2")
    d.passes(sub="bob")
    hit = d.store.report_compromise(None, "alice-1")
    assert set(hit) == {"alice-1", "alice-2"}
    d.deny("credential_compromised", session_id="alice-1")
    d.deny("credential_compromised", session_id="alice-2")
    d.passes(sub="bob")


def test_compromise_of_an_actor_hits_delegated_contexts_only(d: Driver) -> None:
    d.passes(sub="bob", session_id="bob-delegated", actor="agent-7")
    d.passes(sub="bob", session_id="bob-own")
    d.passes(sub="agent-7", session_id="agent-own", kind="agent")
    hit = d.store.report_compromise("agent-7", None)
    assert set(hit) == {"bob-delegated", "agent-own"}
    d.deny("credential_compromised", sub="bob", session_id="bob-delegated", actor="agent-7")
    d.deny("credential_compromised", sub="agent-7", session_id="agent-own", kind="agent")
    # one step, not transitive: the user who delegated keeps their own sessions, old and new
    d.passes(sub="bob", session_id="bob-own")
    d.passes(sub="bob", session_id="bob-new")
    assert d.status("bob", "bob-own") == "active"
    # a new delegated context with a token issued before the report is refused (actor marker)
    d.deny("credential_compromised", sub="bob", session_id="bob-delegated-2", actor="agent-7")
    d.passes(sub="bob", session_id="bob-delegated-3", actor="agent-7", token_iat=later(d.clock))


def test_compromise_reaches_contexts_sharing_the_credential(d: Driver) -> None:
    d.passes(session_id="alice-1", credential="jkt-1")
    d.passes(sub="carol", session_id="carol-1", credential="jkt-1")
    d.passes(sub="carol", session_id="carol-2", credential="jkt-2")
    hit = d.store.report_compromise("alice", None)
    assert set(hit) == {"alice-1", "carol-1"}
    d.deny("credential_compromised", sub="carol", session_id="carol-1", credential="jkt-1")
    d.passes(sub="carol", session_id="carol-2", credential="jkt-2")
    # a new context on the exposed credential with an old token is refused; a fresh token is fine
    d.deny("credential_compromised", sub="dave", session_id="dave-1", credential="jkt-1")
    d.passes(sub="dave", session_id="dave-2", credential="jkt-1", token_iat=later(d.clock))


def test_compromise_reaches_contexts_sharing_the_device(d: Driver) -> None:
    d.passes(session_id="alice-1", device="laptop-1")
    d.passes(sub="carol", session_id="carol-1", device="laptop-1")
    d.passes(sub="carol", session_id="carol-2", device="phone-2")
    hit = d.store.report_compromise(None, "alice-1")
    assert set(hit) == {"alice-1", "carol-1"}
    d.deny("credential_compromised", sub="carol", session_id="carol-1", device="laptop-1")
    d.passes(sub="carol", session_id="carol-2", device="phone-2")
    d.deny("credential_compromised", sub="dave", session_id="dave-1", device="laptop-1")
    d.passes(sub="dave", session_id="dave-2", device="laptop-1", token_iat=later(d.clock))


def test_compromise_by_session_only_reaches_that_sessions_credential_and_device(d: Driver) -> None:
    d.passes(session_id="alice-1", device="laptop-1")
    d.passes(session_id="alice-2", device="phone-2")
    d.passes(sub="carol", session_id="carol-1", device="laptop-1")
    d.passes(sub="carol", session_id="carol-2", device="phone-2")
    hit = d.store.report_compromise(None, "alice-1")
    assert set(hit) == {"alice-1", "alice-2", "carol-1"}
    d.passes(sub="carol", session_id="carol-2", device="phone-2")


def test_compromise_refuses_new_sessions_with_old_tokens(d: Driver) -> None:
    assert d.store.report_compromise("alice", None) == []  # no context yet: the marker still applies
    d.deny("credential_compromised", session_id="alice-new")
    d.deny("credential_compromised", session_id="alice-new-2", token_iat=None)
    d.passes(session_id="alice-fresh", token_iat=later(d.clock))


def test_compromise_re_established_by_a_newer_generation(d: Driver) -> None:
    d.passes(token_gen=0)
    d.store.report_compromise("alice", None)
    d.deny("credential_compromised", token_gen=0)
    d.passes(token_gen=1)  # same session, older iat, newer generation
    assert d.status("alice", "alice-1") == "active"
    d.passes(token_gen=1)
    d.deny("stale_generation", token_gen=0)
    d.passes(session_id="alice-2", token_gen=1)  # new sessions too


def test_compromise_of_a_generation_token_needs_a_newer_generation(d: Driver) -> None:
    # a token that carries a generation is re-established only by a higher generation, never by a later iat:
    # whoever holds the leaked credential could mint a fresh token of the same generation
    d.passes(token_gen=3)
    d.store.report_compromise("alice", None)
    d.deny("credential_compromised", token_gen=3, token_iat=later(d.clock))
    d.deny("credential_compromised", session_id="alice-2", token_gen=3, token_iat=later(d.clock))
    d.passes(token_gen=4)


def test_compromise_re_established_by_a_token_issued_after_the_report(d: Driver) -> None:
    d.passes()
    d.store.report_compromise("alice", None)
    d.deny("credential_compromised")
    iat = later(d.clock)
    d.passes(token_iat=iat)
    assert d.status("alice", "alice-1") == "active"
    d.passes(session_id="alice-2", token_iat=iat)
    d.deny("credential_compromised", session_id="alice-3")  # old tokens stay refused


def test_resume_session_clears_a_compromised_session(d: Driver) -> None:
    d.passes(session_id="alice-1")
    d.passes(session_id="alice-2")
    d.store.report_compromise("alice", None)
    d.deny("credential_compromised", session_id="alice-1")
    assert d.store.resume_session("alice-1") is True
    assert d.status("alice", "alice-1") == "active"
    d.passes(session_id="alice-1")  # the operator's decision: the old token works again in this context
    d.deny("credential_compromised", session_id="alice-2")  # only the cleared one
    d.deny("credential_compromised", session_id="alice-3")


def test_a_later_compromise_hits_a_cleared_session_again(d: Driver) -> None:
    d.passes()
    d.store.report_compromise("alice", None)
    d.store.resume_session("alice-1")
    d.passes()
    d.clock.advance(0.05)
    d.store.report_compromise("alice", None)
    d.deny("credential_compromised")


def test_refused_request_does_not_clear_a_compromised_session(d: Driver) -> None:
    # bob's delegated context is compromised through the agent; a newer generation of bob's token passes the
    # session's own check, but the agent's marker still refuses it: the context must stay "compromised".
    d.store.rotate("bob")
    d.passes(sub="bob", session_id="bob-d", actor="agent-7", token_gen=1)
    assert d.store.report_compromise("agent-7", None) == ["bob-d"]
    d.deny("credential_compromised", sub="bob", session_id="bob-d", actor="agent-7", token_gen=2)
    assert d.status("bob", "bob-d") == "compromised"


def test_compromise_does_not_touch_revoked_sessions(d: Driver) -> None:
    d.passes(session_id="alice-1")
    d.store.revoke_session("alice-1")
    assert "alice-1" not in d.store.report_compromise("alice", None)
    d.deny("session_revoked", session_id="alice-1")


def _compromise_at(d: Driver, at: float, sub: str, **context: Any) -> float:
    """Report ``sub`` compromised at ``at`` (a fake clock is moved there; a real one reports now) after one request
    of ``sub`` with ``context``; returns the marker time the store recorded."""
    if isinstance(d.clock, FakeClock):
        d.clock.now = at
    d.passes(sub=sub, session_id=f"{sub}-1", **context)
    d.store.report_compromise(sub, None)
    marked = next(s.marked_at for s in d.store.sessions(sub, 900.0) if s.session_id == f"{sub}-1")
    assert marked is not None
    d.clock.advance(1.0 if isinstance(d.clock, FakeClock) else 0.05)
    return marked


@pytest.mark.parametrize("fact", ["device", "credential", "actor"])
def test_compromise_marker_of_a_device_credential_or_actor_keeps_sub_millisecond_precision(
        d: Driver, fact: str) -> None:
    # the markers of a device, a credential or an actor are compared with the token's iat at full precision: a
    # token issued 20 µs before the marker is refused, one issued 40 µs after it (an integer iat) is admitted
    def context(n: int) -> dict[str, Any]:
        return {"actor": f"agent-{n}"} if fact == "actor" else {fact: f"{fact}-{n}"}

    def owner(n: int) -> tuple[str, dict[str, Any]]:
        return (f"agent-{n}", {"kind": "agent"}) if fact == "actor" else (f"alice{n}", context(n))

    sub, ctx = owner(1)
    marked = _compromise_at(d, 1_712_345_678.00004, sub, **ctx)
    d.deny("credential_compromised", sub="bob", session_id="bob-1", token_iat=marked - 20e-6, **context(1))
    sub, ctx = owner(2)
    marked = _compromise_at(d, 1_712_345_690.99996, sub, **ctx)
    after = 1_712_345_691.0 if isinstance(d.clock, FakeClock) else marked + 40e-6
    assert after > marked
    d.passes(sub="carol", session_id="carol-1", token_iat=after, **context(2))


# ---------------------------------------------------------------------------------------------------- reuse, replay


def test_token_reuse_from_another_client(d: Driver) -> None:
    held = d.ok(token_hash="T", client="10.0.0.1|ua")
    d.deny("token_reuse", token_hash="T", client="10.9.9.9|other")
    second = d.ok(token_hash="T", client="10.0.0.1|ua")  # same client, concurrent: fine
    d.passes(session_id="alice-2", token_hash="U", client="10.9.9.9|other")  # another token: fine
    d.store.release(held)
    d.deny("token_reuse", token_hash="T", client="10.9.9.9|other")  # still one in flight
    d.store.release(second)
    d.passes(token_hash="T", client="10.9.9.9|other")  # nothing in flight: a client may move


def test_token_replayed(d: Driver) -> None:
    d.passes(one_time=True, jti="j-1")
    d.deny("token_replayed", one_time=True, jti="j-1")
    d.deny("token_replayed", one_time=True, jti="j-1", session_id="alice-2")
    d.passes(one_time=True, jti="j-2", session_id="alice-2")
    d.passes(one_time=False, jti="j-1")  # only one_time routes check it


def test_refused_one_time_admission_does_not_burn_the_jti(d: Driver) -> None:
    d.deny("insufficient_scope", one_time=True, jti="j-1", scopes=frozenset({"pay"}))
    held = d.ok(session_id="alice-2")
    d.deny("too_many_in_flight", one_time=True, jti="j-1", max_in_flight=1)
    d.store.release(held)
    d.passes(one_time=True, jti="j-1", scopes=frozenset({"pay"}), token_scopes=frozenset({"pay"}))
    d.deny("token_replayed", one_time=True, jti="j-1")


# ---------------------------------------------------------------------------------------------------- scopes, step-up


def test_insufficient_scope(d: Driver) -> None:
    need = frozenset({"a", "b"})
    d.deny("insufficient_scope", scopes=need, token_scopes=frozenset({"a"}))
    d.deny("insufficient_scope", scopes=need)
    d.passes(scopes=need, token_scopes=frozenset({"a", "b", "c"}))
    d.passes(token_scopes=frozenset())  # no requirement


def test_set_privileges_withdraws_scopes_from_older_tokens(d: Driver) -> None:
    granted = frozenset({"read", "write"})
    d.passes(scopes=frozenset({"write"}), token_scopes=granted)
    d.store.set_privileges("alice", ["read"])
    d.deny("insufficient_scope", scopes=frozenset({"write"}), token_scopes=granted)
    d.passes(scopes=frozenset({"read"}), token_scopes=granted)
    # a token issued after the change carries what the IdP granted then
    d.passes(session_id="alice-2", scopes=frozenset({"write"}), token_scopes=granted, token_iat=later(d.clock))
    d.passes(sub="bob", scopes=frozenset({"write"}), token_scopes=granted)  # per principal
    d.store.set_privileges("alice", None)  # lift the limit
    d.passes(scopes=frozenset({"write"}), token_scopes=granted)


def test_set_privileges_limits_tokens_without_iat(d: Driver) -> None:
    d.store.set_privileges("alice", ["read"])
    d.deny("insufficient_scope", scopes=frozenset({"write"}), token_scopes=frozenset({"write"}), token_iat=None)


def test_step_up_max_auth_age(d: Driver) -> None:
    now = d.clock()
    d.deny("step_up_required", max_auth_age=300, auth_time=now - 600)
    d.deny("step_up_required", max_auth_age=300, auth_time=None)
    d.passes(max_auth_age=300, auth_time=now - 10)
    d.passes(auth_time=now - 10_000)  # no requirement


def test_step_up_acr_values(d: Driver) -> None:
    mfa = ("urn:example:mfa", "urn:example:hwk")
    d.deny("step_up_required", acr_values=mfa, acr="urn:example:pwd")
    d.deny("step_up_required", acr_values=mfa, acr=None)
    d.passes(acr_values=mfa, acr="urn:example:hwk")
    d.passes(acr="urn:example:pwd")


# ---------------------------------------------------------------------------------------------------- device


def test_device_noncompliant(d: Driver) -> None:
    d.deny("device_noncompliant", require_compliant_device=True, device=None)
    d.passes(require_compliant_device=True, device="laptop-1")  # unknown posture is not non-compliant
    d.store.set_device_status("laptop-1", False)
    d.deny("device_noncompliant", require_compliant_device=True, device="laptop-1")
    d.passes(require_compliant_device=False, device="laptop-1")  # only where the policy asks
    d.passes(session_id="alice-2", require_compliant_device=True, device="laptop-2")
    d.store.set_device_status("laptop-1", True)
    d.passes(require_compliant_device=True, device="laptop-1")


# ---------------------------------------------------------------------------------------------------- sessions


def test_too_many_sessions_reject(d: Driver) -> None:
    d.passes(session_id="alice-1", max_sessions=2)
    d.passes(session_id="alice-2", max_sessions=2)
    d.deny("too_many_sessions", session_id="alice-3", max_sessions=2)
    d.passes(session_id="alice-1", max_sessions=2)  # re-entering is not a new session
    d.passes(session_id="alice-2", max_sessions=2)
    d.passes(sub="bob", max_sessions=1)  # per principal
    d.passes(session_id="alice-3")  # no limit on this route: now there are three
    d.passes(session_id="alice-1", max_sessions=2)  # known active sessions are never refused as "new"
    d.deny("too_many_sessions", session_id="alice-4", max_sessions=2)


def test_too_many_sessions_counts_held_and_finished_requests_alike(d: Driver) -> None:
    held = d.ok(session_id="alice-1", max_sessions=1)
    d.deny("too_many_sessions", session_id="alice-2", max_sessions=1)
    d.store.release(held)
    d.deny("too_many_sessions", session_id="alice-2", max_sessions=1)


def test_revoked_sessions_do_not_count(d: Driver) -> None:
    d.passes(session_id="alice-1", max_sessions=1)
    d.store.revoke_session("alice-1")
    d.passes(session_id="alice-2", max_sessions=1)


def test_idle_sessions_do_not_count(d: Driver) -> None:
    # needs_clock
    d.passes(session_id="alice-1", max_sessions=1, session_idle=1.0)
    d.deny("too_many_sessions", session_id="alice-2", max_sessions=1, session_idle=1.0)
    d.clock.advance(1.5)
    d.passes(session_id="alice-2", max_sessions=1, session_idle=1.0)


def test_sessions_with_expired_tokens_do_not_count(d: Driver) -> None:
    # needs_clock
    d.passes(session_id="alice-1", max_sessions=1, token_exp=d.clock() + 1)
    d.clock.advance(1.5)
    d.passes(session_id="alice-2", max_sessions=1)


def test_evict_oldest(d: Driver) -> None:
    limit: dict[str, Any] = {"max_sessions": 2, "on_session_limit": "evict_oldest"}
    d.passes(session_id="alice-z-oldest", **limit)
    d.clock.advance(0.05)
    d.passes(session_id="alice-b", **limit)
    d.clock.advance(0.05)
    d.passes(session_id="alice-a-newest", **limit)
    d.deny("session_revoked", session_id="alice-z-oldest", **limit)
    assert d.status("alice", "alice-z-oldest") == "revoked"
    d.passes(session_id="alice-b", **limit)
    d.passes(session_id="alice-a-newest", **limit)


def test_evict_oldest_evicts_as_many_as_needed(d: Driver) -> None:
    for i in range(3):
        d.passes(session_id=f"alice-{i}")
        d.clock.advance(0.05)
    d.passes(session_id="alice-new", max_sessions=2, on_session_limit="evict_oldest")
    statuses = {s.session_id: s.status for s in d.store.sessions("alice", 900)}
    assert statuses == {"alice-0": "revoked", "alice-1": "revoked", "alice-2": "active", "alice-new": "active"}


def test_a_session_opened_through_another_route_is_still_limited(d: Driver) -> None:
    d.passes(session_id="alice-1", max_sessions=1)
    d.deny("too_many_sessions", session_id="alice-2", max_sessions=1)
    d.passes(session_id="alice-2")  # a route without the limit makes it active...
    d.deny("too_many_sessions", session_id="alice-2", max_sessions=1)  # ...it is still not among the oldest one
    d.passes(session_id="alice-1", max_sessions=1)
    d.passes(session_id="alice-2", max_sessions=2)


def test_the_limit_keeps_the_oldest_active_sessions(d: Driver) -> None:
    for i in range(3):
        d.passes(session_id=f"alice-{i}")
        d.clock.advance(0.05)
    d.passes(session_id="alice-0", max_sessions=2)
    d.passes(session_id="alice-1", max_sessions=2)
    d.deny("too_many_sessions", session_id="alice-2", max_sessions=2)
    d.store.revoke_session("alice-0")
    d.passes(session_id="alice-2", max_sessions=2)
    d.deny("too_many_sessions", session_id="alice-3", max_sessions=2)  # a new session counts as the newest


def test_paused_and_compromised_sessions_count_toward_the_limit(d: Driver) -> None:
    d.passes(session_id="alice-1")
    d.store.pause_session("alice-1")
    d.deny("too_many_sessions", session_id="alice-2", max_sessions=1)
    d.passes(sub="bob", session_id="bob-1")
    d.store.report_compromise(None, "bob-1")
    d.deny("too_many_sessions", sub="bob", session_id="bob-2", max_sessions=1, token_iat=later(d.clock))
    d.store.revoke_session("alice-1")
    d.passes(session_id="alice-2", max_sessions=1)


def test_an_idle_session_leaves_its_place_and_comes_back_as_the_newest(d: Driver) -> None:
    # needs_clock
    idle: dict[str, Any] = {"session_idle": 1.0}
    d.passes(session_id="alice-1", **idle)
    d.clock.advance(0.6)
    d.passes(session_id="alice-2", **idle)  # opened through a route without the limit
    d.deny("too_many_sessions", session_id="alice-2", max_sessions=1, **idle)
    d.clock.advance(0.6)  # alice-1 is idle now
    d.passes(session_id="alice-2", max_sessions=1, **idle)
    d.deny("too_many_sessions", session_id="alice-1", max_sessions=1, **idle)


def test_evict_oldest_for_a_session_opened_through_another_route(d: Driver) -> None:
    for i in range(1, 4):
        d.passes(session_id=f"alice-{i}")
        d.clock.advance(0.05)
    evict: dict[str, Any] = {"max_sessions": 2, "on_session_limit": "evict_oldest"}
    d.passes(session_id="alice-2", **evict)
    expected = {"alice-1": "revoked", "alice-2": "active", "alice-3": "active"}
    assert {s.session_id: s.status for s in d.store.sessions("alice", 900)} == expected
    d.passes(session_id="alice-3", **evict)  # two active sessions: nothing more to evict
    assert {s.session_id: s.status for s in d.store.sessions("alice", 900)} == expected
    d.deny("session_revoked", session_id="alice-1")
    records = d.store.audit(code="session_evicted")
    assert [(r.session_id, r.detail) for r in records] == [("alice-1", "evicted by session alice-2 (max_sessions=2)")]


# ------------------------------------------------------------------------------------------ in flight, conflicts


def test_too_many_in_flight_across_sessions(d: Driver) -> None:
    t1 = d.ok(session_id="alice-1", max_in_flight=2)
    d.ok(session_id="alice-2", max_in_flight=2)
    denial = d.deny("too_many_in_flight", session_id="alice-3", max_in_flight=2)
    assert denial.retry_after is not None and denial.retry_after >= 1
    d.deny("too_many_in_flight", session_id="alice-1", max_in_flight=2)
    d.passes(sub="bob", max_in_flight=1)  # per principal
    d.store.release(t1)
    d.ok(session_id="alice-3", max_in_flight=2)
    d.deny("too_many_in_flight", session_id="alice-3", max_in_flight=2)


def test_in_flight_counts_requests_of_any_route(d: Driver) -> None:
    d.ok(route="GET /a")
    d.deny("too_many_in_flight", route="POST /b", max_in_flight=1)


def test_exclusive_request_refused_while_anything_in_flight(d: Driver) -> None:
    held = d.ok(session_id="alice-1")
    denial = d.deny("conflicting_action", session_id="alice-2", exclusive=True)
    assert denial.retry_after is not None
    d.passes(sub="bob", exclusive=True)  # other principals are unaffected
    d.store.release(held)
    d.passes(session_id="alice-2", exclusive=True)


def test_anything_refused_while_an_exclusive_action_is_in_flight(d: Driver) -> None:
    held = d.ok(session_id="alice-1", exclusive=True)
    d.deny("conflicting_action", session_id="alice-2")
    d.deny("conflicting_action", session_id="alice-1", tags=frozenset({"read"}))
    d.passes(sub="bob")
    d.store.release(held)
    d.passes(session_id="alice-2")


def test_conflicting_tags_both_directions(d: Driver) -> None:
    exporting = d.ok(tags=frozenset({"export"}))
    d.deny("conflicting_action", session_id="alice-2", conflicts=frozenset({"export"}))
    d.passes(session_id="alice-2", conflicts=frozenset({"import"}))
    d.passes(session_id="alice-2", tags=frozenset({"export"}))  # same tag without a conflict: fine
    d.passes(sub="bob", conflicts=frozenset({"export"}))
    d.store.release(exporting)
    d.passes(session_id="alice-2", conflicts=frozenset({"export"}))

    guarded = d.ok(conflicts=frozenset({"delete"}))
    d.deny("conflicting_action", session_id="alice-2", tags=frozenset({"delete", "x"}))
    d.passes(session_id="alice-2", tags=frozenset({"x"}))
    d.store.release(guarded)
    d.passes(session_id="alice-2", tags=frozenset({"delete"}))


# ---------------------------------------------------------------------------------------------------- risk


def test_risk_raised_then_expires(d: Driver) -> None:
    # needs_clock
    d.passes(max_risk=0)
    d.passes(raises_risk=2, risk_window=1.0)
    denial = d.deny("risk_too_high", max_risk=1)
    assert denial.retry_after is not None and denial.retry_after >= 1
    d.passes(max_risk=2)  # at the limit is fine
    d.passes(sub="bob", max_risk=0)  # per principal
    d.passes()  # no requirement
    d.clock.advance(1.5)
    d.passes(max_risk=0)


def test_risk_adds_up_and_expires_entry_by_entry(d: Driver) -> None:
    # needs_clock
    d.passes(raises_risk=1, risk_window=1.0)
    d.passes(raises_risk=1, risk_window=3.0)
    d.deny("risk_too_high", max_risk=1)
    d.clock.advance(1.5)
    d.passes(max_risk=1)
    d.deny("risk_too_high", max_risk=0)
    d.clock.advance(2.0)
    d.passes(max_risk=0)


def test_refused_request_does_not_raise_risk(d: Driver) -> None:
    d.deny("insufficient_scope", raises_risk=5, risk_window=60.0, scopes=frozenset({"x"}))
    d.passes(max_risk=0)


# ---------------------------------------------------------------------------------------------------- locks


def test_exclusive_locks_exclude_each_other_across_principals(d: Driver) -> None:
    held = d.ok(locks=X)
    denial = d.deny("object_locked", sub="bob", locks=X)
    assert denial.retry_after is not None and denial.retry_after >= 1
    d.deny("object_locked", session_id="alice-2", locks=X)  # the same principal too
    d.passes(sub="bob", locks=(LockRequest("obj:2"),))
    d.store.release(held)
    d.passes(sub="bob", locks=X)


def test_shared_locks_coexist(d: Driver) -> None:
    r1 = d.ok(locks=S)
    r2 = d.ok(sub="bob", locks=S)
    d.deny("object_locked", sub="carol", locks=X)
    d.store.release(r1)
    d.deny("object_locked", sub="carol", locks=X)
    d.store.release(r2)
    w = d.ok(sub="carol", locks=X)
    d.deny("object_locked", sub="bob", locks=S)
    d.store.release(w)
    d.passes(sub="bob", locks=S)


def test_a_request_with_several_locks_gets_all_or_none(d: Driver) -> None:
    held = d.ok(sub="bob", locks=(LockRequest("obj:2"),))
    d.deny("object_locked", locks=(LockRequest("obj:1"), LockRequest("obj:2")))
    assert [lock.key for lock in d.store.locks()] == ["obj:2"]
    d.passes(sub="carol", locks=X)  # obj:1 was not taken by the refused request
    d.store.release(held)
    ticket = d.ok(locks=(LockRequest("obj:1"), LockRequest("obj:2")))
    assert set(ticket.fencing_tokens) == {"obj:1", "obj:2"}


def test_the_same_key_twice_in_one_admission(d: Driver) -> None:
    # Two lock templates can render to the same key ("a:{x}" and "a:{y}" with x == y): the request must still be
    # decided (one lock, one fencing token), not fail in the store.
    ticket = d.ok(locks=(LockRequest("obj:1"), LockRequest("obj:1")))
    assert set(ticket.fencing_tokens) == {"obj:1"}
    assert [lock.key for lock in d.store.locks()] == ["obj:1"]
    d.deny("object_locked", sub="bob", locks=X)


def test_locks_lists_held_locks_with_fencing_tokens(d: Driver) -> None:
    assert d.store.locks() == []
    t1 = d.ok(locks=(LockRequest("obj:1"), LockRequest("doc:9", "shared")))
    t2 = d.ok(sub="bob", locks=(LockRequest("doc:9", "shared"),))
    locks = d.store.locks()
    seen = {(lock.key, lock.ticket_id): lock for lock in locks}
    assert set(seen) == {("obj:1", t1.ticket_id), ("doc:9", t1.ticket_id), ("doc:9", t2.ticket_id)}
    one = seen[("obj:1", t1.ticket_id)]
    assert (one.mode, one.sub, one.session_id, one.fencing_token) == ("exclusive", "alice", "alice-1",
                                                                      t1.fencing_tokens["obj:1"])
    assert one.expires > d.clock()
    assert seen[("doc:9", t2.ticket_id)].mode == "shared"
    assert seen[("doc:9", t2.ticket_id)].fencing_token == t2.fencing_tokens["doc:9"]
    d.store.release(t1)
    assert [(lock.key, lock.ticket_id) for lock in d.store.locks()] == [("doc:9", t2.ticket_id)]


def test_fencing_tokens_strictly_increase_per_key_and_survive_release(d: Driver) -> None:
    fences = []
    for sub in ("alice", "bob", "alice", "carol"):
        ticket = d.passes(sub=sub, locks=X)
        fences.append(ticket.fencing_tokens["obj:1"])
    r1 = d.ok(locks=S)
    r2 = d.ok(sub="bob", locks=S)
    fences += [r1.fencing_tokens["obj:1"], r2.fencing_tokens["obj:1"]]
    assert all(a < b for a, b in itertools.pairwise(fences)), fences
    other = d.passes(locks=(LockRequest("obj:2"),)).fencing_tokens["obj:2"]
    assert other >= 1


def test_fencing_tokens_survive_lock_expiry(d: Driver) -> None:
    # needs_clock
    first = d.ok(locks=X, lease=1.0).fencing_tokens["obj:1"]
    d.clock.advance(1.5)
    second = d.ok(sub="bob", locks=X).fencing_tokens["obj:1"]
    assert second > first


def test_on_lock_conflict_pause_non_human_requester_is_paused(d: Driver) -> None:
    d.ok(locks=X)  # a human edits the object
    denial = d.deny("session_paused", sub="bot", kind="agent", session_id="bot-1", locks=X,
                    on_lock_conflict="pause")
    assert denial.detail
    d.deny("session_paused", sub="bot", kind="agent", session_id="bot-1")  # paused for everything now
    assert d.status("bot", "bot-1") == "paused"
    d.passes(sub="bot", kind="agent", session_id="bot-2")  # only that context
    assert d.store.resume_session("bot-1") is True
    d.passes(sub="bot", kind="agent", session_id="bot-1")


def test_on_lock_conflict_pause_for_a_known_non_human_session(d: Driver) -> None:
    d.passes(sub="svc", kind="service", session_id="svc-1")
    d.ok(locks=X)
    d.deny("session_paused", sub="svc", kind="service", session_id="svc-1", locks=X, on_lock_conflict="pause")
    d.deny("session_paused", sub="svc", kind="service", session_id="svc-1")


def test_on_lock_conflict_pause_human_requester_pauses_the_non_human_holder(d: Driver) -> None:
    d.ok(sub="bot", kind="service", session_id="bot-1", locks=X)
    d.deny("object_locked", locks=X, on_lock_conflict="pause")
    assert d.status("bot", "bot-1") == "paused"
    d.deny("session_paused", sub="bot", kind="service", session_id="bot-1")
    d.passes()  # the human's own session is not paused


def test_on_lock_conflict_pause_does_not_revive_a_revoked_holder(d: Driver) -> None:
    # The holder's ticket outlives the revocation of its session; pausing it must not turn "revoked" into
    # "paused" (which resume_session would then turn into "active").
    d.ok(sub="bot", kind="service", session_id="bot-1", locks=X)
    d.store.revoke_session("bot-1")
    d.deny("object_locked", locks=X, on_lock_conflict="pause")
    d.deny("session_revoked", sub="bot", kind="service", session_id="bot-1")
    d.store.resume_session("bot-1")
    d.deny("session_revoked", sub="bot", kind="service", session_id="bot-1")


def test_on_lock_conflict_pause_does_not_clear_a_compromised_holder(d: Driver) -> None:
    d.ok(sub="bot", kind="service", session_id="bot-1", locks=X)
    d.store.report_compromise("bot", None)
    d.deny("object_locked", locks=X, on_lock_conflict="pause")
    d.deny("credential_compromised", sub="bot", kind="service", session_id="bot-1")
    assert d.status("bot", "bot-1") == "compromised"


def test_on_lock_conflict_pause_never_pauses_a_human_holder(d: Driver) -> None:
    d.ok(sub="bob", locks=X)
    d.deny("object_locked", locks=X, on_lock_conflict="pause")
    d.passes(sub="bob", session_id="bob-1")
    assert d.status("bob", "bob-1") == "active"


def test_on_lock_conflict_reject_pauses_nobody(d: Driver) -> None:
    d.ok(sub="bot", kind="agent", session_id="bot-1", locks=X)
    d.deny("object_locked", sub="svc", kind="service", session_id="svc-1", locks=X)
    d.passes(sub="svc", kind="service", session_id="svc-1")
    d.passes(sub="bot", kind="agent", session_id="bot-1")


# ---------------------------------------------------------------------------------------------------- leases


def test_expired_ticket_no_longer_counts(d: Driver) -> None:
    # needs_clock
    d.ok(locks=X, max_in_flight=1, exclusive=True, token_hash="T", client="c1", lease=1.0)
    d.deny("too_many_in_flight", session_id="alice-2", max_in_flight=1)
    d.deny("object_locked", sub="bob", locks=X)
    d.clock.advance(1.5)
    assert d.store.locks() == []
    d.passes(session_id="alice-2", max_in_flight=1)
    d.passes(session_id="alice-3", exclusive=True)
    d.passes(token_hash="T", client="c2")
    d.passes(sub="bob", locks=X)


def test_renew_extends_live_tickets(d: Driver) -> None:
    # needs_clock
    held = d.ok(locks=X, max_in_flight=1, lease=1.0)
    d.clock.advance(0.6)
    d.store.renew([held], 2.0)
    d.clock.advance(0.9)  # past the first lease, within the renewed one
    d.deny("object_locked", sub="bob", locks=X)
    d.deny("too_many_in_flight", session_id="alice-2", max_in_flight=1)
    assert [lock.ticket_id for lock in d.store.locks()] == [held.ticket_id]
    d.clock.advance(1.5)
    d.passes(sub="bob", locks=X)


def test_renew_does_not_resurrect_expired_tickets(d: Driver) -> None:
    # needs_clock
    held = d.ok(locks=X, max_in_flight=1, lease=1.0)
    d.clock.advance(1.5)
    d.store.renew([held], 30.0)
    assert d.store.locks() == []
    d.passes(sub="bob", locks=X)
    d.passes(session_id="alice-2", max_in_flight=1)


def test_renew_of_nothing_and_unknown_tickets(d: Driver) -> None:
    d.store.renew([], 30.0)
    d.store.renew([Ticket("no-such-ticket", "alice", "alice-1", {"obj:1": 1}, d.clock() + 30.0)], 30.0)
    d.passes()


def test_released_ticket_is_not_renewed(d: Driver) -> None:
    held = d.ok(locks=X)
    d.store.release(held)
    d.store.renew([held], 30.0)
    assert d.store.locks() == []
    d.passes(sub="bob", locks=X)


# ---------------------------------------------------------------------------------------------------- listings


def test_sessions_lists_status_client_user_agent_device(d: Driver) -> None:
    d.passes(session_id="alice-1", client="10.0.0.1|firefox", user_agent="firefox", device="laptop-1",
             kind="human")
    d.passes(session_id="alice-2", client="10.0.0.2|curl", user_agent="curl")
    d.passes(sub="bob")
    d.store.pause_session("alice-2")
    sessions = {s.session_id: s for s in d.store.sessions("alice", 900)}
    assert set(sessions) == {"alice-1", "alice-2"}
    one = sessions["alice-1"]
    assert (one.sub, one.kind, one.status, one.client, one.user_agent, one.device) == (
        "alice", "human", "active", "10.0.0.1|firefox", "firefox", "laptop-1")
    assert one.created <= one.last_seen <= d.clock()
    assert one.expires > d.clock()
    assert sessions["alice-2"].status == "paused"
    assert sessions["alice-2"].user_agent == "curl"
    assert d.store.sessions("nobody", 900) == []


def test_sessions_track_the_latest_request(d: Driver) -> None:
    d.passes(client="10.0.0.1|a", user_agent="a")
    d.clock.advance(0.05)
    d.passes(client="10.0.0.1|b", user_agent="b", token_hash="hash:alice-1", kind="human")
    (session,) = d.store.sessions("alice", 900)
    assert session.user_agent == "b"
    assert session.last_seen > session.created


def test_last_seen_lags_the_latest_admission_by_at_most_its_precision(d: Driver) -> None:
    # needs_clock
    start = d.clock()
    d.passes()
    d.clock.advance(0.4)
    d.passes()  # nothing changed: a store may leave the record as it is
    (session,) = d.store.sessions("alice", 900)
    assert start - 0.01 <= session.last_seen and d.clock() - session.last_seen < SEEN_PRECISION
    d.clock.advance(0.8)
    d.passes()  # the stored time is a second old or more: written
    (session,) = d.store.sessions("alice", 900)
    assert session.last_seen >= start + 1.19
    d.passes(user_agent="other")  # anything else changed: written at once
    (session,) = d.store.sessions("alice", 900)
    assert session.user_agent == "other" and session.last_seen >= start + 1.19


def test_last_seen_is_precise_to_a_hundredth_of_a_short_session_idle(d: Driver) -> None:
    # needs_clock
    start = d.clock()
    d.passes(session_idle=20.0)  # precision: 0.2 seconds
    d.clock.advance(0.3)
    d.passes(session_idle=20.0)
    (session,) = d.store.sessions("alice", 20.0)
    assert session.last_seen >= start + 0.29


def test_sessions_excludes_idle_ones(d: Driver) -> None:
    # needs_clock
    d.passes(session_id="alice-1")
    d.clock.advance(1.5)
    d.passes(session_id="alice-2")
    assert [s.session_id for s in d.store.sessions("alice", 1.0)] == ["alice-2"]
    assert sorted(s.session_id for s in d.store.sessions("alice", 900)) == ["alice-1", "alice-2"]


# ---------------------------------------------------------------------------------------------------- issuers

A, B = "https://idp-a.example", "https://idp-b.example"
#: an issuer with the characters the Redis keys escape
C = "https://idp-c.example/{tenant}|%7C"


def _statuses(d: Driver, sub: str, iss: str) -> dict[str, str]:
    return {s.session_id: s.status for s in d.store.sessions(sub, 900, iss)}


def test_principal_state_is_kept_per_issuer(d: Driver) -> None:
    d.passes(iss=A, session_id="a-1", token_gen=0)
    d.passes(iss=B, session_id="b-1", token_gen=1000)  # issuer B's alice, far ahead
    d.passes(iss=A, session_id="a-1", token_gen=0)  # issuer A's alice is not stale
    d.passes(session_id="n-1", token_gen=0)  # nor the alice of tokens without an issuer
    d.passes(iss=C, session_id="c-1", token_gen=0)
    assert d.store.rotate("alice", A) == 1
    d.deny("stale_generation", iss=A, session_id="a-1", token_gen=0)
    d.passes(iss=B, session_id="b-1", token_gen=1000)
    d.passes(iss=C, session_id="c-1", token_gen=0)
    assert d.store.rotate("alice", B) == 1001
    assert d.store.rotate("alice", C) == 1
    assert d.store.rotate("alice") == 1
    assert _statuses(d, "alice", A) == {"a-1": "active"} and _statuses(d, "alice", B) == {"b-1": "active"}
    assert _statuses(d, "alice", C) == {"c-1": "active"} and _statuses(d, "alice", "") == {"n-1": "active"}
    assert [s.iss for s in d.store.sessions("alice", 900, C)] == [C]


def test_a_session_id_belongs_to_one_issuers_principal(d: Driver) -> None:
    d.passes(iss=A, session_id="s-1")
    d.deny("invalid_token", iss=B, session_id="s-1")
    d.deny("invalid_token", session_id="s-1")  # the alice of tokens without an issuer is another principal too
    d.passes(iss=A, session_id="s-1")
    assert _statuses(d, "alice", B) == {} and _statuses(d, "alice", A) == {"s-1": "active"}
    assert d.store.revoke_session("s-1") is True
    d.deny("session_revoked", iss=A, session_id="s-1")


def test_sessions_tickets_and_risk_are_counted_per_issuer(d: Driver) -> None:
    d.passes(iss=A, session_id="a-1", max_sessions=1)
    d.passes(iss=B, session_id="b-1", max_sessions=1)
    d.deny("too_many_sessions", iss=A, session_id="a-2", max_sessions=1)
    held = d.ok(iss=A, session_id="a-1", exclusive=True, raises_risk=5, risk_window=60)
    d.passes(iss=B, session_id="b-1", max_in_flight=1, max_risk=0)
    d.deny("conflicting_action", iss=A, session_id="a-1")
    d.store.release(held)
    d.deny("risk_too_high", iss=A, session_id="a-1", max_risk=0)


def test_operations_name_the_principal_by_issuer_and_subject(d: Driver) -> None:
    def both(sub: str) -> None:
        d.passes(sub=sub, iss=A, session_id=f"{sub}-a")
        d.passes(sub=sub, iss=B, session_id=f"{sub}-b")

    def only_b_refused(sub: str, code: str, **overrides: Any) -> None:
        d.passes(sub=sub, iss=A, session_id=f"{sub}-a", **overrides)
        d.deny(code, sub=sub, iss=B, session_id=f"{sub}-b", **overrides)

    both("p1")
    d.store.revoke_principal("p1", B)
    only_b_refused("p1", "token_revoked")
    both("p2")
    d.store.set_privileges("p2", [], B)
    only_b_refused("p2", "insufficient_scope", scopes=frozenset({"x"}), token_scopes=frozenset({"x"}))
    both("p3")
    assert d.store.revoke_sessions("p3", None, B) == ["p3-b"]
    only_b_refused("p3", "session_revoked")
    both("p4")
    d.store.disable_principal("p4", B)
    only_b_refused("p4", "token_revoked")
    assert d.store.enable_principal("p4", A) is False and d.store.enable_principal("p4", B) is True
    both("p5")
    d.store.set_assurance("p5", "bronze", None, B)
    only_b_refused("p5", "step_up_required", acr="gold", acr_values=("gold",))
    both("p6")
    d.store.raise_risk("p6", 5, 60.0, B)
    only_b_refused("p6", "risk_too_high", max_risk=0)
    both("p7")
    assert d.store.report_compromise("p7", None, B) == ["p7-b"]
    only_b_refused("p7", "credential_compromised")
    both("p8")
    assert d.store.report_compromise(None, "p8-b") == ["p8-b"]  # a session names its own principal
    only_b_refused("p8", "credential_compromised")
    assert d.store.pause_session("p8-a") is True
    assert _statuses(d, "p8", A) == {"p8-a": "paused"}


def test_compromise_reaches_another_issuers_contexts_that_share_the_device(d: Driver) -> None:
    d.passes(iss=A, session_id="a-1", device="laptop-1")
    d.passes(sub="bob", iss=B, session_id="b-1", device="laptop-1")
    d.passes(iss=B, session_id="b-2", device="phone-2")  # issuer B's alice: another principal
    assert d.store.report_compromise("alice", None, A) == ["a-1", "b-1"]
    assert _statuses(d, "alice", B) == {"b-2": "active"}
    assert _statuses(d, "bob", B) == {"b-1": "compromised"}


def test_an_actor_is_a_subject_of_the_same_issuer(d: Driver) -> None:
    d.passes(sub="agent", iss=A, session_id="ag-a", actor="alice")
    d.passes(sub="agent", iss=B, session_id="ag-b", actor="alice")
    d.passes(iss=A, session_id="al-a")
    assert d.store.report_compromise("alice", None, A) == ["ag-a", "al-a"]
    d.deny("credential_compromised", sub="agent", iss=A, session_id="ag-a2", actor="alice")
    d.passes(sub="agent", iss=B, session_id="ag-b2", actor="alice")


def test_on_lock_conflict_pause_reaches_a_holder_of_another_issuer(d: Driver) -> None:
    d.ok(sub="bot", iss=B, kind="service", session_id="bot-1", locks=X)
    d.deny("object_locked", iss=A, locks=X, on_lock_conflict="pause")
    assert _statuses(d, "bot", B) == {"bot-1": "paused"}
    d.deny("session_paused", sub="bot", iss=B, kind="service", session_id="bot-1")
    (lock,) = d.store.locks()
    assert (lock.sub, lock.iss) == ("bot", B)


def test_a_refreshed_token_reopens_its_expired_session_under_any_issuer(d: Driver) -> None:
    # needs_clock
    for iss in ("", A):
        d.passes(iss=iss, session_id=f"s-{iss}", token_exp=d.clock() + 1)
    d.clock.advance(1.5)  # the sessions expired with their tokens; the session ids are still indexed
    for iss in ("", A):
        d.passes(iss=iss, session_id=f"s-{iss}")
    d.deny("invalid_token", iss=B, session_id=f"s-{A}")


def test_issuers_of_a_subject(d: Driver) -> None:
    assert d.store.issuers("alice") == []
    d.passes(iss=A, session_id="a-1")
    d.passes(iss=C, session_id="c-1")
    d.store.rotate("carol", B)
    d.passes(sub="dave")
    d.passes(sub="alice|x", iss=B, session_id="x-1")  # a subject that ends like another one's key
    assert d.store.issuers("alice") == [A, C]
    assert d.store.issuers("carol") == [B]
    assert d.store.issuers("dave") == [""]
    assert d.store.issuers("x") == []


def test_state_stored_without_an_issuer_is_adopted_by_an_issuers_principal(d: Driver,
                                                                            request: pytest.FixtureRequest) -> None:
    if request.node.callspec.params["case"] == "redis-cluster":
        # a cluster keeps the keys stored before issuers in other slots: nothing is inherited, which is why its
        # operators declare a state loss after upgrading (docs/issuers-and-sessions.md)
        d.passes(session_id="alice-1")
        d.store.rotate("alice")
        d.deny("stale_generation", session_id="alice-1", token_gen=0)
        d.passes(iss=A, session_id="alice-3", token_gen=0)
        return
    d.passes(session_id="alice-1")  # what a store written before issuers holds
    d.passes(session_id="alice-2")
    d.store.rotate("alice")
    d.store.pause_session("alice-2")
    d.deny("stale_generation", iss=A, session_id="alice-3", token_gen=0)  # issuer A's alice inherits it
    d.passes(iss=A, session_id="alice-1", token_gen=1)  # and takes the session over
    d.deny("session_paused", iss=A, session_id="alice-2", token_gen=1)
    assert _statuses(d, "alice", A) == {"alice-1": "active"}
    assert d.store.pause_session("alice-1") is True  # the session the issuer's principal took over
    d.deny("session_paused", iss=A, session_id="alice-1", token_gen=1)
    d.deny("stale_generation", iss=B, session_id="alice-4", token_gen=0)  # every issuer inherits it


def test_an_actor_compromised_before_issuers_stays_compromised_under_an_issuer(d: Driver,
                                                                              request: pytest.FixtureRequest) -> None:
    d.passes(sub="bob", session_id="bob-delegated", actor="agent-7")  # stored before issuers
    d.store.report_compromise("agent-7", None)
    if request.node.callspec.params["case"] == "redis-cluster":  # nothing is inherited there (see above)
        d.passes(sub="bob", iss=A, session_id="bob-a", actor="agent-7")
        return
    # the actor's marker reaches the issuer's actor, whether the subject or only the actor has issuer-less state
    d.deny("credential_compromised", sub="bob", iss=A, session_id="bob-a", actor="agent-7")
    d.deny("credential_compromised", sub="carol", iss=A, session_id="carol-a", actor="agent-7")
    d.passes(sub="carol", iss=A, session_id="carol-b", actor="agent-8")
    d.passes(sub="bob", iss=A, session_id="bob-b", actor="agent-7", token_iat=later(d.clock))


def test_a_reset_reaches_the_generation_an_issuers_principal_inherits(d: Driver,
                                                                      request: pytest.FixtureRequest) -> None:
    d.store.rotate("alice")  # stored before issuers
    d.store.note_generation_claims({(A, "alice"): False})  # a note does not stand in for the inherited state
    if request.node.callspec.params["case"] == "redis-cluster":  # nothing is inherited there (see above)
        assert d.store.reset_generation("alice", A) == 0
        d.passes(iss=A, session_id="alice-a", token_gen=0)
        return
    d.deny("stale_generation", iss=A, session_id="alice-a", token_gen=0)
    assert d.store.reset_generation("alice", A) == 1
    d.passes(iss=A, session_id="alice-a", token_gen=0)
    d.deny("stale_generation", iss=B, session_id="alice-b", token_gen=0)  # another issuer's principal keeps it


# ---------------------------------------------------------------------------------------------------- order of checks


def test_order_stale_generation_before_session_revoked(d: Driver) -> None:
    d.store.rotate("alice")
    d.store.revoke_session("alice-1")
    d.deny("stale_generation", token_gen=0)
    d.deny("session_revoked", token_gen=1)


def test_order_token_revoked_before_session_paused(d: Driver) -> None:
    d.passes()
    d.store.pause_session("alice-1")
    watermark = d.store.revoke_principal("alice")
    d.deny("token_revoked", token_iat=watermark - 10)
    d.deny("session_paused", token_iat=watermark)


def test_order_session_status_before_compromise(d: Driver) -> None:
    d.passes(session_id="alice-1")
    d.store.revoke_session("alice-1")
    d.store.report_compromise("alice", None)
    d.deny("session_revoked", session_id="alice-1")
    d.deny("credential_compromised", session_id="alice-2")


def test_order_compromise_before_reuse(d: Driver) -> None:
    d.ok(token_hash="T", client="c1")
    d.store.report_compromise("alice", None)
    d.deny("credential_compromised", token_hash="T", client="c2")


def test_order_reuse_before_replay_before_scope(d: Driver) -> None:
    d.passes(one_time=True, jti="j-1")
    d.ok(session_id="alice-2", token_hash="T", client="c1")
    d.deny("token_reuse", session_id="alice-2", token_hash="T", client="c2", one_time=True, jti="j-1",
           scopes=frozenset({"x"}))
    d.deny("token_replayed", one_time=True, jti="j-1", scopes=frozenset({"x"}))


def test_order_scope_before_step_up_before_device(d: Driver) -> None:
    d.store.set_device_status("laptop-1", False)
    failing: dict[str, Any] = {"max_auth_age": 60, "auth_time": d.clock() - 600, "device": "laptop-1",
                               "require_compliant_device": True}
    d.deny("insufficient_scope", scopes=frozenset({"x"}), **failing)
    d.deny("step_up_required", **failing)
    d.deny("device_noncompliant", device="laptop-1", require_compliant_device=True)


def test_order_device_before_sessions_before_in_flight(d: Driver) -> None:
    d.ok(session_id="alice-1")
    d.store.set_device_status("laptop-1", False)
    d.deny("device_noncompliant", session_id="alice-2", max_sessions=1, max_in_flight=1, device="laptop-1",
           require_compliant_device=True)
    d.deny("too_many_sessions", session_id="alice-2", max_sessions=1, max_in_flight=1)
    d.deny("too_many_in_flight", session_id="alice-1", max_sessions=1, max_in_flight=1)


def test_order_in_flight_before_conflicts_before_risk_before_locks(d: Driver) -> None:
    d.passes(raises_risk=5, risk_window=60.0)  # alice's risk is 5
    d.ok(sub="bob", locks=X)  # obj:1 is held
    exclusive = d.ok(exclusive=True)  # an exclusive action of alice is in flight
    everything: dict[str, Any] = {"session_id": "alice-2", "max_risk": 0, "locks": X}
    d.deny("too_many_in_flight", max_in_flight=1, **everything)
    d.deny("conflicting_action", **everything)
    d.store.release(exclusive)
    d.deny("risk_too_high", **everything)
    d.deny("object_locked", **{**everything, "max_risk": 5})


# ---------------------------------------------------------------------------------------------------- async twins


@pytest.mark.anyio
async def test_async_admit_and_release(d: Driver) -> None:
    store = d.store
    held = await store.aadmit(d.admission(locks=X, max_in_flight=1))
    assert isinstance(held, Ticket)
    denial = await store.aadmit(d.admission(sub="bob", locks=X))
    assert isinstance(denial, Denial) and denial.code == "object_locked"
    denial = await store.aadmit(d.admission(session_id="alice-2", max_in_flight=1))
    assert isinstance(denial, Denial) and denial.code == "too_many_in_flight"
    locks = await store.alocks()
    assert [(lock.key, lock.ticket_id) for lock in locks] == [("obj:1", held.ticket_id)]
    await store.arenew([held], 30.0)
    await store.arelease(held)
    assert await store.alocks() == []
    second = await store.aadmit(d.admission(sub="bob", locks=X))
    assert isinstance(second, Ticket)
    assert second.fencing_tokens["obj:1"] > held.fencing_tokens["obj:1"]


@pytest.mark.anyio
async def test_async_operations(d: Driver) -> None:
    store = d.store
    d.passes(session_id="alice-1", device="laptop-1")
    d.passes(session_id="alice-2")
    assert await store.arotate("alice") == 1
    d.deny("stale_generation", token_gen=0)
    watermark = await store.arevoke_principal("bob")
    d.deny("token_revoked", sub="bob", token_iat=watermark - 1)
    assert await store.apause_session("alice-1") is True
    d.deny("session_paused", token_gen=1)
    assert await store.aresume_session("alice-1") is True
    d.passes(token_gen=1, device="laptop-1")
    assert await store.arevoke_session("alice-2") is True
    d.deny("session_revoked", session_id="alice-2", token_gen=1)
    await store.aset_device_status("laptop-1", False)
    d.deny("device_noncompliant", token_gen=1, device="laptop-1", require_compliant_device=True)
    await store.aset_privileges("alice", ["read"])
    d.deny("insufficient_scope", token_gen=1, scopes=frozenset({"write"}), token_scopes=frozenset({"write"}))
    sessions = await store.asessions("alice", 900)
    assert {s.session_id: s.status for s in sessions} == {"alice-1": "active", "alice-2": "revoked"}
    hit = await store.areport_compromise("alice", None)
    assert hit == ["alice-1"]
    d.deny("credential_compromised", token_gen=1)


# ---------------------------------------------------------------------------------------------------- concurrency

THREADS = 16
ATTEMPTS = 16  # per thread: 256 admissions per test


class Bookkeeping:
    """What the application sees: who holds a ticket right now, and the fencing tokens in the order received."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holding = 0
        self.overlaps = 0
        self.admitted = 0
        self.fences: list[int] = []
        self.out_of_order = 0
        self.codes: dict[str, int] = {}
        self.errors: list[BaseException] = []

    def enter(self, ticket: Ticket, key: str | None) -> None:
        with self.lock:
            self.holding += 1
            self.admitted += 1
            if self.holding > 1:
                self.overlaps += 1
            if key is not None:
                fence = ticket.fencing_tokens[key]
                if self.fences and fence <= self.fences[-1]:
                    self.out_of_order += 1
                self.fences.append(fence)

    def leave(self) -> None:
        with self.lock:
            self.holding -= 1

    def denied(self, code: str) -> None:
        with self.lock:
            self.codes[code] = self.codes.get(code, 0) + 1


def _hammer(stores: list[Store], build: Callable[[int, int], Admission], key: str | None) -> Bookkeeping:
    book = Bookkeeping()
    barrier = threading.Barrier(THREADS)

    def worker(n: int) -> None:
        store = stores[n % len(stores)]
        try:
            barrier.wait()
            for i in range(ATTEMPTS):
                result = store.admit(build(n, i))
                if isinstance(result, Denial):
                    book.denied(result.code)
                    continue
                book.enter(result, key)
                for _ in range(20):
                    time.sleep(0)  # let other threads run while this ticket is held
                book.leave()
                store.release(result)
        except BaseException as exc:  # reported by the main thread
            with book.lock:
                book.errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert book.errors == []
    return book


def _check_exclusive(book: Bookkeeping, code: str, key: str | None) -> None:
    assert book.overlaps == 0
    assert book.admitted >= 1
    assert book.admitted + sum(book.codes.values()) == THREADS * ATTEMPTS
    assert set(book.codes) <= {code}
    if key is not None:
        assert book.out_of_order == 0
        assert len(book.fences) == book.admitted  # one token per grant, strictly increasing (out_of_order)


def _stores(case: StoreCase, store: Store, clock: Clock, tmp_path: Path) -> list[Store]:
    return [store] if case.peer is None else [store, case.peer(tmp_path, clock)]


def test_concurrent_exclusive_lock(case: StoreCase, store: Store, clock: Clock, tmp_path: Path) -> None:
    stores = _stores(case, store, clock, tmp_path)
    try:
        book = _hammer(stores, lambda n, i: make_admission(clock, sub=f"user-{n}", locks=X), "obj:1")
    finally:
        for extra in stores[1:]:
            extra.close()
    _check_exclusive(book, "object_locked", "obj:1")
    assert store.locks() == []


def test_concurrent_max_in_flight_one(case: StoreCase, store: Store, clock: Clock, tmp_path: Path) -> None:
    stores = _stores(case, store, clock, tmp_path)
    try:
        book = _hammer(stores, lambda n, i: make_admission(
            clock, session_id=f"alice-{n}", max_in_flight=1), None)
    finally:
        for extra in stores[1:]:
            extra.close()
    _check_exclusive(book, "too_many_in_flight", None)


def test_concurrent_max_sessions(case: StoreCase, store: Store, clock: Clock, tmp_path: Path) -> None:
    stores = _stores(case, store, clock, tmp_path)
    try:
        book = _hammer(stores, lambda n, i: make_admission(
            clock, session_id=f"alice-{n}-{i}", max_sessions=3), None)
    finally:
        for extra in stores[1:]:
            extra.close()
    assert book.admitted == 3
    assert book.codes == {"too_many_sessions": THREADS * ATTEMPTS - 3}
    assert len(store.sessions("alice", 900)) == 3


def test_concurrent_one_time_token(case: StoreCase, store: Store, clock: Clock, tmp_path: Path) -> None:
    stores = _stores(case, store, clock, tmp_path)
    try:
        book = _hammer(stores, lambda n, i: make_admission(
            clock, sub=f"user-{n}", one_time=True, jti=f"jti-{i}"), None)
    finally:
        for extra in stores[1:]:
            extra.close()
    assert book.admitted == ATTEMPTS  # each jti exactly once
    assert book.codes == {"token_replayed": (THREADS - 1) * ATTEMPTS}
