"""The demo: an "agent workbench" app (pure ASGI and WSGI twins) and a player for the five behaviours.

``sa-middleware demo`` (and ``make demo``) starts the app on a real port with a throw-away SQLite store, mints
tokens with a generated key, plays every behaviour over HTTP and prints one line per request. Tests reuse the app.

The app has public control routes under ``/_demo/`` so a client can hold a request in flight deterministically:
a request with ``?hold=NAME`` waits inside the view until ``POST /_demo/release/NAME``; ``GET /_demo/entered/NAME``
answers once that request is inside the view, and ``GET /_demo/done/NAME`` once the middleware has finished it (its
ticket released: that happens after the response was sent, so a client's next request could otherwise overtake it).
Never expose these routes in a real app.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qs

import anyio.to_thread

from .asgi import Receive, Scope, Send, SessionAwareMiddleware
from .context import SAContext
from .guard import Guard
from .policy import Policy
from .tokens import generate_rsa_key, mint_token
from .wsgi import AfterClose, SessionAwareWSGIMiddleware, StartResponse

__all__ = ["DemoIssuer", "Held", "Issuer", "Step", "Target", "Workbench", "play", "run_demo", "workbench_guard",
           "workbench_policies"]

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
    """One request of the demo and its result; ``operator`` is what an operator did just before it was sent."""

    behaviour: str
    who: str
    what: str
    expected: tuple[int, str]
    got: tuple[int, str] = (0, "")
    operator: str = ""

    @property
    def ok(self) -> bool:
        """The same code, and the same status (for success: any 2xx, as a create may answer 201)."""
        (want, code), (status, got) = self.expected, self.got
        return code == got and (want == status or (code == "ok" and 200 <= status < 300))


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


class Held(Protocol):
    """A request held in flight inside the view: ``wait_entered()`` once it is there, ``release()`` to finish it."""

    def wait_entered(self) -> bool: ...

    def release(self) -> tuple[int, dict[str, Any]]: ...


HoldFactory = Callable[[str, str, str, str, str], Held]
"""``hold(base, method, path, token, principal)`` starts a request that stays in flight until released."""


class _Held:
    """A request to the workbench held in flight inside the view (``?hold=``) until ``release()``."""

    def __init__(self, base: str, method: str, path: str, token: str, principal: str = "") -> None:
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


class Issuer(Protocol):
    """Mints a token for ``sub`` with extra claims (DemoIssuer; the examples' development key)."""

    def token(self, sub: str, **claims: Any) -> str: ...


SendRequest = Callable[[str, str, str, str | None], tuple[int, dict[str, Any]]]
"""``send(base, method, path, token)`` makes one request of the demo and returns (status, JSON body)."""


def play(base: str, guard: Guard, issuer: Issuer, report: Callable[[Step], None],
         hold: HoldFactory = _Held, send: SendRequest = request) -> list[Step]:
    """Play the five behaviours against a running workbench; returns the steps in the order they were sent, each
    reported as it completes (a held request completes after the requests sent while it was in flight).

    ``guard`` is the operator's handle on the app's store (rotate, resume, compromise, revoke); ``hold`` starts the
    requests that must be in flight while another one arrives (the workbench's ``?hold=`` gates by default);
    ``send`` makes every other request (plain HTTP by default).
    """
    steps: list[Step] = []
    run = uuid.uuid4().hex[:6]
    done_by_operator: list[str] = []

    def operator(command: str) -> None:
        """Note an operator's command (the CLI spelling of what ``guard`` just did) for the next step."""
        done_by_operator.append(command)

    def sent(behaviour: str, who: str, method: str, path: str, expected: tuple[int, str]) -> Step:
        step = Step(behaviour, who, f"{method} {path}", expected, operator="; ".join(done_by_operator))
        done_by_operator.clear()
        steps.append(step)
        return step

    def answered(step: Step, result: tuple[int, dict[str, Any]]) -> Step:
        status, body = result
        step.got = (status, str(body.get("code") or ("ok" if 200 <= status < 300 else "no code")))
        report(step)
        return step

    def check(behaviour: str, who: str, method: str, path: str, token: str, expected: tuple[int, str]) -> Step:
        return answered(sent(behaviour, who, method, path, expected), send(base, method, path, token))

    def held(behaviour: str, who: str, method: str, path: str, token: str) -> tuple[Step, Held]:
        """A request that stays in flight (inside the view) until released; its step is listed when sent."""
        step = sent(behaviour, who, method, f"{path} (held)", ok)
        request_ = hold(base, method, path, token, who)
        request_.wait_entered()
        return step, request_

    ok = (200, "ok")
    # 1. an agent opens a ticket; its simultaneous payment approval is refused, then its raised risk refuses it
    agent = f"agent-{run}"
    tok = issuer.token(agent, sa_kind="agent", sid=f"{agent}-s1", scope="tickets payments:approve")
    step, ticket = held("1 agent risk", agent, "POST", "/tickets", tok)
    check("1 agent risk", agent, "POST", "/payments/42/approve", tok, (409, "conflicting_action"))
    answered(step, ticket.release())
    check("1 agent risk", agent, "POST", "/payments/42/approve", tok, (403, "risk_too_high"))

    # 2. a service account rotates its credential mid-session
    svc = f"svc-{run}"
    old = issuer.token(svc, client_id=svc, gen=1, sid=f"{svc}-s1")
    check("2 rotation", svc, "GET", "/whoami", old, ok)
    guard.rotate(svc)  # the IdP rotated the credential: generation 2
    operator(f"rotate {svc}")
    check("2 rotation", svc, "GET", "/whoami", old, (401, "stale_generation"))
    new = issuer.token(svc, client_id=svc, gen=2, sid=f"{svc}-s1")
    check("2 rotation", svc, "GET", "/whoami", new, ok)
    check("2 rotation", svc, "POST", "/payments/43/approve", new, (403, "insufficient_scope"))
    check("2 rotation", svc, "GET", "/whoami", old, (401, "stale_generation"))

    # 3. a human operator and a non-human workflow modify the same production object at once
    human, flow = f"alice-{run}", f"workflow-{run}"
    htok = issuer.token(human, sid=f"{human}-s1")
    ftok = issuer.token(flow, sa_kind="service", sid=f"{flow}-s1")
    step, write = held("3 object lock", human, "PUT", "/objects/7", htok)
    check("3 object lock", flow, "PUT", "/objects/7", ftok, (403, "session_paused"))
    check("3 object lock", flow, "GET", "/whoami", ftok, (403, "session_paused"))
    answered(step, write.release())
    guard.resume_session(f"{flow}-s1")
    operator(f"resume {flow}-s1")
    step, write = held("3 object lock", flow, "PUT", "/objects/8", ftok)  # now the workflow writes first
    check("3 object lock", human, "PUT", "/objects/8", htok, (423, "object_locked"))
    answered(step, write.release())
    check("3 object lock", flow, "GET", "/whoami", ftok, (403, "session_paused"))
    guard.resume_session(f"{flow}-s1")
    operator(f"resume {flow}-s1")
    check("3 object lock", flow, "PUT", "/objects/7", ftok, ok)

    # 4. a secret is found compromised in one session: every related context is re-evaluated
    bot, user = f"bot-{run}", f"bob-{run}"
    s1 = issuer.token(bot, sa_kind="agent", sid=f"{bot}-s1", gen=1)
    s2 = issuer.token(bot, sa_kind="agent", sid=f"{bot}-s2", gen=1)
    delegated = issuer.token(user, sid=f"{user}-via-{bot}", act={"sub": bot})
    own = issuer.token(user, sid=f"{user}-own")
    contexts = ((f"{bot} s1", s1), (f"{bot} s2", s2), (f"{user} via {bot}", delegated), (f"{user} own", own))
    for who, token in contexts:
        check("4 compromise", who, "GET", "/whoami", token, ok)
    guard.report_compromise(session_id=f"{bot}-s1")
    operator(f"compromise --session {bot}-s1")
    for who, token in contexts:  # every related context is refused; bob's own session is unrelated
        check("4 compromise", who, "GET", "/whoami", token, ok if token is own else (401, "credential_compromised"))
    fresh = issuer.token(bot, sa_kind="agent", sid=f"{bot}-s1", gen=2)
    check("4 compromise", f"{bot} s1 gen 2", "GET", "/whoami", fresh, ok)
    check("4 compromise", f"{bot} s2", "GET", "/whoami", s2, (401, "stale_generation"))

    # 5. parallel sessions per principal are limited (3 in the workbench)
    many = f"crawler-{run}"
    tokens = [issuer.token(many, sa_kind="agent", sid=f"{many}-s{i}") for i in range(4)]
    for i, token in enumerate(tokens):
        check("5 sessions", f"{many} s{i}", "GET", "/whoami", token, ok if i < 3 else (403, "too_many_sessions"))
    check("5 sessions", f"{many} s0", "GET", "/whoami", tokens[0], ok)
    guard.revoke_session(f"{many}-s0")
    operator(f"revoke --session {many}-s0")
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


def serve_asgi(app: Any, **config: Any) -> tuple[str, Callable[[], None]]:
    """Serve an ASGI app with uvicorn on a free loopback port in a thread; returns (base URL, stop). ``config``
    adds uvicorn options (``root_path="/api"``, ``lifespan="on"``)."""
    import socket

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, **{"log_level": "warning", "lifespan": "off", **config}))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join()
        sock.close()
    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


