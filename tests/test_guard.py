"""Tests for sa_middleware.guard: the decision flow with real tokens and a memory store."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from sa_middleware import Admitted, ConfigurationError, Denial, Guard, Policy, RequestInfo, StoreUnavailable
from sa_middleware.guard import Outcome
from sa_middleware.records import Admission, LockRequest, Ticket
from sa_middleware.stores.memory import MemoryStore
from sa_middleware.tokens import generate_rsa_key, mint_token

ISS = "https://idp.example"
AUD = "payments-api"
KEY, PUBLIC_PEM = generate_rsa_key()
OTHER_KEY, _ = generate_rsa_key()

POLICIES: dict[str, Policy] = {
    "GET /health": Policy(public=True),
    "GET /items": Policy(),
    "GET /open": Policy(fail_open=True),
    "POST /pay/{id:int}": Policy(locks=["pay:{id}"]),
    "POST /wait/{id:int}": Policy(locks=["pay:{id}"], on_lock_conflict="wait", lock_wait=30),
    "POST /brief-wait/{id:int}": Policy(locks=["pay:{id}"], on_lock_conflict="wait", lock_wait=0.05),
    "POST /once": Policy(one_time=True),
    "POST /admin": Policy(scopes={"admin"}),
    "POST /mfa": Policy(max_auth_age=300, acr_values=["urn:example:mfa"]),
    "POST /device": Policy(require_compliant_device=True),
    "WEBSOCKET /ws": Policy(max_in_flight=1),
}


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {"sub": "alice", "iat": now - 60, "exp": now + 600, "iss": ISS, "aud": AUD}
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def token(key: Any = KEY, **overrides: Any) -> str:
    return mint_token(key, "RS256", claims(**overrides))


def request(method: str, path: str, bearer: str | None = None, *, client: str = "10.0.0.1", ua: str = "pytest",
            authorization: str | None = None, websocket: bool = False) -> RequestInfo:
    headers = {"user-agent": ua}
    if bearer is not None:
        headers["authorization"] = f"Bearer {bearer}"
    if authorization is not None:
        headers["authorization"] = authorization
    return RequestInfo(method, path, headers, client, websocket)


class SpyStore(MemoryStore):
    """A memory store that records every admission and its outcome, and can be told to fail."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Admission, Ticket | Denial]] = []
        self.fail_with: BaseException | None = None
        self.fail_release: BaseException | None = None
        self.locked_seen = threading.Event()

    def admit(self, admission: Admission) -> Ticket | Denial:
        if self.fail_with is not None:
            raise self.fail_with
        result = super().admit(admission)
        self.calls.append((admission, result))
        if isinstance(result, Denial) and result.code == "object_locked":
            self.locked_seen.set()
        return result

    def release(self, ticket: Ticket) -> None:
        if self.fail_release is not None:
            raise self.fail_release
        super().release(ticket)


def make_guard(store: Any = None, **options: Any) -> Guard:
    values: dict[str, Any] = {"store": store if store is not None else MemoryStore(), "keys": PUBLIC_PEM,
                              "algorithms": ["RS256"], "issuer": ISS, "audience": AUD, "policies": POLICIES}
    values.update(options)
    return Guard(**values)


@pytest.fixture
def store() -> SpyStore:
    return SpyStore()


@pytest.fixture
def guard(store: SpyStore, request: pytest.FixtureRequest) -> Iterator[Guard]:
    g = make_guard(store, **getattr(request, "param", {}))
    try:
        yield g
    finally:
        g.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def admitted(outcome: Outcome) -> Admitted:
    assert isinstance(outcome, Admitted), f"expected admission, got {outcome!r}"
    return outcome


def denied(outcome: Outcome, code: str) -> Denial:
    assert isinstance(outcome, Denial), f"expected {code}, got {outcome!r}"
    assert outcome.code == code, f"expected {code}, got {outcome.code}: {outcome.detail}"
    return outcome


# ---------------------------------------------------------------------------------------------------- tokens


def test_public_route_needs_no_token_and_records_nothing(guard: Guard, store: SpyStore) -> None:
    result = admitted(guard.admit(request("GET", "/health")))
    assert result.ticket is None
    assert (result.context.principal, result.context.kind, result.context.session_id) == (None, None, None)
    assert result.context.route == "GET /health"
    admitted(guard.admit(request("GET", "/health", "not-a-token")))
    admitted(guard.admit(request("HEAD", "/health")))
    assert store.calls == []


