"""The Flask adapter (``sa_middleware.adapters.flask``): ``SessionAware`` + ``init_app``, ``SA_*`` configuration,
``@policy`` on views, class views and blueprints, ``flask.g.sa``, matching through ``app.url_map``, release on every
exit path, and the five behaviours on werkzeug's threaded server.

Most checks use Flask's test client (fast; ``SessionAwareTestClient`` reads and closes each response, and a
response opened with ``buffered=False`` keeps its ticket in flight until it is closed, which holds a request
without threads). Streams, exceptions and the behaviours also run on a real threaded server, with gates inside the
views (``?hold=NAME``) and an outer tracker that says when the server closed a response (``?rid=ID``); no sleeps.
"""

from __future__ import annotations

import importlib.util
import json
import queue
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import support
from flask import Blueprint, Flask, Response, g, stream_with_context
from flask import request as flask_request
from flask.testing import FlaskClient
from flask.views import MethodView, View
from support import WAIT, Served, Tracker, assert_fences, sub, unreachable_jwks_url
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import Client, TestResponse

from sa_middleware import ConfigurationError, Guard, Policy, SAContext, StoreUnavailable, demo
from sa_middleware.adapters.flask import SessionAware, SessionAwareTestClient, guard_from_config, policy
from sa_middleware.demo import DemoIssuer, Workbench, play, serve_wsgi
from sa_middleware.denials import Denial
from sa_middleware.records import Admission, Ticket
from sa_middleware.stores.memory import MemoryStore

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "flask_app.py"


# -- the test app --------------------------------------------------------------------------------------------------

class Bench(Workbench):
    """Gates (``?hold=NAME`` parks a view; ``/_demo/...`` control routes for ``demo.play``), what each view saw
    (``?rid=ID``), and every view call."""

    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, dict[str, Any]] = {}
        self.calls: list[str | None] = []
        self._names: set[str] = set()

    def gate(self, name: str) -> Any:
        self._names.add(name)
        return super().gate(name)

    def release_all(self) -> None:
        for name in list(self._names):
            self.gate(name).released.set()

    def park(self, name: str | None) -> None:
        if name:
            gate = self.gate(name)
            gate.entered.set()
            assert gate.released.wait(WAIT), f"gate {name} never released"


def described(bench: Bench, status: int = 200) -> tuple[dict[str, Any], int]:
    """The common view body: what the view sees in ``g.sa``, after parking at its gate if asked."""
    ctx: SAContext = g.sa
    bench.calls.append(flask_request.endpoint)
    rid = flask_request.args.get("rid")
    if rid:
        bench.records[rid] = {"ticket_id": ctx.ticket_id, "route": ctx.route,
                              "fencing_tokens": dict(ctx.fencing_tokens)}
    bench.park(flask_request.args.get("hold"))
    return {"principal": ctx.principal, "kind": ctx.kind, "session_id": ctx.session_id, "claims": dict(ctx.claims),
            "ticket_id": ctx.ticket_id, "fencing_tokens": dict(ctx.fencing_tokens), "route": ctx.route,
            "params": {k: v if isinstance(v, int | str) else str(v) for k, v in ctx.params.items()},
            "is_context": isinstance(ctx, SAContext), "same": ctx is flask_request.environ["sa_middleware"],
            "hook_saw": g.hook_saw}, status


# rule, methods, policy fields (None: no decorator)
ROUTES: list[tuple[str, list[str], dict[str, Any] | None]] = [
    ("/public", ["GET"], {"public": True}),
    ("/whoami", ["GET"], None),
    ("/docs/<int:id>", ["GET"], {"locks": ["doc:{id}"]}),
    ("/things/<uuid:u>", ["GET"], {"locks": ["thing:{u}"]}),
    ("/files/<path:p>", ["GET"], {"locks": ["file:{p}"]}),
    ("/exclusive", ["POST"], {"exclusive": True}),
    ("/slot", ["GET"], {"max_in_flight": 1}),
    ("/once", ["POST"], {"one_time": True}),
    ("/admin", ["POST"], {"scopes": {"admin"}}),
    ("/mfa", ["POST"], {"max_auth_age": 300, "acr_values": ["urn:example:mfa"]}),
    ("/device", ["POST"], {"require_compliant_device": True}),
    ("/single", ["GET"], {"max_sessions": 1}),
    ("/open", ["GET"], {"fail_open": True}),
    ("/items/", ["GET"], {"public": True}),
    # the workbench (demo.play drives these)
    ("/health", ["GET"], {"public": True}),
    ("/tickets", ["POST"], {"tags": {"tickets"}, "raises_risk": 1, "risk_window": 60}),
    ("/payments/<int:id>/approve", ["POST"],
     {"exclusive": True, "max_risk": 0, "locks": ["payment:{id}"], "scopes": {"payments:approve"}}),
    ("/objects/<int:id>", ["PUT"], {"locks": ["object:{id}"], "on_lock_conflict": "pause"}),
    # combined with the Guard table (see TABLE)
    ("/combo/<int:id>", ["POST"], {"scopes": {"view-scope"}, "exclusive": True}),
    ("/tablepublic", ["GET"], None),
    ("/viewwins", ["GET"], {"public": False}),
]

TABLE: dict[str, Any] = {  # SA_POLICIES, in the dict form the config accepts
    "POST /combo/{id}": {"scopes": {"table-scope"}, "locks": ["table:{id}"], "max_in_flight": 5},
    "GET /tablepublic": {"public": True},
    "GET /viewwins": {"public": True},
}


class Teapot(Exception):
    pass


def make_app(bench: Bench, ext: SessionAware | None = None, *, register: bool = True, **config: Any) -> Flask:
    """The test app; configured by ``config`` (SA_* keys) unless ``ext`` carries a guard."""
    app = Flask("flask_adapter_test")
    app.config.update(config)

    @app.before_request  # registered before init_app, yet g.sa is already there
    def early_hook() -> None:
        g.hook_saw = g.sa.principal

    for i, (rule, methods, fields) in enumerate(ROUTES):
        def view(**kwargs: Any) -> tuple[dict[str, Any], int]:
            return described(bench)
        if fields is not None:
            view = policy(**fields)(view)
        app.add_url_rule(rule, endpoint=f"r{i}", view_func=view, methods=methods)

    @app.get("/stream/<int:id>")
    @policy(exclusive=True, locks=["stream:{id}"])
    def stream(id: int) -> Response:
        hold, rid = flask_request.args.get("hold"), flask_request.args.get("rid", "-")

        @stream_with_context
        def chunks() -> Iterator[bytes]:
            yield b"first"
            bench.park(hold)
            bench.records[rid] = {"ticket_id": g.sa.ticket_id}  # g.sa inside the stream
            yield b"last"
        return Response(chunks(), mimetype="text/plain")

    @app.get("/boom/<int:id>")
    @policy(locks=["boom:{id}"])
    def boom(id: int) -> str:
        bench.calls.append("boom")
        raise RuntimeError("the view failed")

    @app.get("/teapot/<int:id>")
    @policy(locks=["teapot:{id}"])
    def teapot(id: int) -> str:
        raise Teapot()

    @app.errorhandler(Teapot)
    def short_and_stout(exc: Teapot) -> tuple[dict[str, Any], int]:
        return {"principal": g.sa.principal, "locks": sorted(g.sa.fencing_tokens)}, 418

    @app.errorhandler(404)
    def not_found(exc: Exception) -> tuple[dict[str, Any], int]:
        return {"error": "not found", "principal": g.sa.principal}, 404

    control = policy(public=True)(Blueprint("control", __name__, url_prefix="/_demo"))

    @control.route("/<path:rest>", methods=["GET", "POST"])
    def demo_control(rest: str) -> tuple[Any, int]:
        status, body = bench.control(flask_request.method, flask_request.path) or (404, {"error": "not found"})
        return body, status

    if register:
        app.register_blueprint(control)
    (ext or SessionAware()).init_app(app)
    if not register:
        app.register_blueprint(control)
    return app


