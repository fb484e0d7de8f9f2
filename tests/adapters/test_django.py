"""The Django adapter (``sa_middleware.adapters.django``) under WSGI (werkzeug's threaded server) and ASGI (uvicorn).

The test project is ``django_app`` (settings applied with ``override_settings`` for this module only). Each server
stays up for the module; every test gets a fresh Guard over a fresh SQLite store through
``override_settings(SA_MIDDLEWARE=...)``, which the adapter reads on first use. Requests are held in flight with
gates inside the views (``?hold=NAME``); an outer tracker says when the server closed a response (``?rid=ID``), so
no test sleeps. The direct tests drive the middleware with Django's ``RequestFactory`` for the exactly-once
questions; the example project is served in subprocesses; the suite also runs under Django 4.2 (a cached
``pip install --target``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import django
import httpx
import pytest
import support
from asgiref.sync import iscoroutinefunction
from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.wsgi import WSGIHandler
from django.http import HttpResponse, StreamingHttpResponse
from django.test import Client, RequestFactory, override_settings
from django.urls import path
from django.utils.decorators import method_decorator
from django.views import View
from dpop_support import Authority, Holder
from support import WAIT, Served, Tracker, assert_fences, sub, unreachable_jwks_url

from sa_middleware import CODES, Guard, Policy, StoreUnavailable
from sa_middleware.adapters.django import MIDDLEWARE_PATH, SAMiddlewareConfig, SessionAwareMiddleware, get_guard, policy
from sa_middleware.demo import DemoIssuer, play, serve_asgi, serve_wsgi
from sa_middleware.denials import Denial
from sa_middleware.devkeys import dev_key
from sa_middleware.records import Admission, Ticket
from sa_middleware.stores.memory import MemoryStore

from . import django_app
from .django_app import APP, App

django_app.configure()

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "django_project"
NESTED = "SA_DJANGO_NESTED_RUN"  # set in the Django 4.2 run, which must not start another one

# Django warns when ASGI serves a sync iterator (it reads it whole first); some tests do so on purpose
pytestmark = pytest.mark.filterwarnings("ignore:StreamingHttpResponse must consume:Warning")


def options(idp: DemoIssuer, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    """SA_MIDDLEWARE for a fresh SQLite store that trusts ``idp``."""
    conf: dict[str, Any] = {"store": f"sqlite:///{tmp_path / f'sa-{uuid.uuid4().hex[:8]}.db'}",
                            "keys": idp.public_pem, "algorithms": ["RS256"], "issuer": idp.issuer,
                            "audience": idp.audience, "default_policy": Policy(max_sessions=3)}
    conf.update(extra)
    return conf


class Server(Served[App]):
    """The test project on one server flavour; ``guard`` is the Guard of the current SA_MIDDLEWARE."""

    def __init__(self, flavour: str) -> None:
        if flavour == "wsgi":
            finished = Tracker(WSGIHandler())
            served = serve_wsgi(finished.wsgi)
        else:
            finished = Tracker(ASGIHandler())
            served = serve_asgi(finished.asgi_app())
        super().__init__(None, APP, finished, served)  # type: ignore[arg-type]
        self.flavour = flavour
        self.issuer = DemoIssuer()
        self.tmp = Path()

    @contextmanager
    def use(self, **extra: Any) -> Iterator[Guard]:
        """Serve with a fresh Guard built from these SA_MIDDLEWARE options (over the test's own)."""
        with override_settings(SA_MIDDLEWARE=options(self.issuer, self.tmp, **extra)):
            self.guard = get_guard()
            try:
                yield self.guard
            finally:
                self.settle()
        # the outer value is back: its Guard (a new one over the same store when the adapter had built it)
        self.guard = get_guard() if isinstance(getattr(settings, "SA_MIDDLEWARE", None), dict) else None

    def settle(self) -> None:
        """Release every gate and wait for the held requests to finish."""
        self.app.release_all()
        for thread in self._threads:
            thread.join(WAIT)
        self._threads.clear()


@pytest.fixture(scope="module", autouse=True)
def project() -> Iterator[None]:
    with override_settings(**django_app.TEST_SETTINGS):
        yield


@pytest.fixture(scope="module", params=["wsgi", "asgi"])
def server(request: pytest.FixtureRequest, project: None) -> Iterator[Server]:
    srv = Server(request.param)
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def srv(server: Server, issuer: DemoIssuer, tmp_path: Path) -> Iterator[Server]:
    server.issuer, server.tmp = issuer, tmp_path
    with server.use():
        yield server


def problem(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """``support.problem``, the exact content-length, and the challenge of a 401 / 403."""
    body = support.problem(resp, status, code)
    assert int(resp.headers["content-length"]) == len(resp.content)
    if status == 401:
        assert resp.headers["www-authenticate"].startswith("Bearer")
    return body


def rid() -> str:
    return uuid.uuid4().hex


# -- every denial code, through the adapter ----------------------------------------------------------------------

class Broken(MemoryStore):
    def admit(self, admission: Admission) -> Ticket | Denial:
        raise StoreUnavailable("store down s3cr3t")

    async def aadmit(self, admission: Admission) -> Ticket | Denial:
        raise StoreUnavailable("store down s3cr3t")


Case = Callable[[Server, DemoIssuer], httpx.Response]


def _missing(s: Server, iss: DemoIssuer) -> httpx.Response:
    resp = s.request("GET", "/whoami")
    assert resp.headers["www-authenticate"] == "Bearer"
    return resp


def _invalid(s: Server, iss: DemoIssuer) -> httpx.Response:
    token = iss.token(sub())
    forged = token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB")
    resp = s.request("GET", "/whoami", forged)
    assert resp.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert forged not in resp.text
    return resp


def _stale(s: Server, iss: DemoIssuer) -> httpx.Response:
    who = sub()
    token = iss.token(who, gen=1)
    assert s.request("GET", "/whoami", token).status_code == 200
    s.guard.rotate(who)
    return s.request("GET", "/whoami", token)


def _token_revoked(s: Server, iss: DemoIssuer) -> httpx.Response:
    who = sub()
    token = iss.token(who)
    s.guard.revoke_principal(who)
    return s.request("GET", "/whoami", token)


def _session_revoked(s: Server, iss: DemoIssuer) -> httpx.Response:
    who = sub()
    token = iss.token(who, sid=f"{who}-s")
    assert s.request("GET", "/whoami", token).status_code == 200
    s.guard.revoke_session(f"{who}-s")
    return s.request("GET", "/whoami", token)


def _compromised(s: Server, iss: DemoIssuer) -> httpx.Response:
    who = sub()
    token = iss.token(who, sid=f"{who}-s")
    assert s.request("GET", "/whoami", token).status_code == 200
    s.guard.report_compromise(session_id=f"{who}-s")
    return s.request("GET", "/whoami", token)


def _replayed(s: Server, iss: DemoIssuer) -> httpx.Response:
    token = iss.token(sub())
    assert s.request("POST", "/once", token).status_code == 200
    return s.request("POST", "/once", token)


def _reuse(s: Server, iss: DemoIssuer) -> httpx.Response:
    token = iss.token(sub())
    s.hold("GET", "/whoami", token)  # in flight from this client...
    return s.request("GET", "/whoami", token, headers={"user-agent": "another-client/1"})  # ...and from another


def _step_up(s: Server, iss: DemoIssuer) -> httpx.Response:
    token = iss.token(sub(), auth_time=int(time.time()) - 3600, acr="urn:example:mfa")
    resp = s.request("POST", "/mfa", token)
    assert 'error="insufficient_user_authentication"' in resp.headers["www-authenticate"]
    assert 'max_age="300"' in resp.headers["www-authenticate"]
    return resp


def _scope(s: Server, iss: DemoIssuer) -> httpx.Response:
    resp = s.request("POST", "/admin", iss.token(sub(), scope="read"))
    assert 'scope="admin"' in resp.headers["www-authenticate"]
    return resp


def _paused(s: Server, iss: DemoIssuer) -> httpx.Response:
    who = sub()
    token = iss.token(who, sa_kind="agent", sid=f"{who}-s")
    assert s.request("GET", "/whoami", token).status_code == 200
    s.guard.pause_session(f"{who}-s")
    return s.request("GET", "/whoami", token)


def _device(s: Server, iss: DemoIssuer) -> httpx.Response:
    device = f"dev-{uuid.uuid4().hex[:6]}"
    s.guard.set_device_status(device, False)
    return s.request("POST", "/device", iss.token(sub(), device_id=device))


def _sessions(s: Server, iss: DemoIssuer) -> httpx.Response:
    who = sub()
    assert s.request("GET", "/solo", iss.token(who, sid=f"{who}-1")).status_code == 200
    return s.request("GET", "/solo", iss.token(who, sid=f"{who}-2"))


def _risk(s: Server, iss: DemoIssuer) -> httpx.Response:
    token = iss.token(sub())
    assert s.request("POST", "/risky", token).status_code == 200
    return s.request("POST", "/careful", token)


def _conflict(s: Server, iss: DemoIssuer) -> httpx.Response:
    token = iss.token(sub())
    s.hold("POST", "/exclusive", token)
    return s.request("GET", "/whoami", token)


def _locked(s: Server, iss: DemoIssuer) -> httpx.Response:
    s.hold("GET", "/docs/7", iss.token(sub()))
    return s.request("GET", "/docs/7", iss.token(sub()))


def _in_flight(s: Server, iss: DemoIssuer) -> httpx.Response:
    token = iss.token(sub())
    s.hold("GET", "/slot", token)
    return s.request("GET", "/slot", token)


def _store(s: Server, iss: DemoIssuer) -> httpx.Response:
    with s.use(store=Broken(), retry_after=4):
        resp = s.request("GET", "/whoami", iss.token(sub()))
    assert resp.headers["retry-after"] == "4"
    assert "s3cr3t" not in resp.text
    return resp


def _keys(s: Server, iss: DemoIssuer) -> httpx.Response:
    with s.use(keys=None, jwks_url=unreachable_jwks_url()):
        return s.request("GET", "/whoami", iss.token(sub()))


def _invalid_request(s: Server, iss: DemoIssuer) -> httpx.Response:
    # the app would run DELETE, the Guard would decide GET: refused
    return s.request("GET", "/whoami", iss.token(sub()), headers={"x-http-method-override": "DELETE"})


CASES: list[tuple[str, Case]] = [
    ("missing_token", _missing), ("invalid_token", _invalid), ("stale_generation", _stale),
    ("token_revoked", _token_revoked), ("session_revoked", _session_revoked),
    ("credential_compromised", _compromised), ("token_replayed", _replayed), ("token_reuse", _reuse),
    ("step_up_required", _step_up), ("insufficient_scope", _scope), ("session_paused", _paused),
    ("device_noncompliant", _device), ("too_many_sessions", _sessions), ("risk_too_high", _risk),
    ("conflicting_action", _conflict), ("object_locked", _locked), ("too_many_in_flight", _in_flight),
    ("store_unavailable", _store), ("keys_unavailable", _keys), ("invalid_request", _invalid_request),
]


def test_the_table_covers_every_code() -> None:
    assert [code for code, _ in CASES] == list(CODES)


@pytest.mark.parametrize(("code", "case"), CASES, ids=[code for code, _ in CASES])
def test_denial(srv: Server, issuer: DemoIssuer, code: str, case: Case) -> None:
    problem(case(srv, issuer), CODES[code][0], code)


def test_store_unavailable_fail_open_admits(srv: Server, issuer: DemoIssuer) -> None:
    with srv.use(store=Broken()):
        who = sub()
        opened = srv.request("GET", "/open", issuer.token(who))
        assert opened.status_code == 200, opened.text
        assert (opened.json()["principal"], opened.json()["ticket_id"]) == (who, None)
        problem(srv.request("GET", "/open"), 401, "missing_token")
        assert srv.request("GET", "/health").json() == {"ok": True}  # public: the store is not asked


# -- the context, routes and path parameters ---------------------------------------------------------------------

def test_context_in_the_view(srv: Server, issuer: DemoIssuer) -> None:
    who = sub()
    body = srv.request("GET", "/whoami", issuer.token(who, sid=f"{who}-s1", sa_kind="agent", team="red")).json()
    assert body["is_context"] is True
    assert (body["principal"], body["kind"], body["session_id"]) == (who, "agent", f"{who}-s1")
    assert body["claims"]["team"] == "red" and body["claims"]["sub"] == who
    assert body["route"] == "GET /whoami"
    assert isinstance(body["ticket_id"], str) and body["ticket_id"]
    assert body["fencing_tokens"] == {}


def test_public_view_needs_no_token_and_records_nothing(srv: Server, issuer: DemoIssuer) -> None:
    assert srv.request("GET", "/health").json() == {"ok": True}
    who = sub()
    assert srv.request("GET", "/health", issuer.token(who)).status_code == 200
    assert srv.guard.sessions(who) == []


@pytest.mark.parametrize(("url", "route", "params", "locks"), [
    ("/docs/5", "GET /docs/<int:id>", {"id": "5"}, ["doc:5"]),
    ("/orgs/7/items/widget-1", "GET /orgs/<int:org>/items/<slug:name>", {"org": "7", "name": "widget-1"},
     ["org:7:item:widget-1"]),
    ("/uuids/1b4e28ba-2fa1-11d2-883f-0016d3cca427", "GET /uuids/<uuid:key>",
     {"key": "1b4e28ba-2fa1-11d2-883f-0016d3cca427"}, ["thing:1b4e28ba-2fa1-11d2-883f-0016d3cca427"]),
    ("/legacy/2024/", "GET /^legacy/(?P<year>[0-9]{4})/$", {"year": "2024"}, ["year:2024"]),
])
def test_path_params_fill_lock_keys(srv: Server, issuer: DemoIssuer, url: str, route: str, params: dict[str, str],
                                    locks: list[str]) -> None:
    token = issuer.token(sub())
    body = srv.request("GET", url, token).json()
    assert (body["route"], body["params"]) == (route, params)
    assert_fences(body["fencing_tokens"], locks)
    assert body["locks"] == [[key, body["ticket_id"]] for key in locks]
    # released when the response left: the next request takes a greater fencing token
    again = srv.request("GET", url, token).json()
    assert_fences(again["fencing_tokens"], locks, after=body["fencing_tokens"])


def test_unmatched_path_is_decided_by_the_table_and_fails_closed(srv: Server, issuer: DemoIssuer) -> None:
    problem(srv.request("GET", "/nowhere"), 401, "missing_token")  # no route enumeration without a token
    assert srv.request("GET", "/nowhere", issuer.token(sub())).status_code == 404
    with srv.use(policies={"GET /public-404": Policy(public=True), "* /scoped-404/{id}": Policy(scopes={"x"})}):
        assert srv.request("GET", "/public-404").status_code == 404
        problem(srv.request("GET", "/scoped-404/3", issuer.token(sub())), 403, "insufficient_scope")
        assert srv.request("GET", "/scoped-404/3", issuer.token(sub(), scope="x")).status_code == 404


def test_view_policy_wins_over_the_guard_table(srv: Server, issuer: DemoIssuer) -> None:
    table = {"GET /docs/{id}": Policy(max_in_flight=1, locks=["table-doc:{id}"]),
             "GET /plain/{id}": Policy(locks=["table:{id}"]),
             "GET /health": Policy(public=False)}
    with srv.use(policies=table):
        token = issuer.token(sub())
        assert_fences(srv.request("GET", "/docs/3", token).json()["fencing_tokens"], {"doc:3"})  # the view's locks
        srv.hold("GET", "/docs/3", token)
        problem(srv.request("GET", "/docs/4", token), 429, "too_many_in_flight")  # the table's max_in_flight
        assert_fences(srv.request("GET", "/plain/3", issuer.token(sub())).json()["fencing_tokens"], {"table:3"})
        assert srv.request("GET", "/health").status_code == 200  # the view's public=True


def test_class_based_views(srv: Server, issuer: DemoIssuer) -> None:
    who = sub()
    token = issuer.token(who)
    got = srv.request("GET", "/things/1", token).json()  # the class's policy
    assert got["route"] == "GET /things/<int:id>"
    assert_fences(got["fencing_tokens"], {"cbv:1"})
    got = srv.request("POST", "/things/1", token).json()  # method_decorator(name="post"): its locks win
    assert got["route"] == "POST /things/<int:id>"
    assert_fences(got["fencing_tokens"], {"cbv-post:1"})
    srv.hold("POST", "/things/2", token)  # ...and its exclusive=True applies
    problem(srv.request("GET", "/whoami", token), 409, "conflicting_action")
    srv.settle()
    assert srv.request("OPTIONS", "/things/1").json()["principal"] is None  # @policy(public=True) on a method
    assert srv.request("HEAD", "/things/1", token).status_code == 200  # HEAD is served by get: the class's policy
    assert srv.request("GET", "/plain/1", token).json()["fencing_tokens"] == {}  # no policy: default_policy
    got = srv.request("GET", "/decorated-as-view/1", token).json()  # policy(...)(View.as_view())
    assert_fences(got["fencing_tokens"], {"dav:1"})
    assert srv.request("GET", "/athing").json()["principal"] is None  # an async class-based view
    got = srv.request("POST", "/athing", token).json()
    assert got["principal"] == who
    assert_fences(got["fencing_tokens"], {"athing"})
    problem(srv.request("POST", "/athing"), 401, "missing_token")


def test_async_function_view(srv: Server, issuer: DemoIssuer) -> None:
    who = sub()
    token = issuer.token(who)
    gate = srv.hold("GET", "/async-docs/9", token)
    assert gate.entered.is_set()
    first = {lock.key: lock.fencing_token for lock in srv.guard.locks()}  # the held request's token
    problem(srv.request("GET", "/async-docs/9", issuer.token(sub())), 423, "object_locked")
    gate.released.set()
    srv.settle()
    body = srv.request("GET", "/async-docs/9", token).json()
    assert (body["principal"], body["route"]) == (who, "GET /async-docs/<int:id>")
    assert_fences(body["fencing_tokens"], {"adoc:9"}, after=first)


def test_override_settings_rebuilds_the_guard(srv: Server, issuer: DemoIssuer) -> None:
    first = get_guard()
    assert get_guard() is first and srv.guard is first
    problem(srv.request("GET", "/whoami"), 401, "missing_token")
    with srv.use(default_policy=Policy(public=True)) as second:
        assert second is not first
        assert srv.request("GET", "/whoami").json()["principal"] is None  # the new settings, on a live server
    assert get_guard() is not second  # the old value came back: a Guard for it again
    problem(srv.request("GET", "/whoami"), 401, "missing_token")


def test_a_guard_the_adapter_built_is_closed_when_the_setting_changes(issuer: DemoIssuer, tmp_path: Path) -> None:
    mine = Broken()
    with override_settings(SA_MIDDLEWARE=options(issuer, tmp_path, store="memory://")):
        built = get_guard()
        assert built.locks() == []
        with override_settings(SA_MIDDLEWARE=options(issuer, tmp_path, store=mine)):
            assert get_guard() is not built
            with pytest.raises(Exception):  # noqa: B017 - closed: any store error will do
                built.locks()
            given = get_guard()
        assert get_guard() is not given
    assert given.store is mine and mine.locks() == []  # a store object given in the settings is yours: left open


# -- release: after the response, on exceptions, on streams -----------------------------------------------------

def test_ticket_released_before_the_response_starts(srv: Server, issuer: DemoIssuer) -> None:
    """A complete response: the ticket is released when the middleware returns, before the server sends it."""
    seen: list[list[str]] = []
    guard = srv.guard
    if srv.flavour == "wsgi":
        inner = srv.finished.app

        def app(environ: dict[str, Any], start_response: Any) -> Any:
            def observed(status: str, headers: Any, exc_info: Any = None) -> Any:
                seen.append([lk.key for lk in guard.locks()])
                return start_response(status, headers, exc_info)
            return inner(environ, observed)
    else:
        inner = srv.finished.app

        async def app(scope: Any, receive: Any, send: Any) -> None:  # type: ignore[misc]
            async def observed(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    seen.append([lk.key for lk in await guard.alocks()])
                await send(message)
            await inner(scope, receive, observed)
    srv.finished.app = app
    try:
        body = srv.request("GET", "/docs/11", issuer.token(sub())).json()
    finally:
        srv.finished.app = inner
    assert body["locks"] == [["doc:11", body["ticket_id"]]]  # held while the view ran
    assert seen == [[]]  # released before the response started


def test_release_when_the_view_raises(srv: Server, issuer: DemoIssuer) -> None:
    token = issuer.token(sub())
    for url in ("/boom/1", "/async-boom/2"):
        resp = srv.request("GET", url, token)
        assert resp.status_code == 500
        assert "the view failed" not in resp.text
        srv.assert_released(token)


def _held_stream(srv: Server, url: str, token: str) -> tuple[support.Gate, str]:
    """A streamed response whose content is parked at a gate; returns the gate and the request's rid."""
    name, request_id = uuid.uuid4().hex[:10], rid()
    gate = srv.app.gate(name)

    def run() -> None:
        with contextlib.suppress(httpx.HTTPError):  # a stream that fails mid-way ends with a dropped connection
            srv.request("GET", f"{url}?hold={name}", token, rid=request_id)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    srv._threads.append(thread)
    assert gate.entered.wait(WAIT), "the stream never reached its gate"
    return gate, request_id


@pytest.mark.parametrize("url", ["/stream/1", "/async-stream/2", "/file/3"])
def test_streamed_response_holds_its_ticket_until_closed(srv: Server, issuer: DemoIssuer, url: str) -> None:
    if url.startswith("/async-") and srv.flavour == "wsgi":
        pytest.skip("async content is for ASGI (Django buffers it under WSGI)")
    who = sub()
    token = issuer.token(who)
    gate, request_id = _held_stream(srv, url, token)
    # the view has returned, the middleware too: the stream is being sent, and the ticket is still in flight
    ticket = srv.app.records[request_id]["ticket_id"]
    assert {lk.ticket_id for lk in srv.guard.locks()} == {ticket}
    problem(srv.request("POST", "/exclusive", token), 409, "conflicting_action")
    gate.released.set()
    assert srv.finished.done(request_id).wait(WAIT)  # the server closed the response
    record = srv.app.records[request_id]
    if url.startswith("/stream/"):
        assert record["locks_after_last_chunk"] == {ticket}  # the last chunk was produced: not released yet
    if url.startswith("/file/"):
        assert record["file_closed"] is True
    srv.assert_released(token)


def test_stream_body_arrives_whole(srv: Server, issuer: DemoIssuer) -> None:
    resp = srv.request("GET", "/stream/4", issuer.token(sub()), rid=rid())
    assert resp.content == b"firstlast"
    resp = srv.request("GET", "/file/5", issuer.token(sub()), rid=rid())
    assert resp.content == b"firstlast"


def test_release_when_the_stream_raises_mid_way(srv: Server, issuer: DemoIssuer) -> None:
    who = sub()
    gate, request_id = _held_stream(srv, "/boom-mid/6", issuer.token(who))
    assert [lk.key for lk in srv.guard.locks()] == ["stream:6"]
    gate.released.set()
    assert srv.finished.done(request_id).wait(WAIT)
    srv.settle()
    srv.assert_released(issuer.token(who))


def test_release_when_the_client_goes_away_mid_stream(srv: Server, issuer: DemoIssuer) -> None:
    # ASGI: an async stream (Django's ASGI handler reads a sync one whole before sending it)
    url = "/events/1" if srv.flavour == "wsgi" else "/async-events/1"
    who = sub()
    name, request_id = uuid.uuid4().hex[:8], rid()
    gate = srv.app.gate(name)
    with srv.raw_stream(f"{url}?rid={request_id}&hold={name}", issuer.token(who)):
        assert gate.entered.wait(WAIT)
        assert [lk.key for lk in srv.guard.locks()] == ["stream:1"]
    gate.released.set()  # the client is gone: the server closes the response (or Django stops the stream)
    assert srv.finished.done(request_id).wait(WAIT)
    if srv.flavour == "wsgi":
        assert srv.app.records[request_id].get("closed_early") is True
    srv.assert_released(issuer.token(who))


# -- the five behaviours, on both servers -------------------------------------------------------------------------

def test_play_the_five_behaviours(srv: Server) -> None:
    issuer = DemoIssuer()
    with srv.use(keys=issuer.public_pem, issuer=issuer.issuer, audience=issuer.audience) as guard:
        steps = play(srv.base, guard, issuer, lambda step: None)
    bad = [(s.behaviour, s.who, s.what, s.expected, s.got) for s in steps if not s.ok]
    assert not bad, bad
    assert {s.behaviour[0] for s in steps} == set("12345") and len(steps) == 32


def test_concurrent_writers_exactly_one_holds_the_object(srv: Server, issuer: DemoIssuer) -> None:
    writers = 6
    tokens = [issuer.token(sub()) for _ in range(writers)]
    names = [uuid.uuid4().hex[:10] for _ in range(writers)]
    gates = [srv.app.gate(name) for name in names]
    barrier = threading.Barrier(writers)
    results: queue.Queue[tuple[int, httpx.Response]] = queue.Queue()

    def write(i: int) -> None:
        barrier.wait(WAIT)
        results.put((i, srv.request("PUT", f"/objects/55?hold={names[i]}", tokens[i])))

    threads = [threading.Thread(target=write, args=(i,), daemon=True) for i in range(writers)]
    for t in threads:
        t.start()
    try:
        refused = [results.get(timeout=WAIT) for _ in range(writers - 1)]
        for _, resp in refused:
            problem(resp, 423, "object_locked")
        [winner] = set(range(writers)) - {i for i, _ in refused}
        assert gates[winner].entered.wait(WAIT)
        assert [g.entered.is_set() for g in gates].count(True) == 1
        [lock] = srv.guard.locks()
        assert lock.key == "object:55"
    finally:
        for g in gates:
            g.released.set()
    i, last = results.get(timeout=WAIT)
    assert i == winner and last.status_code == 200
    assert_fences(last.json()["fencing_tokens"], {"object:55"})
    for t in threads:
        t.join(WAIT)


def test_concurrent_sessions_admit_exactly_max_sessions(srv: Server, issuer: DemoIssuer) -> None:
    crawler, n = sub(), 8
    tokens = [issuer.token(crawler, sa_kind="agent", sid=f"{crawler}-s{i}") for i in range(n)]
    barrier = threading.Barrier(n)
    results: list[httpx.Response | BaseException | None] = [None] * n

    def open_session(i: int) -> None:
        try:
            barrier.wait(WAIT)
            results[i] = srv.request("GET", "/whoami", tokens[i])
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=open_session, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 2)
    responses = [r for r in results if isinstance(r, httpx.Response)]
    assert len(responses) == n, results
    outcomes = Counter(r.status_code for r in responses)
    assert outcomes == {200: 3, 403: n - 3}, outcomes
    for r in responses:
        if r.status_code == 403:
            problem(r, 403, "too_many_sessions")


# -- the middleware driven directly: exactly once ---------------------------------------------------------------

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
def counting(issuer: DemoIssuer, tmp_path: Path) -> Iterator[tuple[Guard, CountingStore]]:
    store = CountingStore()
    with override_settings(SA_MIDDLEWARE=options(issuer, tmp_path, store=store)):
        yield get_guard(), store


def get(url: str, token: str | None) -> Any:
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token else {}
    return RequestFactory().get(url, REMOTE_ADDR="127.0.0.1", **headers)


def asgi_get(url: str, headers: dict[str, str], *, scheme: str = "https", cert: str | None = None) -> tuple[int, bytes]:
    """GET ``url`` through Django's ASGI handler with a hand-made scope (a TLS client certificate, as a server
    reports it in the ``tls`` extension): the status and the body."""
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": scheme,
        "path": url, "raw_path": url.encode(), "root_path": "", "query_string": b"", "server": ("testserver", 443),
        "client": ("127.0.0.1", 5000),
        "headers": [(b"host", b"testserver"), *((k.lower().encode(), v.encode()) for k, v in headers.items())],
        "extensions": {"tls": {"client_cert_chain": [cert] if cert else [], "server_cert": None,
                               "tls_version": 0x0304, "cipher_suite": None}}}
    sent: list[dict[str, Any]] = []
    incoming = [{"type": "http.request", "body": b""}]

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop()
        await asyncio.Event().wait()  # no disconnect: Django cancels this once the response is sent
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(ASGIHandler()(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_asgi_request_keeps_its_scheme_and_client_certificate(counting: tuple[Guard, CountingStore],
                                                               issuer: DemoIssuer, tmp_path: Path) -> None:
    holder, client = Holder("ES256"), Authority(tmp_path).issue("client")
    dpop_token = issuer.token(sub(), cnf={"jkt": holder.jkt})
    url = "https://testserver/whoami"
    status, body = asgi_get("/whoami", {"authorization": f"DPoP {dpop_token}",
                                        "dpop": holder.proof("GET", url, dpop_token)})
    assert status == 200, body
    status, body = asgi_get("/whoami", {"authorization": f"DPoP {dpop_token}",
                                        "dpop": holder.proof("GET", "http://testserver/whoami", dpop_token)})
    assert status == 401 and b"htu does not match" in body
    cert_token = issuer.token(sub(), cnf={"x5t#S256": client.x5t})
    status, body = asgi_get("/whoami", {"authorization": f"Bearer {cert_token}"}, cert=client.cert_pem)
    assert status == 200, body
    status, body = asgi_get("/whoami", {"authorization": f"Bearer {cert_token}"})
    assert status == 401 and b"none was presented" in body


def test_script_name_dpop_htu_is_the_full_path_and_the_table_uses_path_info(issuer: DemoIssuer,
                                                                            tmp_path: Path) -> None:
    holder = Holder("ES256")
    token = issuer.token(sub(), cnf={"jkt": holder.jkt})

    def mounted(url: str, proof: str | None = None) -> Any:
        headers = {"HTTP_AUTHORIZATION": f"DPoP {token}", "HTTP_DPOP": proof} if proof else {}
        return RequestFactory().get(url, SCRIPT_NAME="/app", REMOTE_ADDR="127.0.0.1", **headers)

    def view(request: Any) -> HttpResponse:
        return HttpResponse(request.path)

    table = {"GET /open-404": Policy(public=True), "GET /docs/{id}": Policy(scopes={"x"})}
    # the view is called directly, not through the URLconf: its entries match no URL pattern on purpose
    with override_settings(SA_MIDDLEWARE=options(issuer, tmp_path, policies=table),
                           SILENCED_SYSTEM_CHECKS=["sa_middleware.E006"]):
        middleware = SessionAwareMiddleware(view)
        response = middleware(mounted("/whoami", holder.proof("GET", "http://testserver/app/whoami", token)))
        assert response.status_code == 200 and response.content == b"/app/whoami"
        response = middleware(mounted("/whoami", holder.proof("GET", "http://testserver/whoami", token)))
        assert response.status_code == 401 and b"htu does not match" in response.content
        assert middleware(mounted("/open-404")).status_code == 200  # unmatched: the table entry, by path_info
        response = middleware(mounted("/docs/3", holder.proof("GET", "http://testserver/app/docs/3", token)))
        assert response.status_code == 403 and b"insufficient_scope" in response.content  # matched: idem


def test_sync_and_async_capable() -> None:
    assert SessionAwareMiddleware.sync_capable is True and SessionAwareMiddleware.async_capable is True

    async def async_view(request: Any) -> HttpResponse:
        return HttpResponse()

    assert iscoroutinefunction(SessionAwareMiddleware(async_view))
    assert not iscoroutinefunction(SessionAwareMiddleware(lambda request: HttpResponse()))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_complete_response_released_once_before_return(counting: tuple[Guard, CountingStore], issuer: DemoIssuer,
                                                       mode: str) -> None:
    guard, store = counting
    seen: dict[str, Any] = {}

    def view(request: Any) -> HttpResponse:
        seen["ctx"] = request.sa
        seen["locks"] = [lk.key for lk in guard.locks()]
        return HttpResponse("ok")

    async def aview(request: Any) -> HttpResponse:
        return view(request)

    if mode == "sync":
        response = SessionAwareMiddleware(view)(get("/docs/3", issuer.token(sub())))
    else:
        response = asyncio.run(SessionAwareMiddleware(aview)(get("/docs/3", issuer.token(sub()))))
    assert response.status_code == 200 and seen["locks"] == ["doc:3"]
    assert guard.locks() == []
    assert store.released == {seen["ctx"].ticket_id: 1}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_stream_released_once_on_close(counting: tuple[Guard, CountingStore], issuer: DemoIssuer, mode: str) -> None:
    guard, store = counting

    def view(request: Any) -> StreamingHttpResponse:
        return StreamingHttpResponse(iter([b"a", b"b"]))

    async def aview(request: Any) -> StreamingHttpResponse:
        return view(request)

    request = get("/stream/3", issuer.token(sub()))
    if mode == "sync":
        response = SessionAwareMiddleware(view)(request)
    else:
        response = asyncio.run(SessionAwareMiddleware(aview)(request))
    ticket = request.sa.ticket_id
    assert [lk.ticket_id for lk in guard.locks()] == [ticket]  # returned, not sent yet
    assert b"".join(response) == b"ab"
    assert [lk.ticket_id for lk in guard.locks()] == [ticket]  # every chunk produced, not closed yet
    response.close()
    assert guard.locks() == []
    response.close()
    del response
    gc.collect()  # the backstop finds it released already
    assert store.released == {ticket: 1}


def test_stream_raising_mid_way_releases_at_once(counting: tuple[Guard, CountingStore], issuer: DemoIssuer) -> None:
    guard, store = counting

    def chunks() -> Iterator[bytes]:
        yield b"a"
        raise RuntimeError("mid-stream")

    request = get("/stream/4", issuer.token(sub()))
    response = SessionAwareMiddleware(lambda r: StreamingHttpResponse(chunks()))(request)
    with pytest.raises(RuntimeError):
        list(response)
    assert guard.locks() == []  # released although nobody closed the response
    response.close()
    assert store.released == {request.sa.ticket_id: 1}


def test_stream_dropped_without_close_is_released_by_the_backstop(counting: tuple[Guard, CountingStore],
                                                                   issuer: DemoIssuer) -> None:
    guard, store = counting
    request = get("/stream/5", issuer.token(sub()))
    response = SessionAwareMiddleware(lambda r: StreamingHttpResponse(iter([b"a"])))(request)
    assert len(guard.locks()) == 1
    del response
    gc.collect()
    assert guard.locks() == []
    assert store.released == {request.sa.ticket_id: 1}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_exception_in_get_response_releases_once(counting: tuple[Guard, CountingStore], issuer: DemoIssuer,
                                                 mode: str) -> None:
    guard, store = counting
    request = get("/boom/1", issuer.token(sub()))

    def view(request: Any) -> HttpResponse:
        raise KeyError("app bug")

    async def aview(request: Any) -> HttpResponse:
        raise KeyError("app bug")

    with pytest.raises(KeyError, match="app bug"):
        if mode == "sync":
            SessionAwareMiddleware(view)(request)
        else:
            asyncio.run(SessionAwareMiddleware(aview)(request))
    assert guard.locks() == []
    assert store.released == {request.sa.ticket_id: 1}


def test_refused_request_never_reaches_the_view(counting: tuple[Guard, CountingStore]) -> None:
    calls: list[Any] = []
    response = SessionAwareMiddleware(calls.append)(get("/docs/1", None))
    assert calls == []
    assert response.status_code == 401
    assert response["content-type"] == "application/problem+json"
    assert response["www-authenticate"] == "Bearer"
    assert json.loads(response.content)["code"] == "missing_token"


# -- settings, policies and system checks ------------------------------------------------------------------------

def check_ids(**overrides: Any) -> list[str]:
    with override_settings(**overrides):
        return sorted(m.id for m in checks.run_checks(tags=["sa_middleware"]))


def test_good_settings_pass_every_check(issuer: DemoIssuer, tmp_path: Path) -> None:
    assert check_ids(SA_MIDDLEWARE=options(issuer, tmp_path)) == []


@pytest.mark.parametrize("value", [None, ["store"], "sqlite:///x.db"])
def test_e001_setting_missing_or_not_a_dict(value: Any) -> None:
    assert "sa_middleware.E001" in check_ids(SA_MIDDLEWARE=value)


@pytest.mark.parametrize(("extra", "needle"), [
    ({"bogus": 1}, "unknown option(s) 'bogus'"),
    ({"algorithms": None}, "algorithms"),
    ({"lease": -1}, "lease must be a positive"),
    ({"policies": {"GET /x/{id}": Policy(locks=["x:{nope}"])}}, "GET /x/{id}"),
    ({"default_policy": Policy(max_sessions=0)}, "max_sessions"),
])
def test_e002_invalid_guard_options(issuer: DemoIssuer, tmp_path: Path, extra: dict[str, Any], needle: str) -> None:
    conf = options(issuer, tmp_path, **extra)
    if conf["algorithms"] is None:
        del conf["algorithms"]
    with override_settings(SA_MIDDLEWARE=conf):
        [message] = checks.run_checks(tags=["sa_middleware"])
        assert message.id == "sa_middleware.E002"
        assert needle in message.msg
        with pytest.raises(Exception, match="SA_MIDDLEWARE"):
            get_guard()


@policy(locks=["payment:{id}"])
def _bad_pay(request: Any, pk: int) -> HttpResponse:
    BadUrls.ran.append("pay")
    return HttpResponse()


@method_decorator(policy(locks=["thing:{nope}"]), name="post")
class _BadMethod(View):
    def post(self, request: Any, id: int) -> HttpResponse:
        return HttpResponse()


def _bad_manual(request: Any) -> HttpResponse:
    return HttpResponse()


_bad_manual.__sa_policy__ = Policy(max_sessions=0)  # type: ignore[attr-defined]  # set by hand, never validated


class BadUrls:
    """A URLconf with policy mistakes (``ROOT_URLCONF`` may be any object with ``urlpatterns``)."""

    ran: list[str] = []
    urlpatterns = [
        path("pay/<int:pk>", _bad_pay),
        path("things/<int:id>", _BadMethod.as_view()),
        path("manual", _bad_manual),
        path("fine/<int:id>", policy(locks=["fine:{id}"])(lambda request, id: HttpResponse())),
    ]


def test_e003_view_policy_mistakes(issuer: DemoIssuer, tmp_path: Path) -> None:
    with override_settings(SA_MIDDLEWARE=options(issuer, tmp_path), ROOT_URLCONF=BadUrls):
        messages = [m for m in checks.run_checks(tags=["sa_middleware"]) if m.id == "sa_middleware.E003"]
        text = "\n".join(m.msg for m in messages)
        assert "route '/pay/<int:pk>'" in text and "{id}" in text and "(it has: pk)" in text
        assert "route '/things/<int:id>'" in text and "{nope}" in text
        assert "route '/manual'" in text and "max_sessions" in text
        assert len(messages) == 3  # one per mistake, not one per HTTP method
        # at request time the same mistake fails closed: a 500, and the view never runs
        client = Client(raise_request_exception=False)
        assert client.get("/pay/1", HTTP_AUTHORIZATION=f"Bearer {issuer.token(sub())}").status_code == 500
        assert BadUrls.ran == []


def test_e003_not_raised_for_the_test_project(issuer: DemoIssuer, tmp_path: Path) -> None:
    """Included URLconfs pass their prefixes' parameters, and extra kwargs count as parameters."""
    assert check_ids(SA_MIDDLEWARE=options(issuer, tmp_path)) == []


@pytest.mark.parametrize(("middleware", "expected"), [
    ([MIDDLEWARE_PATH, MIDDLEWARE_PATH], ["sa_middleware.E004"]),
    (["django.middleware.cache.FetchFromCacheMiddleware", MIDDLEWARE_PATH], ["sa_middleware.W001"]),
    ([MIDDLEWARE_PATH, "django.middleware.cache.FetchFromCacheMiddleware"], []),
    ([MIDDLEWARE_PATH, "django.middleware.locale.LocaleMiddleware"], ["sa_middleware.W002"]),
    (["django.middleware.locale.LocaleMiddleware", MIDDLEWARE_PATH], []),
    # the project's views have a @policy: without the middleware they would refuse every request (E005)
    (["django.middleware.common.CommonMiddleware"], ["sa_middleware.E005", "sa_middleware.W003"]),
    ([], ["sa_middleware.E005", "sa_middleware.W003"]),
])
def test_middleware_checks(issuer: DemoIssuer, tmp_path: Path, middleware: list[str], expected: list[str]) -> None:
    assert check_ids(SA_MIDDLEWARE=options(issuer, tmp_path), MIDDLEWARE=middleware) == expected


def test_app_config() -> None:
    from django.apps import AppConfig

    config = AppConfig.create("sa_middleware.adapters.django.SAMiddlewareConfig")
    assert isinstance(config, SAMiddlewareConfig) and config.label == "sa_middleware"


def test_missing_settings_fail_closed(issuer: DemoIssuer) -> None:
    with override_settings(SA_MIDDLEWARE=None):
        response = Client(raise_request_exception=False).get("/whoami")
        assert response.status_code == 500


def test_policy_is_validated_at_decoration_naming_the_view() -> None:
    from sa_middleware import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"view .*badly_configured.*max_sessions"):
        @policy(max_sessions=0)
        def badly_configured(request: Any) -> HttpResponse:
            return HttpResponse()


# -- the example project, served in subprocesses ---------------------------------------------------------------

class Backend(ThreadingHTTPServer):
    """The example's "system of record": records every POST."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, dict[str, Any]]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(handler) -> None:
                length = int(handler.headers["content-length"])
                self.posts.append((handler.path, json.loads(handler.rfile.read(length))))
                handler.send_response(204)
                handler.end_headers()

            def log_message(handler, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def example_server(flavour: str, tmp_path: Path, backend: str) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "SA_STORE": f"sqlite:///{tmp_path / 'example.db'}", "SA_DEV_KEY": str(tmp_path / "key.pem"),
           "WORKBENCH_BACKEND": backend}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    if flavour == "wsgi":
        cmd = [sys.executable, str(EXAMPLE / "manage.py"), "runserver", "--noreload", f"127.0.0.1:{port}"]
    else:
        cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLE), "workbench.asgi:application",
               "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:  # wait for the process to listen (it prints nothing we could wait on more precisely)
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                httpx.get(f"{base}/health", timeout=WAIT)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the example did not start"
                time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(WAIT)


@pytest.mark.parametrize("flavour", ["wsgi", "asgi"])
def test_example_project(flavour: str, tmp_path: Path) -> None:
    key = dev_key(tmp_path / "key.pem")  # created here; the server loads the same file
    backend = Backend()
    try:
        with example_server(flavour, tmp_path, f"http://127.0.0.1:{backend.server_port}") as base:
            assert httpx.get(f"{base}/health").json() == {"ok": True}
            problem(httpx.get(f"{base}/whoami"), 401, "missing_token")
            agent = f"agent-{uuid.uuid4().hex[:6]}"
            token = key.mint(agent, sa_kind="agent", sid=f"{agent}-s1", scope="tickets payments:approve")
            auth = {"authorization": f"Bearer {token}"}
            me = httpx.get(f"{base}/whoami", headers=auth).json()
            assert me == {"principal": agent, "kind": "agent", "session_id": f"{agent}-s1", "route": "GET /whoami",
                          "fencing_tokens": {}}
            paid = httpx.post(f"{base}/payments/42/approve", headers=auth)
            assert paid.status_code == 200, paid.text
            assert paid.json()["payment"] == 42 and paid.json()["approved"] is True
            assert paid.json()["context"]["route"] == "POST /payments/<int:id>/approve"
            paid_fences = paid.json()["context"]["fencing_tokens"]
            assert_fences(paid_fences, {"payment:42"})
            ticket = httpx.post(f"{base}/tickets", headers=auth)
            assert ticket.status_code == 201 and len(ticket.json()["ticket"]) == 32
            problem(httpx.post(f"{base}/payments/42/approve", headers=auth), 403, "risk_too_high")
            obj = httpx.put(f"{base}/objects/7", headers=auth).json()
            assert (obj["object"], obj["updated"]) == (7, True)
            assert_fences(obj["context"]["fencing_tokens"], {"object:7"})
            problem(httpx.post(f"{base}/payments/43/approve", headers={
                "authorization": f"Bearer {key.mint(sub())}"}), 403, "insufficient_scope")
            assert httpx.put(f"{base}/objects/7").status_code == 401
        assert [(p, b["principal"], b["id"], b["fencing_tokens"]) for p, b in backend.posts] == [
            ("/payments", agent, 42, paid_fences), ("/tickets", agent, None, {}),
            ("/objects", agent, 7, obj["context"]["fencing_tokens"])]  # the backend got the tokens the views saw
    finally:
        backend.shutdown()
        backend.server_close()


def test_example_project_passes_the_system_checks(tmp_path: Path) -> None:
    env = {**os.environ, "SA_STORE": f"sqlite:///{tmp_path / 'example.db'}", "SA_DEV_KEY": str(tmp_path / "key.pem")}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    done = subprocess.run([sys.executable, str(EXAMPLE / "manage.py"), "check"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no issues" in done.stdout


# -- Django 4.2 --------------------------------------------------------------------------------------------------

def test_django_version_is_the_one_asked_for() -> None:
    expected = os.environ.get("SA_EXPECT_DJANGO")
    if expected:
        assert django.get_version().startswith(expected), django.get_version()


DJANGO_42 = "django>=4.2,<5"


def django42() -> Path:
    """Django 4.2 installed with ``pip install --target`` into ``.venv-django42/site-packages`` (cached)."""
    target = ROOT / ".venv-django42" / "site-packages"
    sentinel = target / ".installed"
    if sentinel.exists() and sentinel.read_text() == DJANGO_42:
        return target
    staging = target.parent / f"staging-{uuid.uuid4().hex[:8]}"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           "--target", str(staging), DJANGO_42], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    (staging / ".installed").write_text(DJANGO_42)
    if target.exists():
        import shutil

        shutil.rmtree(target)
    staging.rename(target)
    return target


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.skipif(os.environ.get(NESTED) == "1", reason="this is the Django 4.2 run")
def test_the_suite_passes_under_django_42() -> None:
    target = django42()
    env = {**os.environ, NESTED: "1", "SA_EXPECT_DJANGO": "4.2",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x",
                           str(Path(__file__).relative_to(ROOT))], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=550)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and " failed" not in done.stdout


# -- fail closed: script prefixes, views without the middleware, table entries without a route --------------------

@pytest.mark.parametrize("flavour", ["wsgi", "asgi", "force_script_name"])
def test_row1_table_matched_below_the_script_prefix(issuer: DemoIssuer, tmp_path: Path, flavour: str) -> None:
    """The Guard table is matched on ``path_info``: under a WSGI mount, uvicorn's ``root_path`` or
    ``FORCE_SCRIPT_NAME``, a table-only policy still applies."""
    from werkzeug.exceptions import NotFound
    from werkzeug.middleware.dispatcher import DispatcherMiddleware

    extra: dict[str, Any] = {"FORCE_SCRIPT_NAME": "/api"} if flavour == "force_script_name" else {}
    conf = options(issuer, tmp_path, policies={"GET /whoami": Policy(scopes={"admin"})})
    with override_settings(SA_MIDDLEWARE=conf, **extra):
        if flavour == "wsgi":
            base, stop = serve_wsgi(DispatcherMiddleware(NotFound(), {"/api": WSGIHandler()}))
            url = f"{base}/api/whoami"
        elif flavour == "asgi":
            base, stop = serve_asgi(ASGIHandler(), root_path="/api")  # uvicorn puts /api in scope["path"]
            url = f"{base}/whoami"
        else:  # a proxy stripped /api; Django builds its URLs (request.path) with the forced prefix
            base, stop = serve_wsgi(WSGIHandler())
            url = f"{base}/whoami"
        try:
            problem(httpx.get(url, headers={"authorization": f"Bearer {issuer.token(sub())}"}, timeout=WAIT), 403,
                    "insufficient_scope")
            ok = httpx.get(url, headers={"authorization": f"Bearer {issuer.token(sub(), scope='admin')}"},
                           timeout=WAIT)
            assert ok.status_code == 200 and ok.json()["route"] == "GET /whoami", ok.text
        finally:
            stop()


def test_row5_a_policy_view_without_the_middleware_refuses(issuer: DemoIssuer, tmp_path: Path) -> None:
    with override_settings(SA_MIDDLEWARE=options(issuer, tmp_path), MIDDLEWARE=[]):
        resp = Client().post("/payments/1/approve", HTTP_AUTHORIZATION=f"Bearer {issuer.token(sub())}")
        assert resp.status_code == 503 and resp["content-type"] == "application/problem+json"
        assert json.loads(resp.content)["code"] == "view_not_guarded"
        assert Client().get("/health").status_code == 503  # @policy(public=True) too: nothing decided it


def test_row6_an_unrouted_entry_stops_the_server_loading_the_middleware(issuer: DemoIssuer, tmp_path: Path) -> None:
    """gunicorn and uvicorn never run the system checks: loading the middleware (the handler's start-up) refuses."""
    conf = options(issuer, tmp_path, policies={"POST /payment/{id:int}/approve": Policy(scopes={"x"})})
    with override_settings(SA_MIDDLEWARE=conf):
        with pytest.raises(ImproperlyConfigured, match=r"'POST /payment/\{id:int\}/approve'.*did you mean"):
            WSGIHandler()
        with pytest.raises(ImproperlyConfigured, match="did you mean"):
            ASGIHandler()
        with override_settings(SILENCED_SYSTEM_CHECKS=["sa_middleware.E006"]):
            WSGIHandler()  # silenced on purpose: something other than the URLconf answers it


def test_row6_a_table_entry_without_a_url_pattern_is_e006(issuer: DemoIssuer, tmp_path: Path) -> None:
    conf = options(issuer, tmp_path, policies={"POST /payment/{id:int}/approve": Policy(scopes={"x"})})
    with override_settings(SA_MIDDLEWARE=conf):
        messages = [m for m in checks.run_checks(tags=["sa_middleware"]) if m.id == "sa_middleware.E006"]
    assert len(messages) == 1
    assert "'POST /payment/{id:int}/approve'" in messages[0].msg
    assert "did you mean '/payments/<int:id>/approve'?" in messages[0].msg
    good = options(issuer, tmp_path, policies={"POST /payments/{id:int}/approve": Policy(scopes={"x"}),
                                               "OPTIONS /{rest:path}": Policy(public=True)})
    assert check_ids(SA_MIDDLEWARE=good) == []
