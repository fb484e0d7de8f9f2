"""The apps served by the HTTP benchmark (``benchmarks/compare.py``): one Starlette app and one Flask app, each with
a plain route and a lock route, wrapped in one of five configurations chosen by environment variables.

- ``SA_BENCH_CONFIG``: ``bare`` (no authorisation), ``token`` (a middleware calling ``jwt.decode`` on every request:
  what an app does without session awareness), or ``sa`` (``SessionAwareMiddleware`` / ``SessionAwareWSGIMiddleware``
  on the store ``SA_BENCH_STORE``);
- ``SA_BENCH_KEYFILE``: the issuer's public key (PEM); ``SA_BENCH_ISSUER``, ``SA_BENCH_AUDIENCE``.

Routes: ``GET /plain`` (the default policy, ``Policy(max_sessions=5)``) and ``PUT /objects/{id}``
(``Policy(locks=["object:{id}"])``). Served by ``uvicorn servers:asgi_app`` and ``gunicorn servers:wsgi_app``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from sa_middleware import Guard, Policy

POLICIES = {"PUT /objects/{id}": Policy(locks=["object:{id}"])}
DEFAULT_POLICY = Policy(max_sessions=5)


def _settings() -> tuple[str, str, str, str]:
    with open(os.environ["SA_BENCH_KEYFILE"]) as handle:
        pem = handle.read()
    return os.environ.get("SA_BENCH_CONFIG", "bare"), pem, os.environ["SA_BENCH_ISSUER"], \
        os.environ["SA_BENCH_AUDIENCE"]


def guard(pem: str, issuer: str, audience: str) -> Guard:
    """The Guard every sa-middleware configuration uses."""
    return Guard(store=os.environ["SA_BENCH_STORE"], keys=pem, algorithms=["RS256"], issuer=issuer,
                 audience=audience, policies=POLICIES, default_policy=DEFAULT_POLICY)


class TokenDecoder:
    """Token-only authorisation as apps write it without session awareness: ``jwt.decode`` on every request, with
    the public key parsed once at start-up (passing the PEM string instead would parse it on every request)."""

    def __init__(self, pem: str, issuer: str, audience: str) -> None:
        self.key = load_pem_public_key(pem.encode())
        self.issuer, self.audience = issuer, audience

    def claims(self, header: str | None) -> dict[str, Any] | None:
        if not header or not header.startswith("Bearer "):
            return None
        try:
            return jwt.decode(header[7:], self.key, algorithms=["RS256"], issuer=self.issuer,  # type: ignore[arg-type]
                              audience=self.audience)
        except jwt.InvalidTokenError:
            return None


# -- ASGI --------------------------------------------------------------------------------------------------------

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


class TokenOnlyMiddleware:
    """A pure ASGI middleware that decodes the bearer token of every request (401 without a valid one)."""

    def __init__(self, app: ASGIApp, decoder: TokenDecoder) -> None:
        self.app, self.decoder = app, decoder

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
        claims = self.decoder.claims(header)
        if claims is None:
            await send({"type": "http.response.start", "status": 401, "headers": [(b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
            return
        scope["claims"] = claims
        await self.app(scope, receive, send)


def _starlette() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def plain(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def put_object(request: Request) -> PlainTextResponse:
        return PlainTextResponse("stored " + request.path_params["id"])

    return Starlette(routes=[Route("/plain", plain), Route("/objects/{id}", put_object, methods=["PUT"])])


def make_asgi() -> Any:
    config, pem, issuer, audience = _settings()
    app = _starlette()
    if config == "token":
        return TokenOnlyMiddleware(app, TokenDecoder(pem, issuer, audience))
    if config == "sa":
        from sa_middleware.asgi import SessionAwareMiddleware

        return SessionAwareMiddleware(app, guard=guard(pem, issuer, audience))
    return app


# -- WSGI --------------------------------------------------------------------------------------------------------

WSGIApp = Callable[[dict[str, Any], Any], Iterable[bytes]]


class TokenOnlyWSGIMiddleware:
    """A WSGI middleware that decodes the bearer token of every request (401 without a valid one)."""

    def __init__(self, app: WSGIApp, decoder: TokenDecoder) -> None:
        self.app, self.decoder = app, decoder

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        claims = self.decoder.claims(environ.get("HTTP_AUTHORIZATION"))
        if claims is None:
            start_response("401 Unauthorized", [("Content-Length", "0")])
            return [b""]
        environ["claims"] = claims
        return self.app(environ, start_response)


def make_wsgi() -> Any:
    from flask import Flask

    config, pem, issuer, audience = _settings()
    app = Flask("bench")

    @app.get("/plain")
    def plain() -> str:
        return "ok"

    @app.put("/objects/<id>")
    def put_object(id: str) -> str:
        return "stored " + id

    if config == "token":
        app.wsgi_app = TokenOnlyWSGIMiddleware(app.wsgi_app, TokenDecoder(pem, issuer, audience))  # type: ignore[method-assign]
    elif config == "sa":
        from sa_middleware.wsgi import SessionAwareWSGIMiddleware

        app.wsgi_app = SessionAwareWSGIMiddleware(app.wsgi_app, guard=guard(pem, issuer, audience))  # type: ignore[method-assign]
    return app


def __getattr__(name: str) -> Any:  # the app is built when the server imports it, not when this module is read
    if name == "asgi_app":
        return make_asgi()
    if name == "wsgi_app":
        return make_wsgi()
    raise AttributeError(name)
