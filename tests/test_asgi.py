"""The pure ASGI middleware (``sa_middleware.asgi.SessionAwareMiddleware``) with small hand-written ASGI apps.

Ordering questions (when exactly is the ticket released, what is sent first) drive the middleware directly with
hand-made ``receive`` / ``send``; real-HTTP questions run it under uvicorn. Synchronisation is by events set by
the app or by an outer wrapper that signals when the middleware has returned; no sleeps.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import anyio
import anyio.to_thread
import httpx
import pytest
from support import WAIT, Gates, Served, Tracker, make_guard, problem, sub

from sa_middleware import Guard, SAContext, StoreUnavailable
from sa_middleware.asgi import SessionAwareMiddleware
from sa_middleware.demo import DemoIssuer, serve_asgi
from sa_middleware.denials import Denial
from sa_middleware.records import Admission, Ticket
from sa_middleware.stores.memory import MemoryStore
from sa_middleware.stores.sqlite import SQLiteStore

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def lock_tickets(guard: Guard) -> set[str]:
    return {lock.ticket_id for lock in guard.locks()}


# -- a small app with its gates, served behind the middleware and an outer wrapper that knows when it returned ---

class App(Gates):
    """A hand-written ASGI app; behaviour chosen by path, ``?hold=NAME`` parks it until the gate is released."""

    def __init__(self, guard: Guard) -> None:
        super().__init__()
        self.guard = guard
        self.records: dict[str, dict[str, Any]] = {}
        self.lifespan: list[str] = []

    async def _park(self, name: str | None) -> None:
        if name:
            gate = self.gate(name)
            gate.entered.set()
            assert await anyio.to_thread.run_sync(gate.released.wait, WAIT), f"gate {name} never released"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            self.lifespan.append("sa_middleware" if "sa_middleware" in scope else "plain")
            while True:
                message = await receive()
                self.lifespan.append(message["type"])
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert scope["type"] == "http"
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
        rid, hold = query.get("rid", "-"), query.get("hold")
        ctx: SAContext | None = scope.get("sa_middleware")
        record = self.records.setdefault(rid, {})
        record["ticket_id"] = ctx.ticket_id if ctx else None
        path = scope["path"]
        start = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        if path.startswith("/boom/"):
            raise RuntimeError("the app failed")
        if path.startswith("/boom-mid/"):
            await send(start)
            await send({"type": "http.response.body", "body": b"first", "more_body": True})
            await self._park(hold)
            raise RuntimeError("the app failed mid-stream")
        if path.startswith("/stream/"):
            await send(start)
            await send({"type": "http.response.body", "body": b"first", "more_body": True})
            await self._park(hold)
            await send({"type": "http.response.body", "body": b"last", "more_body": False})
            record["locks_after_final_send"] = {lock.ticket_id for lock in await self.guard.alocks()}
            return
        if path.startswith("/events/"):
            await send(start)
            await send({"type": "http.response.body", "body": b"first", "more_body": True})
            while True:  # a server-sent-events style stream: runs until the client goes away
                message = await receive()
                if message["type"] == "http.disconnect":
                    record["disconnected"] = True
                    return
        await self._park(hold)
        body = {"principal": None}
        if ctx is not None:
            body = {"principal": ctx.principal, "kind": ctx.kind, "session_id": ctx.session_id,
                    "claims": dict(ctx.claims), "ticket_id": ctx.ticket_id,
                    "fencing_tokens": dict(ctx.fencing_tokens), "is_context": isinstance(ctx, SAContext),
                    "locks": [[lk.key, lk.ticket_id] for lk in await self.guard.alocks()]}
        payload = json.dumps(body).encode()
        await send({**start, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})


def served(guard: Guard) -> Served[App]:
    """An App behind the middleware, served by uvicorn (a context manager)."""
    app = App(guard)
    finished = Tracker(SessionAwareMiddleware(app, guard=guard))
    return Served(guard, app, finished, serve_asgi(finished.asgi_app()))


@pytest.fixture
def server(guard: Guard) -> Iterator[Served[App]]:
    with served(guard) as srv:
        yield srv


# -- direct ASGI drive -----------------------------------------------------------------------------------------

def http_scope(path: str, token: str | None = None, method: str = "GET", query: str = "") -> Scope:
    headers = [(b"host", b"testserver"), (b"user-agent", b"direct")]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
            "root_path": "", "headers": headers, "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}


def ws_scope(path: str, token: str | None = None) -> Scope:
    headers = [(b"host", b"testserver")]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    return {"type": "websocket", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "ws",
            "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
            "client": ("127.0.0.1", 50001), "server": ("testserver", 80), "subprotocols": []}


def scripted(*messages: Message) -> Receive:
    """A receive() that plays ``messages`` and then waits for ever (as a quiet client does)."""
    queue = list(messages)

    async def receive() -> Message:
        if queue:
            return queue.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")
    return receive


class Sent(list[Message]):
    """A send() that records every message it is given."""

    async def __call__(self, message: Message) -> None:
        self.append(message)


def refused(guard: Guard, scope: Scope) -> Sent:
    """What the middleware sends for a request it must refuse (its app must not run); closes ``guard``."""
    sent = Sent()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise AssertionError("must not run")

    try:
        anyio.run(SessionAwareMiddleware(app, guard=guard), scope, scripted(), sent)
    finally:
        guard.close()
    return sent


def test_ticket_released_only_after_the_final_body_chunk(guard: Guard, issuer: DemoIssuer) -> None:
    token = issuer.token(sub())
    seen: list[tuple[str, bool, bool]] = []  # (message type, more_body, ticket still held when sent)
    app_view: dict[str, Any] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        app_view["ticket"] = scope["sa_middleware"].ticket_id
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for chunk in (b"a", b"b"):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"c", "more_body": False})
        app_view["held_after_final_send"] = app_view["ticket"] in lock_tickets(guard)

    async def send(message: Message) -> None:
        seen.append((message["type"], bool(message.get("more_body")), app_view["ticket"] in lock_tickets(guard)))

    async def main() -> None:
        mw = SessionAwareMiddleware(app, guard=guard)
        await mw(http_scope("/stream/1", token), scripted({"type": "http.request", "body": b""}), send)

    anyio.run(main)
    assert [m[:2] for m in seen] == [("http.response.start", False), ("http.response.body", True),
                                     ("http.response.body", True), ("http.response.body", False)]
    assert all(held for _, _, held in seen), seen  # held while every chunk, the final one included, was sent
    assert app_view["held_after_final_send"] is True
    assert guard.locks() == []  # released once the app returned


class _ThreadedMemoryStore(MemoryStore):
    """A store whose async release waits (in a worker thread), as a network store's does."""

    inline_async = False


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("kind", ["sqlite", "threaded"])
def test_release_shielded_from_cancellation(kind: str, backend: str, issuer: DemoIssuer, tmp_path: Path) -> None:
    """Cancelled while the app runs, the request still releases: at once when the store releases without waiting
    (SQLite on asyncio queues it), and shielded when the release must wait (a worker thread, or SQLite on trio)."""
    store = SQLiteStore(str(tmp_path / "s.db")) if kind == "sqlite" else _ThreadedMemoryStore()
    guard = make_guard(issuer, store)
    token = issuer.token(sub())
    inside = anyio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        inside.set()
        await anyio.sleep_forever()

    async def main() -> None:
        mw = SessionAwareMiddleware(app, guard=guard)
        async with anyio.create_task_group() as tg:
            tg.start_soon(mw, http_scope("/stream/2", token), scripted(), _discard)
            await inside.wait()
            assert [lk.key for lk in await guard.alocks()] == ["stream:2"]
            tg.cancel_scope.cancel()  # e.g. the server cancels the request task

    try:
        anyio.run(main, backend=backend)
        assert guard.locks() == []
    finally:
        guard.close()


