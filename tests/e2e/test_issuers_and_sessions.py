"""Issuer-scoped principal state and the session limit, end to end over real HTTP (uvicorn and werkzeug).

- A session limit on a route holds whichever route made the session active: a second session opened through
  another route (or a 404) is still refused on the limited route while the older session is active.
- Two applications with their own keys and issuers share one store (SQLite, Redis): a subject of one issuer
  never touches the state of the same subject under the other.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis_support

from sa_middleware import Guard, Policy
from sa_middleware.asgi import SessionAwareMiddleware
from sa_middleware.demo import DemoIssuer, serve_asgi, serve_wsgi
from sa_middleware.wsgi import SessionAwareWSGIMiddleware

WAIT = 10.0
ROUTES = ("/limited", "/evicting", "/other")
POLICIES = {
    "GET /limited": Policy(max_sessions=1),
    "GET /evicting": Policy(max_sessions=1, on_session_limit="evict_oldest"),
    "GET /other": Policy(),
}


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    status = 200 if scope["path"] in ROUTES else 404
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok" if status == 200 else b"not found"})


def wsgi_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    found = environ["PATH_INFO"] in ROUTES
    start_response("200 OK" if found else "404 Not Found", [("content-type", "text/plain")])
    return [b"ok" if found else b"not found"]


class App:
    """One application: its issuer (own key), its Guard on the shared store, served over HTTP."""

    def __init__(self, store: str, flavour: str, issuer: str = "https://idp-a.example") -> None:
        self.idp = DemoIssuer(issuer=issuer)
        self.guard = Guard(store=store, keys=self.idp.public_pem, algorithms=["RS256"], issuer=self.idp.issuer,
                           audience=self.idp.audience, policies=POLICIES, default_policy=Policy())
        if flavour == "asgi":
            self.base, self._stop = serve_asgi(SessionAwareMiddleware(asgi_app, guard=self.guard))
        else:
            self.base, self._stop = serve_wsgi(SessionAwareWSGIMiddleware(wsgi_app, guard=self.guard))

    def get(self, path: str, token: str) -> httpx.Response:
        return httpx.get(self.base + path, headers={"authorization": f"Bearer {token}"}, timeout=WAIT)

    def code(self, path: str, token: str) -> str:
        """``"200"``, ``"404"``, or the denial's status and code (``"403 too_many_sessions"``)."""
        resp = self.get(path, token)
        if resp.status_code in (200, 404):
            return str(resp.status_code)
        return f"{resp.status_code} {resp.json()['code']}"

    def close(self) -> None:
        self._stop()
        self.guard.close()


