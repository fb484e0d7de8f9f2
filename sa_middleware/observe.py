"""What the Guard reports while it decides: Prometheus metrics (:mod:`sa_middleware.metrics`) and OpenTelemetry spans.

The Guard holds one :class:`Observer` (or ``None``, and then the hot path pays one ``is None`` test per hook). For
each admission it creates a :class:`Probe` that times the steps of the decision flow (token verification, the store
call, lock waits) and reports the outcome once. Neither ``prometheus_client`` nor ``opentelemetry`` is imported
unless enabled: ``Guard(metrics=True)`` (or a :class:`~sa_middleware.metrics.Metrics`), and ``tracing=None`` (the
default: on when ``opentelemetry-api`` is installed) or ``tracing=True`` (required).
"""

from __future__ import annotations

import importlib.util
from time import perf_counter
from typing import TYPE_CHECKING, Any

from .denials import Denial
from .errors import ConfigurationError

if TYPE_CHECKING:
    from .context import RequestInfo
    from .metrics import Metrics
    from .operations import Operations
    from .policy import RouteMatch
    from .records import Admission

__all__ = ["UNMATCHED", "Observer", "Probe", "build_observer", "route_label"]

#: the route label of a request that matched no route (never the raw path: bounded cardinality)
UNMATCHED = "unmatched"
_TRACER = "sa_middleware"
#: the methods ``http.request.method`` names; any other is ``_OTHER`` (OpenTelemetry's HTTP semantic conventions), so
#: a client cannot make up attribute values
_METHODS = frozenset({"CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE"})
#: what a route name may start with (the rest becomes ``_OTHER``)
_ROUTE_KINDS = _METHODS | {"*", "WEBSOCKET", "TOOL", "PROMPT", "RESOURCE"}


def route_label(match: RouteMatch | None) -> str:
    """The route template of a match, or :data:`UNMATCHED`. A framework names a route after the request's method
    (``"BREW /items/{id}"`` for a method its route does not serve): a method HTTP does not define is ``_OTHER``."""
    route = match.route if match is not None else None
    if not route:
        return UNMATCHED
    method, sep, template = route.partition(" ")
    return route if not sep or method in _ROUTE_KINDS else f"_OTHER {template}"


def build_observer(ops: Operations, metrics: Metrics | bool | None, tracing: bool | None) -> Observer | None:
    """The observer for a Guard's ``metrics`` and ``tracing`` options, or ``None`` when both are off."""
    if metrics is not None and not isinstance(metrics, bool):
        from .metrics import Metrics

        if not isinstance(metrics, Metrics):
            raise ConfigurationError("metrics must be True, False or a sa_middleware.metrics.Metrics")
    if tracing is not None and not isinstance(tracing, bool):
        raise ConfigurationError("tracing must be True, False or None (on when opentelemetry-api is installed)")
    chosen: Metrics | None = None
    if metrics is True:
        from .metrics import Metrics

        chosen = Metrics.default()
    elif metrics:
        chosen = metrics
    tracer = _tracer(tracing)
    if chosen is None and tracer is None:
        return None
    observer = Observer(chosen, tracer)
    if chosen is not None:
        chosen.watch(ops)
    return observer


def _tracer(tracing: bool | None) -> Any:
    if tracing is False:
        return None
    if importlib.util.find_spec("opentelemetry") is None or importlib.util.find_spec("opentelemetry.trace") is None:
        if tracing:
            raise ConfigurationError("tracing=True needs OpenTelemetry: pip install 'sa-middleware[tracing]'")
        return None
    from opentelemetry import trace

    return trace.get_tracer(_TRACER)


