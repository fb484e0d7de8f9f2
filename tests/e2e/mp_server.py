"""A small ASGI app behind ``SessionAwareMiddleware``, served by uvicorn in its own OS process.

Started by ``tests/e2e/test_multiprocess.py`` as ``python -m tests.e2e.mp_server --db ... --pem ... --out ...``.
Several of these processes share one SQLite store file; the test mints tokens with the private key whose public
PEM it passes in ``--pem``.

Routes:

- ``GET /health``: public, for readiness polling.
- ``PUT /objects/{id}``: one exclusive lock ``object:{id}``.
- ``POST /jobs``: ``max_in_flight=1`` per principal.
- ``PUT /hold/{id}``: the same lock ``object:{id}``; the view writes ``entered-{rid}.json`` (pid and fencing token)
  into ``--out`` and then blocks, so the test can kill the process while the lock is held.

Every admitted request of the first two routes appends one JSON line (its interval on the system-wide
``CLOCK_MONOTONIC``, its fencing token, the server pid) to ``--out/admitted-{pid}.jsonl``, opened with ``O_APPEND``.
The view holds the work for ``--work-ms`` so overlapping admissions would show as overlapping intervals.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import anyio

from sa_middleware import Guard, Policy
from sa_middleware.asgi import SessionAwareMiddleware

ISSUER = "https://idp.mp.test"
AUDIENCE = "mp-test"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def policies() -> dict[str, Policy]:
    """The per-route policies of the test app."""
    return {
        "GET /health": Policy(public=True),
        "PUT /objects/{id}": Policy(locks=["object:{id}"]),
        "POST /jobs": Policy(max_in_flight=1),
        "PUT /hold/{id}": Policy(locks=["object:{id}"]),
    }


def now_ns() -> int:
    """System-wide monotonic clock (CLOCK_MONOTONIC is shared by all processes on Linux)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class App:
    """The views. Records every admitted request of the contended routes."""

    def __init__(self, out: Path, work: float) -> None:
        self.out, self.work, self.pid = out, work, os.getpid()
        self._fd = os.open(out / f"admitted-{self.pid}.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/health":
            await _json(send, 200, {"ok": True, "pid": self.pid})
            return
        ctx = scope.get("sa_middleware")
        if ctx is None or ctx.principal is None:
            await _json(send, 500, {"error": "no context"})
            return
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        rid = (query.get("rid") or [""])[0]
        fences = dict(ctx.fencing_tokens)
        if path.startswith("/hold/"):
            entered = {"pid": self.pid, "rid": rid, "fencing_tokens": fences, "at": now_ns()}
            tmp = self.out / f".entered-{rid}.tmp"
            tmp.write_text(json.dumps(entered))
            tmp.replace(self.out / f"entered-{rid}.json")
            await anyio.sleep(60)  # held until the test kills this process
            await _json(send, 200, entered)
            return
        start = now_ns()
        await anyio.sleep(self.work)  # the app's work, while the lock / in-flight slot is held
        end = now_ns()
        record = {"rid": rid, "pid": self.pid, "route": ctx.route, "principal": ctx.principal,
                  "session_id": ctx.session_id, "fencing_tokens": fences, "start": start, "end": end}
        os.write(self._fd, (json.dumps(record) + "\n").encode())
        await _json(send, 200, record)


async def _json(send: Send, status: int, body: Any) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", required=True, help="SQLite store file shared by every server process")
    parser.add_argument("--pem", required=True, help="file with the issuer's public key (PEM)")
    parser.add_argument("--out", required=True, help="directory for the port file and the admission records")
    parser.add_argument("--name", required=True, help="server name (the port is written to port-NAME)")
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--work-ms", type=float, default=3.0)
    args = parser.parse_args(argv)

    out = Path(args.out)
    guard = Guard(store=f"sqlite:///{os.path.abspath(args.db)}", keys=Path(args.pem).read_text(),
                  algorithms=["RS256"], issuer=ISSUER, audience=AUDIENCE, policies=policies(), lease=args.lease)
    app = SessionAwareMiddleware(App(out, args.work_ms / 1000), guard=guard)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port_file = out / f"port-{args.name}"
    tmp = out / f".port-{args.name}.tmp"
    tmp.write_text(str(sock.getsockname()[1]))
    tmp.replace(port_file)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
