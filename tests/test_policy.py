"""Tests for sa_middleware.policy: Policy validation, defaults, the route table and lock keys."""

from __future__ import annotations

import dataclasses
import re
import uuid
from typing import Any

import pytest

from sa_middleware.errors import ConfigurationError, InvalidRequest
from sa_middleware.policy import MAX_LOCK_KEY, EffectivePolicy, Policy, RouteTable, render_lock_key

# ---------------------------------------------------------------------------------------------------- Policy


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("scopes", 5),
        ("scopes", [""]),
        ("scopes", [1]),
        ("tags", [""]),
        ("tags", 3.5),
        ("conflicts", 3),
        ("conflicts", [None]),
        ("locks", [""]),
        ("locks", [1]),
        ("acr_values", [""]),
        ("acr_values", [2]),
        ("public", "yes"),
        ("public", 1),
        ("exclusive", 1),
        ("one_time", "no"),
        ("require_compliant_device", 0),
        ("fail_open", "true"),
        ("max_sessions", 0),
        ("max_sessions", True),
        ("max_sessions", 1.5),
        ("max_sessions", "3"),
        ("max_in_flight", 0),
        ("max_in_flight", -1),
        ("raises_risk", -1),
        ("raises_risk", False),
        ("max_risk", -1),
        ("max_auth_age", -1),
        ("max_auth_age", 60.0),
        ("risk_window", -1),
        ("risk_window", "60"),
        ("risk_window", True),
        ("lock_wait", -0.1),
        ("lock_wait", float("inf")),
        ("lock_wait", float("nan")),
        ("risk_window", float("inf")),
        ("lock_wait", True),
        ("on_session_limit", "drop"),
        ("on_session_limit", "EVICT_OLDEST"),
        ("on_lock_conflict", "queue"),
        ("lock_mode", "read"),
    ],
)
def test_bad_field_names_the_route_and_the_field(field: str, value: Any) -> None:
    policy = Policy(**{field: value})  # reported where the policy is used, so the error can name the route
    with pytest.raises(ConfigurationError, match=rf"\b{field}\b") as info:
        RouteTable({"POST /p/{id}": policy})
    assert str(info.value).startswith("route 'POST /p/{id}': ")
    with pytest.raises(ConfigurationError, match=rf"^default_policy: .*\b{field}\b"):
        RouteTable(None, policy)
    with pytest.raises(ConfigurationError, match=rf"^my_view: .*\b{field}\b"):
        policy.validate("my_view")


@pytest.mark.parametrize("template", ["payment:{id", "payment:{0}", "payment:{a.b}", "payment:{}", "x:{id[0]}",
                                      "x:}"])
def test_bad_lock_template_names_the_route_and_the_field(template: str) -> None:
    with pytest.raises(ConfigurationError, match=r"\blocks\b") as info:
        RouteTable({"POST /p/{id}": Policy(locks=[template])})
    assert template in str(info.value)
    assert "'POST /p/{id}'" in str(info.value)


def test_valid_policy_validates_to_itself() -> None:
    policy = Policy(max_sessions=2, locks=["x:{id}"])
    assert policy.validate("anywhere") is policy


def test_configuration_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        Policy(max_sessions=0).validate()


def test_values_are_normalised() -> None:
    policy = Policy(scopes="read write", tags=["a", "b", "a"], conflicts={"c"}, locks="doc:{id}",
                    acr_values="urn:mfa urn:hwk")
    assert policy.scopes == frozenset({"read", "write"})
    assert policy.tags == frozenset({"a", "b"})
    assert policy.conflicts == frozenset({"c"})
    assert policy.locks == ("doc:{id}",)
    assert policy.acr_values == ("urn:mfa", "urn:hwk")
    assert Policy(locks=["a:{x}", "b:{y}"]).locks == ("a:{x}", "b:{y}")


def test_valid_edge_values_are_accepted() -> None:
    policy = Policy(max_sessions=1, max_in_flight=1, raises_risk=0, max_risk=0, max_auth_age=0, risk_window=0,
                    lock_wait=0, public=False, fail_open=True, on_session_limit="evict_oldest",
                    on_lock_conflict="pause", lock_mode="shared")
    assert policy.lock_wait == 0 and policy.on_lock_conflict == "pause"


def test_unset_fields_are_none() -> None:
    assert all(getattr(Policy(), f.name) is None for f in dataclasses.fields(Policy))


def test_effective_defaults() -> None:
    effective = Policy().effective()
    assert effective == EffectivePolicy()
    assert effective.public is False
    assert effective.scopes == frozenset()
    assert effective.max_sessions is None
    assert effective.on_session_limit == "reject"
    assert effective.max_in_flight is None
    assert effective.exclusive is False
    assert effective.raises_risk == 0
    assert effective.risk_window == 60.0
    assert effective.max_risk is None
    assert effective.locks == ()
    assert effective.lock_mode == "exclusive"
    assert effective.on_lock_conflict == "reject"
    assert effective.lock_wait == 5.0
    assert effective.one_time is False
    assert effective.require_compliant_device is False
    assert effective.acr_values == ()
    assert effective.fail_open is False


