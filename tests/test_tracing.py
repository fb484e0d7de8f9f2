"""OpenTelemetry spans of verify, admit and release, recorded with the SDK's in-memory exporter."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import WAIT

from sa_middleware import Guard, Policy, RequestInfo
from sa_middleware.asgi import SessionAwareMiddleware
from sa_middleware.demo import DemoIssuer, serve_asgi

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def provider() -> None:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    trace.set_tracer_provider(tracer_provider)  # once per process: the global provider


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    _EXPORTER.clear()
    yield _EXPORTER
    _EXPORTER.clear()


def named(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def test_spans_of_a_request_through_a_real_server(issuer: DemoIssuer, tmp_path: Path,
                                                   exporter: InMemorySpanExporter) -> None:
    guard = Guard(store=f"sqlite:///{tmp_path / 't.db'}", keys=issuer.public_pem, algorithms=["RS256"],
                  issuer=issuer.issuer, audience=issuer.audience, policies={
                      "GET /items/{id}": Policy(locks=["item:{id}"]), "GET /admin": Policy(scopes={"admin"})})

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"ok"})  # type: ignore[operator]

    base, stop = serve_asgi(SessionAwareMiddleware(app, guard=guard))
    try:
        token = issuer.token("tracer", sid="t-1")
        assert httpx.get(f"{base}/items/42", headers={"authorization": f"Bearer {token}"}, timeout=WAIT).is_success
        assert httpx.get(f"{base}/admin", headers={"authorization": f"Bearer {token}"},
                         timeout=WAIT).status_code == 403
        assert httpx.get(f"{base}/items/1", timeout=WAIT).status_code == 401
    finally:
        stop()
        guard.close()
    spans = exporter.get_finished_spans()
    admits = named(spans, "sa_middleware.admit")
    assert [(s.attributes or {}).get("sa_middleware.outcome") for s in admits] == \
        ["admitted", "insufficient_scope", "missing_token"]
    assert [(s.attributes or {}).get("http.route") for s in admits] == ["GET /items/{id}", "GET /admin",
                                                                        "GET /items/{id}"]
    assert all((s.attributes or {}).get("http.request.method") == "GET" for s in admits)
    assert (admits[1].attributes or {}).get("sa_middleware.denial.status_code") == 403
    verifies = named(spans, "sa_middleware.verify")
    assert len(verifies) == 2  # no token, nothing to verify
    for verify, admit in zip(verifies, admits[:2], strict=True):
        assert verify.parent is not None and admit.context is not None
        assert verify.parent.span_id == admit.context.span_id
        assert (verify.attributes or {}).get("sa_middleware.token.valid") is True
    releases = named(spans, "sa_middleware.release")
    assert len(releases) == 1  # only the admitted request holds a ticket
    assert all(s.kind == trace.SpanKind.INTERNAL for s in spans)
    text = repr([dict(s.attributes or {}) for s in spans])
    assert "tracer" not in text and "t-1" not in text  # no subject or session in span attributes


def test_tracing_false_records_nothing(issuer: DemoIssuer, exporter: InMemorySpanExporter) -> None:
    guard = Guard(store="memory://", keys=issuer.public_pem, algorithms=["RS256"], tracing=False)
    from sa_middleware import RequestInfo

    guard.admit(RequestInfo("GET", "/x", {}))
    assert guard.observer is None
    assert exporter.get_finished_spans() == ()
    guard.close()


def test_without_opentelemetry_tracing_is_a_no_op_and_true_is_refused() -> None:
    code = (
        "import sys\n"
        "sys.modules['opentelemetry'] = None  # as if it were not installed\n"
        "from sa_middleware import Guard\n"
        "from sa_middleware.demo import DemoIssuer\n"
        "from sa_middleware.errors import ConfigurationError\n"
        "i = DemoIssuer()\n"
        "kw = dict(store='memory://', keys=i.public_pem, algorithms=['RS256'])\n"
        "assert Guard(**kw).observer is None\n"
        "try:\n"
        "    Guard(tracing=True, **kw)\n"
        "except ConfigurationError as exc:\n"
        "    print('refused:', exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "refused: tracing=True needs OpenTelemetry" in out.stdout, out.stderr


def test_a_method_the_client_makes_up_is_other(issuer: DemoIssuer, exporter: InMemorySpanExporter) -> None:
    """``http.request.method`` is one of the HTTP methods or ``_OTHER`` (OpenTelemetry's HTTP conventions): a
    client cannot create new attribute values (which span-derived metrics would turn into labels)."""
    guard = Guard(store="memory://", keys=issuer.public_pem, algorithms=["RS256"], issuer=issuer.issuer,
                  audience=issuer.audience)
    try:
        for method in ("BREW-4f1a9c", "get", "DELETE"):
            guard.admit(RequestInfo(method, "/x", {}))
    finally:
        guard.close()
    methods = [(s.attributes or {}).get("http.request.method") for s in named(exporter.get_finished_spans(),
                                                                             "sa_middleware.admit")]
    assert methods == ["_OTHER", "_OTHER", "DELETE"]


def test_without_an_sdk_no_span_is_made_and_an_sdk_set_up_later_is_followed() -> None:
    """With only the OpenTelemetry API (no SDK set up), spans would record nothing: the Guard makes none. A tracer
    provider set up after the Guard was built is followed from the next request on."""
    code = (
        "from opentelemetry import trace\n"
        "from opentelemetry.sdk.trace import TracerProvider\n"
        "from opentelemetry.sdk.trace.export import SimpleSpanProcessor\n"
        "from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter\n"
        "from sa_middleware import Guard, RequestInfo\n"
        "from sa_middleware.demo import DemoIssuer\n"
        "issuer = DemoIssuer()\n"
        "guard = Guard(store='memory://', keys=issuer.public_pem, algorithms=['RS256'], issuer=issuer.issuer,\n"
        "              audience=issuer.audience)\n"
        "request = RequestInfo('GET', '/x', {'authorization': 'Bearer ' + issuer.token('u', sid='s')})\n"
        "print('probe before:', guard.observer.admission(request, guard.routes.match('GET', '/x')))\n"
        "guard.release(guard.admit(request).ticket)\n"
        "exporter = InMemorySpanExporter()\n"
        "provider = TracerProvider()\n"
        "provider.add_span_processor(SimpleSpanProcessor(exporter))\n"
        "trace.set_tracer_provider(provider)\n"
        "guard.release(guard.admit(request).ticket)\n"
        "print('spans after:', sorted(s.name for s in exporter.get_finished_spans()))\n"
        "guard.close()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "probe before: None" in out.stdout, out.stdout + out.stderr
    assert ("spans after: ['sa_middleware.admit', 'sa_middleware.release', 'sa_middleware.verify']"
            in out.stdout), out.stdout + out.stderr
