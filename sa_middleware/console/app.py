"""The console's request handling, written once for ASGI and WSGI: pages, the JSON API, logins and actions.

Access (see docs/observability.md):

- a **bearer token** with the admin scope, decided by the same :class:`~sa_middleware.Guard` as the application
  (so a revoked, rotated or compromised admin token is refused like any other); or
- a **one-time login link** (``login?token=...``, printed by ``sa-middleware console``), exchanged for an
  ``HttpOnly; SameSite=Strict`` session cookie; the CLI serves the console on a loopback address only.

A cookie session is a bearer of authority the browser sends by itself, so every action made with it must carry the
session's CSRF token in the ``X-CSRF-Token`` header (and a JSON body, and a same-origin ``Origin`` when the browser
sends one). Every response carries ``Content-Security-Policy: default-src 'self'`` and the page writes every value
with ``textContent``.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from ..context import RequestInfo
from ..errors import ConfigurationError, SAMiddlewareError
from ..operations import MAX_AUDIT_LIMIT, Operations
from ..policy import Policy, RouteTable

if TYPE_CHECKING:
    from ..guard import Guard

__all__ = ["ACTIONS", "DEFAULT_ADMIN_SCOPE", "Console", "Request", "Response"]

log = logging.getLogger("sa_middleware")

#: the scope a bearer token needs to use the console
DEFAULT_ADMIN_SCOPE = "sa:admin"
#: what the console can do, each through the operation of the same name: the target it needs
ACTIONS: dict[str, str] = {
    "pause_session": "session_id", "resume_session": "session_id", "revoke_session": "session_id",
    "rotate": "sub", "revoke_principal": "sub", "report_compromise": "sub_or_session",
}
COOKIE = "sa_console"
_MAX_BODY = 16 * 1024
_MAX_REASON = 500
_MAX_LOGINS = 256
_LOGIN_TTL = 12 * 3600.0
_CHART_WINDOW, _CHART_BUCKET = 3600, 60
_STATIC = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
_HEADERS = [
    ("content-security-policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                                "base-uri 'none'; form-action 'self'"),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "DENY"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
]


@dataclass(frozen=True, slots=True)
class Request:
    """A console request, framework-neutral. ``path`` is relative to where the console is mounted."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes = b""
    client: str = ""
    scheme: str = "http"


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)

    def all_headers(self) -> list[tuple[str, str]]:
        return [("content-type", self.content_type), ("content-length", str(len(self.body))), *_HEADERS,
                *self.headers]


@dataclass(slots=True)
class _Login:
    operator: str
    csrf: str
    expires: float
    token: str | None = None  # a bearer login: re-decided by the Guard on every request


