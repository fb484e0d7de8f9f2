"""The demo: an "agent workbench" app (pure ASGI and WSGI twins) and a player for the five mission behaviours.

``sa-middleware demo`` (and ``make demo``) starts the app on a real port with a throw-away SQLite store, mints
tokens with a generated key, plays every behaviour over HTTP and prints one line per request. Tests reuse the app.

The app has public control routes under ``/_demo/`` so a client can hold a request in flight deterministically:
a request with ``?hold=NAME`` waits inside the view until ``POST /_demo/release/NAME``; ``GET /_demo/entered/NAME``
answers once that request is inside the view, and ``GET /_demo/done/NAME`` once the middleware has finished it (its
ticket released: that happens after the response was sent, so a client's next request could otherwise overtake it).
Never expose these routes in a real app.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import anyio.to_thread

from .asgi import Receive, Scope, Send, SessionAwareMiddleware
from .context import SAContext
from .guard import Guard
from .policy import Policy
from .tokens import generate_rsa_key, mint_token
from .wsgi import AfterClose, SessionAwareWSGIMiddleware, StartResponse

__all__ = ["DemoIssuer", "Workbench", "play", "run_demo", "workbench_guard", "workbench_policies"]

ISSUER = "https://idp.demo.local"
AUDIENCE = "workbench"
_GATE_TIMEOUT = 30.0


def workbench_policies() -> dict[str, Policy]:
    """The per-route policies of the workbench."""
    return {
        "GET /health": Policy(public=True),
        "* /_demo/{rest:path}": Policy(public=True),
        "POST /tickets": Policy(tags={"tickets"}, raises_risk=1, risk_window=60),
        "POST /payments/{id}/approve": Policy(exclusive=True, max_risk=0, locks=["payment:{id}"],
                                             scopes={"payments:approve"}),
        "PUT /objects/{id}": Policy(locks=["object:{id}"], on_lock_conflict="pause"),
    }


class DemoIssuer:
    """A throw-away identity provider: an RSA key and a minting helper."""

    def __init__(self, issuer: str = ISSUER, audience: str = AUDIENCE) -> None:
        self.private_key, self.public_pem = generate_rsa_key()
        self.issuer, self.audience = issuer, audience

    def token(self, sub: str, *, ttl: int = 600, **claims: Any) -> str:
        now = time.time()
        payload: dict[str, Any] = {"iss": self.issuer, "aud": self.audience, "sub": sub, "iat": now,
                                   "exp": int(now) + ttl, "jti": uuid.uuid4().hex}
        payload.update(claims)
        return mint_token(self.private_key, "RS256", payload, {"kid": "demo-1"})


def workbench_guard(issuer: DemoIssuer, store: Any, **options: Any) -> Guard:
    """A Guard for the workbench (max 3 parallel sessions per principal unless overridden)."""
    options.setdefault("default_policy", Policy(max_sessions=3))
    return Guard(store=store, keys=issuer.public_pem, algorithms=["RS256"], issuer=issuer.issuer,
                 audience=issuer.audience, policies=workbench_policies(), **options)


@dataclass
class _Gate:
    entered: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


def _hold(query: str) -> str | None:
    values = parse_qs(query).get("hold")
    return values[0] if values else None


class Workbench:
    """The workbench views, shared by the ASGI and WSGI apps. Records every view's interval for tests."""

    def __init__(self) -> None:
        self._gates: dict[str, _Gate] = {}
        self._lock = threading.Lock()
        self.intervals: list[dict[str, Any]] = []

    def gate(self, name: str) -> _Gate:
        with self._lock:
            return self._gates.setdefault(name, _Gate())

    def control(self, method: str, path: str) -> tuple[int, Any] | None:
        parts = path.split("/")
        if len(parts) == 4 and parts[2] in ("entered", "done"):
            ok = getattr(self.gate(parts[3]), parts[2]).wait(_GATE_TIMEOUT)
            return (200, {parts[2]: parts[3]}) if ok else (504, {"error": f"never {parts[2]}"})
        if len(parts) == 4 and parts[2] == "release" and method == "POST":
            self.gate(parts[3]).released.set()
            return 200, {"released": parts[3]}
        if path == "/_demo/intervals":
            with self._lock:
                return 200, list(self.intervals)
        return None

    def view(self, method: str, path: str, ctx: SAContext | None, hold: str | None) -> tuple[int, Any]:
        if path == "/health":
            return 200, {"ok": True}
        if path.startswith("/_demo/"):
            return self.control(method, path) or (404, {"error": "not found"})
        if ctx is None or ctx.principal is None:
            return 500, {"error": "no context"}
        start = time.monotonic()
        if hold:
            gate = self.gate(hold)
            gate.entered.set()
            gate.released.wait(_GATE_TIMEOUT)
        body = {"principal": ctx.principal, "kind": ctx.kind, "session_id": ctx.session_id, "route": ctx.route,
                "fencing_tokens": dict(ctx.fencing_tokens)}
        with self._lock:
            self.intervals.append({**body, "start": start, "end": time.monotonic()})
        known = ("POST /tickets", "POST /payments/{id}/approve", "PUT /objects/{id}")
        if ctx.route in known or path == "/whoami":
            return 200, body
        return 404, {"error": "not found"}

    # -- the two app flavours, and the trackers that wrap the middleware around them ---------------------------

    def track_asgi(self, app: Any) -> Any:
        """Wrap an ASGI app (the middleware) so ``/_demo/done/NAME`` answers once it has finished a held request."""
        async def tracked(scope: Scope, receive: Receive, send: Send) -> None:
            hold = _hold(scope.get("query_string", b"").decode("latin-1")) if scope["type"] == "http" else None
            try:
                await app(scope, receive, send)
            finally:
                if hold:
                    self.gate(hold).done.set()
        return tracked

    def track_wsgi(self, app: Any) -> Any:
        """Wrap a WSGI app (the middleware) so ``/_demo/done/NAME`` answers once it has finished a held request."""
        def tracked(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            hold = _hold(environ.get("QUERY_STRING", ""))
            done = self.gate(hold).done.set if hold else (lambda: None)
            try:
                result = app(environ, start_response)
            except BaseException:
                done()
                raise
            return AfterClose(result, done)
        return tracked

    async def asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        ctx = scope.get("sa_middleware")
        status, body = await anyio.to_thread.run_sync(
            self.view, scope["method"], scope["path"], ctx, _hold(scope.get("query_string", b"").decode("latin-1")))
        payload = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": payload})

    def wsgi(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        status, body = self.view(environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/"),
                                 environ.get("sa_middleware"), _hold(environ.get("QUERY_STRING", "")))
        start_response(f"{status} X", [("content-type", "application/json")])
        return [json.dumps(body).encode()]


# -- the player ------------------------------------------------------------------------------------------------

@dataclass
class Step:
    """One request of the demo and its result."""

    behaviour: str
    who: str
    what: str
    expected: tuple[int, str]
    got: tuple[int, str] = (0, "")

    @property
    def ok(self) -> bool:
        return self.expected == self.got


def request(base: str, method: str, path: str, token: str | None = None,
            agent: str = "sa-demo") -> tuple[int, dict[str, Any]]:
    """One HTTP request; returns (status, JSON body)."""
    headers = {"user-agent": agent}
    if token:
        headers["authorization"] = f"Bearer {token}"
    req = urllib.request.Request(base + path, method=method, headers=headers, data=b"" if method != "GET" else None)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


class _Held:
    """A request held in flight inside the view until ``release()``."""

    def __init__(self, base: str, method: str, path: str, token: str) -> None:
        self.base, self.name = base, uuid.uuid4().hex[:8]
        sep = "&" if "?" in path else "?"
        self.result: tuple[int, dict[str, Any]] = (0, {})
        self._thread = threading.Thread(target=self._run, args=(method, f"{path}{sep}hold={self.name}", token))
        self._thread.start()

    def _run(self, method: str, path: str, token: str) -> None:
        self.result = request(self.base, method, path, token)

    def wait_entered(self) -> bool:
        """Block until the request is inside the view (or it finished without entering)."""
        status, _ = request(self.base, "GET", f"/_demo/entered/{self.name}")
        return status == 200

    def release(self) -> tuple[int, dict[str, Any]]:
        """Let the view finish; returns its response once the middleware has released its ticket."""
        request(self.base, "POST", f"/_demo/release/{self.name}")
        self._thread.join(60)
        request(self.base, "GET", f"/_demo/done/{self.name}")
        return self.result


def play(base: str, guard: Guard, issuer: DemoIssuer, report: Callable[[Step], None]) -> list[Step]:
    """Play the five mission behaviours against a running workbench; every step is reported as it completes."""
    steps: list[Step] = []
    run = uuid.uuid4().hex[:6]

    def check(behaviour: str, who: str, method: str, path: str, token: str, expected: tuple[int, str],
              result: tuple[int, dict[str, Any]] | None = None) -> Step:
        status, body = result if result is not None else request(base, method, path, token)
        step = Step(behaviour, who, f"{method} {path}", expected, (status, str(body.get("code", "ok"))))
        steps.append(step)
        report(step)
        return step

    ok = (200, "ok")
    # 1. an agent opens a ticket; its simultaneous payment approval is refused, then its raised risk refuses it
    agent = f"agent-{run}"
    tok = issuer.token(agent, sa_kind="agent", sid=f"{agent}-s1", scope="tickets payments:approve")
    held = _Held(base, "POST", "/tickets", tok)
    held.wait_entered()
    check("1 agent risk", agent, "POST", "/payments/42/approve", tok, (409, "conflicting_action"))
    check("1 agent risk", agent, "POST", "/tickets", tok, ok, held.release())
    check("1 agent risk", agent, "POST", "/payments/42/approve", tok, (403, "risk_too_high"))

    # 2. a service account rotates its credential mid-session
    svc = f"svc-{run}"
    old = issuer.token(svc, client_id=svc, gen=1, sid=f"{svc}-s1")
    check("2 rotation", svc, "GET", "/whoami", old, ok)
    guard.rotate(svc)  # the IdP rotated the credential: generation 2
    check("2 rotation", svc, "GET", "/whoami", old, (401, "stale_generation"))
    new = issuer.token(svc, client_id=svc, gen=2, sid=f"{svc}-s1")
    check("2 rotation", svc, "GET", "/whoami", new, ok)
    check("2 rotation", svc, "POST", "/payments/43/approve", new, (403, "insufficient_scope"))
    check("2 rotation", svc, "GET", "/whoami", old, (401, "stale_generation"))

    # 3. a human operator and a non-human workflow modify the same production object at once
    human, flow = f"alice-{run}", f"workflow-{run}"
    htok = issuer.token(human, sid=f"{human}-s1")
    ftok = issuer.token(flow, sa_kind="service", sid=f"{flow}-s1")
    held = _Held(base, "PUT", "/objects/7", htok)
    held.wait_entered()
    check("3 object lock", flow, "PUT", "/objects/7", ftok, (403, "session_paused"))
    check("3 object lock", flow, "GET", "/whoami", ftok, (403, "session_paused"))
    check("3 object lock", human, "PUT", "/objects/7", htok, ok, held.release())
    guard.resume_session(f"{flow}-s1")
    held = _Held(base, "PUT", "/objects/8", ftok)  # now the workflow writes first and the human arrives
    held.wait_entered()
    check("3 object lock", human, "PUT", "/objects/8", htok, (423, "object_locked"))
    check("3 object lock", flow, "PUT", "/objects/8", ftok, ok, held.release())
    check("3 object lock", flow, "GET", "/whoami", ftok, (403, "session_paused"))
    guard.resume_session(f"{flow}-s1")
    check("3 object lock", flow, "PUT", "/objects/7", ftok, ok)

    # 4. a secret is found compromised in one session: every related context is re-evaluated
    bot, user = f"bot-{run}", f"bob-{run}"
    s1 = issuer.token(bot, sa_kind="agent", sid=f"{bot}-s1", gen=1)
    s2 = issuer.token(bot, sa_kind="agent", sid=f"{bot}-s2", gen=1)
    delegated = issuer.token(user, sid=f"{user}-via-{bot}", act={"sub": bot})
    own = issuer.token(user, sid=f"{user}-own")
    for who, token in ((bot, s1), (bot, s2), (user, delegated), (user, own)):
        check("4 compromise", who, "GET", "/whoami", token, ok)
    guard.report_compromise(session_id=f"{bot}-s1")
    check("4 compromise", bot, "GET", "/whoami", s1, (401, "credential_compromised"))
    check("4 compromise", bot, "GET", "/whoami", s2, (401, "credential_compromised"))
    check("4 compromise", f"{user} (via {bot})", "GET", "/whoami", delegated, (401, "credential_compromised"))
    check("4 compromise", f"{user} (own)", "GET", "/whoami", own, ok)
    fresh = issuer.token(bot, sa_kind="agent", sid=f"{bot}-s1", gen=2)
    check("4 compromise", bot, "GET", "/whoami", fresh, ok)
    check("4 compromise", bot, "GET", "/whoami", s2, (401, "stale_generation"))

    # 5. parallel sessions per principal are limited (3 in the workbench)
    many = f"crawler-{run}"
    tokens = [issuer.token(many, sa_kind="agent", sid=f"{many}-s{i}") for i in range(4)]
    for i, token in enumerate(tokens):
        check("5 sessions", f"{many} s{i}", "GET", "/whoami", token, ok if i < 3 else (403, "too_many_sessions"))
    check("5 sessions", f"{many} s0", "GET", "/whoami", tokens[0], ok)
    guard.revoke_session(f"{many}-s0")
    check("5 sessions", f"{many} s0", "GET", "/whoami", tokens[0], (401, "session_revoked"))
    check("5 sessions", f"{many} s3", "GET", "/whoami", tokens[3], ok)
    return steps


# -- servers ---------------------------------------------------------------------------------------------------

def serve_wsgi(app: Any) -> tuple[str, Callable[[], None]]:
    """Serve a WSGI app on a free loopback port with werkzeug's threaded server; returns (base URL, stop)."""
    from werkzeug.serving import WSGIRequestHandler, make_server

    class QuietHandler(WSGIRequestHandler):
        def log_request(self, *args: Any, **kwargs: Any) -> None:
            pass

    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop() -> None:
        server.shutdown()
        thread.join()
    return f"http://127.0.0.1:{server.server_port}", stop


def serve_asgi(app: Any) -> tuple[str, Callable[[], None]]:
    """Serve an ASGI app with uvicorn on a free loopback port in a thread; returns (base URL, stop)."""
    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join()
        sock.close()
    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def run_demo(servers: Iterable[str] = ("asgi", "wsgi"), echo: Callable[[str], None] = print) -> int:
    """Play the demo on each server flavour; returns the number of mismatches."""
    failures = 0
    with tempfile.TemporaryDirectory(prefix="sa-demo-") as tmp:
        for flavour in servers:
            issuer = DemoIssuer()
            guard = workbench_guard(issuer, f"sqlite:///{os.path.join(tmp, flavour + '.db')}")
            bench = Workbench()
            if flavour == "asgi":
                try:
                    base, stop = serve_asgi(bench.track_asgi(SessionAwareMiddleware(bench.asgi, guard=guard)))
                except ImportError:
                    echo("asgi: uvicorn is not installed (pip install 'sa-middleware[dev]'); skipped")
                    continue
                label = "ASGI (uvicorn)"
            else:
                base, stop = serve_wsgi(bench.track_wsgi(SessionAwareWSGIMiddleware(bench.wsgi, guard=guard)))
                label = "WSGI (werkzeug, threaded)"
            echo(f"\n== {label} at {base}, store sqlite:///{flavour}.db (throw-away)")
            echo(f"{'behaviour':<15} {'who':<26} {'request':<28} {'expected':<28} {'got':<28}")

            def report(step: Step) -> None:
                mark = "ok" if step.ok else "MISMATCH"
                echo(f"{step.behaviour:<15} {step.who[:26]:<26} {step.what:<28} "
                     f"{_fmt(step.expected):<28} {_fmt(step.got):<28} {mark}")
            try:
                steps = play(base, guard, issuer, report)
            finally:
                stop()
                guard.close()
            bad = sum(not s.ok for s in steps)
            failures += bad
            echo(f"-- {len(steps) - bad}/{len(steps)} as expected")
    echo("\nall behaviours as expected" if failures == 0 else f"\n{failures} mismatches")
    return failures


def _fmt(result: tuple[int, str]) -> str:
    return f"{result[0]} {result[1]}"


