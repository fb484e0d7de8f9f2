"""The MCP adapter through real uvicorn and the MCP SDK's own Streamable HTTP client: per-tool admission, every
denial code, release on every exit path, MCP sessions, hostile lock arguments, start-up checks."""

from __future__ import annotations

import base64
import itertools
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError
from mcp_types import CallToolResult
from support import WAIT, Gate, Gates

from sa_middleware import Guard, Policy
from sa_middleware.adapters.mcp import (
    DENIED,
    GuardTokenVerifier,
    SessionAwareMCP,
    policy,
    sa_context,
    streamable_http_app,
)
from sa_middleware.demo import DemoIssuer, serve_asgi
from sa_middleware.demo_mcp import connect
from sa_middleware.errors import ConfigurationError, StoreError
from sa_middleware.policy import RouteTable
from sa_middleware.records import Admission, Ticket
from sa_middleware.stores.memory import MemoryStore

TABLE = {
    "TOOL exclusive_op": Policy(exclusive=True),
    "TOOL slot": Policy(max_in_flight=1),
    "TOOL once": Policy(one_time=True),
    "TOOL scoped": Policy(scopes={"admin"}),
    "TOOL fresh_auth": Policy(max_auth_age=60),
    "TOOL device": Policy(require_compliant_device=True),
    "TOOL solo": Policy(max_sessions=1),
    "TOOL risky": Policy(raises_risk=1, risk_window=60),
    "TOOL careful": Policy(max_risk=0),
    "PROMPT briefing": Policy(scopes={"admin"}),
    "RESOURCE receipts://{payment_id}": Policy(scopes={"admin"}, locks=["payment:{payment_id}"]),
}
SIMPLE = ("exclusive_op", "slot", "once", "scoped", "fresh_auth", "device", "solo", "risky", "careful", "plain")


class FlakyStore(MemoryStore):
    """A memory store whose admissions fail while ``broken`` is set."""

    broken = False

    def admit(self, admission: Admission) -> Ticket | Any:
        if self.broken:
            raise StoreError("store down")
        return super().admit(admission)


class Bench(Gates):
    """The tools' gates and the intervals they record (lock key, fencing token, start, end, how it ended)."""

    def __init__(self) -> None:
        super().__init__()
        self.intervals: list[dict[str, Any]] = []

    async def run(self, ctx: Context, key: str | None, hold: str, spin: int = 0) -> dict[str, Any]:
        sa = sa_context(ctx)
        start, how = time.monotonic(), "returned"
        try:
            for _ in range(spin):  # let the server's other requests run while this one is inside the tool
                await anyio.sleep(0)
            if hold:
                gate = self.gate(hold)
                gate.entered.set()
                await anyio.to_thread.run_sync(gate.released.wait, WAIT, abandon_on_cancel=True)
        except BaseException:
            how = "cancelled"
            raise
        finally:
            with self._lock:
                self.intervals.append({"key": key, "fence": sa.fencing_tokens.get(key) if key else None,
                                       "start": start, "end": time.monotonic(), "how": how, "hold": hold})
        return {"principal": sa.principal, "kind": sa.kind, "session_id": sa.session_id, "route": sa.route,
                "fencing_tokens": dict(sa.fencing_tokens)}


