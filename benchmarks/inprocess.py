"""In-process figures: ``Guard.admit`` + ``Guard.release`` per request on each store, on the plain route and the lock
route, with 64 principals rotating (their tokens already verified and cached, as on a warm server), and, for Redis,
the server time one admission plus its release costs (``INFO commandstats`` deltas), the round trip of a PING (the
floor under any Redis call) and the SQL statements one admission plus its release runs on SQLite.

    python benchmarks/inprocess.py [--rounds 5] [--batch 400] [--redis redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from servers import DEFAULT_POLICY, POLICIES

from sa_middleware import Guard, RequestInfo
from sa_middleware.demo import DemoIssuer
from sa_middleware.guard import Admitted

PRINCIPALS = 64
OBJECTS = 997
ROUTES = {"plain": ("GET", "/plain"), "lock": ("PUT", "/objects/")}


def principal_tokens(issuer: DemoIssuer, count: int = PRINCIPALS) -> list[str]:
    """One RS256 token per principal, each with its own session id and generation."""
    return [issuer.token(f"user{i}", ttl=3600, sid=f"session{i}", gen=1) for i in range(count)]


def _requests(tokens: list[str], route: str, count: int) -> list[RequestInfo]:
    method, path = ROUTES[route]
    return [RequestInfo(method, path + str(i % OBJECTS) if route == "lock" else path,
                        {"authorization": f"Bearer {tokens[i % len(tokens)]}", "user-agent": "bench"}, "127.0.0.1")
            for i in range(count)]


def _admit_release(guard: Guard, requests: list[RequestInfo]) -> tuple[float, float]:
    """Seconds (wall clock, and this thread's CPU time) for admitting and releasing every request, one after
    another."""
    start, cpu = time.perf_counter(), time.thread_time()
    for request in requests:
        outcome = guard.admit(request)
        if not isinstance(outcome, Admitted):
            raise AssertionError(f"refused: {outcome}")
        guard.release(outcome.ticket)
    return time.perf_counter() - start, time.thread_time() - cpu


def _median_us(guard: Guard, requests: list[RequestInfo], rounds: int) -> tuple[float, float]:
    """Median wall-clock and CPU microseconds per admit + release (the CPU figure is steadier on a busy machine;
    it leaves out the time a store spends in another process, such as Redis)."""
    _admit_release(guard, requests[: len(requests) // 4])  # warm: sessions exist, connections open, code paths hot
    runs = [_admit_release(guard, requests) for _ in range(rounds)]
    n = len(requests)
    return statistics.median(w for w, _ in runs) / n * 1e6, statistics.median(c for _, c in runs) / n * 1e6


_SCRIPT_COMMANDS = ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_evalsha_ro", "cmdstat_eval_ro", "cmdstat_fcall",
                    "cmdstat_fcall_ro")


def _server_counters(client: Any) -> tuple[dict[str, tuple[int, int]], float]:
    stats = client.info("commandstats")
    cpu = client.info("cpu")
    return ({name: (int(v["calls"]), int(v["usec"])) for name, v in stats.items()},
            float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]))


def redis_server_time(guard: Guard, requests: list[RequestInfo], client: Any) -> dict[str, float]:
    """Redis time per admission plus its release: ``script_us``, the ``INFO commandstats`` usec of the script calls
    (EVALSHA...: the commands a script runs are counted inside it), ``script_calls`` the scripts called (the hot
    path sends nothing else), and ``cpu_us``, the server process's CPU time
    (``INFO cpu``: parsing and networking included). Meaningful only on a server nobody else uses meanwhile."""
    _admit_release(guard, requests[: len(requests) // 4])
    before, cpu_before = _server_counters(client)
    _admit_release(guard, requests)
    after, cpu_after = _server_counters(client)
    delta = {name: (c - before.get(name, (0, 0))[0], u - before.get(name, (0, 0))[1])
             for name, (c, u) in after.items() if name not in ("cmdstat_info",)}
    scripts = [delta[name] for name in _SCRIPT_COMMANDS if name in delta]
    n = len(requests)
    return {"script_us": sum(u for _, u in scripts) / n, "script_calls": sum(c for c, _ in scripts) / n,
            "cpu_us": (cpu_after - cpu_before) * 1e6 / n}


def redis_round_trip_us(client: Any, count: int = 2000) -> float:
    """Median microseconds of a PING round trip from this process (redis-py, one connection): the floor under any
    call to the server, whatever it runs."""
    client.ping()
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        client.ping()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def sqlite_statements(guard: Guard, request: RequestInfo) -> int | None:
    """SQL statements one admission plus its release runs, on every connection the store opened (``None`` when it
    keeps no SQLite connections). A release that joins the next write is counted with the next admission."""
    connections = getattr(guard.store, "_connections", None)
    if not connections or not all(isinstance(c, sqlite3.Connection) for c in connections):
        return None
    first = guard.admit(request)  # a release pending from before runs with this admission, not the traced one
    assert isinstance(first, Admitted), first
    guard.release(first.ticket)
    seen: list[str] = []
    for conn in connections:
        conn.set_trace_callback(seen.append)
    try:
        outcome = guard.admit(request)
        assert isinstance(outcome, Admitted), outcome
        guard.release(outcome.ticket)
    finally:
        for conn in connections:
            conn.set_trace_callback(None)
    return len(seen)


def measure(redis_uri: str | None, rounds: int, batch: int,
            progress: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Every in-process figure, as a JSON-ready dict."""
    issuer = DemoIssuer()
    tokens = principal_tokens(issuer)
    results: dict[str, Any] = {"admit_release_us": {}, "admit_release_cpu_us": {}, "sqlite_statements": {},
                               "redis": {}}
    with tempfile.TemporaryDirectory() as tmp:
        stores = {"memory": "memory://", "sqlite": f"sqlite:///{Path(tmp) / 'bench.db'}"}
        prefix = f"bench{uuid.uuid4().hex[:8]}"
        if redis_uri:
            stores["redis"] = f"{redis_uri}?prefix={prefix}&bootstrap=true"
        for name, uri in stores.items():
            guard = Guard(store=uri, keys=issuer.public_pem, algorithms=["RS256"], issuer=issuer.issuer,
                          audience=issuer.audience, policies=POLICIES, default_policy=DEFAULT_POLICY)
            try:
                for route in ROUTES:
                    requests = _requests(tokens, route, batch)
                    wall, cpu = _median_us(guard, requests, rounds)
                    results["admit_release_us"][f"{name} {route}"] = round(wall, 1)
                    results["admit_release_cpu_us"][f"{name} {route}"] = round(cpu, 1)
                    progress(f"in-process admit+release {name} {route}: {wall:.1f} us ({cpu:.1f} us CPU)")
                    if name == "sqlite":
                        results["sqlite_statements"][route] = sqlite_statements(guard, requests[0])
                    if name == "redis" and redis_uri is not None:
                        import redis

                        client = redis.Redis.from_url(redis_uri)
                        try:
                            results["redis"][route] = {k: round(v, 1) for k, v in redis_server_time(
                                guard, requests, client).items()}
                            progress(f"redis server time {route}: {results['redis'][route]}")
                        finally:
                            client.close()
            finally:
                guard.close()
        if redis_uri is not None:
            import redis

            client = redis.Redis.from_url(redis_uri)
            results["redis"]["ping_us"] = round(redis_round_trip_us(client), 1)
            progress(f"redis PING round trip: {results['redis']['ping_us']} us")
            for key in client.scan_iter(match=f"{prefix}:*", count=5000):
                client.unlink(key)
            client.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=400)
    parser.add_argument("--redis", default=None, help="a Redis nobody else uses (server time is read from INFO)")
    args = parser.parse_args()
    print(json.dumps(measure(args.redis, args.rounds, args.batch, lambda line: print(line, file=sys.stderr)),
                     indent=2))


if __name__ == "__main__":
    main()
