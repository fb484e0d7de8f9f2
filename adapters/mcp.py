"""MCP adapter: per-tool session-aware authorisation for a server built with the official MCP Python SDK
(``mcp`` 2.x, :class:`mcp.server.mcpserver.MCPServer`) served over Streamable HTTP.

::

    from mcp.server.auth.settings import AuthSettings
    from mcp.server.mcpserver import MCPServer
    from sa_middleware.adapters.mcp import GuardTokenVerifier, policy, sa_context, streamable_http_app

    guard = Guard(..., policies={"TOOL open_ticket": Policy(tags={"tickets"}, raises_risk=1)})
    server = MCPServer("payments", token_verifier=GuardTokenVerifier(guard),
                       auth=AuthSettings(issuer_url=IDP, resource_server_url="https://api.example/mcp",
                                         validate_token_resource=False))

    @server.tool()
    @policy(exclusive=True, max_risk=0, locks=["payment:{payment_id}"], scopes={"payments:approve"})
    async def approve_payment(payment_id: str) -> str:
        fence = sa_context().fencing_tokens[f"payment:{payment_id}"]
        ...

    app = streamable_http_app(server, guard)        # checks every policy now; serve it with uvicorn

- **Identity**: :class:`GuardTokenVerifier` verifies bearer tokens with the Guard's own verifier, so the SDK keeps
  answering a missing or bad token with HTTP 401, ``WWW-Authenticate: Bearer ... resource_metadata=...`` and its
  RFC 9728 metadata document. It reports the token's ``client_id`` (``azp``, else ``sub``), ``iss`` and ``sub``, so
  the SDK refuses an MCP session id presented with another principal's token (404, as for an unknown session), and
  its scopes as the Guard reads them (``scope_claims``). When the signing keys cannot be fetched, the app of
  :func:`streamable_http_app` answers 503 ``keys_unavailable`` with ``Retry-After`` instead of the SDK's 401.
- **One admission per tool call** (and per ``prompts/get`` and ``resources/read``): decided before the tool runs,
  against the tool's ``@policy``, then the Guard's table entry ``"TOOL <name>"`` (``"PROMPT <name>"``,
  ``"RESOURCE <uri or uri template>"``), then ``default_policy``. Lock templates are filled from the call's
  arguments (a resource template's URI variables), checked at start-up against the tool's parameters. The ticket
  is held while the tool runs (its progress notifications included) and released on every exit path (result,
  exception, ``notifications/cancelled``, client gone), just before the result is written, so the agent's next
  call never meets its own finished one.
- **Sessions**: a token without ``sid`` gets the MCP session as its session (``"mcp:<Mcp-Session-Id>"``, only
  where the SDK's stateful session manager has checked that id), so ``max_sessions`` counts MCP sessions; a
  client ending its MCP session (``DELETE``) ends that session in the store. The session records the client's
  ``initialize`` name and version as its user agent.
- **Denials** are tool results with ``isError: true`` (the MCP specification's channel for errors the model should
  see and act on), whose ``structuredContent`` is the same problem object as the HTTP denial (``type``, ``title``,
  ``status``, ``detail``, ``code``) plus ``retry_after`` (seconds) and ``www_authenticate`` when HTTP would send
  those headers. A refused ``prompts/get`` or ``resources/read`` (whose results have no ``isError``) is a JSON-RPC
  error :data:`DENIED` with the problem as its ``data``.
"""

from __future__ import annotations

import contextvars
import difflib
import json
import logging
from collections.abc import Mapping
from typing import Any

import anyio
from mcp.server.auth.provider import AccessToken
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult, TextContent
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from starlette.applications import Starlette
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sa_middleware.asgi import app_path
from sa_middleware.claims import scopes_of
from sa_middleware.context import RequestInfo, SAContext, admitted
from sa_middleware.denials import Denial
from sa_middleware.errors import ConfigurationError, InvalidRequest, InvalidToken, KeysUnavailable
from sa_middleware.guard import Guard
from sa_middleware.policy import Policy, lock_fields
from sa_middleware.responses import denial_response

from ._common import policy, policy_of, serve_targets, view_name

__all__ = ["DENIED", "GuardTokenVerifier", "SessionAwareMCP", "policy", "sa_context", "streamable_http_app"]

log = logging.getLogger("sa_middleware")