def config(issuer: DemoIssuer, store: str = "memory://", **extra: Any) -> dict[str, Any]:
    values: dict[str, Any] = {"SA_STORE": store, "SA_KEYS": issuer.public_pem, "SA_ALGORITHMS": "RS256",
                              "SA_ISSUER": issuer.issuer, "SA_AUDIENCE": issuer.audience, "SA_POLICIES": TABLE,
                              "SA_DEFAULT_POLICY": {"max_sessions": 3}}
    values.update(extra)
    return values


def guard_of(app: Flask) -> Guard:
    guard = app.extensions["sa_middleware"]
    assert isinstance(guard, Guard)
    return guard


@pytest.fixture
def bench() -> Iterator[Bench]:
    b = Bench()
    yield b
    b.release_all()


@pytest.fixture
def app(bench: Bench, issuer: DemoIssuer, tmp_path: Path) -> Iterator[Flask]:
    flask_app = make_app(bench, **config(issuer, f"sqlite:///{tmp_path / 'flask.db'}"))
    try:
        yield flask_app
    finally:
        guard_of(flask_app).close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def problem(resp: TestResponse, status: int, code: str) -> dict[str, Any]:
    """``resp`` is the problem+json denial ``status`` / ``code``; returns its body."""
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = json.loads(resp.get_data())
    assert (body["code"], body["status"]) == (code, status)
    assert body["type"] and body["title"] and body["detail"]
    assert resp.headers["cache-control"] == "no-store"
    if status in (409, 423, 429, 503):
        assert int(resp.headers["retry-after"]) >= 1
        assert "www-authenticate" not in resp.headers
    else:
        assert "retry-after" not in resp.headers
    if status in (401, 403):
        assert resp.headers["www-authenticate"].startswith("Bearer")
    return body


# -- every denial code through the adapter ----------------------------------------------------------------------

class Broken(MemoryStore):
    def admit(self, admission: Admission) -> Ticket | Denial:
        raise StoreUnavailable("store down")


@dataclass
class Env:
    client: FlaskClient
    guard: Guard
    issuer: DemoIssuer
    bench: Bench

    def ok(self, resp: TestResponse) -> TestResponse:
        assert resp.status_code == 200, resp.get_data(as_text=True)
        return resp

    def refused(self, request: Callable[[], TestResponse]) -> TestResponse:
        """The final request of a case: it must never reach a view."""
        calls = len(self.bench.calls)
        resp = request()
        assert len(self.bench.calls) == calls, "a refused request reached the view"
        return resp


def _missing_token(e: Env) -> TestResponse:
    return e.refused(lambda: e.client.get("/whoami"))


def _invalid_token(e: Env) -> TestResponse:
    return e.refused(lambda: e.client.get("/whoami", headers=auth("not.a.token")))


def _stale_generation(e: Env) -> TestResponse:
    who = sub()
    tok = e.issuer.token(who, gen=1)
    e.ok(e.client.get("/whoami", headers=auth(tok)))
    e.guard.rotate(who)
    return e.refused(lambda: e.client.get("/whoami", headers=auth(tok)))


def _token_revoked(e: Env) -> TestResponse:
    who = sub()
    tok = e.issuer.token(who)
    e.ok(e.client.get("/whoami", headers=auth(tok)))
    e.guard.revoke_principal(who)
    return e.refused(lambda: e.client.get("/whoami", headers=auth(tok)))


def _session_revoked(e: Env) -> TestResponse:
    who = sub()
    tok = e.issuer.token(who, sid=f"{who}-s")
    e.ok(e.client.get("/whoami", headers=auth(tok)))
    e.guard.revoke_session(f"{who}-s")
    return e.refused(lambda: e.client.get("/whoami", headers=auth(tok)))


def _credential_compromised(e: Env) -> TestResponse:
    who = sub()
    tok, sibling = e.issuer.token(who, sid=f"{who}-s"), e.issuer.token(who, sid=f"{who}-s2")
    e.ok(e.client.get("/whoami", headers=auth(tok)))
    e.guard.report_compromise(session_id=f"{who}-s")
    return e.refused(lambda: e.client.get("/whoami", headers=auth(sibling)))  # a related context, issued before


def _token_replayed(e: Env) -> TestResponse:
    tok = e.issuer.token(sub())
    e.ok(e.client.post("/once", headers=auth(tok)))
    return e.refused(lambda: e.client.post("/once", headers=auth(tok)))


def _token_reuse(e: Env) -> TestResponse:
    tok = e.issuer.token(sub())
    with e.ok(e.client.get("/whoami", headers=auth(tok), environ_base={"REMOTE_ADDR": "10.0.0.1"},
                           buffered=False)):  # in flight until closed
        return e.refused(lambda: e.client.get("/whoami", headers=auth(tok),
                                              environ_base={"REMOTE_ADDR": "10.6.6.6"}))


def _step_up_required(e: Env) -> TestResponse:
    return e.refused(lambda: e.client.post("/mfa", headers=auth(e.issuer.token(sub()))))


def _insufficient_scope(e: Env) -> TestResponse:
    return e.refused(lambda: e.client.post("/admin", headers=auth(e.issuer.token(sub(), scope="read"))))


def _session_paused(e: Env) -> TestResponse:
    who = sub()
    tok = e.issuer.token(who, sa_kind="agent", sid=f"{who}-s")
    e.ok(e.client.get("/whoami", headers=auth(tok)))
    e.guard.pause_session(f"{who}-s")
    return e.refused(lambda: e.client.get("/whoami", headers=auth(tok)))


def _device_noncompliant(e: Env) -> TestResponse:
    device = f"laptop-{uuid.uuid4().hex[:6]}"
    e.guard.set_device_status(device, compliant=False)
    return e.refused(lambda: e.client.post("/device", headers=auth(e.issuer.token(sub(), device_id=device))))


def _too_many_sessions(e: Env) -> TestResponse:
    who = sub()
    e.ok(e.client.get("/single", headers=auth(e.issuer.token(who, sid=f"{who}-a"))))
    return e.refused(lambda: e.client.get("/single", headers=auth(e.issuer.token(who, sid=f"{who}-b"))))


