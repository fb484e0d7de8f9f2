"""Token reuse and sender-constrained tokens over real HTTP: uvicorn (ASGI) and werkzeug's threaded server (WSGI),
each with a fresh SQLite store file.

Requests are held inside the app at gates (``?hold=NAME``: the test waits on the gate's ``entered`` event); concurrent
clients start together at a ``threading.Barrier``; other client addresses are real (the client binds 127.0.0.2).
The mTLS tests run werkzeug and uvicorn over TLS with a throw-away CA.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import anyio.to_thread
import httpx
import pytest
from dpop_support import Authority, Holder, Issued
from support import Gates, Tracker

from sa_middleware import Guard, Policy
from sa_middleware.asgi import SessionAwareMiddleware
from sa_middleware.demo import DemoIssuer, serve_asgi, serve_wsgi
from sa_middleware.wsgi import SessionAwareWSGIMiddleware

WAIT = 15.0  # upper bound of every wait here; reached only when something is broken
POLICIES = {"GET /items": Policy(), "POST /items": Policy()}


class App(Gates):
    """ASGI and WSGI twins: answer with the caller's context; ``?hold=NAME`` parks the request at a gate and
    records the user agent that got in."""

    def __init__(self) -> None:
        super().__init__()
        self.inside: dict[str, str] = {}

    def _enter(self, hold: str | None, ua: str) -> None:
        if hold:
            self.inside[hold] = ua
            gate = self.gate(hold)
            gate.entered.set()
            assert gate.released.wait(WAIT), f"gate {hold} never released"

    @staticmethod
    def _body(ctx: Any) -> bytes:
        return json.dumps({"principal": ctx.principal, "session_id": ctx.session_id}).encode()

    async def asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        query = parse_qs(scope.get("query_string", b"").decode())
        ua = dict(scope["headers"]).get(b"user-agent", b"").decode()
        await anyio.to_thread.run_sync(self._enter, (query.get("hold") or [None])[0], ua)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": self._body(scope["sa_middleware"])})

    def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        query = parse_qs(environ.get("QUERY_STRING", ""))
        self._enter((query.get("hold") or [None])[0], environ.get("HTTP_USER_AGENT", ""))
        start_response("200 OK", [("content-type", "application/json")])
        return [self._body(environ["sa_middleware"])]


class Site:
    """The app behind the middleware on one server flavour; ``request`` returns once the middleware is done."""

    def __init__(self, flavour: str, guard: Guard, serve: Callable[[Any], tuple[str, Callable[[], None]]] | None = None,
                 ) -> None:
        self.guard, self.app = guard, App()
        if flavour == "asgi":
            self.tracker = Tracker(SessionAwareMiddleware(self.app.asgi, guard=guard))
            self.base, self._stop = (serve or serve_asgi)(self.tracker.asgi_app())
        else:
            self.tracker = Tracker(SessionAwareWSGIMiddleware(self.app.wsgi, guard=guard))
            self.base, self._stop = (serve or serve_wsgi)(self.tracker.wsgi)
        self._threads: list[threading.Thread] = []

    def request(self, method: str, path: str, token: str, *, scheme: str = "Bearer", ua: str = "client-a",
                local: str = "127.0.0.1", dpop: str | None = None, verify: ssl.SSLContext | None = None,
                ) -> httpx.Response:
        rid = uuid.uuid4().hex
        headers = {"authorization": f"{scheme} {token}", "user-agent": ua}
        if dpop is not None:
            headers["dpop"] = dpop
        sep = "&" if "?" in path else "?"
        transport = httpx.HTTPTransport(local_address=local, verify=verify or True)
        with httpx.Client(transport=transport, timeout=WAIT) as client:
            resp = client.request(method, f"{self.base}{path}{sep}rid={rid}", headers=headers)
        assert self.tracker.done(rid).wait(WAIT), f"the middleware never finished {path}"
        return resp

    def start(self, method: str, path: str, token: str, *, barrier: threading.Barrier | None = None,
              **options: Any) -> tuple[str, dict[str, httpx.Response], threading.Thread]:
        """Send a request parked at a fresh gate from a thread; returns (gate name, response box, thread)."""
        name, out = uuid.uuid4().hex[:10], {}
        sep = "&" if "?" in path else "?"

        def run() -> None:
            if barrier is not None:
                barrier.wait(WAIT)
            out["response"] = self.request(method, f"{path}{sep}hold={name}", token, **options)
        thread = threading.Thread(target=run, daemon=True)
        self._threads.append(thread)
        thread.start()
        return name, out, thread

    def hold(self, method: str, path: str, token: str, **options: Any) -> tuple[str, Callable[[], httpx.Response]]:
        """A request held inside the app; returns its gate name and a function that releases it (its response)."""
        name, out, thread = self.start(method, path, token, **options)
        self.settled(name, thread)
        assert self.app.gate(name).entered.is_set(), f"held request was refused: {out['response'].text}"

        def release() -> httpx.Response:
            self.app.gate(name).released.set()
            thread.join(WAIT)
            return out["response"]
        return name, release

    def settled(self, name: str, thread: threading.Thread) -> None:
        """Wait until the request is inside the app or has been answered (refused)."""
        gate = self.app.gate(name)
        deadline = time.monotonic() + WAIT
        while not gate.entered.wait(0.02) and thread.is_alive():
            assert time.monotonic() < deadline, "a request neither entered the app nor was answered"

    def close(self) -> None:
        self.app.release_all()
        for thread in self._threads:
            thread.join(WAIT)
        self._stop()
        self.guard.close()


@pytest.fixture(scope="module")
def issuer() -> DemoIssuer:
    return DemoIssuer()


def make_guard(issuer: DemoIssuer, db: Path, **options: Any) -> Guard:
    return Guard(store=f"sqlite:///{db}", keys=issuer.public_pem, algorithms=["RS256"], issuer=issuer.issuer,
                 audience=issuer.audience, policies=POLICIES, **options)


@pytest.fixture(params=["asgi", "wsgi"])
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def site(flavour: str, issuer: DemoIssuer, tmp_path: Path) -> Iterator[Site]:
    s = Site(flavour, make_guard(issuer, tmp_path / "reuse.db"))
    try:
        yield s
    finally:
        s.close()


def problem(resp: httpx.Response, code: str) -> dict[str, Any]:
    assert resp.status_code == 401, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = resp.json()
    assert body["code"] == code, body
    return body


def who() -> str:
    return f"u-{uuid.uuid4().hex[:8]}"


# -------------------------------------------------------------------------------------------------- concurrent reuse

def test_same_token_from_another_user_agent_while_in_flight(site: Site, issuer: DemoIssuer) -> None:
    token = issuer.token(who())
    _, release = site.hold("GET", "/items", token, ua="client-a")
    resp = site.request("GET", "/items", token, ua="client-b")
    problem(resp, "token_reuse")
    assert resp.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    assert token not in resp.text
    assert site.request("GET", "/items", token, ua="client-a").status_code == 200  # the holder itself: fine
    assert release().status_code == 200
    assert site.request("GET", "/items", token, ua="client-b").status_code == 200  # nothing in flight any more


def test_same_token_from_another_address_while_in_flight(site: Site, issuer: DemoIssuer) -> None:
    token = issuer.token(who())
    _, release = site.hold("GET", "/items", token, local="127.0.0.1")
    problem(site.request("GET", "/items", token, local="127.0.0.2"), "token_reuse")
    assert release().status_code == 200
    assert site.request("GET", "/items", token, local="127.0.0.2").status_code == 200


def test_racing_clients_only_one_identity_gets_in(site: Site, issuer: DemoIssuer) -> None:
    """Eight requests with one token, from two user agents, released together: whatever the interleaving, the
    requests inside the app are all of one client and every other one is refused with token_reuse."""
    token = issuer.token(who())
    barrier = threading.Barrier(8)
    started = [site.start("GET", "/items", token, barrier=barrier, ua=f"client-{'ab'[i % 2]}") for i in range(8)]
    for name, _, thread in started:
        site.settled(name, thread)
    inside = {site.app.inside[name] for name, _, _ in started if site.app.gate(name).entered.is_set()}
    refused = [out["response"] for name, out, _ in started if not site.app.gate(name).entered.is_set()]
    assert len(inside) == 1, inside
    assert len(refused) == 4
    for resp in refused:
        problem(resp, "token_reuse")
    site.app.release_all()
    for _, out, thread in started:
        thread.join(WAIT)
        assert "response" in out


# -------------------------------------------------------------------------------------------------- DPoP

def test_dpop_over_http(site: Site, issuer: DemoIssuer) -> None:
    """The proof's htu names the URI the client called: scheme and host reach the Guard from the real server."""
    mine, theirs = Holder("ES256"), Holder("EdDSA")
    token = issuer.token(who(), cnf={"jkt": mine.jkt})
    url = f"{site.base}/items"
    ok = site.request("GET", "/items", token, scheme="DPoP", dpop=mine.proof("GET", url, token))
    assert ok.status_code == 200, ok.text
    resp = site.request("GET", "/items", token, scheme="DPoP", dpop=theirs.proof("GET", url, token))
    problem(resp, "token_reuse")
    assert resp.headers["www-authenticate"].startswith('DPoP error="invalid_token"')
    assert 'algs="ES256' in resp.headers["www-authenticate"]
    resp = site.request("GET", "/items", token, scheme="DPoP")
    problem(resp, "invalid_token")
    assert resp.headers["www-authenticate"].startswith('DPoP error="invalid_dpop_proof"')
    other_port = url.replace(site.base.rsplit(":", 1)[1], "1")
    for proof in (mine.proof("GET", other_port, token), mine.proof("POST", url, token),
                  mine.proof("GET", url, token, iat=int(time.time()) - 3600)):
        resp = site.request("GET", "/items", token, scheme="DPoP", dpop=proof)
        problem(resp, "invalid_token")
        assert resp.headers["www-authenticate"].startswith('DPoP error="invalid_dpop_proof"')
    problem(site.request("GET", "/items", token, dpop=mine.proof("GET", url, token)), "invalid_token")  # as Bearer


