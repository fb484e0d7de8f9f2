"""The Starlette adapter (``sa_middleware.adapters.starlette``) on real uvicorn servers.

A Starlette app with a view per policy (``@policy`` on the endpoints; ``?hold=NAME`` parks a view at a gate until
the test releases it) runs behind the adapter under uvicorn, wrapped from outside by a ``Tracker`` that tells when
the app (and so the middleware's release) has finished a request (``?rid=ID``). Websockets are driven at the ASGI
level through the same app here (exact message sequences); ``test_starlette_websocket_server.py`` runs them through
uvicorn with a real websocket client.

The bodies shared with ``test_fastapi.py`` (the denial table, the context, streams, the five behaviours) take a
``make`` factory that builds a fresh :class:`Site` (own Guard, own SQLite file) for the framework under test.
"""

from __future__ import annotations

import inspect
import json
import queue
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint, WebSocketEndpoint
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Host, Mount, Route, Router, WebSocketRoute
from starlette.websockets import WebSocket
from support import WAIT, Gates, Served, Tracker, assert_fences, problem, sub, unreachable_jwks_url

from sa_middleware import CODES, ConfigurationError, Guard, Policy, SAContext
from sa_middleware.adapters._common import POLICY_ATTR, policy_of
from sa_middleware.adapters.starlette import SessionAwareMiddleware, policy, sa_context
from sa_middleware.demo import DemoIssuer, serve_asgi

Message = dict[str, Any]
Make = Callable[..., "Site"]

# the Guard's own table: combined with the endpoint policies (endpoint fields win)
TABLE = {
    "GET /combo/{id}": Policy(locks=["combo:{id}"], max_in_flight=1),
    "GET /open-door": Policy(public=True),
}
DOC = uuid.UUID("6f1c2a4e-8b0d-4c1e-9a57-3e2f7d9b1c05")


# -- the app's gates and what its views saw -----------------------------------------------------------------------

class Bench(Gates):
    """``?hold=NAME`` parks a view at a gate; ``?rid=ID`` records what the view saw under that id."""

    def __init__(self, guard: Guard) -> None:
        super().__init__()
        self.guard = guard
        self.records: dict[str, dict[str, Any]] = {}

    async def park(self, conn: HTTPConnection) -> None:
        name = conn.query_params.get("hold")
        if name:
            gate = self.gate(name)
            gate.entered.set()
            assert await anyio.to_thread.run_sync(gate.released.wait, WAIT), f"gate {name} never released"

    async def seen(self, conn: HTTPConnection, dependency: SAContext | None = None) -> dict[str, Any]:
        """The view's context (``request.state.sa``), checked against the scope and the dependency."""
        ctx: SAContext = conn.state.sa
        body = {
            "principal": ctx.principal, "kind": ctx.kind, "session_id": ctx.session_id, "route": ctx.route,
            "params": {k: [type(v).__name__, str(v)] for k, v in ctx.params.items()},
            "ticket_id": ctx.ticket_id, "fencing_tokens": dict(ctx.fencing_tokens), "claims": dict(ctx.claims),
            "same": (ctx is conn.scope["sa_middleware"] and sa_context(conn) is ctx
                     and (dependency is None or dependency is ctx)),
            "locks": sorted([lk.key, lk.mode, lk.ticket_id] for lk in await self.guard.alocks()),
        }
        rid = conn.query_params.get("rid")
        if rid:
            self.records[rid] = body
        return body


def starlette_app(bench: Bench, guard: Guard, how: str = "add_middleware") -> Any:
    """The test app; ``how`` the middleware is installed: ``add_middleware``, ``Middleware`` or ``outside``."""

    def view(**fields: Any) -> Callable[[Request], Awaitable[JSONResponse]]:
        async def endpoint(request: Request) -> JSONResponse:
            await bench.park(request)
            return JSONResponse(await bench.seen(request))
        return policy(**fields)(endpoint) if fields else endpoint

    @policy(exclusive=True, locks=["stream:{id}"])
    async def stream(request: Request) -> StreamingResponse:
        await bench.seen(request)

        async def chunks() -> AsyncIterator[bytes]:
            yield b"first"
            await bench.park(request)
            yield b"last"
        return StreamingResponse(chunks(), media_type="text/plain")

    @policy(locks=["boom:{id}"])
    async def boom(request: Request) -> JSONResponse:
        raise RuntimeError("the view failed")

    @policy(locks=["item:{id}"], lock_mode="shared")  # every method of the class...
    class Item(HTTPEndpoint):
        async def get(self, request: Request) -> JSONResponse:
            await bench.park(request)
            return JSONResponse(await bench.seen(request))

        @policy(lock_mode="exclusive")  # ...and this one's own fields win
        async def put(self, request: Request) -> JSONResponse:
            await bench.park(request)
            return JSONResponse(await bench.seen(request))

    @policy(locks=["room:{room}"])
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json(await bench.seen(websocket))
        await websocket.close()

    @policy(locks=["chan:{room}"])
    class Channel(WebSocketEndpoint):
        encoding = "json"

        @policy(lock_mode="shared")
        async def on_connect(self, websocket: WebSocket) -> None:
            await websocket.accept()
            await websocket.send_json(await bench.seen(websocket))

    @policy(locks=["raw:{path}"])
    async def raw(scope: Any, receive: Any, send: Any) -> None:  # a plain ASGI app, mounted
        ctx: SAContext = scope["sa_middleware"]
        await JSONResponse({"route": ctx.route, "fencing_tokens": dict(ctx.fencing_tokens)})(scope, receive, send)

    routes = [
        Route("/public", view(public=True)),
        Route("/whoami", view()),
        Route("/exclusive", view(exclusive=True), methods=["POST"]),
        Route("/tickets", view(tags={"tickets"}, raises_risk=1, risk_window=60), methods=["POST"]),
        Route("/payments/{id:int}/approve", view(exclusive=True, max_risk=0, locks=["payment:{id}"],
                                                 scopes={"payments:approve"}), methods=["POST"]),
        Route("/objects/{id:int}", view(locks=["object:{id}"], on_lock_conflict="pause"), methods=["PUT"]),
        Route("/once", view(one_time=True), methods=["POST"]),
        Route("/mfa", view(max_auth_age=300, acr_values=["urn:example:mfa"]), methods=["POST"]),
        Route("/device", view(require_compliant_device=True), methods=["POST"]),
        Route("/solo", view(max_sessions=1)),
        Route("/slot", view(max_in_flight=1)),
        Route("/combo/{id:int}", view(max_in_flight=2)),
        Route("/stream/{id:int}", stream),
        Route("/boom/{id:int}", boom),
        Route("/items/{id:int}", Item),
        Mount("/orgs/{org}", routes=[Route("/docs/{doc:uuid}", view(locks=["doc:{org}:{doc}"]))]),
        Mount("/sub", app=Starlette(routes=[Route("/things/{n:int}", view(locks=["thing:{n}"]))])),
        Mount("/raw", app=raw),
        WebSocketRoute("/ws/{room}", ws),
        WebSocketRoute("/channels/{room}", Channel),
        Host("api.example.test", app=Router(routes=[Route("/hosted/{id:int}", view(locks=["hosted:{id}"]))])),
    ]
    if how == "Middleware":
        return Starlette(routes=routes, middleware=[Middleware(SessionAwareMiddleware, guard=guard)])
    if how == "outside":
        return SessionAwareMiddleware(Starlette(routes=routes), guard=guard)
    app = Starlette(routes=routes)
    app.add_middleware(SessionAwareMiddleware, guard=guard)
    return app