def build(bench: Bench, guard: Guard) -> Any:
    server = MCPServer("test", log_level="WARNING", token_verifier=GuardTokenVerifier(guard),
                       auth=AuthSettings(issuer_url="https://idp.demo.local",
                                         resource_server_url="http://127.0.0.1:8000/mcp",
                                         validate_token_resource=False))

    @server.tool()
    async def whoami(ctx: Context) -> dict[str, Any]:
        return await bench.run(ctx, None, "")

    @server.tool()
    @policy(locks=["obj:{obj}"])
    async def write(ctx: Context, obj: str, hold: str = "", spin: int = 0) -> dict[str, Any]:
        return await bench.run(ctx, f"obj:{obj}", hold, spin)

    @server.tool()
    @policy(locks=["n:{n}"])
    async def write_int(ctx: Context, n: int, hold: str = "") -> dict[str, Any]:
        return await bench.run(ctx, f"n:{n}", hold)

    @server.tool()
    @policy(locks=["obj:{obj}"])
    async def boom(ctx: Context, obj: str) -> str:
        await bench.run(ctx, f"obj:{obj}", "")
        raise RuntimeError("the tool failed")

    @server.tool()
    @policy(locks=["obj:{obj}"])
    async def progress(ctx: Context, obj: str, steps: int) -> dict[str, Any]:
        for i in range(steps):
            await ctx.report_progress(i + 1, steps)
        return await bench.run(ctx, f"obj:{obj}", "")

    def simple(name: str) -> None:
        async def tool(ctx: Context, hold: str = "") -> dict[str, Any]:
            return await bench.run(ctx, None, hold)
        server.add_tool(tool, name=name)

    for name in SIMPLE:
        simple(name)

    @server.prompt()
    def briefing(topic: str) -> str:
        return f"Brief me on {topic}"

    @server.resource("receipts://{payment_id}")
    def receipt(payment_id: str) -> str:
        return json.dumps(dict(sa_context().fencing_tokens))

    return streamable_http_app(server, guard)


class Site:
    def __init__(self, issuer: DemoIssuer) -> None:
        self.issuer = issuer
        self.store = FlakyStore()
        self.guard = Guard(store=self.store, keys=issuer.public_pem, algorithms=["RS256"], issuer=issuer.issuer,
                           audience=issuer.audience, policies=TABLE)
        self.bench = Bench()
        self.base, self._stop = serve_asgi(build(self.bench, self.guard), lifespan="on")
        self.url = self.base + "/mcp"

    def token(self, sub: str, **claims: Any) -> str:
        return self.issuer.token(sub, **claims)

    def session(self, token: str, name: str = "test-agent") -> Any:
        return connect(self.url, token, name)

    async def wait_free(self) -> None:
        """Until no lock is held (a release happens on the server's side, after a cancellation or a kill)."""
        with anyio.fail_after(WAIT):
            while await self.guard.alocks():
                await anyio.sleep(0.01)

    def close(self) -> None:
        self.bench.release_all()
        self._stop()
        self.guard.close()


@pytest.fixture(scope="module")
def site(issuer: DemoIssuer) -> Iterator[Site]:
    s = Site(issuer)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def fresh() -> str:
    return f"a-{uuid.uuid4().hex[:8]}"


def denied(result: CallToolResult, code: str, status: int) -> dict[str, Any]:
    """Assert the tool result is the denial ``code``: isError, the HTTP problem object and its headers' members."""
    assert result.is_error, result
    problem = result.structured_content
    assert problem is not None
    assert problem["code"] == code and problem["status"] == status
    assert problem["type"] == f"urn:sa-middleware:problem:{code}" and problem["title"] and problem["detail"]
    assert code in result.content[0].text  # type: ignore[union-attr]
    if status in (409, 423, 429, 503):
        assert problem["retry_after"] >= 1
    else:
        assert "retry_after" not in problem
    if status == 401:
        assert problem["www_authenticate"].startswith("Bearer ")
    return problem


def ok(result: CallToolResult) -> dict[str, Any]:
    assert not result.is_error, result
    assert result.structured_content is not None
    return result.structured_content


@asynccontextmanager
async def holding(session: Any, bench: Bench, tool: str, arguments: dict[str, Any]) -> AsyncIterator[Gate]:
    """``tool`` in flight (inside its gate) for the body; then released and its result checked ok."""
    name = uuid.uuid4().hex
    gate = bench.gate(name)
    results: list[CallToolResult] = []

    async def call() -> None:
        results.append(await session.call_tool(tool, {**arguments, "hold": name}))

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        assert await anyio.to_thread.run_sync(gate.entered.wait, WAIT)
        try:
            yield gate
        finally:
            gate.released.set()
    ok(results[0])


# -- token problems stay HTTP 401 with the RFC 6750 / RFC 9728 challenge ----------------------------------------