def _risk_too_high(e: Env) -> TestResponse:
    tok = e.issuer.token(sub(), sa_kind="agent", scope="payments:approve")
    e.ok(e.client.post("/tickets", headers=auth(tok)))
    return e.refused(lambda: e.client.post("/payments/1/approve", headers=auth(tok)))


def _conflicting_action(e: Env) -> TestResponse:
    tok = e.issuer.token(sub())
    with e.ok(e.client.post("/exclusive", headers=auth(tok), buffered=False)):
        return e.refused(lambda: e.client.get("/whoami", headers=auth(tok)))


def _object_locked(e: Env) -> TestResponse:
    with e.ok(e.client.get("/docs/1", headers=auth(e.issuer.token(sub())), buffered=False)):
        return e.refused(lambda: e.client.get("/docs/1", headers=auth(e.issuer.token(sub()))))


def _too_many_in_flight(e: Env) -> TestResponse:
    tok = e.issuer.token(sub())
    with e.ok(e.client.get("/slot", headers=auth(tok), buffered=False)):
        return e.refused(lambda: e.client.get("/slot", headers=auth(tok)))


def _store_unavailable(e: Env) -> TestResponse:
    guard = Guard(store=Broken(), keys=e.issuer.public_pem, algorithms=["RS256"], issuer=e.issuer.issuer,
                  audience=e.issuer.audience)
    try:
        broken = make_app(e.bench, SessionAware(guard=guard))
        tok = e.issuer.token(sub())
        assert broken.test_client().get("/open", headers=auth(tok)).status_code == 200  # fail_open
        return e.refused(lambda: broken.test_client().get("/whoami", headers=auth(tok)))
    finally:
        guard.close()


def _keys_unavailable(e: Env) -> TestResponse:
    guard = Guard(store="memory://", jwks_url=unreachable_jwks_url(), algorithms=["RS256"], issuer=e.issuer.issuer,
                  audience=e.issuer.audience)
    try:
        down = make_app(e.bench, SessionAware(guard=guard))
        return e.refused(lambda: down.test_client().get("/whoami", headers=auth(e.issuer.token(sub()))))
    finally:
        guard.close()


def _invalid_request(e: Env) -> TestResponse:
    token = e.issuer.token(sub())  # the app would run DELETE, the Guard would decide GET: refused
    return e.refused(lambda: e.client.get("/whoami", headers={**auth(token), "X-HTTP-Method-Override": "DELETE"}))


DENIALS: list[tuple[str, int, Callable[[Env], TestResponse]]] = [
    ("missing_token", 401, _missing_token),
    ("invalid_token", 401, _invalid_token),
    ("stale_generation", 401, _stale_generation),
    ("token_revoked", 401, _token_revoked),
    ("session_revoked", 401, _session_revoked),
    ("credential_compromised", 401, _credential_compromised),
    ("token_replayed", 401, _token_replayed),
    ("token_reuse", 401, _token_reuse),
    ("step_up_required", 401, _step_up_required),
    ("insufficient_scope", 403, _insufficient_scope),
    ("session_paused", 403, _session_paused),
    ("device_noncompliant", 403, _device_noncompliant),
    ("too_many_sessions", 403, _too_many_sessions),
    ("risk_too_high", 403, _risk_too_high),
    ("conflicting_action", 409, _conflicting_action),
    ("object_locked", 423, _object_locked),
    ("too_many_in_flight", 429, _too_many_in_flight),
    ("store_unavailable", 503, _store_unavailable),
    ("keys_unavailable", 503, _keys_unavailable),
    ("invalid_request", 400, _invalid_request),
]


def test_the_table_covers_every_code() -> None:
    from sa_middleware.denials import CODES
    assert {code for code, _, _ in DENIALS} == set(CODES)


@pytest.mark.parametrize(("code", "status", "case"), DENIALS, ids=[code for code, _, _ in DENIALS])
def test_every_denial_code(app: Flask, client: FlaskClient, issuer: DemoIssuer, bench: Bench, code: str,
                           status: int, case: Callable[[Env], TestResponse]) -> None:
    problem(case(Env(client, guard_of(app), issuer, bench)), status, code)
    assert guard_of(app).locks() == []  # every held response was closed: nothing left in flight


def test_challenges_carry_what_the_client_needs(client: FlaskClient, issuer: DemoIssuer) -> None:
    missing = client.get("/whoami")
    assert missing.headers["www-authenticate"] == "Bearer"
    scoped = client.post("/admin", headers=auth(issuer.token(sub())))
    assert 'error="insufficient_scope"' in scoped.headers["www-authenticate"]
    assert 'scope="admin"' in scoped.headers["www-authenticate"]
    step_up = client.post("/mfa", headers=auth(issuer.token(sub())))
    assert 'error="insufficient_user_authentication"' in step_up.headers["www-authenticate"]
    token = issuer.token(sub())
    forged = token[:-4] + "AAAA"
    assert forged not in client.get("/whoami", headers=auth(forged)).get_data(as_text=True)


# -- the context in the view; path parameters; route names --------------------------------------------------------

def test_context_in_g(client: FlaskClient, issuer: DemoIssuer) -> None:
    who = sub()
    body = client.get("/docs/7", headers=auth(issuer.token(who, sa_kind="agent", sid=f"{who}-s", team="red"))).json
    assert body is not None
    assert body["is_context"] is True and body["same"] is True  # g.sa is environ["sa_middleware"]
    assert body["hook_saw"] == who  # in every before_request hook too
    assert (body["principal"], body["kind"], body["session_id"]) == (who, "agent", f"{who}-s")
    assert body["claims"]["team"] == "red"
    assert body["route"] == "GET /docs/<int:id>"
    assert body["params"] == {"id": 7}
    assert body["ticket_id"]
    assert_fences(body["fencing_tokens"], {"doc:7"})
    public = client.get("/public").json
    assert public is not None and (public["principal"], public["ticket_id"]) == (None, None)


def test_converted_params_make_canonical_lock_keys(client: FlaskClient, issuer: DemoIssuer) -> None:
    tok = issuer.token(sub())
    first = client.get("/docs/007", headers=auth(tok)).json["fencing_tokens"]  # type: ignore[index]
    assert_fences(first, {"doc:7"})
    assert_fences(client.get("/docs/7", headers=auth(tok)).json["fencing_tokens"],  # type: ignore[index]
                  {"doc:7"}, after=first)
    u = uuid.uuid4()
    assert_fences(client.get(f"/things/{str(u).upper()}", headers=auth(tok)).json["fencing_tokens"],  # type: ignore[index]
                  {f"thing:{u}"})
    assert_fences(client.get("/files/a/b.txt", headers=auth(tok)).json["fencing_tokens"],  # type: ignore[index]
                  {"file:a/b.txt"})


def test_head_uses_the_get_view_and_its_policy(client: FlaskClient, issuer: DemoIssuer, bench: Bench) -> None:
    problem(client.head("/docs/5"), 401, "missing_token")
    assert client.head("/docs/5?rid=h1", headers=auth(issuer.token(sub()))).status_code == 200
    assert bench.records["h1"]["route"] == "HEAD /docs/<int:id>"
    assert_fences(bench.records["h1"]["fencing_tokens"], {"doc:5"})
    assert client.head("/public").status_code == 200


