"""Hostile values in trusted tokens and requests never poison the audit trail (README "Audit trail").

A token signed by a trusted key may still carry claim values no store can encode (a lone surrogate, written as a
JSON escape such as ``"\\ud800"``). The request gets its clean 401; the audit record keeps the value escaped; and a
record a store refuses anyway is escaped, then dropped and counted, never holding back the records after it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis_support
from support import WAIT, problem

from sa_middleware import Guard, Policy, StoreError, StoreUnavailable
from sa_middleware.asgi import SessionAwareMiddleware
from sa_middleware.context import RequestInfo
from sa_middleware.demo import DemoIssuer, serve_asgi
from sa_middleware.denials import Denial
from sa_middleware.guard import Admitted
from sa_middleware.operations import Operations
from sa_middleware.records import AuditRecord
from sa_middleware.stores.memory import MemoryStore

SURROGATE = "\ud800"
POLICIES = {"GET /items": Policy(), "PUT /docs/{id}": Policy(locks=["doc:{id}"])}


@pytest.fixture(scope="module")
def idp() -> DemoIssuer:
    return DemoIssuer()


async def hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello"})


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    uri = redis_support.store_uri(request.param, tmp_path)
    try:
        yield uri
    finally:
        redis_support.forget_prefix(uri)


def test_unencodable_claims_get_a_401_and_the_trail_keeps_flowing(idp: DemoIssuer, store: str) -> None:
    """Over uvicorn: a lone surrogate anywhere in the claims of a validly signed token (a claim the Guard stores or
    not) is a clean 401, never a store error; the records of those denials are written (the value escaped), and so
    is every record after them."""
    guard = Guard(store=store, keys=idp.public_pem, algorithms=["RS256"], issuer=idp.issuer, audience=idp.audience,
                  policies=POLICIES)
    base, stop = serve_asgi(SessionAwareMiddleware(hello, guard=guard))
    mark = uuid.uuid4().hex[:8]
    try:
        hostile: list[dict[str, Any]] = [
            {"sub": SURROGATE + mark}, {"sid": SURROGATE}, {"jti": SURROGATE}, {"act": {"sub": SURROGATE}},
            {"device_id": SURROGATE}, {"cnf": {"jkt": SURROGATE}}, {"scope": f"read {SURROGATE}"},
            {"acr": SURROGATE}, {"sa_kind": SURROGATE}, {"custom": {"deep": [1, {SURROGATE: "x"}]}},
        ]
        for claims in hostile:
            claims = {"sub": f"ok-{mark}", **claims}
            for path in ("/items", "/docs/7"):
                resp = httpx.request("GET" if path == "/items" else "PUT", base + path, timeout=WAIT,
                                     headers={"authorization": f"Bearer {idp.token(**claims)}"})
                problem(resp, 401, "invalid_token")
        guard.flush_audit()  # the keeper may have written some already: count what the store holds
        assert len(guard.audit(code="invalid_token", limit=100)) == len(hostile) * 2
        escaped = [r for r in guard.audit(code="invalid_token", limit=100) if r.sub == "\\ud800" + mark]
        assert len(escaped) == 2 and {r.route for r in escaped} == {"GET /items", "PUT /docs/{id}"}
        # later batches arrive, and an admission still works
        problem(httpx.get(base + "/items", timeout=WAIT), 401, "missing_token")
        problem(httpx.get(base + f"/nowhere/{mark}%ED%A0%80", timeout=WAIT), 401, "missing_token")
        guard.flush_audit()
        assert len(guard.audit(code="missing_token", limit=100)) == 2
        routes = [r.route for r in guard.audit(code="missing_token", limit=100)]
        assert "GET /items" in routes and any(r and r.startswith(f"/nowhere/{mark}") for r in routes)
        ok = httpx.put(base + "/docs/7", timeout=WAIT, headers={"authorization": f"Bearer {idp.token(f'ok-{mark}')}"})
        assert ok.status_code == 200 and ok.text == "hello"
        guard.flush_audit()
        assert len(guard.audit(limit=100)) == len(hostile) * 2 + 2  # an admission writes no record
    finally:
        stop()
        guard.close()


def test_every_text_of_a_record_is_kept_encodable() -> None:
    record = AuditRecord("denial", "invalid_token", "middleware", "a\ud800b", "s\udfff", "/r\udc80", "d\ud83d")
    assert (record.sub, record.session_id, record.route, record.detail) == ("a\\ud800b", "s\\udfff", "/r\\udc80",
                                                                            "d\\ud83d")
    fine = AuditRecord("denial", "invalid_token", "middleware", "zoë \u202e 😀")
    assert fine.sub == "zoë \u202e 😀"  # encodable text is kept as it is (the CLI escapes it for display)


class PickyStore(MemoryStore):
    """A memory store that refuses (StoreError, not StoreUnavailable) any batch holding non-ASCII text or a record
    whose code is ``poison``."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[AuditRecord]] = []

    def record_audit(self, records: Sequence[AuditRecord]) -> None:
        self.batches.append(list(records))
        for r in records:
            if r.code == "poison" or not all(t is None or t.isascii() for t in (r.sub, r.route, r.detail)):
                raise StoreError(f"cannot store {r.code}")
        super().record_audit(records)


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_refused_record_is_escaped_or_dropped_and_counted_never_blocking(flavour: str) -> None:
    picky = PickyStore()
    ops = Operations(picky)

    def flush() -> int:
        return ops.flush_audit() if flavour == "sync" else anyio.run(ops.aflush_audit)

    def note(code: str, sub: str = "alice") -> None:
        ops._buffer(AuditRecord("denial", code, "middleware", sub, None, "GET /x", "detail"))

    note("first")
    note("bidi", "mallory\u202e")
    note("poison")
    note("after")
    assert flush() == 4  # first, bidi (escaped), after and audit_dropped: the poison record is dropped
    written = {r.code: r for r in picky.audit(limit=100)}
    assert written["bidi"].sub == "mallory\\u202e"
    assert written["first"].sub == "alice" and "after" in written and "poison" not in written
    [dropped] = [r for r in picky.audit(limit=100) if r.code == "audit_dropped"]
    assert dropped.detail.startswith("1 audit record dropped: the store refused it, even escaped")
    note("later")
    assert flush() == 1 and picky.audit(code="later")  # the next batch is not held back
    assert len(picky.batches[-1]) == 1


