"""What ``make demo`` prints: the steps in the order they were sent, operator commands where they happen, and lines
of at most 120 columns, for up to eight targets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from sa_middleware import demo
from sa_middleware.demo import DemoIssuer, Step, Target, _print_tables, play, run_demo, serve_wsgi, workbench_guard

WIDTH = 120


@pytest.fixture(scope="module")
def played(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Step]]:
    issuer = DemoIssuer()
    guard = workbench_guard(issuer, f"sqlite:///{tmp_path_factory.mktemp('demo') / 'sa.db'}")
    bench = demo.Workbench()
    base, stop = serve_wsgi(bench.track_wsgi(demo.SessionAwareWSGIMiddleware(bench.wsgi, guard=guard)))
    reported: list[Step] = []
    try:
        steps = play(base, guard, issuer, reported.append)
    finally:
        stop()
        guard.close()
    assert sorted(map(id, reported)) == sorted(map(id, steps))  # each step reported once, when it completed
    yield steps


def test_steps_are_listed_in_the_order_they_were_sent(played: list[Step]) -> None:
    assert all(step.ok for step in played), [(s.what, s.expected, s.got) for s in played if not s.ok]
    assert [s.what for s in played[:3]] == ["POST /tickets (held)", "POST /payments/42/approve",
                                            "POST /payments/42/approve"]
    assert [s.expected[1] for s in played[:3]] == ["ok", "conflicting_action", "risk_too_high"]
    operators = [(i, s.operator.split()[0]) for i, s in enumerate(played) if s.operator]
    assert [name for _, name in operators] == ["rotate", "resume", "resume", "compromise", "revoke"]
    after = {name: played[i].expected[1] for i, name in operators}
    assert after["rotate"] == "stale_generation" and after["revoke"] == "session_revoked"


def fake_targets(count: int) -> list[Target]:
    """Targets for the table alone (nothing is served): labels as long as the real ones."""
    return [Target(f"Framework number {i} (server)", f"t{i}", f"http://127.0.0.1:{8000 + i}", None, None, None,
                   lambda: None) for i in range(count)]


def test_the_tables_fit_in_120_columns_with_eight_targets(played: list[Step]) -> None:
    broken = [Step(s.behaviour, s.who, s.what, s.expected, (500, "no code") if i == 4 else s.got, s.operator)
              for i, s in enumerate(played)]
    results = [(target, broken if i == 7 else played) for i, target in enumerate(fake_targets(8))]
    lines: list[str] = []
    _print_tables(results, lines.append)
    assert max(map(len, lines)) <= WIDTH, max(lines, key=len)
    header = next(line for line in lines if line.lstrip().startswith("#"))
    assert header.split()[-8:] == [f"T{i}" for i in range(1, 9)]
    assert any(line.startswith("MISMATCH T8 ") and "step 5: expected 401 stale_generation, got 500 no code" in line
               for line in lines)
    assert sum(line.startswith("    operator: sa-middleware ") for line in lines) == 5


def test_demo_json_lists_every_step(tmp_path: Path) -> None:
    lines: list[str] = []
    assert run_demo(("wsgi",), lines.append, as_json=True) == 0
    [target] = json.loads("\n".join(lines))
    assert target["target"] == "core WSGI (werkzeug)" and len(target["steps"]) == 32
    assert target["steps"][0]["request"] == "POST /tickets (held)" and all(s["ok"] for s in target["steps"])
