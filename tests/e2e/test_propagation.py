"""Revocation propagation across processes: once ``guard.rotate(sub)`` has returned in one process, no server process
admits the old-generation token any more.

Four uvicorn processes serve ``GET /ping`` to clients that hammer them with a generation-1 token; a fifth process
(the rotator, connected and waiting) calls ``guard.rotate(sub)`` in the middle of the load. Every server logs each
store admission call with its interval on the system-wide ``CLOCK_MONOTONIC``; the rotator reports when its call
started and returned. An admission of the old token whose store call *started* after ``rotate()`` returned is a
violation (there must be none); a client request *sent* after it returned must not get a 200 either. Calls that
overlap the rotation may go either way and are only counted.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis_support import forget_prefix, store_uri

from .mp_server import Issuer, ServerPool, code_of, headers, record_summary, with_timeout

pytestmark = pytest.mark.slow

SERVERS = 4
CLIENTS_PER_SERVER = 2
WARM_ADMISSIONS = 10  # per client, before the rotation
AFTER_ROTATION = 25  # requests per client sent after rotate() returned
LIMIT = 60.0  # bound of the whole load, reached only when something is broken
STORE_TIMEOUT = 2.0  # correctness, not latency, is measured here (see test_redis_multiprocess.py)


@pytest.fixture(params=["redis", "cluster"])  # store-parametrised: "sqlite" works too (a transaction per admission)
def pool(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerPool]:
    p = ServerPool(tmp_path, Issuer(tmp_path), with_timeout(store_uri(request.param, tmp_path), STORE_TIMEOUT))
    try:
        yield p
    finally:
        p.stop()
        forget_prefix(p.store)


def test_no_admission_of_the_old_generation_after_rotate_returns(pool: ServerPool) -> None:
    servers = pool.start(SERVERS, decisions=True)
    kind = pool.store.split(":", 1)[0]
    run = uuid.uuid4().hex[:8]
    sub = f"svc-{run}"
    old = pool.issuer.token(sub, f"{sub}-s1", gen=1, sa_kind="service")
    rotator = pool.rotator(sub)
    rotator.wait_ready()

    clients = SERVERS * CLIENTS_PER_SERVER
    warm = threading.Semaphore(0)
    rotated = threading.Event()
    rotation: dict[str, Any] = {}
    responses: list[tuple[int, int, int, int, str]] = []  # client, sent, received, status, code
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + LIMIT

    def client(index: int) -> None:
        server = servers[index % SERVERS]
        admitted, after = 0, 0
        with httpx.Client(timeout=10.0) as http:
            while time.monotonic() < deadline:
                sent = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
                try:
                    resp = http.get(f"{server.base}/ping?rid=c{index}-{sent}", headers=headers(old))
                    status, code = resp.status_code, code_of(resp.status_code, resp.json())
                except (httpx.HTTPError, ValueError) as exc:
                    status, code = 0, f"{type(exc).__name__}: {exc}"
                received = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
                with lock:
                    responses.append((index, sent, received, status, code))
                    if status == 0:
                        errors.append(code)
                if status == 200:
                    admitted += 1
                    if admitted == WARM_ADMISSIONS:
                        warm.release()
                if rotated.is_set() and sent > rotation["returned"]:
                    after += 1
                    if after >= AFTER_ROTATION:
                        return

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for _ in range(clients):  # every client has been admitted a few times: the load is on
        assert warm.acquire(timeout=LIMIT), f"the load never got going: {Counter(r[4] for r in responses)}"
    rotation.update(rotator.rotate())
    rotated.set()
    for t in threads:
        t.join(LIMIT)
    assert not any(t.is_alive() for t in threads), "clients did not finish"

    returned, called = rotation["returned"], rotation["called"]
    decisions = [d for d in pool.decisions() if d["sub"] == sub]
    old_calls = [d for d in decisions if d["gen"] == 1]
    late_admissions = [d for d in old_calls if d["outcome"] == "ok" and d["start"] > returned]
    overlapping = [d for d in old_calls if d["start"] <= returned and d["end"] >= called]
    before = [d for d in old_calls if d["outcome"] == "ok" and d["end"] < called]
    late_responses = [r for r in responses if r[1] > returned]
    late_200 = [r for r in late_responses if r[3] == 200]
    after_codes = Counter(d["outcome"] for d in old_calls if d["start"] > returned)

    # the new generation is admitted by every process, and the old one still refused
    new = pool.issuer.token(sub, f"{sub}-s2", gen=rotation["generation"], sa_kind="service")
    with httpx.Client(timeout=10.0) as http:
        new_answers = [http.get(f"{s.base}/ping", headers=headers(new)) for s in servers]
        old_again = [http.get(f"{s.base}/ping", headers=headers(old)) for s in servers]

    counts = {
        "store": kind, "processes": SERVERS, "clients": clients, "rotated_to": rotation["generation"],
        "rotate_call_ms": round((returned - called) / 1e6, 3),
        "old_token_requests": len(responses), "old_token_admitted_before_rotate": len(before),
        "store_calls_overlapping_rotate": len(overlapping),
        "overlapping_admitted": sum(1 for d in overlapping if d["outcome"] == "ok"),
        "store_calls_after_rotate_returned": sum(after_codes.values()),
        "after_rotate_by_code": dict(after_codes),
        "requests_sent_after_rotate_returned": len(late_responses),
        "admissions_after_rotate_returned": len(late_admissions), "responses_200_sent_after_rotate": len(late_200),
        "transport_errors": len(errors),
    }
    report = (f"propagation[{kind}]: {len(responses)} requests with the old token over {SERVERS} processes; "
              f"rotate() took {counts['rotate_call_ms']} ms; admitted before it: {len(before)}, store calls "
              f"overlapping it: {len(overlapping)} ({counts['overlapping_admitted']} admitted); after it returned: "
              f"{dict(after_codes)} -> admissions {len(late_admissions)}, late 200s {len(late_200)}; "
              f"errors {errors[:3]}")
    print("\n" + report)
    record_summary(f"propagation[{kind}]", counts)

    assert not errors, f"{report}\n{pool.logs()}"
    assert len(before) >= clients * WARM_ADMISSIONS, report
    assert len(late_responses) >= clients * AFTER_ROTATION, report
    assert sum(after_codes.values()) >= clients * AFTER_ROTATION, report
    assert not late_admissions, f"old token admitted after rotate() returned: {late_admissions[:5]}\n{report}"
    assert not late_200, f"200 for a request sent after rotate() returned: {late_200[:5]}\n{report}"
    assert set(after_codes) == {"stale_generation"}, report
    assert {r[3] for r in late_responses} == {401}, report
    assert [r.status_code for r in new_answers] == [200] * SERVERS, [r.text for r in new_answers]
    assert {r.json()["pid"] for r in new_answers} == {s.proc.pid for s in servers}
    assert [(r.status_code, r.json()["code"]) for r in old_again] == [(401, "stale_generation")] * SERVERS