#: the JSON-RPC error code of a refused ``prompts/get`` or ``resources/read`` (implementation-defined server error
#: range)
DENIED = -32003
_SESSION_PREFIX = "mcp:"
_MAX_ARGUMENT = 256
_LOCKABLE = ("string", "integer")
_CURRENT: contextvars.ContextVar[SAContext | None] = contextvars.ContextVar("sa_middleware_mcp", default=None)
#: set while :class:`_KeysOutage` serves a request: the verifier may raise KeysUnavailable for it to answer
_ANSWERS_OUTAGE: contextvars.ContextVar[bool] = contextvars.ContextVar("sa_middleware_mcp_outage", default=False)


def sa_context(ctx: object | None = None) -> SAContext:
    """The :class:`~sa_middleware.SAContext` of the tool call (prompt, resource read) running now: principal, kind,
    session, claims, ticket and ``fencing_tokens``. ``ctx`` (the tool's MCP ``Context``) may be passed for readability.

    Raises ``RuntimeError`` outside an admitted call (the adapter is not installed on this server).
    """
    context = _CURRENT.get()
    if context is None:
        raise RuntimeError("no sa-middleware context for this call: build the app with "
                           "sa_middleware.adapters.mcp.streamable_http_app(server, guard)")
    return context


class GuardTokenVerifier:
    """The MCP SDK's ``TokenVerifier``, backed by the Guard's token verification (keys, algorithms, issuer,
    audience, lifetime). ``resource`` is reported as the token's RFC 8707 resource when its ``aud`` names it."""

    def __init__(self, guard: Guard, *, resource: str | None = None) -> None:
        if not isinstance(guard, Guard):
            raise TypeError("GuardTokenVerifier needs a Guard")
        self.guard = guard
        self.resource = resource

    async def verify_token(self, token: str) -> AccessToken | None:
        """An ``AccessToken`` for a token that passes every check of the Guard's verifier, else ``None``."""
        try:
            verified = await self.guard.verifier.averify(token)
        except KeysUnavailable:
            if _ANSWERS_OUTAGE.get():  # the token may be good: streamable_http_app answers 503 keys_unavailable
                raise
            return None
        except InvalidToken:
            return None
        claims = verified.claims
        sub = claims.get("sub")
        client_id = claims.get("client_id", claims.get("azp", sub))
        if not isinstance(sub, str) or not isinstance(client_id, str):
            return None
        scopes = sorted(scopes_of(claims, self.guard.scope_claims))  # the Guard's scope claims (scp, roles...)
        aud = claims.get("aud")
        audiences = [aud] if isinstance(aud, str) else [a for a in aud if isinstance(a, str)] \
            if isinstance(aud, list) else []
        resource = self.resource if self.resource in audiences else (audiences[0] if audiences else None)
        iss = claims.get("iss")
        return AccessToken(token=token, client_id=client_id, scopes=scopes, expires_at=int(verified.expires_at),
                           resource=resource, subject=sub, claims={"iss": iss} if isinstance(iss, str) else {})


class _Target:
    """A guarded tool or prompt: its function's policy and the schema type of each lock parameter."""

    def __init__(self, key: str, policy: Policy | None, types: Mapping[str, str]) -> None:
        self.key, self.policy, self.types = key, policy, dict(types)


def _problem(denial: Denial, guard: Guard) -> dict[str, Any]:
    """The HTTP denial's problem object, with its ``Retry-After`` and ``WWW-Authenticate`` headers as members."""
    _, headers, body = denial_response(denial, guard.realm, guard.retry_after)
    problem: dict[str, Any] = json.loads(body)
    for name, value in headers:
        if name == "retry-after":
            problem["retry_after"] = int(value)
        elif name == "www-authenticate":
            problem["www_authenticate"] = value
    return problem


def _text(problem: Mapping[str, Any]) -> str:
    text = f"{problem['title']} ({problem['code']}): {problem['detail']}"
    if "retry_after" in problem:
        text += f" Retry after {problem['retry_after']} s."
    return text