async def _discard(message: Message) -> None:
    pass


def test_release_when_app_raises_direct(guard: Guard, issuer: DemoIssuer) -> None:
    token = issuer.token(sub())

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert [lk.key for lk in await guard.alocks()] == ["boom:3"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise ValueError("app bug")

    async def main() -> None:
        await SessionAwareMiddleware(app, guard=guard)(http_scope("/boom/3", token), scripted(), _discard)

    with pytest.raises(ValueError, match="app bug"):  # the middleware does not swallow the app's error
        anyio.run(main)
    assert guard.locks() == []


def test_failing_release_is_not_the_requests_problem(issuer: DemoIssuer, caplog: pytest.LogCaptureFixture) -> None:
    class NoRelease(MemoryStore):
        def release(self, ticket: Ticket) -> None:
            raise StoreUnavailable("gone")

    g = make_guard(issuer, NoRelease())
    sent = Sent()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    try:
        anyio.run(SessionAwareMiddleware(app, guard=g), http_scope("/docs/1", issuer.token(sub())), scripted(), sent)
    finally:
        g.close()
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert "release of ticket" in caplog.text


@pytest.mark.parametrize(("token", "code"), [(None, "missing_token"), ("not.a.token", "invalid_token")])
def test_refused_websocket_closed_with_1008_before_accept(guard: Guard, token: str | None, code: str) -> None:
    called: list[Scope] = []
    sent = Sent()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        called.append(scope)

    anyio.run(SessionAwareMiddleware(app, guard=guard), ws_scope("/ws/lobby", token),
              scripted({"type": "websocket.connect"}), sent)
    assert called == []
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": code}]


def test_refused_websocket_for_a_paused_session(guard: Guard, issuer: DemoIssuer) -> None:
    who = sub()
    token = issuer.token(who, sa_kind="agent", sid=f"{who}-s")
    runs: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        runs.append(scope["sa_middleware"].session_id)
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1000})

    def connect() -> list[Message]:
        sent = Sent()
        anyio.run(SessionAwareMiddleware(app, guard=guard), ws_scope("/ws/lobby", token),
                  scripted({"type": "websocket.connect"}), sent)
        return sent

    assert [m["type"] for m in connect()] == ["websocket.accept", "websocket.close"]
    assert guard.pause_session(f"{who}-s")
    assert connect() == [{"type": "websocket.close", "code": 1008, "reason": "session_paused"}]
    assert runs == [f"{who}-s"]