# -- a served app ------------------------------------------------------------------------------------------------

class Site(Served[Bench]):
    """The app under uvicorn with its Guard (an own SQLite file ``db``) and the token issuer."""

    def __init__(self, guard: Guard, bench: Bench, app: Any, issuer: DemoIssuer, db: Path) -> None:
        finished = Tracker(app)
        super().__init__(guard, bench, finished, serve_asgi(finished.asgi_app()))
        self.asgi = app
        self.issuer = issuer
        self.db = db

    def token(self, who: str, **claims: Any) -> str:
        return self.issuer.token(who, **claims)

    def ok(self, method: str, path: str, token: str | None = None, **options: Any) -> dict[str, Any]:
        """A request that must be admitted; returns once its ticket is released."""
        resp = self.request(method, path, token, rid=uuid.uuid4().hex, **options)
        assert resp.is_success, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def statuses(self, who: str) -> dict[str, str]:
        return {s.session_id: s.status for s in self.guard.sessions(who)}

    def held(self, method: str, path: str, token: str) -> Held:
        """A request parked inside its view (fails the test if it is refused instead)."""
        return Held(self, method, path, token)


class Held:
    """A request parked at a gate inside its view, until :meth:`release`."""

    def __init__(self, site: Site, method: str, path: str, token: str) -> None:
        name = uuid.uuid4().hex[:10]
        self.gate = site.app.gate(name)
        self.response: httpx.Response | None = None
        sep = "&" if "?" in path else "?"

        def run() -> None:  # returns once the middleware has finished the request (released its ticket)
            self.response = site.request(method, f"{path}{sep}hold={name}", token, rid=uuid.uuid4().hex)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        while not self.gate.entered.wait(0.05):
            if not self._thread.is_alive():
                pytest.fail(f"held request was refused: {self.response and self.response.text}")

    def release(self) -> httpx.Response:
        self.gate.released.set()
        self._thread.join(WAIT)
        assert self.response is not None, "held request did not finish"
        return self.response


@contextmanager
def sites(issuer: DemoIssuer, tmp_path: Path, build: Callable[..., Any]) -> Iterator[Make]:
    """A factory of served apps built by ``build(bench, guard, **options)``; all closed at the end."""
    made: list[Site] = []

    def make(*, timeout: float | None = None, jwks_url: str | None = None, **options: Any) -> Site:
        db = tmp_path / f"site-{len(made)}.db"
        guard = Guard(store=f"sqlite:///{db}" + (f"?timeout={timeout}" if timeout else ""),
                      keys=None if jwks_url else issuer.public_pem, jwks_url=jwks_url, algorithms=["RS256"],
                      issuer=issuer.issuer, audience=issuer.audience, policies=TABLE,
                      default_policy=Policy(max_sessions=3))
        bench = Bench(guard)
        try:
            site = Site(guard, bench, build(bench, guard, **options), issuer, db)
        except BaseException:
            guard.close()
            raise
        made.append(site)
        return site

    try:
        yield make
    finally:
        for site in made:
            site.close()
            site.guard.close()


@pytest.fixture
def make_site(issuer: DemoIssuer, tmp_path: Path) -> Iterator[Make]:
    with sites(issuer, tmp_path, starlette_app) as make:
        yield make


@pytest.fixture
def site(make_site: Make) -> Site:
    return make_site()


# -- websockets at the ASGI level ----------------------------------------------------------------------------------