def test_effective_keeps_set_fields() -> None:
    effective = Policy(max_in_flight=3, exclusive=True, scopes={"a"}).effective()
    assert (effective.max_in_flight, effective.exclusive, effective.scopes) == (3, True, frozenset({"a"}))
    assert effective.on_session_limit == "reject"


def test_merged_takes_unset_fields_from_the_fallback() -> None:
    fallback = Policy(max_sessions=5, fail_open=True, tags={"base"})
    merged = Policy(max_in_flight=2, fail_open=False).merged(fallback)
    assert merged.max_sessions == 5
    assert merged.max_in_flight == 2
    assert merged.fail_open is False  # an explicit False overrides the fallback's True
    assert merged.tags == frozenset({"base"})
    assert Policy(max_in_flight=2).merged(None) == Policy(max_in_flight=2)


# ---------------------------------------------------------------------------------------------------- RouteTable


def table(*routes: str, default: Policy | None = None) -> RouteTable:
    return RouteTable({route: Policy(tags={route}) for route in routes}, default)


def matched(rt: RouteTable, method: str, path: str) -> str | None:
    return rt.match(method, path).route


def test_literal_route() -> None:
    rt = table("GET /health", "POST /items")
    assert matched(rt, "GET", "/health") == "GET /health"
    assert matched(rt, "POST", "/items") == "POST /items"
    assert matched(rt, "GET", "/items") is None
    assert matched(rt, "GET", "/healthz") is None
    # a router that merges slashes or ignores a trailing one serves these as /health: the route's policy applies
    assert matched(rt, "GET", "/health/") == "GET /health"
    assert matched(rt, "GET", "//health") == "GET /health"
    assert matched(table("GET /health/"), "GET", "/health/") == "GET /health/"  # an exact match comes first


def test_row3_path_lock_keys_one_object_one_key() -> None:
    rt = RouteTable({"PUT /files/{name:path}": Policy(locks=["file:{name}"])})
    for path in ("/files/a/b.txt", "/files/a//b.txt", "/files//a/b.txt/", "/files/a///b.txt"):
        assert rt.match("PUT", path).lock_keys == ("file:a/b.txt",), path
        assert rt.match("PUT", path).refusal is None
    for path in ("/files/a/../b.txt", "/files/a/./b.txt", "/files/..", "/files/./a"):
        found = rt.match("PUT", path)
        assert found.lock_keys == () and found.refusal is not None and "'.' or '..'" in found.refusal, path


def test_row10_lock_key_length_cap() -> None:
    rt = RouteTable({"PUT /objects/{id}": Policy(locks=["object:{id}"])})
    assert rt.match("PUT", "/objects/" + "x" * (MAX_LOCK_KEY - len("object:"))).refusal is None
    over = rt.match("PUT", "/objects/" + "x" * (MAX_LOCK_KEY - len("object:") + 1))
    assert over.lock_keys == () and over.refusal is not None and str(MAX_LOCK_KEY) in over.refusal
    with pytest.raises(InvalidRequest):
        render_lock_key("k:{a}", {"a": "y" * MAX_LOCK_KEY})
    with pytest.raises(ConfigurationError, match="longer than 512"):
        Policy(locks=["k" * 513 + "{id}"]).validate()


@pytest.mark.parametrize(("key", "hint"), [
    ("GET /items/<int:id>", "{id:int}"), ("GET /items/<id>", "{id}"), ("PUT /files/<path:name>", "{name:path}"),
    ("GET /u/<string:name>/x", "{name}"),
])
def test_row6_flask_syntax_in_the_table_is_refused_with_a_hint(key: str, hint: str) -> None:
    with pytest.raises(ConfigurationError, match=re.escape(f": write '{hint}')")):
        RouteTable({key: Policy()})


def test_str_parameter() -> None:
    rt = table("GET /items/{id}")
    m = rt.match("GET", "/items/abc")
    assert (m.route, dict(m.params)) == ("GET /items/{id}", {"id": "abc"})
    assert matched(rt, "GET", "/items/abc/def") is None
    assert matched(rt, "GET", "/items/") is None


def test_int_parameter_converts() -> None:
    rt = table("GET /items/{id:int}")
    m = rt.match("GET", "/items/42")
    assert m.params == {"id": 42}
    assert isinstance(m.params["id"], int)
    assert matched(rt, "GET", "/items/abc") is None
    assert matched(rt, "GET", "/items/-1") is None