def test_dpop_bound_token_in_flight_from_two_addresses(site: Site, issuer: DemoIssuer) -> None:
    """The key holder at two addresses at once (its key leaked too, or a proxy pool): still reuse."""
    mine = Holder()
    token = issuer.token(who(), cnf={"jkt": mine.jkt})
    url = f"{site.base}/items"
    _, release = site.hold("GET", "/items", token, scheme="DPoP", dpop=mine.proof("GET", url, token))
    problem(site.request("GET", "/items", token, scheme="DPoP", local="127.0.0.2",
                         dpop=mine.proof("GET", url, token)), "token_reuse")
    assert release().status_code == 200


# -------------------------------------------------------------------------------------------------- compromise

@pytest.mark.parametrize("report", [True, False])
def test_reuse_is_compromise_over_http(flavour: str, issuer: DemoIssuer, tmp_path: Path, report: bool) -> None:
    site = Site(flavour, make_guard(issuer, tmp_path / "compromise.db", reuse_is_compromise=report))
    try:
        sub = who()
        token, sibling = issuer.token(sub, sid=f"{sub}-1"), issuer.token(sub, sid=f"{sub}-2")
        assert site.request("GET", "/items", sibling, ua="client-s").status_code == 200
        _, release = site.hold("GET", "/items", token, ua="client-a")
        problem(site.request("GET", "/items", token, ua="client-b"), "token_reuse")
        assert release().status_code == 200  # already running: it finishes
        nxt = site.request("GET", "/items", token, ua="client-a")
        sib = site.request("GET", "/items", sibling, ua="client-s")
        if report:
            problem(nxt, "credential_compromised")
            problem(sib, "credential_compromised")
            assert {s.status for s in site.guard.sessions(sub)} == {"compromised"}
        else:
            assert (nxt.status_code, sib.status_code) == (200, 200)
            assert {s.status for s in site.guard.sessions(sub)} == {"active"}
    finally:
        site.close()


