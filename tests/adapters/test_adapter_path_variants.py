"""Property tests (hypothesis) of the adapters: variants of a protected path never skip its policy.

Starlette (the Guard table alone, under a root path or none), Flask (``@policy`` on the views, under a
``SCRIPT_NAME`` or none) and Django under WSGI and ASGI (``@policy`` on the views, under a script prefix or none);
each app honours method-override headers. See :mod:`path_variants` for the variants and the property.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import anyio
import pytest
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.wsgi import WSGIHandler
from django.http import HttpRequest, HttpResponse
from django.test import override_settings
from django.urls import path as django_path
from flask import Flask, g
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
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from sa_middleware import Guard
from sa_middleware.adapters import django as sa_django
from sa_middleware.adapters import flask as sa_flask
from sa_middleware.adapters import starlette as sa_starlette
from sa_middleware.demo import DemoIssuer

from . import django_app

django_app.configure()

RAN: list[Ran] = []  # what the views of this module saw, cleared before each request


def make_guard(issuer: DemoIssuer, **options: Any) -> Guard:
    return Guard(store="memory://", keys=issuer.public_pem, algorithms=["RS256"], issuer=issuer.issuer,
                 audience=issuer.audience, **options)


def run_both(issuer: DemoIssuer, variant: Variant, call: Callable[[str], int], guard: Guard) -> None:
    for scoped in (False, True):
        RAN.clear()
        status = call(issuer.token("variant-adapter", scope=SCOPES if scoped else "other"))
        check(variant, scoped, status, list(RAN))
    assert guard.locks() == []


# -- Starlette: the Guard table alone ------------------------------------------------------------------------------

class Override:
    """A pure ASGI middleware honouring method-override headers (inside the session-aware one)."""

    def __init__(self, app: Any) -> None:
        self.app = override_asgi(app)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


async def starlette_view(request: Request) -> PlainTextResponse:
    name = "payments" if "id" in request.path_params else "files"
    RAN.append(Ran(name, dict(request.path_params), dict(request.state.sa.fencing_tokens)))
    return PlainTextResponse("ok")


@pytest.fixture(scope="module")
def starlette_app(issuer: DemoIssuer) -> Iterator[tuple[Starlette, Guard]]:
    guard = make_guard(issuer, policies=TABLE)
    app = Starlette(routes=[Route("/payments/{id:int}/approve", starlette_view, methods=["POST"]),
                            Route("/files/{name:path}", starlette_view, methods=["PUT"])],
                    middleware=[Middleware(sa_starlette.SessionAwareMiddleware, guard=guard), Middleware(Override)])
    yield app, guard
    guard.close()


@PROPERTY
@given(variant=variants(roots=("", "/api")))
def test_starlette_variants_never_skip_the_policy(starlette_app: tuple[Starlette, Guard], issuer: DemoIssuer,
                                                  variant: Variant) -> None:
    app, guard = starlette_app
    run_both(issuer, variant, lambda token: anyio.run(call_asgi, app, asgi_scope(variant, token)), guard)


# -- Flask: @policy on the views -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def flask_app(issuer: DemoIssuer) -> Iterator[tuple[Flask, Guard]]:
    app = Flask("variants")
    guard = make_guard(issuer)

    @app.post("/payments/<int:id>/approve")
    @sa_flask.policy(scopes={"payments:approve"}, locks=["payment:{id}"])
    def approve(id: int) -> str:
        RAN.append(Ran("payments", {"id": id}, dict(g.sa.fencing_tokens)))
        return "ok"

    @app.put("/files/<path:name>")
    @sa_flask.policy(scopes={"files:write"}, locks=["file:{name}"])
    def put_file(name: str) -> str:
        RAN.append(Ran("files", {"name": name}, dict(g.sa.fencing_tokens)))
        return "ok"

    app.wsgi_app = override_wsgi(app.wsgi_app)  # type: ignore[method-assign]
    sa_flask.SessionAware(app, guard=guard)
    yield app, guard
    guard.close()


@PROPERTY
@given(variant=variants(roots=("", "/api")))
def test_flask_variants_never_skip_the_policy(flask_app: tuple[Flask, Guard], issuer: DemoIssuer,
                                              variant: Variant) -> None:
    app, guard = flask_app
    run_both(issuer, variant, lambda token: call_wsgi(app, wsgi_environ(variant, token)), guard)


# -- Django, WSGI and ASGI: @policy on the views ---------------------------------------------------------------

@sa_django.policy(scopes={"payments:approve"}, locks=["payment:{id}"])
def django_approve(request: HttpRequest, id: int) -> HttpResponse:
    if request.method != "POST":
        return HttpResponse(status=405)
    RAN.append(Ran("payments", {"id": id}, dict(request.sa.fencing_tokens)))  # type: ignore[attr-defined]
    return HttpResponse("ok")


@sa_django.policy(scopes={"files:write"}, locks=["file:{name}"])
def django_put_file(request: HttpRequest, name: str) -> HttpResponse:
    if request.method != "PUT":
        return HttpResponse(status=405)
    RAN.append(Ran("files", {"name": name}, dict(request.sa.fencing_tokens)))  # type: ignore[attr-defined]
    return HttpResponse("ok")


urlpatterns = [django_path("payments/<int:id>/approve", django_approve),
               django_path("files/<path:name>", django_put_file)]


class DjangoOverride:
    """Honours method-override headers (after the session-aware middleware, before the views)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        for name in ("HTTP_X_HTTP_METHOD_OVERRIDE", "HTTP_X_HTTP_METHOD", "HTTP_X_METHOD_OVERRIDE"):
            if request.META.get(name):
                request.method = request.META[name].upper()
        return self.get_response(request)


