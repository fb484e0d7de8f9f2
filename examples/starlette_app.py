"""The "agent workbench" API on Starlette, protected by sa-middleware.

Run it (from the repository root; SQLite store ./sa-starlette.db, development key at $SA_DEV_KEY or
~/.config/sa-middleware/dev-key.pem)::

    uvicorn --app-dir examples starlette_app:app

Then, with a development token minted from the same key::

    TOKEN=$(sa-middleware token agent-7 --kind agent --scope "tickets payments:approve")
    curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8000/whoami
    curl -X POST -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8000/payments/42/approve

Environment: SA_STORE (store URI), SA_DEV_KEY (key file), WORKBENCH_BACKEND (optional "system of record" URL).
"""

from __future__ import annotations

import json
import os
import urllib.request
import uuid
from typing import Any

import anyio.to_thread
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sa_middleware import Guard, Policy, SAContext
from sa_middleware.adapters.starlette import SessionAwareMiddleware, policy
from sa_middleware.devkeys import DEV_AUDIENCE, DEV_ISSUER, dev_key

BACKEND = os.environ.get("WORKBENCH_BACKEND")

guard = Guard(
    store=os.environ.get("SA_STORE", "sqlite:///sa-starlette.db"),
    keys=dev_key().public_pem,  # development only: trust your identity provider (jwks_url=...) in production
    algorithms=["RS256"],
    issuer=DEV_ISSUER,
    audience=DEV_AUDIENCE,
    default_policy=Policy(max_sessions=3),
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


@policy(public=True)
async def health(request: Request) -> JSONResponse:
    return JSONResponse({"ok": True})


async def whoami(request: Request) -> JSONResponse:  # no decorator: the Guard's default policy
    return JSONResponse(context(request.state.sa))


@policy(tags={"tickets"}, raises_risk=1, risk_window=60)
async def open_ticket(request: Request) -> JSONResponse:
    await backend("tickets", None, request.state.sa)
    return JSONResponse({"ticket": uuid.uuid4().hex, "context": context(request.state.sa)}, status_code=201)


@policy(exclusive=True, max_risk=0, locks=["payment:{id}"], scopes={"payments:approve"})
async def approve_payment(request: Request) -> JSONResponse:
    payment = request.path_params["id"]
    await backend("payments", payment, request.state.sa)
    return JSONResponse({"payment": payment, "approved": True, "context": context(request.state.sa)})


@policy(locks=["object:{id}"], on_lock_conflict="pause")
async def update_object(request: Request) -> JSONResponse:
    obj = request.path_params["id"]
    await backend("objects", obj, request.state.sa)
    return JSONResponse({"object": obj, "updated": True, "context": context(request.state.sa)})


app = Starlette(
    routes=[
        Route("/health", health),
        Route("/whoami", whoami),
        Route("/tickets", open_ticket, methods=["POST"]),
        Route("/payments/{id:int}/approve", approve_payment, methods=["POST"]),
        Route("/objects/{id:int}", update_object, methods=["PUT"]),
    ],
    middleware=[Middleware(SessionAwareMiddleware, guard=guard)],
)
