"""Plain helpers shared by the test modules (fixtures live in ``conftest.py``).

``tests/`` has no ``__init__.py``, so pytest's default import mode puts it on ``sys.path``: the modules directly
under ``tests/`` and those of the ``e2e`` package alike import this as ``support``.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from sa_middleware import Guard, Policy
from sa_middleware.demo import DemoIssuer
from sa_middleware.policy import EffectivePolicy
from sa_middleware.records import Admission
from sa_middleware.wsgi import AfterClose

_POLICY_FIELDS = frozenset(f.name for f in dataclasses.fields(EffectivePolicy)) - {"locks"}


def admission_of(**values: Any) -> Admission:
    """An ``Admission`` from flat keyword arguments: the ``EffectivePolicy`` fields among them (``max_sessions``,
    ``tags``...) make its policy; ``locks`` are the rendered ``LockRequest`` keys."""
    policy = {name: values.pop(name) for name in list(values) if name in _POLICY_FIELDS}
    return Admission(**values, policy=EffectivePolicy(**policy))


WAIT = 10.0  # upper bound of every wait in the served helpers; reached only when something is broken

# the routes of the hand-written apps of test_asgi.py and test_wsgi.py (WSGI never asks for the WEBSOCKET one)
POLICIES = {
    "GET /public": Policy(public=True),
    "GET /stream/{id}": Policy(exclusive=True, locks=["stream:{id}"]),
    "GET /events/{id}": Policy(exclusive=True, locks=["events:{id}"]),
    "GET /boom/{id}": Policy(exclusive=True, locks=["boom:{id}"]),
    "GET /boom-mid/{id}": Policy(exclusive=True, locks=["boom:{id}"]),
    "POST /exclusive": Policy(exclusive=True),
    "GET /docs/{id}": Policy(locks=["doc:{id}"]),
    "GET /slot": Policy(max_in_flight=1),
    "GET /open": Policy(fail_open=True),
    "WEBSOCKET /ws/{room}": Policy(locks=["room:{room}"]),
}


def make_guard(issuer: DemoIssuer, store: Any, **options: Any) -> Guard:
    """A Guard over ``store`` that trusts ``issuer``, with the :data:`POLICIES` routes."""
    return Guard(store=store, keys=issuer.public_pem, algorithms=["RS256"], issuer=issuer.issuer,
                 audience=issuer.audience, policies=POLICIES, **options)


def sub() -> str:
    """A fresh principal name."""
    return f"u-{uuid.uuid4().hex[:8]}"


JSON_SAFE = 2**53 - 1  # the largest integer a JSON (IEEE double) reader keeps exact


def assert_fences(actual: Mapping[str, int], keys: Iterable[str], after: Mapping[str, int] | None = None) -> None:
    """``actual`` (a context's ``fencing_tokens``) holds exactly the lock ``keys``, each token an int in
    ``1..2**53-1``; with ``after`` (an earlier holder's tokens), each token is strictly greater than that holder's
    token of the same key. Exact values are not asserted: a token is ``max(last + 1, store time in microseconds)``."""
    expected = set(keys)
    assert set(actual) == expected, f"fenced keys {sorted(actual)} != {sorted(expected)}"
    for key, token in actual.items():
        assert type(token) is int and 0 < token <= JSON_SAFE, f"fencing token of {key!r}: {token!r}"
        if after is not None:
            assert key in after, f"no earlier fencing token of {key!r} in {dict(after)}"
            assert token > after[key], f"fencing token of {key!r}: {token} not above the earlier {after[key]}"


# -- gates, and knowing when the middleware has finished a request -------------------------------------------------

class Gate:
    def __init__(self) -> None:
        self.entered = threading.Event()
        self.released = threading.Event()


class Gates:
    """The ``?hold=NAME`` gates of a hand-written app: one :class:`Gate` a name."""

    def __init__(self) -> None:
        self._gates: dict[str, Gate] = {}
        self._lock = threading.Lock()

    def gate(self, name: str) -> Gate:
        with self._lock:
            return self._gates.setdefault(name, Gate())

    def release_all(self) -> None:
        with self._lock:
            for gate in self._gates.values():
                gate.released.set()


class Tracker:
    """Wraps the middleware from outside: ``done(rid)`` is set when it has finished a request (``?rid=ID``).

    ASGI: when the middleware returned (so it has released the ticket). WSGI: when the server closed the response
    iterable (the middleware inside has released the ticket by then), or when the call raised. The middleware
    releases a ticket *after* the last body chunk is sent, so a client that got its response may race the release
    with its next request; waiting for this signal after a response makes each request see the state its
    predecessors left behind.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self._done: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def done(self, rid: str) -> threading.Event:
        with self._lock:
            return self._done.setdefault(rid, threading.Event())

    def _rid(self, query: str) -> str | None:
        return (parse_qs(query).get("rid") or [None])[0]

    async def asgi(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        rid = self._rid(scope.get("query_string", b"").decode("latin-1")) if scope["type"] == "http" else None
        try:
            await self.app(scope, receive, send)
        finally:
            if rid:
                self.done(rid).set()

    def asgi_app(self) -> Callable[[dict[str, Any], Any, Any], Awaitable[None]]:
        """:meth:`asgi` as a plain function, which uvicorn serves as ASGI 3 (a bound method it takes for ASGI 2)."""
        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            await self.asgi(scope, receive, send)
        return app

    def wsgi(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        rid = self._rid(environ.get("QUERY_STRING", ""))
        try:
            result = self.app(environ, start_response)
        except BaseException:
            if rid:
                self.done(rid).set()
            raise
        return AfterClose(result, self.done(rid).set if rid else lambda: None)


# -- a hand-written app behind the middleware on a real server -----------------------------------------------------

class _GatedApp(Protocol):
    records: dict[str, dict[str, Any]]

    def gate(self, name: str) -> Gate: ...

    def release_all(self) -> None: ...


App = TypeVar("App", bound=_GatedApp)


class Served(Generic[App]):
    """``app`` behind the middleware (wrapped by ``finished``), served at ``base`` until :meth:`close`."""

    def __init__(self, guard: Guard, app: App, finished: Tracker, served: tuple[str, Callable[[], None]]) -> None:
        self.guard = guard
        self.app = app
        self.finished = finished
        self.base, self._stop = served
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Served[App]:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def url(self, path: str, rid: str | None = None) -> str:
        if rid:
            path += ("&" if "?" in path else "?") + f"rid={rid}"
        return self.base + path

    def request(self, method: str, path: str, token: str | None = None, *, rid: str | None = None,
                headers: dict[str, str] | None = None) -> httpx.Response:
        """One request; with ``rid``, returns only once the middleware has finished with it."""
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["authorization"] = f"Bearer {token}"
        resp = httpx.request(method, self.url(path, rid), headers=all_headers, timeout=WAIT)
        if rid:
            assert self.finished.done(rid).wait(WAIT), f"the middleware never finished {path}"
        return resp

    def hold(self, method: str, path: str, token: str) -> Gate:
        """Start a request parked in the app (``?hold=``); returns its gate once it is inside the app."""
        name = uuid.uuid4().hex[:10]
        gate = self.app.gate(name)
        out: dict[str, httpx.Response] = {}
        sep = "&" if "?" in path else "?"

        def run() -> None:
            out["response"] = self.request(method, f"{path}{sep}hold={name}", token, rid=uuid.uuid4().hex)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self._threads.append(thread)
        for _ in range(int(WAIT / 0.05)):
            if gate.entered.wait(0.05):
                return gate
            if not thread.is_alive():
                pytest.fail(f"held request was not admitted: {out.get('response') and out['response'].text}")
        pytest.fail("held request never entered the app")

    @contextmanager
    def stream(self, path: str, token: str) -> Iterator[tuple[httpx.Response, Gate, str]]:
        """A streamed GET of ``path`` that the app parks at a fresh gate (``?hold=``) after its first chunk;
        yields the open response, that gate and the request's ``rid``."""
        name, rid = uuid.uuid4().hex[:8], uuid.uuid4().hex
        gate = self.app.gate(name)
        with httpx.stream("GET", self.url(f"{path}?hold={name}", rid),
                          headers={"authorization": f"Bearer {token}"}, timeout=WAIT) as resp:
            yield resp, gate, rid

    @contextmanager
    def raw_stream(self, target: str, token: str) -> Iterator[bytes]:
        """A raw HTTP/1.1 GET of ``target`` on a socket of its own, read up to the first chunk (``b"first"``);
        yields what was read, then closes the socket: the client goes away mid-stream."""
        parts = urlsplit(self.base)
        assert parts.hostname is not None and parts.port is not None
        sock = socket.create_connection((parts.hostname, parts.port), timeout=WAIT)
        try:
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {parts.hostname}\r\n"
                         f"Authorization: Bearer {token}\r\n\r\n".encode())
            received = b""
            while b"first" not in received:
                data = sock.recv(4096)
                assert data, f"connection closed before the first chunk: {received!r}"
                received += data
            yield received
        finally:
            sock.close()

    def assert_released(self, token: str) -> None:
        """No lock is held any more, and the principal of ``token`` may take an exclusive action again."""
        assert self.guard.locks() == []
        assert self.request("POST", "/exclusive", token, rid=uuid.uuid4().hex).status_code == 200

    def close(self) -> None:
        self.app.release_all()
        for thread in self._threads:
            thread.join(WAIT)
        self._stop()


def problem(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Assert ``resp`` is the problem+json denial ``status`` / ``code``; returns its body."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = resp.json()
    assert body["code"] == code
    assert body["status"] == status
    assert body["type"] and body["title"] and body["detail"]
    if status in (409, 423, 429, 503):
        assert int(resp.headers["retry-after"]) >= 1
        assert "www-authenticate" not in resp.headers
    else:
        assert "retry-after" not in resp.headers
    return body


def unreachable_jwks_url() -> str:
    """A JWKS URL on a loopback port nothing listens on: the identity provider is down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}/jwks.json"