@dataclass
class Target:
    """An app the demo plays against: a label, its base URL, and the handles the player needs."""

    label: str
    short: str  # a column heading
    base: str
    guard: Guard
    issuer: Issuer
    hold: HoldFactory
    stop: Callable[[], None]
    send: SendRequest = request


def _builtin_targets(servers: Iterable[str], tmp: str, echo: Callable[[str], None]) -> Iterator[Target]:
    for flavour in servers:
        issuer = DemoIssuer()
        guard = workbench_guard(issuer, f"sqlite:///{os.path.join(tmp, flavour + '.db')}")
        bench = Workbench()
        if flavour == "asgi":
            try:
                base, stop = serve_asgi(bench.track_asgi(SessionAwareMiddleware(bench.asgi, guard=guard)))
            except ImportError:
                echo("core ASGI: uvicorn is not installed (pip install 'sa-middleware[dev]'); skipped")
                guard.close()
                continue
            label, short = "core ASGI (uvicorn)", "core-asgi"
        else:
            base, stop = serve_wsgi(bench.track_wsgi(SessionAwareWSGIMiddleware(bench.wsgi, guard=guard)))
            label, short = "core WSGI (werkzeug)", "core-wsgi"

        def stop_all(stop: Callable[[], None] = stop, guard: Guard = guard) -> None:
            stop()
            guard.close()
        yield Target(label, short, base, guard, issuer, _Held, stop_all)