def test_float_and_uuid_parameters() -> None:
    rt = table("GET /price/{p:float}", "GET /users/{u:uuid}")
    assert rt.match("GET", "/price/3.5").params == {"p": 3.5}
    uid = "12345678-1234-1234-1234-123456789abc"
    assert rt.match("GET", f"/users/{uid}").params == {"u": uuid.UUID(uid)}
    assert rt.match("GET", f"/users/{uid.upper()}").params == {"u": uuid.UUID(uid)}  # one object, one lock key
    assert matched(rt, "GET", "/users/not-a-uuid") is None


def test_path_parameter_spans_segments() -> None:
    rt = table("GET /files/{rest:path}")
    m = rt.match("GET", "/files/a/b/c.txt")
    assert (m.route, dict(m.params)) == ("GET /files/{rest:path}", {"rest": "a/b/c.txt"})


def test_star_matches_any_method() -> None:
    rt = table("* /anything")
    for method in ("GET", "POST", "DELETE", "PATCH", "WEBSOCKET"):
        assert matched(rt, method, "/anything") == "* /anything"


def test_exact_method_beats_star() -> None:
    rt = table("* /things", "POST /things")
    assert matched(rt, "POST", "/things") == "POST /things"
    assert matched(rt, "GET", "/things") == "* /things"
    rt = table("POST /things", "* /things")  # declaration order does not matter
    assert matched(rt, "POST", "/things") == "POST /things"


def test_literal_beats_parameter() -> None:
    for routes in (("GET /items/{id}", "GET /items/new"), ("GET /items/new", "GET /items/{id}")):
        rt = table(*routes)
        assert matched(rt, "GET", "/items/new") == "GET /items/new"
        assert matched(rt, "GET", "/items/7") == "GET /items/{id}"


def test_longer_literal_beats_a_catch_all_of_any_method() -> None:
    # A public catch-all must never shadow a specific route: the path is what makes a route specific.
    rt = RouteTable({"GET /{rest:path}": Policy(public=True), "* /api/payments": Policy(scopes={"pay"})})
    m = rt.match("GET", "/api/payments")
    assert m.route == "* /api/payments"
    assert m.policy.public is False


def test_fewer_path_parameters_win() -> None:
    rt = table("GET /f/{rest:path}", "GET /f/{name}")
    assert matched(rt, "GET", "/f/x") == "GET /f/{name}"
    assert matched(rt, "GET", "/f/x/y") == "GET /f/{rest:path}"


def test_head_matches_get() -> None:
    rt = table("GET /items/{id}")
    assert matched(rt, "HEAD", "/items/1") == "GET /items/{id}"
    assert matched(rt, "POST", "/items/1") is None
    assert matched(table("POST /x"), "HEAD", "/x") is None


def test_method_is_case_insensitive() -> None:
    rt = RouteTable({"post /items": Policy()})
    assert matched(rt, "post", "/items") == "post /items"
    assert matched(rt, "POST", "/items") == "post /items"


def test_no_match_gives_the_default_policy() -> None:
    default = Policy(max_sessions=5)
    rt = table("GET /a", default=default)
    m = rt.match("GET", "/nowhere")
    assert m.route is None
    assert m.params == {}
    assert m.lock_keys == ()
    assert m.policy == default.effective()
    assert m.policy.max_sessions == 5
    assert RouteTable(None).match("GET", "/").policy == EffectivePolicy()


def test_route_policy_is_merged_with_the_default() -> None:
    rt = RouteTable({"POST /a": Policy(max_in_flight=2), "POST /b": Policy(max_sessions=1)},
                    Policy(max_sessions=5, fail_open=True))
    a = rt.match("POST", "/a").policy
    assert (a.max_in_flight, a.max_sessions, a.fail_open) == (2, 5, True)
    b = rt.match("POST", "/b").policy
    assert (b.max_in_flight, b.max_sessions) == (None, 1)


def test_repeated_matches_are_stable() -> None:
    rt = table("GET /a", "GET /items/{id}")
    assert rt.match("GET", "/a") == rt.match("GET", "/a")
    assert rt.match("GET", "/items/1").params == {"id": "1"}
    assert rt.match("GET", "/items/2").params == {"id": "2"}


# ---------------------------------------------------------------------------------------------------- lock keys


def test_lock_keys_rendered_from_path_params() -> None:
    rt = RouteTable({"POST /payments/{id:int}/approve": Policy(locks=["payment:{id}", "ledger"]),
                     "PUT /orgs/{org}/docs/{doc}": Policy(locks="doc:{org}/{doc}", lock_mode="shared")})
    m = rt.match("POST", "/payments/42/approve")
    assert m.lock_keys == ("payment:42", "ledger")
    m = rt.match("PUT", "/orgs/acme/docs/readme")
    assert m.lock_keys == ("doc:acme/readme",)
    assert m.policy.lock_mode == "shared"
    assert rt.match("GET", "/payments/42/approve").lock_keys == ()


