"""A small ASGI app behind ``SessionAwareMiddleware``, served by uvicorn in its own OS process, and the test-side
harness that starts several of them on one shared store.

Server: ``python -m tests.e2e.mp_server --store URI --pem ... --out ... --name ...`` (``--db FILE`` is short for
``--store sqlite:///FILE``). Several of these processes share one store (a SQLite file, a Redis server, a Redis
Cluster or a Sentinel-managed master); the test mints tokens with the private key whose public PEM it passes in
``--pem``.

Rotator: ``python -m tests.e2e.mp_server --rotate SUB --store URI --pem ...`` builds a Guard on the store, prints
``ready``, waits for a line on stdin, calls ``guard.rotate(SUB)`` and prints one JSON line with the system-wide
monotonic times just before the call and just after it returned.

Routes:

- ``GET /health``: public, for readiness polling.
- ``PUT /objects/{id}``: one exclusive lock ``object:{id}``.
- ``POST /jobs``: ``max_in_flight=1`` per principal.
- ``PUT /hold/{id}``: the same lock ``object:{id}``; the view writes ``entered-{rid}.json`` (pid and fencing token)
  into ``--out`` and then blocks, so the test can kill the process while the lock is held.
- ``POST /batch``: ``max_in_flight=3``.
- ``POST /seats``: ``max_sessions=3``.
- ``POST /deploy`` (tag ``deploy``, conflicts with ``pay``), ``POST /pay`` (tag ``pay``, conflicts with ``deploy``),
  ``POST /exclusive`` (``exclusive=True``): the conflict rules.
- ``GET /ping``: any valid token, no limits (revocation propagation, faults).
- ``GET /open``: ``fail_open=True`` (admitted, without a ticket, while the store is unavailable).

Every admitted request except ``/hold`` appends one JSON line to ``--out/admitted-{pid}.jsonl`` (opened with
``O_APPEND``): its interval in the view on the system-wide ``CLOCK_MONOTONIC``, the interval of the store call that
admitted it, its fencing tokens, ticket, principal, session and server pid. The view holds the work for ``--work-ms``
so overlapping admissions would show as overlapping intervals. With ``--decisions``, every store admission call
(admitted, refused or failed) also appends a line to ``--out/decisions-{pid}.jsonl``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import anyio

from sa_middleware import Guard, Policy
from sa_middleware.asgi import SessionAwareMiddleware
from sa_middleware.records import Admission, Ticket
from sa_middleware.stores import Store

ISSUER = "https://idp.mp.test"
AUDIENCE = "mp-test"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_IN_FLIGHT_BATCH = 3
MAX_SEATS = 3


def policies() -> dict[str, Policy]:
    """The per-route policies of the test app."""
    return {
        "GET /health": Policy(public=True),
        "PUT /objects/{id}": Policy(locks=["object:{id}"]),
        "POST /jobs": Policy(max_in_flight=1),
        "PUT /hold/{id}": Policy(locks=["object:{id}"]),
        "POST /batch": Policy(max_in_flight=MAX_IN_FLIGHT_BATCH),
        "POST /seats": Policy(max_sessions=MAX_SEATS),
        "POST /deploy": Policy(tags={"deploy"}, conflicts={"pay"}),
        "POST /pay": Policy(tags={"pay"}, conflicts={"deploy"}),
        "POST /exclusive": Policy(exclusive=True),
        "GET /ping": Policy(),
        "GET /open": Policy(fail_open=True),
    }


def now_ns() -> int:
    """System-wide monotonic clock (CLOCK_MONOTONIC is shared by all processes on Linux)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def store_uri(value: str) -> str:
    """``--db FILE`` as a store URI."""
    return f"sqlite:///{os.path.abspath(value)}"


# -- the server (runs in the child process) --------------------------------------------------------------------------

class AdmitTimer:
    """Instruments a store's ``aadmit``: the monotonic interval of every store call (the admission happened
    atomically somewhere inside it), kept per ticket until the view picks it up, and optionally logged."""

    def __init__(self, store: Store, decisions: Path | None) -> None:
        self.pending: dict[str, tuple[int, int]] = {}
        self._fd = (os.open(decisions, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                    if decisions is not None else None)
        self._inner = store.aadmit
        store.aadmit = self.aadmit  # type: ignore[method-assign]

    async def aadmit(self, admission: Admission) -> Any:
        start, outcome = now_ns(), "error"
        try:
            result = await self._inner(admission)
            outcome = "ok" if isinstance(result, Ticket) else str(result.code)
            return result
        except BaseException as exc:
            outcome = f"error:{type(exc).__name__}"
            raise
        finally:
            end = now_ns()
            if outcome == "ok":
                self.pending[admission.ticket_id] = (start, end)
            if self._fd is not None:
                line = {"pid": os.getpid(), "ticket_id": admission.ticket_id, "sub": admission.sub,
                        "session_id": admission.session_id, "gen": admission.token_gen, "iat": admission.token_iat,
                        "route": admission.route, "start": start, "end": end, "outcome": outcome}
                os.write(self._fd, (json.dumps(line) + "\n").encode())

    def take(self, ticket_id: str | None) -> tuple[int, int] | None:
        return self.pending.pop(ticket_id, None) if ticket_id else None


class App:
    """The views. Records every admitted request (except ``/hold``)."""

    def __init__(self, out: Path, work: float, timer: AdmitTimer) -> None:
        self.out, self.work, self.timer, self.pid = out, work, timer, os.getpid()
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
        admit = self.timer.take(ctx.ticket_id)
        start = now_ns()
        if path not in ("/ping", "/open"):
            await anyio.sleep(self.work)  # the app's work, while the lock / in-flight slot is held
        end = now_ns()
        record = {"rid": rid, "pid": self.pid, "route": ctx.route, "principal": ctx.principal,
                  "session_id": ctx.session_id, "ticket_id": ctx.ticket_id, "gen": ctx.claims.get("gen"),
                  "fencing_tokens": fences, "start": start, "end": end,
                  "admit_start": admit[0] if admit else None, "admit_end": admit[1] if admit else None}
        os.write(self._fd, (json.dumps(record) + "\n").encode())
        await _json(send, 200, record)


async def _json(send: Send, status: int, body: Any) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})


