"""Prometheus metrics (``pip install 'sa-middleware[metrics]'``): ``Guard(metrics=True)``.

Labels are bounded: route templates (``unmatched`` for a request that matched no route), outcome codes, store
operations, security event types. Never a subject, a session id or a raw path. Counters and histograms are updated
by the Guard as it decides; the gauges of the shared state (active sessions, locks held) are sampled from the
store when Prometheus scrapes, at most once every ``sample_every`` seconds, so many scrapers cost one store query.

``Guard(metrics=True)`` uses :meth:`Metrics.default` (the process's default registry, one set of metrics however
many Guards); ``Guard(metrics=Metrics(registry=...))`` uses a registry of your own. Serve them with
:meth:`Metrics.asgi_app` / :meth:`Metrics.wsgi_app` (or any exporter of ``prometheus_client``). See
docs/observability.md for the list.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from itertools import accumulate
from typing import TYPE_CHECKING, Any

from .errors import ConfigurationError

if TYPE_CHECKING:
    from .operations import Operations

__all__ = ["LATENCY_BUCKETS", "SESSION_SAMPLE_LIMIT", "Metrics"]

#: histogram buckets in seconds: 100 us to 10 s (store calls are sub-millisecond to tens of milliseconds)
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0)
#: the most sessions one sample counts (the gauge is then a lower bound)
SESSION_SAMPLE_LIMIT = 10_000
_NS = "sa_middleware"

try:  # only this module imports prometheus_client, and only when metrics are asked for
    import prometheus_client as _prom
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
    from prometheus_client.registry import Collector, CollectorRegistry
except ImportError:  # pragma: no cover - depends on the environment
    _prom = None  # type: ignore[assignment]
    Collector = object  # type: ignore[assignment,misc]

_default: Metrics | None = None
_default_lock = threading.Lock()


class Metrics:
    """The library's metrics on one Prometheus registry (default: the process's default registry).

    ``sample_every`` (seconds) bounds how often a scrape asks the store for the shared-state gauges.
    """

    def __init__(self, registry: CollectorRegistry | None = None, *, sample_every: float = 5.0,
                 buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        if _prom is None:
            raise ConfigurationError("metrics need prometheus_client: pip install 'sa-middleware[metrics]'")
        if isinstance(sample_every, bool) or not isinstance(sample_every, int | float) \
                or not math.isfinite(sample_every) or sample_every < 0:
            raise ConfigurationError("sample_every must be a number of seconds >= 0")
        bounds = tuple(float(b) for b in buckets)
        if not bounds or list(bounds) != sorted(set(bounds)) or not all(math.isfinite(b) for b in bounds):
            raise ConfigurationError("buckets must be increasing, finite numbers of seconds")
        self.registry = _prom.REGISTRY if registry is None else registry
        self.buckets = bounds
        # Everything the hot path records goes into plain dicts under one lock (one acquisition a call): a third of
        # the cost of prometheus_client's per-value locks. _Recorded exposes them when scraped.
        self._lock = threading.Lock()
        self._counters: dict[str, dict[tuple[str, ...], int]] = {name: {} for name, *_ in _COUNTERS}
        self._histograms: dict[str, dict[tuple[str, ...], _Histogram]] = {name: {} for name, *_ in _HISTOGRAMS}
        self._sampler = _StateCollector(sample_every)
        self.registry.register(_Recorded(self))
        self.registry.register(self._sampler)

    @classmethod
    def default(cls) -> Metrics:
        """The metrics on the default registry, created once per process (what ``Guard(metrics=True)`` uses)."""
        global _default
        with _default_lock:
            if _default is None:
                _default = cls()
            return _default

    def watch(self, ops: Operations) -> None:
        """Sample the shared-state gauges from ``ops``'s store (the first one watched; others add their tickets
        in flight and audit drops)."""
        self._sampler.add(ops)

    # -- hooks (called by the Guard's observer) ----------------------------------------------------------------

    def admitted(self, route: str, code: str, seconds: float, store_seconds: float | None,
                 lock_wait: float | None) -> None:
        bounds, counters, histograms = self.buckets, self._counters, self._histograms
        with self._lock:
            _count(counters["admissions"], (route, code))
            _observe(histograms["admission_duration_seconds"], (route,), bounds, seconds)
            if store_seconds is not None:
                _observe(histograms["store_duration_seconds"], ("admit",), bounds, store_seconds)
            if lock_wait is not None:
                _observe(histograms["lock_wait_seconds"], (route, code), bounds, lock_wait)
            if code == "fail_open":
                _count(counters["fail_open_admissions"], (route,))

    def released(self, seconds: float, failed: bool) -> None:
        with self._lock:
            _observe(self._histograms["release_duration_seconds"], (), self.buckets, seconds)
            if failed:
                _count(self._counters["store_errors"], ("release",))

    def store_error(self, operation: str) -> None:
        with self._lock:
            _count(self._counters["store_errors"], (operation,))

    def security_event(self, event_type: str, result: str) -> None:
        with self._lock:
            _count(self._counters["security_events"], (event_type, result))

    def _snapshot(self) -> tuple[dict[str, dict[tuple[str, ...], int]], dict[str, dict[tuple[str, ...], Any]]]:
        with self._lock:
            return ({name: dict(values) for name, values in self._counters.items()},
                    {name: {k: (list(h.counts), h.total) for k, h in values.items()}
                     for name, values in self._histograms.items()})

    # -- exposition --------------------------------------------------------------------------------------------

    def asgi_app(self) -> Callable[..., Any]:
        """An ASGI app serving these metrics in the Prometheus text format (mount it at ``/metrics``)."""
        app: Callable[..., Any] = _prom.make_asgi_app(self.registry)
        return app

    def wsgi_app(self) -> Callable[..., Any]:
        """A WSGI app serving these metrics in the Prometheus text format."""
        app: Callable[..., Any] = _prom.make_wsgi_app(self.registry)
        return app


#: counters: name (without ``sa_middleware_`` and ``_total``), labels, help
_COUNTERS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("admissions", ("route", "code"), "Requests decided, by route template and outcome code (admitted, fail_open "
                                      "or the denial code)."),
    ("store_errors", ("operation",), "Store calls that failed, by operation (admit, release)."),
    ("fail_open_admissions", ("route",), "Requests admitted while the store was unavailable (fail_open routes)."),
    ("security_events", ("type", "result"), "Security events (SSF/CAEP/RISC) processed, by type and result."),
)
#: histograms: name, labels, help
_HISTOGRAMS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("admission_duration_seconds", ("route",), "Time to decide a request (token, policy, store, lock waits)."),
    ("store_duration_seconds", ("operation",), "Time spent in the store's admission call(s) of a request "
                                               "(operation admit; a release is one store call)."),
    ("release_duration_seconds", (), "Time to release a ticket: one store call that frees its locks and its "
                                     "in-flight record."),
    ("lock_wait_seconds", ("route", "code"), "Time requests waited for an object lock (on_lock_conflict='wait'), "
                                             "by route and outcome code."),
)


class _Histogram:
    __slots__ = ("counts", "total")

    def __init__(self, size: int) -> None:
        self.counts = [0] * size  # per bucket, not cumulative; the last one is +Inf
        self.total = 0.0


def _count(values: dict[tuple[str, ...], int], key: tuple[str, ...]) -> None:
    values[key] = values.get(key, 0) + 1


def _observe(values: dict[tuple[str, ...], _Histogram], key: tuple[str, ...], bounds: tuple[float, ...],
             amount: float) -> None:
    histogram = values.get(key)
    if histogram is None:
        histogram = values[key] = _Histogram(len(bounds) + 1)
    histogram.counts[bisect_left(bounds, amount)] += 1  # the first bucket whose bound is >= amount ("le")
    histogram.total += amount


class _Recorded(Collector):
    """Exposes what :class:`Metrics` recorded, in the Prometheus types (counters and histograms)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        counters, histograms = self._metrics._snapshot()
        for name, labels, text in _COUNTERS:
            counter = CounterMetricFamily(f"{_NS}_{name}", text, labels=labels)
            for key, value in sorted(counters[name].items()):
                counter.add_metric(key, value)
            yield counter
        bounds = [repr(b) for b in self._metrics.buckets] + ["+Inf"]  # 0.0001, 1.0: as prometheus_client
        for name, labels, text in _HISTOGRAMS:
            family = HistogramMetricFamily(f"{_NS}_{name}", text, labels=labels)
            for key, (counts, total) in sorted(histograms[name].items()):
                family.add_metric(key, list(zip(bounds, accumulate(counts), strict=True)), total)
            yield family