_TITLES = {
    "1": "An AI agent opens a ticket; its simultaneous payment approval is refused",
    "2": "A service account rotates its credential mid-session",
    "3": "A human and a non-human workflow modify the same object at once: the workflow is paused",
    "4": "A secret is found compromised in one session: every related context is re-evaluated",
    "5": "Parallel sessions per principal are limited (3 here)",
}


def run_demo(servers: Iterable[str] = ("asgi", "wsgi"), echo: Callable[[str], None] = print,
             examples: str | None = None, *, as_json: bool = False) -> int:
    """Play the demo on each target (the built-in workbench on each server flavour, then each example app when
    ``examples`` names the examples directory) and print the steps and the framework x behaviour table (with
    ``as_json``, one JSON document instead); returns the mismatches."""
    results: list[tuple[Target, list[Step]]] = []
    say = (lambda line: None) if as_json else echo
    with tempfile.TemporaryDirectory(prefix="sa-demo-") as tmp:
        targets: Iterator[Target] = _builtin_targets(servers, tmp, say)
        if examples is not None:
            from .demo_examples import example_targets

            targets = itertools.chain(targets, example_targets(examples, tmp, say))
        for target in targets:
            try:
                steps = play(target.base, target.guard, target.issuer, lambda step: None, target.hold, target.send)
            finally:
                target.stop()
            bad = sum(not s.ok for s in steps)
            say(f"{target.label:<24} {target.base:<24} {len(steps) - bad}/{len(steps)} steps as expected")
            results.append((target, steps))
    failures = sum(not s.ok for _, steps in results for s in steps)
    if as_json:
        echo(json.dumps([{"target": t.label, "base": t.base, "steps": [
            {"behaviour": s.behaviour, "who": s.who, "request": s.what, "operator": s.operator or None,
             "expected": list(s.expected), "got": list(s.got), "ok": s.ok} for s in steps]}
            for t, steps in results], indent=2))
        return failures
    if results:
        _print_tables(results, echo)
    echo("\nall behaviours as expected" if failures == 0 else f"\n{failures} mismatches")
    return failures