def ws_session(app: Any, path: str, token: str | None = None, *after: Message) -> list[Message]:
    """Connect to ``path``, play ``after`` once the app has accepted, and return what the app sent."""
    headers = [(b"host", b"testserver"), (b"user-agent", b"ws-test")]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    scope = {"type": "websocket", "asgi": {"version": "3.0"}, "http_version": "1.1", "scheme": "ws", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 50001), "server": ("testserver", 80), "subprotocols": []}
    incoming = [{"type": "websocket.connect"}, *after]
    sent: list[Message] = []
    accepted = anyio.Event() if after else None

    async def receive() -> Message:
        if incoming and (incoming[0]["type"] == "websocket.connect" or accepted is None or accepted.is_set()):
            return incoming.pop(0)
        if incoming and accepted is not None:
            await accepted.wait()
            return incoming.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)
        if accepted is not None and message["type"] == "websocket.send":
            accepted.set()

    async def main() -> None:
        with anyio.fail_after(WAIT):
            await app(scope, receive, send)

    anyio.run(main)
    return sent


def ws_seen(sent: list[Message]) -> dict[str, Any]:
    assert [m["type"] for m in sent][:2] == ["websocket.accept", "websocket.send"], sent
    body: dict[str, Any] = json.loads(sent[1]["text"])
    return body


# -- shared bodies: every denial code through the adapter ------------------------------------------------------

def forged(token: str) -> str:
    return token[:-10] + ("A" if token[-10] != "A" else "B") + token[-9:]


def _missing_token(make: Make) -> httpx.Response:
    return make().request("GET", "/whoami")


def _invalid_token(make: Make) -> httpx.Response:
    site = make()
    return site.request("GET", "/whoami", forged(site.token(sub())))


def _stale_generation(make: Make) -> httpx.Response:
    site, who = make(), sub()
    token = site.token(who, gen=1)
    site.ok("GET", "/whoami", token)
    assert site.guard.rotate(who) == 2
    return site.request("GET", "/whoami", token)


def _token_revoked(make: Make) -> httpx.Response:
    site, who = make(), sub()
    token = site.token(who, iat=time.time() - 30)
    site.guard.revoke_principal(who)
    return site.request("GET", "/whoami", token)


def _session_revoked(make: Make) -> httpx.Response:
    site, who = make(), sub()
    token = site.token(who, sid=f"{who}-s")
    site.ok("GET", "/whoami", token)
    assert site.guard.revoke_session(f"{who}-s")
    return site.request("GET", "/whoami", token)


def _credential_compromised(make: Make) -> httpx.Response:
    site, who = make(), sub()
    token = site.token(who, sid=f"{who}-s", iat=time.time() - 5)
    site.ok("GET", "/whoami", token)
    assert site.guard.report_compromise(sub=who) == [f"{who}-s"]
    return site.request("GET", "/whoami", token)


def _token_replayed(make: Make) -> httpx.Response:
    site = make()
    token = site.token(sub())
    site.ok("POST", "/once", token)  # the endpoint's one_time=True
    return site.request("POST", "/once", token)


def _token_reuse(make: Make) -> httpx.Response:
    site = make()
    token = site.token(sub())
    site.hold("GET", "/whoami", token)  # in flight from this client...
    return site.request("GET", "/whoami", token, headers={"user-agent": "another-client/1.0"})  # ...and another


def _step_up_required(make: Make) -> httpx.Response:
    site = make()
    return site.request("POST", "/mfa", site.token(sub(), auth_time=int(time.time()) - 3600, acr="urn:example:mfa"))


def _insufficient_scope(make: Make) -> httpx.Response:
    site = make()
    return site.request("POST", "/payments/1/approve", site.token(sub(), scope="tickets"))


def _session_paused(make: Make) -> httpx.Response:
    site, who = make(), sub()
    token = site.token(who, sa_kind="agent", sid=f"{who}-s")
    site.ok("GET", "/whoami", token)
    assert site.guard.pause_session(f"{who}-s")
    return site.request("GET", "/whoami", token)


def _device_noncompliant(make: Make) -> httpx.Response:
    site, who = make(), sub()
    site.guard.set_device_status(f"dev-{who}", False)
    return site.request("POST", "/device", site.token(who, device_id=f"dev-{who}"))


def _too_many_sessions(make: Make) -> httpx.Response:
    site, who = make(), sub()
    site.ok("GET", "/solo", site.token(who, sid=f"{who}-a"))  # the endpoint's max_sessions=1
    return site.request("GET", "/solo", site.token(who, sid=f"{who}-b"))


def _risk_too_high(make: Make) -> httpx.Response:
    site, who = make(), sub()
    token = site.token(who, sa_kind="agent", scope="tickets payments:approve")
    site.ok("POST", "/tickets", token)
    return site.request("POST", "/payments/1/approve", token)


def _conflicting_action(make: Make) -> httpx.Response:
    site, who = make(), sub()
    site.hold("POST", "/exclusive", site.token(who))
    return site.request("GET", "/whoami", site.token(who))


def _object_locked(make: Make) -> httpx.Response:
    site = make()
    site.hold("PUT", "/objects/5", site.token(sub()))
    return site.request("PUT", "/objects/5", site.token(sub()))


def _too_many_in_flight(make: Make) -> httpx.Response:
    site, who = make(), sub()
    site.hold("GET", "/slot", site.token(who))
    return site.request("GET", "/slot", site.token(who))


