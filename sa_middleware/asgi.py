"""Pure ASGI middleware (contract): ``app = SessionAwareMiddleware(app, guard=guard)``.

HTTP and websocket scopes are decided by the Guard; a refused websocket is closed with code 1008 before it is
accepted. The ticket is released after the app returns (after the last body chunk, on client disconnect, or on an
exception), shielded from cancellation. The view finds its :class:`~sa_middleware.context.SAContext` in
``scope["sa_middleware"]``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from .context import RequestInfo, admitted
from .denials import Denial
from .guard import Admitted, Guard
from .policy import RouteMatch
from .responses import denial_response

__all__ = ["SessionAwareMiddleware", "app_path"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def app_path(scope: Scope) -> str:
    """The path relative to the application: ``scope["path"]`` minus ``scope["root_path"]``.

    Servers that put the root path in ``path`` (uvicorn ``--root-path``, Starlette's ``Mount``) and servers that do
    not are both handled, the way Starlette's router does: the root path is removed only when ``path`` starts with
    it at a segment boundary. The empty remainder is ``"/"``.
    """
    path = str(scope.get("path") or "/")
    root = str(scope.get("root_path") or "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        path = path[len(root):]
    return path or "/"


def request_info(scope: Scope) -> RequestInfo:
    """A RequestInfo from an ASGI scope (header values decoded as latin-1, repeated headers joined)."""
    raw = scope.get("headers", ())
    headers = {name.lower().decode("latin-1"): value.decode("latin-1") for name, value in raw}
    if len(headers) != len(raw):  # a repeated header: its values joined, in order
        headers = {}
        for raw_name, raw_value in raw:
            name = raw_name.lower().decode("latin-1")
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
    client = scope.get("client")
    websocket = scope["type"] == "websocket"
    # positional (method, path, headers, client, websocket, scheme, host, client_cert, session, app_path): keyword
    # arguments cost more, and this runs on every request
    return RequestInfo(scope.get("method", "GET"), scope.get("path", "/"), headers,
                       str(client[0]) if client else "", websocket,
                       str(scope.get("scheme") or ("ws" if websocket else "http")),
                       headers.get("host") or _server(scope), _client_cert(scope),
                       None, app_path(scope))


def _server(scope: Scope) -> str:
    server = scope.get("server")
    if not server or not isinstance(server, list | tuple) or server[0] is None:
        return ""
    host = str(server[0])
    host = f"[{host}]" if ":" in host else host
    return host if len(server) < 2 or server[1] is None else f"{host}:{server[1]}"


def _client_cert(scope: Scope) -> str | None:
    """The client certificate (PEM) of the ASGI ``tls`` extension, when the server reports one."""
    tls = (scope.get("extensions") or {}).get("tls")
    chain = tls.get("client_cert_chain") if isinstance(tls, dict) else None
    if isinstance(chain, list | tuple) and chain and isinstance(chain[0], str) and chain[0]:
        return chain[0]
    return None


async def send_denial(scope: Scope, receive: Receive, send: Send, denial: Denial, guard: Guard) -> None:
    """Answer a refused request: a problem+json response, or a websocket close with 1008."""
    if scope["type"] == "websocket":
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.close", "code": 1008, "reason": denial.code})
        return
    status, headers, body = denial_response(denial, guard.realm, guard.retry_after)
    await send({"type": "http.response.start", "status": status,
                "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]})
    await send({"type": "http.response.body", "body": body})


async def run_admitted(app: ASGIApp, scope: Scope, receive: Receive, send: Send, outcome: Admitted,
                       guard: Guard, view_policies: bool = False) -> None:
    """Run the app with the context in the scope, and release the ticket on every exit path. ``view_policies``:
    the match applied the views' ``@policy`` (adapters), so decorated views may run."""
    scope["sa_middleware"] = outcome.context
    try:
        with admitted(view_policies):
            await app(scope, receive, send)
    finally:
        await guard.arelease(outcome.ticket)


class SessionAwareMiddleware:
    """Session-aware authorisation for any ASGI app, decided by the Guard's table (``policies``) alone.

    Views decorated with an adapter's ``@policy`` refuse to run under it (their policy would not be applied): use
    the framework's adapter for them.
    """

    #: whether ``match`` applies the views' ``@policy`` when it finds the view (the adapters' subclasses do)
    view_policies = False

    def __init__(self, app: ASGIApp, *, guard: Guard) -> None:
        if not isinstance(guard, Guard):
            raise TypeError("SessionAwareMiddleware needs guard=Guard(...)")
        self.app = app
        self.guard = guard

    def match(self, scope: Scope, request: RequestInfo) -> RouteMatch | None:
        """The route match; ``None`` lets the Guard use its own route table (adapters override this)."""
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request = request_info(scope)
        match = self.match(scope, request)
        outcome = await self.guard.aadmit(request, match)
        if isinstance(outcome, Denial):
            await send_denial(scope, receive, send, outcome, self.guard)
        else:  # decorated views may run only if their policy was read: by an adapter that found the view
            views = self.view_policies and match is not None
            await run_admitted(self.app, scope, receive, send, outcome, self.guard, views)