@pytest.fixture(scope="module")
def django_project(issuer: DemoIssuer) -> Iterator[None]:
    conf = {"store": "memory://", "keys": issuer.public_pem, "algorithms": ["RS256"], "issuer": issuer.issuer,
            "audience": issuer.audience}
    with override_settings(ROOT_URLCONF=__name__, ALLOWED_HOSTS=["testserver"], SA_MIDDLEWARE=conf,
                           MIDDLEWARE=[sa_django.MIDDLEWARE_PATH, f"{__name__}.DjangoOverride"]):
        yield


@PROPERTY
@given(variant=variants(roots=("", "/api")))
def test_django_wsgi_variants_never_skip_the_policy(django_project: None, issuer: DemoIssuer,
                                                    variant: Variant) -> None:
    handler = WSGIHandler()
    run_both(issuer, variant, lambda token: call_wsgi(handler, wsgi_environ(variant, token)), sa_django.get_guard())


@PROPERTY
@given(variant=variants(roots=("", "/api")))
def test_django_asgi_variants_never_skip_the_policy(django_project: None, issuer: DemoIssuer,
                                                    variant: Variant) -> None:
    handler = ASGIHandler()
    run_both(issuer, variant, lambda token: anyio.run(call_asgi, handler, asgi_scope(variant, token)),
             sa_django.get_guard())


def test_the_canonical_requests_run_their_views_with_their_locks(
        starlette_app: tuple[Starlette, Guard], flask_app: tuple[Flask, Guard], django_project: None,
        issuer: DemoIssuer) -> None:
    """The property is not vacuous: every entry point runs the canonical requests, under a root path too."""
    token = issuer.token("variant-canonical", scope=SCOPES)
    calls: dict[str, Callable[[Variant], int]] = {
        "starlette": lambda v: anyio.run(call_asgi, starlette_app[0], asgi_scope(v, token)),
        "flask": lambda v: call_wsgi(flask_app[0], wsgi_environ(v, token)),
        "django-wsgi": lambda v: call_wsgi(WSGIHandler(), wsgi_environ(v, token)),
        "django-asgi": lambda v: anyio.run(call_asgi, ASGIHandler(), asgi_scope(v, token)),
    }
    for name, call in calls.items():
        for variant, key in ((Variant("POST", "/payments/42/approve", root="/api"), "payment:42"),
                             (Variant("PUT", "/files/a/b.txt"), "file:a/b.txt")):
            RAN.clear()
            assert call(variant) == 200, name
            assert [list(r.fences) for r in RAN] == [[key]], name