def _store_unavailable(make: Make) -> httpx.Response:
    site = make(timeout=0.2)
    token = site.token(sub())
    blocker = sqlite3.connect(site.db, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")  # another process holds the store's database
        try:
            return site.request("GET", "/whoami", token)
        finally:
            blocker.execute("ROLLBACK")
    finally:
        blocker.close()


def _keys_unavailable(make: Make) -> httpx.Response:
    site = make(jwks_url=unreachable_jwks_url())
    return site.request("GET", "/whoami", site.token(sub()))


def _invalid_request(make: Make) -> httpx.Response:
    site = make()  # the app would run DELETE, the Guard would decide GET: refused
    return site.request("GET", "/whoami", site.token(sub()), headers={"x-http-method-override": "DELETE"})


DENIALS: dict[str, Callable[[Make], httpx.Response]] = {
    "missing_token": _missing_token, "invalid_token": _invalid_token, "stale_generation": _stale_generation,
    "token_revoked": _token_revoked, "session_revoked": _session_revoked,
    "credential_compromised": _credential_compromised, "token_replayed": _token_replayed,
    "token_reuse": _token_reuse, "step_up_required": _step_up_required, "insufficient_scope": _insufficient_scope,
    "session_paused": _session_paused, "device_noncompliant": _device_noncompliant,
    "too_many_sessions": _too_many_sessions, "risk_too_high": _risk_too_high,
    "conflicting_action": _conflicting_action, "object_locked": _object_locked,
    "too_many_in_flight": _too_many_in_flight, "store_unavailable": _store_unavailable,
    "keys_unavailable": _keys_unavailable,
    "invalid_request": _invalid_request,
}


def check_denial(make: Make, code: str) -> None:
    problem(DENIALS[code](make), CODES[code][0], code)


# -- shared bodies: context, params, table + endpoint, 404/405, release -------------------------------------------

def check_context(site: Site) -> None:
    who = sub()
    body = site.ok("GET", "/whoami", site.token(who, sa_kind="agent", sid=f"{who}-s1", team="blue"))
    assert body["same"] is True  # request.state.sa is scope["sa_middleware"] (and the dependency's)
    assert (body["principal"], body["kind"], body["session_id"]) == (who, "agent", f"{who}-s1")
    assert body["claims"]["team"] == "blue"
    assert body["route"] == "GET /whoami" and body["fencing_tokens"] == {}
    assert isinstance(body["ticket_id"], str) and body["ticket_id"]

    public = site.ok("GET", "/public")  # no token; the view still finds a context, with no principal
    assert public["same"] is True
    assert (public["principal"], public["session_id"], public["ticket_id"]) == (None, None, None)


def check_params(site: Site) -> None:
    token = site.token(sub())
    obj = site.ok("PUT", "/objects/007", token)  # the framework's int convertor: one canonical lock key
    assert obj["route"] == "PUT /objects/{id:int}"
    assert obj["params"] == {"id": ["int", "7"]}
    assert_fences(obj["fencing_tokens"], {"object:7"})
    assert obj["locks"] == [["object:7", "exclusive", obj["ticket_id"]]]  # the view runs while the lock is held
    assert_fences(site.ok("PUT", "/objects/7", token)["fencing_tokens"], {"object:7"}, after=obj["fencing_tokens"])

    doc = site.ok("GET", f"/orgs/acme/docs/{str(DOC).upper()}", token)  # mount params, uuid convertor
    assert doc["route"] == "GET /orgs/{org}/docs/{doc:uuid}"
    assert doc["params"] == {"org": ["str", "acme"], "doc": ["UUID", str(DOC)]}
    assert_fences(doc["fencing_tokens"], {f"doc:acme:{DOC}"})


def check_table_and_endpoint_combine(site: Site) -> None:
    token = site.token(sub(), sid=f"{sub()}-s")  # one session: the default policy allows 3
    # the lock comes from the Guard table ("GET /combo/{id}"), filled with the framework's int parameter
    first = site.ok("GET", "/combo/007", token)
    assert_fences(first["fencing_tokens"], {"combo:7"})
    assert first["route"] == "GET /combo/{id:int}"
    # max_in_flight: the endpoint's 2 wins over the table's 1
    site.hold("GET", "/combo/1", token)
    site.hold("GET", "/combo/2", token)
    problem(site.request("GET", "/combo/3", token), 429, "too_many_in_flight")


def check_unrouted(site: Site) -> None:
    token = site.token(sub())
    # no route: the Guard table / default policy decides, so a 404 needs a token too (no route enumeration)
    problem(site.request("GET", "/nowhere"), 401, "missing_token")
    assert site.request("GET", "/nowhere", token, rid=uuid.uuid4().hex).status_code == 404
    assert site.request("GET", "/open-door", rid=uuid.uuid4().hex).status_code == 404  # public in the table
    # a wrong method: the endpoint's policy does not apply (GET /public is public, POST /public is not)
    problem(site.request("POST", "/public"), 401, "missing_token")
    problem(site.request("POST", "/whoami"), 401, "missing_token")
    assert site.request("POST", "/whoami", token, rid=uuid.uuid4().hex).status_code == 405


def check_release_on_exception(site: Site) -> None:
    who = sub()
    assert site.request("GET", "/boom/1", site.token(who), rid=uuid.uuid4().hex).status_code == 500
    site.assert_released(site.token(who))


def check_stream(site: Site) -> None:
    who = sub()
    token, other = site.token(who), site.token(who)
    with site.stream("/stream/1", token) as (resp, gate, rid):
        assert resp.status_code == 200
        chunks = resp.iter_raw()
        first = b""
        while first != b"first":
            first += next(chunks)
        assert gate.entered.wait(WAIT)  # the stream is parked after its first chunk, still in flight
        assert [(lk.key, lk.ticket_id) for lk in site.guard.locks()] == \
            [("stream:1", site.app.records[rid]["ticket_id"])]
        problem(site.request("POST", "/exclusive", other, rid=uuid.uuid4().hex), 409, "conflicting_action")
        assert not site.finished.done(rid).is_set()
        gate.released.set()
        assert b"".join(chunks) == b"last"
    assert site.finished.done(rid).wait(WAIT)
    site.assert_released(other)  # once the stream ended, the same request is admitted


# -- shared bodies: the five behaviours, with real concurrency ----------------------------------------------------

def behaviour_agent_ticket_blocks_approval(site: Site) -> None:
    agent = f"agent-{sub()}"
    token = site.token(agent, sa_kind="agent", sid=f"{agent}-s1", scope="tickets payments:approve")
    ticket = site.held("POST", "/tickets", token)  # provably in flight: parked inside the view

    results: queue.Queue[httpx.Response] = queue.Queue()
    approver = threading.Thread(target=lambda: results.put(site.request("POST", "/payments/42/approve", token)))
    approver.start()
    approver.join(WAIT)
    problem(results.get(timeout=WAIT), 409, "conflicting_action")
    assert site.guard.locks() == []  # the refused approval holds no payment lock
    done = ticket.release()
    assert done.status_code == 200 and done.json()["principal"] == agent

    # the finished ticket raised the agent's risk for its window: the approval (max_risk=0) is refused
    problem(site.request("POST", "/payments/42/approve", token), 403, "risk_too_high")

    other = f"agent-{sub()}"
    ok = site.ok("POST", "/payments/42/approve", site.token(other, sa_kind="agent", scope="payments:approve"))
    assert_fences(ok["fencing_tokens"], {"payment:42"})
    assert ok["route"] == "POST /payments/{id:int}/approve"


def behaviour_rotation_mid_session(site: Site) -> None:
    svc = f"svc-{sub()}"
    sid = f"{svc}-s1"
    old = site.token(svc, client_id=svc, gen=1, sid=sid)
    assert site.ok("GET", "/whoami", old)["kind"] == "service"
    in_flight = site.held("GET", "/whoami", old)  # a request of the old generation is running...
    assert site.guard.rotate(svc) == 2  # ...when the credential is rotated
    problem(site.request("GET", "/whoami", old), 401, "stale_generation")
    assert in_flight.release().status_code == 200  # admitted before the rotation: it completes

    new = site.token(svc, client_id=svc, gen=2, sid=sid)
    site.ok("GET", "/whoami", new)
    assert site.statuses(svc) == {sid: "active"}
    problem(site.request("GET", "/whoami", old), 401, "stale_generation")
    problem(site.request("POST", "/payments/43/approve", new), 403, "insufficient_scope")
    scoped = site.token(svc, client_id=svc, gen=2, sid=sid, scope="payments:approve")
    assert_fences(site.ok("POST", "/payments/43/approve", scoped)["fencing_tokens"], {"payment:43"})


def behaviour_human_and_workflow(site: Site) -> None:
    run = sub()
    human, flow = f"alice-{run}", f"workflow-{run}"
    htok = site.token(human, sid=f"{human}-s1")
    ftok = site.token(flow, sa_kind="service", sid=f"{flow}-s1")

    # the human writes first: the workflow that hits the lock is paused
    write = site.held("PUT", "/objects/7", htok)
    problem(site.request("PUT", "/objects/7", ftok), 403, "session_paused")
    assert site.statuses(flow) == {f"{flow}-s1": "paused"}
    problem(site.request("GET", "/whoami", ftok), 403, "session_paused")
    human_write = write.release().json()["fencing_tokens"]
    assert_fences(human_write, {"object:7"})
    problem(site.request("GET", "/whoami", ftok), 403, "session_paused")  # stays paused after the lock is gone
    assert site.guard.resume_session(f"{flow}-s1")
    assert_fences(site.ok("PUT", "/objects/7", ftok)["fencing_tokens"], {"object:7"}, after=human_write)

    # the workflow writes first: the human gets 423 and the workflow is paused
    held = site.held("PUT", "/objects/8", ftok)
    problem(site.request("PUT", "/objects/8", htok), 423, "object_locked")
    assert site.statuses(flow) == {f"{flow}-s1": "paused"}  # paused while its write is still in flight
    assert site.statuses(human) == {f"{human}-s1": "active"}
    flow_write = held.release()
    assert flow_write.status_code == 200  # the write already admitted completes
    problem(site.request("GET", "/whoami", ftok), 403, "session_paused")  # until an operator resumes it
    assert_fences(site.ok("PUT", "/objects/8", htok)["fencing_tokens"], {"object:8"},
                  after=flow_write.json()["fencing_tokens"])


def behaviour_compromise(site: Site) -> None:
    run = sub()
    bot, user = f"bot-{run}", f"bob-{run}"
    s1 = site.token(bot, sa_kind="agent", sid=f"{bot}-s1", gen=1)
    s2 = site.token(bot, sa_kind="agent", sid=f"{bot}-s2", gen=1)
    delegated = site.token(user, sid=f"{user}-via-{bot}", act={"sub": bot})
    own = site.token(user, sid=f"{user}-own")
    for token in (s1, s2, delegated, own):
        site.ok("GET", "/whoami", token)
    assert set(site.guard.report_compromise(session_id=f"{bot}-s1")) == {f"{bot}-s1", f"{bot}-s2",
                                                                         f"{user}-via-{bot}"}
    for token in (s1, s2, delegated):
        problem(site.request("GET", "/whoami", token), 401, "credential_compromised")
    site.ok("GET", "/whoami", own)  # the delegating user's own session is not related
    site.ok("GET", "/whoami", site.token(bot, sa_kind="agent", sid=f"{bot}-s1", gen=2))  # a newer generation
    problem(site.request("GET", "/whoami", s2), 401, "stale_generation")


def behaviour_parallel_sessions(site: Site) -> None:
    crawler = f"crawler-{sub()}"
    n, limit = 10, 3  # the Guard's default policy: max_sessions=3
    tokens = [site.token(crawler, sa_kind="agent", sid=f"{crawler}-s{i}") for i in range(n)]
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def open_session(i: int) -> None:
        try:
            barrier.wait(WAIT)
            results[i] = site.request("GET", "/whoami", tokens[i], rid=uuid.uuid4().hex)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=open_session, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 2)
    assert all(isinstance(r, httpx.Response) for r in results), results
    outcomes = Counter(r.status_code for r in results)
    assert outcomes == {200: limit, 403: n - limit}, outcomes
    for r in results:
        if r.status_code == 403:
            problem(r, 403, "too_many_sessions")
    admitted = {i for i, r in enumerate(results) if r.status_code == 200}
    assert set(site.statuses(crawler)) == {f"{crawler}-s{i}" for i in admitted}


