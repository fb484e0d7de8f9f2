"""WSGI middleware (contract): ``app.wsgi_app = SessionAwareWSGIMiddleware(app.wsgi_app, guard=guard)``.

The ticket is released when the server closes the response iterable (after the last chunk, streamed responses
included), or at once when the app raises. The view finds its context in ``environ["sa_middleware"]``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .context import RequestInfo, admitted
from .denials import Denial
from .guard import Guard
from .policy import RouteMatch
from .records import Ticket
from .responses import denial_response

__all__ = ["AfterClose", "SessionAwareWSGIMiddleware"]

Environ = dict[str, Any]
StartResponse = Callable[..., Any]
WSGIApp = Callable[[Environ, StartResponse], Iterable[bytes]]


def request_info(environ: Environ) -> RequestInfo:
    """A RequestInfo from a WSGI environ: ``path`` is ``SCRIPT_NAME + PATH_INFO`` (the URL's path), ``app_path``
    is ``PATH_INFO`` (what the Guard's table is matched on)."""
    headers = {key[5:].replace("_", "-").lower(): value for key, value in environ.items()
               if key.startswith("HTTP_") and isinstance(value, str)}
    for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(key):
            headers[key.replace("_", "-").lower()] = environ[key]
    path = (environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")) or "/"
    scheme = str(environ.get("wsgi.url_scheme") or "http")
    cert = environ.get("SSL_CLIENT_CERT")  # werkzeug and mod_ssl (SSLOptions +ExportCertData); never from a header
    return RequestInfo(method=environ.get("REQUEST_METHOD", "GET").upper(), path=path, headers=headers,
                       client=environ.get("REMOTE_ADDR", ""), scheme=scheme,
                       host=headers.get("host") or _server(environ),
                       client_cert=cert if isinstance(cert, str) and cert else None,
                       app_path=environ.get("PATH_INFO") or "/")


def _server(environ: Environ) -> str:
    name, port = str(environ.get("SERVER_NAME", "")), str(environ.get("SERVER_PORT", ""))
    default = {"http": "80", "https": "443"}.get(str(environ.get("wsgi.url_scheme")))
    return name if not name or not port or port == default else f"{name}:{port}"


def denial_app(denial: Denial, guard: Guard, start_response: StartResponse) -> list[bytes]:
    """Answer a refused request with its problem+json response."""
    status, headers, body = denial_response(denial, guard.realm, guard.retry_after)
    start_response(f"{status} {denial.title}", headers)
    return [body]


class AfterClose:
    """A response iterable that runs ``callback`` exactly once, after the wrapped iterable's ``close()`` (which
    the server calls when the response is done, streamed or not), even if that ``close()`` raises."""

    def __init__(self, iterable: Iterable[bytes], callback: Callable[[], None]) -> None:
        self._iterable = iterable
        self._callback = callback
        self._once = threading.Lock()
        self._done = False

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._iterable)

    def close(self) -> None:
        try:
            close = getattr(self._iterable, "close", None)
            if close is not None:
                close()
        finally:
            with self._once:
                done, self._done = self._done, True
            if not done:
                self._callback()


def run_admitted(app: WSGIApp, environ: Environ, start_response: StartResponse, guard: Guard,
                 ticket: Ticket | None, view_policies: bool = False) -> Iterable[bytes]:
    """Call the app and return its response wrapped so the ticket is released on close or on error.
    ``view_policies``: the match applied the views' ``@policy`` (adapters), so decorated views may run."""
    try:
        with admitted(view_policies):
            result = app(environ, start_response)
    except BaseException:
        guard.release(ticket)
        raise
    return AfterClose(result, lambda: guard.release(ticket))


class SessionAwareWSGIMiddleware:
    """Session-aware authorisation for any WSGI app, decided by the Guard's table (``policies``) alone.

    Views decorated with an adapter's ``@policy`` refuse to run under it (their policy would not be applied): use
    the framework's adapter for them.
    """

    #: whether ``match`` applies the views' ``@policy`` when it finds the view (the adapters' subclasses do)
    view_policies = False

    def __init__(self, app: WSGIApp, *, guard: Guard) -> None:
        if not isinstance(guard, Guard):
            raise TypeError("SessionAwareWSGIMiddleware needs guard=Guard(...)")
        self.app = app
        self.guard = guard

    def match(self, environ: Environ, request: RequestInfo) -> RouteMatch | None:
        """The route match; ``None`` lets the Guard use its own route table (adapters override this)."""
        return None

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        request = request_info(environ)
        match = self.match(environ, request)
        outcome = self.guard.admit(request, match)
        if isinstance(outcome, Denial):
            return denial_app(outcome, self.guard, start_response)
        environ["sa_middleware"] = outcome.context
        views = self.view_policies and match is not None  # decorated views run only if their policy was read
        return run_admitted(self.app, environ, start_response, self.guard, outcome.ticket, views)