# -------------------------------------------------------------------------------------------------- mTLS

@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority(tmp_path_factory.mktemp("mtls"))


def serve_tls_wsgi(ctx: ssl.SSLContext) -> Callable[[Any], tuple[str, Callable[[], None]]]:
    def serve(app: Any) -> tuple[str, Callable[[], None]]:
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass

        server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=Quiet, ssl_context=ctx)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()

        def stop() -> None:
            server.shutdown()
            thread.join()
        return f"https://127.0.0.1:{server.server_port}", stop
    return serve


def serve_tls_asgi(ca: Authority, cert: Issued) -> Callable[[Any], tuple[str, Callable[[], None]]]:
    def serve(app: Any) -> tuple[str, Callable[[], None]]:
        import uvicorn

        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(app, log_level="warning", lifespan="off", ssl_certfile=str(cert.cert_file),
                                ssl_keyfile=str(cert.key_file), ssl_ca_certs=str(ca.cert_file),
                                ssl_cert_reqs=ssl.CERT_OPTIONAL)
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        ready = threading.Event()
        while not server.started and thread.is_alive():
            ready.wait(0.01)  # uvicorn has no started event to wait on
        assert server.started, "uvicorn did not start"

        def stop() -> None:
            server.should_exit = True
            thread.join()
            sock.close()
        return f"https://127.0.0.1:{sock.getsockname()[1]}", stop
    return serve


