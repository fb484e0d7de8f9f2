"""Faults through real servers: a Redis that stops answering, goes down, comes back empty or is flushed, and a worker
killed while it holds a lock.

Every Redis fault is done to a *private* ``redis-server`` (started by the ``private_redis`` fixture on a free port),
never to the machine's shared Redis. The app is two uvicorn processes of ``tests/e2e/mp_server.py`` on that server.

- SIGSTOP mid-load: every request sent while Redis does not answer gets 503 ``store_unavailable`` with
  ``Retry-After`` (never a 500, never a hang: each client request is bounded), the ``fail_open`` route is admitted
  without a ticket and logged; after SIGCONT the same processes admit again. The latencies of those 503s are written
  to ``/tmp/sa-redis-counts.json`` (no assertion on them beyond "finished, and a 503").
- SIGKILL of Redis: 503s while it is down; restarted empty on the same port, the app recovers with no restart of its
  own, and the state loss is detected: a token issued before the loss is refused ``token_revoked``, a new one admitted.
- FLUSHALL: the loss is detected at once by every process.
- SIGKILL of a server process while its request holds an exclusive lock (renewed past its first lease by the keeper):
  the lock and the ticket are free within one lease plus one second (the deadline is the spec).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis_support import (
    RedisServer,
    forget_prefix,
    fresh_store,
    private_redis_server,
    redis_store_available,
    store_uri,
)

from sa_middleware.stores import open_store

from .mp_server import (
    Issuer,
    Server,
    ServerPool,
    code_of,
    headers,
    lease_end,
    now_ns,
    percentiles,
    record_summary,
    with_timeout,
)

pytestmark = pytest.mark.slow

CLIENT_TIMEOUT = 10.0  # a request that takes longer is a hang
WAIT = 30.0  # bound of every condition wait, reached only when something is broken
LEASE = 3.0  # renewed every second: a holder whose keeper stalls up to two seconds keeps its lock
# The paused / killed tests run with the store's default timeout: that is what they measure. The others test state
# and leases; a slower timeout keeps a loaded 2-core machine from turning a slow answer into a (correct) 503.
PATIENT = 2.0


@dataclass(frozen=True)
class Answer:
    route: str
    token: str
    server: int
    sent: int
    received: int
    status: int
    code: str
    retry_after: str
    ticket_id: str | None

    @property
    def seconds(self) -> float:
        return (self.received - self.sent) / 1e9


class Load:
    """Client threads hammering ``(route, token)`` pairs over the servers until stopped; every answer is kept."""

    def __init__(self, servers: list[Server], targets: list[tuple[str, str]], threads: int = 8) -> None:
        self.servers, self.targets = servers, targets
        self.answers: list[Answer] = []
        self.errors: list[str] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]
        self._deadline = time.monotonic() + 120.0

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(CLIENT_TIMEOUT + 5)

    def _run(self, index: int) -> None:
        n = index
        with httpx.Client(timeout=CLIENT_TIMEOUT) as http:
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                route, token = self.targets[n % len(self.targets)]
                server = n % len(self.servers)
                n += 1
                sent = now_ns()
                try:
                    resp = http.get(f"{self.servers[server].base}{route}", headers=headers(token))
                    body = resp.json()
                    answer = Answer(route, token, server, sent, now_ns(), resp.status_code,
                                    code_of(resp.status_code, body), resp.headers.get("retry-after", ""),
                                    body.get("ticket_id") if resp.status_code == 200 else None)
                except (httpx.HTTPError, ValueError) as exc:
                    answer = Answer(route, token, server, sent, now_ns(), 0, f"{type(exc).__name__}: {exc}", "",
                                    None)
                with self._cond:
                    self.answers.append(answer)
                    if answer.status == 0:
                        self.errors.append(answer.code)
                    self._cond.notify_all()

    def wait(self, what: str, condition: Callable[[list[Answer]], bool], timeout: float = WAIT) -> None:
        """Wait until ``condition(answers)`` holds (a condition wait, bounded)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not condition(self.answers):
                left = deadline - time.monotonic()
                assert left > 0, f"timed out waiting for {what}: {Counter((a.route, a.code) for a in self.answers)}"
                self._cond.wait(left)

    def between(self, start: int, end: int | None = None) -> list[Answer]:
        """Answers to requests sent after ``start`` and answered before ``end``."""
        with self._cond:
            return [a for a in self.answers if a.sent > start and (end is None or a.received < end)]


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private ``redis-server`` for this test alone: free to pause, kill, restart and flush."""
    redis_store_available()
    with private_redis_server(tmp_path) as server:
        yield server


@pytest.fixture
def pool(request: pytest.FixtureRequest, private_redis: RedisServer, tmp_path: Path) -> Iterator[ServerPool]:
    """Servers on the private Redis; with the store's default timeout unless parametrised with another one."""
    uri = fresh_store(private_redis.url)
    timeout = getattr(request, "param", None)
    p = ServerPool(tmp_path, Issuer(tmp_path), uri if timeout is None else with_timeout(uri, timeout))
    try:
        yield p
    finally:
        p.stop()


