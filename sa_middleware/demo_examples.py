"""The demo's second half: the example apps of ``examples/`` played like the built-in workbench.

Each example (Starlette, FastAPI, Flask, and Django under WSGI and under ASGI) is imported in this process with
``SA_STORE``, ``SA_DEV_KEY`` and ``WORKBENCH_BACKEND`` pointing at throw-away files and at a backend the demo serves,
then served on a real port (uvicorn for ASGI, werkzeug's threaded server for WSGI). The examples call that backend,
their "system of record", before they answer; the demo holds a request in flight by holding its backend call, so the
examples carry no demo code at all.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .demo import _GATE_TIMEOUT, SendRequest, Target, Workbench, request, serve_asgi, serve_wsgi
from .devkeys import DEV_AUDIENCE, DEV_ISSUER, DevKey, dev_key
from .errors import ConfigurationError
from .guard import Guard
from .wsgi import StartResponse

__all__ = ["Backend", "example_targets"]


class Backend:
    """The examples' system of record: answers every call at once, except a call armed by ``hold`` (the next call
    for that resource by that principal), which waits until the player releases it."""

    def __init__(self, bench: Workbench) -> None:
        self.bench = bench
        self._armed: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def wsgi(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        resource = environ.get("PATH_INFO", "/").strip("/")
        try:
            size = int(environ.get("CONTENT_LENGTH") or 0)
            call = json.loads(environ["wsgi.input"].read(size) or b"{}")
        except ValueError:
            call = {}
        with self._lock:
            name = self._armed.pop((resource, str(call.get("principal"))), None)
        if name is not None:
            gate = self.bench.gate(name)
            gate.entered.set()
            gate.released.wait(_GATE_TIMEOUT)
        start_response("200 OK", [("content-type", "application/json")])
        return [b'{"recorded": true}']

    def hold(self, base: str, method: str, path: str, token: str, principal: str,
             send: SendRequest = request) -> _BackendHeld:
        """Start ``method path`` as ``principal`` (with ``send``); it stays in flight (in its backend call) until
        released."""
        name = uuid.uuid4().hex[:8]
        with self._lock:
            self._armed[(path.strip("/").split("/")[0], principal)] = name
        return _BackendHeld(self.bench, base, method, path, token, name, send)


class _BackendHeld:
    def __init__(self, bench: Workbench, base: str, method: str, path: str, token: str, name: str,
                 send: SendRequest = request) -> None:
        self._send = send
        self.gate = bench.gate(name)
        self.result: tuple[int, dict[str, Any]] = (0, {})
        sep = "&" if "?" in path else "?"
        self._thread = threading.Thread(target=self._run, args=(base, method, f"{path}{sep}hold={name}", token))
        self._thread.start()

    def _run(self, base: str, method: str, path: str, token: str) -> None:
        self.result = self._send(base, method, path, token)

    def wait_entered(self) -> bool:
        while not self.gate.entered.wait(0.05):
            if not self._thread.is_alive():  # refused, or answered without calling the backend
                return False
        return True

    def release(self) -> tuple[int, dict[str, Any]]:
        self.gate.released.set()
        self._thread.join(_GATE_TIMEOUT)
        self.gate.done.wait(_GATE_TIMEOUT)  # set by the tracker once the middleware has released the ticket
        return self.result


class _DevIssuer:
    def __init__(self, key: DevKey) -> None:
        self.key = key

    def token(self, sub: str, **claims: Any) -> str:
        return self.key.mint(sub, **claims)


def _module(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigurationError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _django(root: Path, entry: str) -> Any:
    project = str(root / "django_project")
    if project not in sys.path:
        sys.path.insert(0, project)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "workbench.settings")
    return importlib.import_module(f"workbench.{entry}").application


# label, column heading, server flavour, loader(examples directory) -> app
EXAMPLES: list[tuple[str, str, str, Callable[[Path], Any]]] = [
    ("Starlette (uvicorn)", "starlette", "asgi",
     lambda root: _module(root / "starlette_app.py", "sa_example_starlette").app),
    ("FastAPI (uvicorn)", "fastapi", "asgi", lambda root: _module(root / "fastapi_app.py", "sa_example_fastapi").app),
    ("Flask (werkzeug)", "flask", "wsgi", lambda root: _module(root / "flask_app.py", "sa_example_flask").app),
    ("Django WSGI (werkzeug)", "django-wsgi", "wsgi", lambda root: _django(root, "wsgi")),
    ("Django ASGI (uvicorn)", "django-asgi", "asgi", lambda root: _django(root, "asgi")),
]


def _mcp_target(root: Path, bench: Workbench, backend: Backend, operator: Guard, key: DevKey,
                echo: Callable[[str], None]) -> Iterator[Target]:
    """The MCP example (``mcp_server.py``): agents through a real MCP client, humans through its HTTP API."""
    try:
        from .demo_mcp import mcp_target
    except ImportError as exc:
        echo(f"MCP (uvicorn): {exc.name} is not installed (pip install 'sa-middleware[mcp]'); skipped")
        return
    yield from mcp_target(root, bench, backend, operator, _DevIssuer(key))


def example_targets(directory: str, tmp: str, echo: Callable[[str], None]) -> Iterator[Target]:
    """Serve each example app in turn (one shared throw-away store and key) and yield it as a demo target."""
    root = Path(directory)
    if not (root / "starlette_app.py").is_file():
        raise ConfigurationError(f"{directory!r} is not the examples directory (no starlette_app.py)")
    key = dev_key(Path(tmp) / "dev-key.pem", announce=False)
    store = f"sqlite:///{Path(tmp) / 'examples.db'}"
    bench = Workbench()
    backend = Backend(bench)
    backend_base, backend_stop = serve_wsgi(backend.wsgi)
    env = {"SA_STORE": store, "SA_DEV_KEY": str(key.path), "WORKBENCH_BACKEND": backend_base}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    operator = Guard(store=store, keys=key.public_pem, algorithms=["RS256"], issuer=DEV_ISSUER, audience=DEV_AUDIENCE)
    try:
        for label, short, flavour, load in EXAMPLES:
            try:
                app = load(root)
            except ImportError as exc:
                echo(f"{label}: {exc.name} is not installed (pip install 'sa-middleware[dev]'); skipped")
                continue
            if flavour == "asgi":
                base, stop = serve_asgi(bench.track_asgi(app))
            else:
                base, stop = serve_wsgi(bench.track_wsgi(app))
            yield Target(label, short, base, operator, _DevIssuer(key), backend.hold, stop)
        yield from _mcp_target(root, bench, backend, operator, key, echo)
    finally:
        backend_stop()
        operator.close()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
