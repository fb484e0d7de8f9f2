"""The WSGI middleware (``sa_middleware.wsgi.SessionAwareWSGIMiddleware``) under werkzeug's threaded server, and
driven directly for the exactly-once questions.

The ticket must be held until the server closes the response iterable (streamed generators included) and released
exactly once, also when the app raises. An outer wrapper signals when the server has closed the response (the
middleware has released by then); gates are events; no sleeps.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import support
from support import WAIT, Gates, Served, Tracker, make_guard, sub
from werkzeug.test import create_environ

from sa_middleware import Guard, Policy, SAContext, StoreUnavailable
from sa_middleware.demo import DemoIssuer, serve_wsgi
from sa_middleware.denials import Denial
from sa_middleware.records import Admission, Ticket
from sa_middleware.stores.memory import MemoryStore
from sa_middleware.wsgi import SessionAwareWSGIMiddleware

Environ = dict[str, Any]


class App(Gates):
    """A hand-written WSGI app; behaviour chosen by path, ``?hold=NAME`` parks it until the gate is released."""

    def __init__(self, guard: Guard) -> None:
        super().__init__()
        self.guard = guard
        self.records: dict[str, dict[str, Any]] = {}

    def _park(self, name: str | None) -> None:
        if name:
            gate = self.gate(name)
            gate.entered.set()
            assert gate.released.wait(WAIT), f"gate {name} never released"

    def __call__(self, environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
        query = {k: v[-1] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
        rid, hold = query.get("rid", "-"), query.get("hold")
        ctx: SAContext | None = environ.get("sa_middleware")
        record = self.records.setdefault(rid, {})
        record["ticket_id"] = ctx.ticket_id if ctx else None
        path = environ["PATH_INFO"]
        if path.startswith("/boom/"):
            raise RuntimeError("the app failed")
        if path.startswith(("/stream/", "/boom-mid/", "/events/")):
            start_response("200 OK", [("content-type", "text/plain")])
            return self._stream(path, hold, record)
        self._park(hold)
        body: dict[str, Any] = {"principal": None}
        if ctx is not None:
            body = {"principal": ctx.principal, "kind": ctx.kind, "session_id": ctx.session_id,
                    "claims": dict(ctx.claims), "ticket_id": ctx.ticket_id,
                    "fencing_tokens": dict(ctx.fencing_tokens), "is_context": isinstance(ctx, SAContext),
                    "locks": [[lk.key, lk.ticket_id] for lk in self.guard.locks()]}
        start_response("200 OK", [("content-type", "application/json")])
        return [json.dumps(body).encode()]

    def _stream(self, path: str, hold: str | None, record: dict[str, Any]) -> Iterator[bytes]:
        try:
            yield b"first"
            self._park(hold)
            if path.startswith("/boom-mid/"):
                raise RuntimeError("the app failed mid-stream")
            if path.startswith("/events/"):
                for _ in range(100_000):  # keeps writing until the server finds the client gone
                    yield b"x" * 1024
                record["stream_completed"] = True
                return
            yield b"last"
            # the server asked for more, so it has written the last chunk; the response is not closed yet
            record["locks_after_last_chunk"] = {lk.ticket_id for lk in self.guard.locks()}
        except GeneratorExit:
            record["closed_early"] = True
            raise


def served(guard: Guard) -> Served[App]:
    """An App behind the middleware, on werkzeug's threaded server (a context manager)."""
    app = App(guard)
    finished = Tracker(SessionAwareWSGIMiddleware(app, guard=guard))
    return Served(guard, app, finished, serve_wsgi(finished.wsgi))


@pytest.fixture
def server(guard: Guard) -> Iterator[Served[App]]:
    with served(guard) as srv:
        yield srv


def problem(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """``support.problem``, and the body is exactly as long as the content-length says."""
    body = support.problem(resp, status, code)
    assert int(resp.headers["content-length"]) == len(resp.content)
    return body


# -- over real HTTP ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("claims", "kind"), [({}, "human"), ({"sa_kind": "service"}, "service"),
                                              ({"client_id": "SUB"}, "service")])
