"""Which issuer an operation acts on: ``issuer=``, the Guard's one issuer, or the one the store knows; and the issuer
a Guard keeps a token's principal state under. (Two applications sharing a store over HTTP:
tests/e2e/test_issuers_and_sessions.py.)"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sa_middleware import Denial, Guard, RequestInfo
from sa_middleware.demo import DemoIssuer
from sa_middleware.errors import ConfigurationError
from sa_middleware.events import SETError, SSFReceiver
from sa_middleware.guard import Admitted
from sa_middleware.operations import Operations

A, B = "https://idp-a.example", "https://idp-b.example"


def fresh() -> str:
    return f"alice-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def idps() -> tuple[DemoIssuer, DemoIssuer]:
    """Two issuers signing with one key (a Guard that trusts both needs one key)."""
    a, b = DemoIssuer(issuer=A), DemoIssuer(issuer=B)
    b.private_key, b.public_pem = a.private_key, a.public_pem
    return a, b


@pytest.fixture
def store(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'sa.db'}"


@pytest.fixture
def both(idps: tuple[DemoIssuer, DemoIssuer], store: str) -> Iterator[Guard]:
    guard = Guard(store=store, keys=idps[0].public_pem, algorithms=["RS256"], issuer=[A, B])
    yield guard
    guard.close()


def code(guard: Guard, token: str) -> str:
    outcome = guard.admit(RequestInfo("GET", "/x", {"authorization": f"Bearer {token}"}))
    if isinstance(outcome, Denial):
        return outcome.code
    assert isinstance(outcome, Admitted)
    guard.release(outcome.ticket)
    return "ok"


def test_a_guard_that_trusts_two_issuers_needs_the_issuer_when_both_know_the_subject(
        both: Guard, idps: tuple[DemoIssuer, DemoIssuer]) -> None:
    a, b = idps
    alice = fresh()
    old_a, old_b = a.token(alice, gen=0), b.token(alice, gen=0)
    assert code(both, old_a) == code(both, old_b) == "ok"
    with pytest.raises(ConfigurationError, match=f"ambiguous: subject {alice} is known under issuers "
                                                 f"'{A}', '{B}'; pass issuer="):
        both.rotate(alice)
    assert both.store.rotate(alice, A) == 1 and both.store.rotate(alice, B) == 1  # nothing was changed
    assert both.rotate(alice, issuer=B) == 2
    assert code(both, old_a) == "stale_generation"  # the store's rotation of A's alice above
    assert code(both, a.token(alice, gen=1)) == "ok"
    assert code(both, b.token(alice, gen=1)) == "stale_generation"
    assert {s.iss for s in both.sessions(alice, issuer=A)} == {A}
    with pytest.raises(ConfigurationError, match="ambiguous"):
        both.sessions(alice)


@pytest.mark.anyio
async def test_the_issuer_known_for_a_subject_is_used(both: Guard, idps: tuple[DemoIssuer, DemoIssuer]) -> None:
    a, _ = idps
    alice, nobody = fresh(), fresh()
    token = a.token(alice, gen=0)
    assert code(both, token) == "ok"
    assert await both.arotate(alice) == 1  # known under A only
    assert code(both, token) == "stale_generation"
    with pytest.raises(ConfigurationError, match=f"subject {nobody} is not known to the store under the issuers "
                                                 "trusted here; pass issuer="):
        await both.arevoke_principal(nobody)
    assert await both.asessions(nobody) == []  # a listing of nobody is empty, not an error
    assert both.audit(sub=alice, code="rotate")[0].detail == f"generation 1; issuer {A}"


def test_a_guard_without_issuers_keeps_every_principal_under_the_empty_issuer(
        idps: tuple[DemoIssuer, DemoIssuer], store: str) -> None:
    a, b = idps
    guard = Guard(store=store, keys=a.public_pem, algorithms=["RS256"])  # iss is not checked: one trust domain
    try:
        alice = fresh()
        assert code(guard, a.token(alice, gen=0)) == "ok"
        assert code(guard, b.token(alice, gen=3)) == "ok"
        assert code(guard, a.token(alice, gen=0)) == "stale_generation"  # one principal, whatever the iss
        assert guard.store.issuers(alice) == [""]
        assert guard.rotate(alice) == 4
    finally:
        guard.close()


def test_operations_on_a_store_alone_take_a_default_issuer(idps: tuple[DemoIssuer, DemoIssuer], store: str) -> None:
    a, _ = idps
    guard = Guard(store=store, keys=a.public_pem, algorithms=["RS256"], issuer=A)
    ops, pinned = Operations(store), Operations(store, issuer=A)
    try:
        alice, bob = fresh(), fresh()
        assert code(guard, a.token(alice, gen=0)) == "ok"
        assert ops.rotate(alice) == 1  # the one issuer the store knows
        with pytest.raises(ConfigurationError, match=f"subject {bob} is not known to the store under any issuer"):
            ops.rotate(bob)
        assert pinned.rotate(bob) == 1
        assert code(guard, a.token(bob, gen=0)) == "stale_generation"
        assert ops.rotate(bob, issuer="") == 1  # the principal of tokens without an issuer
        with pytest.raises(ConfigurationError, match="issuer must be a string"):
            ops.rotate(bob, issuer=5)  # type: ignore[arg-type]
    finally:
        guard.close()
        ops.close()
        pinned.close()


def test_an_iss_sub_event_acts_on_that_issuers_principal(both: Guard, idps: tuple[DemoIssuer, DemoIssuer]) -> None:
    from events.ssf_support import CAEP, Transmitter, opaque

    a, b = idps
    tx = Transmitter()
    rx = SSFReceiver(both, issuer=tx.issuer, audience=tx.audience, keys=tx.public_pem)
    alice, carol = fresh(), fresh()
    assert code(both, a.token(alice, gen=0)) == code(both, b.token(alice, gen=0)) == "ok"
    change = {"credential_type": "password", "change_type": "revoke"}
    outcome = rx.process(tx.set(CAEP + "credential-change", change, sub_id={"format": "iss_sub", "iss": B,
                                                                           "sub": alice}))
    assert outcome.status == "applied" and outcome.actions[0].issuer == B
    assert code(both, b.token(alice, gen=0)) == "stale_generation"
    assert code(both, a.token(alice, gen=0)) == "ok"
    # a subject without an issuer: the one issuer the store knows it under, else the event is not applied
    assert code(both, a.token(carol, gen=0)) == "ok"
    assert rx.process(tx.set(CAEP + "credential-change", change, sub_id=opaque(carol))).status == "applied"
    assert code(both, a.token(carol, gen=0)) == "stale_generation"
    with pytest.raises(SETError, match="name it with an iss_sub subject") as refused:  # 400, nothing applied
        rx.process(tx.set(CAEP + "credential-change", change, sub_id=opaque(alice)))
    assert refused.value.err == "invalid_request"
    assert code(both, a.token(alice, gen=0)) == "ok"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