def test_token_problems_are_http_401_with_resource_metadata(site: Site) -> None:
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-11-25", "capabilities": {},
                       "clientInfo": {"name": "raw", "version": "0"}}}
    headers = {"accept": "application/json, text/event-stream", "content-type": "application/json"}
    for auth in (None, "Bearer not.a.token", f"Bearer {site.token(fresh())}x"):
        extra = {"authorization": auth} if auth else {}
        resp = httpx.post(site.url, json=body, headers={**headers, **extra}, timeout=WAIT)
        assert resp.status_code == 401
        challenge = resp.headers["www-authenticate"]
        assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge
        assert "resource_metadata=" in challenge
    meta = httpx.get(site.base + "/.well-known/oauth-protected-resource/mcp", timeout=WAIT)
    assert meta.status_code == 200 and meta.json()["resource"] == "http://127.0.0.1:8000/mcp"


# -- every denial code, through a tool call ------------------------------------------------------------------------

async def _stale_generation(site: Site) -> CallToolResult:
    sub = fresh()
    async with site.session(site.token(sub, gen=1, sid=f"{sub}-s")) as s:
        ok(await s.call_tool("plain", {}))
        await site.guard.arotate(sub)
        return await s.call_tool("plain", {})


async def _token_revoked(site: Site) -> CallToolResult:
    sub = fresh()
    async with site.session(site.token(sub, iat=time.time() - 30)) as s:
        await site.guard.arevoke_principal(sub)
        return await s.call_tool("plain", {})


async def _session_revoked(site: Site) -> CallToolResult:
    sub = fresh()
    async with site.session(site.token(sub, sid=f"{sub}-s")) as s:
        ok(await s.call_tool("plain", {}))
        await site.guard.arevoke_session(f"{sub}-s")
        return await s.call_tool("plain", {})


async def _credential_compromised(site: Site) -> CallToolResult:
    sub = fresh()
    async with site.session(site.token(sub, sid=f"{sub}-s")) as s:
        ok(await s.call_tool("plain", {}))
        await site.guard.areport_compromise(session_id=f"{sub}-s")
        return await s.call_tool("plain", {})


async def _token_replayed(site: Site) -> CallToolResult:
    async with site.session(site.token(fresh())) as s:
        ok(await s.call_tool("once", {}))
        return await s.call_tool("once", {})


async def _token_reuse(site: Site) -> CallToolResult:
    token = site.token(fresh(), sid=f"{fresh()}-s")
    async with site.session(token, "client-one") as one, site.session(token, "client-two") as two, \
            holding(one, site.bench, "plain", {}):
        return await two.call_tool("plain", {})  # the same token, in flight from another client


async def _step_up_required(site: Site) -> CallToolResult:
    async with site.session(site.token(fresh(), auth_time=time.time() - 3600)) as s:
        return await s.call_tool("fresh_auth", {})


async def _insufficient_scope(site: Site) -> CallToolResult:
    async with site.session(site.token(fresh(), scope="tickets")) as s:
        return await s.call_tool("scoped", {})


async def _session_paused(site: Site) -> CallToolResult:
    sub = fresh()
    async with site.session(site.token(sub, sa_kind="agent", sid=f"{sub}-s")) as s:
        ok(await s.call_tool("plain", {}))
        await site.guard.apause_session(f"{sub}-s")
        return await s.call_tool("plain", {})


async def _device_noncompliant(site: Site) -> CallToolResult:
    async with site.session(site.token(fresh())) as s:
        return await s.call_tool("device", {})


async def _too_many_sessions(site: Site) -> CallToolResult:
    token = site.token(fresh())  # no sid: each MCP session is a session
    async with site.session(token) as one, site.session(token) as two:
        ok(await one.call_tool("solo", {}))
        return await two.call_tool("solo", {})


async def _risk_too_high(site: Site) -> CallToolResult:
    async with site.session(site.token(fresh())) as s:
        ok(await s.call_tool("risky", {}))
        return await s.call_tool("careful", {})