def make_guard(store: str, pem: str, lease: float) -> Guard:
    return Guard(store=store, keys=pem, algorithms=["RS256"], issuer=ISSUER, audience=AUDIENCE, policies=policies(),
                 lease=lease)


def rotator(args: argparse.Namespace, store: str) -> None:
    """Rotate one principal on command: ``ready`` -> wait for a stdin line -> rotate -> one JSON line."""
    guard = make_guard(store, Path(args.pem).read_text(), args.lease)
    try:
        guard.sessions(args.rotate)  # connect now, so the timed call is the rotation alone
        print("ready", flush=True)
        if not sys.stdin.readline():
            return
        called = now_ns()
        generation = guard.rotate(args.rotate)
        returned = now_ns()
        print(json.dumps({"called": called, "returned": returned, "generation": generation, "pid": os.getpid()}),
              flush=True)
    finally:
        guard.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--store", help="store URI shared by every server process")
    where.add_argument("--db", help="SQLite store file shared by every server process (= --store sqlite:///FILE)")
    parser.add_argument("--pem", required=True, help="file with the issuer's public key (PEM)")
    parser.add_argument("--out", help="directory for the port file and the admission records")
    parser.add_argument("--name", help="server name (the port is written to port-NAME)")
    parser.add_argument("--lease", type=float, default=30.0)
    parser.add_argument("--work-ms", type=float, default=3.0)
    parser.add_argument("--decisions", action="store_true", help="log every store admission call")
    parser.add_argument("--rotate", metavar="SUB", help="run as the rotator of SUB instead of a server")
    args = parser.parse_args(argv)
    store = args.store or store_uri(args.db)
    if args.rotate:
        rotator(args, store)
        return
    if not args.out or not args.name:
        parser.error("a server needs --out and --name")

    import uvicorn

    out = Path(args.out)
    guard = make_guard(store, Path(args.pem).read_text(), args.lease)
    timer = AdmitTimer(guard.store, out / f"decisions-{os.getpid()}.jsonl" if args.decisions else None)
    app = SessionAwareMiddleware(App(out, args.work_ms / 1000, timer), guard=guard)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port_file = out / f"port-{args.name}"
    tmp = out / f".port-{args.name}.tmp"
    tmp.write_text(str(sock.getsockname()[1]))
    tmp.replace(port_file)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])


# -- the test side: issuer, server pool, rotator, counts ------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 30.0
SUMMARY_FILE = Path(os.environ.get("SA_REDIS_COUNTS", "/tmp/sa-redis-counts.json"))


def lease_end(store: str, key: str) -> float:
    """When the lease of the lock on ``key`` ends, as the store records it (read after its holder was killed: no
    renewal follows); now, if it ended already."""
    from sa_middleware.stores import open_store

    opened = open_store(store)
    try:
        return next((info.expires for info in opened.locks() if info.key == key), time.time())
    finally:
        opened.close()


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


class Issuer:
    """The test's identity provider: the private key stays here, the public PEM goes to the servers."""

    def __init__(self, tmp: Path) -> None:
        from sa_middleware.tokens import generate_rsa_key

        self.key, pem = generate_rsa_key()
        self.pem_path = tmp / "issuer.pem"
        self.pem_path.write_text(pem)

    def token(self, sub: str, sid: str | None = None, *, iat: int | None = None, **claims: Any) -> str:
        from sa_middleware.tokens import mint_token

        now = int(time.time())
        issued = now if iat is None else iat
        payload: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": issued, "exp": now + 600,
                                   "jti": uuid.uuid4().hex, **claims}
        if sid is not None:
            payload["sid"] = sid
        return mint_token(self.key, "RS256", payload, {"kid": "mp-1"})


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    base: str = ""

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


