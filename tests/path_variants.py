"""Generated variants of a protected path, and the property every entry point keeps (hypothesis).

Two protected routes, each needing a scope and locking the object it acts on: ``POST /payments/{id:int}/approve``
(``payment:{id}``) and ``PUT /files/{name:path}`` (``file:{name}``). A variant is the canonical request changed by a
few of: a trailing slash, a doubled slash, a dot segment, a percent-encoded character, a character's case, a
``;param``, leading zeros, and a method-override header (the app behind the middleware honours it, the worst case).
The variant is decoded as a server decodes it (ASGI: ``unquote``; WSGI: the bytes as latin-1, PEP 3333).

The property, checked by :func:`check` for one response: never a 5xx; a 2xx only when the view ran, and the view
ran only when the Guard applied the route's policy: the token had the route's scope and the request held exactly
the lock key of the object the view acted on (the app's own identity of that object: the payment's number, the
file's normalised path). Anything else must be refused or not routed (4xx, or a router's redirect).
"""

from __future__ import annotations

import posixpath
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any
from urllib.parse import unquote, unquote_to_bytes

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from sa_middleware import Policy

CANONICAL = (("POST", "/payments/42/approve"), ("PUT", "/files/a/b.txt"))
SCOPES = "payments:approve files:write"
TABLE = {  # the Guard table of the core middleware and the table-only adapter apps
    "POST /payments/{id:int}/approve": Policy(scopes={"payments:approve"}, locks=["payment:{id}"]),
    "PUT /files/{name:path}": Policy(scopes={"files:write"}, locks=["file:{name}"]),
}
OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")

#: modest example counts keep the suite fast; every entry point runs the same generated requests
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _slashes(path: str) -> list[int]:
    return [i for i, c in enumerate(path) if c == "/"]


def _trailing(path: str, rnd: random.Random) -> str:
    return path + "/"


def _double(path: str, rnd: random.Random) -> str:
    i = rnd.choice(_slashes(path))
    return path[:i] + "/" + path[i:]


def _dot(path: str, rnd: random.Random) -> str:
    i = rnd.choice(_slashes(path))
    return path[:i] + rnd.choice(["/.", "/x/..", "/..", "/%2e", "/%2E%2E"]) + path[i:]


def _percent(path: str, rnd: random.Random) -> str:
    i = rnd.randrange(len(path))
    if path[i] == "%":
        return path
    code = f"{ord(path[i]):02X}"
    return path[:i] + "%" + (code if rnd.random() < 0.5 else code.lower()) + path[i + 1:]


def _case(path: str, rnd: random.Random) -> str:
    letters = [i for i, c in enumerate(path) if c.isalpha()]
    if not letters:
        return path
    i = rnd.choice(letters)
    return path[:i] + path[i].swapcase() + path[i + 1:]


def _params(path: str, rnd: random.Random) -> str:
    ends = [*_slashes(path)[1:], len(path)]
    i = rnd.choice(ends)
    return path[:i] + rnd.choice([";v=1", ";", ";jsessionid=x"]) + path[i:]


def _zeros(path: str, rnd: random.Random) -> str:
    return path.replace("42", "0" * rnd.randint(1, 3) + "42", 1)


OPS: dict[str, Callable[[str, random.Random], str]] = {
    "trailing": _trailing, "double": _double, "dot": _dot, "percent": _percent, "case": _case,
    "params": _params, "zeros": _zeros,
}


@dataclass(frozen=True)
class Variant:
    """One generated request: the method sent, the raw path (as on the wire), extra headers, and a root path."""

    method: str
    raw: str
    headers: Mapping[str, str] = field(default_factory=dict)
    root: str = ""
    root_in_path: bool = True  # ASGI: whether the server puts the root path in ``path`` (uvicorn does)

    @property
    def asgi_path(self) -> str:
        return unquote(self.raw)

    @property
    def wsgi_path(self) -> str:
        return unquote_to_bytes(self.raw).decode("latin-1")