def get(server: Server, route: str, token: str) -> tuple[int, str, httpx.Response]:
    resp = httpx.get(f"{server.base}{route}", headers=headers(token), timeout=CLIENT_TIMEOUT)
    return resp.status_code, code_of(resp.status_code, resp.json()), resp


def poll(server: Server, route: str, token: str, until: Callable[[int, str], bool], allowed: set[tuple[int, str]],
         timeout: float = WAIT) -> tuple[list[tuple[int, str]], float, httpx.Response]:
    """Repeat a request until ``until(status, code)``; every answer on the way must be in ``allowed``.
    Returns the answers, the seconds it took and the last response."""
    started = time.monotonic()
    seen: list[tuple[int, str]] = []
    while True:
        status, code, resp = get(server, route, token)
        seen.append((status, code))
        if until(status, code):
            return seen, time.monotonic() - started, resp
        assert (status, code) in allowed, f"unexpected {status} {code} while waiting; seen {Counter(seen)}"
        assert time.monotonic() - started < timeout, f"no recovery within {timeout}s: {Counter(seen)}"
        time.sleep(0.05)


def settled(server: Server, route: str, token: str) -> tuple[list[tuple[int, str]], float, httpx.Response]:
    """:func:`poll` until an answer is not store_unavailable: the store's calls have a short timeout, which one slow
    answer of a busy machine can exceed (the request is then refused with store_unavailable and tried again)."""
    return poll(server, route, token, lambda status, code: status != 503, {(503, "store_unavailable")})


def fresh_token(issuer: Issuer, sub: str, **claims: Any) -> str:
    """A token issued strictly after every event so far (its ``iat`` is the next whole second: JWT times are whole
    seconds, and a token of the very second of a loss would count as issued before it)."""
    return issuer.token(sub, f"{sub}-{uuid.uuid4().hex[:6]}", iat=int(time.time()) + 1, **claims)


def server_timings(pool: ServerPool, start: int, end: int) -> list[float]:
    """Durations of the store admission calls that failed between ``start`` and ``end`` (seconds)."""
    return [(d["end"] - d["start"]) / 1e9 for d in pool.decisions()
            if d["outcome"].startswith("error") and start < d["start"] and d["end"] < end]