# -- the Guard table and the view's policy --------------------------------------------------------------------

def test_view_policy_wins_over_the_table_and_combines_with_it(app: Flask, client: FlaskClient,
                                                              issuer: DemoIssuer) -> None:
    # POST /combo/{id}: table scopes={table-scope}, locks=[table:{id}], max_in_flight=5; view scopes={view-scope},
    # exclusive=True. The view's scopes win; the table's lock (filled with Flask's converted id) still applies.
    problem(client.post("/combo/7", headers=auth(issuer.token(sub(), scope="table-scope"))), 403,
            "insufficient_scope")
    tok = issuer.token(sub(), scope="view-scope")
    with client.post("/combo/007", headers=auth(tok), buffered=False) as held:
        assert_fences(held.json["fencing_tokens"], {"table:7"})  # type: ignore[index]
        assert held.json["route"] == "POST /combo/<int:id>"  # type: ignore[index]
        problem(client.get("/whoami", headers=auth(tok)), 409, "conflicting_action")  # the view's exclusive
    assert guard_of(app).locks() == []
    # the table's public applies to a view without a decorator; a decorator's public=False wins over it
    assert client.get("/tablepublic").status_code == 200
    problem(client.get("/viewwins"), 401, "missing_token")
    assert client.get("/viewwins", headers=auth(issuer.token(sub()))).status_code == 200


def test_default_policy_fills_the_rest(client: FlaskClient, issuer: DemoIssuer) -> None:
    who = sub()  # SA_DEFAULT_POLICY max_sessions=3 applies to /docs/<id> too (its decorator leaves it unset)
    for i in range(3):
        assert client.get("/docs/1", headers=auth(issuer.token(who, sid=f"{who}-{i}"))).status_code == 200
    problem(client.get("/docs/1", headers=auth(issuer.token(who, sid=f"{who}-3"))), 403, "too_many_sessions")


# -- requests for which Flask runs no view ------------------------------------------------------------------------

def test_not_found_is_decided_by_the_table_and_default(bench: Bench, issuer: DemoIssuer) -> None:
    table = {**TABLE, "GET /nowhere/{rest:path}": {"public": True}}  # no URL rule: allowed with check_table=False
    client = make_app(bench, SessionAware(check_table=False), **config(issuer, SA_POLICIES=table)).test_client()
    problem(client.get("/no/such/page"), 401, "missing_token")  # no route enumeration without a token
    resp = client.get("/no/such/page", headers=auth(issuer.token(who := sub())))
    assert (resp.status_code, resp.json) == (404, {"error": "not found", "principal": who})  # g.sa in the handler
    nowhere = client.get("/nowhere/at/all")  # the Guard table says public
    assert (nowhere.status_code, nowhere.json) == (404, {"error": "not found", "principal": None})


def test_method_not_allowed_fails_closed(client: FlaskClient, issuer: DemoIssuer) -> None:
    problem(client.get("/exclusive"), 401, "missing_token")
    problem(client.post("/public"), 401, "missing_token")  # the view is public for GET only: a 405 is not the view
    assert client.post("/public", headers=auth(issuer.token(sub()))).status_code == 405


def test_automatic_options_is_decided_by_the_table(bench: Bench, issuer: DemoIssuer) -> None:
    plain = make_app(bench, **config(issuer))
    problem(plain.test_client().options("/docs/1"), 401, "missing_token")  # no view runs: table / default
    problem(plain.test_client().options("/public"), 401, "missing_token")  # not the GET view's public policy
    cors = make_app(bench, **config(issuer, SA_POLICIES={**TABLE, "OPTIONS /{rest:path}": {"public": True}}))
    preflight = cors.test_client().options("/docs/1")
    assert preflight.status_code == 200 and "GET" in preflight.headers["allow"]
    assert guard_of(cors).locks() == []


def test_strict_slashes_redirect_is_decided_by_the_table(client: FlaskClient, issuer: DemoIssuer) -> None:
    assert client.get("/items/").status_code == 200  # the public view
    problem(client.get("/items"), 401, "missing_token")  # Flask's own redirect is not the view
    redirect = client.get("/items", headers=auth(issuer.token(sub())))
    assert redirect.status_code == 308 and redirect.headers["location"].endswith("/items/")


