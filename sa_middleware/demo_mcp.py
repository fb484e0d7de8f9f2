"""The demo's MCP target: ``examples/mcp_server.py`` served by uvicorn, agents calling its tools through the MCP SDK's
Streamable HTTP client, humans calling its HTTP API.

The player speaks in HTTP terms (``POST /payments/42/approve``); :class:`McpAgents` turns each non-human request into
the matching tool call in an MCP session of that token (opened on first use, kept open, closed at the end) and a
refused call's ``structuredContent`` back into (status, problem), so the one player plays every target. Requires the
``mcp`` extra.
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager, asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio.from_thread
import httpx2
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp_types import CallToolResult, Implementation

from .demo import Issuer, Target, Workbench, request, serve_asgi
from .errors import ConfigurationError
from .guard import Guard

__all__ = ["McpAgents", "connect", "mcp_target", "tool_for"]


@asynccontextmanager
async def connect(url: str, token: str, name: str = "sa-demo-agent") -> AsyncIterator[ClientSession]:
    """An initialised MCP client session to ``url`` (Streamable HTTP) authenticated with ``token``."""
    async with httpx2.AsyncClient(headers={"authorization": f"Bearer {token}"}, timeout=60) as http, \
            streamable_http_client(url, http_client=http) as (read, write), \
            ClientSession(read, write, client_info=Implementation(name=name, version="1.0")) as session:
        await session.initialize()
        yield session


def tool_for(method: str, path: str) -> tuple[str, dict[str, Any]]:
    """The workbench tool (and its arguments) that does what ``method path`` does over HTTP."""
    parts = urlsplit(path).path.strip("/").split("/")
    if (method, parts) == ("GET", ["whoami"]):
        return "whoami", {}
    if (method, parts) == ("POST", ["tickets"]):
        return "open_ticket", {}
    if method == "POST" and len(parts) == 3 and parts[0] == "payments" and parts[2] == "approve":
        return "approve_payment", {"payment_id": int(parts[1])}
    if method == "PUT" and len(parts) == 2 and parts[0] == "objects":
        return "update_object", {"object_id": int(parts[1])}
    raise ConfigurationError(f"no workbench tool does {method} {path}")


def result_of(result: CallToolResult) -> tuple[int, dict[str, Any]]:
    """A tool result as (status, body): a denial's problem and status, else 200 and the structured result."""
    body = dict(result.structured_content or {})
    if result.is_error:
        return int(body.get("status") or 500), body
    return 200, body


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    data: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return data


class McpAgents:
    """Non-human requests go to MCP tool calls (one MCP session per token); humans' go to plain HTTP."""

    def __init__(self, bench: Workbench, path: str = "/mcp") -> None:
        self.bench, self.path = bench, path
        self._portal_cm = anyio.from_thread.start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        self._open: dict[str, tuple[AbstractContextManager[ClientSession], ClientSession]] = {}
        self._lock = threading.Lock()

    def _session(self, base: str, token: str) -> ClientSession:
        with self._lock:
            if token not in self._open:
                cm = self._portal.wrap_async_context_manager(connect(base + self.path, token))
                self._open[token] = (cm, cm.__enter__())
            return self._open[token][1]

    def send(self, base: str, method: str, path: str, token: str | None) -> tuple[int, dict[str, Any]]:
        """One request of the player: an MCP tool call for an agent or service (or a delegated token)."""
        claims = _claims(token) if token else {}
        if token is None or (claims.get("sa_kind", "human") == "human" and "client_id" not in claims
                             and "act" not in claims):
            return request(base, method, path, token)
        tool, arguments = tool_for(method, path)
        session = self._session(base, token)
        try:
            return result_of(self._portal.call(session.call_tool, tool, arguments))
        finally:
            hold = parse_qs(urlsplit(path).query).get("hold")
            if hold:  # the ticket was released before the result was sent
                self.bench.gate(hold[0]).done.set()

    def close(self) -> None:
        """Close every MCP session (each ``DELETE``s its server session), then the event loop."""
        for cm, _ in reversed(list(self._open.values())):
            with contextlib.suppress(Exception):  # a session the server already ended
                cm.__exit__(None, None, None)
        self._open.clear()
        self._portal_cm.__exit__(None, None, None)


def mcp_target(root: Path, bench: Workbench, backend: Any, operator: Guard, issuer: Issuer) -> Iterator[Target]:
    """Serve ``examples/mcp_server.py`` with uvicorn (lifespan on: the MCP session manager runs in it)."""
    from .demo_examples import _module

    app = _module(root / "mcp_server.py", "sa_example_mcp").app
    base, stop = serve_asgi(bench.track_asgi(app), lifespan="on")
    agents = McpAgents(bench)

    def hold(base: str, method: str, path: str, token: str, principal: str) -> Any:
        return backend.hold(base, method, path, token, principal, send=agents.send)

    def stop_all(stop: Callable[[], None] = stop) -> None:
        agents.close()
        stop()
    yield Target("MCP (uvicorn)", "mcp", base, operator, issuer, hold, stop_all, agents.send)
