"""The Starlette adapter on FastAPI apps (``sa_middleware.adapters.fastapi``), on real uvicorn servers.

The same checks as ``test_starlette.py`` (the denial table, the context, params, streams, the five behaviours) run
against a FastAPI app whose policies sit on the path operations (``@app.post(...)`` then ``@policy(...)``), some of
them behind included routers (FastAPI >= 0.137 keeps those as a tree; the adapter matches through it) and a mount.
The views read their context both from ``request.state.sa`` and from the ``SAContextDep`` dependency.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.applications import Starlette
from starlette.routing import Route
from support import WAIT, assert_fences, problem, sub

from sa_middleware import Guard
from sa_middleware.adapters import starlette as starlette_adapter
from sa_middleware.adapters.fastapi import SAContextDep, SessionAwareMiddleware, policy, sa_context
from sa_middleware.demo import DemoIssuer, serve_asgi

from .test_starlette import (
    BEHAVIOURS,
    DENIALS,
    Bench,
    Make,
    Site,
    check_context,
    check_denial,
    check_example,
    check_params,
    check_release_on_exception,
    check_stream,
    check_table_and_endpoint_combine,
    check_unrouted,
    lifespan,
    sites,
    ws_seen,
    ws_session,
)


def fastapi_app(bench: Bench, guard: Guard, how: str = "add_middleware") -> FastAPI:
    app = FastAPI()

    def route(method: str, path: str, **fields: Any) -> None:
        async def endpoint(request: Request, sa: SAContextDep) -> JSONResponse:
            await bench.park(request)
            return JSONResponse(await bench.seen(request, sa))
        app.add_api_route(path, policy(**fields)(endpoint) if fields else endpoint, methods=[method])

    route("GET", "/public", public=True)
    route("GET", "/whoami")
    route("POST", "/exclusive", exclusive=True)
    route("POST", "/tickets", tags={"tickets"}, raises_risk=1, risk_window=60)
    route("POST", "/once", one_time=True)
    route("POST", "/mfa", max_auth_age=300, acr_values=["urn:example:mfa"])
    route("POST", "/device", require_compliant_device=True)
    route("GET", "/solo", max_sessions=1)
    route("GET", "/slot", max_in_flight=1)
    route("GET", "/combo/{id:int}", max_in_flight=2)

    @app.post("/payments/{id:int}/approve")
    @policy(exclusive=True, max_risk=0, locks=["payment:{id}"], scopes={"payments:approve"})
    async def approve(id: int, request: Request, sa: SAContextDep) -> JSONResponse:
        await bench.park(request)
        return JSONResponse(await bench.seen(request, sa))

    @app.put("/objects/{id:int}")
    @policy(locks=["object:{id}"], on_lock_conflict="pause")
    async def update(id: int, request: Request, sa: SAContextDep) -> JSONResponse:
        await bench.park(request)
        return JSONResponse(await bench.seen(request, sa))

    @policy(locks=["above:{id}"])  # above the route decorator works too: FastAPI returns the function unchanged
    @app.get("/above/{id:int}")
    async def above(id: int, request: Request, sa: SAContextDep) -> JSONResponse:
        return JSONResponse(await bench.seen(request, sa))

    @app.get("/stream/{id:int}")
    @policy(exclusive=True, locks=["stream:{id}"])
    async def stream(id: int, request: Request) -> StreamingResponse:
        await bench.seen(request)

        async def chunks() -> AsyncIterator[bytes]:
            yield b"first"
            await bench.park(request)
            yield b"last"
        return StreamingResponse(chunks(), media_type="text/plain")

    @app.get("/boom/{id:int}")
    @policy(locks=["boom:{id}"])
    async def boom(id: int) -> None:
        raise RuntimeError("the view failed")

    @app.websocket("/ws/{room}")
    @policy(locks=["room:{room}"])
    async def ws(websocket: WebSocket, room: str, sa: SAContextDep) -> None:
        await websocket.accept()
        await websocket.send_json(await bench.seen(websocket, sa))
        await websocket.close()

    orgs = APIRouter(prefix="/orgs/{org}")

    @orgs.get("/docs/{doc:uuid}")
    @policy(locks=["doc:{org}:{doc}"])
    async def doc(org: str, doc: uuid.UUID, request: Request, sa: SAContextDep) -> JSONResponse:
        await bench.park(request)
        return JSONResponse(await bench.seen(request, sa))

    @orgs.websocket("/feed")
    @policy(locks=["feed:{org}"])
    async def feed(websocket: WebSocket, org: str, sa: SAContextDep) -> None:
        await websocket.accept()
        await websocket.send_json(await bench.seen(websocket, sa))
        await websocket.close()

    v1, inner = APIRouter(prefix="/v1"), APIRouter(prefix="/inner")

    @inner.get("/things/{n:int}")
    @policy(locks=["thing:{n}"])
    async def thing(n: int, request: Request, sa: SAContextDep) -> JSONResponse:
        return JSONResponse(await bench.seen(request, sa))

    v1.include_router(inner)
    app.include_router(orgs)
    app.include_router(v1)

    async def mounted(request: Request) -> JSONResponse:
        return JSONResponse(await bench.seen(request))

    app.mount("/sub", Starlette(routes=[Route("/things/{n:int}", policy(locks=["sub:{n}"])(mounted))]))
    app.add_middleware(SessionAwareMiddleware, guard=guard)
    return app


@pytest.fixture
def make_site(issuer: DemoIssuer, tmp_path: Path) -> Iterator[Make]:
    with sites(issuer, tmp_path, fastapi_app) as make:
        yield make


@pytest.fixture
def site(make_site: Make) -> Site:
    return make_site()


@pytest.mark.parametrize("code", list(DENIALS))
def test_every_denial_code(make_site: Make, code: str) -> None:
    check_denial(make_site, code)


def test_context_in_request_state_and_dependency(site: Site) -> None:
    check_context(site)


def test_path_params_fill_lock_keys(site: Site) -> None:
    check_params(site)  # includes a route of an included router with a parametrised prefix


def test_endpoint_policy_wins_over_the_table_and_combines_with_it(site: Site) -> None:
    check_table_and_endpoint_combine(site)


def test_unrouted_and_wrong_method_fail_closed(site: Site) -> None:
    check_unrouted(site)


def test_release_on_exception(site: Site) -> None:
    check_release_on_exception(site)


def test_streamed_response_holds_the_ticket_until_it_ends(site: Site) -> None:
    check_stream(site)


@pytest.mark.parametrize("behaviour", BEHAVIOURS, ids=lambda b: b.__name__.removeprefix("behaviour_"))
def test_five_behaviours(site: Site, behaviour: Callable[[Site], None]) -> None:
    behaviour(site)


def test_nested_included_routers_and_mounts(site: Site) -> None:
    token = site.token(sub())
    thing = site.ok("GET", "/v1/inner/things/0042", token)
    assert thing["route"] == "GET /v1/inner/things/{n:int}"
    assert_fences(thing["fencing_tokens"], {"thing:42"})
    assert thing["same"] is True
    problem(site.request("POST", "/v1/inner/things/1"), 401, "missing_token")  # 405 inside an included router
    assert site.request("POST", "/v1/inner/things/1", token, rid=uuid.uuid4().hex).status_code == 405
    mounted = site.ok("GET", "/sub/things/7", token)
    assert mounted["route"] == "GET /sub/things/{n:int}"
    assert_fences(mounted["fencing_tokens"], {"sub:7"})
    above = site.ok("GET", "/above/3", token)
    assert above["route"] == "GET /above/{id:int}"
    assert_fences(above["fencing_tokens"], {"above:3"})


def test_included_routers_without_iter_route_contexts(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    # FastAPI 0.137.0 and 0.137.1 had included routers but not yet the public iter_route_contexts
    monkeypatch.setattr(starlette_adapter, "_iter_route_contexts", starlette_adapter._effective_routes)
    check_params(site)
    thing = site.ok("GET", "/v1/inner/things/5", site.token(sub()))
    assert thing["route"] == "GET /v1/inner/things/{n:int}"
    assert_fences(thing["fencing_tokens"], {"thing:5"})
    feed = ws_seen(ws_session(site.asgi, "/orgs/acme/feed", site.token(sub())))
    assert feed["route"] == "WEBSOCKET /orgs/{org}/feed"
    assert_fences(feed["fencing_tokens"], {"feed:acme"})


def test_websockets_with_the_dependency(site: Site) -> None:
    who = sub()
    seen = ws_seen(ws_session(site.asgi, "/ws/lobby", site.token(who)))
    assert seen["same"] is True and seen["principal"] == who
    assert seen["route"] == "WEBSOCKET /ws/{room}"
    assert_fences(seen["fencing_tokens"], {"room:lobby"})
    feed = ws_seen(ws_session(site.asgi, "/orgs/acme/feed", site.token(who)))  # in an included router
    assert feed["route"] == "WEBSOCKET /orgs/{org}/feed"
    assert_fences(feed["fencing_tokens"], {"feed:acme"})
    assert site.guard.locks() == []
    for path in ("/ws/lobby", "/orgs/acme/feed"):
        assert ws_session(site.asgi, path) == [{"type": "websocket.close", "code": 1008, "reason": "missing_token"}]


def test_dependency_without_the_middleware_fails_closed(issuer: DemoIssuer) -> None:
    ran: list[str] = []
    app = FastAPI()  # the middleware was forgotten

    @app.get("/whoami")
    def whoami(sa: SAContextDep) -> dict[str, Any]:
        ran.append(str(sa.principal))
        return {"principal": sa.principal}

    base, stop = serve_asgi(app)
    try:
        resp = httpx.get(f"{base}/whoami", headers={"authorization": f"Bearer {issuer.token(sub())}"}, timeout=WAIT)
    finally:
        stop()
    assert resp.status_code == 500
    assert ran == []  # the endpoint never ran without its authorisation context
    assert sa_context.__name__ == "sa_context"


def test_lock_naming_a_missing_parameter_fails_the_start_up(guard: Guard) -> None:
    app = FastAPI()
    router = APIRouter(prefix="/orgs/{org}")

    @router.post("/pay/{pid:int}")
    @policy(locks=["payment:{id}"])
    def pay(org: str, pid: int) -> None: ...

    app.include_router(router)
    app.add_middleware(SessionAwareMiddleware, guard=guard)
    sent = lifespan(app)
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "/orgs/{org}/pay/{pid:int}" in sent[0]["message"] and "payment:{id}" in sent[0]["message"]

    good = FastAPI()
    good.include_router(router, prefix="/x/{id}")  # now the route has an {id}
    good.add_middleware(SessionAwareMiddleware, guard=guard, check_table=False)  # the fixture's table: another app
    assert [m["type"] for m in lifespan(good)] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def test_example_imports_and_serves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check_example("fastapi_app.py", tmp_path, monkeypatch)
