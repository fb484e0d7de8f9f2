"""SET validation, subject resolution and event mapping through ``SSFReceiver.process`` (no server).

The HTTP behaviour is in ``test_ssf_receiver.py``; these are the cases that need no HTTP to be told apart: option
checking, key sources, subject formats, payload definitions, the mapping options and failure handling.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from ssf_support import CAEP, RISC, VERIFICATION, Transmitter, fresh_sub, opaque, user

from sa_middleware import ConfigurationError, Guard, StoreUnavailable
from sa_middleware.context import RequestInfo
from sa_middleware.demo import DemoIssuer
from sa_middleware.denials import Denial
from sa_middleware.events import SETError, SSFReceiver, Subject, Targets
from sa_middleware.stores.memory import MemoryStore

STREAM_UPDATED = "https://schemas.openid.net/secevent/ssf/event-type/stream-updated"


@pytest.fixture(scope="module")
def idp() -> DemoIssuer:
    return DemoIssuer()


@pytest.fixture(scope="module")
def tx() -> Transmitter:
    return Transmitter()


@pytest.fixture
def guard(idp: DemoIssuer) -> Iterator[Guard]:
    g = Guard(store=MemoryStore(), keys=idp.public_pem, algorithms=["RS256"], issuer=idp.issuer,
              audience=idp.audience)
    try:
        yield g
    finally:
        g.close()


def receiver(guard: Guard, tx: Transmitter, **options: Any) -> SSFReceiver:
    options.setdefault("keys", tx.public_pem)
    return SSFReceiver(guard, issuer=tx.issuer, audience=tx.audience, **options)


def admit(guard: Guard, token: str, path: str = "/x") -> str:
    """``"ok"`` or the denial code of a request with ``token``."""
    outcome = guard.admit(RequestInfo("GET", path, {"authorization": f"Bearer {token}"}))
    return outcome.code if isinstance(outcome, Denial) else "ok"


def refused(rx: SSFReceiver, token: str | bytes, err: str = "invalid_request") -> str:
    with pytest.raises(SETError) as info:
        rx.process(token)
    assert info.value.err == err, info.value
    return info.value.description


# -- options -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("options", [
    {"on_high_risk": "panic"},
    {"on_credential_change": "shrug"},
    {"risk_amount": 0},
    {"risk_window": -1},
    {"authorization": "secret-without-scheme"},
    {"max_bytes": 10},
    {"max_age": 0},
    {"algorithms": ["none"]},
    {"algorithms": ["HS256"]},  # the PEM is not an HMAC secret
    {"keys": None},  # no key source
    {"audience": ""},
    {"assurance_levels": {"x": ""}},
    {"subject_resolver": "not callable"},
])
def test_bad_options_fail_at_construction(guard: Guard, tx: Transmitter, options: dict[str, Any]) -> None:
    options.setdefault("keys", tx.public_pem)
    audience = options.pop("audience", tx.audience)
    with pytest.raises(ConfigurationError):
        SSFReceiver(guard, issuer=tx.issuer, audience=audience, **options)


def test_receiver_needs_a_guard(tx: Transmitter) -> None:
    with pytest.raises(ConfigurationError):
        SSFReceiver(object(), issuer=tx.issuer, audience=tx.audience, keys=tx.public_pem)  # type: ignore[arg-type]


# -- keys and signatures -------------------------------------------------------------------------------------------


def test_keys_from_a_jwk_set(guard: Guard, tx: Transmitter, idp: DemoIssuer) -> None:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(tx.private_key.public_key()))
    rx = receiver(guard, tx, keys=None, jwks={"keys": [{**jwk, "kid": "tx-1", "use": "sig", "alg": "RS256"}]})
    assert rx.process(tx.set(VERIFICATION, sub_id=opaque("s"))).status == "verified"
    other = receiver(guard, tx, keys=None, jwks={"keys": [{**jwk, "kid": "another-kid"}]})
    refused(other, tx.set(VERIFICATION, sub_id=opaque("s")), "invalid_key")  # unknown kid


def test_algorithm_confusion_is_invalid_key(guard: Guard, tx: Transmitter) -> None:
    rx = receiver(guard, tx)
    claims = {"iss": tx.issuer, "aud": tx.audience, "iat": int(time.time()), "jti": "j-conf",
              "sub_id": opaque("s"), "events": {VERIFICATION: {}}}
    forged = jwt.api_jws.PyJWS().encode(json.dumps(claims).encode(), b"\x00" * 32, algorithm="HS256",
                                        headers={"typ": "secevent+jwt"})
    assert "algorithm" in refused(rx, forged, "invalid_key")
    unsigned = jwt.api_jws.PyJWS().encode(json.dumps(claims).encode(), None, algorithm="none",
                                          headers={"typ": "secevent+jwt"})
    refused(rx, unsigned + "x", "invalid_key")
    refused(rx, tx.set(VERIFICATION, sub_id=opaque("s"), headers={"jku": "https://evil.example/jwks"}),
            "invalid_key")


def test_claims_that_are_missing_or_of_the_wrong_type(guard: Guard, tx: Transmitter) -> None:
    rx = receiver(guard, tx)
    event = (VERIFICATION, {})
    assert "iss" in refused(rx, tx.set(*event, sub_id=opaque("s"), iss=None))
    assert "aud" in refused(rx, tx.set(*event, sub_id=opaque("s"), aud=None))
    assert "aud" in refused(rx, tx.set(*event, sub_id=opaque("s"), aud=[1, 2]))
    assert "iat" in refused(rx, tx.set(*event, sub_id=opaque("s"), iat="yesterday"))
    assert "jti" in refused(rx, tx.set(*event, sub_id=opaque("s"), jti="x" * 300))
    assert "txn" in refused(rx, tx.set(*event, sub_id=opaque("s"), txn=5))
    assert "not yet valid" in refused(rx, tx.set(*event, sub_id=opaque("s"), nbf=time.time() + 3600))
    assert "event_timestamp" in refused(rx, tx.set(VERIFICATION, {"event_timestamp": "now"}, sub_id=opaque("s")))
    assert "JSON object" in refused(rx, tx.set(*event, sub_id=opaque("s"), events={VERIFICATION: "yes"}))
    refused(rx, b"\xff\xfe")
    refused(rx, "a.b")
    refused(rx, "e30.e30.")  # empty signature segment: not a JWS for the verifier either
    assert rx.process(f"  {tx.set(*event, sub_id=opaque('s'))}\n").status == "verified"  # whitespace around


# -- subjects ------------------------------------------------------------------------------------------------------


def test_subject_formats(guard: Guard, tx: Transmitter, idp: DemoIssuer) -> None:
    rx = receiver(guard, tx)
    sub = fresh_sub()
    token = idp.token(sub, sid=f"{sub}-s", jti=f"{sub}-j")
    assert admit(guard, token) == "ok"
    jwt_id = {"format": "jwt_id", "iss": idp.issuer, "jti": f"{sub}-s"}
    outcome = rx.process(tx.set(CAEP + "session-revoked", sub_id=jwt_id))
    assert [a.describe() for a in outcome.actions] == [f"revoke_session('{sub}-s')"]
    assert admit(guard, token) == "session_revoked"
    untrusted = {"format": "jwt_id", "iss": "https://elsewhere.example", "jti": "j"}
    assert rx.process(tx.set(CAEP + "session-revoked", sub_id=untrusted)).status == "ignored"
    for bad in ({"format": "iss_sub", "sub": "x"}, {"format": "email"}, {"format": "opaque", "id": ""},
                {"format": "opaque", "id": "x" * 257}, "a string", {"format": "complex"},
                {"format": "complex", "user": "x"}, {"format": "complex", "user": {"format": "did", "url": "x"}},
                {"format": "complex", "tenant": 5}, {"id": "no format"}):
        refused(rx, tx.set(RISC + "account-enabled", sub_id=bad))


def test_legacy_subject_inside_the_event(guard: Guard, tx: Transmitter, idp: DemoIssuer) -> None:
    rx = receiver(guard, tx)
    sub = fresh_sub()
    outcome = rx.process(tx.set(RISC + "account-disabled", {"subject": user(idp, sub)}))
    assert outcome.status == "applied" and outcome.actions[0].op == "disable_principal"
    assert admit(guard, idp.token(sub)) == "token_revoked"


def test_critical_subject_members(guard: Guard, tx: Transmitter, idp: DemoIssuer) -> None:
    rx = receiver(guard, tx, critical_subject_members=["tenant", "device"])
    sub = fresh_sub()
    with_tenant = {"format": "complex", "user": user(idp, sub), "tenant": opaque("t")}
    outcome = rx.process(tx.set(RISC + "account-disabled", sub_id=with_tenant))
    assert outcome.status == "ignored" and "tenant" in outcome.note
    foreign_device = {"format": "complex", "user": user(idp, sub),
                      "device": {"format": "iss_sub", "iss": "https://elsewhere.example", "sub": "d"}}
    assert rx.process(tx.set(RISC + "account-disabled", sub_id=foreign_device)).status == "ignored"
    assert admit(guard, idp.token(sub)) == "ok"
    relaxed = receiver(guard, tx)
    assert relaxed.process(tx.set(RISC + "account-disabled", sub_id=with_tenant)).status == "applied"


def test_subject_issuers_and_a_custom_resolver(guard: Guard, tx: Transmitter, idp: DemoIssuer) -> None:
    sub = fresh_sub()
    tenant_iss = "https://idp.example/tenant-7/"
    subject = {"format": "iss_sub", "iss": tenant_iss, "sub": sub}
    assert receiver(guard, tx).process(tx.set(RISC + "account-disabled", sub_id=subject)).status == "ignored"
    rx = receiver(guard, tx, subject_issuers=[tenant_iss])
    assert rx.process(tx.set(RISC + "account-disabled", sub_id=subject)).status == "applied"
    seen: list[tuple[Subject, str]] = []

    def by_email(subject: Subject, event_type: str) -> Targets:
        seen.append((subject, event_type))
        assert subject.simple is not None
        return Targets(principal="user-" + subject.simple.value.split("@")[0])

    custom = receiver(guard, tx, subject_resolver=by_email)
    outcome = custom.process(tx.set(RISC + "account-disabled", sub_id={"format": "email", "email": "jo@x.example"}))
    assert outcome.actions[0].args == ("user-jo",)
    assert seen[0][1] == RISC + "account-disabled" and seen[0][0].describe() == "email"


# -- payloads and mapping options ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("event_type", "payload", "word"), [
    (CAEP + "credential-change", {"change_type": "revoke"}, "credential_type"),
    (CAEP + "token-claims-change", {}, "claims"),
    (CAEP + "token-claims-change", {"claims": {"scope": ["ok", 5]}}, "scope"),
    (CAEP + "assurance-level-change", {"namespace": "RFC8176"}, "current_level"),
    (CAEP + "assurance-level-change", {"namespace": "x", "current_level": "y", "change_direction": "up"},
     "change_direction"),
    (CAEP + "device-compliance-change", {"previous_status": "compliant", "current_status": "meh"}, "current_status"),
    (CAEP + "risk-level-change", {"principal": "USER", "current_level": "EXTREME"}, "LOW"),
    (CAEP + "risk-level-change", {"current_level": "HIGH"}, "principal"),
    (RISC + "credential-compromise", {}, "credential_type"),
    (STREAM_UPDATED, {"status": "sleepy"}, "status"),
])
def test_payloads_that_break_their_definition(guard: Guard, tx: Transmitter, idp: DemoIssuer, event_type: str,
                                              payload: dict[str, Any], word: str) -> None:
    assert word in refused(receiver(guard, tx), tx.set(event_type, payload, sub_id=user(idp, fresh_sub())))


def test_credential_change_can_revoke_instead_of_rotate(guard: Guard, tx: Transmitter, idp: DemoIssuer) -> None:
    rx = receiver(guard, tx, on_credential_change="revoke_principal")
    sub = fresh_sub()
    token = idp.token(sub)
    rx.process(tx.set(CAEP + "credential-change", {"credential_type": "password", "change_type": "revoke"},
                      sub_id=user(idp, sub)))
    assert admit(guard, token) == "token_revoked"
    assert admit(guard, idp.token(sub, iat=time.time() + 1)) == "ok"  # generation untouched


def test_token_claims_change_without_scope_is_ignored(guard: Guard, tx: Transmitter, idp: DemoIssuer) -> None:
    outcome = receiver(guard, tx).process(tx.set(CAEP + "token-claims-change", {"claims": {"role": "ro-admin"}},
                                                 sub_id=user(idp, fresh_sub())))
    assert outcome.status == "ignored" and "scope" in outcome.note


def test_scp_list_and_risk_options(guard: Guard, tx: Transmitter, idp: DemoIssuer) -> None:
    rx = receiver(guard, tx, risk_amount=3, risk_window=60)
    sub = fresh_sub()
    outcome = rx.process(tx.set(CAEP + "token-claims-change", {"claims": {"scp": ["b", "a", "a"]}},
                                sub_id=user(idp, sub)))
    assert outcome.actions[0].args == (sub, ["a", "b"])
    outcome = rx.process(tx.set(CAEP + "risk-level-change", {"principal": "USER", "current_level": "high"},
                                sub_id=user(idp, sub)))
    assert outcome.actions[0].describe() == f"raise_risk('{sub}', 3, 60.0, issuer='{idp.issuer}')"


def test_risc_sessions_revoked_and_account_purged(guard: Guard, tx: Transmitter, idp: DemoIssuer) -> None:
    rx = receiver(guard, tx)
    sub, other = fresh_sub(), fresh_sub()
    token = idp.token(sub)
    assert admit(guard, token) == "ok"
    rx.process(tx.set(RISC + "sessions-revoked", sub_id=user(idp, sub)))
    assert admit(guard, token) == "session_revoked"
    rx.process(tx.set(RISC + "account-purged", sub_id=user(idp, other)))
    assert admit(guard, idp.token(other)) == "token_revoked"


def test_events_that_name_nothing_they_can_act_on(guard: Guard, tx: Transmitter, idp: DemoIssuer) -> None:
    rx = receiver(guard, tx)
    only_device = {"format": "complex", "device": opaque("d-1")}
    assert rx.process(tx.set(CAEP + "session-revoked", sub_id=only_device)).status == "ignored"
    assert rx.process(tx.set(CAEP + "device-compliance-change",
                             {"previous_status": "compliant", "current_status": "not-compliant"},
                             sub_id={"format": "email", "email": "a@b.example"})).status == "ignored"
    assert rx.process(tx.set(RISC + "credential-compromise", {"credential_type": "pin"},
                             sub_id=only_device)).status == "ignored"


def test_stream_updated_is_recorded(guard: Guard, tx: Transmitter) -> None:
    rx = receiver(guard, tx)
    outcome = rx.process(tx.set(STREAM_UPDATED, {"status": "paused", "reason": "maintenance"},
                                sub_id=opaque("stream-1")))
    assert outcome.status == "ignored" and rx.stream_status == "paused"


def test_jti_delivered_under_another_name_is_refused(guard: Guard, tx: Transmitter) -> None:
    rx = receiver(guard, tx)
    token = tx.set(VERIFICATION, sub_id=opaque("s"), jti="real-jti")
    with pytest.raises(SETError, match="jti"):
        rx.process(token, jti="claimed-jti")
    assert rx.process(token, jti="real-jti").status == "verified"


# -- failures --------------------------------------------------------------------------------------------------------


class FlakyStore(MemoryStore):
    """A memory store whose next ``rotate`` fails as an unreachable store would."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_next = True

    def rotate(self, sub: str, iss: str = "") -> int:
        if self.fail_next:
            self.fail_next = False
            raise StoreUnavailable("store did not answer")
        return super().rotate(sub, iss)


