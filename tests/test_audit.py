"""The audit trail through the Guard (README "Audit trail"): what is recorded where, the in-process buffer for the
denials decided before the store, the keeper's flush, retention, options, and the one-round-trip hot path.

The store side (what an admission records, the query, retention) is the conformance suite's
``tests/stores/test_conformance_audit.py``; the command line is ``tests/test_cli_operator.py``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from sa_middleware import Admitted, ConfigurationError, Denial, Guard, Policy, RequestInfo, StoreUnavailable
from sa_middleware.demo import DemoIssuer
from sa_middleware.events import SSFReceiver
from sa_middleware.guard import Outcome
from sa_middleware.operations import Operations
from sa_middleware.records import Admission, AuditRecord, Ticket
from sa_middleware.stores import open_store
from sa_middleware.stores.memory import MemoryStore
from sa_middleware.stores.sqlite import SQLiteStore
from sa_middleware.tokens import generate_rsa_key, mint_token

POLICIES: dict[str, Policy] = {
    "GET /items": Policy(),
    "GET /open": Policy(fail_open=True),
    "GET /public": Policy(public=True),
    "POST /pay/{id}": Policy(locks=["pay:{id}"]),
    "POST /wait/{id}": Policy(locks=["pay:{id}"], on_lock_conflict="wait", lock_wait=0.1),
    "GET /one": Policy(max_sessions=1, on_session_limit="evict_oldest"),
}


class SpyStore(MemoryStore):
    """A memory store that counts every call the Guard makes, signals audit writes, and can be told to fail."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.written: list[list[AuditRecord]] = []
        self.audit_written = threading.Event()
        self.fail_admit: BaseException | None = None
        self.fail_audit: BaseException | None = None

    def admit(self, admission: Admission) -> Ticket | Denial:
        self.calls.append("admit")
        if self.fail_admit is not None:
            raise self.fail_admit
        return super().admit(admission)

    def release(self, ticket: Ticket) -> None:
        self.calls.append("release")
        super().release(ticket)

    def renew(self, tickets: Sequence[Ticket], lease: float) -> None:
        self.calls.append("renew")
        super().renew(tickets, lease)

    def record_audit(self, records: Sequence[AuditRecord]) -> None:
        self.calls.append("record_audit")
        if self.fail_audit is not None:
            raise self.fail_audit
        super().record_audit(records)
        self.written.append(list(records))
        self.audit_written.set()


@pytest.fixture(scope="module")
def idp() -> DemoIssuer:
    return DemoIssuer()


@pytest.fixture
def spy() -> SpyStore:
    return SpyStore()


def make_guard(idp: DemoIssuer, store: Any, **options: Any) -> Guard:
    return Guard(store=store, keys=idp.public_pem, algorithms=["RS256"], issuer=idp.issuer, audience=idp.audience,
                 policies=POLICIES, **options)


@pytest.fixture
def guard(idp: DemoIssuer, spy: SpyStore) -> Iterator[Guard]:
    g = make_guard(idp, spy)
    try:
        yield g
    finally:
        g.close()


