"""Helpers of the security-event tests: a transmitter that signs SETs, subject builders, and a protected site.

The :class:`Site` serves, on one real server (uvicorn for ASGI, werkzeug's threaded server for WSGI), an app
behind the session-aware middleware and two :class:`~sa_middleware.events.SSFReceiver` mounted at their own paths
(Starlette ``Mount`` / werkzeug ``DispatcherMiddleware``), all sharing one Guard.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.routing import Mount, Router
from support import WAIT
from werkzeug.middleware.dispatcher import DispatcherMiddleware

from sa_middleware import Guard, Policy
from sa_middleware.asgi import SessionAwareMiddleware
from sa_middleware.demo import DemoIssuer, serve_asgi, serve_wsgi
from sa_middleware.events import SSFReceiver
from sa_middleware.tokens import generate_rsa_key, mint_token
from sa_middleware.wsgi import SessionAwareWSGIMiddleware

CAEP = "https://schemas.openid.net/secevent/caep/event-type/"
RISC = "https://schemas.openid.net/secevent/risc/event-type/"
VERIFICATION = "https://schemas.openid.net/secevent/ssf/event-type/verification"
SET_ISSUER = "https://idp.example/ssf"
RECEIVER_AUDIENCE = "https://rp.example/ssf"
STRICT_AUTHORIZATION = "Bearer push-secret-1234567890"
RECEIVER_PATH = "/ssf/events/"
STRICT_PATH = "/hooks/strict-ssf/"

POLICIES = {
    "GET /things": Policy(),
    "GET /scoped": Policy(scopes={"read"}),
    "GET /strong": Policy(acr_values=["gold"]),
    "GET /device": Policy(require_compliant_device=True),
    "GET /calm": Policy(max_risk=0),
}


class Transmitter:
    """A throw-away SSF transmitter: its own RSA key, and SETs signed with it (``typ: secevent+jwt``)."""

    def __init__(self, issuer: str = SET_ISSUER, audience: str = RECEIVER_AUDIENCE) -> None:
        self.private_key, self.public_pem = generate_rsa_key()
        self.issuer, self.audience = issuer, audience

    def set(self, event_type: str, event: dict[str, Any] | None = None, *, sub_id: Any = None, key: Any = None,
            headers: dict[str, Any] | None = None, **claims: Any) -> str:
        """A signed SET; a claim given as ``None`` is left out (``iat=None`` makes one without ``iat``)."""
        payload: dict[str, Any] = {"iss": self.issuer, "aud": self.audience, "iat": int(time.time()),
                                   "jti": uuid.uuid4().hex, "txn": uuid.uuid4().hex[:8],
                                   "sub_id": sub_id, "events": {event_type: event if event is not None else {}}}
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        return mint_token(key or self.private_key, "RS256", payload,
                          {"typ": "secevent+jwt", "kid": "tx-1", **(headers or {})})


def user(idp: DemoIssuer, sub: str) -> dict[str, Any]:
    """An ``iss_sub`` subject naming the principal ``sub`` of ``idp``'s tokens."""
    return {"format": "iss_sub", "iss": idp.issuer, "sub": sub}


def opaque(value: str) -> dict[str, Any]:
    return {"format": "opaque", "id": value}


def fresh_sub() -> str:
    return f"u-{uuid.uuid4().hex[:10]}"


def later_token(idp: DemoIssuer, sub: str, after: float, **claims: Any) -> str:
    """A token whose ``iat`` is strictly after ``after`` (waits for the clock to pass it: sub-millisecond)."""
    while time.time() <= after:
        time.sleep(0.001)
    return idp.token(sub, **claims)


def protected_asgi() -> Callable[..., Any]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})
    return app


def protected_wsgi(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    start_response("200 OK", [("content-type", "text/plain")])
    return [b"ok"]


@dataclass
class Site:
    """One server: the protected app and two receivers sharing ``guard``."""

    flavour: str
    base: str
    guard: Guard
    receiver: SSFReceiver
    strict: SSFReceiver
    idp: DemoIssuer
    tx: Transmitter
    stop: Callable[[], None]

    def get(self, path: str, token: str) -> httpx.Response:
        return httpx.get(self.base + path, headers={"authorization": f"Bearer {token}"}, timeout=WAIT)

    def push(self, body: str | bytes, *, path: str = RECEIVER_PATH, content_type: str = "application/secevent+jwt",
             headers: dict[str, str] | None = None) -> httpx.Response:
        all_headers = {"content-type": content_type, "accept": "application/json", **(headers or {})}
        return httpx.post(self.base + path, content=body, headers=all_headers, timeout=WAIT)

    def push_ok(self, body: str, **options: Any) -> None:
        resp = self.push(body, **options)
        assert resp.status_code == 202, resp.text
        assert resp.content == b""


def set_error(resp: httpx.Response, err: str) -> dict[str, Any]:
    """Assert ``resp`` is an RFC 8935 error response with ``err``; returns its body."""
    assert resp.status_code == 400, (resp.status_code, resp.text)
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["content-language"] == "en"
    body: dict[str, Any] = resp.json()
    assert set(body) == {"err", "description"}
    assert body["err"] == err, body
    assert isinstance(body["description"], str) and body["description"]
    return body


def open_site(flavour: str, store: str) -> Site:
    idp, tx = DemoIssuer(), Transmitter()
    guard = Guard(store=store, keys=idp.public_pem, algorithms=["RS256"], issuer=idp.issuer, audience=idp.audience,
                  policies=POLICIES)
    receiver = SSFReceiver(guard, issuer=tx.issuer, audience=tx.audience, keys=tx.public_pem,
                           assurance_levels={"nist-aal2": "gold", "nist-aal1": "silver"})
    strict = SSFReceiver(guard, issuer=tx.issuer, audience=[tx.audience, "other"], keys={"tx-1": tx.public_pem},
                         algorithms=["RS256"], authorization=STRICT_AUTHORIZATION, on_high_risk="report_compromise")
    if flavour == "asgi":
        app = Router(routes=[Mount(RECEIVER_PATH.rstrip("/"), app=receiver),
                             Mount(STRICT_PATH.rstrip("/"), app=strict)],
                     default=SessionAwareMiddleware(protected_asgi(), guard=guard), redirect_slashes=False)
        base, stop = serve_asgi(app)
    else:
        wsgi = DispatcherMiddleware(SessionAwareWSGIMiddleware(protected_wsgi, guard=guard),
                                    {RECEIVER_PATH.rstrip("/"): receiver.wsgi, STRICT_PATH.rstrip("/"): strict.wsgi})
        base, stop = serve_wsgi(wsgi)

    def close() -> None:
        stop()
        guard.close()
    return Site(flavour, base, guard, receiver, strict, idp, tx, close)