BEHAVIOURS = [behaviour_agent_ticket_blocks_approval, behaviour_rotation_mid_session, behaviour_human_and_workflow,
              behaviour_compromise, behaviour_parallel_sessions]


# == the tests (Starlette) =========================================================================================

def test_the_denial_table_covers_every_code() -> None:
    assert set(DENIALS) == set(CODES)


@pytest.mark.parametrize("code", list(DENIALS))
def test_every_denial_code(make_site: Make, code: str) -> None:
    check_denial(make_site, code)


def test_context_in_request_state(site: Site) -> None:
    check_context(site)


def test_path_params_fill_lock_keys(site: Site) -> None:
    check_params(site)


def test_endpoint_policy_wins_over_the_table_and_combines_with_it(site: Site) -> None:
    check_table_and_endpoint_combine(site)


def test_unrouted_and_wrong_method_fail_closed(site: Site) -> None:
    check_unrouted(site)


def test_a_path_a_convertor_refuses_fails_closed(site: Site) -> None:
    # Starlette's int convertor raises ValueError on 4300+ digits while matching: no route, so the table decides
    problem(site.request("GET", "/items/" + "9" * 5000), 401, "missing_token")
    problem(site.request("GET", "/sub/things/" + "9" * 5000), 401, "missing_token")