def test_a_bad_record_alone_waits_for_others_to_tell_it_from_a_failing_store() -> None:
    picky = PickyStore()
    ops = Operations(picky)
    ops._buffer(AuditRecord("denial", "poison", "middleware", "alice"))
    assert ops.flush_audit() == 0 and len(ops._audit) == 1  # kept: it might be the store that fails
    ops._buffer(AuditRecord("denial", "fine", "middleware", "bob"))
    assert ops.flush_audit() == 2  # fine, and the audit_dropped record: now the poison is known to be bad
    assert {r.code for r in picky.audit(limit=10)} == {"fine", "audit_dropped"} and len(ops._audit) == 0


def test_a_store_that_refuses_everything_keeps_every_record_at_a_bounded_cost() -> None:
    """A store failing with a plain StoreError (a Redis out of memory) is not a store full of bad records: nothing
    is dropped, and a flush tries at most a handful of writes."""
    class FullStore(PickyStore):
        full = True

        def record_audit(self, records: Sequence[AuditRecord]) -> None:
            self.batches.append(list(records))
            if self.full:
                raise StoreError("OOM command not allowed when used memory > 'maxmemory'")
            MemoryStore.record_audit(self, records)

    store = FullStore()
    ops = Operations(store)
    for i in range(50):
        ops._buffer(AuditRecord("denial", f"c{i}", "middleware", "alice"))
    assert ops.flush_audit() == 0
    assert len(store.batches) == 5  # the batch, escaped, then three records alone
    assert len(ops._audit) == 50
    store.full = False
    assert ops.flush_audit() == 50
    assert {r.code for r in store.audit(limit=100)} == {f"c{i}" for i in range(50)}


def test_a_store_that_is_down_keeps_every_record() -> None:
    class DownStore(MemoryStore):
        down = True

        def record_audit(self, records: Sequence[AuditRecord]) -> None:
            if self.down:
                raise StoreUnavailable("down")
            super().record_audit(records)

    store = DownStore()
    ops = Operations(store)
    for i in range(5):
        ops._buffer(AuditRecord("denial", f"c{i}", "middleware", "a\ud800"))
    assert ops.flush_audit() == 0
    store.down = False
    assert ops.flush_audit() == 5
    assert {r.code for r in store.audit(limit=10)} == {f"c{i}" for i in range(5)}


def test_an_unencodable_user_agent_is_escaped_never_a_store_failure(idp: DemoIssuer, store: str) -> None:
    """A user agent no store can encode (a custom adapter's RequestInfo built from JSON) is escaped: the admission
    is decided on the store's state, never turned into a store failure that a fail_open route would admit."""
    guard = Guard(store=store, keys=idp.public_pem, algorithms=["RS256"], issuer=idp.issuer, audience=idp.audience,
                  policies={"PUT /docs/{id}": Policy(max_sessions=1, locks=["doc:{id}"], fail_open=True)})
    who = f"ua-{uuid.uuid4().hex[:8]}"
    try:
        def admit(sid: str) -> Any:
            return guard.admit(RequestInfo(method="PUT", path="/docs/1", headers={
                "authorization": f"Bearer {idp.token(who, sid=sid)}", "user-agent": f"agent{SURROGATE}"}))

        first = admit("s1")
        assert isinstance(first, Admitted) and first.ticket is not None
        guard.release(first.ticket)
        second = admit("s2")
        assert isinstance(second, Denial) and second.code == "too_many_sessions"
        assert [s.user_agent for s in guard.sessions(who)] == ["agent\\ud800"]
    finally:
        guard.close()
