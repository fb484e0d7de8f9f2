"""The agent workbench on Flask, guarded by sa-middleware.

Run it:  flask --app examples/flask_app.py run

The Guard is configured with Flask config keys (SA_*), filled here from the environment: SA_STORE (default
sqlite:///sa-flask.db) and the development key SA_DEV_KEY (default ~/.config/sa-middleware/dev-key.pem, created
if missing). Mint a token with the same key:
    sa-middleware token agent-7 --kind agent --scope "tickets payments:approve"
WORKBENCH_BACKEND (optional) is the base URL of the system of record each write is sent to, with its fencing tokens.
"""

from __future__ import annotations

import json
import os
import urllib.request
import uuid
from typing import Any

from flask import Blueprint, Flask, current_app, g

from sa_middleware import Policy
from sa_middleware.adapters.flask import SessionAware, policy
from sa_middleware.devkeys import DEV_AUDIENCE, DEV_ISSUER, dev_key

sa = SessionAware()
workbench = Blueprint("workbench", __name__)


def context() -> dict[str, Any]:
    """Who is calling, as the Guard admitted it (flask.g.sa)."""
    return {"principal": g.sa.principal, "kind": g.sa.kind, "session_id": g.sa.session_id, "route": g.sa.route,
            "fencing_tokens": dict(g.sa.fencing_tokens)}


def backend(resource: str, id: int | None) -> None:
    """Send the write to the system of record (if configured) with the fencing tokens it must check."""
    base = current_app.config["WORKBENCH_BACKEND"]
    if not base:
        return
    body = {"principal": g.sa.principal, "session_id": g.sa.session_id, "id": id,
            "fencing_tokens": dict(g.sa.fencing_tokens)}
    call = urllib.request.Request(f"{base}/{resource}", data=json.dumps(body).encode(), method="POST",
                                  headers={"content-type": "application/json"})
    with urllib.request.urlopen(call, timeout=30):
        pass


@workbench.get("/health")
@policy(public=True)
def health() -> dict[str, Any]:
    return {"ok": True}


@workbench.get("/whoami")  # no decorator: the default policy (at most 3 parallel sessions per principal)
def whoami() -> dict[str, Any]:
    return context()


@workbench.post("/tickets")
@policy(tags={"tickets"}, raises_risk=1, risk_window=60)
def open_ticket() -> tuple[dict[str, Any], int]:
    backend("tickets", None)
    return {"ticket": uuid.uuid4().hex, "context": context()}, 201


@workbench.post("/payments/<int:id>/approve")
@policy(exclusive=True, max_risk=0, locks=["payment:{id}"], scopes={"payments:approve"})
def approve_payment(id: int) -> dict[str, Any]:
    backend("payments", id)
    return {"payment": id, "approved": True, "context": context()}


@workbench.put("/objects/<int:id>")
@policy(locks=["object:{id}"], on_lock_conflict="pause")
def update_object(id: int) -> dict[str, Any]:
    backend("objects", id)
    return {"object": id, "updated": True, "context": context()}


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(
        SA_STORE=os.environ.get("SA_STORE", "sqlite:///sa-flask.db"),
        SA_KEYS=dev_key().public_pem,
        SA_ALGORITHMS=["RS256"],
        SA_ISSUER=DEV_ISSUER,
        SA_AUDIENCE=DEV_AUDIENCE,
        SA_DEFAULT_POLICY=Policy(max_sessions=3),
        WORKBENCH_BACKEND=os.environ.get("WORKBENCH_BACKEND"),
    )
    app.register_blueprint(workbench)
    sa.init_app(app)
    return app


app = create_app()