def request(method: str, path: str, token: str | None = None, client: str = "10.0.0.1") -> RequestInfo:
    headers = {"user-agent": "pytest"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return RequestInfo(method, path, headers, client)


def denied(outcome: Outcome, code: str) -> Denial:
    assert isinstance(outcome, Denial) and outcome.code == code, outcome
    return outcome


def admitted(outcome: Outcome) -> Admitted:
    assert isinstance(outcome, Admitted), outcome
    return outcome


def fresh() -> str:
    return f"u-{uuid.uuid4().hex[:8]}"


# ---------------------------------------------------------------------------------------------------- the hot path


def test_an_admission_is_one_store_call_and_its_denial_rides_along(idp: DemoIssuer, guard: Guard,
                                                                      spy: SpyStore) -> None:
    sub = fresh()
    outcome = admitted(guard.admit(request("GET", "/items", idp.token(sub, sid="s1"))))
    assert spy.calls == ["admit"]
    guard.release(outcome.ticket)
    guard.rotate(sub)
    spy.calls.clear()
    denied(guard.admit(request("GET", "/items", idp.token(sub, sid="s1", gen=0))), "stale_generation")
    assert spy.calls == ["admit"]  # the denial was recorded inside the admission: no second call, no buffer
    [record] = spy.audit(code="stale_generation")
    assert (record.sub, record.session_id, record.route, record.source) == (sub, "s1", "GET /items", "middleware")
    assert guard.flush_audit() == 0


def test_admissions_are_recorded_only_with_audit_admissions(idp: DemoIssuer, spy: SpyStore) -> None:
    quiet = make_guard(idp, spy)
    loud = make_guard(idp, spy, audit_admissions=True)
    try:
        sub = fresh()
        quiet.release(admitted(quiet.admit(request("GET", "/items", idp.token(sub, sid="a")))).ticket)
        assert spy.audit(sub=sub) == []
        spy.calls.clear()
        outcome = admitted(loud.admit(request("POST", "/pay/7", idp.token(sub, sid="b"))))
        assert spy.calls == ["admit"]
        loud.release(outcome.ticket)
        [record] = loud.audit(sub=sub)
        assert (record.kind, record.code, record.session_id, record.route) == ("admission", "admitted", "b",
                                                                               "POST /pay/{id}")
        assert outcome.ticket is not None and outcome.ticket.ticket_id in record.detail
        assert "pay:7#" in record.detail
        loud.admit(request("GET", "/public"))  # public routes record nothing, even then
        assert len(loud.audit()) == 1
    finally:
        quiet.close()
        loud.close()


# ---------------------------------------------------------------------------------------------------- the buffer


def test_denials_before_the_store_are_buffered_then_written_in_one_batch(idp: DemoIssuer, guard: Guard,
                                                                          spy: SpyStore) -> None:
    guard._keeper.stop()  # nothing writes the buffer but this test (the keeper would, a second after the first)
    for _ in range(20):
        denied(guard.admit(request("GET", "/items")), "missing_token")
        denied(guard.admit(request("GET", "/items", "not.a.token")), "invalid_token")
    denied(guard.admit(request("GET", "/nowhere/" + "x" * 500, "garbage")), "invalid_token")
    assert spy.calls == []  # a flood of bad tokens never reaches the store request by request
    assert guard.flush_audit() == 41
    assert spy.calls == ["record_audit"]
    records = spy.audit(limit=1000)
    assert {r.code for r in records} == {"missing_token", "invalid_token"} and len(records) == 41
    assert all(r.kind == "denial" and r.sub is None and r.session_id is None and r.source == "middleware"
               for r in records)
    assert records[0].route == "/nowhere/" + "x" * 247  # an unmatched path, cut
    assert {r.route for r in records[1:]} == {"GET /items"}
    assert all(r.time is not None and abs(r.time - time.time()) < 60 for r in records)
    assert guard.flush_audit() == 0 and spy.calls == ["record_audit"]


def test_an_invalid_token_with_a_verified_subject_names_it(idp: DemoIssuer, guard: Guard, spy: SpyStore) -> None:
    sub = fresh()
    denied(guard.admit(request("GET", "/items", idp.token(sub, sa_kind="robot"))), "invalid_token")
    [record] = guard.audit(code="invalid_token")
    assert record.sub == sub and "sa_kind" in record.detail
    forged = mint_token(generate_rsa_key()[0], "RS256", {"sub": "someone", "iss": idp.issuer, "aud": idp.audience,
                                                         "iat": int(time.time()), "exp": int(time.time()) + 60})
    denied(guard.admit(request("GET", "/items", forged)), "invalid_token")
    assert guard.audit(code="invalid_token")[0].sub is None  # an unverified sub is never trusted


def test_the_buffer_is_bounded_and_counts_what_it_drops(idp: DemoIssuer, spy: SpyStore) -> None:
    guard = make_guard(idp, spy, audit_buffer=5)
    guard._keeper.stop()  # nothing writes the buffer but this test
    try:
        for _ in range(12):
            guard.admit(request("GET", "/items", "garbage"))
        assert guard.flush_audit() == 6
        dropped = guard.audit(code="audit_dropped")
        assert [(r.kind, r.detail.split()[0]) for r in dropped] == [("change", "7")]
        assert len(guard.audit(code="invalid_token")) == 5
    finally:
        guard.close()


def test_a_failed_flush_keeps_the_records_for_the_next(idp: DemoIssuer, guard: Guard, spy: SpyStore) -> None:
    guard._keeper.stop()  # nothing writes the buffer but this test
    spy.fail_audit = StoreUnavailable("down")
    for _ in range(3):
        guard.admit(request("GET", "/items"))
    assert guard.flush_audit() == 0
    spy.fail_audit = None
    assert guard.flush_audit() == 3
    assert len(guard.audit(code="missing_token")) == 3


def test_store_unavailable_and_fail_open_are_recorded_once_the_store_is_back(idp: DemoIssuer, guard: Guard,
                                                                              spy: SpyStore) -> None:
    sub = fresh()
    spy.fail_admit = StoreUnavailable("down")
    denied(guard.admit(request("GET", "/items", idp.token(sub, sid="s1"))), "store_unavailable")
    assert admitted(guard.admit(request("GET", "/open", idp.token(sub, sid="s1")))).ticket is None
    spy.fail_admit = None
    records = guard.audit(sub=sub)
    assert [(r.kind, r.code, r.route) for r in records] == [("admission", "fail_open", "GET /open"),
                                                            ("denial", "store_unavailable", "GET /items")]
    assert all(r.session_id == "s1" for r in records)


def test_a_lock_wait_records_its_final_refusal_once(idp: DemoIssuer, guard: Guard, spy: SpyStore) -> None:
    holder = admitted(guard.admit(request("POST", "/pay/1", idp.token(fresh()))))
    sub = fresh()
    spy.calls.clear()
    denied(guard.admit(request("POST", "/wait/1", idp.token(sub))), "object_locked")
    assert spy.calls.count("admit") > 1  # it waited and asked again
    [record] = guard.audit(sub=sub)
    assert (record.code, record.route) == ("object_locked", "POST /wait/{id}")
    guard.release(holder.ticket)
    guard.release(admitted(guard.admit(request("POST", "/wait/1", idp.token(sub)))).ticket)
    assert len(guard.audit(sub=sub)) == 1  # admitted after all: nothing more


def test_the_keeper_writes_the_buffer_by_itself(idp: DemoIssuer, guard: Guard, spy: SpyStore) -> None:
    denied(guard.admit(request("GET", "/items", "garbage")), "invalid_token")
    assert spy.audit_written.wait(10), "the keeper never flushed the audit buffer"
    assert [r.code for r in spy.written[0]] == ["invalid_token"]


def test_close_writes_the_buffer(idp: DemoIssuer, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'sa.db'}"
    guard = make_guard(idp, uri)
    guard.admit(request("GET", "/items"))
    guard.close()
    store = open_store(uri)
    try:
        assert [r.code for r in store.audit()] == ["missing_token"]
    finally:
        store.close()


class _HeldWrites(MemoryStore):
    """A store whose audit writes of records detailed in ``held`` wait for their event; it notes whether the trail
    was read while such a write was still waiting."""

    def __init__(self, *held: str) -> None:
        super().__init__()
        self.writing = {detail: threading.Event() for detail in held}
        self.go = {detail: threading.Event() for detail in held}
        self.read_early = False

    def record_audit(self, records: Sequence[AuditRecord]) -> None:
        for record in records:
            if record.detail in self.go:
                self.writing[record.detail].set()
                assert self.go[record.detail].wait(10), "the test never let the write land"
        super().record_audit(records)

    def audit(self, **query: Any) -> list[AuditRecord]:
        self.read_early = self.read_early or not all(go.is_set() for go in self.go.values())
        return super().audit(**query)


def _buffer(ops: Operations, detail: str) -> None:
    ops._audit.add(AuditRecord("denial", "invalid_token", "middleware", time=time.time(), detail=detail))


@pytest.mark.parametrize("side", ["thread", "event loop"])
def test_audit_waits_for_a_flush_another_thread_is_writing(side: str) -> None:
    """The keeper took the buffered records and is still writing them when the app asks for the trail: the answer
    comes once that write has landed, and holds the records."""
    import anyio

    store = _HeldWrites("held")
    ops = Operations(store)
    _buffer(ops, "held")
    keeper = threading.Thread(target=lambda: ops._flush_audit(wait=False))
    keeper.start()
    assert store.writing["held"].wait(10)
    deciding = threading.Event()  # the reader asked whether an earlier flush still writes (or read the trail)
    earlier, read = ops._flushing.earlier, store.audit

    def noted_earlier(number: int) -> bool:
        deciding.set()
        return earlier(number)

    def noted_read(**query: Any) -> list[AuditRecord]:
        deciding.set()
        return read(**query)

    ops._flushing.earlier = noted_earlier  # type: ignore[method-assign]
    store.audit = noted_read  # type: ignore[method-assign]
    answer: list[list[AuditRecord]] = []

    async def aread() -> None:
        answer.append(await ops.aaudit())

    reader = threading.Thread(target=lambda: answer.append(ops.audit()) if side == "thread" else anyio.run(aread))
    reader.start()
    assert deciding.wait(10)
    store.go["held"].set()
    reader.join(10)
    keeper.join(10)
    assert not store.read_early, "the trail was read while the keeper's write was still in flight"
    assert [r.detail for r in answer[0]] == ["held"]


def test_a_flush_waits_neither_for_later_flushes_nor_in_the_keeper() -> None:
    """An explicit flush waits only for the flushes started before it (never for one started while it wrote), and
    the keeper's flush waits for none: its lease renewals come first."""
    store = _HeldWrites("first", "later")
    ops = Operations(store)
    _buffer(ops, "first")
    done = {name: threading.Event() for name in ("first", "later", "keeper")}

    def flush(name: str, wait: bool = True) -> None:
        ops._flush_audit(wait=wait)
        done[name].set()

    threading.Thread(target=flush, args=("first",)).start()
    assert store.writing["first"].wait(10)
    _buffer(ops, "later")
    threading.Thread(target=flush, args=("later",)).start()
    assert store.writing["later"].wait(10)
    threading.Thread(target=flush, args=("keeper", False)).start()
    assert done["keeper"].wait(10), "the keeper's flush waited for the flushes of other threads"
    store.go["first"].set()
    assert done["first"].wait(10), "a flush waited for a flush that started after it"
    assert not done["later"].is_set()  # it waits for "first" no more, but its own write is still held
    store.go["later"].set()
    assert done["later"].wait(10)
    assert sorted(r.detail for r in store.audit()) == ["first", "later"]


@pytest.mark.anyio
async def test_the_async_path_records_the_same(idp: DemoIssuer, guard: Guard, spy: SpyStore) -> None:
    sub = fresh()
    denied(await guard.aadmit(request("GET", "/items", "garbage")), "invalid_token")
    await guard.arotate(sub)
    denied(await guard.aadmit(request("GET", "/items", idp.token(sub, gen=0))), "stale_generation")
    records = await guard.aaudit()
    assert [r.code for r in records] == ["stale_generation", "rotate", "invalid_token"]
    assert await guard.aflush_audit() == 0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# ---------------------------------------------------------------------------------------------------- operations


def test_every_operation_is_recorded_with_its_source(idp: DemoIssuer, guard: Guard) -> None:
    sub = fresh()
    guard.release(admitted(guard.admit(request("GET", "/items", idp.token(sub, sid="s1")))).ticket)
    guard.rotate(sub)
    guard.revoke_principal(sub, source="ticket-4711")
    guard.revoke_session("s9")
    guard.pause_session("s1")
    guard.resume_session("s1")
    guard.report_compromise(session_id="s1")
    guard.set_device_status("laptop-1", False)
    guard.set_privileges(sub, ["read"])
    guard.revoke_sessions(sub)
    guard.disable_principal(sub)
    guard.enable_principal(sub)
    guard.set_assurance(sub, "gold")
    guard.raise_risk(sub, 5, 60)
    records = guard.audit(kind="operation")
    assert [r.code for r in reversed(records)] == [
        "rotate", "revoke_principal", "revoke_session", "pause_session", "resume_session", "report_compromise",
        "set_device_status", "set_privileges", "revoke_sessions", "disable_principal", "enable_principal",
        "set_assurance", "raise_risk"]
    by_code = {r.code: r for r in records}
    assert {r.source for r in records} == {"operator", "ticket-4711"}
    assert by_code["revoke_principal"].source == "ticket-4711"
    assert by_code["rotate"].detail == "generation 1" and by_code["rotate"].sub == sub
    assert by_code["revoke_session"].session_id == "s9" and "before it was seen" in by_code["revoke_session"].detail
    assert by_code["report_compromise"].detail == "1 session compromised: s1"
    assert by_code["set_device_status"].detail == "device laptop-1: non-compliant"
    assert by_code["raise_risk"].detail == "risk +5 for 60 s"
    assert all(r.route is None for r in records)
    with pytest.raises(ConfigurationError):
        guard.rotate(sub, source="")


@pytest.mark.anyio
async def test_async_operations_are_recorded(idp: DemoIssuer, guard: Guard) -> None:
    sub = fresh()
    await guard.arotate(sub, source="event:credential-change")
    await guard.arevoke_session("s1")
    await guard.aset_privileges(sub, None)
    await guard.araise_risk(sub, 1, 5)
    await guard.adisable_principal(sub)
    await guard.aenable_principal(sub)
    await guard.aset_assurance(sub, None)
    await guard.arevoke_sessions(sub)
    await guard.arevoke_principal(sub)
    await guard.apause_session("s1")
    await guard.aresume_session("s1")
    await guard.areport_compromise(sub)
    await guard.aset_device_status("d", True)
    records = await guard.aaudit(kind="operation")
    assert len(records) == 13
    assert records[-1].source == "event:credential-change"


def test_an_operation_whose_record_fails_is_buffered(idp: DemoIssuer, guard: Guard, spy: SpyStore) -> None:
    spy.fail_audit = StoreUnavailable("down now")
    assert guard.rotate("svc") == 1  # the operation itself succeeded
    spy.fail_audit = None
    [record] = guard.audit(code="rotate")
    assert record.sub == "svc"


def test_security_events_pass_their_type_as_the_source(idp: DemoIssuer, guard: Guard) -> None:
    key, public = generate_rsa_key()
    receiver = SSFReceiver(guard, issuer="https://idp.example/ssf", audience="https://rp.example/ssf", keys=public)
    sub = fresh()
    payload = {"iss": "https://idp.example/ssf", "aud": "https://rp.example/ssf", "iat": int(time.time()),
               "jti": uuid.uuid4().hex, "sub_id": {"format": "opaque", "id": "s-77"},
               "events": {"https://schemas.openid.net/secevent/caep/event-type/session-revoked": {}}}
    receiver.process(mint_token(key, "RS256", payload, {"typ": "secevent+jwt"}))
    [record] = guard.audit(session_id="s-77")
    assert (record.kind, record.code, record.source) == ("operation", "revoke_session", "event:session-revoked")
    assert guard.audit(sub=sub) == []


# ---------------------------------------------------------------------------------------------------- retention


def physical(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT count(*) FROM audit").fetchone()[0])


def test_sqlite_prunes_by_count_on_the_admission_path(idp: DemoIssuer, tmp_path: Path) -> None:
    path = tmp_path / "sa.db"
    guard = make_guard(idp, f"sqlite:///{path}?audit_max_records=10")
    try:
        assert guard.store.audit_max_records == 10
        sub = fresh()
        guard.rotate(sub)
        old = idp.token(sub, gen=0)
        for _ in range(200):
            denied(guard.admit(request("GET", "/items", old)), "stale_generation")
        assert len(guard.audit(limit=1000)) == 10
        assert physical(path) < 100  # the oldest were deleted as it went, in bounded steps
    finally:
        guard.close()


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_sqlite_prunes_by_age_in_its_sweep(idp: DemoIssuer, tmp_path: Path) -> None:
    path, clock = tmp_path / "sa.db", Clock()
    guard = make_guard(idp, SQLiteStore(str(path), clock=clock), audit_retention=60)
    try:
        for _ in range(5):
            guard.admit(request("GET", "/items"))
        guard.rotate("svc")
        assert len(guard.audit()) == 6 and physical(path) == 6
        clock.now += 61
        assert guard.audit() == []  # past the retention: never shown
        guard.release(admitted(guard.admit(request("GET", "/items", idp.token(fresh())))).ticket)  # the sweep
        assert physical(path) == 0
    finally:
        guard.close()


def test_redis_records_a_denial_inside_the_admission_script(idp: DemoIssuer, tmp_path: Path) -> None:
    import redis_support

    uri = redis_support.store_uri("redis", tmp_path)
    guard = make_guard(idp, uri)
    steps: list[object] = []
    execute = guard.store._execute  # type: ignore[attr-defined]

    def counting(step: object) -> object:
        steps.append(step)
        return execute(step)
    guard.store._execute = counting  # type: ignore[attr-defined]
    try:
        sub = fresh()
        guard.rotate(sub)
        steps.clear()
        denied(guard.admit(request("GET", "/items", idp.token(sub, sid="r1", gen=0))), "stale_generation")
        assert len(steps) == 1  # one script call decided and recorded it
        [record] = guard.store.audit(sub=sub, kind="denial")
        assert (record.code, record.session_id, record.route) == ("stale_generation", "r1", "GET /items")
    finally:
        guard.close()
        redis_support.forget_prefix(uri)


# ---------------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("options", [
    {"audit_admissions": "yes"}, {"audit_retention": 0}, {"audit_retention": float("nan")},
    {"audit_max_records": 0}, {"audit_max_records": "10"}, {"audit_buffer": 0}, {"audit_buffer": True},
])
def test_bad_audit_options_fail_at_start_up(idp: DemoIssuer, options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        make_guard(idp, MemoryStore(), **options)


@pytest.mark.parametrize("query", ["audit_retention=soon", "audit_max_records=1.5", "audit_retention=-1"])
def test_bad_audit_uri_options(query: str) -> None:
    with pytest.raises(ConfigurationError):
        open_store(f"memory://?{query}")


def test_audit_uri_options_and_guard_options(idp: DemoIssuer, tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'a.db'}?timeout=5&audit_retention=3600&audit_max_records=50")
    assert (store.audit_retention, store.audit_max_records) == (3600.0, 50)
    assert isinstance(store, SQLiteStore) and store.timeout == 5.0
    store.close()
    guard = make_guard(idp, "memory://?audit_max_records=7", audit_retention=120)
    assert (guard.store.audit_retention, guard.store.audit_max_records) == (120.0, 7)
    guard.close()
    default = open_store("memory://")
    assert (default.audit_retention, default.audit_max_records) == (7 * 86400.0, 100_000)


def test_audit_query_arguments_are_checked(guard: Guard) -> None:
    for bad in ({"limit": 0}, {"limit": 10_001}, {"limit": True}, {"since": "yesterday"}, {"sub": ""}):
        with pytest.raises(ConfigurationError):
            guard.audit(**bad)


def test_audit_takes_datetimes(guard: Guard) -> None:
    from datetime import UTC, datetime, timedelta

    guard.rotate("svc")
    now = datetime.now(UTC)
    assert len(guard.audit(since=now - timedelta(minutes=1), until=now + timedelta(minutes=1))) == 1
    assert guard.audit(since=now + timedelta(minutes=1)) == []
    with pytest.raises(ConfigurationError):
        guard.audit(since=datetime.now())  # naive: ambiguous


def test_a_store_without_an_audit_trail_still_works(idp: DemoIssuer, caplog: pytest.LogCaptureFixture) -> None:
    class Plain(MemoryStore):
        def record_audit(self, records: Sequence[AuditRecord]) -> None:
            raise NotImplementedError

    guard = make_guard(idp, Plain())
    try:
        with caplog.at_level(logging.WARNING, logger="sa_middleware"):
            assert guard.rotate("svc") == 1
            guard.rotate("svc")
            guard.admit(request("GET", "/items"))
            assert guard.flush_audit() == 0
        assert sum("keeps no audit trail" in r.getMessage() for r in caplog.records) == 1
    finally:
        guard.close()


# ---------------------------------------------------------------------------------------------------- Operations


def test_operations_need_a_store_only(idp: DemoIssuer, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'sa.db'}"
    guard = make_guard(idp, uri)
    sub = fresh()
    guard.release(admitted(guard.admit(request("GET", "/items", idp.token(sub, sid="s1")))).ticket)
    ops = Operations(uri, source="runbook")
    try:
        assert [s.session_id for s in ops.sessions(sub)] == ["s1"]
        assert ops.rotate(sub) == 1
        assert ops.locks() == []
        denied(guard.admit(request("GET", "/items", idp.token(sub, sid="s1"))), "stale_generation")
        assert [(r.code, r.source) for r in ops.audit(sub=sub)] == [("stale_generation", "middleware"),
                                                                    ("rotate", "runbook")]
    finally:
        ops.close()
        guard.close()
    assert issubclass(Guard, Operations)
    for name in ("rotate", "revoke_principal", "revoke_session", "report_compromise", "pause_session",
                 "resume_session", "set_device_status", "set_privileges", "sessions", "locks", "audit"):
        assert getattr(Guard, name) is getattr(Operations, name)
        assert getattr(Guard, "a" + name) is getattr(Operations, "a" + name)
    with pytest.raises(ConfigurationError):
        Operations("memory://", session_idle=0)
    with pytest.raises(ConfigurationError):
        Operations("memory://", source="x" * 81)