def test_admitted_websocket_sees_its_context_and_holds_its_lock(guard: Guard, issuer: DemoIssuer) -> None:
    who = sub()
    token = issuer.token(who, sa_kind="agent", sid=f"{who}-ws")
    seen: dict[str, Any] = {}
    sent = Sent()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        assert (await receive())["type"] == "websocket.connect"
        seen["ctx"] = scope["sa_middleware"]
        seen["locks"] = [(lk.key, lk.ticket_id) for lk in await guard.alocks()]
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1000})

    anyio.run(SessionAwareMiddleware(app, guard=guard), ws_scope("/ws/lobby", token),
              scripted({"type": "websocket.connect"}), sent)
    ctx: SAContext = seen["ctx"]
    assert (ctx.principal, ctx.kind, ctx.session_id) == (who, "agent", f"{who}-ws")
    assert list(ctx.fencing_tokens) == ["room:lobby"] and ctx.fencing_tokens["room:lobby"] >= 1
    assert seen["locks"] == [("room:lobby", ctx.ticket_id)]
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]
    assert guard.locks() == []


def test_lifespan_passes_through(guard: Guard, tmp_path: Path) -> None:
    app = App(guard)
    sent = Sent()
    anyio.run(SessionAwareMiddleware(app, guard=guard), {"type": "lifespan", "asgi": {"version": "3.0"}},
              scripted({"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}), sent)
    assert app.lifespan == ["plain", "lifespan.startup", "lifespan.shutdown"]
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]


def test_realm_in_the_challenge(issuer: DemoIssuer) -> None:
    g = make_guard(issuer, "memory://", realm="workbench")
    try:
        sent = refused(g, http_scope("/docs/1"))
    finally:
        g.close()
    headers = dict(sent[0]["headers"])
    assert sent[0]["status"] == 401
    assert headers[b"www-authenticate"] == b'Bearer realm="workbench"'


def test_constructor_needs_a_guard() -> None:
    with pytest.raises(TypeError):
        SessionAwareMiddleware(App, guard=object())  # type: ignore[arg-type]


# -- over real HTTP (uvicorn) ----------------------------------------------------------------------------------

def test_stream_holds_ticket_until_last_chunk_then_releases(server: Served, issuer: DemoIssuer) -> None:
    who = sub()
    stream_tok, other_tok = issuer.token(who), issuer.token(who)
    with server.stream("/stream/1", stream_tok) as (resp, gate, rid):
        assert resp.status_code == 200
        chunks = resp.iter_raw()
        first = b""
        while first != b"first":
            first += next(chunks)
        ticket = server.app.records[rid]["ticket_id"]
        assert lock_tickets(server.guard) == {ticket}
        # the stream is open: another exclusive request of the same principal is refused
        problem(server.request("POST", "/exclusive", other_tok, rid=uuid.uuid4().hex), 409, "conflicting_action")
        gate.released.set()
        assert b"".join(chunks) == b"last"
    assert server.finished.done(rid).wait(WAIT)
    assert ticket in server.app.records[rid]["locks_after_final_send"]  # still held after the last chunk went
    server.assert_released(other_tok)


def test_release_when_app_raises_over_http(server: Served, issuer: DemoIssuer) -> None:
    who = sub()
    resp = server.request("GET", "/boom/1", issuer.token(who), rid=uuid.uuid4().hex)
    assert resp.status_code == 500  # the app's failure, answered by the server
    server.assert_released(issuer.token(who))


def test_release_when_app_raises_mid_stream(server: Served, issuer: DemoIssuer) -> None:
    who = sub()
    with server.stream("/boom-mid/2", issuer.token(who)) as (resp, gate, rid):
        chunks = resp.iter_raw()
        assert next(chunks) == b"first"
        assert gate.entered.wait(WAIT)
        problem(server.request("POST", "/exclusive", issuer.token(who), rid=uuid.uuid4().hex), 409,
                "conflicting_action")
        gate.released.set()
        with pytest.raises(httpx.HTTPError):  # the server drops the half-sent response
            b"".join(chunks)
    assert server.finished.done(rid).wait(WAIT)
    server.assert_released(issuer.token(who))


def test_release_on_client_disconnect(server: Served, issuer: DemoIssuer) -> None:
    who = sub()
    rid = uuid.uuid4().hex
    with server.raw_stream(f"/events/1?rid={rid}", issuer.token(who)) as received:  # then the client goes away
        assert received.startswith(b"HTTP/1.1 200")
        assert [lk.key for lk in server.guard.locks()] == ["events:1"]
        problem(server.request("POST", "/exclusive", issuer.token(who), rid=uuid.uuid4().hex), 409,
                "conflicting_action")
    assert server.finished.done(rid).wait(WAIT), "the middleware never returned after the client disconnected"
    assert server.app.records[rid].get("disconnected") is True
    server.assert_released(issuer.token(who))


@pytest.mark.parametrize(("claims", "kind"), [({}, "human"), ({"sa_kind": "agent"}, "agent"),
                                              ({"client_id": "SUB"}, "service")])
def test_context_in_scope(server: Served, issuer: DemoIssuer, claims: dict[str, Any], kind: str) -> None:
    who = sub()
    claims = {k: (who if v == "SUB" else v) for k, v in claims.items()}
    token = issuer.token(who, sid=f"{who}-s1", team="blue", **claims)
    body = server.request("GET", "/docs/5", token, rid=uuid.uuid4().hex).json()
    assert body["is_context"] is True
    assert body["principal"] == who
    assert body["kind"] == kind
    assert body["session_id"] == f"{who}-s1"
    assert body["claims"]["team"] == "blue" and body["claims"]["sub"] == who
    assert isinstance(body["ticket_id"], str) and body["ticket_id"]
    assert body["locks"] == [["doc:5", body["ticket_id"]]]  # the view runs while its ticket holds the lock
    assert list(body["fencing_tokens"]) == ["doc:5"]
    again = server.request("GET", "/docs/5", token, rid=uuid.uuid4().hex).json()
    assert list(again["fencing_tokens"]) == ["doc:5"]
    assert again["fencing_tokens"]["doc:5"] > body["fencing_tokens"]["doc:5"]
    assert again["ticket_id"] != body["ticket_id"]


def test_session_id_falls_back_to_jti(server: Served, issuer: DemoIssuer) -> None:
    token = issuer.token(sub(), jti="the-jti")
    assert server.request("GET", "/docs/6", token).json()["session_id"] == "the-jti"


def test_public_route_needs_no_token_and_records_nothing(server: Served, issuer: DemoIssuer) -> None:
    resp = server.request("GET", "/public", rid=uuid.uuid4().hex)
    assert resp.status_code == 200
    body = resp.json()
    assert body["is_context"] is True  # the view always finds a context; on a public route it is empty
    assert (body["principal"], body["kind"], body["session_id"], body["ticket_id"]) == (None, None, None, None)
    who = sub()
    assert server.request("GET", "/public", issuer.token(who)).status_code == 200
    assert server.guard.sessions(who) == []


def test_denials_missing_and_invalid_token(server: Served, issuer: DemoIssuer) -> None:
    missing = server.request("GET", "/docs/1")
    problem(missing, 401, "missing_token")
    assert missing.headers["www-authenticate"] == "Bearer"  # RFC 6750 3.1: no error attribute without a token
    assert missing.headers["cache-control"] == "no-store"
    basic = server.request("GET", "/docs/1", headers={"authorization": "Basic dXNlcjpwYXNz"})
    problem(basic, 401, "missing_token")
    assert "error=" not in basic.headers["www-authenticate"]

    token = issuer.token(sub())
    forged = token[:-10] + ("A" if token[-10] != "A" else "B") + token[-9:]
    invalid = server.request("GET", "/docs/1", forged)
    problem(invalid, 401, "invalid_token")
    assert invalid.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert forged not in invalid.text and forged.split(".")[2] not in invalid.headers["www-authenticate"]


def test_denials_409_423_429_carry_retry_after(server: Served, issuer: DemoIssuer) -> None:
    a, b, c = sub(), sub(), sub()
    server.hold("POST", "/exclusive", issuer.token(a))
    conflict = problem(server.request("GET", "/docs/1", issuer.token(a)), 409, "conflicting_action")
    assert "in flight" in conflict["detail"]

    server.hold("GET", "/docs/7", issuer.token(b))
    locked = server.request("GET", "/docs/7", issuer.token(c))
    problem(locked, 423, "object_locked")

    server.hold("GET", "/slot", issuer.token(c))
    problem(server.request("GET", "/slot", issuer.token(c)), 429, "too_many_in_flight")


def test_403_carries_a_bearer_challenge(server: Served, issuer: DemoIssuer) -> None:
    who = sub()
    token = issuer.token(who, sa_kind="agent", sid=f"{who}-s")
    assert server.request("GET", "/docs/1", token, rid=uuid.uuid4().hex).status_code == 200
    assert server.guard.pause_session(f"{who}-s")
    resp = server.request("GET", "/docs/1", token)
    problem(resp, 403, "session_paused")
    assert resp.headers["www-authenticate"].startswith("Bearer")


# -- a failing store: 503, never a 500, never a hang --------------------------------------------------------------

def broken(base: type[SQLiteStore], exc: BaseException, path: Path) -> SQLiteStore:
    class Broken(base):  # type: ignore[valid-type, misc]
        def admit(self, admission: Admission) -> Ticket | Denial:
            raise exc

        async def aadmit(self, admission: Admission) -> Ticket | Denial:  # the SQLite store decides inline first
            raise exc

    return Broken() if base is MemoryStore else Broken(str(path))


@pytest.mark.parametrize("base", [MemoryStore, SQLiteStore], ids=["inline", "threaded"])
@pytest.mark.parametrize("exc", [StoreUnavailable("timed out s3cr3t"), RuntimeError("disk on fire s3cr3t"),
                                 sqlite3.OperationalError("database is locked s3cr3t"),
                                 ConnectionResetError("reset s3cr3t")], ids=lambda e: type(e).__name__)
def test_store_failure_is_503(issuer: DemoIssuer, tmp_path: Path, base: type[SQLiteStore],
                              exc: BaseException) -> None:
    g = make_guard(issuer, broken(base, exc, tmp_path / "broken.db"), retry_after=7)
    try:
        sent = refused(g, http_scope("/docs/1", issuer.token(sub())))
    finally:
        g.close()
    assert sent[0]["status"] == 503
    headers = dict(sent[0]["headers"])
    assert headers[b"retry-after"] == b"7"
    body = json.loads(sent[1]["body"])
    assert body["code"] == "store_unavailable"
    assert b"s3cr3t" not in sent[1]["body"]


def test_unexpected_store_failure_never_fails_open(issuer: DemoIssuer, tmp_path: Path) -> None:
    # a failure that is not the store being unreachable (a bug, bad data) is 503 even on a fail_open route
    g = make_guard(issuer, broken(SQLiteStore, RuntimeError("down"), tmp_path / "b.db"))
    try:
        with served(g) as srv:
            who = sub()
            problem(srv.request("GET", "/docs/1", issuer.token(who)), 503, "store_unavailable")
            problem(srv.request("GET", "/open", issuer.token(who)), 503, "store_unavailable")
    finally:
        g.close()


def test_store_failure_over_http_and_fail_open(issuer: DemoIssuer, tmp_path: Path) -> None:
    g = make_guard(issuer, broken(SQLiteStore, StoreUnavailable("down"), tmp_path / "b.db"))
    try:
        with served(g) as srv:
            who = sub()
            problem(srv.request("GET", "/docs/1", issuer.token(who)), 503, "store_unavailable")
            problem(srv.request("POST", "/exclusive", issuer.token(who)), 503, "store_unavailable")
            opened = srv.request("GET", "/open", issuer.token(who, sa_kind="agent"), rid=uuid.uuid4().hex)
            assert opened.status_code == 200
            body = opened.json()
            assert (body["principal"], body["kind"], body["ticket_id"], body["fencing_tokens"]) == \
                (who, "agent", None, {})
            # fail_open never skips the token check
            problem(srv.request("GET", "/open"), 401, "missing_token")
            problem(srv.request("GET", "/open", "x.y.z"), 401, "invalid_token")
    finally:
        g.close()


def test_locked_sqlite_store_answers_503_within_its_timeout(issuer: DemoIssuer, tmp_path: Path) -> None:
    db = tmp_path / "locked.db"
    g = make_guard(issuer, f"sqlite:///{db}?timeout=0.2")
    blocker = sqlite3.connect(db, isolation_level=None)
    try:
        with served(g) as srv:
            blocker.execute("BEGIN EXCLUSIVE")  # another process holds the database
            try:
                problem(srv.request("GET", "/docs/1", issuer.token(sub())), 503, "store_unavailable")
            finally:
                blocker.execute("ROLLBACK")
            assert srv.request("GET", "/docs/1", issuer.token(sub()), rid=uuid.uuid4().hex).status_code == 200
    finally:
        blocker.close()
        g.close()
