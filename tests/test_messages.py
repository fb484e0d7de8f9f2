"""The messages a user meets when configuring or calling the library: each names the mistake and its fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from sa_middleware import ConfigurationError, Denial, Guard, Policy, RequestInfo
from sa_middleware.demo import DemoIssuer

SECRET = "s" * 32


def hs_guard(**options: object) -> Guard:
    options.setdefault("store", "memory://")
    return Guard(keys=SECRET, algorithms=["HS256"], **options)  # type: ignore[arg-type]


def test_unknown_policy_keyword_is_a_configuration_error_with_a_suggestion() -> None:
    with pytest.raises(ConfigurationError, match=r"no field 'max_session' \(did you mean 'max_sessions'\?\)"):
        Policy(max_session=3)  # type: ignore[call-arg]
    with pytest.raises(ConfigurationError, match=r"no field 'colour'$"):
        Policy(colour="red")  # type: ignore[call-arg]
    assert Policy(max_sessions=3).max_sessions == 3


def test_guard_accepts_dict_policies_like_flask() -> None:
    guard = hs_guard(policies={"GET /items/{id:int}": {"max_sessions": 2, "locks": ["item:{id}"]}},
                     default_policy={"max_in_flight": 4})
    try:
        match = guard.routes.match("GET", "/items/7")
        assert (match.policy.max_sessions, match.policy.max_in_flight, match.lock_keys) == (2, 4, ("item:7",))
    finally:
        guard.close()


@pytest.mark.parametrize(("table", "message"), [
    ({"GET /items/{id}": {"max_sesions": 2}}, r"route 'GET /items/\{id\}': unknown Policy field 'max_sesions' "
                                              r"\(did you mean 'max_sessions'\?\)"),
    ({"GET /items/{id}": 3}, r"must be a Policy or a dict of Policy fields"),
])
def test_bad_dict_policies_name_the_route(table: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        hs_guard(policies=table)


@pytest.mark.parametrize(("key", "hint"), [
    ("POST /payments/<int:id>/approve", "'POST /payments/{id:int}/approve'"),
    ("GET /files/<path:rest>", "'GET /files/{rest:path}'"),
    ("GET /users/<name>", "'GET /users/{name}'"),
    ("GET /users/<string(length=2):cc>", "'GET /users/{cc}'"),
])
def test_flask_syntax_route_key_gets_a_hint(key: str, hint: str) -> None:
    with pytest.raises(ConfigurationError, match=r"Starlette's path syntax, not Flask's: write " + _re(hint)):
        hs_guard(policies={key: Policy(max_sessions=1)})


def test_sqlite_store_in_a_missing_directory_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "sa.db"
    with pytest.raises(ConfigurationError, match=r"directory .*no-such-dir' does not exist"):
        hs_guard(store=f"sqlite:///{missing}")
    assert not missing.parent.exists()


@pytest.mark.parametrize(("limit", "sessions_detail", "flight_detail"), [
    (1, "at most 1 active session is allowed", "at most 1 request may be in flight"),
    (2, "at most 2 active sessions are allowed", "at most 2 requests may be in flight"),
])
def test_limit_details_are_worded_for_their_number(limit: int, sessions_detail: str, flight_detail: str) -> None:
    issuer = DemoIssuer()
    guard = Guard(store="memory://", keys=issuer.public_pem, algorithms=["RS256"], issuer=issuer.issuer,
                  audience=issuer.audience, default_policy=Policy(max_sessions=limit, max_in_flight=limit))
    try:
        def call(sid: str) -> object:
            headers = {"authorization": f"Bearer {issuer.token('p', sid=sid)}", "user-agent": "t"}
            return guard.admit(RequestInfo("GET", "/x", headers, "10.0.0.1", False))
        held = [call(f"s{i}") for i in range(limit)]
        refused = call("one-too-many")
        assert isinstance(refused, Denial) and refused.detail == sessions_detail
        busy = call("s0")
        assert isinstance(busy, Denial) and busy.detail == flight_detail
        assert not any(isinstance(h, Denial) for h in held)
    finally:
        guard.close()


def test_fail_open_log_names_the_route_once(caplog: pytest.LogCaptureFixture) -> None:
    issuer = DemoIssuer()
    guard = Guard(store="redis://127.0.0.1:1/0?timeout=0.05", keys=issuer.public_pem, algorithms=["RS256"],
                  issuer=issuer.issuer, audience=issuer.audience, policies={"GET /cheap": Policy(fail_open=True)})
    try:
        headers = {"authorization": f"Bearer {issuer.token('p')}", "user-agent": "t"}
        with caplog.at_level("WARNING", logger="sa_middleware"):
            outcome = guard.admit(RequestInfo("GET", "/cheap", headers, "10.0.0.1", False))
        assert not isinstance(outcome, Denial)
        [line] = [r.getMessage() for r in caplog.records if "fail_open" in r.getMessage()]
        assert "admitting GET /cheap for p" in line and "GET GET" not in line
    finally:
        guard.close()


def _re(text: str) -> str:
    import re

    return re.escape(text)