def test_render_lock_key() -> None:
    assert render_lock_key("payment:{id}", {"id": 42}) == "payment:42"
    assert render_lock_key("a:{x}:{y}", {"x": "1", "y": 2.5}) == "a:1:2.5"
    assert render_lock_key("static", {"x": 1}) == "static"


def test_resolve_for_adapters() -> None:
    rt = RouteTable(None, Policy(max_sessions=3))
    m = rt.resolve(Policy(locks=["item:{id}"], max_in_flight=1), "/items/<id>", {"id": 7})
    assert m.route == "/items/<id>"
    assert m.params == {"id": 7}
    assert m.lock_keys == ("item:7",)
    assert (m.policy.max_in_flight, m.policy.max_sessions) == (1, 3)
    plain = rt.resolve(None, None, {})
    assert plain.policy == Policy(max_sessions=3).effective()


# ---------------------------------------------------------------------------------------------------- route errors


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("GETT /a", "METHOD"),
        ("GET a", "METHOD"),
        ("/a", "METHOD"),
        ("GET", "METHOD"),
        ("GET /a/{id:foo}", "unknown convertor 'foo'"),
        ("GET /a/{id}/{id}", "appears twice"),
        ("GET /a/{id", "malformed"),
        ("GET /a/id}", "malformed"),
    ],
)
def test_bad_route_key_names_the_route(key: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RouteTable({key: Policy()})
    assert repr(key) in str(info.value)
    assert message in str(info.value)


def test_non_string_route_key() -> None:
    with pytest.raises(ConfigurationError, match="5"):
        RouteTable({5: Policy()})  # type: ignore[dict-item]


def test_route_value_must_be_a_policy_or_a_dict_of_its_fields() -> None:
    assert RouteTable({"POST /p": {"max_sessions": 1}}).match("POST", "/p").policy.max_sessions == 1
    with pytest.raises(ConfigurationError, match=re.escape("'POST /p'")):
        RouteTable({"POST /p": ["max_sessions"]})  # type: ignore[dict-item]


def test_lock_template_with_unknown_param_names_route_and_param() -> None:
    with pytest.raises(ConfigurationError) as info:
        RouteTable({"POST /payments/{id}": Policy(locks=["payment:{pid}"])})
    text = str(info.value)
    assert "'POST /payments/{id}'" in text
    assert "pid" in text
    assert "locks" in text


def test_lock_template_on_a_parameterless_route() -> None:
    with pytest.raises(ConfigurationError, match=re.escape("'POST /x'")):
        RouteTable({"POST /x": Policy(locks=["x:{id}"])})
    assert RouteTable({"POST /x": Policy(locks=["x:all"])}).match("POST", "/x").lock_keys == ("x:all",)


def test_default_policy_errors() -> None:
    assert RouteTable(None, {"max_sessions": 1}).default_policy.max_sessions == 1
    with pytest.raises(ConfigurationError, match="default_policy"):
        RouteTable(None, 5)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="default_policy"):
        RouteTable(None, Policy(locks=["x:{id}"]))


def test_an_int_parameter_too_long_to_convert_matches_no_route() -> None:
    rt = table("PUT /objects/{id:int}")
    assert matched(rt, "PUT", "/objects/" + "1" * 5000) is None  # falls back to the default policy, never raises


def test_resolve_combines_endpoint_table_and_default() -> None:
    rt = RouteTable({"POST /payments/{id}/approve": Policy(exclusive=True, locks=["payment:{id}"], max_risk=0),
                     "* /api/{rest:path}": Policy(scopes={"api"})},
                    Policy(max_sessions=4))
    m = rt.resolve(Policy(max_risk=2, scopes={"pay"}), "POST /payments/<int:id>/approve", {"id": 9},
                   method="POST", path="/payments/9/approve")
    assert m.policy.exclusive is True          # from the table
    assert m.policy.max_risk == 2              # the endpoint wins
    assert m.policy.scopes == frozenset({"pay"})
    assert m.policy.max_sessions == 4          # from default_policy
    assert m.lock_keys == ("payment:9",) and m.route == "POST /payments/<int:id>/approve"
    # without method/path the table is not consulted
    alone = rt.resolve(Policy(max_risk=2), "r", {"id": 9})
    assert alone.policy.exclusive is False and alone.lock_keys == ()
    # a lock template naming a parameter nobody provides is a configuration error naming the route
    with pytest.raises(ConfigurationError, match="route 'r'"):
        rt.resolve(Policy(locks=["x:{nope}"]), "r", {})
    with pytest.raises(ConfigurationError, match="route 'bad'"):
        rt.resolve(Policy(max_sessions=0), "bad", {})
