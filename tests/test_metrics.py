"""Prometheus metrics scraped over HTTP from a real server (uvicorn, werkzeug) after a scripted load."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support import WAIT, problem

from sa_middleware import Guard, Policy
from sa_middleware.asgi import SessionAwareMiddleware
from sa_middleware.demo import DemoIssuer, serve_asgi, serve_wsgi
from sa_middleware.errors import ConfigurationError
from sa_middleware.metrics import Metrics
from sa_middleware.wsgi import AfterClose, SessionAwareWSGIMiddleware

POLICIES = {
    "GET /items/{id}": Policy(),
    "GET /admin/{id}": Policy(scopes={"admin"}),
    "GET /hold/{id}": Policy(locks=["item:{id}"]),
    "GET /metrics": Policy(public=True),
}


class Held:
    """``GET /hold/...`` parks in the app until :attr:`go` is set; :attr:`inside` tells it arrived."""

    def __init__(self) -> None:
        self.inside = threading.Event()
        self.go = threading.Event()
        self.finished = threading.Event()  # the middleware is done with the held request (its ticket released)


def asgi_stack(guard: Guard, metrics: Metrics, held: Held) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["path"].startswith("/hold/"):
            held.inside.set()
            await anyio.to_thread.run_sync(held.go.wait, WAIT)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    guarded = SessionAwareMiddleware(app, guard=guard)
    exposition = metrics.asgi_app()

    async def root(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/metrics":
            await exposition(scope, receive, send)
        else:
            await guarded(scope, receive, send)
            if scope["path"].startswith("/hold/"):
                held.finished.set()
    return root


def wsgi_stack(guard: Guard, metrics: Metrics, held: Held) -> Any:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["PATH_INFO"].startswith("/hold/"):
            held.inside.set()
            held.go.wait(WAIT)
        start_response("200 OK", [("content-type", "text/plain")])
        return [b"ok"]

    guarded = SessionAwareWSGIMiddleware(app, guard=guard)
    exposition = metrics.wsgi_app()

    def root(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ["PATH_INFO"] == "/metrics":
            return exposition(environ, start_response)  # type: ignore[no-any-return]
        result = guarded(environ, start_response)
        return AfterClose(result, held.finished.set) if environ["PATH_INFO"].startswith("/hold/") else result
    return root


@pytest.fixture(params=["asgi", "wsgi"])
def served(request: pytest.FixtureRequest, issuer: DemoIssuer, tmp_path: Path) -> Iterator[tuple[str, Guard, Held]]:
    metrics = Metrics(CollectorRegistry(), sample_every=0)
    guard = Guard(store=f"sqlite:///{tmp_path / 'm.db'}", keys=issuer.public_pem, algorithms=["RS256"],
                  issuer=issuer.issuer, audience=issuer.audience, policies=POLICIES, metrics=metrics, tracing=False)
    held = Held()
    stack, serve = (asgi_stack, serve_asgi) if request.param == "asgi" else (wsgi_stack, serve_wsgi)
    base, stop = serve(stack(guard, metrics, held))
    try:
        yield base, guard, held
    finally:
        held.go.set()
        stop()
        guard.close()


def scrape(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = httpx.get(f"{base}/metrics", timeout=WAIT)
    assert resp.status_code == 200
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def admissions(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[tuple[str, str], float]:
    return {(dict(labels)["route"], dict(labels)["code"]): value for (name, labels), value in samples.items()
            if name == "sa_middleware_admissions_total"}


def test_counts_equal_the_requests_sent_by_code(served: tuple[str, Guard, Held], issuer: DemoIssuer) -> None:
    base, guard, held = served
    sent: dict[tuple[str, str], int] = {}

    def send(path: str, route: str, token: str | None, status: int, code: str) -> None:
        headers = {"authorization": f"Bearer {token}"} if token is not None else {}
        resp = httpx.get(base + path, headers=headers, timeout=WAIT)
        if code == "admitted":
            assert resp.status_code == status, resp.text
        else:
            problem(resp, status, code)
        sent[(route, code)] = sent.get((route, code), 0) + 1

    good = issuer.token("metrics-user", sid="m-1")
    for i in range(5):
        send(f"/items/{i}", "GET /items/{id}", good, 200, "admitted")
    for i in range(3):
        send(f"/items/{i}", "GET /items/{id}", None, 401, "missing_token")
    for _ in range(2):
        send("/items/7", "GET /items/{id}", "not-a-jwt", 401, "invalid_token")
        send("/admin/1", "GET /admin/{id}", good, 403, "insufficient_scope")
    send("/no/such/place-42", "unmatched", None, 401, "missing_token")

    samples = scrape(base)
    assert admissions(samples) == {key: float(n) for key, n in sent.items()}
    text = httpx.get(f"{base}/metrics", timeout=WAIT).text
    assert "place-42" not in text and "metrics-user" not in text and "m-1" not in text  # bounded labels only
    admitted_time = samples[("sa_middleware_admission_duration_seconds_count", (("route", "GET /items/{id}"),))]
    assert admitted_time == 5 + 3 + 2  # every decision on the route is timed
    assert samples[("sa_middleware_store_duration_seconds_count", (("operation", "admit"),))] == 5 + 2
    assert samples[("sa_middleware_release_duration_seconds_count", ())] == 5
    assert samples[("sa_middleware_sessions_active", (("kind", "human"), ("status", "active")))] == 1

    # a request in flight holding a lock: tickets in flight and locks held, sampled from the store
    thread = threading.Thread(target=httpx.get, args=(f"{base}/hold/9",),
                              kwargs={"headers": {"authorization": f"Bearer {good}"}, "timeout": WAIT})
    thread.start()
    assert held.inside.wait(WAIT)
    samples = scrape(base)
    assert samples[("sa_middleware_tickets_in_flight", ())] == 1
    assert samples[("sa_middleware_locks_held", (("mode", "exclusive"),))] == 1
    held.go.set()
    thread.join(WAIT)
    assert held.finished.wait(WAIT)
    assert guard.locks() == []
    samples = scrape(base)
    assert samples[("sa_middleware_tickets_in_flight", ())] == 0
    assert ("sa_middleware_locks_held", (("mode", "exclusive"),)) not in samples
    assert admissions(samples)[("GET /hold/{id}", "admitted")] == 1


def test_store_errors_and_fail_open_are_counted(issuer: DemoIssuer, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    guard = Guard(store=f"sqlite:///{tmp_path / 'f.db'}", keys=issuer.public_pem, algorithms=["RS256"],
                  issuer=issuer.issuer, audience=issuer.audience, metrics=Metrics(registry), tracing=False,
                  policies={"GET /open": Policy(fail_open=True), "GET /closed": Policy()})
    from sa_middleware import RequestInfo
    from sa_middleware.errors import StoreUnavailable

    def down(*args: object) -> None:
        raise StoreUnavailable("down for the test")
    token = issuer.token("u-down")
    from sa_middleware.guard import Admitted

    admitted = guard.admit(RequestInfo("GET", "/closed", {"authorization": f"Bearer {token}"}))
    assert isinstance(admitted, Admitted)
    guard.store.release = down  # type: ignore[method-assign]
    guard.release(admitted.ticket)  # logged; the lease bounds it
    assert registry.get_sample_value("sa_middleware_store_errors_total", {"operation": "release"}) == 1
    assert registry.get_sample_value("sa_middleware_release_duration_seconds_count") == 1
    guard.store.admit = down  # type: ignore[method-assign]
    for path in ("/open", "/closed", "/closed"):
        guard.admit(RequestInfo("GET", path, {"authorization": f"Bearer {token}"}))
    value = registry.get_sample_value
    assert value("sa_middleware_store_errors_total", {"operation": "admit"}) == 3
    assert value("sa_middleware_fail_open_admissions_total", {"route": "GET /open"}) == 1
    assert value("sa_middleware_admissions_total", {"route": "GET /open", "code": "fail_open"}) == 1
    assert value("sa_middleware_admissions_total", {"route": "GET /closed", "code": "store_unavailable"}) == 2
    assert value("sa_middleware_admissions_total", {"route": "GET /closed", "code": "admitted"}) == 1
    guard.close()


def test_audit_drops_are_counted(issuer: DemoIssuer, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    guard = Guard(store="memory://", keys=issuer.public_pem, algorithms=["RS256"], issuer=issuer.issuer,
                  audience=issuer.audience, metrics=Metrics(registry), tracing=False, audit_buffer=2)
    from sa_middleware import RequestInfo

    guard._keeper.stop()  # nothing writes the buffer: the third missing_token record is dropped
    for _ in range(3):
        guard.admit(RequestInfo("GET", "/x", {}))
    assert registry.get_sample_value("sa_middleware_audit_dropped_total") == 1
    guard.close()


def test_default_registry_is_shared_and_the_core_never_imports_prometheus() -> None:
    code = (
        "import sys\n"
        "from sa_middleware import Guard\n"
        "from sa_middleware.demo import DemoIssuer\n"
        "i = DemoIssuer()\n"
        "kw = dict(store='memory://', keys=i.public_pem, algorithms=['RS256'], tracing=False)\n"
        "g = Guard(**kw)\n"
        "assert g.observer is None and 'prometheus_client' not in sys.modules\n"
        "a, b = Guard(metrics=True, **kw), Guard(metrics=True, **kw)\n"
        "assert a.observer.metrics is b.observer.metrics\n"
        "from prometheus_client import REGISTRY\n"
        "assert REGISTRY.get_sample_value('sa_middleware_tickets_in_flight') == 0\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_bad_metrics_option_is_refused_at_start(issuer: DemoIssuer) -> None:
    with pytest.raises(ConfigurationError, match="metrics must be"):
        Guard(store="memory://", keys=issuer.public_pem, algorithms=["RS256"], metrics="yes")  # type: ignore[arg-type]


def test_lock_wait_is_timed_by_its_outcome(issuer: DemoIssuer) -> None:
    registry = CollectorRegistry()
    guard = Guard(store="memory://", keys=issuer.public_pem, algorithms=["RS256"], issuer=issuer.issuer,
                  audience=issuer.audience, metrics=Metrics(registry), tracing=False,
                  policies={"PUT /docs/{id}": Policy(locks=["doc:{id}"], on_lock_conflict="wait", lock_wait=0.2)})
    from sa_middleware import RequestInfo
    from sa_middleware.guard import Admitted

    def put(sub: str) -> Any:
        return guard.admit(RequestInfo("PUT", "/docs/1", {"authorization": f"Bearer {issuer.token(sub)}"}))
    first = put("writer-1")
    assert isinstance(first, Admitted)
    refused = put("writer-2")  # waits for the lock up to lock_wait, then gives up
    assert getattr(refused, "code", None) == "object_locked"
    labels = {"route": "PUT /docs/{id}", "code": "object_locked"}
    assert registry.get_sample_value("sa_middleware_lock_wait_seconds_count", labels) == 1
    assert (registry.get_sample_value("sa_middleware_lock_wait_seconds_sum", labels) or 0) > 0
    assert registry.get_sample_value("sa_middleware_lock_wait_seconds_count",
                                     {"route": "PUT /docs/{id}", "code": "admitted"}) is None  # never waited
    guard.release(first.ticket)
    guard.close()


def test_security_events_are_counted_by_type_and_result(issuer: DemoIssuer) -> None:
    sys.path.insert(0, str(Path(__file__).parent / "events"))
    from ssf_support import CAEP, Transmitter, user

    from sa_middleware.events import SSFReceiver

    registry = CollectorRegistry()
    guard = Guard(store="memory://", keys=issuer.public_pem, algorithms=["RS256"], issuer=issuer.issuer,
                  audience=issuer.audience, metrics=Metrics(registry), tracing=False)
    tx = Transmitter()
    rx = SSFReceiver(guard, keys=tx.public_pem, issuer=tx.issuer, audience=tx.audience)
    event = tx.set(CAEP + "session-revoked", sub_id=user(issuer, "leaky"))
    assert rx.process(event).status == "applied"
    assert rx.process(event).status == "duplicate"
    value = registry.get_sample_value
    assert value("sa_middleware_security_events_total", {"type": "session-revoked", "result": "applied"}) == 1
    assert value("sa_middleware_security_events_total", {"type": "session-revoked", "result": "duplicate"}) == 1
    guard.close()


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, buckets=(0.001, 0.01))
    for seconds in (0.001, 0.005, 0.01, 2.0):
        metrics.admitted("GET /r", "admitted", seconds, None, None)
    value = registry.get_sample_value
    buckets = [value("sa_middleware_admission_duration_seconds_bucket", {"route": "GET /r", "le": le})
               for le in ("0.001", "0.01", "+Inf")]
    assert buckets == [1, 3, 4]
    assert value("sa_middleware_admission_duration_seconds_count", {"route": "GET /r"}) == 4
    assert value("sa_middleware_admission_duration_seconds_sum", {"route": "GET /r"}) == pytest.approx(2.016)
    for bad in ((), (0.01, 0.001), (float("inf"),)):
        with pytest.raises(ConfigurationError, match="buckets"):
            Metrics(CollectorRegistry(), buckets=bad)


def test_a_client_cannot_make_new_route_label_values(issuer: DemoIssuer) -> None:
    """A framework names a route after the request's method (``"<METHOD> /items/{id}"``; Starlette for a wrong
    method, Django for any): a method the client makes up is ``_OTHER`` in the route label, so random methods cannot
    create new time series."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from sa_middleware.adapters.starlette import SessionAwareMiddleware as StarletteMiddleware

    registry = CollectorRegistry()
    metrics = Metrics(registry=registry)
    guard = Guard(store="memory://", keys=issuer.public_pem, algorithms=["RS256"], issuer=issuer.issuer,
                  audience=issuer.audience, metrics=metrics)
    app = Starlette(routes=[Route("/items/{id:int}", lambda request: PlainTextResponse("ok"))])
    app.add_middleware(StarletteMiddleware, guard=guard)
    base, stop = serve_asgi(app, http="h11")  # h11 passes any method token on (httptools knows a fixed list)
    try:
        token = {"authorization": f"Bearer {issuer.token('load')}"}
        for method in ("GET", "BREW-1", "BREW-2", "BREW-3"):
            httpx.request(method, f"{base}/items/7", headers=token, timeout=WAIT)
    finally:
        stop()
        guard.close()
    routes = {s.labels["route"] for family in text_string_to_metric_families(generate_latest(registry).decode())
              for s in family.samples if "route" in s.labels}
    assert routes == {"GET /items/{id:int}", "_OTHER /items/{id:int}"}