def test_script_name_mount(app: Flask, issuer: DemoIssuer) -> None:
    def root(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("404 Not Found", [])
        return [b""]

    mounted = Client(DispatcherMiddleware(root, {"/api": app}))
    tok = issuer.token(sub())
    resp = mounted.get("/api/docs/3", headers=auth(tok), buffered=True)
    body = json.loads(resp.get_data())
    assert body["route"] == "GET /docs/<int:id>"
    assert_fences(body["fencing_tokens"], {"doc:3"})
    assert guard_of(app).locks() == []
    assert mounted.get("/api/public", buffered=True).status_code == 200
    assert mounted.get("/api/nope", buffered=True).status_code == 401


def test_subdomain_matching(issuer: DemoIssuer) -> None:
    app = Flask("subdomains", subdomain_matching=True)
    app.config.update(SERVER_NAME="example.test", **config(issuer, SA_POLICIES=None))

    @app.get("/hello", subdomain="api")
    @policy(public=True)
    def api_hello() -> str:
        return "api"

    @app.get("/hello")
    def www_hello() -> str:
        return g.sa.principal or "-"

    SessionAware(app)
    c = app.test_client()
    assert c.get("/hello", base_url="http://api.example.test").get_data() == b"api"
    problem(c.get("/hello", base_url="http://example.test"), 401, "missing_token")
    assert c.get("/hello", base_url="http://example.test", headers=auth(issuer.token("ann"))).get_data() == b"ann"
    guard_of(app).close()


# -- class-based views and blueprints ---------------------------------------------------------------------------

def test_class_views(issuer: DemoIssuer) -> None:
    @policy(max_in_flight=1)
    class ItemAPI(MethodView):
        def get(self, id: int) -> dict[str, Any]:
            return {"route": g.sa.route, "fences": dict(g.sa.fencing_tokens)}

        @policy(locks=["item:{id}"], scopes={"items:write"})
        def post(self, id: int) -> dict[str, Any]:
            return {"route": g.sa.route, "fences": dict(g.sa.fencing_tokens)}

    class Report(View):
        decorators = [policy(public=True)]

        def dispatch_request(self) -> str:
            return "report"

    app = Flask("class_views")
    app.config.update(config(issuer, SA_POLICIES=None))
    app.add_url_rule("/items/<int:id>", view_func=ItemAPI.as_view("items"))
    app.add_url_rule("/report", view_func=Report.as_view("report"))
    SessionAware(app)
    c = app.test_client()
    tok = issuer.token(sub(), scope="items:write")
    assert c.get("/items/4", headers=auth(tok)).json == {"route": "GET /items/<int:id>", "fences": {}}
    posted = c.post("/items/4", headers=auth(tok)).json
    assert posted["route"] == "POST /items/<int:id>" and list(posted["fences"]) == ["item:4"]
    problem(c.post("/items/4", headers=auth(issuer.token(sub()))), 403, "insufficient_scope")  # method's scopes
    with c.get("/items/4", headers=auth(tok), buffered=False):  # the class's max_in_flight=1 applies to every method
        problem(c.post("/items/4", headers=auth(tok)), 429, "too_many_in_flight")
        problem(c.head("/items/4", headers=auth(tok)), 429, "too_many_in_flight")
    assert c.get("/report").get_data() == b"report"
    guard_of(app).close()


def test_policy_on_the_dispatcher_of_a_class_view(issuer: DemoIssuer) -> None:
    class Admin(View):  # a plain View: dispatch_request is its only handler
        methods = ["GET", "POST"]

        @policy(scopes={"admin"})
        def dispatch_request(self) -> str:
            return "admin"

    class Guarded(MethodView):  # a dispatcher override runs for every method, whatever the handler says
        @policy(scopes={"admin"})
        def dispatch_request(self, **kwargs: Any) -> Any:
            return super().dispatch_request(**kwargs)

        @policy(max_in_flight=5)
        def get(self) -> str:
            return "guarded"

    app = Flask("dispatcher_policy")
    app.config.update(config(issuer, SA_POLICIES=None))
    app.add_url_rule("/admin", view_func=Admin.as_view("admin"))
    app.add_url_rule("/guarded", view_func=Guarded.as_view("guarded"))
    SessionAware(app)
    c = app.test_client()
    plain, admin = auth(issuer.token(sub(), scope="read")), auth(issuer.token(sub(), scope="admin"))
    for url in ("/admin", "/guarded"):
        problem(c.get(url, headers=plain), 403, "insufficient_scope")
        problem(c.head(url, headers=plain), 403, "insufficient_scope")
        assert c.get(url, headers=admin).status_code == 200
    problem(c.post("/admin", headers=plain), 403, "insufficient_scope")
    guard_of(app).close()


def test_policy_on_a_method_no_request_reads_is_refused(issuer: DemoIssuer) -> None:
    class Report(View):
        def dispatch_request(self) -> str:
            return self.render()

        @policy(scopes={"admin"})  # not a handler: would be silently ignored
        def render(self) -> str:
            return "report"

    app = Flask("unreachable_policy")
    app.config.update(config(issuer, SA_POLICIES=None))
    app.add_url_rule("/report", view_func=Report.as_view("report"))
    with pytest.raises(ConfigurationError, match=r"'report'.*Report\.render"):
        SessionAware(app)


def test_blueprint_policies(issuer: DemoIssuer) -> None:
    admin = policy(scopes={"admin"})(Blueprint("admin", __name__, url_prefix="/admin"))
    audit = policy(max_in_flight=1)(Blueprint("audit", __name__, url_prefix="/audit"))

    @admin.get("/users")
    def users() -> str:
        return "users"

    @admin.get("/ping")
    @policy(public=True)
    def ping() -> str:
        return "pong"

    @audit.get("/log/<int:id>")
    @policy(locks=["log:{id}"])
    def log(id: int) -> dict[str, Any]:
        return dict(g.sa.fencing_tokens)

    admin.register_blueprint(audit)
    app = Flask("blueprints")
    app.config.update(config(issuer, SA_POLICIES=None))
    SessionAware(app)  # before the blueprints: the app factory order
    app.register_blueprint(admin)
    app.register_blueprint(admin, name="v2", url_prefix="/v2")
    c = app.test_client()
    previous: dict[str, int] | None = None  # the /admin holder's tokens, when /v2 takes the same lock
    for prefix in ("/admin", "/v2"):
        problem(c.get(f"{prefix}/users", headers=auth(issuer.token(sub()))), 403, "insufficient_scope")
        assert c.get(f"{prefix}/users", headers=auth(issuer.token(sub(), scope="admin"))).get_data() == b"users"
        assert c.get(f"{prefix}/ping").get_data() == b"pong"  # the view's own policy wins
        # nested: the parent's scopes, the child's max_in_flight and the view's lock all apply
        problem(c.get(f"{prefix}/audit/log/1", headers=auth(issuer.token(sub()))), 403, "insufficient_scope")
        tok = issuer.token(sub(), scope="admin")
        with c.get(f"{prefix}/audit/log/1", headers=auth(tok), buffered=False) as held:
            assert held.json is not None
            assert_fences(held.json, {"log:1"}, after=previous)
            previous = held.json
            problem(c.get(f"{prefix}/audit/log/2", headers=auth(tok)), 429, "too_many_in_flight")
    guard_of(app).close()


# -- configuration, the extension pattern, start-up checks -----------------------------------------------------

def test_extension_state_and_several_apps(bench: Bench, issuer: DemoIssuer, tmp_path: Path) -> None:
    sa = SessionAware()
    one = make_app(bench, sa, **config(issuer, f"sqlite:///{tmp_path / 'one.db'}"))
    two = make_app(bench, sa, **config(issuer, f"sqlite:///{tmp_path / 'two.db'}"))
    assert guard_of(one) is not guard_of(two)
    with one.app_context():
        assert sa.guard is guard_of(one)
    tok = issuer.token(who := sub(), sid=f"{who}-s")
    assert one.test_client().get("/whoami", headers=auth(tok)).status_code == 200
    assert [s.session_id for s in guard_of(one).sessions(who)] == [f"{who}-s"]
    assert guard_of(two).sessions(who) == []  # each app has its own Guard and store
    with pytest.raises(RuntimeError, match="already initialised"):
        sa.init_app(one)
    for flask_app in (one, two):
        guard_of(flask_app).close()

    shared = Guard(store="memory://", keys=issuer.public_pem, algorithms=["RS256"], issuer=issuer.issuer,
                   audience=issuer.audience)
    ext = SessionAware(guard=shared)
    a, b = make_app(bench, ext), make_app(bench, ext, SA_KEYS="ignored: the guard is given")
    assert guard_of(a) is guard_of(b) is shared is ext.guard
    with pytest.raises(TypeError):
        SessionAware(guard="sqlite:///x.db")  # type: ignore[arg-type]
    shared.close()


def test_config_from_prefixed_env(monkeypatch: pytest.MonkeyPatch, issuer: DemoIssuer) -> None:
    monkeypatch.setenv("FLASK_SA_STORE", "memory://")
    monkeypatch.setenv("FLASK_SA_KEYS", issuer.public_pem)
    monkeypatch.setenv("FLASK_SA_ALGORITHMS", "RS256,ES256")
    monkeypatch.setenv("FLASK_SA_ISSUER", issuer.issuer)
    monkeypatch.setenv("FLASK_SA_AUDIENCE", issuer.audience)
    monkeypatch.setenv("FLASK_SA_LEASE", "12.5")
    monkeypatch.setenv("FLASK_SA_POLICIES", json.dumps({"GET /whoami": {"max_in_flight": 1}}))
    app = Flask("from_env")
    app.config.from_prefixed_env()
    app.get("/whoami")(lambda: "ok")
    SessionAware(app)
    guard = guard_of(app)
    assert guard.lease == 12.5
    tok = issuer.token(sub())
    c = app.test_client()
    with c.get("/whoami", headers=auth(tok), buffered=False):
        problem(c.get("/whoami", headers=auth(tok)), 429, "too_many_in_flight")
    guard.close()


@pytest.mark.parametrize(("change", "key"), [
    ({"SA_ALGORITHMS": None}, "SA_ALGORITHMS"),
    ({"SA_ALGORITHMS": ["none"]}, "SA_ALGORITHMS"),
    ({"SA_ALGORITHMS": "RS256 XX999"}, "SA_ALGORITHMS"),
    ({"SA_KEYS": None}, "SA_KEYS"),
    ({"SA_JWKS": {"keys": []}}, "SA_JWKS"),
    ({"SA_KEYS": None, "SA_JWKS": "{not json"}, "SA_JWKS"),
    ({"SA_KEYS": "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n"}, "SA_KEYS"),
    ({"SA_KEYS": None, "SA_JWKS_URL": "ftp://idp.example/jwks"}, "SA_JWKS_URL"),
    ({"SA_STORE": "nosuch://x"}, "SA_STORE"),
    ({"SA_ISSUER": []}, "SA_ISSUER"),
    ({"SA_AUDIENCE": 5}, "SA_AUDIENCE"),
    ({"SA_LEASE": -1}, "SA_LEASE"),
    ({"SA_SESSION_IDLE": "soon"}, "SA_SESSION_IDLE"),
    ({"SA_RETRY_AFTER": 0}, "SA_RETRY_AFTER"),
    ({"SA_REALM": 'a"b'}, "SA_REALM"),
    ({"SA_LEEWAY": float("nan")}, "SA_LEEWAY"),
    ({"SA_POLICIES": ["GET /x"]}, "SA_POLICIES"),
    ({"SA_POLICIES": {"GET /x": {"max_sessions": 0}}}, "SA_POLICIES"),
    ({"SA_POLICIES": {"GET /x": {"colour": "red"}}}, "SA_POLICIES"),
    ({"SA_POLICIES": {"FETCH /x": {}}}, "SA_POLICIES"),
    ({"SA_POLICIES": {"GET /x": 5}}, "SA_POLICIES"),
    ({"SA_DEFAULT_POLICY": {"max_risk": -1}}, "SA_DEFAULT_POLICY"),
    ({"SA_DEFAULT_POLICY": "strict"}, "SA_DEFAULT_POLICY"),
    ({"SA_AUDEINCE": "typo"}, "SA_AUDIENCE"),
], ids=lambda v: "-".join(v) if isinstance(v, dict) else None)
def test_bad_config_fails_at_init_app_naming_the_key(issuer: DemoIssuer, change: dict[str, Any], key: str) -> None:
    app = Flask("bad_config")
    app.config.update({k: v for k, v in {**config(issuer), **change}.items() if v is not None})
    with pytest.raises(ConfigurationError, match=key):
        SessionAware().init_app(app)
    assert "sa_middleware" not in app.extensions
    assert getattr(app.wsgi_app, "__func__", None) is Flask.wsgi_app  # left unwrapped


def test_config_keys_map_to_every_guard_option(issuer: DemoIssuer) -> None:
    guard = guard_from_config({**config(issuer), "SA_REQUIRED_CLAIMS": "exp iat sub jti", "SA_REALM": "workbench",
                               "SA_LEASE": 9, "SA_SESSION_IDLE": 60, "SA_KIND_CLAIM": "who",
                               "SA_GENERATION_CLAIM": "v", "SA_DEVICE_CLAIM": "dev", "SA_RETRY_AFTER": 3,
                               "SA_UNRELATED_SETTING": "not ours, not a typo of ours: ignored"})
    assert (guard.realm, guard.lease, guard.session_idle, guard.kind_claim, guard.generation_claim,
            guard.device_claim, guard.retry_after) == ("workbench", 9.0, 60.0, "who", "v", "dev", 3)
    assert guard.routes.default_policy == Policy(max_sessions=3)
    guard.close()


def test_view_policy_errors_name_the_view(bench: Bench, issuer: DemoIssuer) -> None:
    with pytest.raises(ConfigurationError, match="max_sessions"):
        @policy(max_sessions=0)
        def bad() -> str:
            return ""
    with pytest.raises(TypeError):
        policy(colour="red")  # type: ignore[call-arg]

    def lock_without_param() -> str:
        return ""
    early = Flask("early")
    early.config.update(config(issuer))
    early.add_url_rule("/x/<int:id>", view_func=policy(locks=["x:{nope}"])(lock_without_param))
    with pytest.raises(ConfigurationError, match="lock_without_param"):
        SessionAware(early)  # registered before init_app: refused there
    late = make_app(bench, **config(issuer))
    late.add_url_rule("/y/<int:id>", endpoint="late", view_func=policy(locks=["y:{nope}"])(lock_without_param))
    with pytest.raises(ConfigurationError, match="late"):  # registered after: refused at the first request
        late.test_client().get("/public")
    guard_of(late).close()


def test_views_registered_after_init_app(bench: Bench, issuer: DemoIssuer) -> None:
    app = make_app(bench, register=False, **config(issuer))  # the /_demo blueprint comes after init_app
    assert app.test_client().get("/_demo/intervals").status_code == 200  # its blueprint policy: public
    guard_of(app).close()


# -- release on every exit path -----------------------------------------------------------------------------------

class CountingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.released: Counter[str] = Counter()
        self._count = threading.Lock()

    def release(self, ticket: Ticket) -> None:
        with self._count:
            self.released[ticket.ticket_id] += 1
        super().release(ticket)


@pytest.fixture
def counted(bench: Bench, issuer: DemoIssuer) -> Iterator[tuple[Flask, CountingStore]]:
    store = CountingStore()
    guard = Guard(store=store, keys=issuer.public_pem, algorithms=["RS256"], issuer=issuer.issuer,
                  audience=issuer.audience)
    yield make_app(bench, SessionAware(guard=guard)), store
    guard.close()


def test_release_once_when_the_view_raises(counted: tuple[Flask, CountingStore], issuer: DemoIssuer) -> None:
    app, store = counted
    resp = app.test_client().get("/boom/1", headers=auth(issuer.token(sub())))
    assert resp.status_code == 500  # Flask's own error response
    assert guard_of(app).locks() == [] and list(store.released.values()) == [1]


def test_release_once_when_an_error_handler_answers(counted: tuple[Flask, CountingStore],
                                                    issuer: DemoIssuer) -> None:
    app, store = counted
    resp = app.test_client().get("/teapot/2", headers=auth(issuer.token(who := sub())))
    assert (resp.status_code, resp.json) == (418, {"principal": who, "locks": ["teapot:2"]})  # g.sa in the handler
    assert guard_of(app).locks() == [] and list(store.released.values()) == [1]


def test_release_once_when_the_exception_propagates(counted: tuple[Flask, CountingStore],
                                                    issuer: DemoIssuer) -> None:
    app, store = counted
    app.testing = True  # PROPAGATE_EXCEPTIONS: the exception leaves the app through the middleware
    with pytest.raises(RuntimeError, match="the view failed"):
        app.test_client().get("/boom/3", headers=auth(issuer.token(sub())))
    assert guard_of(app).locks() == [] and list(store.released.values()) == [1]


def test_stream_holds_the_ticket_until_closed_test_client(counted: tuple[Flask, CountingStore],
                                                          issuer: DemoIssuer, bench: Bench) -> None:
    app, store = counted
    c = app.test_client()
    tok = issuer.token(sub())
    bench.gate("s").released.set()  # the generator does not park
    resp = c.get("/stream/1?hold=s&rid=r", headers=auth(tok), buffered=False)
    assert [lk.key for lk in guard_of(app).locks()] == ["stream:1"]
    assert resp.get_data() == b"firstlast"  # read to the end, still not closed
    assert [lk.key for lk in guard_of(app).locks()] == ["stream:1"]
    problem(c.post("/exclusive", headers=auth(tok)), 409, "conflicting_action")
    resp.close()
    assert guard_of(app).locks() == [] and list(store.released.values()) == [1]
    assert bench.records["r"]["ticket_id"] in store.released
    assert c.post("/exclusive", headers=auth(tok)).status_code == 200


def test_the_test_client_releases_each_response(bench: Bench, issuer: DemoIssuer) -> None:
    app = make_app(bench, **config(issuer))
    assert app.test_client_class is SessionAwareTestClient
    tok = issuer.token(sub())
    c = app.test_client()
    for _ in range(3):  # exclusive: each one is refused if the previous one is still in flight
        assert c.post("/exclusive", headers=auth(tok)).status_code == 200
    guard_of(app).close()

    class OwnClient(FlaskClient):
        pass
    own = Flask("own_client")
    own.test_client_class = OwnClient
    own.config.update(config(issuer))
    SessionAware(own)
    assert own.test_client_class is OwnClient  # an app's own test client class is left alone
    guard_of(own).close()


def test_a_request_that_bypassed_the_middleware_never_reaches_a_view(bench: Bench, issuer: DemoIssuer) -> None:
    app = make_app(bench, **config(issuer))
    app.wsgi_app = Flask.wsgi_app.__get__(app)  # type: ignore[method-assign]  # someone unwrapped it
    app.testing = True
    with pytest.raises(RuntimeError, match="did not pass through"):
        app.test_client().get("/public")
    assert bench.calls == []
    guard_of(app).close()


# -- on werkzeug's threaded server ---------------------------------------------------------------------------------

@pytest.fixture
def server(app: Flask, bench: Bench) -> Iterator[Served[Bench]]:
    tracker = Tracker(bench.track_wsgi(app))  # outermost: knows when the server closed each response
    with Served(guard_of(app), bench, tracker, serve_wsgi(tracker.wsgi)) as srv:
        yield srv


def test_streamed_response_over_http(server: Served[Bench], issuer: DemoIssuer) -> None:
    who = sub()
    tok = issuer.token(who)
    with server.stream("/stream/9", tok) as (resp, gate, rid):
        assert resp.status_code == 200
        chunks = resp.iter_raw()
        first = b""
        while first != b"first":
            first += next(chunks)
        assert gate.entered.wait(WAIT)  # the generator is parked between its chunks: the stream is in flight
        [lock] = server.guard.locks()
        assert lock.key == "stream:9"
        problem_resp = server.request("POST", "/exclusive", tok, rid=uuid.uuid4().hex)
        support.problem(problem_resp, 409, "conflicting_action")
        gate.released.set()
        assert b"".join(chunks) == b"last"
    assert server.finished.done(rid).wait(WAIT)
    assert server.app.records[rid]["ticket_id"] == lock.ticket_id  # g.sa inside the stream
    server.assert_released(tok)


def test_exceptions_over_http(server: Served[Bench], issuer: DemoIssuer) -> None:
    tok = issuer.token(sub())
    assert server.request("GET", "/boom/4", tok, rid=uuid.uuid4().hex).status_code == 500
    assert server.request("GET", "/teapot/4", tok, rid=uuid.uuid4().hex).status_code == 418
    server.assert_released(tok)


def test_the_five_behaviours(server: Served[Bench], issuer: DemoIssuer, monkeypatch: pytest.MonkeyPatch) -> None:
    """``demo.play``: 32 requests over HTTP, with requests held in flight inside the views by other threads."""
    plain = demo.request

    def tracked(base: str, method: str, path: str, token: str | None = None,
                agent: str = "sa-demo") -> tuple[int, dict[str, Any]]:
        rid = uuid.uuid4().hex  # returns once the server closed the response (the ticket is released)
        result = plain(base, method, f"{path}{'&' if '?' in path else '?'}rid={rid}", token, agent)
        assert server.finished.done(rid).wait(WAIT)
        return result

    monkeypatch.setattr(demo, "request", tracked)
    steps = play(server.base, server.guard, issuer, lambda step: None)
    assert [(s.behaviour, s.what, s.expected, s.got) for s in steps if not s.ok] == []
    assert len(steps) == 32 and {s.behaviour[0] for s in steps} == set("12345")


def test_concurrent_writers_exactly_one_holds_the_object(server: Served[Bench], issuer: DemoIssuer) -> None:
    writers = 6
    tokens = [issuer.token(sub()) for _ in range(writers)]
    names = [uuid.uuid4().hex[:10] for _ in range(writers)]
    barrier = threading.Barrier(writers)
    results: queue.Queue[tuple[int, httpx.Response]] = queue.Queue()

    def write(i: int) -> None:
        barrier.wait(WAIT)
        results.put((i, server.request("PUT", f"/objects/5?hold={names[i]}", tokens[i], rid=uuid.uuid4().hex)))

    threads = [threading.Thread(target=write, args=(i,), daemon=True) for i in range(writers)]
    for t in threads:
        t.start()
    try:
        refused = [results.get(timeout=WAIT) for _ in range(writers - 1)]
        for _, resp in refused:
            support.problem(resp, 423, "object_locked")
        [winner] = set(range(writers)) - {i for i, _ in refused}
        assert server.app.gate(names[winner]).entered.wait(WAIT)
        assert [server.app.gate(n).entered.is_set() for n in names].count(True) == 1
        assert [lk.key for lk in server.guard.locks()] == ["object:5"]
    finally:
        server.app.release_all()
    i, last = results.get(timeout=WAIT)
    assert i == winner
    assert_fences(last.json()["fencing_tokens"], {"object:5"})
    for t in threads:
        t.join(WAIT)


def test_concurrent_sessions_admit_exactly_max_sessions(server: Served[Bench], issuer: DemoIssuer) -> None:
    who, n = sub(), 8
    tokens = [issuer.token(who, sa_kind="agent", sid=f"{who}-{i}") for i in range(n)]
    barrier = threading.Barrier(n)
    results: queue.Queue[httpx.Response] = queue.Queue()

    def open_session(i: int) -> None:
        barrier.wait(WAIT)
        results.put(server.request("GET", "/whoami", tokens[i], rid=uuid.uuid4().hex))

    threads = [threading.Thread(target=open_session, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    responses = [results.get(timeout=WAIT) for _ in range(n)]
    assert Counter(r.status_code for r in responses) == {200: 3, 403: n - 3}  # SA_DEFAULT_POLICY max_sessions=3
    for r in responses:
        if r.status_code == 403:
            support.problem(r, 403, "too_many_sessions")
    assert len(server.guard.sessions(who)) == 3


# -- the example ---------------------------------------------------------------------------------------------------

def test_example_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def backend(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        size = int(environ.get("CONTENT_LENGTH") or 0)
        calls.append({"path": environ["PATH_INFO"], **json.loads(environ["wsgi.input"].read(size))})
        start_response("200 OK", [("content-type", "application/json")])
        return [b"{}"]

    backend_base, stop_backend = serve_wsgi(backend)
    monkeypatch.setenv("SA_STORE", f"sqlite:///{tmp_path / 'example.db'}")
    monkeypatch.setenv("SA_DEV_KEY", str(tmp_path / "dev-key.pem"))
    monkeypatch.setenv("WORKBENCH_BACKEND", backend_base)
    name = f"flask_example_{uuid.uuid4().hex[:8]}"
    spec = importlib.util.spec_from_file_location(name, EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        app: Flask = module.app
        assert app.config["SA_STORE"] == f"sqlite:///{tmp_path / 'example.db'}"
        from sa_middleware.devkeys import dev_key
        key = dev_key()  # the same file the example trusts
        assert key.path == tmp_path / "dev-key.pem"
        tracker = Tracker(app)
        base, stop = serve_wsgi(tracker.wsgi)

        def call(method: str, path: str, token: str | None = None) -> httpx.Response:
            rid = uuid.uuid4().hex
            resp = httpx.request(method, f"{base}{path}?rid={rid}", headers=auth(token) if token else {},
                                 timeout=WAIT)
            assert tracker.done(rid).wait(WAIT)
            return resp

        try:
            assert call("GET", "/health").json() == {"ok": True}
            agent = key.mint("agent-7", sa_kind="agent", sid="agent-7-s1", scope="tickets payments:approve")
            assert call("GET", "/whoami", agent).json() == {
                "principal": "agent-7", "kind": "agent", "session_id": "agent-7-s1", "route": "GET /whoami",
                "fencing_tokens": {}}
            support.problem(call("GET", "/whoami"), 401, "missing_token")
            opened = call("POST", "/tickets", agent)
            assert opened.status_code == 201 and len(opened.json()["ticket"]) == 32
            support.problem(call("POST", "/payments/42/approve", agent), 403, "risk_too_high")
            other = key.mint("agent-8", sa_kind="agent", scope="payments:approve")
            approved = call("POST", "/payments/42/approve", other).json()
            assert (approved["payment"], approved["approved"]) == (42, True)
            assert approved["context"]["route"] == "POST /payments/<int:id>/approve"
            assert_fences(approved["context"]["fencing_tokens"], {"payment:42"})
            updated = call("PUT", "/objects/7", other).json()
            assert (updated["object"], updated["updated"]) == (7, True)
            assert_fences(updated["context"]["fencing_tokens"], {"object:7"})
            assert [(c["path"], c["principal"], c["id"], c["fencing_tokens"]) for c in calls] == [
                ("/tickets", "agent-7", None, {}), ("/payments", "agent-8", 42, approved["context"]["fencing_tokens"]),
                ("/objects", "agent-8", 7, updated["context"]["fencing_tokens"])]  # what the views saw
        finally:
            stop()
            guard_of(app).close()
    finally:
        sys.modules.pop(name, None)
        stop_backend()


def test_row5_policy_views_classes_and_blueprints_refuse_without_the_extension(issuer: DemoIssuer) -> None:
    """Without SessionAware on the app, every kind of decorated view answers 503 and never runs; with only the core
    WSGI middleware (which reads the table, not @policy) too."""
    from sa_middleware.wsgi import SessionAwareWSGIMiddleware

    ran: list[str] = []
    shop = policy(scopes={"shop"})(Blueprint("shop", __name__))

    @shop.get("/basket")
    def basket() -> str:
        ran.append("blueprint")
        return "ok"

    @policy(exclusive=True)
    class Things(MethodView):
        def get(self) -> str:
            ran.append("class")
            return "ok"

    def build() -> Flask:
        app = Flask("unguarded")

        @app.get("/fn")
        @policy(scopes={"x"})
        def fn() -> str:
            ran.append("function")
            return "ok"

        app.add_url_rule("/things", view_func=Things.as_view("things"))
        app.register_blueprint(shop)
        return app

    bare, core = build(), build()
    guard = Guard(store="memory://", keys=issuer.public_pem, algorithms=["RS256"], issuer=issuer.issuer,
                  audience=issuer.audience)
    core.wsgi_app = SessionAwareWSGIMiddleware(core.wsgi_app, guard=guard)  # type: ignore[method-assign]
    for app in (bare, core):
        for path in ("/fn", "/things", "/basket"):
            resp = app.test_client().get(path, headers=auth(issuer.token(sub(), scope="x shop")))
            assert resp.status_code == 503, (path, resp.get_data(as_text=True))
            assert resp.json is not None and resp.json["code"] == "view_not_guarded"
    assert ran == []
    guarded = build()
    SessionAware(guarded, guard=guard)
    for path in ("/fn", "/things", "/basket"):
        assert guarded.test_client().get(path, headers=auth(issuer.token(sub(), scope="x shop"))).status_code == 200
    assert ran == ["function", "class", "blueprint"]
    guard.close()


def test_table_numbers_match_what_werkzeug_routes(issuer: DemoIssuer) -> None:
    """werkzeug's ``int`` and ``float`` converters take any Unicode decimal digit (and a sign when asked): a path
    the router sends to the view is matched by the table's ``{id:int}`` too, so its policy is never skipped."""
    guard = Guard(store="memory://", keys=issuer.public_pem, algorithms=["RS256"], issuer=issuer.issuer,
                  audience=issuer.audience, policies={
                      "POST /payments/{id:int}/approve": Policy(scopes={"payments:approve"}, locks=["payment:{id}"]),
                      "POST /rates/{r:float}": Policy(scopes={"rates:set"}, locks=["rate:{r}"])})
    app = Flask("flask_unicode_digits")
    def fences(**params: Any) -> dict[str, Any]:
        return {"fences": dict(g.sa.fencing_tokens)}

    app.add_url_rule("/payments/<int(signed=True):id>/approve", "approve", fences, methods=["POST"])
    app.add_url_rule("/rates/<float:r>", "rate", fences, methods=["POST"])
    SessionAware(app, guard)
    url, stop = serve_wsgi(app)
    try:
        with httpx.Client(base_url=url, timeout=WAIT) as http:
            plain, scoped = issuer.token(sub()), issuer.token(sub(), scope="payments:approve rates:set")
            for path, key in [("/payments/42/approve", "payment:42"), ("/payments/%EF%BC%94%EF%BC%92/approve",
                              "payment:42"), ("/payments/%D9%A4%D9%A2/approve", "payment:42"),
                              ("/payments/-3/approve", "payment:-3"), ("/rates/%D9%A1.%D9%A5", "rate:1.5")]:
                assert http.post(path, headers=auth(plain)).status_code == 403, path
                resp = http.post(path, headers=auth(scoped))
                assert resp.status_code == 200, path
                assert_fences(resp.json()["fences"], {key})
    finally:
        stop()
        guard.close()
