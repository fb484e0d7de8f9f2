"""The "agent workbench" API on FastAPI, protected by sa-middleware.

Run it (from the repository root; SQLite store ./sa-fastapi.db, development key at $SA_DEV_KEY or
~/.config/sa-middleware/dev-key.pem)::

    uvicorn --app-dir examples fastapi_app:app

Then, with a development token minted from the same key::

    TOKEN=$(sa-middleware token agent-7 --kind agent --scope "tickets payments:approve")
    curl -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8000/whoami
    curl -X POST -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8000/payments/42/approve

Environment: SA_STORE (store URI), SA_DEV_KEY (key file), WORKBENCH_BACKEND (optional "system of record" URL).
Policies sit under the route decorator (``@app.post(...)`` then ``@policy(...)``), on the function itself.
"""

from __future__ import annotations

import json
import os
import urllib.request
import uuid
from typing import Any

from fastapi import FastAPI

from sa_middleware import Guard, Policy, SAContext
from sa_middleware.adapters.fastapi import SAContextDep, SessionAwareMiddleware, policy
from sa_middleware.devkeys import DEV_AUDIENCE, DEV_ISSUER, dev_key

BACKEND = os.environ.get("WORKBENCH_BACKEND")

guard = Guard(
    store=os.environ.get("SA_STORE", "sqlite:///sa-fastapi.db"),
    keys=dev_key().public_pem,  # development only: trust your identity provider (jwks_url=...) in production
    algorithms=["RS256"],
    issuer=DEV_ISSUER,
    audience=DEV_AUDIENCE,
    default_policy=Policy(max_sessions=3),
)

app = FastAPI(title="Agent workbench")
app.add_middleware(SessionAwareMiddleware, guard=guard)


def context(sa: SAContext) -> dict[str, Any]:
    return {"principal": sa.principal, "kind": sa.kind, "session_id": sa.session_id, "route": sa.route,
            "fencing_tokens": dict(sa.fencing_tokens)}


def backend(resource: str, id: int | None, sa: SAContext) -> None:
    """Record the action in the system of record, with the fencing tokens that prove we still hold the locks.

    The endpoints are plain ``def``: FastAPI runs them in its thread pool, so this blocking call never blocks the
    event loop."""
    if not BACKEND:
        return
    body = json.dumps({"principal": sa.principal, "session_id": sa.session_id, "id": id,
                       "fencing_tokens": dict(sa.fencing_tokens)}).encode()
    call = urllib.request.Request(f"{BACKEND.rstrip('/')}/{resource}", data=body, method="POST",
                                  headers={"content-type": "application/json"})
    with urllib.request.urlopen(call, timeout=30):
        pass


@app.get("/health")
@policy(public=True)
def health() -> dict[str, bool]:
    return {"ok": True}


@app.get("/whoami")
def whoami(sa: SAContextDep) -> dict[str, Any]:  # no decorator: the Guard's default policy
    return context(sa)


@app.post("/tickets", status_code=201)
@policy(tags={"tickets"}, raises_risk=1, risk_window=60)
def open_ticket(sa: SAContextDep) -> dict[str, Any]:
    backend("tickets", None, sa)
    return {"ticket": uuid.uuid4().hex, "context": context(sa)}


@app.post("/payments/{id:int}/approve")
@policy(exclusive=True, max_risk=0, locks=["payment:{id}"], scopes={"payments:approve"})
def approve_payment(id: int, sa: SAContextDep) -> dict[str, Any]:
    backend("payments", id, sa)
    return {"payment": id, "approved": True, "context": context(sa)}


@app.put("/objects/{id:int}")
@policy(locks=["object:{id}"], on_lock_conflict="pause")
def update_object(id: int, sa: SAContextDep) -> dict[str, Any]:
    backend("objects", id, sa)
    return {"object": id, "updated": True, "context": context(sa)}
