"""What metrics and tracing add to the hot path: admit + release, in process, with and without them.

    python benchmarks/metrics_cost.py [--rounds 15] [--batch 400]

Two measurements, medians over interleaved rounds (so a busy machine slows every variant alike):
- Guard.admit + Guard.release on the memory store (cached token), with nothing, with Prometheus metrics, with
  OpenTelemetry tracing through the API alone (no SDK: what a library user who installed the API pays), and both;
- the hook calls alone (the probe of one admission and one release, as the Guard makes them), which is the
  per-request cost of the instrumentation without the noise of the store: the fastest round, as ``timeit``
  advises, since a loaded machine only ever adds time.
The target is under 3 us per request for metrics.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from sa_middleware import Guard, Policy, RequestInfo
from sa_middleware.demo import DemoIssuer
from sa_middleware.guard import Admitted, _Admit, _Verify
from sa_middleware.metrics import Metrics
from sa_middleware.observe import Observer

TARGET_US = 3.0


def variants(issuer: DemoIssuer) -> dict[str, Guard]:
    def guard(metrics: bool, tracing: bool) -> Guard:
        return Guard(store="memory://", keys=issuer.public_pem, algorithms=["RS256"], issuer=issuer.issuer,
                     audience=issuer.audience, policies={"GET /x/{id}": Policy(max_in_flight=100)},
                     metrics=Metrics(CollectorRegistry()) if metrics else False, tracing=tracing)
    return {"plain": guard(False, False), "metrics": guard(True, False), "tracing (API only)": guard(False, True),
            "metrics + tracing": guard(True, True)}


def admit_release(guard: Guard, request: RequestInfo) -> Callable[[], None]:
    def run() -> None:
        outcome = guard.admit(request)
        assert isinstance(outcome, Admitted), outcome
        guard.release(outcome.ticket)
    return run


def hooks_only(observer: Observer, request: RequestInfo, guard: Guard) -> Callable[[], None]:
    match = guard.match(request)
    admitted = guard.admit(request)
    assert isinstance(admitted, Admitted)
    verify, admit = _Verify("t"), _Admit(None)  # type: ignore[arg-type]

    def run() -> None:
        probe = observer.admission(request, match)
        probe.before(verify)
        probe.after(verify, None)
        probe.before(admit)
        probe.after(admit, admitted.ticket)
        probe.finish(admitted, None)
        observer.released(observer.release_started(), False)
    return run


def measure(funcs: dict[str, Callable[[], None]], rounds: int, batch: int,
            pick: Callable[[list[float]], float] = statistics.median) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in funcs}
    for _ in range(rounds):
        for name, func in funcs.items():  # interleaved: noise hits every variant alike
            start = time.perf_counter()
            for _ in range(batch):
                func()
            samples[name].append((time.perf_counter() - start) / batch * 1e6)
    return {name: pick(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=400)
    args = parser.parse_args()
    issuer = DemoIssuer()
    guards = variants(issuer)
    request = RequestInfo("GET", "/x/1", {"authorization": f"Bearer {issuer.token('bench', sid='b-1')}",
                                          "user-agent": "bench"})
    full = measure({name: admit_release(g, request) for name, g in guards.items()}, args.rounds, args.batch)
    hooks = {name: hooks_only(g.observer, request, g) for name, g in guards.items() if g.observer is not None}
    alone = measure(hooks, args.rounds, args.batch * 5, min)
    print("admit + release, memory store, cached token (median us per request)")
    for name, us in full.items():
        delta = "" if name == "plain" else f"   delta {us - full['plain']:+7.2f}"
        print(f"  {name:<22} {us:8.2f}{delta}")
    print("the hooks alone, one admission + one release (fastest round, us per request)")
    for name, us in alone.items():
        print(f"  {name:<22} {us:8.2f}")
    verdict = "met" if alone["metrics"] < TARGET_US else "MISSED"
    print(f"metrics hot-path cost {alone['metrics']:.2f} us per request: target < {TARGET_US} us {verdict}")
    for g in guards.values():
        g.close()


if __name__ == "__main__":
    main()