def test_release_on_exception(site: Site) -> None:
    check_release_on_exception(site)


def test_streamed_response_holds_the_ticket_until_it_ends(site: Site) -> None:
    check_stream(site)


@pytest.mark.parametrize("behaviour", BEHAVIOURS, ids=lambda b: b.__name__.removeprefix("behaviour_"))
def test_five_behaviours(site: Site, behaviour: Callable[[Site], None]) -> None:
    behaviour(site)


@pytest.mark.parametrize("how", ["add_middleware", "Middleware", "outside"])
def test_ways_to_install(make_site: Make, how: str) -> None:
    site = make_site(how=how)
    problem(site.request("GET", "/whoami"), 401, "missing_token")
    doc = site.ok("GET", f"/orgs/o1/docs/{DOC}", site.token(sub()))
    assert doc["same"] is True
    assert doc["route"] == "GET /orgs/{org}/docs/{doc:uuid}"
    assert_fences(doc["fencing_tokens"], {f"doc:o1:{DOC}"})


def test_mounted_apps_and_hosts(site: Site) -> None:
    token = site.token(sub())
    thing = site.ok("GET", "/sub/things/0042", token)  # a Starlette app mounted: its own router's template
    assert thing["route"] == "GET /sub/things/{n:int}"
    assert_fences(thing["fencing_tokens"], {"thing:42"})
    raw = site.ok("GET", "/raw/a/b", token)  # a plain ASGI app mounted: the mount is the route
    assert set(raw) == {"route", "fencing_tokens"} and raw["route"] == "GET /raw/{path:path}"
    assert_fences(raw["fencing_tokens"], {"raw:a/b"})
    hosted = site.ok("GET", "/hosted/9", token, headers={"host": "api.example.test"})
    assert hosted["route"] == "GET /hosted/{id:int}"
    assert_fences(hosted["fencing_tokens"], {"hosted:9"})
    problem(site.request("GET", "/hosted/9", headers={"host": "api.example.test"}), 401, "missing_token")


def test_class_based_endpoint_class_and_method_policies(site: Site) -> None:
    reader = site.held("GET", "/items/1", site.token(sub()))  # the class's shared lock
    [lock] = site.guard.locks()
    assert (lock.key, lock.mode) == ("item:1", "shared")
    other = site.ok("GET", "/items/1", site.token(sub()))  # readers share
    assert other["route"] == "GET /items/{id:int}"
    assert_fences(other["fencing_tokens"], {"item:1"}, after={lock.key: lock.fencing_token})
    problem(site.request("PUT", "/items/1", site.token(sub())), 423, "object_locked")  # put's exclusive mode
    assert reader.release().status_code == 200
    writer = site.ok("PUT", "/items/1", site.token(sub()))
    assert writer["route"] == "PUT /items/{id:int}"
    assert [lock[:2] for lock in writer["locks"]] == [["item:1", "exclusive"]]


def test_websocket_admitted_with_context_and_lock(site: Site) -> None:
    who = sub()
    sent = ws_session(site.asgi, "/ws/lobby", site.token(who, sa_kind="agent", sid=f"{who}-ws"))
    seen = ws_seen(sent)
    assert seen["same"] is True and seen["principal"] == who
    assert seen["route"] == "WEBSOCKET /ws/{room}"
    assert_fences(seen["fencing_tokens"], {"room:lobby"})
    assert seen["locks"] == [["room:lobby", "exclusive", seen["ticket_id"]]]
    assert sent[-1]["type"] == "websocket.close"
    assert site.guard.locks() == []  # released when the session ended


def test_websocket_endpoint_class(site: Site) -> None:
    sent = ws_session(site.asgi, "/channels/lobby", site.token(sub()), {"type": "websocket.disconnect", "code": 1000})
    seen = ws_seen(sent)
    assert seen["route"] == "WEBSOCKET /channels/{room}"
    assert seen["locks"] == [["chan:lobby", "shared", seen["ticket_id"]]]  # class lock, on_connect's mode
    assert site.guard.locks() == []