def test_paused_redis_gives_503_and_the_app_recovers(private_redis: RedisServer, pool: ServerPool) -> None:
    servers = pool.start(2, decisions=True)
    run = uuid.uuid4().hex[:8]
    token = pool.issuer.token(f"svc-{run}", f"svc-{run}-s", sa_kind="service")
    opener = pool.issuer.token(f"ro-{run}", f"ro-{run}-s")
    pids = [s.proc.pid for s in servers]

    with Load(servers, [("/ping", token), ("/open", opener)]) as load:
        load.wait("admissions before the pause", lambda xs: sum(a.status == 200 for a in xs) >= 40)
        private_redis.pause()
        paused_at = now_ns()
        load.wait("answers while Redis is paused",
                  lambda xs: sum(a.sent > paused_at and a.route == "/ping" for a in xs) >= 24
                  and sum(a.sent > paused_at and a.route == "/open" for a in xs) >= 8)
        private_redis.resume()
        resumed_at = now_ns()
        load.wait("admissions after the resume",
                  lambda xs: sum(a.sent > resumed_at and a.status == 200 and a.route == "/ping" for a in xs) >= 40)
    during = load.between(paused_at, resumed_at)
    after = load.between(resumed_at)
    ping_during = [a for a in during if a.route == "/ping"]
    open_during = [a for a in during if a.route == "/open"]
    first_ok = min((a.received for a in after if a.route == "/ping" and a.status == 200), default=resumed_at)
    latencies = [a.seconds for a in ping_during if a.status == 503]
    logs = pool.logs()

    counts = {
        "requests": len(load.answers), "answers": dict(Counter(f"{a.route} {a.status} {a.code}"
                                                               for a in load.answers)),
        "paused_seconds": round((resumed_at - paused_at) / 1e9, 3),
        "ping_503_while_paused": len(latencies), "open_admitted_while_paused": sum(a.status == 200
                                                                                   for a in open_during),
        "latency_503_client": percentiles(latencies),
        "latency_fail_open_client": percentiles([a.seconds for a in open_during if a.status == 200]),
        "store_call_failed_server": percentiles(server_timings(pool, paused_at, resumed_at)),
        "recovered_after_resume_s": round((first_ok - resumed_at) / 1e9, 4),
        "statuses_500": sum(a.status == 500 for a in load.answers), "transport_errors": len(load.errors),
    }
    report = f"faults[paused]: {json.dumps(counts)}"
    print("\n" + report)
    record_summary("faults[redis SIGSTOP]", counts)

    assert not load.errors, f"hang or transport error: {load.errors[:5]}\n{report}\n{logs}"
    assert counts["statuses_500"] == 0, report
    assert ping_during, report
    assert {(a.status, a.code) for a in ping_during} == {(503, "store_unavailable")}, report
    assert all(a.retry_after.isdigit() and int(a.retry_after) >= 1 for a in ping_during), report
    assert open_during and {(a.status, a.code) for a in open_during} == {(200, "ok")}, report
    assert all(a.ticket_id is None for a in open_during), "fail_open admissions carry no ticket"
    assert "fail_open" in logs, f"fail_open admissions must be logged\n{logs}"
    assert {(a.status, a.code) for a in load.answers} <= {(200, "ok"), (503, "store_unavailable")}, report
    assert [s.proc.poll() for s in servers] == [None, None] and [s.proc.pid for s in servers] == pids


def test_killed_redis_gives_503_then_restarted_recovers_and_detects_the_loss(
        private_redis: RedisServer, pool: ServerPool) -> None:
    servers = pool.start(2, decisions=True)
    run = uuid.uuid4().hex[:8]
    sub = f"svc-{run}"
    old = pool.issuer.token(sub, f"{sub}-old", sa_kind="service")
    opener = pool.issuer.token(f"ro-{run}", f"ro-{run}-s")
    for server in servers:
        assert get(server, "/ping", old)[:2] == (200, "ok")

    with Load(servers, [("/ping", old), ("/open", opener)]) as load:
        load.wait("admissions before the kill", lambda xs: sum(a.status == 200 for a in xs) >= 20)
        private_redis.kill()
        down_at = now_ns()
        load.wait("answers while Redis is down",
                  lambda xs: sum(a.sent > down_at and a.route == "/ping" for a in xs) >= 24
                  and sum(a.sent > down_at and a.route == "/open" for a in xs) >= 8)
        up_started = now_ns()
    down = load.between(down_at, up_started)
    private_redis.start()  # same port, no persistence: every key is gone
    up_at = now_ns()

    # the same app processes answer again, and refuse the token issued before the loss
    recovery = [settled(s, "/ping", old) for s in servers]
    old_answers = [settled(s, route, old)[0][-1] for s in servers for route in ("/ping", "/open")]
    new = fresh_token(pool.issuer, sub)
    new_answers = [settled(s, "/ping", new)[2] for s in servers]
    latencies = [a.seconds for a in down if a.route == "/ping" and a.status == 503]

    counts = {
        "requests": len(load.answers), "answers_while_down": dict(Counter(f"{a.route} {a.status} {a.code}"
                                                                         for a in down)),
        "latency_503_client": percentiles(latencies),
        "store_call_failed_server": percentiles(server_timings(pool, down_at, up_started)),
        "first_answers_after_restart": [seen[-1] for seen, _, _ in recovery],
        "recovered_after_restart_s": [round(took, 4) for _, took, _ in recovery],
        "old_token_after_restart": old_answers, "new_token_after_restart": [r.status_code for r in new_answers],
        "statuses_500": sum(a.status == 500 for a in load.answers), "transport_errors": len(load.errors),
    }
    report = f"faults[killed+restarted]: {json.dumps(counts)}"
    print("\n" + report)
    record_summary("faults[redis SIGKILL + restart]", counts)

    assert not load.errors, f"hang or transport error: {load.errors[:5]}\n{report}\n{pool.logs()}"
    assert counts["statuses_500"] == 0, report
    ping_down = [a for a in down if a.route == "/ping"]
    open_down = [a for a in down if a.route == "/open"]
    assert ping_down and {(a.status, a.code) for a in ping_down} == {(503, "store_unavailable")}, report
    assert all(a.retry_after.isdigit() for a in ping_down), report
    assert open_down and {(a.status, a.code) for a in open_down} == {(200, "ok")}, report
    assert [seen[-1] for seen, _, _ in recovery] == [(401, "token_revoked")] * 2, f"loss not detected\n{report}"
    assert old_answers == [(401, "token_revoked")] * 4, report
    assert [r.status_code for r in new_answers] == [200, 200], [r.text for r in new_answers]
    assert {r.json()["pid"] for r in new_answers} == {s.proc.pid for s in servers}, "the app was not restarted"
    assert up_at > down_at


