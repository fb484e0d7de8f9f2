"""The five behaviours, end to end over real HTTP, on uvicorn (ASGI) and werkzeug's threaded server (WSGI).

Every server gets a fresh SQLite store file. Requests are held in flight deterministically with the workbench's
``?hold=NAME`` gates (the test waits on the gate's ``entered`` event, never on a sleep), and concurrent requests
start together at a ``threading.Barrier``.
"""

from __future__ import annotations

import queue
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import Tracker

from sa_middleware import Guard, demo
from sa_middleware.asgi import SessionAwareMiddleware
from sa_middleware.demo import DemoIssuer, Workbench, play, serve_asgi, serve_wsgi, workbench_guard
from sa_middleware.denials import Denial
from sa_middleware.records import Admission, Ticket
from sa_middleware.stores.sqlite import SQLiteStore
from sa_middleware.wsgi import SessionAwareWSGIMiddleware

WAIT = 15.0  # upper bound for any wait in this module; reached only when something is broken
_demo_request = demo.request


class Held:
    """A request held inside the workbench view (``?hold=NAME``) until :meth:`release`."""

    def __init__(self, server: Server, method: str, path: str, token: str) -> None:
        self.server = server
        self.name = uuid.uuid4().hex[:10]
        self.gate = server.bench.gate(self.name)
        self.response: httpx.Response | None = None
        self.error: BaseException | None = None
        sep = "&" if "?" in path else "?"
        self._thread = threading.Thread(target=self._run, args=(method, f"{path}{sep}hold={self.name}", token),
                                        daemon=True)
        self._thread.start()

    def _run(self, method: str, path: str, token: str) -> None:
        try:
            self.response = self.server.request(method, path, token)
        except BaseException as exc:  # reported by wait_entered / release
            self.error = exc

    def wait_entered(self) -> None:
        """Block until the request is inside the view; fail if it finished (was refused) or never arrived."""
        for _ in range(int(WAIT / 0.05)):
            if self.gate.entered.wait(0.05):
                return
            if not self._thread.is_alive():
                got = self.response.status_code if self.response is not None else self.error
                pytest.fail(f"held request finished without entering the view: {got}, "
                            f"{self.response.text if self.response is not None else ''}")
        pytest.fail(f"held request did not enter the view within {WAIT} s")

    def release(self) -> httpx.Response:
        """Let the view finish; returns the response once the middleware is done with the request."""
        self.gate.released.set()
        self._thread.join(WAIT * 2)
        assert not self._thread.is_alive(), "held request did not finish after its gate was released"
        assert self.response is not None, f"held request failed: {self.error!r}"
        return self.response

    def abandon(self) -> None:
        self.gate.released.set()
        self._thread.join(WAIT)


class Server:
    """A workbench on one server flavour with its own issuer, guard and SQLite store file."""

    def __init__(self, flavour: str, db: Path, store: Any = None) -> None:
        self.flavour = flavour
        self.db = db
        self.issuer = DemoIssuer()
        self.guard: Guard = workbench_guard(self.issuer, store if store is not None else f"sqlite:///{db}")
        self.bench = Workbench()
        self._held: list[Held] = []
        if flavour == "asgi":
            self.tracker = Tracker(self.bench.track_asgi(SessionAwareMiddleware(self.bench.asgi, guard=self.guard)))
            self.base, self._stop = serve_asgi(self.tracker.asgi_app())
        else:
            self.tracker = Tracker(self.bench.track_wsgi(SessionAwareWSGIMiddleware(self.bench.wsgi,
                                                                                    guard=self.guard)))
            self.base, self._stop = serve_wsgi(self.tracker.wsgi)

    def _finished(self, rid: str) -> None:
        assert self.tracker.done(rid).wait(WAIT), f"the middleware never finished request {rid}"

    def request(self, method: str, path: str, token: str | None = None) -> httpx.Response:
        """One request; returns once the middleware has finished it (its ticket is released)."""
        headers = {"user-agent": "behaviours-test"}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        rid = uuid.uuid4().hex
        sep = "&" if "?" in path else "?"
        resp = httpx.request(method, f"{self.base}{path}{sep}rid={rid}", headers=headers, timeout=WAIT * 2)
        self._finished(rid)
        return resp

    def demo_request(self, base: str, method: str, path: str, token: str | None = None,
                     agent: str = "sa-demo") -> tuple[int, dict[str, Any]]:
        """``sa_middleware.demo.request`` that returns once the middleware has finished the request."""
        rid = uuid.uuid4().hex
        sep = "&" if "?" in path else "?"
        result = _demo_request(base, method, f"{path}{sep}rid={rid}", token, agent)
        self._finished(rid)
        return result

    def hold(self, method: str, path: str, token: str) -> Held:
        held = Held(self, method, path, token)
        self._held.append(held)
        return held

    def statuses(self, sub: str) -> dict[str, str]:
        return {s.session_id: s.status for s in self.guard.sessions(sub)}

    def close(self) -> None:
        for held in self._held:
            held.abandon()
        self._stop()
        self.guard.close()


