"""The SSF receiver served as the README shows it, over a real server (uvicorn)."""

from __future__ import annotations

from pathlib import Path

import httpx
from ssf_support import RISC, Transmitter, fresh_sub, user
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from support import WAIT, problem

from sa_middleware import Guard
from sa_middleware.adapters.starlette import SessionAwareMiddleware
from sa_middleware.demo import DemoIssuer, serve_asgi
from sa_middleware.events import SSFReceiver


def test_row13_readme_route_receives_the_url_as_written(tmp_path: Path) -> None:
    """The README serves the receiver with ``Route("/ssf/events", receiver)`` beside ``Mount("", app=api)``: a push
    to ``/ssf/events`` exactly (no trailing slash) reaches it and is applied, and the API keeps its protection. The
    ``Mount("/ssf/events", ...)`` form it replaces never receives ``/ssf/events`` (the router redirects it)."""
    idp, tx = DemoIssuer(), Transmitter()
    guard = Guard(store=f"sqlite:///{tmp_path / 'sa.db'}", keys=idp.public_pem, algorithms=["RS256"],
                  issuer=idp.issuer, audience=idp.audience)
    receiver = SSFReceiver(guard, issuer=tx.issuer, audience=tx.audience, keys=tx.public_pem)

    async def things(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    api = Starlette(routes=[Route("/things", things)], middleware=[Middleware(SessionAwareMiddleware, guard=guard)])
    headers = {"content-type": "application/secevent+jwt"}
    base, stop = serve_asgi(Starlette(routes=[Route("/ssf/events", receiver), Mount("", app=api)]))
    old_base, old_stop = serve_asgi(Starlette(routes=[Mount("/ssf/events", app=receiver), Mount("", app=api)]))
    try:
        sub = fresh_sub()
        token = idp.token(sub, sid=f"{sub}-a")
        assert httpx.get(f"{base}/things", headers={"authorization": f"Bearer {token}"}, timeout=WAIT).text == "ok"
        problem(httpx.get(f"{base}/things", timeout=WAIT), 401, "missing_token")  # the API is still protected
        pushed = httpx.post(f"{base}/ssf/events", headers=headers, timeout=WAIT,
                            content=tx.set(RISC + "credential-compromise", {"credential_type": "password"},
                                           sub_id=user(idp, sub)))
        assert (pushed.status_code, pushed.content) == (202, b""), pushed.text
        problem(httpx.get(f"{base}/things", headers={"authorization": f"Bearer {token}"}, timeout=WAIT), 401,
                "credential_compromised")
        assert httpx.get(f"{base}/ssf/events", timeout=WAIT).status_code == 405  # the receiver's own answer
        # the form the README used to show: the push to /ssf/events never reaches the receiver
        missed = httpx.post(f"{old_base}/ssf/events", headers=headers, content=b"x", timeout=WAIT)
        assert missed.status_code != 400 and "err" not in missed.text
    finally:
        stop()
        old_stop()
        guard.close()