@pytest.mark.parametrize("pool", [PATIENT], indirect=True, ids=["timeout=2s"])
def test_flushed_redis_loss_is_detected_by_every_process(private_redis: RedisServer, pool: ServerPool) -> None:
    servers = pool.start(2)
    run = uuid.uuid4().hex[:8]
    sub = f"svc-{run}"
    old = pool.issuer.token(sub, f"{sub}-old", gen=3, sa_kind="service")
    other = pool.issuer.token(f"u-{run}", f"u-{run}-s")
    for server in servers:
        assert get(server, "/ping", old)[:2] == (200, "ok")
        assert get(server, "/ping", other)[:2] == (200, "ok")

    private_redis.flushall()
    old_after = [get(s, "/ping", old)[:2] for s in servers for _ in range(3)]
    other_after = [get(s, "/ping", other)[:2] for s in servers]
    # the old token still ratchets the generation (a genuine, newer-generation token proves a rotation even when it
    # is refused), so the new one carries the current generation: the loss is judged by the issue time
    new = fresh_token(pool.issuer, sub, gen=3, sa_kind="service")
    new_after = [get(s, "/ping", new)[:2] for s in servers]
    old_again = [get(s, "/ping", old)[:2] for s in servers]

    counts = {"old_token_after_flush": old_after, "other_principal_after_flush": other_after,
              "new_token_after_flush": new_after, "old_token_after_new_admitted": old_again}
    print(f"\nfaults[flushed]: {json.dumps(counts)}")
    record_summary("faults[redis FLUSHALL]", counts)

    assert old_after == [(401, "token_revoked")] * 6, counts
    assert other_after == [(401, "token_revoked")] * 2, counts
    assert new_after == [(200, "ok")] * 2, counts
    assert old_again == [(401, "token_revoked")] * 2, counts


# -- a worker killed while it holds a lock ----------------------------------------------------------------------------

@pytest.fixture(params=["redis", "cluster"])
def lock_pool(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerPool]:
    private = request.param == "redis"
    uri = fresh_store(request.getfixturevalue("private_redis").url) if private else store_uri(request.param, tmp_path)
    p = ServerPool(tmp_path, Issuer(tmp_path), with_timeout(uri, PATIENT))
    try:
        yield p
    finally:
        p.stop()
        forget_prefix(uri)