def test_missing_token(guard: Guard, store: SpyStore) -> None:
    denied(guard.admit(request("GET", "/items")), "missing_token")
    denied(guard.admit(request("GET", "/items", authorization="Basic YWxpY2U6c2VjcmV0")), "missing_token")
    denied(guard.admit(request("GET", "/unrouted")), "missing_token")  # the default policy needs a token too
    assert store.calls == []


@pytest.mark.parametrize("authorization", ["Bearer", "Bearer    ", "bearer "])
def test_empty_bearer_is_invalid(guard: Guard, authorization: str) -> None:
    denied(guard.admit(request("GET", "/items", authorization=authorization)), "invalid_token")


def test_bearer_scheme_is_case_insensitive(guard: Guard) -> None:
    admitted(guard.admit(request("GET", "/items", authorization=f"bearer {token()}")))


@pytest.mark.parametrize(
    "bad",
    [
        "garbage",
        "a.b.c",
        token(OTHER_KEY),
        token(exp=int(time.time()) - 3600, iat=int(time.time()) - 7200),
        token(aud="another-api"),
        token(iss="https://evil.example"),
        mint_token(b"s" * 32, "HS256", claims()),
    ],
    ids=["garbage", "segments", "other-key", "expired", "audience", "issuer", "hs256"],
)
def test_invalid_token(guard: Guard, store: SpyStore, bad: str) -> None:
    denial = denied(guard.admit(request("GET", "/items", bad)), "invalid_token")
    assert bad not in denial.detail
    assert store.calls == []


def test_admitted_context(guard: Guard) -> None:
    raw = token(sid="sess-1", scope="read write")
    result = admitted(guard.admit(request("POST", "/pay/42", raw)))
    ctx = result.context
    assert result.ticket is not None
    assert (ctx.principal, ctx.kind, ctx.session_id) == ("alice", "human", "sess-1")
    assert ctx.claims["scope"] == "read write"
    assert ctx.ticket_id == result.ticket.ticket_id
    assert ctx.route == "POST /pay/{id:int}"
    assert ctx.params == {"id": 42}
    assert set(ctx.fencing_tokens) == {"pay:42"}
    assert ctx.fencing_tokens == result.ticket.fencing_tokens
    assert [lock.key for lock in guard.locks()] == ["pay:42"]
    guard.release(result.ticket)
    assert guard.locks() == []


def test_websocket_requests_match_websocket_routes(guard: Guard) -> None:
    result = admitted(guard.admit(request("GET", "/ws", token(), websocket=True)))
    assert result.context.route == "WEBSOCKET /ws"
    denied(guard.admit(request("GET", "/ws", token(sid="other"), websocket=True)), "too_many_in_flight")


# ---------------------------------------------------------------------------------------------------- kind, session id


@pytest.mark.parametrize(
    ("extra", "kind"),
    [
        ({}, "human"),
        ({"sa_kind": "agent"}, "agent"),
        ({"sa_kind": "service"}, "service"),
        ({"sa_kind": "human", "client_id": "alice"}, "human"),
        ({"client_id": "alice"}, "service"),
        ({"azp": "alice"}, "service"),
        ({"client_id": "web-app"}, "human"),
        ({"azp": "web-app"}, "human"),
    ],
)
def test_kind_derivation(guard: Guard, extra: dict[str, Any], kind: str) -> None:
    result = admitted(guard.admit(request("GET", "/items", token(**extra))))
    assert result.context.kind == kind
    (session,) = guard.sessions("alice")
    assert session.kind == kind


@pytest.mark.parametrize("value", ["robot", 3, "", ["agent"], {"kind": "agent"}, True],
                         ids=["robot", "int", "empty", "list", "dict", "bool"])
def test_bad_kind_is_invalid_token(guard: Guard, value: Any) -> None:
    denied(guard.admit(request("GET", "/items", token(sa_kind=value))), "invalid_token")


def test_a_kind_rule_that_raises_refuses_the_request_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    def broken(claims: Any) -> str | None:
        return str(claims["no such claim"])  # KeyError for every token

    g = make_guard(kind_rules=[broken])
    try:
        with caplog.at_level("ERROR", logger="sa_middleware"):
            denial = denied(g.admit(request("GET", "/items", token())), "invalid_token")
        assert denial.detail == "the principal's kind could not be decided"
        assert "a kind rule raised" in caplog.text
        ok = admitted(g.admit(request("GET", "/items", token(sa_kind="agent"))))  # the kind claim needs no rule
        assert ok.context.kind == "agent"
    finally:
        g.close()


