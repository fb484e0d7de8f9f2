"""Property tests (hypothesis) of the core middleware: variants of a protected path never skip its policy.

The core ASGI middleware guards a Starlette router, the core WSGI middleware a werkzeug-routed app, both with the
Guard table of :mod:`path_variants` and under a root path / ``SCRIPT_NAME`` or none; each app honours
method-override headers. See :mod:`path_variants` for the variants and the property.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import anyio
import pytest
from hypothesis import given
from path_variants import (
    PROPERTY,
    SCOPES,
    TABLE,
    Ran,
    Variant,
    asgi_scope,
    call_asgi,
    call_wsgi,
    check,
    override_asgi,
    override_wsgi,
    variants,
    wsgi_environ,
)
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, Router
from werkzeug.exceptions import HTTPException
from werkzeug.routing import Map, Rule

from sa_middleware import Guard, Policy
from sa_middleware.asgi import SessionAwareMiddleware
from sa_middleware.demo import DemoIssuer
from sa_middleware.wsgi import SessionAwareWSGIMiddleware


@pytest.fixture(scope="module")
def guard(issuer: DemoIssuer) -> Iterator[Guard]:
    g = Guard(store="memory://", keys=issuer.public_pem, algorithms=["RS256"], issuer=issuer.issuer,
              audience=issuer.audience, policies=TABLE, default_policy=Policy())
    yield g
    g.close()


def asgi_app(guard: Guard, ran: list[Ran]) -> Any:
    async def view(request: Request) -> PlainTextResponse:
        name = "payments" if "id" in request.path_params else "files"
        ctx = request.scope["sa_middleware"]
        ran.append(Ran(name, dict(request.path_params), dict(ctx.fencing_tokens)))
        return PlainTextResponse("ok")

    router = Router(routes=[Route("/payments/{id:int}/approve", view, methods=["POST"]),
                            Route("/files/{name:path}", view, methods=["PUT"])])
    return SessionAwareMiddleware(override_asgi(router), guard=guard)


def wsgi_app(guard: Guard, ran: list[Ran]) -> Any:
    urls = Map([Rule("/payments/<int:id>/approve", endpoint="payments", methods=["POST"]),
                Rule("/files/<path:name>", endpoint="files", methods=["PUT"])])

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        try:
            view, params = urls.bind_to_environ(environ).match()
        except HTTPException as exc:
            return exc(environ, start_response)
        ran.append(Ran(view, dict(params), dict(environ["sa_middleware"].fencing_tokens)))
        start_response("200 OK", [("content-type", "text/plain")])
        return [b"ok"]

    return SessionAwareWSGIMiddleware(override_wsgi(app), guard=guard)


@PROPERTY
@given(variant=variants(roots=("", "/api")))
def test_core_asgi_variants_never_skip_the_policy(guard: Guard, issuer: DemoIssuer, variant: Variant) -> None:
    for scoped in (False, True):
        ran: list[Ran] = []
        token = issuer.token("variant-asgi", scope=SCOPES if scoped else "other")
        status = anyio.run(call_asgi, asgi_app(guard, ran), asgi_scope(variant, token))
        check(variant, scoped, status, ran)
    assert guard.locks() == []


@PROPERTY
@given(variant=variants(roots=("", "/api")))
def test_core_wsgi_variants_never_skip_the_policy(guard: Guard, issuer: DemoIssuer, variant: Variant) -> None:
    for scoped in (False, True):
        ran: list[Ran] = []
        token = issuer.token("variant-wsgi", scope=SCOPES if scoped else "other")
        status = call_wsgi(wsgi_app(guard, ran), wsgi_environ(variant, token))
        check(variant, scoped, status, ran)
    assert guard.locks() == []


def test_the_canonical_requests_run_their_views_with_their_locks(guard: Guard, issuer: DemoIssuer) -> None:
    """The property is not vacuous: the canonical requests (and a root path) reach the views, locked."""
    token = issuer.token("variant-canonical", scope=SCOPES)
    for variant, key in ((Variant("POST", "/payments/42/approve", root="/api"), "payment:42"),
                         (Variant("PUT", "/files/a/b.txt"), "file:a/b.txt"),
                         (Variant("PUT", "/files/a//b.txt/"), "file:a/b.txt")):
        ran: list[Ran] = []
        assert anyio.run(call_asgi, asgi_app(guard, ran), asgi_scope(variant, token)) == 200
        assert list(ran[0].fences) == [key]
        ran.clear()
        assert call_wsgi(wsgi_app(guard, ran), wsgi_environ(variant, token)) in (200, 308)  # werkzeug merges //
        assert not ran or list(ran[0].fences) == [key]