async def _conflicting_action(site: Site) -> CallToolResult:
    async with site.session(site.token(fresh())) as s, holding(s, site.bench, "plain", {}):
        return await s.call_tool("exclusive_op", {})


async def _object_locked(site: Site) -> CallToolResult:
    obj = fresh()
    async with site.session(site.token(fresh())) as a, site.session(site.token(fresh())) as b, \
            holding(a, site.bench, "write", {"obj": obj}):
        return await b.call_tool("write", {"obj": obj})


async def _too_many_in_flight(site: Site) -> CallToolResult:
    async with site.session(site.token(fresh())) as s, holding(s, site.bench, "slot", {}):
        return await s.call_tool("slot", {})


async def _store_unavailable(site: Site) -> CallToolResult:
    async with site.session(site.token(fresh())) as s:
        site.store.broken = True
        try:
            return await s.call_tool("plain", {})
        finally:
            site.store.broken = False


SCENARIOS: dict[str, tuple[int, Callable[[Site], Any]]] = {
    "stale_generation": (401, _stale_generation), "token_revoked": (401, _token_revoked),
    "session_revoked": (401, _session_revoked), "credential_compromised": (401, _credential_compromised),
    "token_replayed": (401, _token_replayed), "token_reuse": (401, _token_reuse),
    "step_up_required": (401, _step_up_required), "insufficient_scope": (403, _insufficient_scope),
    "session_paused": (403, _session_paused), "device_noncompliant": (403, _device_noncompliant),
    "too_many_sessions": (403, _too_many_sessions), "risk_too_high": (403, _risk_too_high),
    "conflicting_action": (409, _conflicting_action), "object_locked": (423, _object_locked),
    "too_many_in_flight": (429, _too_many_in_flight), "store_unavailable": (503, _store_unavailable),
}


@pytest.mark.anyio
@pytest.mark.parametrize("code", list(SCENARIOS))
async def test_every_denial_code_is_a_tool_error_with_the_http_problem(site: Site, code: str) -> None:
    status, scenario = SCENARIOS[code]
    problem = denied(await scenario(site), code, status)
    if code == "insufficient_scope":
        assert problem["scope"] == "admin"
    if code == "step_up_required":
        assert problem["max_age"] == 60 and 'error="insufficient_user_authentication"' in problem["www_authenticate"]


@pytest.mark.anyio
async def test_a_refused_prompt_is_a_json_rpc_error_with_the_problem(site: Site) -> None:
    async with site.session(site.token(fresh())) as s:
        with pytest.raises(MCPError) as raised:
            await s.get_prompt("briefing", {"topic": "x"})
        assert raised.value.error.code == DENIED
        assert raised.value.error.data["code"] == "insufficient_scope"
    async with site.session(site.token(fresh(), scope="admin")) as s:
        assert "Brief me on x" in str((await s.get_prompt("briefing", {"topic": "x"})).messages[0].content)


@pytest.mark.anyio
async def test_a_resource_read_is_admitted_with_its_uri_variables(site: Site) -> None:
    async with site.session(site.token(fresh())) as s:
        with pytest.raises(MCPError) as raised:
            await s.read_resource("receipts://42")
        assert raised.value.error.code == DENIED
        assert raised.value.error.data["code"] == "insufficient_scope"
    async with site.session(site.token(fresh(), scope="admin")) as s:
        read = await s.read_resource("receipts://42")
        assert set(json.loads(read.contents[0].text)) == {"payment:42"}  # type: ignore[union-attr]
        with pytest.raises(MCPError) as raised:
            await s.read_resource("receipts://" + "9" * 300)
        assert raised.value.error.code == -32602 and "payment_id" in raised.value.error.message
    assert not await site.guard.alocks()


# -- context, fencing, release on every exit path ------------------------------------------------------------------