def test_custom_kind_claim() -> None:
    g = make_guard(kind_claim="principal_type")
    try:
        assert admitted(g.admit(request("GET", "/items", token(principal_type="agent")))).context.kind == "agent"
        assert admitted(g.admit(request("GET", "/items", token(sa_kind="agent")))).context.kind == "human"
    finally:
        g.close()


def test_session_id_from_sid_then_jti_then_token_hash(guard: Guard) -> None:
    assert admitted(guard.admit(request("GET", "/items", token(sid="s-1", jti="j-1")))).context.session_id == "s-1"
    assert admitted(guard.admit(request("GET", "/items", token(jti="j-2")))).context.session_id == "j-2"
    raw = token(nonce="unique")
    expected = hashlib.sha256(raw.encode()).hexdigest()[:32]
    assert admitted(guard.admit(request("GET", "/items", raw))).context.session_id == expected
    assert {s.session_id for s in guard.sessions("alice")} == {"s-1", "j-2", expected}


@pytest.mark.parametrize("extra", [{"sid": 7}, {"sid": ""}, {"sid": "x" * 300}, {"jti": 5}, {"sub": "y" * 300},
                                   {"act": {"sub": 5}}, {"cnf": {"jkt": ["k"]}}])
def test_bad_identifier_claims_are_invalid_token(guard: Guard, extra: dict[str, Any]) -> None:
    denied(guard.admit(request("GET", "/items", token(**extra))), "invalid_token")


@pytest.mark.parametrize("gen", ["1", -1, True, 1.5])
def test_bad_generation_claim_is_invalid_token(guard: Guard, gen: Any) -> None:
    denied(guard.admit(request("GET", "/items", token(gen=gen))), "invalid_token")


def test_generation_claim_drives_the_ratchet(guard: Guard) -> None:
    admitted(guard.admit(request("GET", "/items", token(gen=2, sid="s-2"))))
    denied(guard.admit(request("GET", "/items", token(gen=1, sid="s-1"))), "stale_generation")
    denied(guard.admit(request("GET", "/items", token(sid="s-0"))), "stale_generation")


def test_custom_generation_claim() -> None:
    g = make_guard(generation_claim="ver")
    try:
        admitted(g.admit(request("GET", "/items", token(ver=3, sid="s-3"))))
        denied(g.admit(request("GET", "/items", token(ver=2, sid="s-2"))), "stale_generation")
        denied(g.admit(request("GET", "/items", token(gen=9, sid="s-9"))), "stale_generation")  # not read
    finally:
        g.close()


def test_one_time_route_needs_jti(guard: Guard, store: SpyStore) -> None:
    denied(guard.admit(request("POST", "/once", token(sid="s-1"))), "invalid_token")
    assert store.calls == []
    raw = token(jti="once-1")
    admitted(guard.admit(request("POST", "/once", raw)))
    denied(guard.admit(request("POST", "/once", raw)), "token_replayed")
    admitted(guard.admit(request("POST", "/once", token(jti="once-2"))))


def test_token_reuse_from_another_client(guard: Guard) -> None:
    raw = token(sid="s-1")
    held = admitted(guard.admit(request("GET", "/items", raw, client="10.0.0.1", ua="app/1")))
    denied(guard.admit(request("GET", "/items", raw, client="10.6.6.6", ua="app/1")), "token_reuse")
    denied(guard.admit(request("GET", "/items", raw, client="10.0.0.1", ua="curl/8")), "token_reuse")
    admitted(guard.admit(request("GET", "/items", raw, client="10.0.0.1", ua="app/1")))
    guard.release(held.ticket)


# ------------------------------------------------------------------------------------------ claims -> admission


# sender_constraint="upstream": cnf as a relation only
@pytest.mark.parametrize("guard", [{"sender_constraint": "upstream", "lease": 17, "session_idle": 333,
                                    "audit_admissions": True}], indirect=True)
