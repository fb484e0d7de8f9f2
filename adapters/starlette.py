"""Starlette and FastAPI adapter: policies matched with the app's own router.

::

    from sa_middleware.adapters.starlette import SessionAwareMiddleware, policy

    app = Starlette(routes=[...], middleware=[Middleware(SessionAwareMiddleware, guard=guard)])
    # or: app.add_middleware(SessionAwareMiddleware, guard=guard)        (FastAPI too)

The middleware is the core :class:`sa_middleware.asgi.SessionAwareMiddleware` (same denials, same release on every
exit path, websockets refused with 1008) whose ``match`` asks the app's router which route the request is for:
``Route``, ``WebSocketRoute``, ``Mount`` (recursively, the mount's template joined in front and its path parameters
collected), ``Host``, FastAPI's ``APIRoute`` and included routers. The route is named ``"METHOD template"``
(``"POST /payments/{id:int}/approve"``; ``WEBSOCKET`` for websocket routes), its converted path parameters fill the
lock keys, and the endpoint's ``@policy`` (for ``HTTPEndpoint`` / ``WebSocketEndpoint`` classes: the class's, with
the handler method's winning) is combined with the Guard's table: endpoint fields win over the table entry for the
request, which wins over ``default_policy``. A wrong method (405) gets the table/default policy only; a request no
route matches (404) is decided by the Guard's table alone, so it still needs a token.

The view reads its :class:`~sa_middleware.SAContext` as ``request.state.sa`` (``websocket.state.sa``) or
``scope["sa_middleware"]``; FastAPI endpoints may depend on :func:`sa_context`. Lock templates of endpoint policies
are checked against their routes' parameters at lifespan start-up (a mistake fails the start-up).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from starlette.endpoints import HTTPEndpoint, WebSocketEndpoint
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.routing import Match
from starlette.websockets import WebSocket

from sa_middleware.asgi import ASGIApp, Receive, Scope, Send, app_path
from sa_middleware.asgi import SessionAwareMiddleware as _ASGIMiddleware
from sa_middleware.context import VIEW_POLICIES_READ, RequestInfo, SAContext
from sa_middleware.errors import ConfigurationError
from sa_middleware.guard import Guard
from sa_middleware.policy import Policy, RouteMatch

from ._common import check_table, policy, policy_of, register_refusal, view_name, view_refusal

__all__ = ["SessionAwareMiddleware", "policy", "sa_context"]

log = logging.getLogger("sa_middleware")

_CACHE_SIZE = 4096
# handler names looked at when endpoint policies are checked at start-up (a class's "on_connect" is a websocket's)
_HANDLERS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "on_connect")


@dataclass(frozen=True, slots=True)
class _Found:
    """The route the router would pick: its full template, endpoint, path parameters, and FULL or PARTIAL."""

    template: str
    endpoint: object
    params: dict[str, Any]
    full: bool


def _effective_routes(routes: list[Any]) -> Iterator[Any]:
    """FastAPI 0.137.0 and 0.137.1 have included routers but not yet ``iter_route_contexts``."""
    for route in routes:
        for context in route.effective_route_contexts():
            yield getattr(context, "starlette_route", None) or context


_iter_route_contexts: Callable[[list[Any]], Iterator[Any]] | None = None


def _expand(routes: Iterable[Any]) -> Iterator[Any]:
    """The routes in dispatch order, FastAPI's included routers (FastAPI >= 0.137) flattened into the route
    contexts of its public ``iter_route_contexts``: each has the prefixed ``path`` and its own ``matches``."""
    global _iter_route_contexts
    for route in routes:
        if hasattr(route, "effective_route_contexts"):
            if _iter_route_contexts is None:
                try:  # only ever reached inside a FastAPI app
                    from fastapi.routing import iter_route_contexts
                except ImportError:
                    _iter_route_contexts = _effective_routes
                else:
                    _iter_route_contexts = iter_route_contexts
            yield from _iter_route_contexts([route])
        else:
            yield route


def _find(routes: Iterable[Any], scope: Scope, prefix: str) -> _Found | None:
    """The route Starlette's router dispatches this scope to: the first FULL match (mounts and hosts descended
    into), else the first PARTIAL one (a wrong method), else ``None``."""
    partial: _Found | None = None
    for route in _expand(routes):
        match, child = route.matches(scope)
        if match is Match.NONE:
            continue
        path = getattr(route, "path", None) or ""  # a Host has none
        params = dict(child.get("path_params", {}))
        if match is Match.PARTIAL:
            if partial is None:
                partial = _Found(prefix + path, child.get("endpoint"), params, False)
            continue
        if not hasattr(route, "routes"):  # Route, WebSocketRoute, APIRoute
            return _Found(prefix + path, child.get("endpoint"), params, True)
        inner = {**scope, **child}
        children = route.routes
        if children:  # a Mount or Host of a router or app: the router inside decides (its 404 is ours too)
            return _find(children, inner, prefix + path)
        # a mounted app without routes (static files, a sub-application): the mount is the route
        return _Found(f"{prefix}{path}/{{path:path}}", child.get("endpoint"),
                      {**params, "path": app_path(inner).lstrip("/")}, True)
    return partial


def _refusal(view: object, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> object:
    """A decorated endpoint called without an adapter's decision: a 503 problem+json response (or, for a
    websocket, a close with 1011 before the handshake is accepted)."""
    status, headers, body = view_refusal(view, VIEW_POLICIES_READ.get())
    response = Response(body, status_code=status, headers={k: v for k, v in headers if k != "content-length"})
    for arg in (*args, *kwargs.values()):
        if isinstance(arg, HTTPEndpoint | WebSocketEndpoint):  # a class endpoint's dispatch(self)
            if arg.scope["type"] == "websocket":
                return arg.send({"type": "websocket.close", "code": 1011})
            return response(arg.scope, arg.receive, arg.send)
        if isinstance(arg, WebSocket):
            return arg.close(1011)
    return response  # a function endpoint (Starlette), or a FastAPI endpoint: a returned Response is sent as is


register_refusal(_refusal, fallback=True)


def _routed(routes: Iterable[Any], path: str) -> bool:
    """Whether the router has a route for ``path`` (HTTP with any method, or websocket)."""
    for kind in ("http", "websocket"):
        scope: Scope = {"type": kind, "path": path, "root_path": "", "method": "GET", "headers": [],
                        "query_string": b""}
        try:
            if _find(routes, scope, "") is not None:
                return True
        except Exception:  # a convertor refusing the sample: not this route
            continue
    return False


def sa_context(connection: HTTPConnection) -> SAContext:
    """The :class:`~sa_middleware.SAContext` of this request or websocket (a FastAPI dependency, or a helper).

    ``SessionAwareMiddleware`` admits every request before the endpoint runs, so a missing context is a
    programming error (the middleware is not installed on this app): it raises ``RuntimeError`` (a 500), and the
    endpoint never runs without its authorisation.
    """
    context = connection.scope.get("sa_middleware")
    if not isinstance(context, SAContext):
        raise RuntimeError("no sa-middleware context on this request: add "
                           "sa_middleware.adapters.starlette.SessionAwareMiddleware to the app")
    return context


class SessionAwareMiddleware(_ASGIMiddleware):
    """Session-aware authorisation for a Starlette or FastAPI app, matched with the app's own router.

    ``app.add_middleware(SessionAwareMiddleware, guard=guard)`` or ``Middleware(SessionAwareMiddleware,
    guard=guard)``; wrapping the app from outside (``SessionAwareMiddleware(app, guard=guard)``) works too.
    At lifespan start-up, an entry of the Guard's table that matches no route of the app is an error (a typo
    would silently leave its route under ``default_policy``); ``check_table=False`` turns that off, for paths
    that something other than the router answers.
    """

    view_policies = True

    def __init__(self, app: ASGIApp, *, guard: Guard, check_table: bool = True) -> None:
        super().__init__(app, guard=guard)
        self.check_table = check_table
        self._inner = app
        self.app = self._with_state
        self._cache: dict[tuple[str, str, bool, int], tuple[object, str, Policy | None]] = {}

    async def _with_state(self, scope: Scope, receive: Receive, send: Send) -> None:
        context = scope.get("sa_middleware")
        if context is not None:  # request.state reads scope["state"] (a per-request copy of the lifespan state)
            scope.setdefault("state", {})["sa"] = context
        await self._inner(scope, receive, send)

    def _routes(self, scope: Scope) -> Iterable[Any] | None:
        """The routes to match: the wrapped app's (wrapped from outside, or on a Mount), else those of the
        Starlette app whose middleware stack this is (``scope["app"]``, set before the stack runs)."""
        routes = getattr(self._inner, "routes", None)
        if routes is None:
            routes = getattr(scope.get("app"), "routes", None)
        return routes

    def match(self, scope: Scope, request: RequestInfo) -> RouteMatch | None:
        routes = self._routes(scope)
        if routes is None:
            return None
        probe = dict(scope)  # FastAPI's routes keep notes in scope["fastapi"]: let them write on a copy
        if isinstance(probe.get("fastapi"), dict):
            probe["fastapi"] = dict(probe["fastapi"])
        try:
            found = _find(routes, probe, "")
        except Exception:  # a convertor refusing a path (an int of 4300+ digits): no route, the Guard table decides
            return None
        if found is None:
            return None
        method = "WEBSOCKET" if request.websocket else request.method
        name, endpoint_policy = self._lookup(found, method)
        return self.guard.routes.resolve(endpoint_policy, name, found.params, method=method,
                                         path=request.route_path)

    def _lookup(self, found: _Found, method: str) -> tuple[str, Policy | None]:
        """The route's name and its endpoint's policy for this method, cached per route (not per path)."""
        key = (found.template, method, found.full, id(found.endpoint))
        hit = self._cache.get(key)
        if hit is not None and hit[0] is found.endpoint:
            return hit[1], hit[2]
        name = f"{method} {found.template}"
        endpoint_policy = None
        if found.full:  # a wrong method (405) gets the Guard's table / default policy only
            endpoint_policy = policy_of(found.endpoint, "on_connect" if method == "WEBSOCKET" else method)
        if len(self._cache) < _CACHE_SIZE:
            self._cache[key] = (found.endpoint, name, endpoint_policy)  # holds the endpoint: its id stays unique
        return name, endpoint_policy

    # -- start-up --------------------------------------------------------------------------------------------

    def _check_routes(self, routes: Iterable[Any]) -> None:
        """Raise :class:`ConfigurationError` if an endpoint policy is invalid or names a lock parameter its route
        does not have, or (``check_table``) if an entry of the Guard's table matches no route of the app (runs at
        lifespan start-up, so the server refuses to start)."""
        routes = list(routes)
        self._check(routes, "", frozenset())
        if self.check_table:
            check_table(self.guard.routes, self._templates(routes, ""), lambda path: _routed(routes, path))

    def _templates(self, routes: Iterable[Any], prefix: str) -> Iterator[str]:
        for route in _expand(routes):
            path = getattr(route, "path", None) or ""
            if hasattr(route, "routes"):
                children = route.routes
                if children:
                    yield from self._templates(children, prefix + path)
                    continue
                yield f"{prefix}{path}/{{path:path}}"
            else:
                yield prefix + path

    def _check(self, routes: Iterable[Any], prefix: str, names: frozenset[str]) -> None:
        for route in _expand(routes):
            path = getattr(route, "path", None) or ""
            here = names | frozenset(getattr(route, "param_convertors", None) or ())
            if hasattr(route, "routes"):
                children = route.routes
                if children:
                    self._check(children, prefix + path, here - {"path"})
                    continue
                endpoint, template = getattr(route, "app", None), f"{prefix}{path}/{{path:path}}"
            else:
                endpoint, template = getattr(route, "endpoint", None), prefix + path
            seen: list[Policy] = []
            for handler in _HANDLERS:
                found = policy_of(endpoint, handler)
                if found is None or any(found is p for p in seen):
                    continue
                seen.append(found)
                try:
                    self.guard.routes.resolve(found, template, {name: "0" for name in here})
                except ConfigurationError as exc:
                    locks = ", ".join(repr(lock) for lock in found.locks or ())
                    raise ConfigurationError(f"view {view_name(endpoint)}: {exc} (locks: {locks})") from None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            routes = self._routes(scope)
            try:
                if routes is not None:
                    self._check_routes(routes)
            except ConfigurationError as exc:
                log.error("sa-middleware: %s", exc)
                await receive()  # lifespan.startup
                await send({"type": "lifespan.startup.failed", "message": f"sa-middleware: {exc}"})
                return
        await super().__call__(scope, receive, send)
