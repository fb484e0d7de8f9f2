"""Websockets through the Starlette adapter on a real uvicorn server (the `websockets` client and server library).

An open websocket holds its ticket and its locks for the whole connection: a concurrent HTTP write to the same
object is refused while it is open and admitted once it is closed. A refused handshake never reaches the endpoint.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from support import WAIT, sub
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from sa_middleware import Guard
from sa_middleware.adapters.starlette import SessionAwareMiddleware, policy
from sa_middleware.demo import DemoIssuer, serve_asgi


class App:
    def __init__(self, guard: Guard) -> None:
        self.entered: list[str] = []
        self.lock = threading.Lock()

        @policy(locks=["room:{room}"])
        async def room(websocket: WebSocket) -> None:
            sa = websocket.state.sa
            with self.lock:
                self.entered.append(sa.principal)
            await websocket.accept()
            await websocket.send_json({"principal": sa.principal, "route": sa.route,
                                       "fencing_tokens": dict(sa.fencing_tokens)})
            await websocket.receive_text()  # the client says when it is done
            await websocket.close()

        @policy(locks=["room:{room}"])
        async def post(request: Request) -> JSONResponse:
            return JSONResponse({"fencing_tokens": dict(request.state.sa.fencing_tokens)})

        self.asgi = Starlette(routes=[WebSocketRoute("/ws/{room}", room), Route("/rooms/{room}", post,
                                                                                 methods=["POST"])])
        self.asgi.add_middleware(SessionAwareMiddleware, guard=guard)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Guard, DemoIssuer, App]]:
    issuer = DemoIssuer()
    guard = Guard(store=f"sqlite:///{tmp_path / 'ws.db'}", keys=issuer.public_pem, algorithms=["RS256"],
                  issuer=issuer.issuer, audience=issuer.audience)
    app = App(guard)
    base, stop = serve_asgi(app.asgi)
    try:
        yield base, guard, issuer, app
    finally:
        stop()
        guard.close()


def _ws_url(base: str, path: str) -> str:
    return base.replace("http://", "ws://") + path


def test_an_open_websocket_holds_its_lock_until_it_closes(served: tuple[str, Guard, DemoIssuer, App]) -> None:
    base, guard, issuer, app = served
    agent, human = sub(), sub()
    headers = {"Authorization": f"Bearer {issuer.token(agent, sa_kind='agent', sid=f'{agent}-ws')}"}
    with connect(_ws_url(base, "/ws/lobby"), additional_headers=headers, open_timeout=WAIT) as ws:
        hello: dict[str, Any] = json.loads(ws.recv(timeout=WAIT))
        assert hello["principal"] == agent and hello["route"] == "WEBSOCKET /ws/{room}"
        first = hello["fencing_tokens"]["room:lobby"]
        assert [lock.key for lock in guard.locks()] == ["room:lobby"]
        # while the websocket is open, an HTTP write to the same room is refused with 423
        busy = httpx.post(f"{base}/rooms/lobby", headers={"Authorization": f"Bearer {issuer.token(human)}"},
                          timeout=WAIT)
        assert busy.status_code == 423 and busy.json()["code"] == "object_locked"
        assert "retry-after" in busy.headers
        ws.send("done")
        with pytest.raises(ConnectionClosed):  # the endpoint closes after "done"
            ws.recv(timeout=WAIT)
    # the middleware releases right after the endpoint returns, which the client cannot observe: wait (bounded)
    # for the store to show the lock gone; the lock's next holder then gets a larger fencing token
    deadline = time.monotonic() + WAIT
    while guard.locks() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert guard.locks() == []
    after = httpx.post(f"{base}/rooms/lobby", headers={"Authorization": f"Bearer {issuer.token(human)}"},
                       timeout=WAIT)
    assert after.status_code == 200, after.text
    assert after.json()["fencing_tokens"]["room:lobby"] > first
    assert app.entered == [agent]  # the websocket endpoint ran once, for the admitted handshake


@pytest.mark.parametrize("token", [None, "not-a-jwt"])
def test_a_refused_handshake_never_reaches_the_endpoint(served: tuple[str, Guard, DemoIssuer, App],
                                                         token: str | None) -> None:
    base, guard, _, app = served
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with pytest.raises(InvalidStatus) as refused, connect(_ws_url(base, "/ws/lobby"), additional_headers=headers,
                                                           open_timeout=WAIT):
        pass
    assert refused.value.response.status_code == 403  # a close before accept: the server refuses the handshake
    assert app.entered == [] and guard.locks() == []