@pytest.fixture(params=["asgi", "wsgi"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    srv = Server(request.param, tmp_path / f"{request.param}.db")
    try:
        yield srv
    finally:
        srv.close()


def code(resp: httpx.Response) -> str:
    """The problem+json ``code`` of a denial, or ``"ok"`` for a 2xx."""
    if resp.is_success:
        return "ok"
    assert resp.headers["content-type"] == "application/problem+json", resp.text
    body: dict[str, Any] = resp.json()
    assert body["status"] == resp.status_code
    return str(body["code"])


def expect(resp: httpx.Response, status: int, want: str) -> httpx.Response:
    assert (resp.status_code, code(resp)) == (status, want), resp.text
    if status in (409, 423, 429, 503):
        assert int(resp.headers["retry-after"]) >= 1
    else:
        assert "retry-after" not in resp.headers
    if status in (401, 403):
        challenge = resp.headers["www-authenticate"]
        assert challenge.startswith("Bearer")
        if status == 401:
            assert 'error="invalid_token"' in challenge
        if want == "insufficient_scope":
            assert 'error="insufficient_scope"' in challenge
    else:
        assert "www-authenticate" not in resp.headers
    return resp


def run_id() -> str:
    return uuid.uuid4().hex[:6]


# -- 1. an agent's ticket in flight blocks its payment approval; the raised risk then refuses it ----------------

def test_agent_ticket_in_flight_blocks_approval_then_risk_refuses(server: Server) -> None:
    agent = f"agent-{run_id()}"
    tok = server.issuer.token(agent, sa_kind="agent", sid=f"{agent}-s1", scope="tickets payments:approve")
    ticket = server.hold("POST", "/tickets", tok)
    ticket.wait_entered()  # the ticket request is provably in flight

    # a second thread fires the approval while the ticket is in flight
    results: queue.Queue[httpx.Response] = queue.Queue()
    approver = threading.Thread(target=lambda: results.put(server.request("POST", "/payments/42/approve", tok)))
    approver.start()
    approver.join(WAIT)
    expect(results.get(timeout=WAIT), 409, "conflicting_action")
    assert not server.guard.locks(), "a refused approval must not hold the payment lock"
    assert not ticket.gate.released.is_set()

    done = ticket.release()
    assert done.status_code == 200 and done.json()["principal"] == agent
    assert done.json()["kind"] == "agent"

    # the ticket finished, but it raised the agent's risk for its window: the approval (max_risk=0) is refused
    expect(server.request("POST", "/payments/42/approve", tok), 403, "risk_too_high")
    assert server.statuses(agent) == {f"{agent}-s1": "active"}

    # risk is per principal: another agent with no ticket behind it is admitted and takes the lock's first fence
    other = f"agent-{run_id()}"
    otok = server.issuer.token(other, sa_kind="agent", sid=f"{other}-s1", scope="payments:approve")
    ok = expect(server.request("POST", "/payments/42/approve", otok), 200, "ok")
    assert list(ok.json()["fencing_tokens"]) == ["payment:42"]


def test_approval_in_flight_blocks_tickets_of_the_same_agent(server: Server) -> None:
    """``exclusive`` works both ways: an exclusive action in flight refuses every other action of the principal."""
    agent = f"agent-{run_id()}"
    tok = server.issuer.token(agent, sa_kind="agent", sid=f"{agent}-s1", scope="payments:approve")
    approval = server.hold("POST", "/payments/9/approve", tok)
    approval.wait_entered()
    locks = server.guard.locks()
    assert [(lk.key, lk.sub) for lk in locks] == [("payment:9", agent)] and locks[0].fencing_token >= 1
    expect(server.request("POST", "/tickets", tok), 409, "conflicting_action")
    expect(server.request("GET", "/whoami", tok), 409, "conflicting_action")
    assert approval.release().status_code == 200
    assert server.guard.locks() == []
    expect(server.request("POST", "/tickets", tok), 200, "ok")


# -- 2. a service account rotates its credential mid-session ------------------------------------------------------

def test_rotation_mid_session(server: Server) -> None:
    svc = f"svc-{run_id()}"
    sid = f"{svc}-s1"
    old = server.issuer.token(svc, client_id=svc, gen=1, sid=sid)
    first = expect(server.request("GET", "/whoami", old), 200, "ok")
    assert first.json()["kind"] == "service"  # client-credentials token: sub == client_id

    in_flight = server.hold("GET", "/whoami", old)  # a request of the old generation is running...
    in_flight.wait_entered()
    assert server.guard.rotate(svc) == 2  # ...when the IdP rotates the credential
    expect(server.request("GET", "/whoami", old), 401, "stale_generation")
    assert in_flight.release().status_code == 200  # admitted before the rotation: it completes

    new = server.issuer.token(svc, client_id=svc, gen=2, sid=sid)
    expect(server.request("GET", "/whoami", new), 200, "ok")
    assert server.statuses(svc) == {sid: "active"}  # same session, continued with the new credential
    expect(server.request("GET", "/whoami", old), 401, "stale_generation")

    # the new-generation token is validated against the current policy: no payments:approve scope, no approval
    refused = expect(server.request("POST", "/payments/43/approve", new), 403, "insufficient_scope")
    assert 'scope="payments:approve"' in refused.headers["www-authenticate"]
    assert refused.json()["scope"] == "payments:approve"
    scoped = server.issuer.token(svc, client_id=svc, gen=2, sid=sid, scope="payments:approve")
    ok = expect(server.request("POST", "/payments/43/approve", scoped), 200, "ok")
    assert list(ok.json()["fencing_tokens"]) == ["payment:43"]


def test_higher_generation_ratchets_without_rotate(server: Server) -> None:
    svc = f"svc-{run_id()}"
    gen1 = server.issuer.token(svc, client_id=svc, gen=1, sid=f"{svc}-a")
    gen1_other_session = server.issuer.token(svc, client_id=svc, gen=1, sid=f"{svc}-b")
    expect(server.request("GET", "/whoami", gen1), 200, "ok")
    expect(server.request("GET", "/whoami", gen1_other_session), 200, "ok")

    gen2 = server.issuer.token(svc, client_id=svc, gen=2, sid=f"{svc}-c")
    expect(server.request("GET", "/whoami", gen2), 200, "ok")  # rotation observed: the store ratchets to 2
    expect(server.request("GET", "/whoami", gen1), 401, "stale_generation")
    expect(server.request("GET", "/whoami", gen1_other_session), 401, "stale_generation")
    expect(server.request("GET", "/whoami", gen2), 200, "ok")
    assert server.guard.rotate(svc) == 3  # the store's generation was 2
    expect(server.request("GET", "/whoami", gen2), 401, "stale_generation")


# -- 3. a human and a non-human workflow modify the same object ---------------------------------------------------

def human_and_workflow(server: Server) -> tuple[str, str, str, str]:
    """A human and a workflow (a service) of a fresh run and a token for each one's session: human, flow, tokens."""
    run = run_id()
    human, flow = f"alice-{run}", f"workflow-{run}"
    htok = server.issuer.token(human, sid=f"{human}-s1")
    ftok = server.issuer.token(flow, sa_kind="service", sid=f"{flow}-s1")
    return human, flow, htok, ftok


def test_human_writes_first_workflow_is_paused(server: Server) -> None:
    human, flow, htok, ftok = human_and_workflow(server)

    write = server.hold("PUT", "/objects/7", htok)
    write.wait_entered()
    [lock] = server.guard.locks()
    assert (lock.key, lock.sub, lock.session_id, lock.mode) == ("object:7", human, f"{human}-s1", "exclusive")

    expect(server.request("PUT", "/objects/7", ftok), 403, "session_paused")
    assert server.statuses(flow) == {f"{flow}-s1": "paused"}
    expect(server.request("GET", "/whoami", ftok), 403, "session_paused")  # paused for every route
    expect(server.request("PUT", "/objects/99", ftok), 403, "session_paused")

    done = write.release()
    assert done.status_code == 200 and list(done.json()["fencing_tokens"]) == ["object:7"]
    assert server.guard.locks() == []
    expect(server.request("GET", "/whoami", ftok), 403, "session_paused")  # stays paused until an operator acts
    assert server.statuses(human) == {f"{human}-s1": "active"}

    assert server.guard.resume_session(f"{flow}-s1")
    ok = expect(server.request("PUT", "/objects/7", ftok), 200, "ok")
    assert ok.json()["fencing_tokens"]["object:7"] > done.json()["fencing_tokens"]["object:7"]  # strictly increase
    assert server.statuses(flow) == {f"{flow}-s1": "active"}


def test_workflow_writes_first_human_gets_locked_and_workflow_paused(server: Server) -> None:
    human, flow, htok, ftok = human_and_workflow(server)

    write = server.hold("PUT", "/objects/8", ftok)
    write.wait_entered()
    assert server.statuses(flow) == {f"{flow}-s1": "active"}

    refused = expect(server.request("PUT", "/objects/8", htok), 423, "object_locked")
    assert "object:8" in refused.json()["detail"]
    # the human is never paused; the workflow holding the object is, while its write is still in flight
    assert server.statuses(flow) == {f"{flow}-s1": "paused"}
    assert server.statuses(human) == {}  # the refused request did not open a session for the human
    [lock] = server.guard.locks()
    assert (lock.key, lock.sub) == ("object:8", flow)

    done = write.release()  # the write that was already admitted completes
    assert done.status_code == 200 and list(done.json()["fencing_tokens"]) == ["object:8"]
    expect(server.request("GET", "/whoami", ftok), 403, "session_paused")
    ok = expect(server.request("PUT", "/objects/8", htok), 200, "ok")
    assert ok.json()["fencing_tokens"]["object:8"] > done.json()["fencing_tokens"]["object:8"]
    assert server.statuses(human) == {f"{human}-s1": "active"}


def test_concurrent_writers_exactly_one_holds_the_object(server: Server) -> None:
    run = run_id()
    writers = 6
    tokens = [server.issuer.token(f"op{i}-{run}", sid=f"op{i}-{run}-s") for i in range(writers)]
    names = [uuid.uuid4().hex[:10] for _ in range(writers)]
    gates = [server.bench.gate(name) for name in names]
    barrier = threading.Barrier(writers)
    results: queue.Queue[tuple[int, httpx.Response]] = queue.Queue()

    def write(i: int) -> None:
        barrier.wait(WAIT)
        results.put((i, server.request("PUT", f"/objects/55?hold={names[i]}", tokens[i])))

    threads = [threading.Thread(target=write, args=(i,), daemon=True) for i in range(writers)]
    for t in threads:
        t.start()
    try:
        refused = [results.get(timeout=WAIT) for _ in range(writers - 1)]
        assert all((r.status_code, code(r)) == (423, "object_locked") for _, r in refused), \
            [(r.status_code, r.text) for _, r in refused]
        [winner] = set(range(writers)) - {j for j, _ in refused}
        assert gates[winner].entered.wait(WAIT), "the admitted writer never entered the view"
        assert [g.entered.is_set() for g in gates].count(True) == 1
        [lock] = server.guard.locks()
        assert (lock.key, lock.sub) == ("object:55", f"op{winner}-{run}")
    finally:
        for g in gates:
            g.released.set()
    i, last = results.get(timeout=WAIT)
    assert i == winner and last.status_code == 200
    for t in threads:
        t.join(WAIT)


# -- 4. a compromise reported on one session re-evaluates every related context ------------------------------------

def test_compromise_hits_related_contexts_only(server: Server) -> None:
    run = run_id()
    bot, user = f"bot-{run}", f"bob-{run}"
    s1 = server.issuer.token(bot, sa_kind="agent", sid=f"{bot}-s1", gen=1)
    s2 = server.issuer.token(bot, sa_kind="agent", sid=f"{bot}-s2", gen=1)
    delegated = server.issuer.token(user, sid=f"{user}-via-{bot}", act={"sub": bot})
    own = server.issuer.token(user, sid=f"{user}-own")
    stolen = server.issuer.token(bot, sa_kind="agent", sid=f"{bot}-s3", gen=1)  # issued before, never used yet
    for token in (s1, s2, delegated, own):
        expect(server.request("GET", "/whoami", token), 200, "ok")

    hit = server.guard.report_compromise(session_id=f"{bot}-s1")
    assert set(hit) == {f"{bot}-s1", f"{bot}-s2", f"{user}-via-{bot}"}
    assert server.statuses(bot) == {f"{bot}-s1": "compromised", f"{bot}-s2": "compromised"}
    assert server.statuses(user) == {f"{user}-via-{bot}": "compromised", f"{user}-own": "active"}

    expect(server.request("GET", "/whoami", s1), 401, "credential_compromised")
    expect(server.request("GET", "/whoami", s2), 401, "credential_compromised")  # the sibling session
    expect(server.request("GET", "/whoami", delegated), 401, "credential_compromised")  # the agent acts for bob
    expect(server.request("GET", "/whoami", stolen), 401, "credential_compromised")  # no new context either
    expect(server.request("GET", "/whoami", own), 200, "ok")  # bob delegated, but his own session is unrelated
    fresh_own = server.issuer.token(user, sid=f"{user}-own-2")
    expect(server.request("GET", "/whoami", fresh_own), 200, "ok")

    # a fresh token of a newer generation re-establishes the agent's context and kills the older generation
    fresh = server.issuer.token(bot, sa_kind="agent", sid=f"{bot}-s1", gen=2)
    expect(server.request("GET", "/whoami", fresh), 200, "ok")
    assert server.statuses(bot)[f"{bot}-s1"] == "active"
    expect(server.request("GET", "/whoami", s2), 401, "stale_generation")
    expect(server.request("GET", "/whoami", s1), 401, "stale_generation")
    # the delegated context stays compromised until bob presents a token issued after the report
    expect(server.request("GET", "/whoami", delegated), 401, "credential_compromised")
    renewed = server.issuer.token(user, sid=f"{user}-via-{bot}", act={"sub": bot})
    expect(server.request("GET", "/whoami", renewed), 200, "ok")
    assert server.statuses(user)[f"{user}-via-{bot}"] == "active"


def test_operator_clears_a_compromised_context(server: Server) -> None:
    bot = f"bot-{run_id()}"
    s1 = server.issuer.token(bot, sa_kind="agent", sid=f"{bot}-s1", gen=1)
    expect(server.request("GET", "/whoami", s1), 200, "ok")
    assert server.guard.report_compromise(sub=bot) == [f"{bot}-s1"]
    expect(server.request("GET", "/whoami", s1), 401, "credential_compromised")
    assert server.guard.resume_session(f"{bot}-s1")
    expect(server.request("GET", "/whoami", s1), 200, "ok")


# -- 5. parallel sessions per principal are limited ------------------------------------------------------------

def test_concurrent_sessions_admit_exactly_max_sessions(server: Server) -> None:
    crawler = f"crawler-{run_id()}"
    n, limit = 10, 3  # the workbench's default policy: max_sessions=3
    tokens = [server.issuer.token(crawler, sa_kind="agent", sid=f"{crawler}-s{i}") for i in range(n)]
    barrier = threading.Barrier(n)
    results: list[httpx.Response | BaseException | None] = [None] * n

    def open_session(i: int) -> None:
        try:
            barrier.wait(WAIT)
            results[i] = server.request("GET", "/whoami", tokens[i])
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=open_session, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 2)
    assert all(isinstance(r, httpx.Response) for r in results), results
    responses = [r for r in results if isinstance(r, httpx.Response)]
    outcomes = Counter((r.status_code, code(r)) for r in responses)
    assert outcomes == {(200, "ok"): limit, (403, "too_many_sessions"): n - limit}, outcomes
    for r in responses:
        if r.status_code == 403:
            expect(r, 403, "too_many_sessions")

    admitted = {i for i, r in enumerate(responses) if r.status_code == 200}
    assert set(server.statuses(crawler)) == {f"{crawler}-s{i}" for i in admitted}
    assert set(server.statuses(crawler).values()) == {"active"}

    # admitted sessions keep working; refused ones stay refused while the limit is full
    refused = sorted(set(range(n)) - admitted)
    for i in admitted:
        expect(server.request("GET", "/whoami", tokens[i]), 200, "ok")
    expect(server.request("GET", "/whoami", tokens[refused[0]]), 403, "too_many_sessions")

    # revoking one admitted session frees a slot for exactly one more
    gone = min(admitted)
    assert server.guard.revoke_session(f"{crawler}-s{gone}")
    expect(server.request("GET", "/whoami", tokens[gone]), 401, "session_revoked")
    expect(server.request("GET", "/whoami", tokens[refused[0]]), 200, "ok")
    expect(server.request("GET", "/whoami", tokens[refused[1]]), 403, "too_many_sessions")
    assert len(server.guard.sessions(crawler)) == limit + 1  # the revoked one is listed with its status
    assert Counter(server.statuses(crawler).values()) == {"active": limit, "revoked": 1}


# -- the whole demo ----------------------------------------------------------------------------------------------

def test_play_every_step_as_expected(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    # each request of the player returns once the middleware has released its ticket (see Tracker)
    monkeypatch.setattr(demo, "request", server.demo_request)
    seen: list[str] = []
    steps = play(server.base, server.guard, server.issuer, lambda step: seen.append(step.behaviour))
    bad = [(s.behaviour, s.who, s.what, s.expected, s.got) for s in steps if not s.ok]
    assert not bad, bad
    assert len(steps) == len(seen) == 32
    assert {s.behaviour[0] for s in steps} == set("12345")


class LateReleaseStore(SQLiteStore):
    """A store whose release lands only after the next admission was decided, as a remote store's may: the
    middleware still releases after the last body chunk (its contract), just later than the client's next request.
    """

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self._admitted = threading.Condition()
        self._admits = 0

    def admit(self, admission: Admission) -> Ticket | Denial:
        try:
            return super().admit(admission)
        finally:
            with self._admitted:
                self._admits += 1
                self._admitted.notify_all()

    def release(self, ticket: Ticket) -> None:
        with self._admitted:
            seen = self._admits
            self._admitted.wait_for(lambda: self._admits > seen, timeout=1.0)  # bounded: the last release waits 1 s
        super().release(ticket)


@pytest.fixture(params=["asgi", "wsgi"])
def late_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    srv = Server(request.param, tmp_path / "late.db", store=LateReleaseStore(str(tmp_path / "late.db")))
    try:
        yield srv
    finally:
        srv.close()


def test_play_does_not_assume_release_before_response(late_server: Server) -> None:
    """BUG (sa_middleware/demo.py, ``_Held.release`` / ``play`` behaviour 1): the player expects 403 risk_too_high
    right after the held ticket request answered, but the middleware releases the ticket only after the last body
    chunk was sent, so the approval can still see the ticket in flight (409 conflicting_action). Flaky on real
    servers (about 1 run in 50 here); deterministic with a store whose release lands after the next admission.
    """
    steps = play(late_server.base, late_server.guard, late_server.issuer, lambda step: None)
    bad = [(s.behaviour, s.what, s.expected, s.got) for s in steps if not s.ok]
    assert not bad, bad