@st.composite
def variants(draw: st.DrawFn, roots: Iterable[str] = ("",)) -> Variant:
    """A variant of one of the :data:`CANONICAL` requests, under one of ``roots``."""
    method, raw = draw(st.sampled_from(CANONICAL))
    rnd = random.Random(draw(st.integers(0, 2**32 - 1)))
    for op in draw(st.lists(st.sampled_from(sorted(OPS)), max_size=3)):
        raw = OPS[op](raw, rnd)
    headers: dict[str, str] = {}
    if draw(st.booleans()):  # a method override: another method on the wire, the canonical one in the header
        headers[draw(st.sampled_from(OVERRIDE_HEADERS))] = draw(st.sampled_from([method, method.lower()]))
        method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE"]))
    return Variant(method, raw, headers, draw(st.sampled_from(sorted(roots))), draw(st.booleans()))


def object_key(view: str, params: Mapping[str, Any]) -> str:
    """The lock key of the object the view acted on, by the app's own identity of that object."""
    if view == "payments":
        return f"payment:{int(params['id'])}"
    return "file:" + posixpath.normpath("/" + str(params["name"])).lstrip("/")


@dataclass
class Ran:
    """What a view saw: its name, its path parameters and the request's fencing tokens (lock key -> token)."""

    view: str
    params: dict[str, Any]
    fences: dict[str, int]


def check(variant: Variant, scoped: bool, status: int, ran: list[Ran]) -> None:
    """The property (see the module docstring) for one response to ``variant``; ``scoped``: the token had the
    routes' scopes; ``ran``: what the views recorded for this request."""
    assert status < 500, f"{variant}: {status}"
    if not ran:
        assert not 200 <= status < 300, f"{variant}: {status} but no view ran"
        return
    assert 200 <= status < 300, f"{variant}: the view ran, answered {status}"
    assert len(ran) == 1
    assert scoped, f"{variant}: the view {ran[0].view} ran for a token without its scope: the policy was skipped"
    assert set(ran[0].fences) == {object_key(ran[0].view, ran[0].params)}, f"{variant}: {ran[0]}"


# -- in-process drivers: what a server hands the app ---------------------------------------------------------------

def asgi_scope(variant: Variant, token: str) -> dict[str, Any]:
    path = variant.asgi_path
    headers = [(b"host", b"testserver"), (b"authorization", f"Bearer {token}".encode())]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in variant.headers.items()]
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": variant.method,
            "scheme": "http", "path": variant.root + path if variant.root_in_path else path,
            "raw_path": (variant.root + variant.raw).encode("ascii"), "root_path": variant.root,
            "query_string": b"", "headers": headers, "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}


async def call_asgi(app: Callable[..., Awaitable[None]], scope: dict[str, Any]) -> int:
    """Run one request through an ASGI app; returns the response status."""
    import anyio

    sent: list[dict[str, Any]] = []
    done = anyio.Event()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    await app(scope, receive, send)
    done.set()
    return int(next(m["status"] for m in sent if m["type"] == "http.response.start"))


def wsgi_environ(variant: Variant, token: str) -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": variant.method, "SCRIPT_NAME": variant.root, "PATH_INFO": variant.wsgi_path,
        "QUERY_STRING": "", "SERVER_NAME": "testserver", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "testserver", "HTTP_AUTHORIZATION": f"Bearer {token}",
        "wsgi.url_scheme": "http", "wsgi.input": BytesIO(b""), "wsgi.errors": BytesIO(), "wsgi.version": (1, 0),
        "wsgi.multithread": False, "wsgi.multiprocess": False, "wsgi.run_once": False, "CONTENT_LENGTH": "0",
    }
    for name, value in variant.headers.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    return environ


def call_wsgi(app: Callable[..., Iterable[bytes]], environ: dict[str, Any]) -> int:
    """Run one request through a WSGI app, reading and closing the response; returns the status."""
    status: list[str] = []

    def start_response(line: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
        status.append(line)
        return lambda data: None

    result = app(environ, start_response)
    try:
        for _ in result:
            pass
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return int(status[-1].split()[0])


# -- apps that honour method overrides (the worst case for the Guard) ----------------------------------------------

def override_asgi(app: Callable[..., Awaitable[None]]) -> Callable[..., Awaitable[None]]:
    async def honour(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name.decode("latin-1").lower() in OVERRIDE_HEADERS:
                    scope = {**scope, "method": value.decode("latin-1").upper()}
        await app(scope, receive, send)
    return honour


def override_wsgi(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    def honour(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        for name in OVERRIDE_HEADERS:
            value = environ.get("HTTP_" + name.upper().replace("-", "_"))
            if value:
                environ["REQUEST_METHOD"] = value.upper()
        return app(environ, start_response)
    return honour
