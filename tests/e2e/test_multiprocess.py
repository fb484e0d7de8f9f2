"""Real processes sharing one SQLite store: admission holds across OS processes, and a crashed holder's lock expires.

Each server is ``python -m tests.e2e.mp_server`` (uvicorn + ``SessionAwareMiddleware``) on its own loopback port.
The test holds the issuer's private key and mints every token; the servers get the public PEM in a file.
Run with ``pytest -s`` to see the counts.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from sa_middleware.stores import open_store

from .mp_server import Issuer, ServerPool, headers, lease_end

pytestmark = pytest.mark.slow

SERVERS = 3
THREADS = 24
PER_SCENARIO = 300
WAIT = 30.0  # bound of every condition wait, reached only when something is broken
CRASH_LEASE = 3.0  # renewed every second: a holder whose keeper stalls up to two seconds keeps its lock


# -- issuer and servers (the harness of tests/e2e/mp_server.py, on one SQLite file) ---------------------------------

class Cluster(ServerPool):
    """Server processes sharing one SQLite store; stopped (terminate, then kill) by the fixture's finaliser."""

    def __init__(self, tmp: Path, issuer: Issuer) -> None:
        self.db = tmp / "store.db"
        super().__init__(tmp, issuer, f"sqlite:///{self.db}")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path, Issuer(tmp_path))
    try:
        yield c
    finally:
        c.stop()


# -- helpers -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Planned:
    rid: str
    scenario: str
    method: str
    path: str
    token: str
    server: int


def code_of(resp: httpx.Response) -> str:
    if resp.status_code == 200:
        return "ok"
    try:
        return str(resp.json().get("code", "?"))
    except ValueError:
        return "?"