class Observer:
    """Receives the Guard's hook calls and feeds the metrics and the tracer it holds."""

    def __init__(self, metrics: Metrics | None, tracer: Any) -> None:
        self.metrics = metrics
        self.tracer = tracer
        if tracer is not None:
            from opentelemetry import trace

            self._kind = trace.SpanKind.INTERNAL
            self._set_parent = trace.set_span_in_context
            self._error = trace.StatusCode.ERROR
            self._noop = trace.NoOpTracer

    def live_tracer(self) -> Any:
        """The tracer, or ``None`` while no OpenTelemetry SDK is set up: the API's proxy tracer then hands out
        spans that record nothing, and the hot path skips them. It follows an SDK set up later."""
        tracer = self.tracer
        if tracer is None or isinstance(getattr(tracer, "_tracer", tracer), self._noop):
            return None
        return tracer

    def admission(self, request: RequestInfo, match: RouteMatch) -> Probe | None:
        """A probe for one admission (created before the flow starts), or ``None`` when nothing would be
        reported."""
        tracer = self.live_tracer()
        if tracer is None and self.metrics is None:
            return None
        return Probe(self, tracer, request.method, route_label(match))

    def release_started(self) -> tuple[float, Any] | None:
        """The start of a release (``None`` when nothing would be reported)."""
        tracer = self.live_tracer()
        if tracer is None and self.metrics is None:
            return None
        span = None if tracer is None else tracer.start_span("sa_middleware.release", kind=self._kind)
        return perf_counter(), span

    def released(self, started: tuple[float, Any], failed: bool) -> None:
        """A ticket's release ended (``failed``: the store refused it; its lease will expire)."""
        elapsed = perf_counter() - started[0]
        if self.metrics is not None:
            self.metrics.released(elapsed, failed)
        span = started[1]
        if span is not None:
            if failed:
                span.set_status(self._error, "store error")
            span.end()

    def security_event(self, event_type: str, result: str) -> None:
        """A security event was processed with ``result`` (applied, ignored, duplicate, verified)."""
        if self.metrics is not None:
            self.metrics.security_event(event_type, result)


class Probe:
    """Times one admission. The Guard's drivers call :meth:`before` and :meth:`after` around each step of the flow
    and :meth:`finish` with the outcome."""

    __slots__ = ("_observer", "_route", "_span", "_start", "_step", "_step_span", "_store", "_tracer", "_wait")

    def __init__(self, observer: Observer, tracer: Any, method: str, route: str) -> None:
        self._observer = observer
        self._route = route
        self._store = 0.0
        self._wait: float | None = None
        self._step = 0.0
        self._step_span: Any = None
        self._span: Any = None
        self._tracer = tracer
        if tracer is not None:
            self._span = tracer.start_span("sa_middleware.admit", kind=observer._kind, attributes={
                "http.request.method": method if method in _METHODS else "_OTHER", "http.route": route})
        self._start = perf_counter()

    def before(self, step: Any) -> None:
        if step.observed == "verify" and self._span is not None and self._span.is_recording():
            self._step_span = self._tracer.start_span(
                "sa_middleware.verify", context=self._observer._set_parent(self._span), kind=self._observer._kind)
        self._step = perf_counter()

    def after(self, step: Any, answer: Any) -> None:
        now = perf_counter()
        observed = step.observed
        if observed == "admit":
            self._store += now - self._step
            if isinstance(answer, Denial) and answer.code == "store_unavailable" and self._observer.metrics:
                self._observer.metrics.store_error("admit")
        elif observed == "sleep":
            if self._wait is None:
                self._wait = self._step
        elif observed == "verify" and self._step_span is not None:
            valid = not isinstance(answer, Exception)
            self._step_span.set_attribute("sa_middleware.token.valid", valid)
            self._step_span.end()
            self._step_span = None

    def finish(self, outcome: Denial | Any, asked: Admission | None) -> None:
        """Report the outcome: a Denial, or an admission (``fail_open`` when admitted without a ticket after
        asking the store)."""
        end = perf_counter()
        if isinstance(outcome, Denial):
            code = outcome.code
        else:
            code = "fail_open" if outcome.ticket is None and asked is not None else "admitted"
        metrics = self._observer.metrics
        if metrics is not None:
            metrics.admitted(self._route, code, end - self._start, self._store if asked is not None else None,
                             None if self._wait is None else end - self._wait)
        span = self._span
        if span is not None:
            if span.is_recording():
                span.set_attribute("sa_middleware.outcome", code)
                if isinstance(outcome, Denial):
                    span.set_attribute("sa_middleware.denial.status_code", outcome.status)
                    if code == "store_unavailable":
                        span.set_status(self._observer._error, "authorisation store unavailable")
            span.end()