@pytest.mark.anyio
async def test_the_tool_reads_its_context_and_fencing_token(site: Site) -> None:
    sub, obj = fresh(), fresh()
    async with site.session(site.token(sub, sa_kind="agent", sid=f"{sub}-s")) as s:
        first = ok(await s.call_tool("write", {"obj": obj}))
        second = ok(await s.call_tool("write", {"obj": obj}))  # released on success: the same agent locks again
    assert (first["principal"], first["kind"], first["session_id"]) == (sub, "agent", f"{sub}-s")
    assert first["route"] == "TOOL write"
    assert set(first["fencing_tokens"]) == {f"obj:{obj}"}
    assert second["fencing_tokens"][f"obj:{obj}"] > first["fencing_tokens"][f"obj:{obj}"]


@pytest.mark.anyio
async def test_release_after_a_tool_exception_and_after_progress(site: Site) -> None:
    obj = fresh()
    seen: list[float] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append(progress)

    async with site.session(site.token(fresh())) as a, site.session(site.token(fresh())) as b:
        failed = await a.call_tool("boom", {"obj": obj})
        assert failed.is_error and "boom" in failed.content[0].text  # type: ignore[union-attr]
        ok(await b.call_tool("write", {"obj": obj}))  # another principal: the lock was released
        ok(await a.call_tool("progress", {"obj": obj, "steps": 3}, progress_callback=on_progress))
        ok(await b.call_tool("write", {"obj": obj}))
    assert seen == [1, 2, 3]
    assert not await site.guard.alocks()


@pytest.mark.anyio
async def test_release_when_the_client_cancels_the_call(site: Site) -> None:
    obj, name = fresh(), uuid.uuid4().hex
    gate = site.bench.gate(name)
    async with site.session(site.token(fresh())) as a, site.session(site.token(fresh())) as b:
        async with anyio.create_task_group() as tg:
            tg.start_soon(a.call_tool, "write", {"obj": obj, "hold": name})
            assert await anyio.to_thread.run_sync(gate.entered.wait, WAIT)
            denied(await b.call_tool("write", {"obj": obj}), "object_locked", 423)
            tg.cancel_scope.cancel()  # the client sends notifications/cancelled
        await site.wait_free()
        ok(await b.call_tool("write", {"obj": obj}))
    assert not gate.released.is_set()
    assert [i["how"] for i in site.bench.intervals if i["hold"] == name] == ["cancelled"]


KILLED_CLIENT = """
import sys, anyio
from sa_middleware.demo_mcp import connect

async def main():
    async with connect(sys.argv[1], sys.argv[2]) as s:
        await s.call_tool("write", {"obj": sys.argv[3], "hold": sys.argv[4]})

anyio.run(main)
"""


@pytest.mark.anyio
async def test_release_when_the_client_disappears(site: Site) -> None:
    obj, name = fresh(), uuid.uuid4().hex
    gate = site.bench.gate(name)
    client = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, site.url, site.token(fresh()), obj, name])
    try:
        assert await anyio.to_thread.run_sync(gate.entered.wait, WAIT)
    finally:
        client.kill()
        client.wait(WAIT)
    gate.released.set()  # if the tool still runs, it finishes now; either way its ticket must go
    await site.wait_free()
    async with site.session(site.token(fresh())) as b:
        ok(await b.call_tool("write", {"obj": obj}))


@pytest.mark.anyio
async def test_concurrent_sessions_never_overlap_on_a_lock(site: Site) -> None:
    obj = fresh()
    outcomes: list[str] = []

    async def agent(i: int) -> None:
        async with site.session(site.token(fresh())) as s:
            written = 0
            for _ in range(200):  # until this agent has written twice (refused calls are retried)
                result = await s.call_tool("write", {"obj": obj, "spin": 50})
                outcomes.append("ok" if not result.is_error else denied(result, "object_locked", 423)["code"])
                written += not result.is_error
                if written == 2:
                    return

    async with anyio.create_task_group() as tg:
        for i in range(4):
            tg.start_soon(agent, i)
    mine = sorted((i for i in site.bench.intervals if i["key"] == f"obj:{obj}"), key=lambda i: i["start"])
    assert len(mine) == outcomes.count("ok") == 8
    for before, after in itertools.pairwise(mine):
        assert before["end"] <= after["start"], "two tool calls held the same lock at once"
        assert after["fence"] > before["fence"]


