"""Token shapes of the major identity providers: which principal kind and which scopes the Guard reads from them.

Each claim set is the documented shape of the provider's access token (the page is cited above it); the values are
made up. The tests go through a real Guard (signed tokens, a memory store), so kind and scopes are what a view sees.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from sa_middleware import Denial, Guard, Policy, RequestInfo
from sa_middleware.claims import DEFAULT_SCOPE_CLAIMS, kind_of, scopes_of, session_key
from sa_middleware.errors import ConfigurationError
from sa_middleware.guard import Admitted
from sa_middleware.tokens import generate_rsa_key, mint_token

KEY, PEM = generate_rsa_key()
ISS, AUD = "https://idp.example", "https://api.example"

# Auth0, machine-to-machine (client credentials): sub is "<client id>@clients", azp the client, gty
# "client-credentials". https://auth0.com/docs/get-started/authentication-and-authorization-flow/client-credentials-flow
AUTH0_M2M = {"sub": "Xh2kL9pQ@clients", "azp": "Xh2kL9pQ", "gty": "client-credentials", "scope": "read:things"}
# Auth0, the RFC 9068 access token profile: client_id instead of azp, no gty.
# https://auth0.com/docs/secure/tokens/access-tokens/access-token-profiles
AUTH0_M2M_RFC9068 = {"sub": "Xh2kL9pQ@clients", "client_id": "Xh2kL9pQ", "scope": "read:things"}
# Auth0, a user's token (authorization code): sub "<connection>|<user id>", azp the application.
# https://auth0.com/docs/secure/tokens/access-tokens/access-token-profiles
AUTH0_USER = {"sub": "auth0|5f7c8ec7c33c6c004bbafe82", "azp": "SpaClient1", "scope": "openid profile read:things",
              "permissions": ["read:things"]}

# Microsoft Entra ID access tokens. https://learn.microsoft.com/en-us/entra/identity-platform/access-token-claims-reference
# v2.0 app-only (client credentials): permissions in roles, no scp, sub == oid (the service principal), and
# idtyp "app" when the optional claim is configured (https://learn.microsoft.com/en-us/entra/identity-platform/
# optional-claims-reference).
ENTRA_V2_APP = {"ver": "2.0", "azp": "6e74172b-be56-4843-9ff4-e66a39bb12e3", "azpacr": "1", "idtyp": "app",
                "oid": "a4c5e2d1-1111-4c3b-9a1e-2b7d8e9f0a1b", "sub": "a4c5e2d1-1111-4c3b-9a1e-2b7d8e9f0a1b",
                "roles": ["Things.Read.All"], "tid": "72f988bf-86f1-41af-91ab-2d7cd011db47"}
# v1.0 app-only, without the optional idtyp claim: appid instead of azp.
ENTRA_V1_APP = {"ver": "1.0", "appid": "6e74172b-be56-4843-9ff4-e66a39bb12e3", "appidacr": "1",
                "oid": "a4c5e2d1-1111-4c3b-9a1e-2b7d8e9f0a1b", "sub": "a4c5e2d1-1111-4c3b-9a1e-2b7d8e9f0a1b",
                "roles": ["Things.Read.All"], "tid": "72f988bf-86f1-41af-91ab-2d7cd011db47"}
# v2.0 delegated (a user through an app): scp, a pairwise sub that differs from oid, maybe app roles of the user.
ENTRA_V2_USER = {"ver": "2.0", "azp": "6e74172b-be56-4843-9ff4-e66a39bb12e3", "azpacr": "0", "idtyp": "user",
                 "oid": "00000000-0000-0000-66f3-3332eca7ea81", "sub": "AAAAAAAAAAAAAAAAAAAAAIkzqFVrSaSaFHy782bbtaQ",
                 "scp": "Things.Read User.Read", "roles": ["Approver"], "preferred_username": "alice@contoso.com"}
# v1.0 delegated.
ENTRA_V1_USER = {"ver": "1.0", "appid": "6e74172b-be56-4843-9ff4-e66a39bb12e3", "appidacr": "0",
                 "oid": "00000000-0000-0000-66f3-3332eca7ea81", "sub": "l3_roISQU222bULS9yi2k0XpqpOiMz5H3ZACo1GeXA",
                 "scp": "user_impersonation", "upn": "alice@contoso.com"}

# Okta custom authorization server access tokens: cid the client, uid the user (absent for client credentials, where
# sub is the client id), scp an array. https://developer.okta.com/docs/api/openapi/okta-oauth/guides/overview/ and
# https://developer.okta.com/docs/guides/implement-grant-type/clientcreds/main/
OKTA_SERVICE = {"ver": 1, "jti": "AT.u3aT7Sj0", "cid": "0oa1b2c3d4e5f6g7h8i9", "sub": "0oa1b2c3d4e5f6g7h8i9",
                "scp": ["things:read"]}
OKTA_USER = {"ver": 1, "jti": "AT.k0Pq9a1", "cid": "0oa1b2c3d4e5f6g7h8i9", "uid": "00u1a2b3c4d5e6f7g8h9",
             "sub": "alice@example.com", "scp": ["openid", "things:read"]}

# Keycloak: a client's service account is a user named "service-account-<client id>"; azp (and client_id, from the
# service account's default mapper) name the client, sub is the account's user id.
# https://www.keycloak.org/docs/latest/server_admin/index.html#_service_accounts
KEYCLOAK_SERVICE = {"sub": "5f0d1c8e-3b1a-4a57-9f64-2f1e0c9d7b6a", "azp": "billing", "client_id": "billing",
                    "preferred_username": "service-account-billing", "scope": "profile email things:read",
                    "realm_access": {"roles": ["default-roles-acme"]}}
KEYCLOAK_USER = {"sub": "9a3c1d2e-0b4f-4e6a-8c7d-1f2e3d4c5b6a", "azp": "web", "preferred_username": "alice",
                 "sid": "c2b1e0f9-1234-4bcd-9e8f-0a1b2c3d4e5f", "scope": "openid profile things:read"}

SHAPES: dict[str, tuple[Mapping[str, Any], str]] = {
    "auth0-m2m": (AUTH0_M2M, "service"), "auth0-m2m-rfc9068": (AUTH0_M2M_RFC9068, "service"),
    "auth0-user": (AUTH0_USER, "human"),
    "entra-v2-app": (ENTRA_V2_APP, "service"), "entra-v1-app": (ENTRA_V1_APP, "service"),
    "entra-v2-user": (ENTRA_V2_USER, "human"), "entra-v1-user": (ENTRA_V1_USER, "human"),
    "okta-service": (OKTA_SERVICE, "service"), "okta-user": (OKTA_USER, "human"),
    "keycloak-service": (KEYCLOAK_SERVICE, "service"), "keycloak-user": (KEYCLOAK_USER, "human"),
}


@pytest.fixture
def guard() -> Iterator[Guard]:
    g = Guard(store="memory://", keys=PEM, algorithms=["RS256"], issuer=ISS, audience=AUD,
              policies={"GET /things": Policy(scopes={"things:read"}), "PUT /doc": Policy(locks=["doc"])})
    yield g
    g.close()


def _token(claims: Mapping[str, Any]) -> str:
    now = int(time.time())
    return mint_token(KEY, "RS256", {"iss": ISS, "aud": AUD, "iat": now, "exp": now + 600, **claims})


def _admit(guard: Guard, claims: Mapping[str, Any], path: str = "/doc", method: str = "PUT") -> Admitted | Denial:
    outcome = guard.admit(RequestInfo(method, path, {"authorization": f"Bearer {_token(claims)}"}, "10.0.0.1"))
    if isinstance(outcome, Admitted):
        guard.release(outcome.ticket)
    return outcome


@pytest.mark.parametrize("shape", SHAPES)
def test_the_kind_of_each_provider_s_tokens(guard: Guard, shape: str) -> None:
    claims, kind = SHAPES[shape]
    outcome = _admit(guard, claims)
    assert isinstance(outcome, Admitted), outcome
    assert outcome.context.kind == kind


@pytest.mark.parametrize("shape", SHAPES)
def test_the_kind_claim_wins_over_every_rule(guard: Guard, shape: str) -> None:
    claims, kind = SHAPES[shape]
    override = "agent" if kind == "service" else "service"
    outcome = _admit(guard, {**claims, "sa_kind": override})
    assert isinstance(outcome, Admitted) and outcome.context.kind == override


def test_kind_rules_are_configurable() -> None:
    assert kind_of(AUTH0_M2M, "sa_kind", ()) == "human"  # no rule: human
    only_keycloak = Guard(store="memory://", keys=PEM, algorithms=["RS256"], kind_rules=["keycloak"])
    try:
        assert kind_of(KEYCLOAK_SERVICE, "sa_kind", only_keycloak.kind_rules) == "service"
        assert kind_of(AUTH0_M2M, "sa_kind", only_keycloak.kind_rules) == "human"
    finally:
        only_keycloak.close()
    agents = Guard(store="memory://", keys=PEM, algorithms=["RS256"],
                   kind_rules=[lambda c: "agent" if c.get("act") else None, "client_id"])
    try:
        assert kind_of({"sub": "bot", "act": {"sub": "alice"}}, "sa_kind", agents.kind_rules) == "agent"
        assert kind_of(OKTA_SERVICE, "sa_kind", agents.kind_rules) == "service"
        with pytest.raises(ValueError):
            kind_of({"sub": "x"}, "sa_kind", (lambda c: "robot",))
    finally:
        agents.close()
    for bad in (["nope"], "auth0", [42]):
        with pytest.raises(ConfigurationError):
            Guard(store="memory://", keys=PEM, algorithms=["RS256"], kind_rules=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("claims", "expected"), [
    (AUTH0_M2M, {"read:things"}), (AUTH0_USER, {"openid", "profile", "read:things"}),
    (ENTRA_V2_APP, set()), (ENTRA_V2_USER, {"Things.Read", "User.Read"}),
    (OKTA_SERVICE, {"things:read"}), (KEYCLOAK_SERVICE, {"profile", "email", "things:read"}),
    ({"scope": "a b", "scp": ["c"]}, {"a", "b", "c"}), ({"scope": 42, "scp": ["ok", 1]}, set()),
])
def test_scopes_from_the_default_claims(claims: Mapping[str, Any], expected: set[str]) -> None:
    assert scopes_of(claims, DEFAULT_SCOPE_CLAIMS) == expected


def test_entra_app_only_roles_count_as_scopes_when_configured() -> None:
    policies = {"GET /things": Policy(scopes={"Things.Read.All"})}
    plain = Guard(store="memory://", keys=PEM, algorithms=["RS256"], issuer=ISS, audience=AUD, policies=policies)
    with_roles = Guard(store="memory://", keys=PEM, algorithms=["RS256"], issuer=ISS, audience=AUD, policies=policies,
                       scope_claims=("scope", "scp", "roles"))
    try:
        refused = _admit(plain, ENTRA_V2_APP, "/things", "GET")
        assert isinstance(refused, Denial) and refused.code == "insufficient_scope"
        assert isinstance(_admit(with_roles, ENTRA_V2_APP, "/things", "GET"), Admitted)
        assert isinstance(_admit(with_roles, ENTRA_V1_APP, "/things", "GET"), Admitted)
        delegated = _admit(with_roles, {**ENTRA_V2_USER, "roles": ["Other"]}, "/things", "GET")
        assert isinstance(delegated, Denial) and delegated.code == "insufficient_scope"
    finally:
        plain.close()
        with_roles.close()
    with pytest.raises(ConfigurationError):
        Guard(store="memory://", keys=PEM, algorithms=["RS256"], scope_claims=())


def test_session_key_choices() -> None:
    claims = {"sub": "svc", "client_id": "svc", "jti": "j1", "sid": "s1"}
    assert session_key(claims, ("sid", "jti"), "svc", "f" * 64) == "s1"
    assert session_key({"sub": "svc", "jti": "j1"}, ("sid", "jti"), "svc", "f" * 64) == "j1"
    assert session_key({"sub": "svc"}, ("sid", "jti"), "svc", "f" * 64) == "f" * 32
    assert session_key(claims, ("client_id",), "svc", "f" * 64) == "svc/client_id:svc"
    # per principal: one client's value never names another principal's session
    assert session_key({"azp": "web"}, ("azp",), "alice", "") != session_key({"azp": "web"}, ("azp",), "bob", "")
    long_key = session_key({"azp": "c" * 256}, ("azp",), "s" * 256, "")
    assert long_key.startswith("h:") and len(long_key) <= 256
    with pytest.raises(ValueError):
        session_key({"azp": 7}, ("azp",), "svc", "")