@pytest.mark.parametrize("path", ["/ws/lobby", "/channels/lobby", "/ws-nowhere"])
def test_websocket_refused_with_1008(site: Site, path: str) -> None:
    assert ws_session(site.asgi, path) == [{"type": "websocket.close", "code": 1008, "reason": "missing_token"}]


def test_websocket_refused_for_a_paused_session(site: Site) -> None:
    who = sub()
    token = site.token(who, sa_kind="agent", sid=f"{who}-s")
    ws_seen(ws_session(site.asgi, "/ws/a", token))
    assert site.guard.pause_session(f"{who}-s")
    assert ws_session(site.asgi, "/ws/a", token) == [{"type": "websocket.close", "code": 1008,
                                                       "reason": "session_paused"}]


def test_lookup_is_cached_per_route_not_per_path(make_site: Make) -> None:
    site = make_site(how="outside")
    token = site.token(sub())
    for n in range(5):
        site.ok("PUT", f"/objects/{n}", token)
    mw = site.asgi
    assert isinstance(mw, SessionAwareMiddleware)
    assert [key[:2] for key in mw._cache] == [("/objects/{id:int}", "PUT")]


# -- start-up and decoration-time checks ----------------------------------------------------------------------------

def lifespan(app: Any) -> list[Message]:
    """Drive the lifespan start-up (and shutdown, if it started) of ``app``; returns what it sent."""
    sent: list[Message] = []
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

    async def receive() -> Message:
        if not incoming:
            await anyio.sleep_forever()
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    async def main() -> None:
        with anyio.fail_after(WAIT):
            await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)

    anyio.run(main)
    return sent


def bad_app(guard: Guard, kind: str) -> Starlette:
    async def view(request: Request) -> JSONResponse:
        return JSONResponse({})

    if kind == "function":
        routes = [Route("/pay/{pid:int}", policy(locks=["payment:{id}"])(view))]
    elif kind == "method":
        class Pay(HTTPEndpoint):
            @policy(locks=["payment:{id}"])
            async def post(self, request: Request) -> JSONResponse:
                return JSONResponse({})
        routes = [Route("/pay/{pid:int}", Pay)]
    else:
        routes = [Mount("/orgs/{org}", routes=[Route("/pay", policy(locks=["payment:{id}"])(view))])]
    app = Starlette(routes=routes)
    app.add_middleware(SessionAwareMiddleware, guard=guard)
    return app


@pytest.mark.parametrize("kind", ["function", "method", "mount"])
def test_lock_naming_a_missing_parameter_fails_the_start_up(guard: Guard, kind: str) -> None:
    sent = lifespan(bad_app(guard, kind))
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "payment:{id}" in sent[0]["message"] and "/pay" in sent[0]["message"]


def test_uvicorn_refuses_to_start_a_misconfigured_app(guard: Guard) -> None:
    import socket

    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    server = uvicorn.Server(uvicorn.Config(bad_app(guard, "function"), lifespan="auto", log_level="critical"))
    exits: list[object] = []

    def run(sock: socket.socket) -> None:
        try:
            server.run(sockets=[sock])
        except SystemExit as exc:  # uvicorn exits with its start-up failure code
            exits.append(exc.code)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        runner = threading.Thread(target=run, args=(sock,), daemon=True)
        runner.start()
        runner.join(WAIT)
        assert not runner.is_alive(), "uvicorn kept running"
    assert not server.started
    assert exits == [STARTUP_FAILURE]


def test_good_app_starts_and_mount_parameters_count(guard: Guard) -> None:
    async def view(request: Request) -> JSONResponse:
        return JSONResponse({})

    app = Starlette(routes=[Mount("/orgs/{org}", routes=[Route("/pay/{id}", policy(locks=["p:{org}:{id}"])(view))])])
    app.add_middleware(SessionAwareMiddleware, guard=guard, check_table=False)  # the fixture's table is another app's
    assert lifespan(app) == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]


def test_bad_policy_fails_at_decoration_naming_the_view() -> None:
    async def approve(request: Request) -> JSONResponse:
        return JSONResponse({})

    with pytest.raises(ConfigurationError, match=r"view .*approve.*max_sessions"):
        policy(max_sessions=0)(approve)
    with pytest.raises(ConfigurationError, match=r"view .*approve.*locks"):
        policy(locks=["payment:{a.b}"])(approve)
    with pytest.raises(TypeError):
        policy(max_session=1)  # type: ignore[call-arg]
    assert not hasattr(approve, POLICY_ATTR)


def test_policy_takes_exactly_the_policy_fields() -> None:
    params = inspect.signature(policy).parameters
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is None for p in params.values())
    assert list(params) == [f.name for f in fields(Policy) if f.init]


def test_policy_wraps_a_function_keeping_its_signature_and_a_class_keeping_its_identity() -> None:
    async def endpoint(request: Request, item: int = 3) -> JSONResponse:
        return JSONResponse({})

    before = inspect.signature(endpoint)
    guarded = policy(exclusive=True)(endpoint)
    assert guarded.__wrapped__ is endpoint  # type: ignore[attr-defined]
    assert inspect.signature(guarded) == before and inspect.iscoroutinefunction(guarded)
    assert getattr(guarded, POLICY_ATTR) == Policy(exclusive=True)
    assert policy(max_in_flight=2)(guarded) is guarded  # stacked: wrapped once
    assert getattr(guarded, POLICY_ATTR) == Policy(exclusive=True, max_in_flight=2)

    class Endpoint(HTTPEndpoint):
        async def get(self, request: Request) -> JSONResponse:
            return JSONResponse({})

    assert policy(exclusive=True)(Endpoint) is Endpoint