# -- hostile lock arguments ----------------------------------------------------------------------------------------

@pytest.mark.anyio
@pytest.mark.parametrize(("tool", "arguments", "reason"), [
    ("write", {}, "obj is required"),
    ("write", {"obj": 42}, "obj must be a string"),
    ("write", {"obj": None}, "obj must be a string"),
    ("write", {"obj": ["a"]}, "obj must be a string"),
    ("write", {"obj": ""}, "obj must have 1 to 256 characters"),
    ("write", {"obj": "x" * 100_000}, "obj must have 1 to 256 characters"),
    ("write", {"obj": "a\nb"}, "non-printable"),
    ("write", {"obj": "a\x00b"}, "non-printable"),
    ("write", {"obj": "a\u202eb"}, "non-printable"),
    ("write_int", {"n": "7"}, "n must be an integer"),
    ("write_int", {"n": 7.0}, "n must be an integer"),
    ("write_int", {"n": True}, "n must be an integer"),
    ("write_int", {"n": 10**30}, "n is out of range"),
])
async def test_hostile_lock_arguments_are_a_clear_error(site: Site, tool: str, arguments: dict[str, Any],
                                                        reason: str) -> None:
    async with site.session(site.token(fresh())) as s:
        result = await s.call_tool(tool, arguments)
        assert result.is_error
        assert result.structured_content is not None
        assert result.structured_content["type"] == "urn:sa-middleware:problem:invalid_argument"
        assert reason in result.structured_content["detail"]
        ok(await s.call_tool("whoami", {}))  # the server and the session carry on


@pytest.mark.anyio
async def test_one_object_is_one_lock_whatever_the_spelling(site: Site) -> None:
    async with site.session(site.token(fresh())) as a, site.session(site.token(fresh())) as b, \
            holding(a, site.bench, "write_int", {"n": 7}):
        assert [lock.key for lock in await site.guard.alocks()] == ["n:7"]
        denied(await b.call_tool("write_int", {"n": 7}), "object_locked", 423)
        for spelling in ("7", 7.0, "07"):
            result = await b.call_tool("write_int", {"n": spelling})
            assert result.is_error and result.structured_content["status"] == 400  # type: ignore[index]
        assert [lock.key for lock in await site.guard.alocks()] == ["n:7"]


@pytest.mark.anyio
async def test_a_path_like_string_argument_is_one_object_or_refused(site: Site) -> None:
    obj = fresh()
    async with site.session(site.token(fresh())) as a, site.session(site.token(fresh())) as b, \
            holding(a, site.bench, "write", {"obj": f"{obj}/x"}):
        assert [lock.key for lock in await site.guard.alocks() if obj in lock.key] == [f"obj:{obj}/x"]
        denied(await b.call_tool("write", {"obj": f"{obj}//x/"}), "object_locked", 423)  # the same object
        for spelling in (f"{obj}/./x", f"{obj}/../{obj}/x", "x" * 600):
            result = await b.call_tool("write", {"obj": spelling})
            assert result.is_error and result.structured_content["status"] == 400  # type: ignore[index]
        assert [lock.key for lock in await site.guard.alocks() if obj in lock.key] == [f"obj:{obj}/x"]


# -- MCP sessions --------------------------------------------------------------------------------------------------

@pytest.mark.anyio
async def test_the_mcp_session_is_the_session_and_ending_it_ends_it_in_the_store(site: Site) -> None:
    sub = fresh()
    token = site.token(sub, sa_kind="agent")  # no sid
    async with site.session(token, "planner") as one:
        first = ok(await one.call_tool("solo", {}))
        assert first["session_id"].startswith("mcp:")
        async with site.session(token, "planner") as two:
            denied(await two.call_tool("solo", {}), "too_many_sessions", 403)
        # the second MCP session was never admitted; ending the first frees the slot
    [stored] = [s for s in await site.guard.asessions(sub) if s.session_id == first["session_id"]]
    assert stored.user_agent == "planner/1.0 (MCP)"
    assert stored.status == "revoked"
    async with site.session(token, "planner") as three:
        again = ok(await three.call_tool("solo", {}))
    assert again["session_id"] != first["session_id"]