class ServerPool:
    """Server processes sharing one store; stop them with :meth:`stop` (terminate, then kill)."""

    def __init__(self, tmp: Path, issuer: Issuer, store: str) -> None:
        self.tmp, self.issuer, self.store = tmp, issuer, store
        self.out = tmp / "out"
        self.out.mkdir(exist_ok=True)
        self.servers: list[Server] = []
        self.helpers: list[subprocess.Popen[bytes]] = []

    def start(self, count: int, *, lease: float = 30.0, work_ms: float = 3.0, decisions: bool = False) -> list[Server]:
        """Start ``count`` servers at once, then wait until each answers ``GET /health``."""
        started = []
        for _ in range(count):
            name = f"s{len(self.servers)}"
            log = self.tmp / f"{name}.log"
            args = [sys.executable, "-m", "tests.e2e.mp_server", "--store", self.store, "--pem",
                    str(self.issuer.pem_path), "--out", str(self.out), "--name", name, "--lease", str(lease),
                    "--work-ms", str(work_ms)]
            if decisions:
                args.append("--decisions")
            with log.open("wb") as fh:
                proc = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=fh, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)
            server = Server(name, proc, log)
            self.servers.append(server)
            started.append(server)
        for server in started:
            self._wait_ready(server)
        return started

    def _wait_ready(self, server: Server) -> None:
        """Readiness: the port file exists and ``GET /health`` answers 200 (bounded)."""
        import httpx

        deadline = time.monotonic() + READY_TIMEOUT
        port_file = self.out / f"port-{server.name}"
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise AssertionError(f"server {server.name} exited with {server.proc.returncode}:\n{server.log_tail()}")
            if port_file.exists():
                server.base = f"http://127.0.0.1:{port_file.read_text().strip()}"
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(server.base + "/health", timeout=1.0).status_code == 200:
                        return
            time.sleep(0.05)
        raise AssertionError(f"server {server.name} not ready within {READY_TIMEOUT}s:\n{server.log_tail()}")

    def rotator(self, sub: str) -> Rotator:
        """A rotator process for ``sub`` on this pool's store, connected and waiting for :meth:`Rotator.rotate`."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.mp_server", "--rotate", sub, "--store", self.store, "--pem",
             str(self.issuer.pem_path)],
            cwd=REPO, env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.helpers.append(proc)
        return Rotator(proc)

    def stop(self) -> None:
        procs = [s.proc for s in self.servers] + self.helpers
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def logs(self) -> str:
        return "\n".join(f"--- {s.name} (pid {s.proc.pid}):\n{s.log_tail()}" for s in self.servers)

    def _jsonl(self, pattern: str) -> list[dict[str, Any]]:
        rows = []
        for path in sorted(self.out.glob(pattern)):
            rows.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
        return rows

    def records(self) -> list[dict[str, Any]]:
        """Every admitted request recorded by the views."""
        return self._jsonl("admitted-*.jsonl")

    def decisions(self) -> list[dict[str, Any]]:
        """Every store admission call (servers started with ``decisions=True``)."""
        return self._jsonl("decisions-*.jsonl")


class Rotator:
    """The rotating process: started, connected, waiting for the word."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode(errors="replace")
        if not line:
            rest = self.proc.stdout.read().decode(errors="replace") if self.proc.poll() is not None else ""
            raise AssertionError(f"the rotator exited ({self.proc.poll()}): {rest[-2000:]}")
        return line.strip()

    def wait_ready(self) -> None:
        line = self._line()
        assert line == "ready", f"rotator: {line}"

    def rotate(self) -> dict[str, Any]:
        """Tell it to rotate; returns ``{"called", "returned", "generation"}`` (monotonic ns)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()
        result: dict[str, Any] = json.loads(self._line())
        return result


def with_timeout(uri: str, seconds: float) -> str:
    """``uri`` with the store's ``timeout`` option set (Redis URIs; a SQLite URI is returned as it is)."""
    if uri.startswith("sqlite:"):
        return uri
    return f"{uri}{'&' if '?' in uri else '?'}timeout={seconds}"


def code_of(status: int, body: Any) -> str:
    """``ok`` for a 200, else the problem's ``code``."""
    if status == 200:
        return "ok"
    if isinstance(body, dict):
        return str(body.get("code", "?"))
    return "?"


def headers(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}", "user-agent": "mp-test"}


def record_summary(section: str, data: dict[str, Any]) -> None:
    """Merge ``data`` under ``section`` into the JSON summary file (``SA_REDIS_COUNTS``, default
    ``/tmp/sa-redis-counts.json``), so the counts of a run survive without ``-s``."""
    try:
        summary = json.loads(SUMMARY_FILE.read_text())
    except (OSError, ValueError):
        summary = {}
    summary[section] = {**data, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    tmp = SUMMARY_FILE.with_name(f".{SUMMARY_FILE.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    tmp.replace(SUMMARY_FILE)


def percentiles(values: list[float]) -> dict[str, float | int]:
    """Count, min, median, p95 and max of ``values`` (seconds, rounded to 0.1 ms)."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)
    return {"count": len(ordered), "min": round(ordered[0], 4), "median": at(0.5), "p95": at(0.95),
            "max": round(ordered[-1], 4)}


if __name__ == "__main__":
    main()