def _print_tables(results: list[tuple[Target, list[Step]]], echo: Callable[[str], None]) -> None:
    """The steps in the order they were sent, one column per target (T1, T2, ...; at most 120 columns for up to
    eight targets), then the framework x behaviour summary."""
    columns = [f"T{i}" for i in range(1, len(results) + 1)]
    echo("\nEvery request in the order it was sent, and what each target answered ('ok': as expected):")
    echo(f"{'#':>3} {'who':<27} {'request':<26} {'expected':<26} " + " ".join(f"{c:<3}" for c in columns).rstrip())
    behaviour = ""
    for number, row in enumerate(zip(*(steps for _, steps in results), strict=True), 1):
        first = row[0]
        if first.behaviour != behaviour:
            behaviour = first.behaviour
            echo(f"{behaviour[0]}. {_TITLES.get(behaviour[0], behaviour)}")
        if first.operator:
            echo(f"{'':>3} {'operator: sa-middleware ' + first.operator}")
        marks = " ".join(f"{'ok' if s.ok else 'NO':<3}" for s in row)
        echo(f"{number:>3} {first.who[:27]:<27} {first.what[:26]:<26} {_fmt(first.expected)[:26]:<26} {marks}".rstrip())
    for (target, steps), column in zip(results, columns, strict=True):
        for number, step in enumerate(steps, 1):
            if not step.ok:
                echo(f"MISMATCH {column} {target.label}, step {number}: expected {_fmt(step.expected)}, "
                     f"got {_fmt(step.got)}")
    behaviours = list(dict.fromkeys(s.behaviour for s in results[0][1]))
    wide = max(len(target.label) for target, _ in results) + 6
    echo("\nFramework x behaviour (steps as expected / steps):")
    echo((f"{'framework':<{wide}}" + "".join(f"{b:<16}" for b in behaviours)).rstrip())
    for (target, steps), column in zip(results, columns, strict=True):
        cells = []
        for b in behaviours:
            mine = [s for s in steps if s.behaviour == b]
            good = sum(s.ok for s in mine)
            cells.append(f"{good}/{len(mine)} {'ok' if good == len(mine) else 'MISMATCH'}")
        echo((f"{column + ' ' + target.label:<{wide}}" + "".join(f"{c:<16}" for c in cells)).rstrip())


def _fmt(result: tuple[int, str]) -> str:
    if result[1] == "ok":
        return "2xx ok"
    return f"{result[0]} {result[1]}"