@pytest.mark.anyio
async def test_a_token_sid_wins_over_the_mcp_session(site: Site) -> None:
    sub = fresh()
    token = site.token(sub, sid=f"{sub}-s")
    async with site.session(token) as one:
        assert ok(await one.call_tool("whoami", {}))["session_id"] == f"{sub}-s"
    async with site.session(token) as two:  # closing an MCP session does not end the token's own session
        assert ok(await two.call_tool("whoami", {}))["session_id"] == f"{sub}-s"


@pytest.mark.anyio
async def test_an_mcp_session_id_with_another_principals_token_is_refused(site: Site) -> None:
    owner, thief = site.token(fresh()), site.token(fresh())
    async with site.session(owner) as s:
        session = ok(await s.call_tool("whoami", {}))["session_id"].removeprefix("mcp:")
        call = {"jsonrpc": "2.0", "id": 99, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}
        headers = {"accept": "application/json, text/event-stream", "content-type": "application/json",
                   "mcp-session-id": session, "mcp-protocol-version": "2025-11-25"}
        async with httpx.AsyncClient(timeout=WAIT) as http:
            stolen = await http.post(site.url, json=call, headers={**headers, "authorization": f"Bearer {thief}"})
            assert stolen.status_code == 404
            ended = await http.delete(site.url, headers={**headers, "authorization": f"Bearer {thief}"})
            assert ended.status_code == 404
            own = await http.post(site.url, json=call, headers={**headers, "authorization": f"Bearer {owner}"})
            assert own.status_code == 200 and "mcp:" + session in own.text
    assert [s.status for s in await site.guard.asessions(_sub(owner)) if s.session_id == f"mcp:{session}"] \
        == ["revoked"]  # ended by its owner's client, not before


def _sub(token: str) -> str:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return str(claims["sub"])


@pytest.mark.anyio
async def test_stateless_mode_uses_the_tokens_own_session(issuer: DemoIssuer) -> None:
    guard = Guard(store="memory://", keys=issuer.public_pem, algorithms=["RS256"], issuer=issuer.issuer,
                  audience=issuer.audience, default_policy=Policy(max_sessions=1))
    server = _server(guard)

    @server.tool()
    async def whoami() -> dict[str, Any]:
        return {"session_id": sa_context().session_id}

    base, stop = serve_asgi(streamable_http_app(server, guard, stateless_http=True), lifespan="on")
    try:
        sub = fresh()
        async with connect(base + "/mcp", issuer.token(sub, jti="j-1")) as s:
            assert ok(await s.call_tool("whoami", {}))["session_id"] == "j-1"
        async with connect(base + "/mcp", issuer.token(sub, jti="j-2")) as s:
            denied(await s.call_tool("whoami", {}), "too_many_sessions", 403)
        # no session manager checks an Mcp-Session-Id here: a client's own header never names the session
        call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "whoami", "arguments": {}}}
        headers = {"accept": "application/json, text/event-stream", "content-type": "application/json",
                   "mcp-session-id": "chosen-by-the-client", "mcp-protocol-version": "2025-11-25",
                   "authorization": f"Bearer {issuer.token(sub, jti='j-1')}"}
        async with httpx.AsyncClient(timeout=WAIT) as http:
            resp = await http.post(base + "/mcp", json=call, headers=headers)
        assert resp.status_code == 200 and "j-1" in resp.text and "chosen-by-the-client" not in resp.text
    finally:
        stop()
        guard.close()


# -- start-up checks -----------------------------------------------------------------------------------------------

def _server(guard: Guard) -> MCPServer[Any]:
    return MCPServer("check", log_level="WARNING", token_verifier=GuardTokenVerifier(guard),
                     auth=AuthSettings(issuer_url="https://idp.demo.local", resource_server_url="http://x/mcp",
                                       validate_token_resource=False))