class _StateCollector(Collector):
    """Gauges of the shared state, asked of the store when scraped and cached for ``every`` seconds; and the
    counters this process keeps anyway (tickets in flight, audit records dropped)."""

    def __init__(self, every: float) -> None:
        self._every = every
        self._ops: list[weakref.ref[Operations]] = []
        self._lock = threading.Lock()
        self._at = -float("inf")
        self._cached: tuple[dict[tuple[str, str], int], dict[str, int]] | None = None
        self._errors = 0

    def add(self, ops: Operations) -> None:
        with self._lock:
            if not any(ref() is ops for ref in self._ops):
                self._ops.append(weakref.ref(ops))

    def _live(self) -> list[Operations]:
        return [ops for ops in (ref() for ref in self._ops) if ops is not None]

    def _sample(self, ops: Operations) -> tuple[dict[tuple[str, str], int], dict[str, int]] | None:
        with self._lock:
            now = time.monotonic()
            if now - self._at < self._every:
                return self._cached
            self._at = now
            try:
                sessions: dict[tuple[str, str], int] = {}
                with suppress(NotImplementedError):  # a third-party store that cannot list sessions
                    for s in ops.all_sessions(SESSION_SAMPLE_LIMIT):
                        sessions[(s.kind, s.status)] = sessions.get((s.kind, s.status), 0) + 1
                locks: dict[str, int] = {}
                for lock in ops.locks():
                    locks[lock.mode] = locks.get(lock.mode, 0) + 1
                self._cached = (sessions, locks)
            except Exception:  # a failing store must not break the scrape: report the failure instead
                self._errors += 1
                self._cached = None
            return self._cached

    def collect(self) -> Iterator[Any]:
        live = self._live()
        in_flight = GaugeMetricFamily(f"{_NS}_tickets_in_flight", "Admitted requests of this process not yet "
                                      "released.")
        keepers = [getattr(ops, "_keeper", None) for ops in live]  # a Guard's; plain Operations admit nothing
        in_flight.add_metric([], sum(len(keeper.live()) for keeper in keepers if keeper is not None))
        yield in_flight
        dropped = CounterMetricFamily(f"{_NS}_audit_dropped", "Audit records this process dropped because its "
                                      "audit buffer was full.")
        dropped.add_metric([], sum(ops._audit.dropped_total for ops in live))
        yield dropped
        sampled = self._sample(live[0]) if live else None
        errors = CounterMetricFamily(f"{_NS}_state_sample_errors", "Scrapes whose store sample failed.")
        errors.add_metric([], self._errors)
        yield errors
        if sampled is None:
            return
        sessions = GaugeMetricFamily(f"{_NS}_sessions_active", "Active sessions in the store, by principal kind and "
                                     "status (sampled).", labels=["kind", "status"])
        for (kind, status), count in sorted(sampled[0].items()):
            sessions.add_metric([kind, status], count)
        yield sessions
        locks = GaugeMetricFamily(f"{_NS}_locks_held", "Object locks held in the store, by mode (sampled).",
                                  labels=["mode"])
        for mode, count in sorted(sampled[1].items()):
            locks.add_metric([mode], count)
        yield locks