def test_context_in_environ(server: Served, issuer: DemoIssuer, claims: dict[str, Any], kind: str) -> None:
    who = sub()
    claims = {k: (who if v == "SUB" else v) for k, v in claims.items()}
    token = issuer.token(who, sid=f"{who}-s1", team="red", **claims)
    body = server.request("GET", "/docs/5", token, rid=uuid.uuid4().hex).json()
    assert body["is_context"] is True
    assert (body["principal"], body["kind"], body["session_id"]) == (who, kind, f"{who}-s1")
    assert body["claims"]["team"] == "red" and body["claims"]["sub"] == who
    assert isinstance(body["ticket_id"], str) and body["ticket_id"]
    assert body["locks"] == [["doc:5", body["ticket_id"]]]
    assert list(body["fencing_tokens"]) == ["doc:5"]
    again = server.request("GET", "/docs/5", token, rid=uuid.uuid4().hex).json()["fencing_tokens"]
    assert list(again) == ["doc:5"] and again["doc:5"] > body["fencing_tokens"]["doc:5"]


def test_public_route(server: Served, issuer: DemoIssuer) -> None:
    body = server.request("GET", "/public", rid=uuid.uuid4().hex).json()
    assert body["is_context"] is True and body["principal"] is None and body["ticket_id"] is None
    who = sub()
    assert server.request("GET", "/public", issuer.token(who)).status_code == 200
    assert server.guard.sessions(who) == []


def test_streamed_response_holds_ticket_until_the_server_closes_it(server: Served, issuer: DemoIssuer) -> None:
    who = sub()
    with server.stream("/stream/1", issuer.token(who)) as (resp, gate, rid):
        assert resp.status_code == 200
        chunks = resp.iter_raw()
        first = b""
        while first != b"first":
            first += next(chunks)
        assert gate.entered.wait(WAIT)  # the generator is parked between its chunks
        ticket = server.app.records[rid]["ticket_id"]
        assert {lk.ticket_id for lk in server.guard.locks()} == {ticket}
        problem(server.request("POST", "/exclusive", issuer.token(who), rid=uuid.uuid4().hex), 409,
                "conflicting_action")
        gate.released.set()
        assert b"".join(chunks) == b"last"
    assert server.finished.done(rid).wait(WAIT)
    assert server.app.records[rid]["locks_after_last_chunk"] == {ticket}
    server.assert_released(issuer.token(who))


def test_release_when_app_raises_over_http(server: Served, issuer: DemoIssuer) -> None:
    who = sub()
    assert server.request("GET", "/boom/1", issuer.token(who), rid=uuid.uuid4().hex).status_code == 500
    server.assert_released(issuer.token(who))


def test_release_when_generator_raises_mid_stream(server: Served, issuer: DemoIssuer) -> None:
    who = sub()
    with server.stream("/boom-mid/2", issuer.token(who)) as (resp, gate, rid):
        chunks = resp.iter_raw()
        assert next(chunks) == b"first"
        assert gate.entered.wait(WAIT)
        assert [lk.key for lk in server.guard.locks()] == ["boom:2"]
        gate.released.set()
        with pytest.raises(httpx.HTTPError):  # the server drops the half-sent response
            b"".join(chunks)
    assert server.finished.done(rid).wait(WAIT)
    server.assert_released(issuer.token(who))


def test_release_when_client_disconnects_mid_stream(server: Served, issuer: DemoIssuer) -> None:
    who = sub()
    name, rid = uuid.uuid4().hex[:8], uuid.uuid4().hex
    gate = server.app.gate(name)
    with server.raw_stream(f"/events/1?rid={rid}&hold={name}", issuer.token(who)):  # then the client goes away
        assert gate.entered.wait(WAIT)
        assert [lk.key for lk in server.guard.locks()] == ["events:1"]
    gate.released.set()
    assert server.finished.done(rid).wait(WAIT), "the server never closed the response after the disconnect"
    assert server.app.records[rid].get("closed_early") is True
    assert "stream_completed" not in server.app.records[rid]
    server.assert_released(issuer.token(who))