def _guard(issuer: DemoIssuer, **policies: Policy) -> Guard:
    return Guard(store="memory://", keys=issuer.public_pem, algorithms=["RS256"],
                 policies={key.replace("__", " "): value for key, value in policies.items()})


def test_a_table_key_naming_no_tool_fails_at_start_up_with_a_suggestion(issuer: DemoIssuer) -> None:
    guard = _guard(issuer, TOOL__aprove_payment=Policy(exclusive=True))
    server = _server(guard)

    @server.tool()
    def approve_payment(payment_id: str) -> str:
        return payment_id

    with pytest.raises(ConfigurationError, match="did you mean 'TOOL approve_payment'"):
        streamable_http_app(server, guard)


@pytest.mark.parametrize(("locks", "message"), [
    (["payment:{id}"], "uses {id}, not a parameter"),
    (["payment:{items}"], "must be declared as a str or an int"),
])
def test_lock_templates_are_checked_against_the_tool_parameters(issuer: DemoIssuer, locks: list[str],
                                                                message: str) -> None:
    guard = _guard(issuer)
    server = _server(guard)

    @server.tool()
    @policy(locks=locks)
    def approve(payment_id: str, items: list[str]) -> str:
        return payment_id

    with pytest.raises(ConfigurationError, match=message):
        SessionAwareMCP(server, guard)


def test_a_table_entry_lock_template_is_checked_too_and_installing_twice_is_refused(issuer: DemoIssuer) -> None:
    guard = _guard(issuer, TOOL__approve=Policy(locks=["p:{nope}"]))
    server = _server(guard)

    @server.tool()
    def approve(payment_id: str) -> str:
        return payment_id

    with pytest.raises(ConfigurationError, match=r"uses \{nope\}"):
        SessionAwareMCP(server, guard)
    good = _guard(issuer, TOOL__approve=Policy(locks=["p:{payment_id}"]))
    other = _server(good)
    other.add_tool(approve)
    SessionAwareMCP(other, good)
    with pytest.raises(ConfigurationError, match="installed twice"):
        SessionAwareMCP(other, good)


def test_http_requests_never_match_tool_keys_and_bad_keys_are_refused() -> None:
    table = RouteTable({"TOOL approve": Policy(exclusive=True), "prompt  brief ": Policy(scopes={"a"}),
                        "RESOURCE files://{path}": Policy(locks=["file:{path}"]),
                        "POST /approve": Policy(max_in_flight=2)})
    assert set(table.targets) == {"TOOL approve", "PROMPT brief", "RESOURCE files://{path}"}
    assert table.match("POST", "/approve").route == "POST /approve"
    assert table.match("TOOL", "approve").route is None
    for bad in ("TOOL", "TOOL a b", "TOOL " + "x" * 129, "PROMPT a\nb", "RESOURCE a b", "RESOURCE"):
        with pytest.raises(ConfigurationError):
            RouteTable({bad: Policy()})
    with pytest.raises(ConfigurationError, match="scopes"):
        RouteTable({"TOOL x": Policy(scopes=[""])})


def test_sa_context_outside_a_call_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="no sa-middleware context"):
        sa_context()


def test_the_verifier_reports_the_principal_the_sdk_binds_sessions_to(issuer: DemoIssuer) -> None:
    guard = Guard(store="memory://", keys=issuer.public_pem, algorithms=["RS256"], issuer=issuer.issuer,
                  audience=issuer.audience)
    verifier = GuardTokenVerifier(guard, resource=issuer.audience)
    token = issuer.token("svc", client_id="app-1", scope="a b")
    access = anyio.run(verifier.verify_token, token)
    assert access is not None
    assert (access.client_id, access.subject, access.scopes, access.resource) == ("app-1", "svc", ["a", "b"],
                                                                                    issuer.audience)
    assert access.claims == {"iss": issuer.issuer}
    assert anyio.run(verifier.verify_token, token + "x") is None
    assert json.dumps(access.model_dump(exclude={"token"})).count(token) == 0
    guard.close()

