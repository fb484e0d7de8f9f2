"""The "agent workbench" as an MCP server (tools for agents) with an HTTP API (for humans), one Guard for both.

Run it (from the repository root; SQLite store ./sa-mcp.db, development key at $SA_DEV_KEY or
~/.config/sa-middleware/dev-key.pem)::

    uvicorn --app-dir examples mcp_server:app

Agents connect an MCP client (Streamable HTTP) to ``http://127.0.0.1:8000/mcp`` with a bearer token; humans call
``PUT /objects/{id}`` and ``GET /whoami`` over plain HTTP. Tokens come from the same development key::

    TOKEN=$(sa-middleware token agent-7 --kind agent --scope "tickets payments:approve")

Environment: SA_STORE (store URI), SA_DEV_KEY (key file), WORKBENCH_BACKEND (optional "system of record" URL),
SA_MCP_URL (this server's public MCP URL, named in the 401 challenge and the protected resource metadata).
"""

from __future__ import annotations

import json
import os
import urllib.request
import uuid
from typing import Any

import anyio.to_thread
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from starlette.requests import Request
from starlette.responses import JSONResponse

from sa_middleware import Guard, Policy, SAContext
from sa_middleware.adapters.mcp import GuardTokenVerifier, policy, sa_context, streamable_http_app
from sa_middleware.adapters.starlette import SessionAwareMiddleware
from sa_middleware.devkeys import DEV_AUDIENCE, DEV_ISSUER, dev_key

BACKEND = os.environ.get("WORKBENCH_BACKEND")
MCP_URL = os.environ.get("SA_MCP_URL", "http://127.0.0.1:8000/mcp")

guard = Guard(
    store=os.environ.get("SA_STORE", "sqlite:///sa-mcp.db"),
    keys=dev_key().public_pem,  # development only: trust your identity provider (jwks_url=...) in production
    algorithms=["RS256"],
    issuer=DEV_ISSUER,
    audience=DEV_AUDIENCE,
    policies={
        # tools: a table entry, or @policy on the tool function (below)
        "TOOL open_ticket": Policy(tags={"tickets"}, raises_risk=1, risk_window=60),
        # the HTTP side: the MCP endpoint and its metadata are decided per tool call, not per HTTP request
        "* /mcp": Policy(public=True),
        "GET /.well-known/{rest:path}": Policy(public=True),
        "PUT /objects/{id:int}": Policy(locks=["object:{id}"], on_lock_conflict="pause"),
    },
    default_policy=Policy(max_sessions=3),
)

server = MCPServer(
    "workbench",
    log_level="WARNING",
    token_verifier=GuardTokenVerifier(guard),
    auth=AuthSettings(issuer_url=DEV_ISSUER, resource_server_url=MCP_URL, validate_token_resource=False),
)


def context(sa: SAContext) -> dict[str, Any]:
    return {"principal": sa.principal, "kind": sa.kind, "session_id": sa.session_id, "route": sa.route,
            "fencing_tokens": dict(sa.fencing_tokens)}


async def backend(resource: str, id: int | None, sa: SAContext) -> None:
    """Record the action in the system of record, with the fencing tokens that prove we still hold the locks."""
    if not BACKEND:
        return
    body = json.dumps({"principal": sa.principal, "session_id": sa.session_id, "id": id,
                       "fencing_tokens": dict(sa.fencing_tokens)}).encode()
    call = urllib.request.Request(f"{BACKEND.rstrip('/')}/{resource}", data=body, method="POST",
                                  headers={"content-type": "application/json"})

    def send() -> None:
        with urllib.request.urlopen(call, timeout=30):
            pass

    await anyio.to_thread.run_sync(send)  # blocking I/O stays off the event loop


@server.tool()
async def whoami() -> dict[str, Any]:  # no policy: the Guard's default policy
    """Who the server thinks is calling."""
    return context(sa_context())


@server.tool()
async def open_ticket(summary: str = "") -> dict[str, Any]:  # its policy is the table entry "TOOL open_ticket"
    """Open a support ticket."""
    await backend("tickets", None, sa_context())
    return {"ticket": uuid.uuid4().hex, "context": context(sa_context())}


@server.tool()
@policy(exclusive=True, max_risk=0, locks=["payment:{payment_id}"], scopes={"payments:approve"})
async def approve_payment(payment_id: int) -> dict[str, Any]:
    """Approve a payment."""
    await backend("payments", payment_id, sa_context())
    return {"payment": payment_id, "approved": True, "context": context(sa_context())}


@server.tool()
@policy(locks=["object:{object_id}"], on_lock_conflict="pause")
async def update_object(object_id: int) -> dict[str, Any]:
    """Modify a production object."""
    await backend("objects", object_id, sa_context())
    return {"object": object_id, "updated": True, "context": context(sa_context())}


# the humans' HTTP API, on the same app
@server.custom_route("/whoami", methods=["GET"])
async def whoami_http(request: Request) -> JSONResponse:
    return JSONResponse(context(request.state.sa))


@server.custom_route("/objects/{id:int}", methods=["PUT"])
async def update_object_http(request: Request) -> JSONResponse:
    obj = request.path_params["id"]
    await backend("objects", obj, request.state.sa)
    return JSONResponse({"object": obj, "updated": True, "context": context(request.state.sa)})


app = streamable_http_app(server, guard)
app.add_middleware(SessionAwareMiddleware, guard=guard)