def test_a_failed_application_is_forgotten_so_the_redelivery_applies(tx: Transmitter, idp: DemoIssuer) -> None:
    store = FlakyStore()
    guard = Guard(store=store, keys=idp.public_pem, algorithms=["RS256"], issuer=idp.issuer)
    rx = receiver(guard, tx)
    sub = fresh_sub()
    change = tx.set(CAEP + "credential-change", {"credential_type": "password", "change_type": "delete"},
                    sub_id=user(idp, sub))
    with pytest.raises(StoreUnavailable):
        rx.process(change)
    assert rx.process(change).status == "applied"
    assert rx.process(change).status == "duplicate"
    assert store.rotate(sub, idp.issuer) == 2  # applied exactly once before this


@pytest.mark.anyio
async def test_async_failure_is_forgotten_too(tx: Transmitter, idp: DemoIssuer) -> None:
    guard = Guard(store=FlakyStore(), keys=idp.public_pem, algorithms=["RS256"], issuer=idp.issuer)
    rx = receiver(guard, tx)
    change = tx.set(CAEP + "credential-change", {"credential_type": "password", "change_type": "delete"},
                    sub_id=user(idp, fresh_sub()))
    with pytest.raises(StoreUnavailable):
        await rx.aprocess(change)
    assert (await rx.aprocess(change)).status == "applied"
    assert (await rx.aprocess(change)).status == "duplicate"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_token_verifier_without_expiry_is_only_for_sets(tx: Transmitter) -> None:
    """``require_expiry=False`` (how SETs are verified) accepts a token without ``exp``; the default still refuses
    it, and such a verifier keeps no cache."""
    from sa_middleware.errors import InvalidToken
    from sa_middleware.tokens import TokenVerifier, mint_token

    token = mint_token(tx.private_key, "RS256", {"iss": tx.issuer, "iat": int(time.time()), "jti": "j"})
    with pytest.raises(InvalidToken, match="exp"):
        TokenVerifier(keys=tx.public_pem, algorithms=["RS256"], required_claims=()).verify(token)
    lenient = TokenVerifier(keys=tx.public_pem, algorithms=["RS256"], required_claims=(), require_expiry=False,
                            issuer=tx.issuer)
    verified = lenient.verify(token)
    assert verified.expires_at == float("inf") and lenient.issuer == tx.issuer
    expired = mint_token(tx.private_key, "RS256", {"iss": tx.issuer, "iat": int(time.time()) - 100,
                                                   "exp": int(time.time()) - 50})
    with pytest.raises(InvalidToken, match="expired"):
        lenient.verify(expired)  # an exp, when present, is still checked
    assert lenient._cache_size == 0


def test_risk_of_other_principals_is_not_tracked(guard: Guard, tx: Transmitter, idp: DemoIssuer) -> None:
    rx = receiver(guard, tx)
    device = {"format": "iss_sub", "iss": idp.issuer, "sub": "laptop-1"}
    outcome = rx.process(tx.set(CAEP + "risk-level-change", {"principal": "DEVICE", "current_level": "HIGH"},
                                sub_id=device))
    assert outcome.status == "ignored" and "only the risk of a USER" in outcome.note
    session = {"format": "complex", "session": opaque("s-9")}
    high = {"principal": "SESSION", "current_level": "HIGH"}
    assert rx.process(tx.set(CAEP + "risk-level-change", high, sub_id=session)).status == "ignored"
    strict = receiver(guard, tx, on_high_risk="report_compromise")
    outcome = strict.process(tx.set(CAEP + "risk-level-change", high, sub_id=session))
    assert [a.describe() for a in outcome.actions] == ["report_compromise(None, 's-9')"]
