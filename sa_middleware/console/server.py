"""The console as an ASGI app and as a WSGI app (the request handling itself is :class:`~.app.Console`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import anyio.to_thread

from .app import _MAX_BODY, Console, Request, Response

__all__ = ["asgi_app", "wsgi_app"]

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Awaitable[None]]
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def asgi_app(console: Console) -> ASGIApp:
    """``console`` as an ASGI app (store calls run in a worker thread, never on the event loop)."""

    async def app(scope: Scope, receive: Callable[[], Awaitable[Any]], send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False) and len(body) <= _MAX_BODY
        headers: dict[str, str] = {}
        for name, value in scope.get("headers", ()):
            key = name.decode("latin-1").lower()
            headers[key] = f"{headers[key]}, {value.decode('latin-1')}" if key in headers else value.decode("latin-1")
        root = scope.get("root_path", "")
        path = scope.get("path", "/")
        path = path[len(root):] if root and path.startswith(root) else path
        client = scope.get("client")
        request = Request(scope.get("method", "GET"), path, scope.get("query_string", b"").decode("latin-1"), headers,
                          body, str(client[0]) if client else "", str(scope.get("scheme", "http")))
        response: Response = await anyio.to_thread.run_sync(console.handle, request)
        await send({"type": "http.response.start", "status": response.status,
                    "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in response.all_headers()]})
        await send({"type": "http.response.body", "body": response.body})

    return app


def wsgi_app(console: Console) -> WSGIApp:
    """``console`` as a WSGI app."""
    from werkzeug.http import HTTP_STATUS_CODES

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        headers = {key[5:].replace("_", "-").lower(): value for key, value in environ.items()
                   if key.startswith("HTTP_") and isinstance(value, str)}
        if environ.get("CONTENT_TYPE"):
            headers["content-type"] = environ["CONTENT_TYPE"]
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        body = environ["wsgi.input"].read(min(max(length, 0), _MAX_BODY + 1)) if length else b""
        request = Request(environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", "/") or "/",
                          environ.get("QUERY_STRING", ""), headers, body, environ.get("REMOTE_ADDR", ""),
                          str(environ.get("wsgi.url_scheme", "http")))
        response = console.handle(request)
        start_response(f"{response.status} {HTTP_STATUS_CODES.get(response.status, 'Unknown')}",
                       response.all_headers())
        return [response.body]

    return app
