"""Hot-path benchmarks, measured side by side in one run: medians of repeated batches, and ratios.

    python benchmarks/run.py [--rounds 7] [--batch 300]

What it measures (per request, median over rounds):
- token verification: uncached (signature checked) vs cached (the verified-token cache);
- Guard.admit + Guard.release through each store (memory, SQLite file, Redis at ``$SA_BENCH_REDIS``, default the
  local 127.0.0.1:6379, under a fresh key prefix; ``SA_BENCH_REDIS=off`` skips it);
- a trivial ASGI app called directly: bare vs wrapped in SessionAwareMiddleware (memory and SQLite stores; SQLite
  both inline-first, the default, and with every store call in a worker thread, ``inline=False``);
- a one-route Starlette app and a one-route Flask app: bare, behind the core middleware (the Guard's route table),
  and behind the framework adapter (the framework's router and ``@policy`` on the view), on the memory store.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sa_middleware import Guard, Policy, RequestInfo
from sa_middleware.asgi import SessionAwareMiddleware
from sa_middleware.demo import DemoIssuer
from sa_middleware.guard import Admitted
from sa_middleware.stores import open_store
from sa_middleware.stores.sqlite import SQLiteStore


def _median_us(samples: list[float], batch: int) -> float:
    return statistics.median(samples) / batch * 1e6


def bench_sync(fn: Callable[[int], None], rounds: int, batch: int) -> float:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(batch):
            fn(i)
        samples.append(time.perf_counter() - start)
    return _median_us(samples, batch)


def bench_async(fn: Callable[[int], Awaitable[None]], rounds: int, batch: int) -> float:
    async def run() -> list[float]:
        samples = []
        for _ in range(rounds):
            start = time.perf_counter()
            for i in range(batch):
                await fn(i)
            samples.append(time.perf_counter() - start)
        return samples
    return _median_us(asyncio.run(run()), batch)


def bench_adapters(guard: Guard, token: str, rounds: int, batch: int) -> dict[str, float]:
    """A one-route Starlette app and a one-route Flask app: bare, behind the core middleware (Guard table), and
    behind the framework adapter (the framework's router and an @policy on the view), on the memory store."""
    from flask import Flask
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from sa_middleware.adapters import flask as flask_adapter
    from sa_middleware.adapters import starlette as starlette_adapter
    from sa_middleware.wsgi import SessionAwareWSGIMiddleware

    results: dict[str, float] = {}
    headers = [(b"authorization", f"Bearer {token}".encode()), (b"user-agent", b"bench")]

    async def endpoint(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    def starlette_app(with_policy: bool) -> Starlette:
        view = starlette_adapter.policy(locks=["x:{id}"])(endpoint) if with_policy else endpoint
        return Starlette(routes=[Route("/x/{id}", view)])

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    def asgi_call(target: Any) -> Callable[[int], Awaitable[None]]:
        async def call(i: int) -> None:
            statuses: list[int] = []

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])
            scope = {"type": "http", "method": "GET", "path": f"/x/{uuid.uuid4().hex[:8]}", "headers": headers,
                     "client": ("127.0.0.1", 1234), "query_string": b"", "scheme": "http", "root_path": "",
                     "server": ("127.0.0.1", 80), "http_version": "1.1"}
            await target(scope, receive, send)
            assert statuses == [200], statuses
        return call

    results["starlette bare"] = bench_async(asgi_call(starlette_app(False)), rounds, batch)
    core_app = starlette_app(False)
    core_app.add_middleware(SessionAwareMiddleware, guard=guard)
    results["starlette + core middleware memory"] = bench_async(asgi_call(core_app), rounds, batch)
    adapted = starlette_app(True)
    adapted.add_middleware(starlette_adapter.SessionAwareMiddleware, guard=guard)
    results["starlette + adapter memory"] = bench_async(asgi_call(adapted), rounds, batch)

    def flask_app(with_policy: bool) -> Flask:
        app = Flask("bench")

        def view(id: str) -> str:
            return "ok"
        app.add_url_rule("/x/<id>", "x", flask_adapter.policy(locks=["x:{id}"])(view) if with_policy else view)
        return app

    def wsgi_call(target: Any) -> Callable[[int], None]:
        def call(i: int) -> None:
            statuses: list[str] = []
            environ = {"REQUEST_METHOD": "GET", "PATH_INFO": f"/x/{uuid.uuid4().hex[:8]}", "SCRIPT_NAME": "",
                       "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "REMOTE_ADDR": "127.0.0.1",
                       "HTTP_AUTHORIZATION": f"Bearer {token}", "HTTP_USER_AGENT": "bench", "wsgi.url_scheme": "http",
                       "wsgi.input": io.BytesIO(b""), "SERVER_PROTOCOL": "HTTP/1.1"}
            body = target(environ, lambda status, hdrs, exc=None: statuses.append(status))
            b"".join(body)
            getattr(body, "close", lambda: None)()
            assert statuses and statuses[0].startswith("200"), statuses
        return call

    plain = flask_app(False)
    results["flask bare"] = bench_sync(wsgi_call(plain.wsgi_app), rounds, batch)
    core = flask_app(False)
    core.wsgi_app = SessionAwareWSGIMiddleware(core.wsgi_app, guard=guard)  # type: ignore[method-assign]
    results["flask + core middleware memory"] = bench_sync(wsgi_call(core.wsgi_app), rounds, batch)
    adapted_flask = flask_app(True)
    flask_adapter.SessionAware(adapted_flask, guard=guard)
    results["flask + adapter memory"] = bench_sync(wsgi_call(adapted_flask.wsgi_app), rounds, batch)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--batch", type=int, default=300)
    args = parser.parse_args()
    rounds, batch = args.rounds, args.batch
    issuer = DemoIssuer()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        stores: dict[str, Any] = {
            "memory": "memory://",
            "sqlite": f"sqlite:///{Path(tmp) / 'bench.db'}",
            "sqlite-threaded": SQLiteStore(str(Path(tmp) / "bench-threaded.db"), inline=False),
        }
        redis_uri = os.environ.get("SA_BENCH_REDIS", "redis://127.0.0.1:6379/0")
        prefix = f"bench{uuid.uuid4().hex[:8]}"
        if redis_uri != "off":  # a fresh key prefix, deleted afterwards (SA_BENCH_REDIS=off skips Redis)
            stores["redis"] = open_store(f"{redis_uri}?prefix={prefix}&bootstrap=true")
        guards = {name: Guard(store=uri, keys=issuer.public_pem, algorithms=["RS256"], issuer=issuer.issuer,
                              audience=issuer.audience, policies={"GET /x/{id}": Policy(locks=["x:{id}"])},
                              token_cache_size=100_000)
                  for name, uri in stores.items()}
        verifier = guards["memory"].verifier
        fresh = [issuer.token(f"u{i}") for i in range(rounds * batch)]
        it = iter(fresh)
        results["verify uncached"] = bench_sync(lambda i: (verifier.verify(next(it)), None)[1], rounds, batch)
        token = issuer.token("bench", sid="s1")
        verifier.verify(token)
        results["verify cached"] = bench_sync(lambda i: (verifier.verify(token), None)[1], rounds, batch)

        headers = {"authorization": f"Bearer {token}", "user-agent": "bench"}
        for name, guard in guards.items():
            def admit_release(i: int, guard: Guard = guard) -> None:
                outcome = guard.admit(RequestInfo("GET", f"/x/{i}", headers, "127.0.0.1"))
                assert isinstance(outcome, Admitted), outcome
                guard.release(outcome.ticket)
            results[f"admit+release {name}"] = bench_sync(admit_release, rounds, batch)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        def caller(target: Any) -> Callable[[int], Awaitable[None]]:
            async def call(i: int) -> None:
                statuses: list[int] = []

                async def send(message: dict[str, Any]) -> None:
                    if message["type"] == "http.response.start":
                        statuses.append(message["status"])
                scope = {"type": "http", "method": "GET", "path": f"/x/{uuid.uuid4().hex[:8]}",
                         "headers": [(b"authorization", f"Bearer {token}".encode()), (b"user-agent", b"bench")],
                         "client": ("127.0.0.1", 1234), "query_string": b""}
                await target(scope, receive, send)
                assert statuses == [200], statuses
            return call

        results["asgi bare app"] = bench_async(caller(app), rounds, batch)
        for name, guard in guards.items():
            results[f"asgi + middleware {name}"] = bench_async(
                caller(SessionAwareMiddleware(app, guard=guard)), rounds, batch)
        results.update(bench_adapters(guards["memory"], token, rounds, batch))
        for guard in guards.values():
            guard.close()
        if "redis" in stores:
            import redis

            client = redis.Redis.from_url(redis_uri)
            for key in client.scan_iter(match=f"{prefix}:*", count=5000):
                client.unlink(key)
            client.close()

    print(f"{'measure':<40} {'median us/request':>18}")
    for name, value in results.items():
        print(f"{name:<40} {value:>18.1f}")
    print()
    print(f"cache speed-up (uncached / cached): {results['verify uncached'] / results['verify cached']:.1f}x")
    print(f"sqlite / memory admit+release:      "
          f"{results['admit+release sqlite'] / results['admit+release memory']:.2f}x")
    for name in stores:
        overhead = results[f"asgi + middleware {name}"] - results["asgi bare app"]
        print(f"middleware overhead, {name:<16} {overhead:7.1f} us/request")
    for framework in ("starlette", "flask"):
        bare, core = results[f"{framework} bare"], results[f"{framework} + core middleware memory"]
        adapter = results[f"{framework} + adapter memory"]
        print(f"{framework} adapter vs core middleware:  {adapter - bare:7.1f} vs {core - bare:7.1f} us/request "
              f"overhead ({adapter / core:.2f}x the time per request)")
    print(f"sqlite inline-first vs threaded (ASGI): "
          f"{results['asgi + middleware sqlite-threaded'] / results['asgi + middleware sqlite']:.2f}x faster")


if __name__ == "__main__":
    main()