def test_claims_feed_the_admission(guard: Guard, store: SpyStore) -> None:
    now = int(time.time())
    raw = token(sid="s-1", jti="j-1", gen=4, scp=["a", "b"], auth_time=now - 5, acr="urn:example:mfa",
                device_id="dev-1", act={"sub": "agent-7"}, cnf={"jkt": "thumb"})
    admitted(guard.admit(request("POST", "/mfa", raw, client="10.1.1.1", ua="ua/1")))
    a = store.calls[-1][0]
    assert (a.sub, a.kind, a.session_id, a.jti, a.token_gen) == ("alice", "human", "s-1", "j-1", 4)
    assert a.token_scopes == frozenset({"a", "b"})
    assert (a.auth_time, a.acr, a.device, a.actor, a.credential) == (now - 5, "urn:example:mfa", "dev-1",
                                                                     "agent-7", "thumb")
    assert a.token_hash == hashlib.sha256(raw.encode()).hexdigest()
    assert a.token_iat == now - 60 and a.token_exp == now + 600 + guard.leeway  # accepted until exp + leeway
    assert a.client == "10.1.1.1" and a.user_agent == "ua/1"
    assert (a.policy.max_auth_age, a.policy.acr_values) == (300, ("urn:example:mfa",))
    assert a.route == "POST /mfa" and a.iss == ISS and a.locks == ()
    assert (a.lease, a.session_idle, a.audit_admitted, a.audit_locked) == (17.0, 333.0, True, True)
    assert len(a.ticket_id) == 32 and int(a.ticket_id, 16) >= 0
    admitted(guard.admit(request("POST", "/wait/7", raw, client="10.1.1.1", ua="ua/1")))
    a = store.calls[-1][0]
    assert a.locks == (LockRequest("pay:7", "exclusive"),) and a.route == "POST /wait/{id:int}"
    assert (a.audit_admitted, a.audit_locked) == (True, False)  # the Guard records a lock wait's last refusal


def test_scope_string_claim(guard: Guard) -> None:
    admitted(guard.admit(request("POST", "/admin", token(scope="read admin"))))
    denied(guard.admit(request("POST", "/admin", token(scope="read", sid="s-2"))), "insufficient_scope")


def test_insufficient_scope_denial_names_the_scope(guard: Guard) -> None:
    denial = denied(guard.admit(request("POST", "/admin", token())), "insufficient_scope")
    assert denial.scope == ("admin",)


def test_step_up_denial_carries_max_age_and_acr_values(guard: Guard) -> None:
    now = int(time.time())
    denial = denied(guard.admit(request("POST", "/mfa", token(auth_time=now - 3600, acr="urn:example:mfa"))),
                    "step_up_required")
    assert (denial.max_age, denial.acr_values) == (300, ("urn:example:mfa",))
    denied(guard.admit(request("POST", "/mfa", token(auth_time=now, acr="urn:example:pwd"))), "step_up_required")
    admitted(guard.admit(request("POST", "/mfa", token(auth_time=now, acr="urn:example:mfa"))))


def test_custom_device_claim() -> None:
    g = make_guard(device_claim="did")
    try:
        g.set_device_status("dev-1", False)
        denied(g.admit(request("POST", "/device", token(did="dev-1"))), "device_noncompliant")
        denied(g.admit(request("POST", "/device", token(device_id="dev-2"))), "device_noncompliant")  # no device
    finally:
        g.close()


@pytest.mark.parametrize("guard", [{"sender_constraint": "upstream"}], indirect=True)  # cnf as a relation only
def test_compromise_reaches_actor_and_credential_contexts(guard: Guard) -> None:
    fresh = int(time.time()) + 5
    admitted(guard.admit(request("GET", "/items", token(sub="bob", sid="bob-agent", act={"sub": "agent-7"}))))
    admitted(guard.admit(request("GET", "/items", token(sub="bob", sid="bob-own"))))
    admitted(guard.admit(request("GET", "/items", token(sub="carol", sid="carol-1", cnf={"jkt": "K1"}))))
    admitted(guard.admit(request("GET", "/items", token(sub="dan", sid="dan-1", cnf={"jkt": "K1"}))))
    assert set(guard.report_compromise(sub="agent-7")) == {"bob-agent"}
    denied(guard.admit(request("GET", "/items", token(sub="bob", sid="bob-agent", act={"sub": "agent-7"}))),
           "credential_compromised")
    admitted(guard.admit(request("GET", "/items", token(sub="bob", sid="bob-own"))))
    assert set(guard.report_compromise(sub="carol")) == {"carol-1", "dan-1"}
    denied(guard.admit(request("GET", "/items", token(sub="dan", sid="dan-1", cnf={"jkt": "K1"}))),
           "credential_compromised")
    admitted(guard.admit(request("GET", "/items", token(sub="dan", sid="dan-1", cnf={"jkt": "K1"}, iat=fresh))))


# ---------------------------------------------------------------------------------------------------- lock waiting