def test_denials_format(server: Served, issuer: DemoIssuer) -> None:
    missing = server.request("GET", "/docs/1")
    problem(missing, 401, "missing_token")
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.headers["cache-control"] == "no-store"
    problem(server.request("GET", "/docs/1", headers={"authorization": "Basic dXNlcjpwYXNz"}), 401,
            "missing_token")
    token = issuer.token(sub())
    forged = token[: len(token) // 2] + "." + token[len(token) // 2:]
    invalid = server.request("GET", "/docs/1", forged)
    problem(invalid, 401, "invalid_token")
    assert invalid.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert forged not in invalid.text

    a, b, c = sub(), sub(), sub()
    server.hold("POST", "/exclusive", issuer.token(a))
    problem(server.request("GET", "/docs/1", issuer.token(a)), 409, "conflicting_action")
    server.hold("GET", "/docs/7", issuer.token(b))
    problem(server.request("GET", "/docs/7", issuer.token(c)), 423, "object_locked")
    server.hold("GET", "/slot", issuer.token(c))
    problem(server.request("GET", "/slot", issuer.token(c)), 429, "too_many_in_flight")

    d = sub()
    tok = issuer.token(d, sa_kind="agent", sid=f"{d}-s")
    assert server.request("GET", "/docs/2", tok, rid=uuid.uuid4().hex).status_code == 200
    assert server.guard.pause_session(f"{d}-s")
    paused = server.request("GET", "/docs/2", tok)
    problem(paused, 403, "session_paused")
    assert paused.headers["www-authenticate"].startswith("Bearer")


class Broken(MemoryStore):
    def admit(self, admission: Admission) -> Ticket | Denial:
        raise StoreUnavailable("store down s3cr3t")


def test_store_failure_is_503_and_fail_open_admits(issuer: DemoIssuer) -> None:
    g = make_guard(issuer, Broken(), retry_after=4)
    try:
        with served(g) as srv:
            who = sub()
            down = srv.request("GET", "/docs/1", issuer.token(who))
            problem(down, 503, "store_unavailable")
            assert down.headers["retry-after"] == "4"
            assert "s3cr3t" not in down.text
            opened = srv.request("GET", "/open", issuer.token(who), rid=uuid.uuid4().hex)
            assert opened.status_code == 200
            assert (opened.json()["principal"], opened.json()["ticket_id"]) == (who, None)
            problem(srv.request("GET", "/open"), 401, "missing_token")
    finally:
        g.close()


# -- driven directly: exactly once -----------------------------------------------------------------------------

class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.released: Counter[str] = Counter()
        self._count_lock = threading.Lock()

    def release(self, ticket: Ticket) -> None:
        with self._count_lock:
            self.released[ticket.ticket_id] += 1
        super().release(ticket)


@pytest.fixture
def counting(issuer: DemoIssuer) -> Iterator[tuple[Guard, CountingStore]]:
    store = CountingStore()
    g = make_guard(issuer, store)
    try:
        yield g, store
    finally:
        g.close()


def environ(path: str, token: str | None) -> Environ:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    env: Environ = create_environ(path, headers=headers)
    env["REMOTE_ADDR"] = "127.0.0.1"
    return env


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
    _start_response.status = status  # type: ignore[attr-defined]
    return lambda data: None


class ClosingBody:
    """A response iterable with a close() that can be told to fail."""

    def __init__(self, fail: bool = False) -> None:
        self.closes = 0
        self.fail = fail

    def __iter__(self) -> Iterator[bytes]:
        yield b"body"

    def close(self) -> None:
        self.closes += 1
        if self.fail:
            raise OSError("close failed")


def test_released_on_close_not_when_the_app_returns(counting: tuple[Guard, CountingStore],
                                                    issuer: DemoIssuer) -> None:
    g, store = counting
    seen: dict[str, Any] = {}
    body = ClosingBody()

    def app(environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
        seen["ctx"] = environ["sa_middleware"]
        start_response("200 OK", [])
        return body

    result = SessionAwareWSGIMiddleware(app, guard=g)(environ("/docs/3", issuer.token(sub())), _start_response)
    ticket = seen["ctx"].ticket_id
    assert [lk.ticket_id for lk in g.locks()] == [ticket]  # the app returned; the response is not sent yet
    assert list(result) == [b"body"]
    assert [lk.ticket_id for lk in g.locks()] == [ticket]  # iterated, but not closed yet
    result.close()  # type: ignore[attr-defined]
    assert g.locks() == []
    result.close()  # type: ignore[attr-defined]  # a second close (some servers do) releases nothing more
    assert store.released == {ticket: 1}
    assert body.closes == 2  # the app's own close() is always forwarded


def test_concurrent_closes_release_once(counting: tuple[Guard, CountingStore], issuer: DemoIssuer) -> None:
    g, store = counting

    def app(environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [])
        return [b"x"]

    result: Any = SessionAwareWSGIMiddleware(app, guard=g)(environ("/docs/4", issuer.token(sub())), _start_response)
    barrier = threading.Barrier(8)

    def close() -> None:
        barrier.wait(WAIT)
        result.close()
    threads = [threading.Thread(target=close) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert list(store.released.values()) == [1]


def test_release_when_the_apps_close_raises(counting: tuple[Guard, CountingStore], issuer: DemoIssuer) -> None:
    g, store = counting
    body = ClosingBody(fail=True)

    def app(environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
        start_response("200 OK", [])
        return body

    result: Any = SessionAwareWSGIMiddleware(app, guard=g)(environ("/docs/5", issuer.token(sub())), _start_response)
    list(result)
    with pytest.raises(OSError, match="close failed"):
        result.close()
    assert g.locks() == []
    assert sum(store.released.values()) == 1


def test_release_when_the_app_raises_direct(counting: tuple[Guard, CountingStore], issuer: DemoIssuer) -> None:
    g, store = counting

    def app(environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
        assert [lk.key for lk in g.locks()] == ["doc:6"]
        raise KeyError("app bug")

    with pytest.raises(KeyError, match="app bug"):
        SessionAwareWSGIMiddleware(app, guard=g)(environ("/docs/6", issuer.token(sub())), _start_response)
    assert g.locks() == []
    assert sum(store.released.values()) == 1


def test_refused_request_never_reaches_the_app(counting: tuple[Guard, CountingStore]) -> None:
    g, store = counting
    calls: list[Environ] = []

    def app(environ: Environ, start_response: Callable[..., Any]) -> Iterable[bytes]:
        calls.append(environ)
        return []

    body = SessionAwareWSGIMiddleware(app, guard=g)(environ("/docs/1", None), _start_response)
    assert calls == []
    assert _start_response.status.startswith("401 ")  # type: ignore[attr-defined]
    assert json.loads(b"".join(body))["code"] == "missing_token"
    assert store.released == Counter()


def test_constructor_needs_a_guard() -> None:
    with pytest.raises(TypeError):
        SessionAwareWSGIMiddleware(App, guard=None)  # type: ignore[arg-type]


def test_table_matches_the_utf8_path_the_router_sees(issuer: DemoIssuer) -> None:
    """PATH_INFO carries the URL's bytes as latin-1 (PEP 3333); routers decode it as UTF-8, and so does the table:
    a non-ASCII route is not left to default_policy, and an object has the key it has under ASGI."""
    guard = Guard(store="memory://", keys=issuer.public_pem, algorithms=["RS256"], issuer=issuer.issuer,
                  audience=issuer.audience, policies={"GET /docs/{name}": Policy(locks=["doc:{name}"]),
                                                      "POST /café": Policy(scopes={"cafe:order"})})

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        start_response("200 OK", [("content-type", "application/json")])
        return [json.dumps(dict(environ["sa_middleware"].fencing_tokens)).encode()]

    url, stop = serve_wsgi(SessionAwareWSGIMiddleware(app, guard=guard))
    try:
        with httpx.Client(base_url=url, timeout=WAIT) as http:
            headers = {"authorization": f"Bearer {issuer.token(sub())}"}
            assert http.post("/caf%C3%A9", headers=headers).status_code == 403
            resp = http.get("/docs/caf%C3%A9", headers=headers)
            assert resp.status_code == 200
            support.assert_fences(resp.json(), {"doc:café"})
    finally:
        stop()
        guard.close()