class _Denied(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Console:
    """The console over ``ops`` (an :class:`~sa_middleware.operations.Operations` or a Guard).

    ``guard`` authorises bearer tokens with ``admin_scope`` (it may be ``ops`` itself); ``login_link=True``
    (the default without a guard) makes a one-time login token, :attr:`login_token`, for :meth:`login_url`.
    ``operator`` names the one who logs in with the link in the audit trail.
    """

    def __init__(self, ops: Operations, *, guard: Guard | None = None, admin_scope: str = DEFAULT_ADMIN_SCOPE,
                 login_link: bool | None = None, operator: str = "console") -> None:
        if not isinstance(ops, Operations):
            raise TypeError("Console needs an Operations or a Guard")
        if login_link is None:
            login_link = guard is None
        if guard is None and not login_link:
            raise ConfigurationError("the console needs a guard (bearer tokens with the admin scope) or a login link")
        if not isinstance(admin_scope, str) or not admin_scope or " " in admin_scope:
            raise ConfigurationError("admin_scope must be one scope")
        self.ops = ops
        self.guard = guard
        self.admin_scope = admin_scope
        self.operator = operator
        self.login_token: str | None = secrets.token_urlsafe(32) if login_link else None
        self._admin = RouteTable({"* /console": Policy(scopes={admin_scope})}).match("GET", "/console")
        self._logins: OrderedDict[str, _Login] = OrderedDict()
        self._lock = threading.Lock()

    def login_url(self, base: str) -> str:
        """The one-time login link under ``base`` (the console's URL)."""
        if self.login_token is None:
            raise SAMiddlewareError("this console has no login link")
        return f"{base.rstrip('/')}/login?token={self.login_token}"

    # -- dispatch ----------------------------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        """Answer one request (blocking: store calls)."""
        try:
            return self._route(request)
        except _Denied as exc:
            return _json({"error": str(exc)}, exc.status)
        except ConfigurationError as exc:  # a bad argument (an id too long...)
            return _json({"error": str(exc)}, 400)
        except SAMiddlewareError as exc:  # the store did not answer
            return _json({"error": str(exc)}, 503)
        except Exception:
            log.exception("sa-middleware console: the request failed")
            return _json({"error": "the store failed; see the console's log"}, 503)

    def _route(self, request: Request) -> Response:
        path, method = request.path or "/", request.method
        if path in ("/", "/index.html"):
            _method(method, "GET")
            return Response(200, _asset("index.html"), "text/html; charset=utf-8")
        if path.startswith("/static/"):
            _method(method, "GET")
            name = path[len("/static/"):]
            if name not in _STATIC:
                raise _Denied(404, "not found")
            return Response(200, _asset(name), _STATIC[name])
        if path == "/login":
            _method(method, "GET")
            return self._link_login(request)
        if path == "/api/login":
            _method(method, "POST")
            return self._bearer_login(request)
        if path == "/api/logout":
            _method(method, "POST")
            login = self._cookie_login(request)
            if login is not None:
                self._check_csrf(request, login)
                with self._lock:
                    self._logins.pop(_cookie(request) or "", None)
            return _json({"ok": True}, headers=[("set-cookie", f"{COOKIE}=; Max-Age=0; Path=/; HttpOnly; "
                                                               "SameSite=Strict")])
        if path in ("/api/state", "/api/audit", "/api/chart", "/api/action"):
            return self._authorised(request, path)
        raise _Denied(404, "not found")

    def _authorised(self, request: Request, path: str) -> Response:
        operator, login, release = self._authorise(request)
        try:
            if path == "/api/action":
                _method(request.method, "POST")
                if login is not None:
                    self._check_csrf(request, login)
                return self._action(request, operator)
            _method(request.method, "GET")
            if path == "/api/state":
                return _json({"operator": operator, "csrf": login.csrf if login else None, "now": time.time(),
                              "sessions": [asdict(s) for s in self.ops.all_sessions(1000)],
                              "locks": [asdict(lk) for lk in self.ops.locks()]})
            if path == "/api/audit":
                return self._audit(request)
            return self._chart()
        finally:
            release()

    # -- access ------------------------------------------------------------------------------------------------

    def _authorise(self, request: Request) -> tuple[str, _Login | None, Any]:
        """(operator, the cookie login or None for a bearer request, a release callable) or raise _Denied."""
        header = request.headers.get("authorization")
        if header is not None:
            return self._bearer(request)
        login = self._cookie_login(request)
        if login is None:
            raise _Denied(401, "log in with the console's login link or an admin bearer token")
        if login.token is not None:  # a bearer login: the Guard decides it again, now
            operator, release = self._decide(request, login.token)
            return operator, login, release
        return login.operator, login, lambda: None

    def _bearer(self, request: Request) -> tuple[str, _Login | None, Any]:
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Denied(401, "expected a bearer token")
        operator, release = self._decide(request, token.strip())
        return operator, None, release

    def _decide(self, request: Request, token: str) -> tuple[str, Any]:
        if self.guard is None:
            raise _Denied(401, "this console accepts no bearer tokens (no guard)")
        from ..denials import Denial

        headers = {k: v for k, v in request.headers.items() if k not in ("authorization", "cookie")}
        headers["authorization"] = f"Bearer {token}"
        info = RequestInfo(method=request.method, path="/console", headers=headers, client=request.client,
                           scheme=request.scheme, host=request.headers.get("host", ""))
        outcome = self.guard.admit(info, self._admin)
        if isinstance(outcome, Denial):
            raise _Denied(outcome.status, f"{outcome.code}: {outcome.detail}")
        guard, ticket = self.guard, outcome.ticket
        return f"{outcome.context.principal}", lambda: guard.release(ticket)

    def _link_login(self, request: Request) -> Response:
        given = (parse_qs(request.query).get("token") or [""])[0]
        with self._lock:
            expected = self.login_token
            if expected is None or not given or not hmac.compare_digest(given.encode(), expected.encode()):
                raise _Denied(403, "this login link is not valid (it works once; restart the console for a new one)")
            self.login_token = None  # one time
        cookie = self._new_login(self.operator, None, request)
        return Response(303, b"", "text/plain", [("location", "./"), ("set-cookie", cookie)])

    def _bearer_login(self, request: Request) -> Response:
        """A browser logs in with an admin bearer token: a cookie session that the Guard re-decides per request."""
        scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Denied(401, "expected an admin bearer token")
        operator, release = self._decide(request, token.strip())
        release()
        return _json({"ok": True}, headers=[("set-cookie", self._new_login(operator, token.strip(), request))])

    def _new_login(self, operator: str, token: str | None, request: Request) -> str:
        sid = secrets.token_urlsafe(32)
        with self._lock:
            self._logins[sid] = _Login(operator, secrets.token_urlsafe(32), time.monotonic() + _LOGIN_TTL, token)
            while len(self._logins) > _MAX_LOGINS:
                self._logins.popitem(last=False)
        secure = "; Secure" if request.scheme == "https" else ""
        return f"{COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict; Max-Age={int(_LOGIN_TTL)}{secure}"

    def _cookie_login(self, request: Request) -> _Login | None:
        sid = _cookie(request)
        if not sid:
            return None
        with self._lock:
            login = self._logins.get(sid)
            if login is not None and login.expires < time.monotonic():
                del self._logins[sid]
                return None
            return login

    def _check_csrf(self, request: Request, login: _Login) -> None:
        given = request.headers.get("x-csrf-token", "")
        if not given or not hmac.compare_digest(given.encode(), login.csrf.encode()):
            raise _Denied(403, "missing or wrong CSRF token")
        origin = request.headers.get("origin")
        host = request.headers.get("host", "")
        if origin is not None and origin.split("://", 1)[-1] != host:
            raise _Denied(403, "cross-origin request refused")

    # -- the API -----------------------------------------------------------------------------------------------

    def _action(self, request: Request, operator: str) -> Response:
        if not request.headers.get("content-type", "").startswith("application/json"):
            raise _Denied(415, "send the action as application/json")
        if len(request.body) > _MAX_BODY:
            raise _Denied(413, "request too large")
        try:
            data = json.loads(request.body)
        except ValueError:
            raise _Denied(400, "the body is not JSON") from None
        if not isinstance(data, dict):
            raise _Denied(400, "expected a JSON object")
        action, reason = data.get("action"), data.get("reason")
        if action not in ACTIONS:
            raise _Denied(400, f"action must be one of {', '.join(sorted(ACTIONS))}")
        if not isinstance(reason, str) or not reason.strip() or len(reason) > _MAX_REASON:
            raise _Denied(400, f"a reason is required (at most {_MAX_REASON} characters)")
        sub, session_id = data.get("sub") or None, data.get("session_id") or None
        for value in (sub, session_id):
            if value is not None and not isinstance(value, str):
                raise _Denied(400, "sub and session_id must be strings")
        source = f"console:{operator}"[:80]
        target = ACTIONS[action]
        ops = self.ops
        result: Any
        if target == "session_id":
            if session_id is None:
                raise _Denied(400, f"{action} needs a session_id")
            result = getattr(ops, action)(session_id, source=source)
        elif target == "sub":
            if sub is None:
                raise _Denied(400, f"{action} needs a sub")
            result = getattr(ops, action)(sub, source=source)
        else:
            if sub is None and session_id is None:
                raise _Denied(400, "report_compromise needs a sub or a session_id")
            result = ops.report_compromise(sub, session_id, source=source)
        from ..records import AuditRecord

        ops._note(AuditRecord("operation", "reason", source, sub, session_id, None,
                              f"{action}: {reason.strip()}"))
        return _json({"ok": True, "action": action, "result": result})

    def _audit(self, request: Request) -> Response:
        query = {k: v[0] for k, v in parse_qs(request.query).items() if v and v[0]}
        unknown = set(query) - {"sub", "session_id", "code", "kind", "since", "limit"}
        if unknown:
            raise _Denied(400, f"unknown filter: {sorted(unknown)[0]}")
        try:
            limit = int(query.pop("limit", "200"))
            since = float(query.pop("since")) if "since" in query else None
        except ValueError:
            raise _Denied(400, "limit and since must be numbers") from None
        records = self.ops.audit(query.get("sub"), query.get("session_id"), query.get("code"), since,
                                 limit=max(1, min(limit, 1000)), kind=query.get("kind"))
        return _json({"records": [r.to_dict() for r in records]})

    def _chart(self) -> Response:
        """Admissions and denials by code over the last hour, per minute, from the audit trail."""
        now = time.time()
        start = now - _CHART_WINDOW
        series: dict[str, list[int]] = {}
        buckets = _CHART_WINDOW // _CHART_BUCKET
        for kind in ("denial", "admission"):
            for record in self.ops.audit(kind=kind, since=start, limit=MAX_AUDIT_LIMIT):
                index = min(int(((record.time or now) - start) // _CHART_BUCKET), buckets - 1)
                series.setdefault(record.code, [0] * buckets)[max(index, 0)] += 1
        return _json({"start": start, "bucket": _CHART_BUCKET, "series": series})


def _method(method: str, allowed: str) -> None:
    if method != allowed:
        raise _Denied(405, f"use {allowed}")


def _cookie(request: Request) -> str | None:
    for part in request.headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE and value:
            return value
    return None


def _json(data: Any, status: int = 200, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, json.dumps(data, default=str).encode(), "application/json", headers or [])


_assets: dict[str, bytes] = {}


def _asset(name: str) -> bytes:
    if name not in _assets:
        _assets[name] = resources.files("sa_middleware.console").joinpath("static", name).read_bytes()
    return _assets[name]