def _release_when_locked(guard: Guard, store: SpyStore, ticket: Ticket | None) -> threading.Thread:
    def run() -> None:
        if store.locked_seen.wait(timeout=30):
            guard.release(ticket)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_lock_wait_admits_once_the_holder_releases(guard: Guard, store: SpyStore) -> None:
    holder = admitted(guard.admit(request("POST", "/pay/1", token(sub="bob", sid="bob-1"))))
    thread = _release_when_locked(guard, store, holder.ticket)
    result = admitted(guard.admit(request("POST", "/wait/1", token(sid="alice-1"))))
    thread.join()
    waiter = [outcome for a, outcome in store.calls if a.sub == "alice"]
    assert isinstance(waiter[0], Denial) and waiter[0].code == "object_locked"
    assert isinstance(waiter[-1], Ticket)
    assert holder.ticket is not None
    assert result.context.fencing_tokens["pay:1"] > holder.ticket.fencing_tokens["pay:1"]


@pytest.mark.anyio
async def test_async_lock_wait_admits_once_the_holder_releases(guard: Guard, store: SpyStore) -> None:
    holder = admitted(await guard.aadmit(request("POST", "/pay/1", token(sub="bob", sid="bob-1"))))
    thread = _release_when_locked(guard, store, holder.ticket)
    result = admitted(await guard.aadmit(request("POST", "/wait/1", token(sid="alice-1"))))
    thread.join()
    assert any(isinstance(o, Denial) and a.sub == "alice" for a, o in store.calls)
    assert set(result.context.fencing_tokens) == {"pay:1"}


def test_lock_wait_times_out_to_object_locked(guard: Guard, store: SpyStore) -> None:
    admitted(guard.admit(request("POST", "/pay/1", token(sub="bob", sid="bob-1"))))
    denial = denied(guard.admit(request("POST", "/brief-wait/1", token(sid="alice-1"))), "object_locked")
    assert denial.retry_after is not None
    assert len([a for a, _ in store.calls if a.sub == "alice"]) >= 2  # it did retry


@pytest.mark.anyio
async def test_async_lock_wait_times_out_to_object_locked(guard: Guard) -> None:
    admitted(await guard.aadmit(request("POST", "/pay/1", token(sub="bob", sid="bob-1"))))
    denied(await guard.aadmit(request("POST", "/brief-wait/1", token(sid="alice-1"))), "object_locked")


def test_reject_does_not_wait(guard: Guard, store: SpyStore) -> None:
    admitted(guard.admit(request("POST", "/pay/1", token(sub="bob", sid="bob-1"))))
    denied(guard.admit(request("POST", "/pay/1", token(sid="alice-1"))), "object_locked")
    assert len([a for a, _ in store.calls if a.sub == "alice"]) == 1


# ---------------------------------------------------------------------------------------------------- store failures


def test_fail_open_admits_when_the_store_is_unavailable(guard: Guard, store: SpyStore) -> None:
    store.fail_with = StoreUnavailable("timed out")
    result = admitted(guard.admit(request("GET", "/open", token(sid="s-1"))))
    assert result.ticket is None
    assert (result.context.principal, result.context.session_id) == ("alice", "s-1")
    assert result.context.ticket_id is None
    guard.release(result.ticket)


def test_fail_closed_gives_store_unavailable_with_retry_after() -> None:
    store = SpyStore()
    store.fail_with = StoreUnavailable("timed out")
    g = make_guard(store, retry_after=7)
    try:
        denial = denied(g.admit(request("GET", "/items", token())), "store_unavailable")
        assert denial.retry_after == 7
        # token problems are still reported as such
        denied(g.admit(request("GET", "/items", "garbage")), "invalid_token")
        denied(g.admit(request("GET", "/items")), "missing_token")
    finally:
        g.close()


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyError("x"), ValueError("x"), OSError("disk")])
def test_unexpected_store_exception_gives_store_unavailable(guard: Guard, store: SpyStore, exc: Exception) -> None:
    store.fail_with = exc
    denial = denied(guard.admit(request("GET", "/items", token())), "store_unavailable")
    assert denial.retry_after == 1


@pytest.mark.anyio
@pytest.mark.parametrize("exc", [StoreUnavailable("down"), RuntimeError("boom")])
async def test_async_store_failures(guard: Guard, store: SpyStore, exc: Exception) -> None:
    store.fail_with = exc
    denied(await guard.aadmit(request("GET", "/items", token())), "store_unavailable")
    outcome = await guard.aadmit(request("GET", "/open", token()))
    if isinstance(exc, StoreUnavailable):  # fail_open admits only when the store is unreachable
        assert admitted(outcome).ticket is None
    else:  # an unexpected failure (a bug, bad data) never fails open
        denied(outcome, "store_unavailable")


RELEASE_FAILURES = [StoreUnavailable("down"), RuntimeError("boom")]