def overlaps(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Pairs of consecutive admitted intervals (sorted by start) that overlap."""
    ordered = sorted(rows, key=lambda r: (r["start"], r["end"]))
    return [(a["rid"], b["rid"]) for a, b in itertools.pairwise(ordered) if b["start"] < a["end"]]


# -- the tests -----------------------------------------------------------------------------------------------------

def test_contended_admission_across_processes(cluster: Cluster) -> None:
    """300 requests on one exclusive lock (6 principals) and 300 on max_in_flight=1 (1 principal, 4 sessions), all at
    once from 24 threads, round-robin over 3 server processes sharing one SQLite file."""
    servers = cluster.start(SERVERS)
    run = uuid.uuid4().hex[:8]
    lock_tokens = [cluster.issuer.token(f"writer-{run}-{i}", f"writer-{run}-{i}-s") for i in range(6)]
    job_tokens = [cluster.issuer.token(f"agent-{run}", f"agent-{run}-s{i}", sa_kind="agent") for i in range(4)]
    object_id = f"obj-{run}"
    lock_key = f"object:{object_id}"

    plan: list[Planned] = []
    for i in range(2 * PER_SCENARIO):
        rid = f"r{i}"
        if i % 2 == 0:
            plan.append(Planned(rid, "lock", "PUT", f"/objects/{object_id}?rid={rid}",
                                lock_tokens[(i // 2) % len(lock_tokens)], i % SERVERS))
        else:
            plan.append(Planned(rid, "in_flight", "POST", f"/jobs?rid={rid}",
                                job_tokens[(i // 2) % len(job_tokens)], i % SERVERS))

    barrier = threading.Barrier(THREADS)
    results: dict[str, tuple[int, str, dict[str, Any]]] = {}
    errors: list[str] = []
    lock = threading.Lock()

    def worker(index: int) -> None:
        mine = plan[index::THREADS]
        with httpx.Client(timeout=30.0) as client:
            barrier.wait(30)
            for p in mine:
                try:
                    resp = client.request(p.method, servers[p.server].base + p.path,
                                          headers=headers(p.token))
                    body = resp.json() if resp.headers.get("content-type", "").endswith("json") else {}
                    outcome = (resp.status_code, code_of(resp), body)
                except httpx.HTTPError as exc:
                    outcome = (0, f"{type(exc).__name__}: {exc}", {})
                with lock:
                    results[p.rid] = outcome
                    if outcome[0] == 0:
                        errors.append(f"{p.rid}: {outcome[1]}")

    started = time.monotonic()
    with ThreadPoolExecutor(THREADS) as pool:
        for future in [pool.submit(worker, i) for i in range(THREADS)]:
            future.result()
    took = time.monotonic() - started

    records = {r["rid"]: r for r in cluster.records()}
    expected_refusal = {"lock": (423, "object_locked"), "in_flight": (429, "too_many_in_flight")}
    summary: dict[str, dict[str, Any]] = {}
    for scenario in ("lock", "in_flight"):
        mine = [p for p in plan if p.scenario == scenario]
        outcomes = Counter((results[p.rid][0], results[p.rid][1]) for p in mine if p.rid in results)
        admitted_rids = [p.rid for p in mine if results.get(p.rid, (0,))[0] == 200]
        refused = outcomes[expected_refusal[scenario]]
        rows = [records[rid] for rid in admitted_rids if rid in records]
        summary[scenario] = {
            "sent": len(mine), "answered": sum(outcomes.values()), "admitted": len(admitted_rids),
            "refused": refused, "recorded": len(rows), "outcomes": dict(outcomes),
            "pids": sorted(Counter(r["pid"] for r in rows).items()), "overlaps": overlaps(rows), "rows": rows,
        }
    report = (f"{len(plan)} requests in {took:.2f}s over {SERVERS} processes "
              f"(pids {[s.proc.pid for s in servers]}); transport errors: {errors[:5]}\n" + "\n".join(
                  f"  {name}: sent={s['sent']} admitted={s['admitted']} refused={s['refused']} "
                  f"recorded={s['recorded']} overlaps={len(s['overlaps'])} admitted-by-pid={s['pids']} "
                  f"outcomes={s['outcomes']}" for name, s in summary.items()))
    print("\n" + report)

    assert not errors, f"transport errors:\n{report}\n{cluster.logs()}"
    for scenario, s in summary.items():
        allowed = {(200, "ok"), expected_refusal[scenario]}
        unexpected = {k: v for k, v in s["outcomes"].items() if k not in allowed}
        assert not unexpected, (
            f"{scenario}: unexpected answers {unexpected} (never 500/503)\n{report}\n{cluster.logs()}")
        assert s["admitted"] + s["refused"] == s["sent"], f"{scenario}: admitted + refused != sent\n{report}"
        assert s["admitted"] >= 1 and s["refused"] >= 1, f"{scenario}: no real contention\n{report}"
        assert s["recorded"] == s["admitted"], f"{scenario}: every 200 must have its interval record\n{report}"
        assert not s["overlaps"], f"{scenario}: overlapping admitted intervals {s['overlaps'][:5]}\n{report}"
        assert len(s["pids"]) >= 2, f"{scenario}: admissions came from fewer than 2 processes\n{report}"

    lock_rows = sorted(summary["lock"]["rows"], key=lambda r: r["start"])
    fences = [r["fencing_tokens"][lock_key] for r in lock_rows]
    assert all(r["fencing_tokens"].keys() == {lock_key} for r in lock_rows), report
    dupes = [f for f, n in Counter(fences).items() if n > 1]
    assert not dupes, f"duplicate fencing tokens: {dupes[:10]}\n{report}"
    bad = [(a, b) for a, b in itertools.pairwise(fences) if b <= a]
    assert not bad, f"fencing tokens not strictly increasing in admission order: {bad[:5]}\n{report}"
    assert len({r["principal"] for r in lock_rows}) >= 2, f"the lock was won by one principal only\n{report}"
    assert len({r["session_id"] for r in summary["in_flight"]["rows"]}) >= 2, (
        f"max_in_flight: admissions came from one session only\n{report}")


def test_crashed_holder_lock_expires_within_one_lease(cluster: Cluster) -> None:
    """A process killed while its request holds an exclusive lock (kept past its first lease by the keeper):
    another process refuses the lock (423) at first, then admits it within lease + 1 s, with a larger fencing token."""
    holder_srv, other_srv = cluster.start(2, lease=CRASH_LEASE)
    run = uuid.uuid4().hex[:8]
    object_id = f"crash-{run}"
    lock_key = f"object:{object_id}"
    holder = cluster.issuer.token(f"holder-{run}", f"holder-{run}-s")
    other = cluster.issuer.token(f"other-{run}", f"other-{run}-s")

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
    entered_file = cluster.out / f"entered-{rid}.json"
    deadline = time.monotonic() + 10.0
    while not entered_file.exists():  # the view's "entered" signal
        assert time.monotonic() < deadline, f"the holder never entered the view: {held}\n{cluster.logs()}"
        time.sleep(0.02)
    entered = json.loads(entered_file.read_text())
    assert entered["pid"] == holder_srv.proc.pid
    holder_fence = entered["fencing_tokens"][lock_key]

    # Let the holder outlive its first lease: the lock must survive only thanks to the keeper's renewals.
    store = open_store(f"sqlite:///{cluster.db}")
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
            assert time.monotonic() < deadline, f"the lease keeper never renewed the lock\n{cluster.logs()}"
            time.sleep(0.05)
    finally:
        store.close()

    url = f"{other_srv.base}/objects/{object_id}?rid=after"
    with httpx.Client(timeout=10.0) as client:
        before = client.put(url, headers=headers(other))
        assert (before.status_code, code_of(before)) == (423, "object_locked"), before.text

        os.kill(holder_srv.proc.pid, signal.SIGKILL)
        killed_at, killed_wall = time.monotonic(), time.time()
        holder_srv.proc.wait(5)
        held_until = lease_end(f"sqlite:///{cluster.db}", lock_key)  # no renewal follows the kill

        # until the lease the holder left runs out the lock stays held; then another request gets it
        attempts, answers, early = 0, Counter[tuple[int, str]](), []
        admitted: httpx.Response | None = None
        while time.time() < held_until + WAIT:
            resp = client.put(url, headers=headers(other))
            received = time.time()
            attempts += 1
            answers[(resp.status_code, code_of(resp))] += 1
            if resp.status_code == 200:
                admitted = resp
                if received < held_until:
                    early.append(received)
                break
            time.sleep(0.05)
        elapsed = time.monotonic() - killed_at
    thread.join(5)

    report = (f"crash: holder pid {entered['pid']} fence {holder_fence} (renewed {renewals}x, past its first lease) "
              f"killed with {held_until - killed_wall:.3f}s of its lease left; admitted after "
              f"{elapsed:.3f}s (lease {CRASH_LEASE}s) in {attempts} attempts {dict(answers)}")
    print("\n" + report)
    assert admitted is not None, f"never admitted after the crash\n{report}\n{cluster.logs()}"
    assert not early, f"admitted before the killed holder's lease ran out\n{report}"
    assert held_until <= killed_wall + CRASH_LEASE + 0.01, f"the lock outlives one lease after the crash\n{report}"
    assert set(answers) <= {(200, "ok"), (423, "object_locked")}, report
    body = admitted.json()
    assert body["pid"] == other_srv.proc.pid, report
    assert body["fencing_tokens"][lock_key] > holder_fence, f"new fence {body['fencing_tokens']}\n{report}"
    assert "response" not in held, f"the killed holder answered: {held}"
