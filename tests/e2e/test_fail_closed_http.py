"""No path prefix, URL shape or configuration slip lets a request skip its policy, over real servers.

uvicorn (with ``root_path``, and Starlette ``Mount``) and werkzeug's threaded server (with a ``SCRIPT_NAME``
prefix). The apps route ``POST /payments/{id:int}/approve`` and ``PUT /files/{name:path}``; the Guard's table
(:data:`path_variants.TABLE`) needs a scope on both and locks the object. A view answers with its fencing tokens
and the lock keys held while it runs; ``?hold=NAME`` parks it at a gate until the test releases it.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from flask import Flask
from path_variants import SCOPES, TABLE
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from support import WAIT, Gates, problem, sub
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from sa_middleware import Guard, Policy
from sa_middleware.adapters import flask as sa_flask
from sa_middleware.adapters import starlette as sa_starlette
from sa_middleware.asgi import SessionAwareMiddleware
from sa_middleware.demo import DemoIssuer, serve_asgi, serve_wsgi
from sa_middleware.errors import ConfigurationError
from sa_middleware.wsgi import SessionAwareWSGIMiddleware

GATES = Gates()


@pytest.fixture
def guard(issuer: DemoIssuer, tmp_path: Path) -> Iterator[Guard]:
    g = Guard(store=f"sqlite:///{tmp_path / 'sa.db'}", keys=issuer.public_pem, algorithms=["RS256"],
              issuer=issuer.issuer, audience=issuer.audience, policies=TABLE, default_policy=Policy())
    yield g
    GATES.release_all()
    g.close()


async def _view(request: Request) -> JSONResponse:
    hold = request.query_params.get("hold")
    if hold:
        gate = GATES.gate(hold)
        gate.entered.set()
        await anyio.to_thread.run_sync(gate.released.wait, WAIT)
    ctx = request.scope["sa_middleware"]
    guard: Guard = request.app.state.guard
    return JSONResponse({"fencing_tokens": dict(ctx.fencing_tokens), "route": ctx.route,
                         "held": sorted(lock.key for lock in await guard.alocks())})


def starlette_api(guard: Guard, *middleware: Middleware) -> Starlette:
    app = Starlette(routes=[Route("/payments/{id:int}/approve", _view, methods=["POST"]),
                            Route("/files/{name:path}", _view, methods=["PUT"])], middleware=list(middleware))
    app.state.guard = guard
    return app


def flask_api(guard: Guard) -> Flask:
    app = Flask("fail_closed")

    @app.post("/payments/<int:id>/approve")
    def approve(id: int) -> dict[str, Any]:
        from flask import request
        ctx = request.environ["sa_middleware"]
        return {"fencing_tokens": dict(ctx.fencing_tokens), "held": sorted(lk.key for lk in guard.locks())}

    return app


@contextmanager
def served(serve: Callable[..., tuple[str, Callable[[], None]]], app: Any, **config: Any) -> Iterator[str]:
    base, stop = serve(app, **config)
    try:
        yield base
    finally:
        GATES.release_all()
        stop()


def approve(issuer: DemoIssuer, url: str) -> None:
    """Without the scope: 403 insufficient_scope; with it: admitted, holding payment:42 while the view runs."""
    who = sub()
    problem(httpx.post(url, headers=bearer(issuer.token(who, scope="other")), timeout=WAIT), 403,
            "insufficient_scope")
    ok = httpx.post(url, headers=bearer(issuer.token(who, scope=SCOPES)), timeout=WAIT)
    assert ok.status_code == 200, ok.text
    body = ok.json()
    assert list(body["fencing_tokens"]) == ["payment:42"] and body["held"] == ["payment:42"]


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# -- rows 1 and 2: the table is matched on the application-relative path --------------------------------------------

def test_row1_core_asgi_under_uvicorn_root_path(guard: Guard, issuer: DemoIssuer) -> None:
    app = SessionAwareMiddleware(starlette_api(guard), guard=guard)
    with served(serve_asgi, app, root_path="/api") as base:  # uvicorn puts /api in scope["path"]
        approve(issuer, f"{base}/payments/42/approve")


def test_row1_core_asgi_inside_a_starlette_mount(guard: Guard, issuer: DemoIssuer) -> None:
    outer = Starlette(routes=[Mount("/v1", app=SessionAwareMiddleware(starlette_api(guard), guard=guard))])
    with served(serve_asgi, outer) as base:
        approve(issuer, f"{base}/v1/payments/42/approve")


def test_row1_core_wsgi_under_a_script_name(guard: Guard, issuer: DemoIssuer) -> None:
    app = flask_api(guard)
    app.wsgi_app = SessionAwareWSGIMiddleware(app.wsgi_app, guard=guard)  # type: ignore[method-assign]
    with served(serve_wsgi, DispatcherMiddleware(Flask("root"), {"/v1": app})) as base:
        approve(issuer, f"{base}/v1/payments/42/approve")


def test_row2_starlette_adapter_table_only_under_root_path_and_mount(guard: Guard, issuer: DemoIssuer) -> None:
    api = starlette_api(guard, Middleware(sa_starlette.SessionAwareMiddleware, guard=guard))
    with served(serve_asgi, api, root_path="/api") as base:
        approve(issuer, f"{base}/payments/42/approve")
    mounted = Starlette(routes=[Mount("/v1", app=starlette_api(
        guard, Middleware(sa_starlette.SessionAwareMiddleware, guard=guard)))])
    with served(serve_asgi, mounted) as base:
        approve(issuer, f"{base}/v1/payments/42/approve")


def test_row2_flask_adapter_table_only_under_a_script_name(guard: Guard, issuer: DemoIssuer) -> None:
    app = flask_api(guard)
    sa_flask.SessionAware(app, guard=guard, check_table=False)  # the table's files route is not this app's
    with served(serve_wsgi, DispatcherMiddleware(Flask("root"), {"/v1": app})) as base:
        approve(issuer, f"{base}/v1/payments/42/approve")


# -- rows 3 and 10: path lock keys, one object one key; a cap on their length -----------------------------------

def test_row3_path_lock_template_one_object_one_key(guard: Guard, issuer: DemoIssuer) -> None:
    api = starlette_api(guard, Middleware(sa_starlette.SessionAwareMiddleware, guard=guard))
    token = issuer.token(sub(), scope=SCOPES)
    with served(serve_asgi, api) as base:
        name = uuid.uuid4().hex
        holder: dict[str, httpx.Response] = {}
        thread = threading.Thread(target=lambda: holder.update(r=httpx.put(
            f"{base}/files/a/b.txt?hold={name}", headers=bearer(token), timeout=WAIT)))
        thread.start()
        assert GATES.gate(name).entered.wait(WAIT)
        assert [lock.key for lock in guard.locks()] == ["file:a/b.txt"]
        other = bearer(issuer.token(sub(), scope=SCOPES))
        for path in ("/files/a//b.txt", "/files//a/b.txt", "/files/a/b.txt/"):  # the same object: locked
            problem(httpx.put(base + path, headers=other, timeout=WAIT), 423, "object_locked")
        for path in ("/files/a/%2e%2e/a/b.txt", "/files/a/%2E/b.txt"):  # dot segments: refused, not a new key
            problem(httpx.put(base + path, headers=other, timeout=WAIT), 400, "invalid_request")
        assert [lock.key for lock in guard.locks()] == ["file:a/b.txt"]
        GATES.gate(name).released.set()
        thread.join(WAIT)
        assert holder["r"].json()["fencing_tokens"].keys() == {"file:a/b.txt"}


def test_row10_lock_key_length_cap(guard: Guard, issuer: DemoIssuer) -> None:
    api = starlette_api(guard, Middleware(sa_starlette.SessionAwareMiddleware, guard=guard))
    token = issuer.token(sub(), scope=SCOPES)
    with served(serve_asgi, api) as base:
        at_cap = "x" * (512 - len("file:"))
        assert httpx.put(f"{base}/files/{at_cap}", headers=bearer(token), timeout=WAIT).status_code == 200
        body = problem(httpx.put(f"{base}/files/{at_cap}y", headers=bearer(token), timeout=WAIT), 400,
                       "invalid_request")
        assert "512" in body["detail"]
        problem(httpx.put(f"{base}/files/{'z' * 5000}", headers=bearer(token), timeout=WAIT), 400, "invalid_request")
    assert guard.locks() == []


# -- row 5: a decorated view never runs without the Guard's decision ------------------------------------------------

def test_row5_decorated_views_refuse_without_the_adapter(guard: Guard, issuer: DemoIssuer) -> None:
    ran: list[str] = []

    @sa_starlette.policy(scopes={"payments:approve"})
    async def endpoint(request: Request) -> JSONResponse:
        ran.append(request.url.path)
        return JSONResponse({"paid": True})

    from fastapi import FastAPI

    fast = FastAPI()

    @fast.post("/pay")
    @sa_starlette.policy(scopes={"payments:approve"})
    async def fast_pay() -> dict[str, bool]:
        ran.append("fastapi")
        return {"paid": True}

    flask_app = Flask("unguarded")

    @flask_app.post("/pay")
    @sa_flask.policy(scopes={"payments:approve"})
    def flask_pay() -> dict[str, bool]:
        ran.append("flask")
        return {"paid": True}

    bare = Starlette(routes=[Route("/pay", endpoint, methods=["POST"])])  # no middleware at all
    core_only = SessionAwareMiddleware(Starlette(routes=[Route("/pay", endpoint, methods=["POST"])]), guard=guard)
    token = issuer.token(sub(), scope=SCOPES)
    for serve, app in ((serve_asgi, bare), (serve_asgi, fast), (serve_wsgi, flask_app), (serve_asgi, core_only)):
        with served(serve, app) as base:
            resp = httpx.post(f"{base}/pay", headers=bearer(token), timeout=WAIT)
            assert resp.status_code == 503, resp.text
            assert resp.headers["content-type"] == "application/problem+json"
            assert json.loads(resp.content)["code"] == "view_not_guarded"
    assert ran == []
    adapter = Starlette(routes=[Route("/pay", endpoint, methods=["POST"])],
                        middleware=[Middleware(sa_starlette.SessionAwareMiddleware, guard=guard, check_table=False)])
    with served(serve_asgi, adapter) as base:  # with the adapter: decided, then run
        problem(httpx.post(f"{base}/pay", headers=bearer(issuer.token(sub())), timeout=WAIT), 403,
                "insufficient_scope")
        assert httpx.post(f"{base}/pay", headers=bearer(token), timeout=WAIT).json() == {"paid": True}
    assert ran == ["/pay"]


# -- row 6: a table entry that matches no route is a start-up error ------------------------------------------------

@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # uvicorn's sys.exit(3)
def test_row6_starlette_table_typo_stops_uvicorn(issuer: DemoIssuer, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    typo = Guard(store=f"sqlite:///{tmp_path / 'typo.db'}", keys=issuer.public_pem, algorithms=["RS256"],
                 issuer=issuer.issuer, audience=issuer.audience,
                 policies={"POST /payment/{id:int}/approve": Policy(scopes={"payments:approve"})})
    try:
        api = starlette_api(typo, Middleware(sa_starlette.SessionAwareMiddleware, guard=typo))
        with caplog.at_level(logging.ERROR, logger="sa_middleware"), pytest.raises(RuntimeError, match="start"):
            serve_asgi(api, lifespan="on")
        assert "route 'POST /payment/{id:int}/approve'" in caplog.text
        assert "did you mean '/payments/{id:int}/approve'?" in caplog.text
    finally:
        typo.close()


def test_row6_flask_table_typo_fails_the_first_request(issuer: DemoIssuer) -> None:
    typo = Guard(store="memory://", keys=issuer.public_pem, algorithms=["RS256"], issuer=issuer.issuer,
                 audience=issuer.audience, policies={"POST /payment/{id:int}/approve": Policy()})
    try:
        app = flask_api(typo)
        sa_flask.SessionAware(app, guard=typo)
        with pytest.raises(ConfigurationError, match=r"did you mean '/payments/<int:id>/approve'\?"):
            app.test_client().post("/payments/1/approve")
    finally:
        typo.close()
    with pytest.raises(ConfigurationError, match=r"'<int:id>': write '\{id:int\}'"):
        Guard(store="memory://", keys=issuer.public_pem, algorithms=["RS256"],
              policies={"POST /payments/<int:id>/approve": Policy()})