@pytest.mark.parametrize("exc", RELEASE_FAILURES)
def test_release_failure_is_swallowed(guard: Guard, store: SpyStore, exc: Exception) -> None:
    result = admitted(guard.admit(request("GET", "/items", token())))
    store.fail_release = exc
    guard.release(result.ticket)
    guard.release(None)


@pytest.mark.anyio
@pytest.mark.parametrize("exc", RELEASE_FAILURES)
async def test_async_release_failure_is_swallowed(guard: Guard, store: SpyStore, exc: Exception) -> None:
    result = admitted(await guard.aadmit(request("GET", "/items", token())))
    store.fail_release = exc
    await guard.arelease(result.ticket)
    await guard.arelease(None)


def test_store_uri() -> None:
    g = make_guard("memory://")
    try:
        admitted(g.admit(request("GET", "/items", token())))
    finally:
        g.close()


def test_explicit_match_from_an_adapter(guard: Guard) -> None:
    match = guard.routes.resolve(Policy(locks=["doc:{id}"]), "/docs/<id>", {"id": 3})
    result = admitted(guard.admit(request("PUT", "/docs/3", token()), match))
    assert set(result.context.fencing_tokens) == {"doc:3"}
    assert result.context.route == "/docs/<id>"
    denied(guard.admit(request("PUT", "/docs/3", token(sub="bob")), match), "object_locked")


# ---------------------------------------------------------------------------------------------------- operations


@pytest.mark.anyio
@pytest.mark.parametrize("twin", [False, True], ids=["sync", "async"])
async def test_operations(guard: Guard, twin: bool) -> None:
    async def op(name: str, *args: Any, **kwargs: Any) -> Any:
        if twin:
            method: Callable[..., Awaitable[Any]] = getattr(guard, f"a{name}")
            return await method(*args, **kwargs)
        return getattr(guard, name)(*args, **kwargs)

    async def decide(path: str, raw: str, method: str = "GET") -> Outcome:
        req = request(method, path, raw)
        return await guard.aadmit(req) if twin else guard.admit(req)

    fresh = int(time.time()) + 5

    # rotate
    admitted(await decide("/items", token(sid="a-1")))
    assert await op("rotate", "alice") == 1
    denied(await decide("/items", token(sid="a-1")), "stale_generation")
    admitted(await decide("/items", token(sid="a-1", gen=1)))

    # revoke_principal
    watermark = await op("revoke_principal", "bob")
    assert watermark <= time.time()
    denied(await decide("/items", token(sub="bob", sid="b-1")), "token_revoked")
    admitted(await decide("/items", token(sub="bob", sid="b-1", iat=fresh)))

    # revoke_session (also one never seen)
    assert await op("revoke_session", "a-1") is True
    denied(await decide("/items", token(sid="a-1", gen=1)), "session_revoked")
    assert await op("revoke_session", "never-seen") is False
    denied(await decide("/items", token(sub="carol", sid="never-seen")), "session_revoked")

    # pause / resume
    admitted(await decide("/items", token(sub="dan", sid="d-1")))
    assert await op("pause_session", "d-1") is True
    denied(await decide("/items", token(sub="dan", sid="d-1")), "session_paused")
    assert await op("resume_session", "d-1") is True
    result = admitted(await decide("/items", token(sub="dan", sid="d-1")))

    # sessions / locks
    sessions = await op("sessions", "dan")
    assert [(s.session_id, s.status, s.user_agent) for s in sessions] == [("d-1", "active", "pytest")]
    locked = admitted(await decide("/pay/9", token(sub="dan", sid="d-1"), "POST"))
    assert [(lock.key, lock.sub) for lock in await op("locks")] == [("pay:9", "dan")]
    if twin:
        await guard.arelease(locked.ticket)
        await guard.arelease(result.ticket)
    else:
        guard.release(locked.ticket)
        guard.release(result.ticket)
    assert await op("locks") == []

    # report_compromise by session and by principal
    admitted(await decide("/items", token(sub="erin", sid="e-1")))
    admitted(await decide("/items", token(sub="erin", sid="e-2")))
    assert set(await op("report_compromise", session_id="e-1")) == {"e-1", "e-2"}
    denied(await decide("/items", token(sub="erin", sid="e-2")), "credential_compromised")
    assert await op("resume_session", "e-2") is True
    admitted(await decide("/items", token(sub="erin", sid="e-2")))
    assert await op("report_compromise", sub="frank") == []
    denied(await decide("/items", token(sub="frank", sid="f-1")), "credential_compromised")
    admitted(await decide("/items", token(sub="frank", sid="f-1", iat=fresh)))

    # set_device_status
    await op("set_device_status", "dev-1", False)
    denied(await decide("/device", token(sub="gus", device_id="dev-1"), "POST"), "device_noncompliant")
    await op("set_device_status", "dev-1", True)
    admitted(await decide("/device", token(sub="gus", device_id="dev-1"), "POST"))

    # set_privileges (a list, a space-separated string, None)
    admitted(await decide("/admin", token(sub="hal", scope="admin read"), "POST"))
    await op("set_privileges", "hal", ["read"])
    denied(await decide("/admin", token(sub="hal", scope="admin read"), "POST"), "insufficient_scope")
    await op("set_privileges", "hal", "read admin")
    admitted(await decide("/admin", token(sub="hal", scope="admin read"), "POST"))
    await op("set_privileges", "hal", None)
    admitted(await decide("/admin", token(sub="hal", scope="admin"), "POST"))


