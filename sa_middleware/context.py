"""What the middleware reads from a request (RequestInfo) and what the view sees (SAContext)."""

from __future__ import annotations

from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from .frozen import fast_init
from .records import storable_text

__all__ = ["VIEW_POLICIES_READ", "RequestInfo", "SAContext", "admitted"]

#: Set while an admitted request runs the app (in its task or thread, and the threads it copies its context to):
#: ``True`` when the middleware that admitted it applied the views' ``@policy`` (an adapter), ``False`` when it
#: applied the Guard's table alone (the core middleware); unset when no Guard decided the request. The adapters'
#: ``@policy`` wrappers read it, so a decorated view never runs without its policy.
VIEW_POLICIES_READ: ContextVar[bool | None] = ContextVar("sa_middleware_view_policies_read", default=None)


class admitted:  # lower case: used as a function, ``with admitted(True): ...``
    """Mark the code run inside as belonging to a request the Guard admitted (see :data:`VIEW_POLICIES_READ`)."""

    __slots__ = ("_token", "_value")

    def __init__(self, view_policies: bool) -> None:
        self._value = view_policies

    def __enter__(self) -> None:
        self._token = VIEW_POLICIES_READ.set(self._value)

    def __exit__(self, *exc: object) -> None:
        VIEW_POLICIES_READ.reset(self._token)


@fast_init
@dataclass(frozen=True, slots=True)
class RequestInfo:
    """A framework-neutral view of one request. ``headers`` keys are lower-case.

    ``path`` is the full path of the URL (what a DPoP proof names); ``app_path`` is the path relative to the
    application, the one the Guard's table is matched on: ASGI ``path`` minus ``root_path``, WSGI ``PATH_INFO``
    (``None``: the same as ``path``). ``scheme`` and ``host`` (the ``Host`` header, or the server's address) give
    the URI a DPoP proof must name; ``client_cert`` is the PEM of the TLS client certificate when the server
    reports one (for certificate-bound tokens, RFC 8705). ``session`` is a transport's own session id (MCP's
    ``Mcp-Session-Id``), the request's session when its token carries no ``sid`` claim.
    """

    method: str
    path: str
    headers: Mapping[str, str]
    client: str = ""
    websocket: bool = False
    scheme: str = "http"
    host: str = ""
    client_cert: str | None = None
    session: str | None = None
    app_path: str | None = None

    @property
    def user_agent(self) -> str:
        """The ``User-Agent`` header, at most 256 characters, a lone surrogate escaped (``\\ud800``): no store can
        write one, and a store failure must never stand in for a decision."""
        return storable_text(self.headers.get("user-agent", "")[:256])

    @property
    def route_path(self) -> str:
        """The path the Guard's table is matched on: :attr:`app_path`, else :attr:`path`."""
        return self.path if self.app_path is None else self.app_path


@fast_init
@dataclass(frozen=True, slots=True)
class SAContext:
    """The authorisation context of an admitted request, as the view sees it.

    ``principal`` is ``None`` on public routes. ``fencing_tokens`` maps each lock key to its fencing token, a number
    that strictly increases per key: pass it to your database so a write from an expired holder can be refused.
    Tokens are integers below 2**53 (JSON-safe) and never below the store's clock in microseconds since the epoch,
    so the per-key counter can be forgotten once the key is unused (Redis: a TTL of the lease plus a minute; SQLite:
    pruned) and the next token still exceeds every earlier one, as long as the store clock does not step back by
    more than that minute. Do not rely on consecutive values.
    """

    principal: str | None
    kind: str | None
    session_id: str | None
    claims: Mapping[str, Any] = field(default_factory=dict)
    ticket_id: str | None = None
    fencing_tokens: Mapping[str, int] = field(default_factory=dict)
    route: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
