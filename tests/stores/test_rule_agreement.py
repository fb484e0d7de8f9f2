"""The admission rule is written twice: in Python (``rules.py``, which the memory and SQLite stores evaluate) and in
Lua (the Redis store). This test keeps them equal: the same operations, on the same clock, go to a memory store and to
a Redis store, and every outcome must match: the code, the detail and Retry-After of a denial, the fencing tokens of
an admission, and what was written (each principal's sessions with their status, times and client, every held
lock).

The operations come from a table of cases (the rule's branches, one by one) and from hypothesis, which generates
sequences of admissions under random policies mixed with releases, operator actions and the clock moving on.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import admission_of

from sa_middleware.denials import Denial
from sa_middleware.records import Admission, LockRequest, Ticket
from sa_middleware.stores.base import Store
from sa_middleware.stores.memory import MemoryStore

SUBS = ("alice", "bob", "robot")
LOCK_KEYS = ("doc:1", "doc:2")
IDLE = 900.0


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass(frozen=True)
class Admit:
    sub: str
    session: int
    kind: str = "human"
    gen: int | None = None
    iat_ago: float = 60.0
    client: str = "10.0.0.1"
    jti: str | None = None
    policy: tuple[tuple[str, Any], ...] = ()
    same_token: bool = False  # the token of the sequence's first request (its expiry), not a fresh one


@dataclass(frozen=True)
class Release:
    index: int  # among the tickets held, oldest first


@dataclass(frozen=True)
class Operator:
    action: str  # rotate, revoke_principal, compromise_sub, compromise_session, pause, resume, revoke_session
    sub: str
    session: int = 1


@dataclass(frozen=True)
class Advance:
    seconds: float


Op = Admit | Release | Operator | Advance


class Pair:
    """A memory store and a Redis store on one clock, driven together."""

    def __init__(self, redis_uri: str) -> None:
        from sa_middleware.stores.redis import RedisStore

        self.clock = Clock()
        self.start = self.clock.now
        self.memory = MemoryStore(clock=self.clock)
        self.redis = RedisStore.from_uri(redis_uri, timeout=10.0, clock=self.clock)
        self.held: list[tuple[Ticket, Ticket]] = []  # (memory's, Redis's) ticket of one admission
        self.serial = 0

    def close(self) -> None:
        self.memory.close()
        self.redis.close()

    def admission(self, op: Admit) -> Admission:
        self.serial += 1
        now = self.clock()
        policy = dict(op.policy)
        locks = tuple(LockRequest(key, mode) for key, mode in policy.pop("locks", ()))
        return admission_of(
            ticket_id=f"t{self.serial}", sub=op.sub, kind=op.kind, session_id=f"{op.sub}-{op.session}",
            token_hash=f"hash:{op.sub}-{op.session}",
            token_exp=(self.start if op.same_token else now) + 3600, token_iat=now - op.iat_ago,
            token_gen=op.gen, jti=op.jti, actor=None, credential=None, device=None, client=f"{op.client}|ua",
            user_agent="ua", route="PUT /docs/{id}", locks=locks, lease=30.0, session_idle=IDLE, **policy)

    def run(self, op: Op) -> tuple[Any, Any]:
        if isinstance(op, Advance):
            self.clock.now += op.seconds
            return None, None
        if isinstance(op, Release):
            if not self.held:
                return None, None
            mine, theirs = self.held.pop(op.index % len(self.held))
            self.memory.release(mine)
            self.redis.release(theirs)
            return None, None
        if isinstance(op, Operator):
            return self._operate(self.memory, op), self._operate(self.redis, op)
        a = self.admission(op)
        results = self.memory.admit(a), self.redis.admit(a)
        if isinstance(results[0], Ticket) and isinstance(results[1], Ticket):
            self.held.append((results[0], results[1]))
        elif isinstance(results[1], Ticket):
            self.redis.release(results[1])  # keep the two in step for the rest of the sequence
        return _outcome(results[0]), _outcome(results[1])

    @staticmethod
    def _operate(store: Store, op: Operator) -> Any:
        session_id = f"{op.sub}-{op.session}"
        if op.action == "rotate":
            return store.rotate(op.sub)
        if op.action == "revoke_principal":
            store.revoke_principal(op.sub)
            return None
        if op.action == "compromise_sub":
            return store.report_compromise(op.sub, None)
        if op.action == "compromise_session":
            return store.report_compromise(None, session_id)
        if op.action == "pause":
            return store.pause_session(session_id)
        if op.action == "resume":
            return store.resume_session(session_id)
        return store.revoke_session(session_id)

    def state(self, store: Store) -> tuple[Any, ...]:
        sessions = {sub: [(s.session_id, s.sub, s.kind, s.status, s.created, s.last_seen, s.expires, s.client,
                           s.user_agent, s.marked_at, s.marked_generation, s.cleared_at)
                          for s in store.sessions(sub, IDLE)] for sub in SUBS}
        locks = [(x.key, x.mode, x.fencing_token, x.ticket_id, x.sub, x.session_id, x.expires)
                 for x in store.locks()]
        return sessions, locks


def _outcome(result: Ticket | Denial) -> tuple[Any, ...]:
    if isinstance(result, Ticket):
        return "admitted", result.session_id, tuple(sorted(result.fencing_tokens.items())), result.expires
    return "denied", result.code, result.detail, result.retry_after


@pytest.fixture
def pair(tmp_path: Any) -> Iterator[Pair]:
    import redis_support

    uri = redis_support.store_uri("redis", tmp_path)
    p = Pair(uri)
    try:
        yield p
    finally:
        p.close()
        redis_support.forget_prefix(uri)


def check(pair: Pair, ops: list[Op]) -> None:
    for step, op in enumerate(ops):
        from_memory, from_redis = pair.run(op)
        assert from_memory == from_redis, f"step {step} {op}: rules.py {from_memory} != Lua {from_redis}"
        assert pair.state(pair.memory) == pair.state(pair.redis), f"state after step {step} {op}"


# -- the table of cases ------------------------------------------------------------------------------------------

LIMIT = (("max_sessions", 1),)
CASES: dict[str, list[Op]] = {
    "session limit rejects a second session": [Admit("alice", 1, policy=LIMIT), Admit("alice", 2, policy=LIMIT)],
    "session limit evicts the oldest": [Admit("alice", 1), Advance(1),
                                        Admit("alice", 2, policy=(*LIMIT, ("on_session_limit", "evict_oldest"))),
                                        Admit("alice", 1)],
    "an idle session frees its place": [Admit("alice", 1, policy=LIMIT), Advance(IDLE + 1),
                                        Admit("alice", 2, policy=LIMIT)],
    "in flight, exclusive and conflicts": [
        Admit("bob", 1, policy=(("tags", frozenset({"pay"})),)),
        Admit("bob", 1, policy=(("max_in_flight", 1),)),
        Admit("bob", 2, policy=(("conflicts", frozenset({"pay"})),)),
        Admit("bob", 2, policy=(("exclusive", True),)), Release(0), Admit("bob", 2, policy=(("exclusive", True),))],
    "risk raised and refused": [Admit("alice", 1, policy=(("raises_risk", 2), ("risk_window", 30.0))),
                                Admit("alice", 1, policy=(("max_risk", 1),)), Advance(31),
                                Admit("alice", 1, policy=(("max_risk", 1),))],
    "locks: exclusive, shared, fencing": [
        Admit("alice", 1, policy=(("locks", (("doc:1", "shared"),)),)),
        Admit("bob", 1, policy=(("locks", (("doc:1", "shared"),)),)),
        Admit("robot", 1, kind="agent", policy=(("locks", (("doc:1", "exclusive"),)),)),
        Release(0), Release(0), Advance(0.5), Admit("robot", 1, policy=(("locks", (("doc:1", "exclusive"),)),))],
    "an agent clashing with a human is paused": [
        Admit("alice", 1, policy=(("locks", (("doc:2", "exclusive"),)),)),
        Admit("robot", 1, kind="agent", policy=(("locks", (("doc:2", "exclusive"),)), ("on_lock_conflict", "pause"))),
        Admit("robot", 1, kind="agent"), Operator("resume", "robot"), Admit("robot", 1, kind="agent")],
    "a human clashing with an agent pauses the agent": [
        Admit("robot", 1, kind="agent", policy=(("locks", (("doc:2", "exclusive"),)),)),
        Admit("alice", 1, policy=(("locks", (("doc:2", "exclusive"),)), ("on_lock_conflict", "pause"))),
        Admit("robot", 1, kind="agent")],
    "generations ratchet": [Admit("alice", 1, gen=1), Admit("alice", 1, gen=0), Operator("rotate", "alice"),
                            Admit("alice", 1, gen=1), Admit("alice", 1, gen=2)],
    "watermark": [Admit("bob", 1), Advance(1), Operator("revoke_principal", "bob"), Admit("bob", 1),
                  Admit("bob", 2, iat_ago=-0.5)],
    "compromise and re-establishment": [Admit("alice", 1, gen=1), Operator("compromise_sub", "alice"),
                                        Admit("alice", 1, gen=1), Admit("alice", 2, gen=1), Admit("alice", 1, gen=2)],
    "a session compromised by id": [Admit("bob", 1), Operator("compromise_session", "bob"), Admit("bob", 1),
                                    Advance(1), Admit("bob", 1, iat_ago=-0.5)],
    "pause, revoke, resume": [Admit("alice", 1), Operator("pause", "alice"), Admit("alice", 1),
                              Operator("resume", "alice"), Admit("alice", 1), Operator("revoke_session", "alice"),
                              Admit("alice", 1), Operator("revoke_session", "bob", 7), Admit("alice", 7)],
    "token reuse and one-time tokens": [Admit("bob", 1), Admit("bob", 1, client="10.9.9.9"), Release(0),
                                        Admit("bob", 1, client="10.9.9.9"),
                                        Admit("bob", 2, jti="j1", policy=(("one_time", True),)),
                                        Admit("bob", 2, jti="j1", policy=(("one_time", True),))],
    "a session seen again is written once a second, or at once when it changed": [
        Admit("alice", 1, same_token=True), Advance(0.25), Admit("alice", 1, same_token=True), Advance(0.25),
        Admit("alice", 1, client="10.0.0.2", same_token=True), Advance(0.9),
        Admit("alice", 1, client="10.0.0.2", same_token=True), Advance(1.1),
        Admit("alice", 1, client="10.0.0.2", same_token=True), Admit("alice", 1)],
    "leases lapse": [Admit("alice", 1, policy=(("locks", (("doc:1", "exclusive"),)),)), Advance(31),
                     Admit("bob", 1, policy=(("locks", (("doc:1", "exclusive"),)),))],
}


@pytest.mark.parametrize("name", list(CASES))
def test_table_of_cases(pair: Pair, name: str) -> None:
    check(pair, CASES[name])


def test_a_session_seen_again_within_the_precision_is_left_as_stored(pair: Pair) -> None:
    first = pair.clock()
    check(pair, [Admit("alice", 1, same_token=True), Advance(0.25), Admit("alice", 1, same_token=True)])
    for store in (pair.memory, pair.redis):
        assert [s.last_seen for s in store.sessions("alice", IDLE)] == [first]
    check(pair, [Advance(0.8), Admit("alice", 1, same_token=True)])  # a second after the stored time: written
    for store in (pair.memory, pair.redis):
        assert [s.last_seen for s in store.sessions("alice", IDLE)] == [pair.clock()]


# -- generated sequences -----------------------------------------------------------------------------------------

_policies = st.fixed_dictionaries({}, optional={
    "max_sessions": st.integers(1, 2),
    "on_session_limit": st.sampled_from(["reject", "evict_oldest"]),
    "max_in_flight": st.integers(1, 2),
    "exclusive": st.booleans(),
    "tags": st.frozensets(st.sampled_from(["a", "b"])),
    "conflicts": st.frozensets(st.sampled_from(["a", "b"])),
    "raises_risk": st.integers(0, 2),
    "risk_window": st.sampled_from([5.0, 60.0]),
    "max_risk": st.integers(0, 2),
    "locks": st.lists(st.tuples(st.sampled_from(LOCK_KEYS), st.sampled_from(["exclusive", "shared"])),
                      max_size=2).map(tuple),
    "on_lock_conflict": st.sampled_from(["reject", "pause"]),
}).map(lambda d: tuple(sorted(d.items())))

_admits = st.builds(Admit, sub=st.sampled_from(SUBS), session=st.integers(1, 3),
                    kind=st.sampled_from(["human", "agent", "service"]), gen=st.none() | st.integers(0, 2),
                    iat_ago=st.sampled_from([60.0, 1.0, -0.5]), client=st.sampled_from(["10.0.0.1", "10.0.0.2"]),
                    policy=_policies, same_token=st.booleans())
_ops = st.one_of(
    _admits, _admits, _admits,
    st.builds(Release, index=st.integers(0, 5)),
    st.builds(Operator, action=st.sampled_from(["rotate", "revoke_principal", "compromise_sub", "compromise_session",
                                                "pause", "resume", "revoke_session"]),
              sub=st.sampled_from(SUBS), session=st.integers(1, 3)),
    st.builds(Advance, seconds=st.sampled_from([0.25, 2.0, 40.0, IDLE])),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_ops, min_size=1, max_size=20))
def test_generated_sequences(tmp_path: Any, ops: list[Op]) -> None:
    import redis_support

    uri = redis_support.store_uri("redis", tmp_path / uuid.uuid4().hex)
    pair = Pair(uri)
    try:
        check(pair, ops)
    finally:
        pair.close()
        redis_support.forget_prefix(uri)