def fresh(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[Callable[..., App]]:
    apps: list[App] = []

    def make(store: str, flavour: str = "asgi", **options: Any) -> App:
        app = App(store, flavour, **options)
        apps.append(app)
        return app
    yield make
    for app in apps:
        app.close()


# ------------------------------------------------------------------------------------------- the session limit


@pytest.mark.parametrize("flavour", ["asgi", "wsgi"])
def test_a_session_limit_holds_whichever_route_made_the_session_active(
        make_app: Callable[..., App], tmp_path: Path, flavour: str) -> None:
    app = make_app(f"sqlite:///{tmp_path / 'sa.db'}", flavour)
    alice = fresh("alice")
    first, second, third = (app.idp.token(alice, sid=f"{alice}-s{i}") for i in (1, 2, 3))
    assert app.code("/limited", first) == "200"
    assert app.code("/limited", second) == "403 too_many_sessions"
    assert app.code("/other", second) == "200"  # another route opens the second session...
    assert app.code("/limited", second) == "403 too_many_sessions"  # ...which the limited route still refuses
    assert app.code("/nowhere", third) == "404"  # a 404 opens a third one (the default policy admitted it)
    assert app.code("/limited", third) == "403 too_many_sessions"
    assert app.code("/limited", first) == "200"  # the oldest active session keeps its place
    assert [s.session_id for s in app.guard.sessions(alice)] == [f"{alice}-s{i}" for i in (1, 2, 3)]
    app.guard.revoke_session(f"{alice}-s1")  # once the oldest is gone, the next oldest is within the limit
    assert app.code("/limited", second) == "200"
    assert app.code("/limited", third) == "403 too_many_sessions"


@pytest.mark.parametrize("flavour", ["asgi", "wsgi"])
def test_evict_oldest_evicts_the_older_sessions_of_a_session_opened_elsewhere(
        make_app: Callable[..., App], tmp_path: Path, flavour: str) -> None:
    app = make_app(f"sqlite:///{tmp_path / 'sa.db'}", flavour)
    alice = fresh("alice")
    first, second = (app.idp.token(alice, sid=f"{alice}-s{i}") for i in (1, 2))
    assert app.code("/evicting", first) == "200"
    assert app.code("/other", second) == "200"  # two active sessions: one more than /evicting allows
    assert app.code("/evicting", second) == "200"  # the requesting session fits: the oldest other is evicted
    assert app.code("/other", first) == "401 session_revoked"
    assert {s.session_id: s.status for s in app.guard.sessions(alice)} == {
        f"{alice}-s1": "revoked", f"{alice}-s2": "active"}
    evicted = app.guard.audit(sub=alice, code="session_evicted")
    assert [r.session_id for r in evicted] == [f"{alice}-s1"]
    assert evicted[0].detail == f"evicted by session {alice}-s2 (max_sessions=1)"


# ------------------------------------------------------------------------------------------ issuers share a store


@pytest.fixture(params=["sqlite", "redis"])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    uri = redis_support.store_uri(request.param, tmp_path)
    yield uri
    if request.param != "sqlite":
        redis_support.forget_prefix(uri)


def test_two_issuers_sharing_a_store_keep_their_principals_apart(make_app: Callable[..., App],
                                                                  shared_store: str) -> None:
    app_a = make_app(shared_store, issuer="https://idp-a.example")
    app_b = make_app(shared_store, issuer="https://idp-b.example")
    alice = fresh("alice")
    token_a = app_a.idp.token(alice, sid=f"{alice}-a1")
    assert app_a.code("/other", token_a) == "200"
    token_b = app_b.idp.token(alice, sid=f"{alice}-b1", gen=1000)  # issuer B's alice, far ahead
    assert app_b.code("/other", token_b) == "200"
    assert app_a.code("/other", token_a) == "200"  # issuer A's alice is not stale
    assert app_a.code("/other", app_b.idp.token(alice, sid=f"{alice}-a1")) == "401 invalid_token"  # B's key at A
    # a session id of A's alice presented by B's alice: refused, and A's session is untouched
    assert app_b.code("/other", app_b.idp.token(alice, sid=f"{alice}-a1", gen=1000)) == "401 invalid_token"
    assert app_a.code("/other", token_a) == "200"
    # the limit counts A's sessions only
    assert app_a.code("/limited", token_a) == "200"
    # operations on A's alice (A's Guard trusts one issuer: no issuer= needed) leave B's alice alone
    assert app_a.guard.rotate(alice) == 1
    assert app_a.code("/other", token_a) == "401 stale_generation"
    assert app_b.code("/other", token_b) == "200"
    assert app_a.code("/other", app_a.idp.token(alice, sid=f"{alice}-a2", gen=1)) == "200"
    app_a.guard.report_compromise(alice)
    assert app_b.code("/other", token_b) == "200"
    assert [s.session_id for s in app_b.guard.sessions(alice)] == [f"{alice}-b1"]
    assert {s.status for s in app_a.guard.sessions(alice)} == {"compromised"}
    assert app_b.guard.rotate(alice) == 1001  # B's generation, ratcheted by its own token only
    assert app_b.code("/other", token_b) == "401 stale_generation"
    assert app_a.guard.store.issuers(alice) == ["https://idp-a.example", "https://idp-b.example"]