def test_certificate_bound_token_over_mtls_wsgi(issuer: DemoIssuer, ca: Authority, tmp_path: Path) -> None:
    """werkzeug reports the client certificate (SSL_CLIENT_CERT): the bound certificate is admitted, another is
    token_reuse, none is invalid_token."""
    mine, theirs = ca.issue("client-a"), ca.issue("client-b")
    serve = serve_tls_wsgi(ca.server_context(ca.issue("server", server=True)))
    site = Site("wsgi", make_guard(issuer, tmp_path / "mtls.db"), serve)
    try:
        token = issuer.token(who(), cnf={"x5t#S256": mine.x5t})
        ok = site.request("GET", "/items", token, verify=ca.client_context(mine))
        assert ok.status_code == 200, ok.text
        problem(site.request("GET", "/items", token, verify=ca.client_context(theirs)), "token_reuse")
        problem(site.request("GET", "/items", token, verify=ca.client_context(None)), "invalid_token")
        unbound = issuer.token(who())
        _, release = site.hold("GET", "/items", unbound, verify=ca.client_context(mine))
        problem(site.request("GET", "/items", unbound, verify=ca.client_context(theirs)), "token_reuse")
        assert release().status_code == 200
    finally:
        site.close()


def test_certificate_bound_token_fails_closed_without_the_tls_extension(issuer: DemoIssuer, ca: Authority,
                                                                         tmp_path: Path) -> None:
    """uvicorn verifies client certificates but does not report them to the app (no ASGI ``tls`` extension): a
    certificate-bound token is refused there, never admitted unchecked."""
    mine = ca.issue("client-c")
    site = Site("asgi", make_guard(issuer, tmp_path / "mtls-asgi.db"),
                serve_tls_asgi(ca, ca.issue("server-2", server=True)))
    try:
        token = issuer.token(who(), cnf={"x5t#S256": mine.x5t})
        body = problem(site.request("GET", "/items", token, verify=ca.client_context(mine)), "invalid_token")
        assert "none was presented" in body["detail"]
        assert site.request("GET", "/items", issuer.token(who()), verify=ca.client_context(mine)).status_code == 200
    finally:
        site.close()