def test_killed_lock_holder_frees_lock_and_ticket_within_one_lease(lock_pool: ServerPool) -> None:
    pool = lock_pool
    holder_srv, other_srv = pool.start(2, lease=LEASE)
    run = uuid.uuid4().hex[:8]
    object_id = f"crash-{run}"
    lock_key = f"object:{object_id}"
    holder = pool.issuer.token(f"holder-{run}", f"holder-{run}-s", sa_kind="agent")
    other = pool.issuer.token(f"other-{run}", f"other-{run}-s")

    rid = f"hold-{run}"
    held: dict[str, Any] = {}

    def hold() -> None:
        try:
            held["response"] = httpx.put(f"{holder_srv.base}/hold/{object_id}?rid={rid}", headers=headers(holder),
                                         timeout=90.0)
        except httpx.HTTPError as exc:  # expected: the server is killed mid-request
            held["error"] = exc

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    entered_file = pool.out / f"entered-{rid}.json"
    deadline = time.monotonic() + 10.0
    while not entered_file.exists():  # the view's "entered" signal
        assert time.monotonic() < deadline, f"the holder never entered the view: {held}\n{pool.logs()}"
        time.sleep(0.02)
    entered = json.loads(entered_file.read_text())
    assert entered["pid"] == holder_srv.proc.pid
    holder_fence = entered["fencing_tokens"][lock_key]

    # the holder outlives its first lease: the lock survives only thanks to the keeper's renewals
    store = open_store(pool.store)
    try:
        first_expiry: float | None = None
        last_expiry, renewals = 0.0, 0
        deadline = time.monotonic() + 10.0
        while True:
            mine = [info for info in store.locks() if info.key == lock_key]
            assert len(mine) == 1 and mine[0].fencing_token == holder_fence, f"lock lost while held: {mine}"
            if first_expiry is None:
                first_expiry = last_expiry = mine[0].expires
            elif mine[0].expires > last_expiry:
                last_expiry, renewals = mine[0].expires, renewals + 1
            if renewals and time.time() > first_expiry + 0.1:
                break
            assert time.monotonic() < deadline, f"the lease keeper never renewed the lock\n{pool.logs()}"
            time.sleep(0.05)
    finally:
        store.close()

    url = f"{other_srv.base}/objects/{object_id}?rid=after"
    with httpx.Client(timeout=CLIENT_TIMEOUT) as client:
        before = client.put(url, headers=headers(other))
        assert (before.status_code, code_of(before.status_code, before.json())) == (423, "object_locked")
        busy = client.post(f"{other_srv.base}/jobs", headers=headers(holder))  # max_in_flight=1: the live ticket
        assert (busy.status_code, code_of(busy.status_code, busy.json())) == (429, "too_many_in_flight")

        os.kill(holder_srv.proc.pid, signal.SIGKILL)
        killed_at, killed_wall = time.monotonic(), time.time()
        holder_srv.proc.wait(5)
        held_until = lease_end(pool.store, lock_key)  # no renewal follows the kill

        # until the lease the holder left runs out its lock and its ticket stay; then both are free
        answers: Counter[tuple[int, str]] = Counter()
        admitted: httpx.Response | None = None
        jobs: httpx.Response | None = None
        lock_free_after = ticket_free_after = -1.0
        early: list[str] = []
        while time.time() < held_until + WAIT and (admitted is None or jobs is None):
            if admitted is None:
                resp = client.put(url, headers=headers(other))
                answers[(resp.status_code, code_of(resp.status_code, resp.json()))] += 1
                if resp.status_code == 200:
                    admitted, lock_free_after = resp, time.monotonic() - killed_at
                    if time.time() < held_until:
                        early.append("lock")
            if jobs is None:  # the holder's ticket (max_in_flight=1) is gone too
                resp = client.post(f"{other_srv.base}/jobs", headers=headers(holder))
                answers[(resp.status_code, code_of(resp.status_code, resp.json()))] += 1
                if resp.status_code == 200:
                    jobs, ticket_free_after = resp, time.monotonic() - killed_at
                    if time.time() < held_until:
                        early.append("ticket")
            time.sleep(0.05)
    thread.join(5)

    kind = pool.store.split(":", 1)[0]
    counts = {"store": kind, "lease_s": LEASE, "lease_left_at_kill_s": round(held_until - killed_wall, 3),
              "renewals_before_kill": renewals,
              "lock_free_after_kill_s": round(lock_free_after, 3), "answers": {f"{s} {c}": n
                                                                                for (s, c), n in answers.items()},
              "holder_ticket_gone_after_s": round(ticket_free_after, 3)}
    report = f"faults[killed holder, {kind}]: {json.dumps(counts)}"
    print("\n" + report)
    record_summary(f"faults[SIGKILL lock holder, {kind}]", counts)
    assert admitted is not None, f"lock never free after its lease\n{report}\n{pool.logs()}"
    assert jobs is not None, f"the killed holder's ticket lives on past its lease\n{report}"
    assert not early, f"freed before the killed holder's lease ran out: {early}\n{report}"
    assert held_until <= killed_wall + LEASE + 0.01, f"the lock outlives one lease after the crash\n{report}"
    assert set(answers) <= {(200, "ok"), (423, "object_locked"), (429, "too_many_in_flight")}, report
    body = admitted.json()
    assert body["pid"] == other_srv.proc.pid, report
    assert body["fencing_tokens"][lock_key] > holder_fence, report
    assert "response" not in held, f"the killed holder answered: {held}"