class SessionAwareMCP:
    """Installs per-call admission on an ``MCPServer`` (see the module docstring). :func:`streamable_http_app` is
    the usual entry point; build this directly to serve the app some other way."""

    def __init__(self, server: MCPServer[Any], guard: Guard) -> None:
        if not isinstance(guard, Guard):
            raise TypeError("SessionAwareMCP needs guard=Guard(...)")
        if not isinstance(server, MCPServer):
            raise TypeError("SessionAwareMCP needs an mcp.server.mcpserver.MCPServer")
        if any(isinstance(m, SessionAwareMCP) for m in server.middleware):
            raise ConfigurationError("this MCP server is already guarded (SessionAwareMCP installed twice)")
        self.server, self.guard = server, guard
        self._targets: dict[str, _Target] = {}
        self.check()
        server.middleware.append(self)
        serve_targets(guard.routes)

    # -- start-up --------------------------------------------------------------------------------------------

    def _tools(self) -> dict[str, tuple[object, dict[str, str]]]:
        """Every tool, prompt, resource and resource template of the server: its function and the schema type of
        each of its parameters (a template's URI variables are strings)."""
        found: dict[str, tuple[object, dict[str, str]]] = {}
        for tool in self.server._tool_manager.list_tools():
            properties = tool.parameters.get("properties") or {}
            types = {name: str(spec.get("type")) for name, spec in properties.items() if isinstance(spec, dict)}
            found[f"TOOL {tool.name}"] = (tool.fn, types)
        for prompt in self.server._prompt_manager.list_prompts():
            found[f"PROMPT {prompt.name}"] = (prompt.fn, {a.name: "string" for a in prompt.arguments or ()})
        resources = self.server._resource_manager
        for resource in resources.list_resources():
            found[f"RESOURCE {resource.uri}"] = (getattr(resource, "fn", None), {})
        for template in resources.list_templates():
            names = template.parsed_template.variable_names
            found[f"RESOURCE {template.uri_template}"] = (template.fn, dict.fromkeys(names, "string"))
        return found

    def _resource(self, uri: str) -> tuple[str, dict[str, Any]] | None:
        """The key and URI variables of the resource ``uri`` reads, as the SDK finds it (concrete resources
        first, then templates in order); ``None`` when the SDK will answer it with an error."""
        resources = self.server._resource_manager
        if any(str(r.uri) == uri for r in resources.list_resources()):
            return f"RESOURCE {uri}", {}
        for template in resources.list_templates():
            try:
                variables = template.matches(uri)
            except ValueError:  # refused by the SDK's resource security policy: its "unknown resource"
                return None
            if variables is not None:
                return f"RESOURCE {template.uri_template}", dict(variables)
        return None

    def check(self) -> None:
        """Raise :class:`ConfigurationError` if a ``TOOL``/``PROMPT`` table key names nothing on the server, or a
        lock template names a parameter its tool does not have (or one that is not a string or an integer)."""
        found = self._tools()
        for key in self.guard.routes.targets:
            if key not in found:
                near = difflib.get_close_matches(key, list(found), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ConfigurationError(f"policies: {key!r} names nothing on this MCP server{hint}")
        targets = {}
        for key, (fn, types) in found.items():
            targets[key] = self._target(key, fn, types)
        self._targets = targets

    def _target(self, key: str, fn: object, types: Mapping[str, str]) -> _Target:
        own = policy_of(fn) if fn is not None else None
        where = f"{key} ({view_name(fn)})"
        if own is not None:
            own.validate(where)
        effective = self.guard.routes.target(key, own, None).policy
        lockable: dict[str, str] = {}
        for template in effective.locks:
            for name in lock_fields(template):
                if name not in types:
                    raise ConfigurationError(f"{where}: lock {template!r} uses {{{name}}}, not a parameter of it")
                if types[name] not in _LOCKABLE:
                    raise ConfigurationError(f"{where}: lock {template!r} uses {{{name}}}, which must be declared "
                                             f"as a str or an int (it is {types[name]!r})")
                lockable[name] = types[name]
        return _Target(key, own, lockable)

    def _lookup(self, key: str) -> _Target | None:
        """The target for ``key``; a tool added after start-up is checked on its first call."""
        target = self._targets.get(key)
        if target is None:
            found = self._tools().get(key)
            if found is not None:
                target = self._targets[key] = self._target(key, *found)
        return target

    # -- each call -------------------------------------------------------------------------------------------

    def _identify(self, ctx: ServerRequestContext[Any, Any]) -> tuple[str, str, dict[str, Any]] | None:
        """(kind, key, arguments) of a guarded request; ``None`` for anything else, and for a malformed or
        unknown one (the SDK answers those with its own error)."""
        if ctx.request_id is None:
            return None
        params = ctx.params or {}
        if ctx.method == "resources/read":
            uri = params.get("uri")
            found = self._resource(uri) if isinstance(uri, str) else None
            return ("RESOURCE", *found) if found is not None else None
        kind = {"tools/call": "TOOL", "prompts/get": "PROMPT"}.get(ctx.method)
        name = params.get("name")
        arguments = params.get("arguments") or {}
        if kind is None or not isinstance(name, str) or not isinstance(arguments, dict):
            return None
        return kind, f"{kind} {name}", arguments

    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        found = self._identify(ctx)
        if found is None:
            return await call_next(ctx)
        kind, key, arguments = found
        try:
            target = self._lookup(key)
        except ConfigurationError as exc:  # a tool added at run time with a wrong policy: refuse its calls
            log.error("sa-middleware: %s", exc)
            return self._refuse(kind, Denial("store_unavailable", "this tool's policy is misconfigured"))
        if target is None:
            return await call_next(ctx)  # unknown: the SDK's error
        values, problem = _lock_values(target, arguments)
        if problem is not None:
            return self._invalid(kind, problem)
        try:
            match = self.guard.routes.target(target.key, target.policy, values)
        except InvalidRequest as exc:  # a lock value with a dot segment, a key over the length cap
            return self._invalid(kind, str(exc))
        request = _request_info(ctx, self._has_sessions(ctx))
        if request is None:
            return self._refuse(kind, Denial("missing_token", "this server authorises MCP over Streamable HTTP only"))
        outcome = await self.guard.aadmit(request, match)
        if isinstance(outcome, Denial):
            return self._refuse(kind, outcome)
        token = _CURRENT.set(outcome.context)
        try:
            with admitted(True):  # the tool's own @policy was read: it may run
                return await call_next(ctx)
        finally:
            _CURRENT.reset(token)
            await self.guard.arelease(outcome.ticket)

    def _has_sessions(self, ctx: ServerRequestContext[Any, Any]) -> bool:
        """Whether this request's ``Mcp-Session-Id`` was checked by the SDK (a stateful session manager, on a
        protocol version with sessions: it answers 404 to an unknown session or another principal's). Otherwise
        the header is the client's say-so and never names a session."""
        if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
            return False
        try:
            manager = self.server.session_manager
        except RuntimeError:  # no Streamable HTTP app built
            return False
        return getattr(manager, "stateless", True) is False

    def _refuse(self, kind: str, denial: Denial) -> HandlerResult:
        problem = _problem(denial, self.guard)
        if kind != "TOOL":
            raise MCPError(code=DENIED, message=_text(problem), data=problem)
        return CallToolResult(content=[TextContent(type="text", text=_text(problem))], structured_content=problem,
                              is_error=True)

    def _invalid(self, kind: str, detail: str) -> HandlerResult:
        problem = {"type": "urn:sa-middleware:problem:invalid_argument", "title": "Invalid argument", "status": 400,
                   "detail": detail, "code": "invalid_request"}
        if kind != "TOOL":
            raise MCPError(code=-32602, message=f"Invalid argument: {detail}", data=problem)
        return CallToolResult(content=[TextContent(type="text", text=f"Invalid argument: {detail}")],
                              structured_content=problem, is_error=True)


def _lock_values(target: _Target, arguments: Mapping[str, Any]) -> tuple[dict[str, str], str | None]:
    """The lock parameters' values as they fill the templates, or a safe reason to refuse the call."""
    values: dict[str, str] = {}
    for name, kind in target.types.items():
        if name not in arguments:
            return {}, f"{name} is required"
        value = arguments[name]
        if kind == "integer":
            if isinstance(value, bool) or not isinstance(value, int):
                return {}, f"{name} must be an integer"
            text = str(value) if abs(value) < 10**18 else ""
            if not text:
                return {}, f"{name} is out of range"
        else:
            if not isinstance(value, str):
                return {}, f"{name} must be a string"
            if not value or len(value) > _MAX_ARGUMENT:
                return {}, f"{name} must have 1 to {_MAX_ARGUMENT} characters"
            if not value.isprintable():
                return {}, f"{name} must not contain control or other non-printable characters"
            text = value
        values[name] = text
    return values, None


def _request_info(ctx: ServerRequestContext[Any, Any], sessions: bool) -> RequestInfo | None:
    """The HTTP request that carried this message, as the Guard reads it (``None`` off HTTP, e.g. stdio); with
    ``sessions``, its ``Mcp-Session-Id`` is the session for a token without ``sid``."""
    request = ctx.request
    scope = getattr(request, "scope", None)
    if not isinstance(scope, dict) or scope.get("type") != "http":
        return None
    headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
    client_params = ctx.session.client_params
    if client_params is not None:  # the client's initialize name and version, recorded with its session
        info = client_params.client_info
        headers["user-agent"] = f"{info.name}/{info.version} (MCP)"[:256]
    session = headers.get("mcp-session-id") if sessions else None
    peer = scope.get("client")
    return RequestInfo(method="POST", path=str(scope.get("path", "")), headers=headers,
                       client=str(peer[0]) if peer else "", scheme=str(scope.get("scheme") or "http"),
                       host=headers.get("host", ""),
                       session=f"{_SESSION_PREFIX}{session}" if session and len(session) <= 128 else None)


class _EndSessions:
    """Ends the store session of an MCP session its client deleted (when that MCP session was the session: the
    token carries no ``sid``). The SDK answers ``DELETE`` only for the session's own principal."""

    def __init__(self, app: ASGIApp, guard: Guard, server: MCPServer[Any], path: str = "/mcp") -> None:
        self.app, self.guard, self.server, self.path = app, guard, server, path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # only the MCP endpoint's DELETE: there the SDK checked the session is the caller's (another route's 2xx
        # says nothing about the Mcp-Session-Id its request names)
        if scope["type"] != "http" or scope["method"] != "DELETE" or app_path(scope) != self.path \
                or getattr(self.server.session_manager, "stateless", True) is not False:
            await self.app(scope, receive, send)
            return

        async def watch(message: Message) -> None:
            # the SDK ended the MCP session: end it in the store before the client hears so
            if message["type"] == "http.response.start" and 200 <= message["status"] < 300:
                with anyio.CancelScope(shield=True):
                    await self._end(scope)
            await send(message)

        await self.app(scope, receive, watch)

    async def _end(self, scope: Scope) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        session = headers.get("mcp-session-id")
        scheme, _, raw = headers.get("authorization", "").partition(" ")
        if not session or scheme.lower() != "bearer":
            return
        try:
            verified = await self.guard.verifier.averify(raw.strip())
        except InvalidToken:
            return
        if verified.claims.get("sid") is None:
            try:
                await self.guard.arevoke_session(f"{_SESSION_PREFIX}{session}", source="mcp")
            except Exception:  # the session then ends when it goes idle
                log.warning("sa-middleware: MCP session %s could not be ended in the store", session[:64],
                            exc_info=True)


class _KeysOutage:
    """Answers 503 ``keys_unavailable`` with ``Retry-After`` when the issuer's signing keys could not be fetched to
    verify the request's token, as the Guard does for HTTP: the token may be good, so never the SDK's 401 (which
    tells a client to throw it away)."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app, self.guard = app, guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        answers = _ANSWERS_OUTAGE.set(True)
        try:
            await self.app(scope, receive, watch)
        except KeysUnavailable as exc:
            if started:
                raise
            guard = self.guard
            denial = Denial("keys_unavailable", "the issuer's signing keys could not be fetched; try again",
                            retry_after=max(exc.retry_after, guard.retry_after))
            status, headers, body = denial_response(denial, guard.realm, guard.retry_after)
            await send({"type": "http.response.start", "status": status,
                        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]})
            await send({"type": "http.response.body", "body": body})
        finally:
            _ANSWERS_OUTAGE.reset(answers)


def streamable_http_app(server: MCPServer[Any], guard: Guard, **options: Any) -> Starlette:
    """The server's Streamable HTTP app (``server.streamable_http_app(**options)``) with every tool call and
    prompt admitted by ``guard``. Checks the policies first: a mistake raises :class:`ConfigurationError`."""
    SessionAwareMCP(server, guard)
    app = server.streamable_http_app(**options)
    app.add_middleware(_EndSessions, guard=guard, server=server, path=options.get("streamable_http_path", "/mcp"))
    app.add_middleware(_KeysOutage, guard=guard)
    return app