def test_policy_of_layers() -> None:
    @policy(locks=["x:{id}"], max_in_flight=2)
    class Base(HTTPEndpoint):
        async def get(self, request: Request) -> None: ...

        @policy(max_in_flight=1)
        async def post(self, request: Request) -> None: ...

    @policy(exclusive=True)  # refines the base's policy
    class Sub(Base):
        pass

    assert policy_of(Base, "GET") == Policy(locks=["x:{id}"], max_in_flight=2)
    assert policy_of(Base, "HEAD") == Policy(locks=["x:{id}"], max_in_flight=2)  # HEAD falls back to get
    assert policy_of(Base, "POST") == Policy(locks=["x:{id}"], max_in_flight=1)
    assert policy_of(Sub, "POST") == Policy(locks=["x:{id}"], max_in_flight=1, exclusive=True)
    assert policy_of(Base, None) == Policy(locks=["x:{id}"], max_in_flight=2)

    def as_view() -> None: ...
    as_view.view_class = Base  # type: ignore[attr-defined]  # what Django's and Flask's as_view() produce
    assert policy_of(as_view, "POST") == Policy(locks=["x:{id}"], max_in_flight=1)

    @policy(exclusive=True)
    @policy(exclusive=False, max_risk=0)  # stacked: the outer decorator's fields win
    def fn() -> None: ...
    assert policy_of(fn) == Policy(exclusive=True, max_risk=0)
    assert policy_of(partial(fn)) == Policy(exclusive=True, max_risk=0)
    assert policy_of(lambda: None) is None


def test_sa_context_without_the_middleware_is_a_programming_error() -> None:
    scope = {"type": "http", "method": "GET", "path": "/", "headers": [], "query_string": b""}
    with pytest.raises(RuntimeError, match="SessionAwareMiddleware"):
        sa_context(Request(scope))


# -- the example app --------------------------------------------------------------------------------------------

def check_example(module_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Import an example with SA_STORE / SA_DEV_KEY in ``tmp_path``, serve it, mint a token with the dev key."""
    import importlib.util

    from sa_middleware.devkeys import dev_key

    monkeypatch.setenv("SA_STORE", f"sqlite:///{tmp_path / 'example.db'}")
    monkeypatch.setenv("SA_DEV_KEY", str(tmp_path / "dev-key.pem"))
    monkeypatch.delenv("WORKBENCH_BACKEND", raising=False)
    path = Path(__file__).resolve().parents[2] / "examples" / module_file
    spec = importlib.util.spec_from_file_location(f"example_{uuid.uuid4().hex[:6]}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    base, stop = serve_asgi(module.app)
    try:
        key = dev_key()
        assert key.path == tmp_path / "dev-key.pem"
        who = f"agent-{sub()}"
        token = key.mint(who, sa_kind="agent", sid=f"{who}-s1", scope="tickets")
        auth = {"authorization": f"Bearer {token}"}
        health = httpx.get(f"{base}/health", timeout=WAIT)
        assert (health.status_code, health.json()) == (200, {"ok": True})
        me = httpx.get(f"{base}/whoami", headers=auth, timeout=WAIT)
        assert me.status_code == 200, me.text
        assert me.json() == {"principal": who, "kind": "agent", "session_id": f"{who}-s1", "route": "GET /whoami",
                             "fencing_tokens": {}}
        problem(httpx.get(f"{base}/whoami", timeout=WAIT), 401, "missing_token")
        problem(httpx.post(f"{base}/payments/42/approve", headers=auth, timeout=WAIT), 403, "insufficient_scope")
        ticket = httpx.post(f"{base}/tickets", headers=auth, timeout=WAIT)
        assert ticket.status_code == 201 and len(ticket.json()["ticket"]) == 32
        assert ticket.json()["context"]["route"] == "POST /tickets"
        obj = httpx.put(f"{base}/objects/007", headers=auth, timeout=WAIT)
        assert obj.status_code == 200, obj.text
        fences = obj.json()["context"]["fencing_tokens"]
        assert_fences(fences, {"object:7"})
        assert obj.json() == {"object": 7, "updated": True, "context": {
            "principal": who, "kind": "agent", "session_id": f"{who}-s1", "route": "PUT /objects/{id:int}",
            "fencing_tokens": fences}}
    finally:
        stop()
        module.guard.close()
    assert (tmp_path / "example.db").exists()


def test_example_imports_and_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check_example("starlette_app.py", tmp_path, monkeypatch)


def test_row5_endpoint_classes_and_websockets_refuse_without_the_middleware() -> None:
    ran: list[str] = []

    @policy(exclusive=True)
    class Things(HTTPEndpoint):
        async def get(self, request: Request) -> JSONResponse:
            ran.append("class")
            return JSONResponse({})

    @policy(locks=["room:{room}"])
    async def room(websocket: WebSocket) -> None:
        ran.append("websocket")
        await websocket.accept()

    app = Starlette(routes=[Route("/things", Things), WebSocketRoute("/ws/{room}", room)])

    async def call(kind: str, path: str) -> list[Message]:
        sent: list[Message] = []
        incoming = [{"type": "http.request", "body": b""} if kind == "http" else {"type": "websocket.connect"}]

        async def receive() -> Message:
            if not incoming:
                await anyio.sleep_forever()
            return incoming.pop(0)

        async def send(message: Message) -> None:
            sent.append(message)

        scope = {"type": kind, "path": path, "root_path": "", "method": "GET", "headers": [], "query_string": b"",
                 "asgi": {"version": "3.0"}}
        with anyio.fail_after(WAIT):
            await app(scope, receive, send)
        return sent

    http = anyio.run(call, "http", "/things")
    assert http[0]["status"] == 503 and json.loads(http[1]["body"])["code"] == "view_not_guarded"
    assert anyio.run(call, "websocket", "/ws/1") == [{"type": "websocket.close", "code": 1011, "reason": ""}]
    assert ran == []