@pytest.mark.anyio
@pytest.mark.parametrize("twin", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("rotate", ("",)),
        ("rotate", (None,)),
        ("revoke_principal", ("x" * 300,)),
        ("revoke_session", ("",)),
        ("pause_session", (5,)),
        ("resume_session", ("",)),
        ("set_device_status", ("", True)),
        ("set_privileges", ("", ["a"])),
        ("set_privileges", ("alice", [""])),
        ("set_privileges", ("alice", [1])),
        ("sessions", ("",)),
        ("report_compromise", ()),
        ("report_compromise", (None, None)),
        ("report_compromise", ("",)),
        ("report_compromise", (None, "")),
    ],
)
async def test_operation_arguments_are_validated(guard: Guard, twin: bool, name: str, args: tuple[Any, ...]) -> None:
    with pytest.raises(ConfigurationError):
        if twin:
            await getattr(guard, f"a{name}")(*args)
        else:
            getattr(guard, name)(*args)


# ---------------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "options",
    [
        {"session_idle": 0},
        {"session_idle": -5},
        {"session_idle": True},
        {"session_idle": "900"},
        {"lease": 0},
        {"lease": "30"},
        {"lease": float("inf")},
        {"session_idle": float("nan")},
        {"retry_after": 0},
        {"retry_after": 1.5},
        {"retry_after": True},
        {"realm": 'a"b'},
        {"realm": "a\\b"},
        {"algorithms": ["none"]},
        {"algorithms": []},
        {"store": "nope"},
        {"store": "ftp://host/db"},
        {"store": 42},
        {"policies": {"GETT /x": Policy()}},
        {"policies": {"GET /x": {"public": "yes"}}},
        {"policies": {"GET /x": ["public"]}},
        {"default_policy": {"max_session": 1}},
        {"keys": None},
    ],
    ids=lambda options: next(iter(options)),
)
def test_bad_guard_options(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        make_guard(**options)


def test_good_guard_options() -> None:
    g = make_guard(session_idle=60, lease=5.5, retry_after=3, realm="payments")
    try:
        assert (g.session_idle, g.lease, g.retry_after, g.realm) == (60.0, 5.5, 3, "payments")
    finally:
        g.close()


def test_invalid_route_policy_fails_at_guard_naming_route_and_field() -> None:
    with pytest.raises(ConfigurationError) as info:
        make_guard(policies={"POST /payments/{id}/approve": Policy(exclusive=True, max_risk=-1)})
    assert "'POST /payments/{id}/approve'" in str(info.value)
    assert "max_risk" in str(info.value)


@pytest.mark.parametrize("claims", [{"device_id": "\ud800"}, {"sid": "a\udfffb"}, {"act": {"sub": "\ud83d"}}],
                         ids=["device", "sid", "actor"])
def test_claim_strings_that_cannot_be_stored_are_invalid_token(guard: Guard, claims: dict[str, Any]) -> None:
    denied(guard.admit(request("GET", "/open", token(**claims))), "invalid_token")  # never a fail_open admit


@pytest.mark.parametrize("auth_time", [10**400, "yesterday", float(2**62)], ids=["huge", "string", "future"])
def test_bad_auth_time_is_invalid_token(guard: Guard, auth_time: Any) -> None:
    denied(guard.admit(request("POST", "/mfa", token(auth_time=auth_time, acr="urn:example:mfa"))),
           "invalid_token")


@pytest.mark.parametrize("uri", ["redis://[::1", "sqlite:///x.db?audit_retention=soon", "nosuch://x"])
def test_a_store_uri_that_does_not_parse_is_a_configuration_error(uri: str) -> None:
    with pytest.raises(ConfigurationError):
        make_guard(uri)


# ---------------------------------------------------------------------------- the issuer's keys, session keys


def test_unavailable_signing_keys_are_a_503_and_never_fail_open() -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/jwks.json"
    guard = Guard(store="memory://", jwks_url=url, algorithms=["RS256"], issuer=ISS, audience=AUD,
                  default_policy=Policy(fail_open=True), retry_after=2)
    try:
        for _ in range(2):  # the first fetches (and fails); the second is within the retry delay
            outcome = guard.admit(request("GET", "/x", mint_token(KEY, "RS256", claims(), {"kid": "k1"})))
            assert isinstance(outcome, Denial) and outcome.code == "keys_unavailable"
            assert outcome.status == 503 and outcome.retry_after == 2
    finally:
        guard.close()


def test_session_claim_makes_one_session_per_client() -> None:
    guard = Guard(store="memory://", keys=PUBLIC_PEM, algorithms=["RS256"], issuer=ISS, audience=AUD,
                  default_policy=Policy(max_sessions=1), session_claim=("sid", "client_id", "jti"))
    try:
        for i in range(3):  # renewals, replicas: a new jti each time, one client
            outcome = guard.admit(request("GET", "/x", token(sub="svc", client_id="svc", jti=f"j{i}")))
            assert isinstance(outcome, Admitted), outcome
            assert outcome.context.session_id == "svc/client_id:svc" and outcome.context.kind == "service"
            guard.release(outcome.ticket)
        outcome = guard.admit(request("GET", "/x", token(sub="alice", sid="browser-1")))
        assert isinstance(outcome, Admitted) and outcome.context.session_id == "browser-1"
        guard.release(outcome.ticket)
        with pytest.raises(ConfigurationError):
            Guard(store="memory://", keys=PUBLIC_PEM, algorithms=["RS256"], session_claim=[""])
    finally:
        guard.close()


def test_session_claim_per_kind_leaves_humans_their_sessions() -> None:
    guard = Guard(store="memory://", keys=PUBLIC_PEM, algorithms=["RS256"], issuer=ISS, audience=AUD,
                  default_policy=Policy(max_sessions=1), session_claim={"service": ("client_id", "jti")})
    try:
        for i in range(2):
            outcome = guard.admit(request("GET", "/x", token(sub="svc", client_id="svc", jti=f"j{i}")))
            assert isinstance(outcome, Admitted) and outcome.context.session_id == "svc/client_id:svc"
            guard.release(outcome.ticket)
        outcome = guard.admit(request("GET", "/x", token(sub="alice", client_id="web", jti="a1")))
        assert isinstance(outcome, Admitted) and outcome.context.session_id == "a1"
        guard.release(outcome.ticket)
        refused = guard.admit(request("GET", "/x", token(sub="alice", client_id="web", jti="a2")))
        assert isinstance(refused, Denial) and refused.code == "too_many_sessions"
        with pytest.raises(ConfigurationError, match="kinds"):
            Guard(store="memory://", keys=PUBLIC_PEM, algorithms=["RS256"], session_claim={"robot": "azp"})
    finally:
        guard.close()


def test_drop_key_acts_here_at_once_and_in_other_guards_on_the_store(tmp_path: Any) -> None:
    import anyio

    store = f"sqlite:///{tmp_path / 'keys.db'}"
    options: dict[str, Any] = {"store": store, "keys": {"k1": PUBLIC_PEM, "k2": PUBLIC_PEM}, "algorithms": ["RS256"],
                               "issuer": ISS, "audience": AUD}
    here, there = Guard(**options), Guard(**options)
    try:
        tok1, tok2 = (mint_token(KEY, "RS256", claims(), {"kid": kid}) for kid in ("k1", "k2"))
        for guard in (here, there):
            assert isinstance(guard.admit(request("GET", "/x", tok1)), Admitted)  # verified, cached
        here.drop_key("k1")
        refused = here.admit(request("GET", "/x", tok1))
        assert isinstance(refused, Denial) and refused.detail == "signing key withdrawn"
        there._apply_key_notes()  # what its keeper does every 2 s (it may have done so already)
        assert isinstance(there.admit(request("GET", "/x", tok1)), Denial)
        anyio.run(lambda: here.adrop_key("k2"))
        assert isinstance(here.admit(request("GET", "/x", tok2)), Denial)
        with pytest.raises(ConfigurationError):
            here.drop_key("no spaces")
        assert [r.detail for r in here.audit(code="drop_key")] == ["signing key k2 dropped", "signing key k1 dropped"]
    finally:
        here.close()
        there.close()
